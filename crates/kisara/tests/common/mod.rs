//! A whole Kisara in the test process: the server on 127.0.0.1:0 and one agent on the real
//! Docker Engine, with a data directory of its own. Tests drive it through the SDK, like any
//! platform would, and check Docker directly for leftovers.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kisara_agent::{Agent, AgentOptions};
use kisara_api::agent::{InventoryContainer, InventoryNetwork};
use kisara_api::NodeState;
use kisara_client::Client;
use kisara_core::config::Config;
use kisara_runtime::docker::DockerRuntime;
use kisara_runtime::Runtime;
use kisara_server::Server;
use tokio_util::sync::CancellationToken;

/// The image every test uses (built by scripts/test-images.sh).
pub const IMAGE: &str = "kisara-test/busybox:latest";

pub struct TestCluster {
    pub url: String,
    pub token: String,
    pub client: Client,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    config_toml: String,
    shutdown: CancellationToken,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    agent_task: tokio::task::JoinHandle<Result<(), kisara_agent::AgentError>>,
    /// A child of `shutdown`: stops the agent alone.
    agent_shutdown: CancellationToken,
    pub runtime: Arc<DockerRuntime>,
    /// Set when a restart hands the engine's objects to the next instance.
    handed_over: bool,
    /// The in-process server (its state: gateway, store).
    pub server: Server,
    agent_opts: AgentOptions,
}

impl TestCluster {
    pub async fn start() -> TestCluster {
        Self::start_with("").await
    }

    /// Starts with a TOML configuration (e.g. a tiny subnet pool).
    pub async fn start_with(config_toml: &str) -> TestCluster {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        Self::boot(config_toml.to_string(), dir, Some(tmp)).await
    }

