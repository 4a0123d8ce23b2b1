//! The `kisara` binary as a user runs it: `up`, `server` + `node` as separate processes, and
//! the client verbs with `--json`.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Proc, IMAGE};
use kisara_api::{Container, ListResponse, Node, NodeState};

const BIN: &str = env!("CARGO_BIN_EXE_kisara");

/// Removes, when dropped, every network the named nodes' warm pools left on the engine.
/// Declared before the processes, so it runs after they are killed.
#[derive(Default)]
struct NetCleanup(std::cell::RefCell<Vec<String>>);

impl NetCleanup {
    fn node(&self, id: &str) {
        self.0.borrow_mut().push(id.to_string());
    }
}

impl Drop for NetCleanup {
    fn drop(&mut self) {
        for node in self.0.borrow().iter() {
            let out = Command::new("docker")
                .args(["network", "ls", "-q", "--filter"])
                .arg(format!("label=io.kisara.node={node}"))
                .output();
            if let Ok(out) = out {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["network", "rm", id]).output();
                }
            }
        }
    }
}

fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("KISARA_LOG", "warn")
        .env_remove("KISARA_URL")
        .env_remove("KISARA_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().expect("spawn kisara"))
}

/// Runs a client verb against `url`, finding the token in `data_dir` like a user would.
fn kisara(url: &str, data_dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--url", url, "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env_remove("KISARA_TOKEN")
        .output()
        .expect("run kisara")
}

