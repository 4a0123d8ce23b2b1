//! `kisara gateway`: a standalone gateway in front of a server.
//!
//! It keeps nothing of its own: every `--poll-ms` it asks the server which public ports the
//! gateway role has (`GET /v1/gateway/ports`), listens on those it does not yet
//! and stops those that went away. Each visitor gets a connection of its own to the server,
//! `GET /v1/gateway/relay/{protocol}/{port}` upgraded to raw bytes (UDP: framed datagrams,
//! one connection per visitor address, closed after `--udp-idle-secs` of silence), and the
//! server carries it on to the container exactly as its own listeners would: caps, counters
//! and node tunnels stay in the server. Run the server with `[gateway] listen = false` so it
//! does not bind the same ports itself; several gateways may front one server.
//!
//! Its credential is the server's gateway token (`DIR/gateway.token`, written by the server
//! next to `admin.token`): it lists the gateway's ports and relays visitors, and every other
//! endpoint refuses it. The admin token is still accepted there, for older setups.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kisara_agent::tunnel::Dialer;
use kisara_api::agent::Secret;
use kisara_api::{GatewayPort, Protocol};
use kisara_tunnel::relay::Accounting;
use kisara_tunnel::udp::{UdpOptions, Upstream};
use tokio::net::TcpListener;

use crate::cli::ClientArgs;

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Address the public listeners bind.
    #[arg(long, env = "KISARA_GATEWAY_LISTEN", default_value = "0.0.0.0")]
    listen_host: IpAddr,
    /// How often the server is asked for its gateway ports, in milliseconds (100..=60000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    poll_ms: u64,
    /// A UDP visitor silent this long loses its session, in seconds (1..=86400).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    udp_idle_secs: u64,
}

/// A listener task, stopped on drop.
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn run(client: ClientArgs, args: GatewayArgs) -> Result<()> {
    crate::daemon::init_tracing();
    // Given, else the server's gateway.token (a gateway on the server's machine).
    let token = crate::cli::resolve_token_file(
        client.token.clone(),
        &client.data_dir(),
        kisara_server::GATEWAY_TOKEN_FILE,
    )?
    .context(
        "kisara gateway needs the server's gateway token (--token or KISARA_TOKEN, \
         or gateway.token in --data-dir)",
    )?;
    let token = Secret(token);
    let tls = match &client.ca {
        Some(p) => Some(kisara_agent::tls_trusting(p)?),
        None => None,
    };
    let dialer = Arc::new(
        Dialer::with_bearer(&client.url, tls, &token)
            .with_context(|| format!("--url {:?} is not http:// or https://", client.url))?,
    );
    let mut builder = kisara_client::Client::builder(&client.url).token(token.expose());
    if let Some(ca) = &client.ca {
        let pem = std::fs::read(ca).with_context(|| format!("CA certificate {}", ca.display()))?;
        builder = builder.ca_pem(pem);
    }
    let api = builder.build().context("client for the server")?;
    // A wrong token or URL is told at once rather than retried forever.
    api.gateway_ports()
        .await
        .with_context(|| format!("asking {} for its gateway ports", client.url))?;
    let opts = UdpOptions {
        idle: Duration::from_secs(args.udp_idle_secs),
        ..Default::default()
    };
    eprintln!(
        "kisara gateway: listening on {} for {}",
        args.listen_host, client.url
    );
    let mut listeners: HashMap<GatewayPort, Listener> = HashMap::new();
    let mut failing: HashSet<GatewayPort> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = crate::daemon::stop_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let ports: HashSet<GatewayPort> = match api.gateway_ports().await {
            Ok(p) => p.into_iter().collect(),
            Err(e) => {
                // Visitors already connected go on; the listeners stay until the server answers.
                tracing::warn!(error = %e, "cannot read the gateway ports; keeping the listeners");
                continue;
            }
        };
        listeners.retain(|p, _| ports.contains(p));
        failing.retain(|p| ports.contains(p));
        for p in ports {
            if listeners.contains_key(&p) {
                continue;
            }
            match open(&dialer, args.listen_host, p, opts).await {
                Ok(l) => {
                    tracing::info!(port = p.port, protocol = %p.protocol, "listening");
                    failing.remove(&p);
                    listeners.insert(p, l);
                }
                Err(e) => {
                    if failing.insert(p) {
                        tracing::warn!(port = p.port, protocol = %p.protocol, error = %e,
                            "cannot listen; retrying");
                    }
                }
            }
        }
    }
    listeners.clear();
    Ok(())
}

async fn open(
    dialer: &Arc<Dialer>,
    host: IpAddr,
    p: GatewayPort,
    opts: UdpOptions,
) -> std::io::Result<Listener> {
    let addr = SocketAddr::new(host, p.port);
    let path = format!("/v1/gateway/relay/{}/{}", p.protocol, p.port);
    let dialer = dialer.clone();
    let task = match p.protocol {
        Protocol::Tcp => {
            let listener = TcpListener::bind(addr).await?;
            tokio::spawn(accept_tcp(listener, dialer, path))
        }
        Protocol::Udp => {
            let socket = Arc::new(kisara_tunnel::udp::bind(addr).await?);
            tokio::spawn(async move {
                let r = kisara_tunnel::udp::serve(socket, opts, Accounting::default(), move |_| {
                    let dialer = dialer.clone();
                    let path = path.clone();
                    async move {
                        let s = dialer.dial(&path).await.map_err(std::io::Error::other)?;
                        Ok(Upstream::Stream(s))
                    }
                })
                .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "UDP listener failed");
                }
            })
        }
    };
    Ok(Listener(task))
}

async fn accept_tcp(listener: TcpListener, dialer: Arc<Dialer>, path: String) {
    loop {
        let (visitor, from) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let dialer = dialer.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let _ = visitor.set_nodelay(true);
            match dialer.dial(&path).await {
                Ok(upstream) => {
                    if let Err(e) =
                        kisara_tunnel::relay(visitor, upstream, &Accounting::default()).await
                    {
                        tracing::debug!(%from, error = %e, "visitor ended with an error");
                    }
                }
                // The visitor's connection is closed: the container cannot be reached now.
                Err(e) => tracing::debug!(%from, error = %e, "the server refused the visitor"),
            }
        });
    }
}
