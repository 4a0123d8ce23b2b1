//! Isolation, proven with real containers and the node's isolation rules in place: teams
//! cannot reach each other, instances cannot reach their host (gateway address or primary
//! address), outbound traffic is off unless asked for. Every negative probe is preceded by
//! the same probe succeeding somewhere it should (a positive control), and all traffic goes
//! to listeners this test starts on addresses it owns.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{TestCluster, IMAGE};
use kisara_api::{ExecRequest, LaunchRequest};
use kisara_client::Client;

fn sleeper(owner: &str) -> LaunchRequest {
    LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        owner: Some(owner.into()),
        module: Some("iso".into()),
        memory_mb: Some(32),
        cpus: Some(0.1),
        ..Default::default()
    }
}

/// Whether container `id` reads "hi" from `host:port` (one attempt, 3 s).
async fn probe(client: &Client, id: &str, host: &str, port: u16) -> bool {
    let r = client
        .exec(
            id,
            &ExecRequest {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("nc -w 3 {host} {port} </dev/null"),
                ],
                timeout_secs: Some(10),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    r.stdout.contains("hi")
}

/// A probe that should succeed, retried while the listener comes up (bounded).
async fn assert_reaches(client: &Client, id: &str, host: &str, port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !probe(client, id, host, port).await {
        assert!(Instant::now() < deadline, "positive control failed: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn install_rules() {
    kisara_agent::isolation::apply(true)
        .await
        .expect("isolation rules install (the tests run as root)");
    // Idempotent: a second install changes nothing.
    let before = run("iptables", &["-S", kisara_agent::isolation::INPUT_CHAIN]);
    kisara_agent::isolation::apply(true).await.unwrap();
    assert_eq!(
        before,
        run("iptables", &["-S", kisara_agent::isolation::INPUT_CHAIN])
    );
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP listener on every host address that answers "hi".
async fn host_listener() -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.write_all(b"hi\n").await;
        }
    });
    (port, task)
}

/// The host's address on its default route, if it has one.
fn primary_address() -> Option<String> {
    let route = run("ip", &["-4", "-o", "route", "show", "default"]);
    let dev = route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)?;
    let addrs = run("ip", &["-4", "-o", "addr", "show", "dev", dev]);
    let cidr = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)?;
    cidr.split('/').next().map(str::to_string)
}

#[tokio::test]
async fn teams_cannot_reach_each_other() {
    install_rules().await;
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let server = client
        .launch(&LaunchRequest {
            cmd: Some(
                ["nc", "-ll", "-p", "8080", "-e", "echo", "hi"]
                    .map(String::from)
                    .to_vec(),
            ),
            ..sleeper("team2")
        })
        .await
        .unwrap();
    let ip = server.ip_address.clone().unwrap();
    let neighbour = client
        .launch(&LaunchRequest {
            network: server.network.clone(),
            ..sleeper("team2")
        })
        .await
        .unwrap();
    assert_reaches(client, &neighbour.id, &ip, 8080, "same network").await;
    let other_team = client.launch(&sleeper("team1")).await.unwrap();
    assert!(!probe(client, &other_team.id, &ip, 8080).await);
    cluster.cleanup().await;
    cluster.stop().await;
}

/// A plain Docker network and container (not Kisara's), removed on drop.
struct PlainDocker {
    network: String,
    container: String,
}

impl Drop for PlainDocker {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

#[tokio::test]
async fn instances_cannot_reach_their_host() {
    install_rules().await;
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let (port, listener) = host_listener().await;
    let c = client.launch(&sleeper("team1")).await.unwrap();
    let net = client.network(c.network.as_deref().unwrap()).await.unwrap();
    let gateway = net.gateway.clone().expect("gateway");

    // Positive controls: the host reaches its listener on the gateway address, and a
    // container on a network that is not Kisara's reaches it through its own gateway.
    let direct = tokio::net::TcpStream::connect((gateway.as_str(), port)).await;
    assert!(direct.is_ok(), "the listener answers on {gateway}");
    let tag = &cluster.cluster_id[..8];
    let plain = PlainDocker {
        network: format!("ksr-plain-{tag}"),
        container: format!("ksr-plain-{tag}"),
    };
    run("docker", &["network", "create", &plain.network]);
    run(
        "docker",
        &[
            "run",
            "-d",
            "--name",
            &plain.container,
            "--network",
            &plain.network,
            IMAGE,
            "sleep",
            "600",
        ],
    );
    let plain_gw = run(
        "docker",
        &[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
            &plain.network,
        ],
    )
    .trim()
    .to_string();
    let plain_probe = |host: String| {
        let container = plain.container.clone();
        async move {
            // Async: the listener runs on this test's runtime and must keep answering.
            let out = tokio::process::Command::new("docker")
                .args(["exec", &container, "sh", "-c"])
                .arg(format!("nc -w 3 {host} {port} </dev/null"))
                .output()
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).contains("hi")
        }
    };
    assert!(
        plain_probe(plain_gw.clone()).await,
        "positive control: plain network"
    );