    async fn boot(config_toml: String, dir: PathBuf, tmp: Option<tempfile::TempDir>) -> Self {
        let config = Config::from_toml_str(&config_toml).expect("test config");
        let settings = config.server_settings().expect("server settings");
        let server = Server::open(settings, dir.clone()).expect("server opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let s = shutdown.clone();
        let server_task = tokio::spawn(
            server
                .clone()
                .run(listener, async move { s.cancelled().await }),
        );
        let runtime = Arc::new(
            DockerRuntime::connect()
                .await
                .expect("a Docker Engine must be reachable for these tests"),
        );
        let url = format!("http://{addr}");
        let agent_opts = AgentOptions {
            server_url: url.clone(),
            name: "local".into(),
            join_token: Some(server.state().join_token().clone()),
            state_dir: dir.join("agent"),
            public_address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            max_containers: 0,
        };
        let agent = Agent::new(runtime.clone(), agent_opts.clone());
        let agent_shutdown = shutdown.child_token();
        let agent_task = tokio::spawn(agent.run(agent_shutdown.clone()));
        let token = server.state().admin_token().expose().to_string();
        let client = Client::new(&url, Some(token.clone())).expect("client");
        let cluster = TestCluster {
            url,
            token,
            client,
            cluster_id: server.state().cluster_id.clone(),
            data_dir: dir,
            _tmp: tmp,
            config_toml,
            shutdown,
            server_task,
            agent_task,
            agent_shutdown,
            runtime,
            handed_over: false,
            server: server.clone(),
            agent_opts,
        };
        cluster.wait_ready().await;
        cluster
    }

    /// Polls until the local node is ready (bounded).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(nodes) = self.client.list_nodes().await {
                if nodes.items.iter().any(|n| n.state == NodeState::Ready) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "node never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls (bounded) until the container's row says running (after a restart's
    /// reconciliation adopted it); the container.
    pub async fn wait_running(&self, id: &str) -> kisara_api::Container {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let x = self.client.container(id).await.unwrap();
            if x.state == kisara_api::ContainerState::Running {
                return x;
            }
            assert!(Instant::now() < deadline, "not running: {x:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `kisara` binary against this cluster (`KISARA_URL`, the admin token in
    /// `KISARA_TOKEN`, warnings only), off the async workers.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        kisara_cli(
            args,
            &[
                ("KISARA_URL", &self.url),
                ("KISARA_TOKEN", &self.token),
                ("KISARA_LOG", "warn"),
            ],
        )
        .await
    }

    /// Stops server and agent (containers keep running) and starts them again on the same
    /// data directory.
    pub async fn restart(self) -> TestCluster {
        self.restart_editing(|_| {}).await
    }

    /// Restarts, editing the store while everything is down (to stage what a crash leaves).
    pub async fn restart_editing(mut self, edit: impl FnOnce(&kisara_store::Store)) -> TestCluster {
        self.shutdown.cancel();
        let _ = (&mut self.server_task).await;
        let _ = (&mut self.agent_task).await;
        {
            let store = kisara_store::Store::open(&self.data_dir.join(kisara_server::STORE_FILE))
                .expect("store opens");
            edit(&store);
        }
        let tmp = self._tmp.take();
        self.handed_over = true;
        let dir = self.data_dir.clone();
        let toml = self.config_toml.clone();
        Self::boot(toml, dir, tmp).await
    }

    fn cluster_filter(&self) -> Vec<(String, String)> {
        vec![(
            kisara_api::labels::CLUSTER.to_string(),
            self.cluster_id.clone(),
        )]
    }

    /// Everything on the engine that carries this cluster's label, but for the warm pool's
    /// unclaimed spare networks (which the server keeps on purpose).
    pub async fn leftovers(&self) -> (Vec<InventoryContainer>, Vec<InventoryNetwork>) {
        let filter = self.cluster_filter();
        let spares: std::collections::HashSet<String> = self
            .client
            .list_networks_filtered(&kisara_api::NetworkFilter {
                node: None,
                all: Some(true),
            })
            .await
            .expect("list networks")
            .items
            .into_iter()
            .filter(|n| n.owned_by.is_none() && n.labels.contains_key(kisara_api::labels::SPARE))
            // By Kisara id (the engine's copy carries it as a label): a spare still being made
            // has no engine id in the store yet.
            .map(|n| n.id)
            .collect();
        let networks = self
            .runtime
            .list_networks(&filter)
            .await
            .expect("list")
            .into_iter()
            .filter(|n| {
                n.labels
                    .get(kisara_api::labels::NETWORK)
                    .is_none_or(|id| !spares.contains(id))
            })
            .collect();
        (
            self.runtime.list_containers(&filter).await.expect("list"),
            networks,
        )
    }

    pub async fn assert_clean(&self) {
        let (c, n) = self.leftovers().await;
        assert!(c.is_empty(), "containers left behind: {c:?}");
        assert!(n.is_empty(), "networks left behind: {n:?}");
    }

    /// Removes whatever the test left (so a failing test does not leak into the engine).
    pub async fn cleanup(&self) {
        let filter = self.cluster_filter();
        let cs = self
            .runtime
            .list_containers(&filter)
            .await
            .unwrap_or_default();
        let ns = self
            .runtime
            .list_networks(&filter)
            .await
            .unwrap_or_default();
        for c in cs {
            let _ = self.runtime.remove(&c.docker_id, true).await;
        }
        for n in ns {
            let _ = self.runtime.remove_network(&n.docker_id).await;
        }
    }

    /// Stops only the agent; the server keeps running (and so do the containers).
    pub async fn stop_agent(&mut self) {
        self.agent_shutdown.cancel();
        let _ = (&mut self.agent_task).await;
        // A finished handle must not be awaited again by `stop` or `restart`.
        self.agent_task = tokio::spawn(async { Ok(()) });
    }

    /// Starts the agent again after [`Self::stop_agent`] (a new session, same node).
    pub async fn start_agent(&mut self) {
        let agent = Agent::new(self.runtime.clone(), self.agent_opts.clone());
        self.agent_shutdown = self.shutdown.child_token();
        self.agent_task = tokio::spawn(agent.run(self.agent_shutdown.clone()));
    }

    pub async fn stop(mut self) {
        // Stop first, so the warm pool cannot refill behind the cleanup; the agent returns
        // only once the engine operations it had under way finished (bounded), so the
        // cleanup below sees everything made for this cluster.
        self.shutdown.cancel();
        let _ = (&mut self.server_task).await;
        let _ = (&mut self.agent_task).await;
        self.cleanup().await;
    }
}

/// A test that fails before `stop()` must not leak into the engine (a leaked spare network
/// would hold its subnet for every later run): stop the server's background work, then remove
/// everything labelled for this cluster with the docker CLI (Drop cannot await).
impl Drop for TestCluster {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.handed_over {
            return;
        }
        let label = format!("label={}={}", kisara_api::labels::CLUSTER, self.cluster_id);
        let ids = |args: &[&str]| -> Vec<String> {
            std::process::Command::new("docker")
                .args(args)
                .arg(&label)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        for id in ids(&["ps", "-aq", "--filter"]) {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", &id])
                .output();
        }
        for id in ids(&["network", "ls", "-q", "--filter"]) {
            let _ = std::process::Command::new("docker")
                .args(["network", "rm", &id])
                .output();
        }
        // Images made for flag files under a read-only root (their containers are gone now).
        for id in ids(&["images", "-q", "--filter"]) {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", &id])
                .output();
        }
    }
}

/// Sends an HTTP/1.0 GET over a plain TCP connection and returns the answer, polling until the
/// port serves (bounded), like a player's `nc` would.
pub async fn http_get(host: &str, port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = String::new();
    while Instant::now() < deadline {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
            let mut buf = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
            last = String::from_utf8_lossy(&buf).to_string();
            if !last.is_empty() {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// Every stored event of `kinds` (comma-separated) so far: the backlog replays at once, so the
/// read stops at the first quiet half second.
pub async fn stored_events(client: &Client, kinds: &str) -> Vec<kisara_api::Event> {
    use futures::StreamExt;
    let q = kisara_api::events::EventQuery {
        kinds: Some(kinds.into()),
        since: Some(0),
        ..Default::default()
    };
    let mut s = client.events(&q).await.expect("events");
    let mut seen = Vec::new();
    while let Ok(Some(Ok(e))) = tokio::time::timeout(Duration::from_millis(500), s.next()).await {
        seen.push(e);
    }
    seen
}

/// A container made straight on the engine, behind Kisara's back (`docker run -d` of the test
/// image, sleeping), carrying `labels`; returns its Docker id. Removed with the docker CLI when
/// the returned guard drops, whatever carries its labels.
pub fn docker_run_labelled(labels: &[(&str, &str)]) -> EngineContainer {
    let mut cmd = std::process::Command::new("docker");
    cmd.args(["run", "-d"]);
    for (k, v) in labels {
        cmd.arg("--label").arg(format!("{k}={v}"));
    }
    let out = cmd
        .args([IMAGE, "sleep", "600"])
        .output()
        .expect("docker CLI");
    assert!(
        out.status.success(),
        "docker run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    EngineContainer(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// See [`docker_run_labelled`]: the Docker id, removed (forced) on drop.
pub struct EngineContainer(pub String);

impl EngineContainer {
    /// Whether the engine still has it (in any state).
    pub fn exists(&self) -> bool {
        std::process::Command::new("docker")
            .args(["inspect", "--type", "container", &self.0])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(true)
    }
}

impl Drop for EngineContainer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f", &self.0])
            .output();
    }
}

/// `docker inspect` of a container, as JSON.
pub fn docker_inspect(id: &str) -> serde_json::Value {
    let out = std::process::Command::new("docker")
        .args(["inspect", id])
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "docker inspect {id} failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    v[0].clone()
}

/// An HTTP server on port 80 of the test image.
pub fn httpd_request() -> kisara_api::LaunchRequest {
    kisara_api::LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec![
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            "80".into(),
            "-h".into(),
            "/www".into(),
        ]),
        ports: vec!["80/tcp".into()],
        owner: Some("team1".into()),
        module: Some("web1".into()),
        ..Default::default()
    }
}

/// Runs the `kisara` binary with these variables (and no `KISARA_URL`/`KISARA_TOKEN` from the
/// test's own environment), off the async workers.
pub async fn kisara_cli(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_kisara"))
            .args(&args)
            .env_remove("KISARA_URL")
            .env_remove("KISARA_TOKEN")
            .envs(envs)
            .output()
            .expect("the kisara binary runs")
    })
    .await
    .expect("kisara CLI task")
}

/// A free TCP port on loopback (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed if the test ends before stopping it, however it ends.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits (bounded) for the process to exit and returns its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit within {within:?}");
    }
}

/// Debian's docker-registry on a free loopback port, stopped when dropped.
pub struct Registry {
    _child: Proc,
    _dir: tempfile::TempDir,
    pub addr: String,
}

/// Starts Debian's docker-registry on a free loopback port (scripts/test.sh installs it).
pub fn start_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Proc(
        std::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry must be installed (scripts/test.sh installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        _child: child,
        _dir: dir,
        addr,
    }
}