fn json<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    assert!(
        out.status.success(),
        "kisara failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Polls (bounded) until a ready node is listed.
fn wait_ready(url: &str, data_dir: &Path, name: &str) -> Node {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = kisara(url, data_dir, &["node", "ls", "--json"]);
        if out.status.success() {
            if let Ok(nodes) = serde_json::from_slice::<ListResponse<Node>>(&out.stdout) {
                if let Some(n) = nodes
                    .items
                    .into_iter()
                    .find(|n| n.name == name && n.state == NodeState::Ready)
                {
                    return n;
                }
            }
        }
        assert!(Instant::now() < deadline, "node {name} never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn docker_running(id: &str) -> bool {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", id])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

#[test]
fn up_runs_serves_the_cli_and_survives_restart() {
    let nets = NetCleanup::default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir_s = dir.to_str().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let mut up = spawn(&["up", "--data-dir", dir_s, "--listen", &listen], &[]);
    let node = wait_ready(&url, &dir, "local");
    nets.node(&node.id);
    assert_eq!(mode(&dir.join("admin.token")), 0o600);
    assert_eq!(mode(&dir.join("join.token")), 0o600);

    // run --json prints the container with its id, node and ports.
    let c: Container = json(&kisara(
        &url,
        &dir,
        &[
            "run", "--json", "-p", "80/tcp", "--owner", "team9", IMAGE, "httpd", "-f", "-p", "80",
            "-h", "/www",
        ],
    ));
    assert_eq!(c.node_id, node.id);
    assert_eq!(c.ports.len(), 1);
    let ps: ListResponse<Container> = json(&kisara(&url, &dir, &["ps", "--json"]));
    assert!(ps.items.iter().any(|x| x.id == c.id));
    // The readable table names the container too.
    let table = kisara(&url, &dir, &["ps"]);
    assert!(table.status.success());
    assert!(String::from_utf8_lossy(&table.stdout).contains(&c.id[..12.min(c.id.len())]));

    // exec passes output through and exits with the command's code.
    let out = kisara(
        &url,
        &dir,
        &["exec", &c.id, "--", "sh", "-c", "echo hi; exit 4"],
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");

    // Errors: non-zero exit with the server's message.
    let out = kisara(&url, &dir, &["inspect", "no-such-container"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-container"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["--url", &url, "--token", "ksa_wrong", "ps"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));

    // Ctrl-C: a clean exit, and the container keeps running.
    up.signal("-INT");
    assert_eq!(up.wait_exit(Duration::from_secs(20)), Some(0));
    assert!(
        docker_running(&c.docker_id),
        "container stopped with the server"
    );

    // The next `up` picks everything up.
    let _up2 = spawn(&["up", "--data-dir", dir_s, "--listen", &listen], &[]);
    let node2 = wait_ready(&url, &dir, "local");
    assert_eq!(node2.id, node.id, "the node kept its identity");
    let again: Container = json(&kisara(&url, &dir, &["inspect", &c.id]));
    assert_eq!(again.state, kisara_api::ContainerState::Running);
    let out = kisara(&url, &dir, &["stop", &c.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!docker_running(&c.docker_id));
}

#[test]
fn server_and_node_as_separate_processes() {
    let nets = NetCleanup::default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("server");
    let node_dir = tmp.path().join("node");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let _server = spawn(
        &[
            "server",
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("join.token").exists() {
        assert!(
            Instant::now() < deadline,
            "server never wrote its join token"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = std::fs::read_to_string(dir.join("join.token")).unwrap();
    let node_args = |with_token: bool| {
        let mut a = vec![
            "node".to_string(),
            "--server".into(),
            url.clone(),
            "--name".into(),
            "n1".into(),
            "--state-dir".into(),
            node_dir.to_str().unwrap().into(),
        ];
        if with_token {
            a.push("--join-token".into());
            a.push(join.trim().into());
        }
        a
    };
    let args: Vec<String> = node_args(true);
    let mut node = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let n = wait_ready(&url, &dir, "n1");
    nets.node(&n.id);
    // The server counts the node ready as soon as it sends the welcome; the agent writes its
    // credential right after receiving it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node_dir.join("node.json").exists() {
        assert!(
            Instant::now() < deadline,
            "node never stored its credential"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mode(&node_dir.join("node.json")), 0o600);

    let c: Container = json(&kisara(
        &url,
        &dir,
        &["run", "--json", IMAGE, "sleep", "300"],
    ));
    assert_eq!(c.node_id, n.id);

    // The node goes away: requests to it fail fast and clearly; lists still answer.
    node.signal("-TERM");
    node.wait_exit(Duration::from_secs(20));
    let out = kisara(&url, &dir, &["exec", &c.id, "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not connected"));
    let ps: ListResponse<Container> = json(&kisara(&url, &dir, &["ps", "--json"]));
    assert_eq!(ps.node_errors.len(), 1);

    // It comes back with its stored credential (no join token this time) as the same node.
    let args: Vec<String> = node_args(false);
    let _node2 = spawn(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]);
    let n2 = wait_ready(&url, &dir, "n1");
    assert_eq!(n2.id, n.id);
    let out = kisara(&url, &dir, &["rm", "-f", &c.id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A wrong join token is refused.
    let bad = Command::new(BIN)
        .args([
            "node",
            "--server",
            &url,
            "--name",
            "intruder",
            "--join-token",
            "ksj_wrong",
            "--state-dir",
        ])
        .arg(tmp.path().join("intruder"))
        .env("KISARA_LOG", "warn")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("join token"));
}

#[test]
fn tls_for_the_api_and_the_agent_channel() {
    let nets = NetCleanup::default();
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let out = Command::new(BIN)
        .args(["cert", "--dir"])
        .arg(&certs)
        .args(["--host", "127.0.0.1", "--host", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&certs.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&certs.join("server-key.pem")), 0o600);
    let ca = certs.join("ca.pem");
    let config = tmp.path().join("kisara.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            certs.join("server.pem").display(),
            certs.join("server-key.pem").display()
        ),
    )
    .unwrap();
    let dir = tmp.path().join("server");
    let listen = format!("127.0.0.1:{}", free_port());
    let url = format!("https://{listen}");
    let _server = spawn(
        &[
            "server",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("join.token").exists() {
        assert!(
            Instant::now() < deadline,
            "server never wrote its join token"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = std::fs::read_to_string(dir.join("join.token")).unwrap();
    let _node = spawn(
        &[
            "node",
            "--server",
            &url,
            "--join-token",
            join.trim(),
            "--name",
            "tls1",
            "--ca",
            ca.to_str().unwrap(),
            "--state-dir",
            tmp.path().join("node").to_str().unwrap(),
        ],
        &[],
    );
    // The CLI talks HTTPS with the CA, and the node joined over WSS.
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        let out = Command::new(BIN)
            .args(["--url", &url, "--ca", ca.to_str().unwrap(), "--data-dir"])
            .arg(&dir)
            .args(["node", "ls", "--json"])
            .output()
            .unwrap();
        if out.status.success() {
            let nodes: ListResponse<Node> = serde_json::from_slice(&out.stdout).unwrap();
            if let Some(n) = nodes
                .items
                .into_iter()
                .find(|n| n.state == NodeState::Ready)
            {
                break n;
            }
        }
        assert!(Instant::now() < deadline, "no node joined over TLS");
        std::thread::sleep(Duration::from_millis(100));
    };
    nets.node(&node.id);
    let c: Container = json(
        &Command::new(BIN)
            .args(["--url", &url, "--ca", ca.to_str().unwrap(), "--data-dir"])
            .arg(&dir)
            .args(["run", "--json", IMAGE, "sleep", "300"])
            .output()
            .unwrap(),
    );
    let out = Command::new(BIN)
        .args(["--url", &url, "--ca", ca.to_str().unwrap(), "--data-dir"])
        .arg(&dir)
        .args(["rm", "-f", &c.id])
        .output()
        .unwrap();
    assert!(out.status.success());
    // Without the CA the certificate is not trusted; plain HTTP is not served on the port.
    let out = kisara(&url, &dir, &["ps"]);
    assert!(!out.status.success());
    let out = kisara(&format!("http://{listen}"), &dir, &["ps"]);
    assert!(!out.status.success());
}

/// `kisara renew`, `kisara service up --ttl --flag-spec` / `service renew`, and the `awd`
/// verbs, against one `kisara up`.
#[test]
fn renew_service_and_awd_verbs() {
    use kisara_api::{AwdGame, AwdRotateResponse, Service};
    let nets = NetCleanup::default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let dir_s = dir.to_str().unwrap();
    let config = tmp.path().join("kisara.toml");
    std::fs::write(
        &config,
        "[instances]\nmax_ttl_secs = 600\nrenew_secs = 60\nmax_renewals = 1\n",
    )
    .unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let _up = spawn(
        &[
            "up",
            "--data-dir",
            dir_s,
            "--listen",
            &listen,
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let node = wait_ready(&url, &dir, "local");
    nets.node(&node.id);
    let failed = |out: &Output, needle: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "succeeded: {err}");
        assert!(err.contains(needle), "{err}");
    };

    // A container: run --ttl, renew once, the second renewal names the limit.
    let c: Container = json(&kisara(
        &url,
        &dir,
        &["run", "--json", "--ttl", "30", IMAGE, "sleep", "600"],
    ));
    let expires_at = c.expires_at.expect("a lifetime");
    let r: Container = json(&kisara(&url, &dir, &["renew", "--json", &c.id]));
    assert_eq!(r.renewals, 1);
    assert!(r.expires_at.unwrap() > expires_at, "{r:?}");
    failed(&kisara(&url, &dir, &["renew", &c.id]), "maximum of 1");
    assert!(kisara(&url, &dir, &["stop", &c.id]).status.success());

    // A service with a lifetime and a file flag.
    let compose = tmp.path().join("compose.yml");
    std::fs::write(
        &compose,
        format!(
            "services:\n  web:\n    image: {IMAGE}\n    command: [\"sleep\", \"600\"]\n    read_only: true\n"
        ),
    )
    .unwrap();
    let s: Service = json(&kisara(
        &url,
        &dir,
        &[
            "service",
            "up",
            "--json",
            "-f",
            compose.to_str().unwrap(),
            "--ttl",
            "30",
            "--owner",
            "t1",
            "--module",
            "web",
            "--flag-spec",
            r#"{"container":"web","template":"flag{[uuid]}","inject":{"file":{"path":"/flag"}}}"#,
        ],
    ));
    let flags = s.flags.clone().expect("the admin token sees the flags");
    assert_eq!(flags.len(), 1);
    assert_eq!(flags[0].target, "web/file:/flag");
    let out = kisara(
        &url,
        &dir,
        &["exec", &s.containers[0].id, "--", "cat", "/flag"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), flags[0].value);
    // `kisara renew` takes a service's id too.
    let r: Service = json(&kisara(&url, &dir, &["renew", "--json", &s.id]));
    assert_eq!(r.renewals, 1);
    assert!(r.expires_at.unwrap() > s.expires_at.unwrap(), "{r:?}");
    failed(
        &kisara(&url, &dir, &["service", "renew", &s.id]),
        "maximum of 1",
    );
    failed(
        &kisara(
            &url,
            &dir,
            &[
                "service",
                "up",
                "-f",
                compose.to_str().unwrap(),
                "--flag-spec",
                "{oops",
            ],
        ),
        "not a flag spec",
    );
    assert!(kisara(&url, &dir, &["service", "down", &s.id])
        .status
        .success());

    // AWD: create, rotate (the flag command puts the new flag in place), reset, ls, rm.
    let g: AwdGame = json(&kisara(
        &url,
        &dir,
        &[
            "awd",
            "create",
            "--json",
            "g1",
            IMAGE,
            "--team",
            "t1,t2",
            "--flag-command",
            "echo \"$flag\" > /tmp/flag",
            "--",
            "sleep",
            "600",
        ],
    ));
    assert_eq!(g.gameboxes.len(), 2);
    let first = g.flags.clone().expect("flags for the admin token");
    let r: AwdRotateResponse = json(&kisara(&url, &dir, &["awd", "rotate", "--json", "g1"]));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.flags.len(), 2);
    assert_ne!(r.flags["t1"], first["t1"]);
    let t1 = g.gameboxes.iter().find(|b| b.team == "t1").unwrap();
    let out = kisara(
        &url,
        &dir,
        &["exec", &t1.container_id, "--", "cat", "/tmp/flag"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r.flags["t1"]);
    let reset: AwdGame = json(&kisara(&url, &dir, &["awd", "reset", "--json", "g1", "t1"]));
    let t1_again = reset.gameboxes.iter().find(|b| b.team == "t1").unwrap();
    assert_eq!(
        t1_again.ip_address, t1.ip_address,
        "reset keeps the address"
    );
    let ls: ListResponse<AwdGame> = json(&kisara(&url, &dir, &["awd", "ls", "--json"]));
    assert_eq!(ls.items.len(), 1);
    assert!(kisara(&url, &dir, &["awd", "rm", "g1"]).status.success());
    let ls: ListResponse<AwdGame> = json(&kisara(&url, &dir, &["awd", "ls", "--json"]));
    assert!(ls.items.is_empty());
    failed(&kisara(&url, &dir, &["awd", "rotate", "g1"]), "g1");
    let ps: ListResponse<Container> = json(&kisara(&url, &dir, &["ps", "--json", "-a"]));
    assert!(ps.items.is_empty(), "left: {:?}", ps.items);
}
