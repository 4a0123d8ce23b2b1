//! The Kisara node agent.
//!
//! The agent dials the server (never the reverse, so a node behind NAT can join), presents the
//! join token once and a per-node credential after that, sends its inventory, heartbeats with
//! the node's status, and serves the server's requests against its [`Runtime`]. When the
//! channel drops it reconnects with capped, jittered backoff; containers keep running.

mod events;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kisara_api::agent::{
    AgentMessage, Hello, Operation, Reply, Secret, ServerMessage, PROTOCOL_VERSION,
};
use kisara_api::{codes, ErrorBody, NodeStatus};
use kisara_runtime::{LabelFilter, Runtime, RuntimeError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

mod fetch;
pub mod isolation;
pub mod tunnel;

/// How the agent joins and what it advertises.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The server's base URL, `http://host:port` (or `ws://`).
    pub server_url: String,
    pub name: String,
    pub join_token: Option<Secret>,
    /// Where the node id and credential are kept between runs (file `node.json`, mode 0600).
    pub state_dir: PathBuf,
    /// Address advertised for ports published on this node.
    pub public_address: String,
    pub labels: BTreeMap<String, String>,
    /// Kisara's `max_container`; 0 = unlimited.
    pub max_containers: u32,
}

/// Errors that end the agent (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the server rejected this node: {0}")]
    Rejected(String),
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid server URL {0:?}")]
    Url(String),
    #[error("CA certificate {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
}

/// What the agent remembers between runs.
#[derive(Serialize, Deserialize)]
struct Identity {
    node_id: String,
    credential: Secret,
}

pub struct Agent {
    runtime: Arc<dyn Runtime>,
    opts: AgentOptions,
    /// Forwards engine events; outlives sessions so a reconnect resumes where it left off.
    engine_events: Arc<events::EngineEvents>,
    /// Trust for a `wss://` server: only certificates signed by this CA.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The same CA as PEM, for the bulk-download client.
    ca_pem: Option<Vec<u8>>,
    /// How this node exposes ports (announced in the hello).
    exposure: kisara_api::NodeExposure,
    /// Install (true) or remove (false) the host isolation rules at start; `None` leaves
    /// the host's firewall alone (agents that share a host with another, tests).
    isolation: Option<bool>,
}

/// Heartbeats between two reports of the engine's images (a minute at the default 5 s).
const IMAGE_REPORT_EVERY: u64 = 12;
/// How long operations in progress may run on after the channel dropped, before the agent
/// reconnects (and takes the inventory the server reconciles from).
const SETTLE_ON_DROP: Duration = Duration::from_secs(30);
/// The same when the agent is told to stop: shorter, an operator is waiting.
const SETTLE_ON_SHUTDOWN: Duration = Duration::from_secs(10);

/// Outcome of one connection.
enum SessionEnd {
    /// Channel dropped after a successful join: reconnect soon.
    Dropped,
    /// Never got in: back off.
    Failed(String),
    Shutdown,
}

impl Agent {
    pub fn new(runtime: Arc<dyn Runtime>, opts: AgentOptions) -> Self {
        Agent {
            runtime,
            opts,
            engine_events: Default::default(),
            tls: None,
            ca_pem: None,
            exposure: Default::default(),
            isolation: None,
        }
    }

    /// Installs (or, with `false`, removes) the host isolation rules when the agent starts
    /// (see [`isolation`]).
    pub fn with_isolation(mut self, enabled: bool) -> Self {
        self.isolation = Some(enabled);
        self
    }

    /// Announces how this node exposes ports: mode, host-port range, bandwidth caps.
    pub fn with_exposure(mut self, exposure: kisara_api::NodeExposure) -> Self {
        self.exposure = exposure;
        self
    }

    /// Trusts, for an `https://` server, only certificates signed by the CA in `path` (PEM).
    pub fn with_ca_file(mut self, path: &std::path::Path) -> Result<Self, AgentError> {
        self.tls = Some(tls_trusting(path)?);
        self.ca_pem = std::fs::read(path).ok();
        Ok(self)
    }

    fn identity_path(&self) -> PathBuf {
        self.opts.state_dir.join("node.json")
    }

