//! The Kisara control plane.
//!
//! The server owns desired state (in the SQLite store) and reaches Docker only through the
//! agents that dial in over `/v1/agent/connect`. `kisara up` runs this server and one agent in
//! the same process; `kisara server` runs it alone.
//!
//! [`Server::run`] takes its listener and a shutdown future, so tests bind `127.0.0.1:0`.

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::sync::Arc;

use kisara_api::agent::Secret;
use kisara_core::config::ServerSettings;
use kisara_store::Store;

pub mod api;
pub mod awd;
pub mod error;
pub mod events;
pub mod flags;
pub mod gateway;
pub mod hub;
pub mod instances;
pub mod janitor;
pub mod metrics;
pub mod openapi;
pub mod placement;
pub mod reconcile;
pub mod tls;
pub mod tokens;
pub mod warm;
pub mod webhooks;
pub mod ws;

pub use error::{ApiError, ApiResult};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Store(#[from] kisara_store::StoreError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
}

/// Shared state of every request handler.
pub struct AppState {
    pub store: Store,
    pub hub: hub::Hub,
    pub settings: ServerSettings,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    admin_token: Secret,
    join_token: Secret,
    /// The standalone gateway's credential: its endpoints (`/v1/gateway/...`) and nothing else.
    gateway_token: Secret,
    /// Cancelled when the server shuts down: closes agent channels and followed streams.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Per node: labelled containers found on the engine that the store does not know.
    unknown: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Spare networks kept ready per node.
    pub warm: warm::WarmPool,
    /// The allocation ledger the scheduler places against.
    pub placement: placement::Ledger,
    /// Events: stored, broadcast to SSE streams, delivered to webhooks.
    pub events: events::EventBus,
    /// When this process opened the store (unix seconds): launch intent older than this was
    /// interrupted by a crash or restart.
    pub started_at: i64,
    /// Launches (containers, networks) this process has under way: their intent rows are not
    /// to be settled by reconciliation, however young or old.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
    pub metrics: metrics::Metrics,
    /// Key of `[team_hash]` flags (never logged).
    pub flag_secret: Secret,
    /// Public listeners, tunnels and traffic of gateway-mode ports.
    pub gateway: gateway::Gateway,
}

impl AppState {
    pub fn admin_token(&self) -> &Secret {
        &self.admin_token
    }
    pub fn join_token(&self) -> &Secret {
        &self.join_token
    }
    pub fn gateway_token(&self) -> &Secret {
        &self.gateway_token
    }
    /// Marks a launch as under way in this process until the guard is dropped.
    pub fn begin_launch(self: &Arc<Self>, id: &str) -> InFlightGuard {
        if let Ok(mut s) = self.in_flight.lock() {
            s.insert(id.to_string());
        }
        InFlightGuard {
            state: self.clone(),
            id: id.to_string(),
        }
    }

    /// Whether this process is still working on the launch of `id`.
    pub fn is_in_flight(&self, id: &str) -> bool {
        self.in_flight
            .lock()
            .map(|s| s.contains(id))
            .unwrap_or(true)
    }

    pub fn unknown_containers(&self) -> std::collections::HashMap<String, Vec<String>> {
        self.unknown.lock().map(|m| m.clone()).unwrap_or_default()
    }
    pub fn set_unknown_containers(&self, node_id: &str, ids: Vec<String>) {
        if let Ok(mut m) = self.unknown.lock() {
            m.insert(node_id.to_string(), ids);
        }
    }
}

/// Ends an in-flight launch when dropped (on success, failure or a dropped request alike).
pub struct InFlightGuard {
    state: Arc<AppState>,
    id: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.in_flight.lock() {
            s.remove(&self.id);
        }
    }
}

