//! A real multi-node Kisara on this one machine: extra Docker Engines started by
//! `scripts/testbed.sh` (each in a network namespace of its own), a `kisara server` process, and a
//! `kisara node` process per engine with `DOCKER_HOST` pointing at it.
//!
//! Everything is torn down on drop, in order: agents and server are killed first, then the engines
//! are stopped with all their containers and networks (`testbed.sh down`). Each test claims engine
//! indices of its own (a lock file per engine), so tests never share an engine, even across
//! concurrent test runs on one machine.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kisara_api::{Container, ListResponse, Node, NodeState};

pub const BIN: &str = env!("CARGO_BIN_EXE_kisara");
pub const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/testbed.sh");
pub const IMAGE: &str = "kisara-test/busybox:latest";
/// The label every container Kisara makes carries, with its Kisara id.
pub const CONTAINER_LABEL: &str = "io.kisara.container";

/// Polls `f` every 100 ms until it returns `Some`, or panics with `what` after `within`.
pub fn poll<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where engine claims live: a test holds an exclusive lock on `engine-I.lock` for every engine
/// it uses, so two test runs on one machine (or two tests of one run) never share an engine.
/// `testbed.sh down` without indices leaves claimed engines alone.
const CLAIMS: &str = "/run/kisara-testbed/claims";
/// Indices tests claim from; `bench/chaos.sh` uses 201 and up.
const TEST_INDICES: std::ops::RangeInclusive<u32> = 1..=200;

/// A block of test bed engines, claimed for this test and stopped (with everything on them)
/// on drop.
pub struct Engines {
    first: u32,
    count: u32,
    _claims: Vec<std::fs::File>,
}

impl Engines {
    /// Claims `count` consecutive free engine indices and starts those engines.
    pub fn up(count: u32) -> Engines {
        let (first, claims) = claim(count);
        // The guard exists before the script runs, so a half-started set is torn down too.
        let engines = Engines {
            first,
            count,
            _claims: claims,
        };
        let out = Command::new(TESTBED)
            .args([
                "up",
                &count.to_string(),
                "--first",
                &first.to_string(),
                "--fresh",
            ])
            .output()
            .expect("run scripts/testbed.sh");
        assert!(
            out.status.success(),
            "testbed.sh up failed (it needs root, dockerd and iproute2):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        engines
    }

    pub fn count(&self) -> usize {
        self.count as usize
    }

    /// The test bed's index of the `k`-th engine (0-based).
    pub fn index(&self, k: usize) -> u32 {
        assert!(k < self.count as usize);
        self.first + k as u32
    }

    pub fn docker_host(&self, k: usize) -> String {
        format!("unix:///run/kisara-testbed/engine-{}.sock", self.index(k))
    }

    /// The engine's own address (its network namespace's end of the veth pair): published
    /// ports answer there.
    pub fn address(&self, k: usize) -> String {
        format!("10.198.{}.2", self.index(k))
    }

    /// The network namespace engine `k` runs in.
    pub fn netns(&self, k: usize) -> String {
        format!("kisara-tb{}", self.index(k))
    }

    /// The host's end of engine `k`'s veth (the only link between the host and its namespace).
    pub fn host_interface(&self, k: usize) -> String {
        format!("kisara-tb{}h", self.index(k))
    }

    /// `docker -H <engine k> ARGS`.
    pub fn docker(&self, k: usize, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(self.docker_host(k))
            .args(args)
            .output()
            .expect("docker CLI")
    }

    /// Every container (running or not) on engine `k` carrying Kisara's container label:
    /// Kisara id → Docker id.
    pub fn kisara_containers(&self, k: usize) -> Vec<(String, String)> {
        let format = format!("{{{{.Label \"{CONTAINER_LABEL}\"}}}} {{{{.ID}}}}");
        let out = self.docker(
            k,
            &[
                "ps",
                "-a",
                "--no-trunc",
                "--filter",
                &format!("label={CONTAINER_LABEL}"),
                "--format",
                &format,
            ],
        );
        assert!(
            out.status.success(),
            "docker ps on engine {} failed: {}",
            self.index(k),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (id, docker_id) = l.split_once(' ')?;
                Some((id.to_string(), docker_id.to_string()))
            })
            .collect()
    }

    /// `State.Running` of a container on engine `k`; `None` when the engine does not have it.
    pub fn running(&self, k: usize, docker_id: &str) -> Option<bool> {
        let out = self.docker(k, &["inspect", "-f", "{{.State.Running}}", docker_id]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim() == "true")
    }
}

