//! The long-running commands: `up` (server + local agent), `server`, `node`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use kisara_agent::{Agent, AgentOptions};
use kisara_api::agent::Secret;
use kisara_core::config::Config;
use kisara_runtime::docker::DockerRuntime;
use kisara_server::Server;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug)]
pub struct CommonServerArgs {
    /// Data directory (store, tokens). Default: $KISARA_DATA_DIR, else ~/.local/share/kisara.
    #[arg(long, env = "KISARA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address the API listens on.
    #[arg(long, env = "KISARA_LISTEN")]
    listen: Option<String>,
    /// TOML configuration file (Kisara's keys are accepted).
    #[arg(long, env = "KISARA_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    common: CommonServerArgs,
    /// Name of the local node.
    #[arg(long, default_value = "local")]
    name: String,
    /// Address advertised to players for published ports (default: the listen host, or
    /// 127.0.0.1 when listening on all addresses).
    #[arg(long, env = "KISARA_PUBLIC_ADDRESS")]
    public_address: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    common: CommonServerArgs,
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The server's URL, e.g. http://10.0.0.1:7474 (default: `node.server_url` of the config).
    #[arg(long, env = "KISARA_SERVER")]
    server: Option<String>,
    /// The cluster's join token (from the server's data directory, `join.token`).
    #[arg(long, env = "KISARA_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Where the node keeps its credential. Default: <data dir>/node-<name>.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Address advertised to players for ports published on this node.
    #[arg(long, env = "KISARA_PUBLIC_ADDRESS")]
    public_address: Option<String>,
    /// Node label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Most containers Kisara places on this node (0 = unlimited).
    #[arg(long)]
    max_containers: Option<u32>,
    /// TOML configuration file.
    #[arg(long, env = "KISARA_CONFIG")]
    config: Option<PathBuf>,
}