/// A server ready to run.
#[derive(Clone)]
pub struct Server {
    state: Arc<AppState>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// File names inside the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const JOIN_TOKEN_FILE: &str = "join.token";
pub const GATEWAY_TOKEN_FILE: &str = "gateway.token";
pub const STORE_FILE: &str = "kisara.db";

impl Server {
    /// Opens (or initialises) the data directory: store, cluster id, tokens.
    pub fn open(settings: ServerSettings, data_dir: PathBuf) -> Result<Server, ServerError> {
        std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
        }
        let store = Store::open(&data_dir.join(STORE_FILE))?;
        // A crash between a subnet's allocation and its network's row leaves the subnet held
        // by nothing; nothing is being launched yet, so it is safe to give them back now.
        let released = store.release_orphan_subnets()?;
        if released > 0 {
            tracing::info!(
                released,
                "returned subnets of interrupted launches to the pool"
            );
        }
        let cluster_id = match store.get_meta("cluster_id")? {
            Some(id) => id,
            None => {
                let id = new_id();
                store.set_meta("cluster_id", &id)?;
                id
            }
        };
        let admin_token = match settings.admin_token.clone() {
            Some(t) => {
                tokens::write_private(&data_dir.join(ADMIN_TOKEN_FILE), t.expose())?;
                t
            }
            None => tokens::load_or_create(&data_dir.join(ADMIN_TOKEN_FILE), "ksa_")?,
        };
        let join_token = tokens::load_or_create(&data_dir.join(JOIN_TOKEN_FILE), "ksj_")?;
        let gateway_token = tokens::load_or_create(&data_dir.join(GATEWAY_TOKEN_FILE), "ksg_")?;
        let flag_secret = flags::load_secret(&settings, &data_dir)?;
        let ledger = placement::Ledger::load(&store, &settings)?;
        let events = events::EventBus::new(store.clone(), cluster_id.clone());
        let gateway = gateway::Gateway::new(settings.exposure.gateway.clone());
        let tls = match &settings.tls {
            Some((cert, key)) => Some(tls::server_config(cert, key).map_err(ServerError::Tls)?),
            None => None,
        };
        Ok(Server {
            tls,
            state: Arc::new(AppState {
                store,
                hub: hub::Hub::default(),
                settings,
                cluster_id,
                data_dir,
                admin_token,
                join_token,
                gateway_token,
                shutdown: tokio_util::sync::CancellationToken::new(),
                unknown: Default::default(),
                warm: Default::default(),
                started_at: now(),
                in_flight: Default::default(),
                metrics: Default::default(),
                flag_secret,
                gateway,
                placement: ledger,
                events,
            }),
        })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Serves until `shutdown` resolves. Agents' channels are closed on the way out; the
    /// containers they run keep running.
    pub async fn run(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router();
        events::start(&self.state);
        let janitor = tokio::spawn(janitor::run(self.state.clone()));
        // Reopens the listeners of gateway leases at once, then sweeps stale leases.
        gateway::sweep(&self.state).await;
        let gateway = gateway::start(&self.state);
        let token = self.state.shutdown.clone();
        let graceful = token.clone();
        let serve: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> =
            match self.tls.clone() {
                Some(tls) => Box::pin(serve_tls(listener, app, tls, graceful)),
                None => Box::pin(
                    // Agent channels are request/reply with small frames: Nagle's algorithm
                    // against delayed ACKs would stall each reply by tens of milliseconds.
                    axum::serve(
                        axum::serve::ListenerExt::tap_io(listener, |tcp| {
                            let _ = tcp.set_nodelay(true);
                        }),
                        app,
                    )
                    .with_graceful_shutdown(async move { graceful.cancelled().await })
                    .into_future(),
                ),
            };
        let mut serve = serve;
        tokio::select! {
            r = &mut serve => {
                token.cancel();
                return r;
            }
            _ = shutdown => {}
        }
        token.cancel();
        let _ = janitor.await;
        if let Some(g) = gateway {
            let _ = g.await;
        }
        // Long-lived streams (agent channels, followed logs) watch the token; give in-flight
        // requests a moment to finish, then stop regardless.
        match tokio::time::timeout(std::time::Duration::from_secs(5), serve).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}

/// Serves HTTPS (and WSS for agents) until `token` is cancelled: a TLS handshake per
/// connection, bounded in time so that a silent client cannot hold a task forever.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Arc<rustls::ServerConfig>,
    token: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of descriptors and the like: keep serving the connections we have.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = token.cancelled() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                _ => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder
                .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = token.cancelled() => {}
            }
        });
    }
}

