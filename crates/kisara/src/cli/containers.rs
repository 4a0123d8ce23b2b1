//! `ps`, `run`, `stop`, `rm`, `inspect`, `exec`, `logs`.

use std::collections::BTreeMap;
use std::io::Write;

use clap::Args;
use futures::StreamExt;
use kisara_client::{Client, ContainerFilter, ExecRequest, LaunchRequest};

use super::output::{self, Output};

/// Exit code of a command that did not finish in time (as `timeout(1)` uses).
pub const EXIT_TIMED_OUT: i32 = 124;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only containers of this owner (team or user).
    #[arg(long)]
    pub owner: Option<String>,
    /// Only containers of this module (challenge).
    #[arg(long)]
    pub module: Option<String>,
    /// Only containers on this node (id or name).
    #[arg(long)]
    pub node: Option<String>,
    /// Include containers found gone.
    #[arg(short, long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Image reference, e.g. `busybox:latest`.
    pub image: String,
    /// Command and arguments (override the image's CMD).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
    /// Publish a container port: `80`, `80/tcp`, `53/udp`. Kisara picks the public port.
    #[arg(short, long = "port", value_name = "PORT[/PROTO]", value_parser = parse_port)]
    pub ports: Vec<String>,
    /// Environment variable.
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Join an existing network instead of getting a fresh one of its own.
    #[arg(long)]
    pub network: Option<String>,
    /// Allow outbound traffic from the container's fresh network.
    #[arg(long)]
    pub internet: bool,
    /// Owner (team or user).
    #[arg(long)]
    pub owner: Option<String>,
    /// Module (challenge) name.
    #[arg(long)]
    pub module: Option<String>,
    /// Container name.
    #[arg(long)]
    pub name: Option<String>,
    /// Memory limit in MiB.
    #[arg(long, value_name = "MB")]
    pub memory: Option<u64>,
    /// CPU limit in cores, e.g. 0.5.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[arg(long, value_name = "N")]
    pub pids: Option<i64>,
    /// Node (id or name) to run on; the scheduler picks one otherwise.
    #[arg(long)]
    pub node: Option<String>,
    /// Extra label.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,
    /// Run privileged (the server must allow it).
    #[arg(long)]
    pub privileged: bool,
    /// Bind mount HOST:CONTAINER[:ro] (the server must allow it).
    #[arg(short = 'v', long = "bind", value_name = "HOST:CONTAINER[:ro]")]
    pub binds: Vec<String>,
    /// Lifetime in seconds (renew with `kisara renew`); the server's default otherwise.
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u64>,
    /// A flag in env FLAG, from a template such as `flag{[uuid]}` or `flag{[team_hash]}`.
    #[arg(long, value_name = "TEMPLATE")]
    pub flag: Option<String>,
    /// A flag spec as JSON, e.g. `{"template":"flag{[uuid]}","inject":{"file":{"path":"/flag"}}}`.
    #[arg(long = "flag-spec", value_name = "JSON", value_parser = parse_flag_spec)]
    pub flag_specs: Vec<kisara_api::FlagSpec>,
    #[command(flatten)]
    pub exposure: ExposeArgs,
}

/// How published ports are exposed (`kisara run`, `kisara service up`).
#[derive(Args, Debug, Clone, Default)]
pub struct ExposeArgs {
    /// `host` (a host port of the node) or `gateway` (a port of the gateway, tunnelled to the
    /// node); the node's mode, else the server's default, otherwise.
    #[arg(long, value_name = "MODE")]
    pub expose: Option<kisara_api::ExposeMode>,
    /// Bandwidth cap of each container's exposed traffic, kbit/s each way (gateway mode).
    #[arg(long, value_name = "KBPS")]
    pub bandwidth_kbps: Option<u64>,
}

/// A `--flag-spec` argument.
pub fn parse_flag_spec(s: &str) -> Result<kisara_api::FlagSpec, String> {
    serde_json::from_str(s).map_err(|e| format!("not a flag spec: {e}"))
}

#[derive(Debug, Args)]
pub struct RmArgs {
    /// Remove even when running.
    #[arg(short, long)]
    pub force: bool,
    /// Kisara id, name, or Docker id prefix.
    #[arg(required = true)]
    pub ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Kisara id, name, or Docker id prefix.
    pub id: String,
    /// Seconds before the command is abandoned (server default 30, at most 600).
    #[arg(long, value_name = "S")]
    pub timeout: Option<u64>,
    /// Environment variable.
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// User to run as.
    #[arg(short, long)]
    pub user: Option<String>,
    /// Working directory.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Command and arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    pub tail: Option<u64>,
    /// Keep printing new output.
    #[arg(short, long)]
    pub follow: bool,
    /// Kisara id, name, or Docker id prefix.
    pub id: String,
}