pub(crate) fn init_tracing() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("KISARA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Libraries that log request bodies stay at info whatever KISARA_LOG says: the bodies
    // carry flags, which must never reach a log.
    for d in kisara_server::flags::quiet_directives() {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let mut config = match path {
        Some(p) => Config::load(p).with_context(|| format!("config {}", p.display()))?,
        None => Config::default(),
    };
    config
        .apply_env(|k| std::env::var(k).ok())
        .context("environment overrides")?;
    Ok(config)
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub(crate) async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

struct Started {
    server: Server,
    addr: SocketAddr,
    data_dir: PathBuf,
    /// The server's certificate files when it speaks TLS.
    tls: Option<(PathBuf, PathBuf)>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Started {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// `gateway_by_default`: run the gateway role unless `[gateway] enabled = false` (`kisara up`).
async fn start_server(
    common: &CommonServerArgs,
    config: &Config,
    shutdown: CancellationToken,
    gateway_by_default: bool,
) -> Result<Started> {
    let mut settings = config.server_settings().context("server configuration")?;
    if gateway_by_default && config.gateway.enabled.is_none() {
        settings.exposure.gateway.enabled = true;
    }
    if let Some(l) = &common.listen {
        settings.listen = l
            .parse()
            .with_context(|| format!("--listen {l:?} is not an address like 127.0.0.1:7474"))?;
    }
    // The same default as the client verbs, so `kisara ps` finds the token `kisara up` wrote.
    let data_dir = common
        .data_dir
        .clone()
        .or_else(|| config.server.data_dir.clone())
        .unwrap_or_else(crate::cli::default_data_dir);
    settings.data_dir = data_dir.clone();
    let listen = settings.listen;
    let tls = settings.tls.clone();
    let server = Server::open(settings, data_dir.clone())
        .with_context(|| format!("opening data directory {}", data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(
        server
            .clone()
            .run(listener, async move { shutdown.cancelled().await }),
    );
    Ok(Started {
        server,
        addr,
        data_dir,
        tls,
        task,
    })
}

fn print_banner(s: &Started) {
    let url = format!("{}://{}", s.scheme(), s.addr);
    println!("Kisara is listening on {url}");
    println!(
        "  admin token: {}",
        s.data_dir.join(kisara_server::ADMIN_TOKEN_FILE).display()
    );
    println!(
        "  join token:  {}",
        s.data_dir.join(kisara_server::JOIN_TOKEN_FILE).display()
    );
    println!(
        "  gateway token: {} (for a standalone `kisara gateway`)",
        s.data_dir.join(kisara_server::GATEWAY_TOKEN_FILE).display()
    );
    println!("  try: KISARA_URL={url} kisara ps");
}

/// `kisara up`: server and one local agent in one process.
pub async fn up(args: UpArgs) -> Result<()> {
    init_tracing();
    let config = load_config(args.common.config.as_ref())?;
    let shutdown = CancellationToken::new();
    let started = start_server(&args.common, &config, shutdown.clone(), true).await?;
    // The local node's containers are on this host: the gateway reaches them directly.
    started.server.state().gateway.add_direct_node(&args.name);
    let runtime = DockerRuntime::connect()
        .await
        .context("connecting to the Docker Engine (is it running? DOCKER_HOST?)")?;
    let host = started.addr.ip();
    let connect_host = if host.is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        host.to_string()
    };
    let public_address = args
        .public_address
        .clone()
        .or_else(|| config.node_settings().ok().and_then(|n| n.public_address))
        .or_else(|| config.server.public_address.clone())
        .unwrap_or_else(|| connect_host.clone());
    let agent = Agent::new(
        Arc::new(runtime),
        AgentOptions {
            server_url: format!(
                "{}://{connect_host}:{}",
                started.scheme(),
                started.addr.port()
            ),
            name: args.name.clone(),
            join_token: Some(started.server.state().join_token().clone()),
            state_dir: started.data_dir.join("agent"),
            public_address,
            labels: BTreeMap::new(),
            max_containers: config
                .node_settings()
                .map(|n| n.max_containers)
                .unwrap_or(0),
        },
    );
    // With TLS the local agent trusts the CA of the node config, else the ca.pem that
    // `kisara cert` wrote beside the server certificate.
    let agent = agent.with_exposure(
        config
            .node_settings()
            .map(|n| n.exposure)
            .unwrap_or_default(),
    );
    let agent = match &started.tls {
        Some((cert, _)) => {
            let ca = config
                .node_settings()
                .ok()
                .and_then(|n| n.ca_file)
                .or_else(|| cert.parent().map(|d| d.join("ca.pem")))
                .context("no CA certificate for the local agent: set node.ca_file")?;
            agent.with_ca_file(&ca)?
        }
        None => agent,
    };
    // The host firewall rules that keep instances off this host (node.isolation).
    let agent = agent.with_isolation(config.node_settings().map(|n| n.isolation).unwrap_or(true));
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    print_banner(&started);
    wait(shutdown, started.task, Some(agent_task)).await
}

async fn wait(
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    agent: Option<tokio::task::JoinHandle<Result<(), kisara_agent::AgentError>>>,
) -> Result<()> {
    tokio::select! {
        _ = stop_signal() => {}
        _ = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down; containers keep running");
    shutdown.cancel();
    if let Some(a) = agent {
        if let Ok(Err(e)) = a.await {
            tracing::warn!(error = %e, "agent ended with an error");
        }
    }
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => bail!("server task failed: {e}"),
    }
}

/// `kisara server`: the control plane alone.
pub async fn server(args: ServerArgs) -> Result<()> {
    init_tracing();
    let config = load_config(args.common.config.as_ref())?;
    let shutdown = CancellationToken::new();
    let started = start_server(&args.common, &config, shutdown.clone(), false).await?;
    print_banner(&started);
    wait(shutdown, started.task, None).await
}

/// `kisara node`: an agent joining a server.
/// `ca`: the global `--ca` (KISARA_CA), trusted for an https:// server.
pub async fn node(args: NodeArgs, ca: Option<PathBuf>) -> Result<()> {
    init_tracing();
    let config = load_config(args.config.as_ref())?;
    let settings = config.node_settings().context("node configuration")?;
    let name = args
        .name
        .clone()
        .or(settings.name.clone())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_string());
    let mut labels = settings.labels.clone();
    for l in &args.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("label {l:?} is not KEY=VALUE");
        };
        labels.insert(k.to_string(), v.to_string());
    }
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| crate::cli::default_data_dir().join(format!("node-{name}")));
    let runtime = DockerRuntime::connect()
        .await
        .context("connecting to the Docker Engine (is it running? DOCKER_HOST?)")?;
    let public_address = args
        .public_address
        .clone()
        .or(settings.public_address.clone())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    let agent = Agent::new(
        Arc::new(runtime),
        AgentOptions {
            server_url: args.server.clone().unwrap_or(settings.server_url.clone()),
            name,
            join_token: args
                .join_token
                .clone()
                .map(Secret)
                .or(settings.join_token.clone()),
            state_dir,
            public_address,
            labels,
            max_containers: args.max_containers.unwrap_or(settings.max_containers),
        },
    );
    let agent = agent.with_exposure(settings.exposure.clone());
    let agent = match ca.or(settings.ca_file.clone()) {
        Some(ca) => agent.with_ca_file(&ca)?,
        None => agent,
    };
    let shutdown = CancellationToken::new();
    let agent = agent.with_isolation(settings.isolation);
    let mut task = tokio::spawn(agent.run(shutdown.clone()));
    let result = tokio::select! {
        _ = stop_signal() => {
            shutdown.cancel();
            (&mut task).await
        }
        r = &mut task => r,
    };
    match result {
        Ok(r) => r.map_err(Into::into),
        Err(e) => bail!("agent task failed: {e}"),
    }
}