/// Locks the first block of `count` consecutive unclaimed indices.
fn claim(count: u32) -> (u32, Vec<std::fs::File>) {
    std::fs::create_dir_all(CLAIMS).expect("create the claims directory (are we root?)");
    let (lo, hi) = (*TEST_INDICES.start(), *TEST_INDICES.end());
    let mut first = lo;
    while first + count - 1 <= hi {
        let mut held = Vec::new();
        for i in first..first + count {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(format!("{CLAIMS}/engine-{i}.lock"))
                .expect("open a claim file");
            match file.try_lock() {
                Ok(()) => held.push(file),
                Err(_) => break,
            }
        }
        if held.len() == count as usize {
            return (first, held);
        }
        // Skip past the claimed index (dropping `held` releases the partial claim).
        first += held.len() as u32 + 1;
    }
    panic!("no {count} consecutive free test bed engines in {TEST_INDICES:?}");
}

impl Drop for Engines {
    fn drop(&mut self) {
        let range = format!("{}-{}", self.first, self.first + self.count - 1);
        match Command::new(TESTBED).args(["down", &range]).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "testbed.sh down {range} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run testbed.sh down {range}: {e}"),
        }
    }
}

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {} failed", self.child.id());
    }

    /// SIGKILL, and waits (bounded) until it is gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("process {} survived SIGKILL", self.child.id());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `kisara ARGS`, in the network namespace `netns` when given (through `nsenter`, which
/// execs it: the child is kisara itself).
fn spawn(netns: Option<&str>, args: &[String], envs: &[(&str, String)], log: &Path) -> Proc {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open log");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(args)
        .env("KISARA_LOG", "info")
        .env_remove("KISARA_URL")
        .env_remove("KISARA_TOKEN")
        .env_remove("KISARA_CONFIG")
        .env_remove("KISARA_PUBLIC_ADDRESS")
        .env_remove("DOCKER_HOST")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().expect("spawn kisara"),
        log: log.to_path_buf(),
    }
}

/// A running command with a deadline: killed if it has not finished in time.
pub fn output_within(cmd: &mut Command, within: Duration) -> Option<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(within) {
        Ok(out) => out.ok(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            None
        }
    }
}

/// How a test bed cluster is set up beyond the defaults.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The server's configuration file (TOML), if any.
    pub server_toml: Option<String>,
    /// The nodes' configuration file (TOML), if any.
    pub node_toml: Option<String>,
    /// Each agent runs inside its engine's network namespace and reaches the server over the
    /// veth only (the server then listens on engine 0's host-side address, 10.198.I.1, and
    /// nowhere else). Nodes get no `--public-address`.
    pub agents_in_netns: bool,
}