pub async fn ps(client: &Client, out: &Output, a: PsArgs) -> anyhow::Result<i32> {
    let filter = ContainerFilter {
        owner: a.owner,
        module: a.module,
        node: a.node,
        all: a.all.then_some(true),
    };
    let list = client.list_containers(&filter).await?;
    output::warn_node_errors(&list.node_errors);
    if out.json {
        out.print_json(&list)?;
        return Ok(0);
    }
    let mut t = output::table(&[
        "ID", "NAME", "NODE", "IMAGE", "STATE", "PORTS", "OWNER", "MODULE",
    ]);
    for c in &list.items {
        t.add_row(vec![
            output::short_id(&c.id),
            &c.name,
            output::short_id(&c.node_id),
            &c.image,
            output::container_state(c.state),
            &output::format_ports(&c.ports),
            output::or_dash(c.owner.as_deref()),
            output::or_dash(c.module.as_deref()),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

pub async fn run(client: &Client, out: &Output, a: RunArgs) -> anyhow::Result<i32> {
    let req = LaunchRequest {
        image: a.image,
        name: a.name,
        cmd: (!a.cmd.is_empty()).then_some(a.cmd),
        env: a.env.into_iter().collect(),
        ports: a.ports,
        network: a.network,
        internet: a.internet,
        owner: a.owner,
        module: a.module,
        labels: a.labels.into_iter().collect(),
        memory_mb: a.memory,
        cpus: a.cpus,
        pids_limit: a.pids,
        privileged: a.privileged,
        binds: a.binds,
        node: a.node,
        ttl_secs: a.ttl,
        flag: a.flag.map(kisara_api::agent::Secret),
        flags: a.flag_specs,
        expose: a.exposure.expose,
        bandwidth_kbps: a.exposure.bandwidth_kbps,
        ..Default::default()
    };
    let c = client.launch(&req).await?;
    if out.json {
        out.print_json(&c)?;
        return Ok(0);
    }
    // The id alone on stdout, so `id=$(kisara run ...)` works; where to connect on stderr.
    output::line(&c.id)?;
    for p in &c.ports {
        eprintln!(
            "{}/{} -> {}:{}",
            p.container_port, p.protocol, p.public_host, p.public_port
        );
    }
    Ok(0)
}

pub async fn stop(client: &Client, out: &Output, ids: &[String]) -> anyhow::Result<i32> {
    each_id(out, ids, async |id| client.stop(id).await).await
}

/// Renews a container, or a service when no container answers to the id.
pub async fn renew(client: &Client, out: &Output, a: RenewArgs) -> anyhow::Result<i32> {
    let (id, expires_at, renewals) = match client.renew(&a.id, a.secs).await {
        Ok(c) if out.json => return out.print_json(&c).map(|()| 0),
        Ok(c) => (c.id, c.expires_at, c.renewals),
        Err(e) if e.status() == Some(404) => match client.renew_service(&a.id, a.secs).await {
            Ok(s) if out.json => return out.print_json(&s).map(|()| 0),
            Ok(s) => (s.id, s.expires_at, s.renewals),
            // Neither: the container's answer names what was not found.
            Err(se) if se.status() == Some(404) => return Err(e.into()),
            Err(se) => return Err(se.into()),
        },
        Err(e) => return Err(e.into()),
    };
    let until = expires_at.map_or_else(|| "-".to_string(), |e| e.to_string());
    output::line(&format!(
        "{id} expires at {until} (in {}s), renewed {renewals} times",
        expires_at.map_or(0, |e| e - output::now()),
    ))?;
    Ok(0)
}

#[derive(Debug, Args)]
pub struct RenewArgs {
    /// Container (Kisara id, name, or Docker id prefix) or service (id or name).
    pub id: String,
    /// Seconds to extend by (default: the server's renewal step).
    #[arg(long, value_name = "SECS")]
    pub secs: Option<u64>,
}

pub async fn rm(client: &Client, out: &Output, a: RmArgs) -> anyhow::Result<i32> {
    each_id(out, &a.ids, async |id| client.remove(id, a.force).await).await
}

pub async fn inspect(client: &Client, out: &Output, id: &str) -> anyhow::Result<i32> {
    out.print_json(&client.container(id).await?)?;
    Ok(0)
}

pub async fn exec(client: &Client, out: &Output, a: ExecArgs) -> anyhow::Result<i32> {
    let req = ExecRequest {
        cmd: a.cmd,
        env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
        user: a.user,
        workdir: a.workdir,
        timeout_secs: a.timeout,
    };
    let r = client.exec(&a.id, &req).await?;
    if out.json {
        out.print_json(&r)?;
    } else {
        std::io::stdout().write_all(r.stdout.as_bytes())?;
        std::io::stdout().flush()?;
        std::io::stderr().write_all(r.stderr.as_bytes())?;
    }
    Ok(exec_exit_code(r.exit_code, r.timed_out, a.timeout))
}

/// The exit code `kisara exec` ends with: the command's, or 124 when it timed out.
fn exec_exit_code(code: Option<i64>, timed_out: bool, timeout: Option<u64>) -> i32 {
    if timed_out {
        match timeout {
            Some(s) => eprintln!("error: the command timed out after {s} s"),
            None => eprintln!("error: the command timed out"),
        }
        return EXIT_TIMED_OUT;
    }
    match code {
        // Out of a process's 0..=255 range: report failure rather than a wrapped value.
        Some(c) => u8::try_from(c).map_or(255, i32::from),
        None => {
            eprintln!("error: the command ended without an exit code");
            1
        }
    }
}

pub async fn logs(client: &Client, a: LogsArgs) -> anyhow::Result<i32> {
    let mut stream = client.logs(&a.id, a.tail, a.follow).await?;
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        let written = stdout.write_all(&chunk).and_then(|()| stdout.flush());
        match written {
            Ok(()) => {}
            // `kisara logs -f x | head` closes the pipe: that is the reader being done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(0)
}

/// Runs `op` on each id, going on past failures: prints each id done (or, with `--json`, a
/// list of `{id, ok, error}`), each failure on stderr, and exits 1 if any failed.
pub async fn each_id(
    out: &Output,
    ids: &[String],
    op: impl AsyncFn(&str) -> kisara_client::Result<()>,
) -> anyhow::Result<i32> {
    let mut results = Vec::new();
    let mut failed = false;
    for id in ids {
        match op(id).await {
            Ok(()) => {
                if !out.json {
                    output::line(id)?;
                }
                results.push(serde_json::json!({ "id": id, "ok": true }));
            }
            Err(e) => {
                failed = true;
                output::print_error(&e);
                results.push(serde_json::json!({
                    "id": id,
                    "ok": false,
                    "error": {
                        "code": e.code().unwrap_or("client_error"),
                        "message": output::error_message(&e),
                    },
                }));
            }
        }
    }
    if out.json {
        out.print_json(&results)?;
    }
    Ok(i32::from(failed))
}

/// `KEY=VALUE` (the value may hold `=` and be empty).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// A container port to publish: `80`, `80/tcp`, `53/udp`. Returned in the `80/tcp` form.
pub fn parse_port(s: &str) -> Result<String, String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    if port.contains(':') {
        return Err(format!(
            "{s:?}: give the container port only (e.g. 80/tcp); Kisara picks the public port"
        ));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: the port must be a number from 1 to 65535"))?;
    let proto = proto.to_ascii_lowercase();
    if proto != "tcp" && proto != "udp" {
        return Err(format!("{s:?}: the protocol must be tcp or udp"));
    }
    Ok(format!("{port}/{proto}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values() {
        assert_eq!(
            parse_key_value("FLAG=flag{a=b}"),
            Ok(("FLAG".into(), "flag{a=b}".into()))
        );
        assert_eq!(parse_key_value("EMPTY="), Ok(("EMPTY".into(), "".into())));
        assert!(parse_key_value("NOEQ").is_err());
        assert!(parse_key_value("=v").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("80").as_deref(), Ok("80/tcp"));
        assert_eq!(parse_port("53/UDP").as_deref(), Ok("53/udp"));
        assert_eq!(parse_port("22/tcp").as_deref(), Ok("22/tcp"));
        for bad in ["0", "65536", "http", "80/sctp", "8080:80", "", "/tcp"] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exec_exit_codes() {
        assert_eq!(exec_exit_code(Some(0), false, None), 0);
        assert_eq!(exec_exit_code(Some(3), false, None), 3);
        assert_eq!(exec_exit_code(Some(300), false, None), 255);
        assert_eq!(exec_exit_code(Some(-1), false, None), 255);
        assert_eq!(exec_exit_code(None, true, Some(5)), EXIT_TIMED_OUT);
        assert_eq!(exec_exit_code(None, false, None), 1);
    }
}
