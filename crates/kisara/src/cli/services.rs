//! `service up | ls | inspect | renew | down`: multi-container services from a compose file or a
//! Kisara `ServiceConfig` (JSON).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kisara_client::{
    Client, HealthState, Service, ServiceConfig, ServiceFilter, ServiceFlagSpec, ServiceRequest,
    ServiceState,
};

use super::containers::{each_id, parse_key_value};
use super::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Launch a service and wait until it is up (healthy where it has healthchecks).
    Up {
        /// A docker-compose file, or a Kisara ServiceConfig (JSON with `containers`).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Owner (team or user).
        #[arg(long)]
        owner: Option<String>,
        /// Challenge or module.
        #[arg(long)]
        module: Option<String>,
        /// A variable for the compose file's `${VAR}` interpolation (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_key_value)]
        env: Vec<(String, String)>,
        /// Node (id or name); the scheduler picks one otherwise.
        #[arg(long)]
        node: Option<String>,
        /// A name for the service (default: the compose file's `name:`).
        #[arg(long)]
        name: Option<String>,
        /// Allow outbound traffic from the service's networks.
        #[arg(long)]
        internet: bool,
        /// Seconds to wait for healthchecks (default 120).
        #[arg(long)]
        health_timeout: Option<u64>,
        /// Lifetime in seconds (renew with `kisara service renew`); the server's default
        /// otherwise.
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
        /// A flag in env FLAG of the first container, from a template such as
        /// `flag{[uuid]}` or `flag{[team_hash]}`.
        #[arg(long)]
        flag: Option<String>,
        /// A flag spec as JSON, e.g.
        /// `{"container":"web","template":"flag{[uuid]}","inject":{"file":{"path":"/flag"}}}`
        /// (repeatable).
        #[arg(long = "flag-spec", value_name = "JSON", value_parser = parse_flag_spec)]
        flag_specs: Vec<ServiceFlagSpec>,
        #[command(flatten)]
        exposure: super::containers::ExposeArgs,
    },
    /// Extend services' lifetimes.
    Renew {
        #[arg(required = true)]
        ids: Vec<String>,
        /// Seconds to extend by (default: the server's renewal step).
        #[arg(long, value_name = "SECS")]
        secs: Option<u64>,
    },
    /// List services.
    #[command(visible_alias = "list")]
    Ls {
        #[arg(long)]
        owner: Option<String>,
        #[arg(long)]
        module: Option<String>,
        #[arg(long)]
        node: Option<String>,
    },
    /// Show a service as JSON.
    Inspect { id: String },
    /// Stop services: every container and network made for them is removed.
    #[command(visible_alias = "rm")]
    Down {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub async fn run(client: &Client, out: &Output, cmd: ServiceCommand) -> anyhow::Result<i32> {
    match cmd {
        ServiceCommand::Up {
            file,
            owner,
            module,
            env,
            node,
            name,
            internet,
            health_timeout,
            ttl,
            flag,
            flag_specs,
            exposure,
        } => {
            let mut flags = flag_specs;
            if let Some(template) = flag {
                flags.push(ServiceFlagSpec {
                    container: None,
                    template,
                    inject: Default::default(),
                });
            }
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut req = ServiceRequest {
                owner,
                module,
                node,
                name,
                internet,
                health_timeout_secs: health_timeout,
                ttl_secs: ttl,
                flags,
                env: env.into_iter().collect(),
                expose: exposure.expose,
                bandwidth_kbps: exposure.bandwidth_kbps,
                ..Default::default()
            };
            // A JSON object with `containers` is Kisara's ServiceConfig; anything else is compose.
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v.get("containers").is_some() => {
                    let config: ServiceConfig = serde_json::from_value(v).with_context(|| {
                        format!("{} is not a valid ServiceConfig", file.display())
                    })?;
                    req.config = Some(config);
                }
                _ => req.compose = Some(text),
            }
            let s = client.launch_service(&req).await?;
            if out.json {
                out.print_json(&s)?;
            } else {
                output::line(&s.id)?;
                print_containers(&s)?;
            }
            Ok(0)
        }
        ServiceCommand::Ls {
            owner,
            module,
            node,
        } => {
            let list = client
                .list_services(&ServiceFilter {
                    owner,
                    module,
                    node,
                })
                .await?;
            output::warn_node_errors(&list.node_errors);
            if out.json {
                out.print_json(&list)?;
                return Ok(0);
            }
            let now = output::now();
            let mut t = output::table(&[
                "ID",
                "NAME",
                "NODE",
                "STATE",
                "CONTAINERS",
                "PORTS",
                "OWNER",
                "MODULE",
                "CREATED",
            ]);
            for s in &list.items {
                let up = s
                    .containers
                    .iter()
                    .filter(|c| c.state == kisara_client::ContainerState::Running)
                    .count();
                t.add_row(vec![
                    output::short_id(&s.id).to_string(),
                    s.name.clone(),
                    output::short_id(&s.node_id).to_string(),
                    state(s.state).to_string(),
                    format!("{up}/{}", s.containers.len()),
                    output::format_ports(&s.ports),
                    output::or_dash(s.owner.as_deref()).to_string(),
                    output::or_dash(s.module.as_deref()).to_string(),
                    output::ago(s.created_at, now),
                ]);
            }
            output::print_table(&t)?;
            Ok(0)
        }
        ServiceCommand::Inspect { id } => {
            out.print_json(&client.service(&id).await?)?;
            Ok(0)
        }
        ServiceCommand::Renew { ids, secs } => {
            let mut code = 0;
            for id in &ids {
                match client.renew_service(id, secs).await {
                    Ok(s) if out.json => out.print_json(&s)?,
                    Ok(s) => output::line(&format!(
                        "{} expires at {} (in {}s), renewed {} times",
                        s.id,
                        s.expires_at
                            .map_or_else(|| "-".to_string(), |e| e.to_string()),
                        s.expires_at.map_or(0, |e| e - output::now()),
                        s.renewals
                    ))?,
                    Err(e) => {
                        output::print_error(&e);
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        ServiceCommand::Down { ids } => {
            each_id(out, &ids, async |id| client.remove_service(id).await).await
        }
    }
}

fn print_containers(s: &Service) -> std::io::Result<()> {
    let mut t = output::table(&["SERVICE", "CONTAINER", "STATE", "HEALTH", "PORTS"]);
    for c in &s.containers {
        t.add_row(vec![
            c.service.clone(),
            output::short_id(&c.id).to_string(),
            output::container_state(c.state).to_string(),
            health(c.health).to_string(),
            output::format_ports(&c.ports),
        ]);
    }
    output::print_table(&t)
}

fn state(s: ServiceState) -> &'static str {
    match s {
        ServiceState::Launching => "launching",
        ServiceState::Running => "running",
        ServiceState::Starting => "starting",
        ServiceState::Degraded => "degraded",
        ServiceState::Unknown => "unknown",
    }
}

fn health(h: Option<HealthState>) -> &'static str {
    match h {
        None => "-",
        Some(HealthState::Starting) => "starting",
        Some(HealthState::Healthy) => "healthy",
        Some(HealthState::Unhealthy) => "unhealthy",
    }
}

/// A `--flag-spec` argument of `service up`.
fn parse_flag_spec(s: &str) -> Result<ServiceFlagSpec, String> {
    serde_json::from_str(s).map_err(|e| format!("not a flag spec: {e}"))
}