    // The Kisara instance reaches none of the host's addresses.
    assert!(
        !probe(client, &c.id, &gateway, port).await,
        "gateway address"
    );
    assert!(
        !probe(client, &c.id, &plain_gw, port).await,
        "another bridge's address"
    );
    if let Some(primary) = primary_address() {
        assert!(
            plain_probe(primary.clone()).await,
            "positive control: {primary}"
        );
        assert!(
            !probe(client, &c.id, &primary, port).await,
            "primary address"
        );
    }
    // Published ports still serve players from outside.
    let web = client.launch(&common::httpd_request()).await.unwrap();
    let p = &web.ports[0];
    assert!(common::http_get(&p.public_host, p.public_port)
        .await
        .contains("200"));
    listener.abort();
    drop(plain);
    cluster.cleanup().await;
    cluster.stop().await;
}

/// A network namespace with a veth to the host and a listener answering "hi": an address of
/// the test's own that stands for "the outside", with a route back to everything.
struct Outside {
    ns: String,
    address: String,
    listener: std::process::Child,
}

impl Outside {
    fn new(tag: u8) -> Outside {
        let ns = format!("ksrt-out-{tag}");
        let host_if = format!("ksrh{tag}");
        let ns_if = format!("ksrn{tag}");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run("ip", &["netns", "add", &ns]);
        run(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
        );
        run("ip", &["link", "set", &ns_if, "netns", &ns]);
        let (host_ip, ns_ip) = (format!("198.18.{tag}.1"), format!("198.18.{tag}.2"));
        run(
            "ip",
            &["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
        );
        run("ip", &["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut v = vec!["netns", "exec", ns.as_str()];
            v.extend_from_slice(args);
            run("ip", &v);
        };
        in_ns(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if]);
        in_ns(&["ip", "link", "set", &ns_if, "up"]);
        in_ns(&["ip", "link", "set", "lo", "up"]);
        in_ns(&["ip", "route", "add", "default", "via", &host_ip]);
        let listener = Command::new("ip")
            .args([
                "netns", "exec", &ns, "busybox", "nc", "-ll", "-p", "9000", "-e", "echo", "hi",
            ])
            .spawn()
            .expect("listener in the namespace");
        Outside {
            ns,
            address: ns_ip,
            listener,
        }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.listener.kill();
        let _ = self.listener.wait();
        // Deleting the namespace deletes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[tokio::test]
async fn outbound_is_off_by_default_and_on_when_asked() {
    install_rules().await;
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let tag = u8::from_str_radix(&cluster.cluster_id[..2], 16).unwrap() % 200 + 20;
    let outside = Outside::new(tag);
    // Positive control from the host.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect((outside.address.as_str(), 9000))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the outside listener never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let online = client
        .launch(&LaunchRequest {
            internet: true,
            ..sleeper("team1")
        })
        .await
        .unwrap();
    assert_reaches(client, &online.id, &outside.address, 9000, "internet: true").await;
    let offline = client.launch(&sleeper("team1")).await.unwrap();
    assert!(!probe(client, &offline.id, &outside.address, 9000).await);
    // The offline instance's bridge is named for the rules.
    let net = client
        .network(offline.network.as_deref().unwrap())
        .await
        .unwrap();
    let bridge = run(
        "docker",
        &[
            "network",
            "inspect",
            "-f",
            "{{index .Options \"com.docker.network.bridge.name\"}}",
            &net.docker_id,
        ],
    );
    assert!(bridge.trim().starts_with("kn-"), "{bridge}");
    drop(outside);
    cluster.cleanup().await;
    cluster.stop().await;
}