    fn load_identity(&self) -> Option<Identity> {
        let text = std::fs::read_to_string(self.identity_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save_identity(&self, id: &Identity) -> Result<(), AgentError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |source| AgentError::State {
            path: self.opts.state_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&self.opts.state_dir).map_err(err)?;
        let tmp = self.opts.state_dir.join("node.json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        let text = serde_json::to_string(id).unwrap_or_default();
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, self.identity_path()).map_err(err)
    }

    fn connect_url(&self) -> Result<String, AgentError> {
        let base = self.opts.server_url.trim_end_matches('/');
        let ws = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if base.starts_with("ws://") || base.starts_with("wss://") {
            base.to_string()
        } else {
            return Err(AgentError::Url(self.opts.server_url.clone()));
        };
        Ok(format!("{ws}/v1/agent/connect"))
    }

    /// Runs until `shutdown` is cancelled or the server rejects the node for good.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let url = self.connect_url()?;
        if let Some(enabled) = self.isolation {
            match isolation::apply(enabled).await {
                Ok(()) if enabled => tracing::info!("host isolation rules in place"),
                Ok(()) => tracing::info!("host isolation rules removed (node.isolation = false)"),
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot install the host isolation rules: instances can reach this host \
                     (run the agent as root, or set node.isolation = false)"
                ),
            }
        }
        let engine = loop {
            match self.runtime.info().await {
                Ok(i) => break i,
                Err(e) => {
                    tracing::warn!(error = %e, "container engine not answering; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        };
        let mut backoff = Duration::from_millis(250);
        loop {
            let end = self.session(&url, &engine, &shutdown).await?;
            let wait = match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Dropped => {
                    backoff = Duration::from_millis(250);
                    tracing::warn!("channel to the server dropped; reconnecting");
                    backoff
                }
                SessionEnd::Failed(why) => {
                    tracing::warn!(reason = %why, retry_in = ?backoff, "cannot reach the server");
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    w
                }
            };
            let jitter = Duration::from_millis(rand::random::<u64>() % 250);
            tokio::select! {
                _ = tokio::time::sleep(wait + jitter) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn session(
        &self,
        url: &str,
        engine: &kisara_api::EngineInfo,
        shutdown: &CancellationToken,
    ) -> Result<SessionEnd, AgentError> {
        let connect = tokio::select! {
            c = tokio_tungstenite::connect_async_tls_with_config(
                url,
                Some(
                    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                        .read_buffer_size(kisara_api::agent::CHANNEL_READ_BUFFER),
                ),
                // disable_nagle: replies are small frames that must not wait for an ACK.
                true,
                self.tls.clone().map(tokio_tungstenite::Connector::Rustls),
            ) => c,
            _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        let (mut ws, _) = match connect {
            Ok(c) => c,
            Err(e) => return Ok(SessionEnd::Failed(e.to_string())),
        };
        let identity = self.load_identity();
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            name: self.opts.name.clone(),
            join_token: self.opts.join_token.clone(),
            node_id: identity.as_ref().map(|i| i.node_id.clone()),
            credential: identity.as_ref().map(|i| i.credential.clone()),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            engine: engine.clone(),
            public_address: self.opts.public_address.clone(),
            labels: self.opts.labels.clone(),
            max_containers: self.opts.max_containers,
            exposure: self.exposure.clone(),
        };
        let text = serde_json::to_string(&AgentMessage::Hello(hello)).unwrap_or_default();
        if let Err(e) = ws.send(Message::text(text)).await {
            return Ok(SessionEnd::Failed(e.to_string()));
        }
        let welcome = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        let (node_id, cluster_id, interval) = match welcome {
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ServerMessage>(&t) {
                Ok(ServerMessage::Welcome {
                    node_id,
                    credential,
                    cluster_id,
                    heartbeat_interval_ms,
                }) => {
                    if let Some(credential) = credential {
                        self.save_identity(&Identity {
                            node_id: node_id.clone(),
                            credential,
                        })?;
                    }
                    (
                        node_id,
                        cluster_id,
                        Duration::from_millis(heartbeat_interval_ms.max(100)),
                    )
                }
                Ok(ServerMessage::Rejected { reason }) => {
                    // A stale credential with a join token at hand: forget it and rejoin.
                    if identity.is_some() && self.opts.join_token.is_some() {
                        let _ = std::fs::remove_file(self.identity_path());
                        return Ok(SessionEnd::Failed(reason));
                    }
                    return Err(AgentError::Rejected(reason));
                }
                _ => return Ok(SessionEnd::Failed("unexpected first frame".into())),
            },
            _ => return Ok(SessionEnd::Failed("no welcome from the server".into())),
        };
        tracing::info!(%node_id, "joined the cluster");
        // Data connections of gateway tunnels, dialled per visitor.
        let dialer = tunnel::Dialer::new(
            &self.opts.server_url,
            self.tls.clone(),
            node_id.clone(),
            self.load_identity().map(|i| i.credential),
        )
        .map(Arc::new);
        let fetch = Arc::new(fetch::Fetcher::new(
            &self.opts.server_url,
            node_id.clone(),
            self.load_identity().map(|i| i.credential),
            self.ca_pem.as_deref(),
        ));
        let filter: LabelFilter = vec![(kisara_api::labels::CLUSTER.to_string(), cluster_id)];

        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::channel::<AgentMessage>(1024);
        let writer = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let Ok(text) = serde_json::to_string(&msg) else {
                    continue;
                };
                if sink.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        // Inventory first, so the server reconciles before it trusts its records.
        {
            let rt = self.runtime.clone();
            let tx = tx.clone();
            let filter = filter.clone();
            tokio::spawn(async move {
                let containers = rt.list_containers(&filter).await.unwrap_or_default();
                let networks = rt.list_networks(&filter).await.unwrap_or_default();
                let _ = tx
                    .send(AgentMessage::Inventory {
                        containers,
                        networks,
                    })
                    .await;
            });
        }
        // Set when the engine's images may have changed (a pull or removal finished), so the
        // next beat reports them; otherwise they go out every IMAGE_REPORT_EVERY beats.
        let images_changed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let engine_events =
            self.engine_events
                .spawn_forwarder(self.runtime.clone(), filter.clone(), tx.clone());
        let heartbeat = {
            let rt = self.runtime.clone();
            let tx = tx.clone();
            let filter = filter.clone();
            let images_changed = images_changed.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut beat: u64 = 0;
                let mut last = None;
                let limit = status_limit(interval);
                loop {
                    tick.tick().await;
                    let status = timed_status(rt.as_ref(), &filter, limit, &mut last).await;
                    let report = images_changed.swap(false, std::sync::atomic::Ordering::Relaxed)
                        || beat.is_multiple_of(IMAGE_REPORT_EVERY);
                    beat += 1;
                    let images = if report {
                        match tokio::time::timeout(limit, rt.list_images()).await {
                            Ok(r) => r.ok().map(|imgs| {
                                imgs.into_iter()
                                    .flat_map(|i| std::iter::once(i.id).chain(i.tags))
                                    .collect()
                            }),
                            // A busy engine: ask again on the next beat.
                            Err(_) => {
                                images_changed.store(true, std::sync::atomic::Ordering::Relaxed);
                                None
                            }
                        }
                    } else {
                        None
                    };
                    if tx
                        .send(AgentMessage::Heartbeat { status, images })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            })
        };

        let streams: Arc<Mutex<HashMap<u64, tokio::task::AbortHandle>>> = Default::default();
        let mut tasks = tokio::task::JoinSet::new();
        // Tunnels live apart from operations: when the channel drops, operations are let
        // finish (see below) but tunnels end with the session.
        let mut tunnels = tokio::task::JoinSet::new();
        let end = loop {
            let frame = tokio::select! {
                f = stream.next() => f,
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                Some(_) = tunnels.join_next(), if !tunnels.is_empty() => continue,
            };
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break SessionEnd::Dropped,
                Some(Ok(_)) => continue,
            };
            match serde_json::from_str::<ServerMessage>(&text) {
                Ok(ServerMessage::Request {
                    id,
                    op:
                        Operation::OpenTunnel {
                            tunnel_id,
                            target,
                            protocol,
                        },
                }) => match &dialer {
                    // Owned by the session: a dropped channel ends its tunnels too.
                    Some(d) => {
                        tunnels.spawn(tunnel::open(
                            d.clone(),
                            id,
                            tunnel_id,
                            target,
                            protocol,
                            tx.clone(),
                        ));
                    }
                    None => {
                        let _ = tx
                            .send(AgentMessage::Reply {
                                id,
                                result: Err(ErrorBody::new(
                                    codes::RUNTIME,
                                    "this agent cannot dial its server for tunnels",
                                )),
                            })
                            .await;
                    }
                },
                Ok(ServerMessage::Request { id, op }) => {
                    if let Operation::Stop { docker_id, .. } | Operation::Remove { docker_id, .. } =
                        &op
                    {
                        self.engine_events.expect_exit(docker_id);
                    }
                    let rt = self.runtime.clone();
                    let tx = tx.clone();
                    let streaming = matches!(
                        op,
                        Operation::Logs { .. }
                            | Operation::PullImage { .. }
                            | Operation::LoadImagesFrom { .. }
                    );
                    let fetch = fetch.clone();
                    let streams2 = streams.clone();
                    let touches_images = matches!(
                        op,
                        Operation::PullImage { .. } | Operation::RemoveImage { .. }
                    );
                    let images_changed = images_changed.clone();
                    let handle = tasks.spawn(async move {
                        serve(rt, id, op, &tx, &fetch).await;
                        if touches_images {
                            images_changed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        if let Ok(mut s) = streams2.lock() {
                            s.remove(&id);
                        }
                    });
                    if streaming {
                        if let Ok(mut s) = streams.lock() {
                            s.insert(id, handle);
                        }
                    }
                }
                Ok(ServerMessage::Cancel { id }) => {
                    if let Some(h) = streams.lock().ok().and_then(|mut s| s.remove(&id)) {
                        h.abort();
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "undecodable frame from the server"),
            }
        };
        heartbeat.abort();
        engine_events.abort();
        tunnels.abort_all();
        let settle = match end {
            SessionEnd::Dropped => Some(SETTLE_ON_DROP),
            SessionEnd::Shutdown => Some(SETTLE_ON_SHUTDOWN),
            SessionEnd::Failed(_) => None,
        };
        if let Some(limit) = settle.filter(|_| !tasks.is_empty()) {
            // Operations already sent to the engine (a launch, a network) are let finish
            // rather than cut off half-way: the engine would often complete them anyway,
            // after the next session's inventory was taken, and the server would then have
            // settled their rows as interrupted and never learn of what they made. On
            // shutdown the same holds for whoever cleans up after this agent returned: an
            // abandoned create would land behind their back. Streams (logs, pulls, loads)
            // have no result to keep and end now.
            if let Ok(mut s) = streams.lock() {
                for (_, h) in s.drain() {
                    h.abort();
                }
            }
            let pending = tasks.len();
            let settled =
                tokio::time::timeout(limit, async { while tasks.join_next().await.is_some() {} })
                    .await
                    .is_ok();
            tracing::info!(
                operations = pending,
                settled,
                shutdown = matches!(end, SessionEnd::Shutdown),
                "let the operations in progress finish before leaving the session"
            );
        }
        tasks.abort_all();
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
        Ok(end)
    }
}

/// How long a heartbeat waits for the engine's status (and images): half the interval, so
/// that a busy engine never delays the beat itself.
fn status_limit(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_millis(100))
}

/// The engine's status within `limit`; when it does not answer in time (or fails), the last
/// status it gave, marked stale, so that the beat goes out on time and a slow engine does not
/// make its node look unreachable.
async fn timed_status(
    rt: &dyn Runtime,
    filter: &LabelFilter,
    limit: Duration,
    last: &mut Option<NodeStatus>,
) -> NodeStatus {
    let why = match tokio::time::timeout(limit, rt.status(filter)).await {
        Ok(Ok(status)) => {
            *last = Some(status.clone());
            return status;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {limit:?}"),
    };
    tracing::debug!(reason = %why, "engine status unavailable; sending the last known one");
    NodeStatus {
        stale: true,
        ..last.clone().unwrap_or_default()
    }
}

/// The error body an agent answers with; the server picks the HTTP status from the code.
pub fn error_body(e: &RuntimeError) -> ErrorBody {
    let code = match e {
        RuntimeError::NotFound(_) => codes::NOT_FOUND,
        RuntimeError::Conflict(_) => codes::CONFLICT,
        RuntimeError::BadRequest(_) => codes::BAD_REQUEST,
        RuntimeError::SubnetOverlap(_) => "subnet_overlap",
        RuntimeError::Timeout(_) => codes::TIMEOUT,
        RuntimeError::Engine(_) => codes::RUNTIME,
    };
    ErrorBody::new(code, e.to_string())
}

async fn serve(
    rt: Arc<dyn Runtime>,
    id: u64,
    op: Operation,
    tx: &mpsc::Sender<AgentMessage>,
    fetch: &fetch::Fetcher,
) {
    let reply = |r: Result<Reply, RuntimeError>| AgentMessage::Reply {
        id,
        result: r.map_err(|e| error_body(&e)),
    };
    let msg = match op {
        Operation::Launch { config } => reply(rt.launch(&config).await.map(Reply::Launched)),
        Operation::Inspect { docker_id } => {
            reply(rt.inspect(&docker_id).await.map(Reply::Container))
        }
        Operation::Stop {
            docker_id,
            timeout_secs,
        } => reply(
            rt.stop(&docker_id, Duration::from_secs(timeout_secs as u64))
                .await
                .map(|_| Reply::Done),
        ),
        Operation::Remove { docker_id, force } => {
            reply(rt.remove(&docker_id, force).await.map(|_| Reply::Done))
        }
        Operation::Exec { docker_id, request } => {
            reply(rt.exec(&docker_id, &request).await.map(Reply::Exec))
        }
        Operation::ListContainers => reply(
            rt.list_containers(&Vec::new())
                .await
                .map(|cs| {
                    cs.into_iter()
                        .filter(|c| {
                            c.labels
                                .keys()
                                .any(|k| k.starts_with(kisara_api::labels::PREFIX))
                        })
                        .collect()
                })
                .map(Reply::Containers),
        ),
        Operation::ListImages => reply(rt.list_images().await.map(Reply::Images)),
        Operation::RemoveImage { reference, force } => reply(
            rt.remove_image(&reference, force)
                .await
                .map(|_| Reply::Done),
        ),
        Operation::CreateNetwork { config } => reply(
            rt.create_network(&config)
                .await
                .map(|docker_id| Reply::NetworkCreated { docker_id }),
        ),
        Operation::RemoveNetwork { docker_id } => {
            reply(rt.remove_network(&docker_id).await.map(|_| Reply::Done))
        }
        Operation::ListNetworks => reply(rt.list_networks(&Vec::new()).await.map(Reply::Networks)),
        Operation::UsedSubnets => reply(rt.used_subnets().await.map(Reply::Subnets)),
        Operation::Logs {
            docker_id,
            tail,
            follow,
        } => {
            let s = rt.logs(&docker_id, tail, follow);
            forward(id, s, tx).await;
            return;
        }
        Operation::LoadImagesFrom { url_path } => {
            fetch::load_images_from(rt, id, &url_path, fetch, tx).await;
            return;
        }
        // Served by the session loop, which owns the tunnels' tasks.
        Operation::OpenTunnel { .. } => reply(Err(RuntimeError::BadRequest(
            "tunnels are opened by the session".into(),
        ))),
        Operation::PullImage { reference } => {
            let s = rt.pull_image(&reference);
            forward(id, s, tx).await;
            return;
        }
    };
    let _ = tx.send(msg).await;
}

/// Sends a runtime stream as Stream frames and one StreamEnd.
async fn forward<T: Serialize>(
    id: u64,
    mut s: futures::stream::BoxStream<'static, Result<T, RuntimeError>>,
    tx: &mpsc::Sender<AgentMessage>,
) {
    while let Some(item) = s.next().await {
        match item {
            Ok(v) => {
                let item = serde_json::to_value(&v).unwrap_or_default();
                if tx.send(AgentMessage::Stream { id, item }).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx
                    .send(AgentMessage::StreamEnd {
                        id,
                        error: Some(error_body(&e)),
                    })
                    .await;
                return;
            }
        }
    }
    let _ = tx.send(AgentMessage::StreamEnd { id, error: None }).await;
}

/// A TLS client configuration that trusts only the CA certificates in `path` (PEM).
pub fn tls_trusting(path: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, AgentError> {
    use rustls_pki_types::pem::PemObject;
    let err = |reason: String| AgentError::Ca {
        path: path.to_path_buf(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))?
    {
        roots
            .add(cert.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod heartbeat_tests {
    use super::*;
    use kisara_runtime::hollow::HollowRuntime;

    #[tokio::test]
    async fn a_slow_engine_gets_its_last_status_marked_stale_within_the_limit() {
        let rt = HollowRuntime::new().with_resources(6, 12 << 30);
        let filter: LabelFilter = Vec::new();
        let limit = Duration::from_millis(100);
        let mut last = None;
        let fresh = timed_status(&rt, &filter, limit, &mut last).await;
        assert!(!fresh.stale);
        assert_eq!(fresh.cpus, 6);

        rt.set_status_delay(Duration::from_secs(30));
        let started = tokio::time::Instant::now();
        let slow = timed_status(&rt, &filter, limit, &mut last).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?} for a busy engine",
            started.elapsed()
        );
        assert!(slow.stale, "{slow:?}");
        assert_eq!(
            NodeStatus {
                stale: false,
                ..slow.clone()
            },
            fresh,
            "not the last known status"
        );

        // An engine that never answered: zeros, marked stale.
        let mut never = None;
        let s = timed_status(&rt, &filter, limit, &mut never).await;
        assert!(s.stale && s.cpus == 0, "{s:?}");

        // Back to normal: fresh again.
        rt.set_status_delay(Duration::ZERO);
        assert!(!timed_status(&rt, &filter, limit, &mut last).await.stale);
    }
}
