//! Hollow clusters for benchmarks and scale tests.
//!
//! A [`HollowNodes`] set is a number of in-process [`kisara_agent::Agent`]s, each with its own
//! [`HollowRuntime`] (containers kept in memory, the test image present), that join a server
//! over real WebSocket connections and the real agent protocol. The server is either in the
//! same process ([`InProcessServer`], for tests) or a child process (the benchmark, so that its
//! memory can be measured on its own). [`launch_many`] drives the HTTP API with many clients.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kisara_agent::{Agent, AgentOptions};
use kisara_api::agent::Secret;
use kisara_api::{LaunchRequest, NodeState};
use kisara_client::Client;
use kisara_core::config::Config;
use kisara_runtime::hollow::HollowRuntime;
use kisara_server::Server;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The image every hollow node holds.
pub const IMAGE: &str = "kisara-test/busybox:latest";

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("server: {0}")]
    Server(String),
    #[error("client: {0}")]
    Client(#[from] kisara_client::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Timeout(String),
}

/// A server in this process, on 127.0.0.1:0.
pub struct InProcessServer {
    pub url: String,
    pub admin_token: String,
    pub join_token: Secret,
    pub server: Server,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl InProcessServer {
    pub async fn start(config_toml: &str, data_dir: &Path) -> Result<Self, BenchError> {
        let config =
            Config::from_toml_str(config_toml).map_err(|e| BenchError::Server(e.to_string()))?;
        let settings = config
            .server_settings()
            .map_err(|e| BenchError::Server(e.to_string()))?;
        let server = Server::open(settings, data_dir.to_path_buf())
            .map_err(|e| BenchError::Server(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let task = tokio::spawn(
            server
                .clone()
                .run(listener, async move { s.cancelled().await }),
        );
        Ok(InProcessServer {
            url,
            admin_token: server.state().admin_token().expose().to_string(),
            join_token: server.state().join_token().clone(),
            server,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

/// How hollow nodes are made.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub count: usize,
    /// Kisara's `max_container`; 0 = unlimited.
    pub max_containers: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
}

/// Hollow nodes joined to a server.
pub struct HollowNodes {
    pub runtimes: Vec<Arc<HollowRuntime>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Result<(), kisara_agent::AgentError>>>,
}

impl HollowNodes {
    /// Starts `spec.count` agents named `hollow-0000`, ... that dial `url`.
    pub fn start(url: &str, join_token: &Secret, spec: &NodeSpec, state_dir: &Path) -> Self {
        let shutdown = CancellationToken::new();
        let mut runtimes = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..spec.count {
            let name = format!("hollow-{i:04}");
            let rt = Arc::new(
                HollowRuntime::new()
                    .with_images(&[IMAGE])
                    .with_hostname(name.clone())
                    .with_resources(spec.cpus, spec.memory_bytes),
            );
            let agent = Agent::new(
                rt.clone(),
                AgentOptions {
                    server_url: url.to_string(),
                    name,
                    join_token: Some(join_token.clone()),
                    state_dir: state_dir.join(format!("node-{i}")),
                    public_address: "127.0.0.1".into(),
                    labels: [("bench".to_string(), "hollow".to_string())].into(),
                    max_containers: spec.max_containers,
                },
            );
            runtimes.push(rt);
            tasks.push(tokio::spawn(agent.run(shutdown.clone())));
        }
        HollowNodes {
            runtimes,
            shutdown,
            tasks,
        }
    }

    /// Containers held across every hollow engine.
    pub fn containers(&self) -> usize {
        self.runtimes.iter().map(|r| r.container_count()).sum()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Polls until `count` nodes are ready (bounded by `within`).
pub async fn wait_ready(client: &Client, count: usize, within: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + within;
    loop {
        let ready = client
            .list_nodes()
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|n| n.state == NodeState::Ready)
                    .count()
            })
            .unwrap_or(0);
        if ready >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(format!(
                "only {ready} of {count} nodes became ready within {within:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a run of launches measured.
#[derive(Debug, Clone, Default)]
pub struct LaunchStats {
    pub ok: usize,
    pub failed: usize,
    /// Some of the failures, for the report.
    pub errors: Vec<String>,
    pub elapsed: Duration,
    /// Latency of every successful launch, sorted.
    pub latencies: Vec<Duration>,
    /// `(container id, node id)` of every success.
    pub placed: Vec<(String, String)>,
}

impl LaunchStats {
    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i.min(self.latencies.len() - 1)]
    }
}

/// The launch every benchmark client sends: a long-running command on a network of its own.
pub fn launch_request() -> LaunchRequest {
    LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        ..Default::default()
    }
}

/// Launches `total` containers through the HTTP API from `concurrency` clients, each with its
/// own keep-alive connection.
pub async fn launch_many(
    url: &str,
    token: &str,
    total: usize,
    concurrency: usize,
    req: LaunchRequest,
) -> Result<LaunchStats, BenchError> {
    launch_many_with(url, token, total, concurrency, move |_| req.clone()).await
}

/// [`launch_many`] where launch `i` (0-based, in the order they are sent) is `make(i)`.
pub async fn launch_many_with(
    url: &str,
    token: &str,
    total: usize,
    concurrency: usize,
    make: impl Fn(usize) -> LaunchRequest + Send + Sync + 'static,
) -> Result<LaunchStats, BenchError> {
    let next = Arc::new(AtomicUsize::new(0));
    let make = Arc::new(make);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = Client::builder(url)
            .token(token.to_string())
            .timeout(Duration::from_secs(120))
            .build()?;
        let next = next.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = LaunchStats::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let req = make(i);
                let t = Instant::now();
                match client.launch(&req).await {
                    Ok(c) => {
                        s.latencies.push(t.elapsed());
                        s.placed.push((c.id, c.node_id));
                        s.ok += 1;
                    }
                    Err(e) => {
                        s.failed += 1;
                        if s.errors.len() < 5 {
                            s.errors.push(e.to_string());
                        }
                    }
                }
            }
            s
        }));
    }
    let mut all = LaunchStats::default();
    for t in tasks {
        let s = t
            .await
            .map_err(|e| BenchError::Server(format!("client task: {e}")))?;
        all.ok += s.ok;
        all.failed += s.failed;
        all.latencies.extend(s.latencies);
        all.placed.extend(s.placed);
        if all.errors.len() < 5 {
            all.errors.extend(s.errors);
        }
    }
    all.elapsed = started.elapsed();
    all.latencies.sort_unstable();
    Ok(all)
}

/// Creates `count` networks named `bench-net-N` through the API, network `N` on the node
/// named `hollow-{N % nodes}`, `concurrency` at a time; returns their names in order.
pub async fn create_networks(
    client: &Client,
    count: usize,
    nodes: usize,
    concurrency: usize,
) -> Result<Vec<String>, BenchError> {
    use futures::StreamExt;
    let names: Vec<String> = (0..count).map(|i| format!("bench-net-{i}")).collect();
    let made = futures::stream::iter(names.iter().enumerate().map(|(i, name)| {
        let req = kisara_api::CreateNetworkRequest {
            name: name.clone(),
            node: Some(format!("hollow-{:04}", i % nodes.max(1))),
            ..Default::default()
        };
        async move { client.create_network(&req).await }
    }))
    .buffer_unordered(concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    for r in made {
        r?;
    }
    Ok(names)
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_of(pid: u32) -> Option<Duration> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the line (utime, stime) are the 12th and 13th after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Resident and peak resident memory of a process, in bytes, from `/proc/PID/status`.
pub fn rss_of(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(PathBuf::from(format!("/proc/{pid}/status"))).ok()?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The server configuration of the benchmark: a pool big enough for a network per container
/// (a million /28s), and small default reservations. `server_extra` holds more `[server]` keys.
pub fn bench_config(server_extra: &str) -> String {
    format!(
        "[server]\nsubnet_pool = [\"10.0.0.0/8/28\"]\n{server_extra}\n\n\
         [server.defaults]\nmemory_mb = 64\ncpus = 0.1\n"
    )
}
