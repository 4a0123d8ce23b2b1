//! `service up | ls | inspect | down`: multi-container services from a compose file or a
//! Kisara `ServiceConfig` (JSON).

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use kisara_client::{
    Client, HealthState, Service, ServiceConfig, ServiceFilter, ServiceRequest, ServiceState,
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
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut req = ServiceRequest {
                owner,
                module,
                node,
                name,
                internet,
                health_timeout_secs: health_timeout,
                env: env.into_iter().collect(),
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