/// A Kisara cluster of a server and one node per test bed engine, all as processes.
pub struct Cluster {
    // Field order is drop order: processes die before their engines are torn down.
    agents: Vec<Option<Proc>>,
    server: Option<Proc>,
    pub engines: Engines,
    pub url: String,
    listen: String,
    pub data_dir: PathBuf,
    token: String,
    opts: ClusterOptions,
    tmp: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` engines, a server, and nodes `n1..nN` (node `k` on engine `k`),
    /// and waits until every node is ready.
    pub fn start(n: u32) -> Cluster {
        Self::start_with(n, ClusterOptions::default())
    }

    /// [`Cluster::start`] with options.
    pub fn start_with(n: u32, opts: ClusterOptions) -> Cluster {
        let engines = Engines::up(n);
        let tmp = tempfile::tempdir().expect("tempdir");
        // Agents inside a namespace reach the host over their veth; the server listens on
        // engine 0's host-side end of it (a link only this host and that namespace share).
        // With several engines only engine 0's namespace could reach it: one engine then.
        let host = if opts.agents_in_netns {
            assert_eq!(n, 1, "agents_in_netns: one engine");
            format!("10.198.{}.1", engines.index(0))
        } else {
            "127.0.0.1".to_string()
        };
        let port = std::net::TcpListener::bind((host.as_str(), 0))
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let listen = format!("{host}:{port}");
        for (name, text) in [("server", &opts.server_toml), ("node", &opts.node_toml)] {
            if let Some(t) = text {
                std::fs::write(tmp.path().join(format!("{name}.toml")), t).expect("config");
            }
        }
        let mut cluster = Cluster {
            agents: (0..n).map(|_| None).collect(),
            server: None,
            engines,
            url: format!("http://{listen}"),
            listen,
            data_dir: tmp.path().join("server"),
            token: String::new(),
            opts,
            tmp,
        };
        cluster.start_server();
        let join = std::fs::read_to_string(cluster.data_dir.join("join.token"))
            .expect("join token")
            .trim()
            .to_string();
        cluster.token = std::fs::read_to_string(cluster.data_dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string();
        for k in 0..n as usize {
            cluster.start_agent_with(k, Some(&join));
        }
        for k in 0..n as usize {
            cluster.wait_ready(k);
        }
        cluster
    }

    /// The configuration file of `name` (`server` or `node`), when the options give one.
    fn config_args(&self, name: &str, text: &Option<String>) -> Vec<String> {
        match text {
            Some(_) => vec![
                "--config".into(),
                self.tmp
                    .path()
                    .join(format!("{name}.toml"))
                    .to_string_lossy()
                    .into_owned(),
            ],
            None => Vec::new(),
        }
    }

    pub fn node_name(k: usize) -> String {
        format!("n{}", k + 1)
    }

    fn log(&self, name: &str) -> PathBuf {
        self.tmp.path().join(format!("{name}.log"))
    }

    /// Starts `kisara server` on the cluster's data dir and address; waits for /healthz.
    pub fn start_server(&mut self) {
        assert!(self.server.is_none(), "the server is already running");
        let mut args: Vec<String> = vec![
            "server".into(),
            "--data-dir".into(),
            self.data_dir.to_string_lossy().into_owned(),
            "--listen".into(),
            self.listen.clone(),
        ];
        args.extend(self.config_args("server", &self.opts.server_toml));
        self.server = Some(spawn(None, &args, &[], &self.log("server")));
        let addr = self.listen.clone();
        poll(
            Duration::from_secs(30),
            "the server answers /healthz",
            || {
                let mut s = std::net::TcpStream::connect(&addr).ok()?;
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
                let mut body = String::new();
                s.read_to_string(&mut body).ok()?;
                (body.split_whitespace().nth(1) == Some("200")).then_some(())
            },
        );
        assert!(self.data_dir.join("join.token").exists());
    }

    /// `kill -9` of the server.
    pub fn kill_server(&mut self) {
        self.server.take().expect("server running").kill9();
    }

    /// Starts node `k`'s agent with its stored credential (no join token).
    pub fn start_agent(&mut self, k: usize) {
        self.start_agent_with(k, None);
    }

    fn start_agent_with(&mut self, k: usize, join: Option<&str>) {
        assert!(self.agents[k].is_none(), "agent {k} is already running");
        let name = Self::node_name(k);
        let mut args: Vec<String> = vec![
            "node".into(),
            "--server".into(),
            self.url.clone(),
            "--name".into(),
            name.clone(),
            "--state-dir".into(),
            self.tmp
                .path()
                .join(format!("node-{name}"))
                .to_string_lossy()
                .into_owned(),
        ];
        if !self.opts.agents_in_netns {
            args.push("--public-address".into());
            args.push(self.engines.address(k));
        }
        args.extend(self.config_args("node", &self.opts.node_toml));
        if let Some(j) = join {
            args.push("--join-token".into());
            args.push(j.into());
        }
        let envs = [("DOCKER_HOST", self.engines.docker_host(k))];
        let netns = self.opts.agents_in_netns.then(|| self.engines.netns(k));
        self.agents[k] = Some(spawn(
            netns.as_deref(),
            &args,
            &envs,
            &self.log(&format!("agent-{name}")),
        ));
    }

    /// `kill -9` of node `k`'s agent.
    pub fn kill_agent(&mut self, k: usize) {
        self.agents[k].take().expect("agent running").kill9();
    }

    pub fn agent(&self, k: usize) -> &Proc {
        self.agents[k].as_ref().expect("agent running")
    }

    /// A client verb against the cluster.
    pub fn kisara(&self, args: &[&str]) -> Output {
        self.kisara_cmd(args)
            .output()
            .expect("run the kisara client")
    }

    pub fn kisara_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["--url", &self.url, "--token", &self.token])
            .args(args)
            .env_remove("KISARA_URL")
            .env_remove("KISARA_TOKEN")
            .env("KISARA_LOG", "warn");
        cmd
    }

    /// A client verb with `--json`, parsed; panics with the error when it fails.
    pub fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        // Before the verb: after it, `--json` would end up in a `run`'s command.
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.kisara(&a);
        assert!(
            out.status.success(),
            "kisara {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "kisara {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.json::<ListResponse<Node>>(&["node", "ls"]).items
    }

    /// Polls (bounded) until node `k` is listed ready.
    pub fn wait_ready(&self, k: usize) -> Node {
        let name = Self::node_name(k);
        poll(
            Duration::from_secs(60),
            &format!("node {name} becomes ready"),
            || {
                let out = self.kisara(&["--json", "node", "ls"]);
                let list: ListResponse<Node> = serde_json::from_slice(&out.stdout).ok()?;
                list.items
                    .into_iter()
                    .find(|n| n.name == name && n.state == NodeState::Ready)
            },
        )
    }

    /// Node name → node id.
    pub fn node_ids(&self) -> BTreeMap<String, String> {
        self.nodes().into_iter().map(|n| (n.name, n.id)).collect()
    }

    /// `kisara run --json ARGS`.
    pub fn run(&self, args: &[&str]) -> Container {
        let mut a = vec!["run"];
        a.extend_from_slice(args);
        self.json(&a)
    }

    /// `kisara ps --json` (all containers the server knows, states refreshed from the nodes).
    pub fn ps(&self) -> ListResponse<Container> {
        self.json(&["ps"])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The processes' logs, for the failure report (the tempdir is about to go).
            for entry in std::fs::read_dir(self.tmp.path()).into_iter().flatten() {
                let path = entry.map(|e| e.path()).unwrap_or_default();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    eprintln!("--- last lines of {} ---", path.display());
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}