/// A new random id (12 hex characters, like Docker's short ids).
pub fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 6];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// A new id for a container, network or service: 12 hex characters like [`new_id`], but in
/// the order they are made, so the store's indexes on ids and generated names take new rows at
/// their end instead of at random pages. Unique within the server process (each is above the
/// last); a restart starts from the clock, past every id of the process before. Not for
/// anything that must be unguessable (those use [`new_id`]).
///
/// The first nine digits count [`TICK_MS`] since 2024 (34 years of them); the last three
/// number the ids of a tick from a random point in its first half. Engine names are made of
/// these ids, and servers sharing an engine (two clusters, or the test suite's many) each
/// start a tick somewhere else: with a plain sequence (the first version), two servers making
/// an id in the same millisecond made the same one and the second launch was refused.
pub fn new_ordered_id() -> String {
    use std::sync::atomic::AtomicU64;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!(
        "{:012x}",
        ordered_id_at(&LAST, now_ms, rand::random::<u16>())
    )
}

/// The clock tick of [`new_ordered_id`].
const TICK_MS: u64 = 16;

/// [`new_ordered_id`]'s number, for a process whose last id is in `last`, at Unix time
/// `now_ms`, with `random` to place the first id of a tick.
fn ordered_id_at(last: &std::sync::atomic::AtomicU64, now_ms: u64, random: u16) -> u64 {
    use std::sync::atomic::Ordering;
    /// 2024-01-01T00:00:00Z in Unix milliseconds.
    const EPOCH_MS: u64 = 1_704_067_200_000;
    const MASK: u64 = 0xffff_ffff_ffff;
    let tick = (now_ms.saturating_sub(EPOCH_MS) / TICK_MS) << 12;
    let first = (tick | u64::from(random & 0x7ff)) & MASK;
    let mut seen = last.load(Ordering::Relaxed);
    loop {
        // A new tick starts at its random point; within a tick (or when ids outran the clock)
        // the next number follows the last.
        let next = if seen < tick & MASK {
            first
        } else {
            (seen + 1) & MASK
        };
        match last.compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(now) => seen = now,
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_ids_are_twelve_hex_digits_rising_and_unique_across_threads() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..5_000).map(|_| new_ordered_id()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = Vec::new();
        for t in threads {
            let ids = t.join().unwrap();
            // Each thread sees its ids rise (text order is numeric order at a fixed width).
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "not rising");
            all.extend(ids);
        }
        assert!(all
            .iter()
            .all(|id| id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit())));
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "an id was handed out twice");
        // Later ids sort after earlier ones, here and after a restart (they follow the clock).
        std::thread::sleep(std::time::Duration::from_millis(2 * TICK_MS));
        let later = new_ordered_id();
        assert!(all.iter().all(|id| *id < later));
    }

    /// Two servers (two `last`s) making ids at the same instant start at independent points
    /// of the tick: 2,000 such pairs share a first id a handful of times at most (1 in 2,048
    /// each), where a plain sequence shared every one.
    #[test]
    fn servers_making_ids_at_one_instant_rarely_meet() {
        use rand::Rng;
        use std::sync::atomic::AtomicU64;
        let mut rng = rand::rng();
        let now_ms = 1_800_000_000_000;
        let mut same = 0;
        for _ in 0..2_000 {
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let ia = ordered_id_at(&a, now_ms, rng.random());
            let ib = ordered_id_at(&b, now_ms, rng.random());
            same += usize::from(ia == ib);
            // Both in the tick's range, and a process's next id follows its last.
            let tick = ((now_ms - 1_704_067_200_000) / TICK_MS) << 12;
            assert!((tick..tick + 2048).contains(&ia), "{ia:x}");
            assert_eq!(ordered_id_at(&a, now_ms, rng.random()), ia + 1);
            // A later tick starts above everything of this one.
            assert!(ordered_id_at(&a, now_ms + TICK_MS, rng.random()) >= tick + 4096);
        }
        assert!(same <= 10, "{same} of 2,000 pairs made the same id");
    }
}
