//! Public port exposure end to end, with real containers: TCP and UDP through the gateway
//! (tunnelled through the agent, and directly when the agent shares the process), host mode
//! with leased host ports, leases released and reused, exhaustion, an agent restarted under a
//! connected visitor, and a restarted gateway reopening its ports.
//!
//! Needs `scripts/test-images.sh` (the busybox image and `kisara-test/udp-echo`).

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use kisara_api::{Container, ExposeMode, LaunchRequest, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

const FIXTURE: &str = "kisara-test/udp-echo:latest";

/// A block of 8 ports of this test process's own, so concurrent tests rarely meet (and
/// when they do, the allocator skips ports another program holds).
/// Ports below the kernel's ephemeral range (32768 and up here), so no outgoing connection of
/// another test can be holding one of them.
fn port_block(slot: u16) -> (u16, u16) {
    let base = 16000 + (std::process::id() % 380) as u16 * 40 + slot * 10;
    (base, base + 7)
}

fn config(gateway: (u16, u16), host: (u16, u16)) -> String {
    format!(
        r#"
[server]
publish_host_ip = "127.0.0.1"
port_range = "{}-{}"

[gateway]
enabled = true
listen_host = "127.0.0.1"
public_address = "127.0.0.1"
port_range = "{}-{}"
udp_idle_secs = 5
"#,
        host.0, host.1, gateway.0, gateway.1
    )
}

/// TCP echo on 80 and UDP echo on 53 in one container.
fn echo_request(expose: ExposeMode) -> LaunchRequest {
    LaunchRequest {
        image: FIXTURE.into(),
        cmd: Some(vec![
            "sh".into(),
            "-c".into(),
            "kfix tcp-echo 80 & exec kfix udp-echo 53".into(),
        ]),
        ports: vec!["80/tcp".into(), "53/udp".into()],
        owner: Some("team1".into()),
        expose: Some(expose),
        ..Default::default()
    }
}

fn port_of(c: &Container, proto: Protocol) -> u16 {
    c.ports
        .iter()
        .find(|p| p.protocol == proto)
        .unwrap_or_else(|| panic!("no {proto} port in {:?}", c.ports))
        .public_port
}

/// Connects and exchanges one line over TCP, retrying until the echo answers (bounded).
async fn tcp_echo(port: u16, msg: &[u8]) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Ok(mut s)) = tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            if s.write_all(msg).await.is_ok() {
                let mut got = vec![0u8; msg.len()];
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut got)).await
                {
                    return got;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "TCP echo on {port} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends datagrams until one comes back (bounded): the echo server may still be starting.
async fn udp_echo(port: u16, msg: &[u8]) -> Vec<u8> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(("127.0.0.1", port)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut buf = vec![0u8; 65535];
    loop {
        s.send(msg).await.unwrap();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf)).await
        {
            return buf[..n].to_vec();
        }
        assert!(
            Instant::now() < deadline,
            "UDP echo on {port} never answered"
        );
    }
}

/// Sends `n` datagrams of `size` bytes from one socket, each only once the previous one came
/// back (the echo is known to be up: no datagram is lost or sent twice).
async fn udp_lockstep(port: u16, n: u64, size: usize) {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(("127.0.0.1", port)).await.unwrap();
    let mut buf = vec![0u8; 65535];
    for i in 0..n {
        let msg = vec![i as u8; size];
        s.send(&msg).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("datagram {i} on {port} never came back"))
            .unwrap();
        assert_eq!(&buf[..got], &msg[..]);
    }
}

/// Whether anything accepts TCP on the port now.
async fn tcp_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Launches [`echo_request`] in this mode.
async fn launch_echo(cl: &TestCluster, expose: ExposeMode) -> Container {
    cl.client
        .launch(&echo_request(expose))
        .await
        .expect("launch the echo container")
}

/// Gateway mode publishes nothing on the node: the engine binds no host port.
fn assert_publishes_nothing(docker_id: &str) {
    let inspect = common::docker_inspect(docker_id);
    let bindings = &inspect["HostConfig"]["PortBindings"];
    assert!(
        bindings.is_null() || bindings.as_object().is_some_and(|m| m.is_empty()),
        "{bindings}"
    );
}

/// The bytes the gateway counted for a container (its inspect).
async fn traffic_of(cl: &TestCluster, id: &str) -> kisara_api::Traffic {
    cl.client
        .container(id)
        .await
        .expect("inspect")
        .traffic
        .expect("traffic counted in gateway mode")
}

async fn poll_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn gateway_tcp_and_udp_through_the_agents_tunnel() {
    let gw = port_block(0);
    let cl = TestCluster::start_with(&config(gw, port_block(1))).await;
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    let (tcp, udp) = (port_of(&c, Protocol::Tcp), port_of(&c, Protocol::Udp));
    assert!(
        (gw.0..=gw.1).contains(&tcp) && (gw.0..=gw.1).contains(&udp),
        "{:?}",
        c.ports
    );
    assert!(c.ports.iter().all(|p| p.public_host == "127.0.0.1"));
    assert_eq!(c.host_port, format!("127.0.0.1:{tcp},127.0.0.1:{udp}"));
    // Gateway mode publishes nothing on the node.
    assert_publishes_nothing(&c.docker_id);

    assert_eq!(
        tcp_echo(tcp, b"hello over the tunnel\n").await,
        b"hello over the tunnel\n"
    );
    let big: Vec<u8> = (0..1200u32).map(|i| i as u8).collect();
    assert_eq!(udp_echo(udp, &big).await, big);
    // Several visitors at once, each with a connection of its own.
    let many: Vec<_> = (0..8u8)
        .map(|i| tokio::spawn(async move { tcp_echo(tcp, &[b'a' + i; 100]).await }))
        .collect();
    for (i, h) in many.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), vec![b'a' + i as u8; 100]);
    }

    // Traffic shows in inspect and in /metrics.
    let t = traffic_of(&cl, &c.id).await;
    assert!(t.bytes_in >= 1200 + 22 && t.bytes_out >= 1200 + 22, "{t:?}");
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", cl.url))
        .bearer_auth(&cl.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "kisara_exposure_bytes_total{{container=\"{}\",direction=\"in\"}}",
            c.id
        )),
        "{metrics}"
    );

    // Stopped: the ports close, the leases go back, and the next launch gets them.
    cl.client.stop(&c.id).await.expect("stop");
    assert!(!tcp_open(tcp).await, "the gateway still listens on {tcp}");
    let again = launch_echo(&cl, ExposeMode::Gateway).await;
    assert_eq!(port_of(&again, Protocol::Tcp), tcp, "released port reused");
    assert_eq!(tcp_echo(tcp, b"again\n").await, b"again\n");
    cl.client.stop(&again.id).await.expect("stop");
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn gateway_connects_directly_when_the_agent_shares_the_process() {
    let cl = TestCluster::start_with(&config(port_block(2), port_block(3))).await;
    cl.server.state().gateway.add_direct_node("local");
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    assert_eq!(
        tcp_echo(port_of(&c, Protocol::Tcp), b"direct\n").await,
        b"direct\n"
    );
    assert_eq!(
        udp_echo(port_of(&c, Protocol::Udp), b"dgram").await,
        b"dgram"
    );
    cl.client.stop(&c.id).await.expect("stop");
    cl.stop().await;
}

#[tokio::test]
async fn host_mode_leases_ports_from_the_range_and_exhaustion_is_409() {
    let host = port_block(4);
    let cl = TestCluster::start_with(&config(port_block(5), host)).await;
    let c = launch_echo(&cl, ExposeMode::Host).await;
    let (tcp, udp) = (port_of(&c, Protocol::Tcp), port_of(&c, Protocol::Udp));
    assert!((host.0..=host.1).contains(&tcp), "{:?}", c.ports);
    // The engine published exactly the leased ports.
    let inspect = common::docker_inspect(&c.docker_id);
    assert_eq!(
        inspect["HostConfig"]["PortBindings"]["80/tcp"][0]["HostPort"],
        tcp.to_string()
    );
    assert_eq!(tcp_echo(tcp, b"host mode\n").await, b"host mode\n");
    assert_eq!(udp_echo(udp, b"udp host").await, b"udp host");
    assert!(c.traffic.is_none());
    cl.client.stop(&c.id).await.expect("stop");
    cl.assert_clean().await;
    cl.stop().await;

    // A range of one port: the second launch is refused with 409 and leaves nothing behind.
    let one = port_block(6);
    let cl = TestCluster::start_with(&config(port_block(7), (one.0, one.0))).await;
    let mut req = echo_request(ExposeMode::Host);
    req.ports = vec!["80/tcp".into()];
    let first = cl.client.launch(&req).await.expect("first launch");
    let err = cl.client.launch(&req).await.expect_err("the range is full");
    assert_eq!(err.status(), Some(409), "{err}");
    let list = cl
        .client
        .list_containers(&Default::default())
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1, "nothing half-made: {:?}", list.items);
    cl.client.stop(&first.id).await.expect("stop");
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn an_agent_restart_ends_visitors_cleanly_and_new_ones_work() {
    let mut cl = TestCluster::start_with(&config(port_block(8), port_block(9))).await;
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    let tcp = port_of(&c, Protocol::Tcp);
    assert_eq!(tcp_echo(tcp, b"before\n").await, b"before\n");
    let mut visitor = TcpStream::connect(("127.0.0.1", tcp)).await.unwrap();
    visitor.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    visitor.read_exact(&mut one).await.unwrap();

    cl.stop_agent().await;
    // The connected visitor is told (end of stream or reset), not left hanging.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), visitor.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "the visitor's connection was left hanging");
    // While the node is away, a new visitor is turned away at once.
    if let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(("127.0.0.1", tcp)),
    )
    .await
    {
        let _ = s.write_all(b"y").await;
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "got {r:?} {buf:?}");
    }

    cl.start_agent().await;
    cl.wait_ready().await;
    assert_eq!(tcp_echo(tcp, b"after\n").await, b"after\n");
    cl.client.stop(&c.id).await.expect("stop");
    cl.stop().await;
}

#[tokio::test]
async fn a_restarted_gateway_listens_on_the_same_ports() {
    let cl = TestCluster::start_with(&config(port_block(10), port_block(11))).await;
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    let (tcp, udp) = (port_of(&c, Protocol::Tcp), port_of(&c, Protocol::Udp));
    assert_eq!(tcp_echo(tcp, b"one\n").await, b"one\n");
    let cl = cl.restart().await;
    poll_until("the gateway reopened its TCP port", || tcp_open(tcp)).await;
    assert_eq!(tcp_echo(tcp, b"two\n").await, b"two\n");
    assert_eq!(udp_echo(udp, b"three").await, b"three");
    let again = cl.client.container(&c.id).await.expect("inspect");
    assert_eq!(port_of(&again, Protocol::Tcp), tcp);
    cl.client.stop(&c.id).await.expect("stop");
    cl.stop().await;
}

#[tokio::test]
async fn an_interrupted_gateway_launch_is_adopted_with_its_gateway_ports() {
    let cl = TestCluster::start_with(&config(port_block(26), port_block(27))).await;
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    let tcp = port_of(&c, Protocol::Tcp);
    // Stage a server killed after the node made the container, before its row was completed.
    let cl = cl
        .restart_editing(|store| {
            let mut half = c.clone();
            half.docker_id = String::new();
            half.state = kisara_api::ContainerState::Launching;
            half.ports.clear();
            half.host_port.clear();
            store.complete_container(&half).unwrap();
        })
        .await;
    let adopted = cl.wait_running(&c.id).await;
    // The gateway's ports, not the (empty) set the engine published.
    assert_eq!(adopted.ports, c.ports);
    assert_eq!(adopted.host_port, c.host_port);
    assert_eq!(tcp_echo(tcp, b"adopted\n").await, b"adopted\n");
    cl.client.stop(&c.id).await.expect("stop");
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn bad_exposure_requests_are_refused_before_anything_is_made() {
    // A server without the gateway role refuses gateway mode with 400.
    let cl = TestCluster::start_with(&format!(
        "[server]\nport_range = \"{}-{}\"\n",
        port_block(12).0,
        port_block(12).1
    ))
    .await;
    let err = cl
        .client
        .launch(&echo_request(ExposeMode::Gateway))
        .await
        .expect_err("no gateway");
    assert_eq!(err.status(), Some(400), "{err}");
    let mut req = echo_request(ExposeMode::Host);
    req.bandwidth_kbps = Some(0);
    let err = cl.client.launch(&req).await.expect_err("zero cap");
    assert_eq!(err.status(), Some(400), "{err}");
    // So is a service asking for gateway mode.
    let svc = kisara_api::ServiceRequest {
        compose: Some(format!(
            "services:\n  echo:\n    image: {FIXTURE}\n    command: [\"kfix\", \"tcp-echo\", \"80\"]\n    ports: [\"80\"]\n"
        )),
        expose: Some(ExposeMode::Gateway),
        ..Default::default()
    };
    let err = cl
        .client
        .launch_service(&svc)
        .await
        .expect_err("no gateway");
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("gateway"), "{err}");
    let services = cl.client.list_services(&Default::default()).await.unwrap();
    assert!(services.items.is_empty(), "{:?}", services.items);
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn a_standalone_gateway_serves_the_ports_through_the_server() {
    let gw = port_block(13);
    // The server leases gateway ports but binds none: `kisara gateway` does.
    let toml = config(gw, port_block(14))
        .replace("udp_idle_secs = 5", "udp_idle_secs = 5\nlisten = false");
    let cl = TestCluster::start_with(&toml).await;
    let gateway = common::Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_kisara"))
            .args([
                "gateway",
                "--url",
                &cl.url,
                "--listen-host",
                "127.0.0.1",
                "--poll-ms",
                "200",
                // Its credential is the server's gateway.token, read from the data dir.
                "--data-dir",
                &cl.data_dir.to_string_lossy(),
            ])
            .env_remove("KISARA_TOKEN")
            .env("KISARA_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("kisara gateway starts"),
    );
    let c = launch_echo(&cl, ExposeMode::Gateway).await;
    let (tcp, udp) = (port_of(&c, Protocol::Tcp), port_of(&c, Protocol::Udp));
    assert!((gw.0..=gw.1).contains(&tcp), "{:?}", c.ports);
    assert!(
        cl.server.state().gateway.listening().is_empty(),
        "the server bound gateway ports although listen = false"
    );
    // Visitor → kisara gateway → server relay → agent tunnel → container.
    assert_eq!(
        tcp_echo(tcp, b"through the standalone gateway\n").await,
        b"through the standalone gateway\n"
    );
    let big: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(udp_echo(udp, &big).await, big);
    // The server counted what the gateway relayed.
    let t = traffic_of(&cl, &c.id).await;
    assert!(t.bytes_in >= 31 + 1200 && t.bytes_out >= 31 + 1200, "{t:?}");
    // Exactly the datagrams' payload is counted, each way (not the relay's frame headers).
    let (n, size) = (10u64, 1000usize);
    udp_lockstep(udp, n, size).await;
    let want = (t.bytes_in + n * size as u64, t.bytes_out + n * size as u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let now = traffic_of(&cl, &c.id).await;
        if (now.bytes_in, now.bytes_out) >= want || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (seen.bytes_in, seen.bytes_out),
        want,
        "{n} datagrams of {size} bytes each way, counted from {t:?}"
    );

    // Stopped: the gateway closes the port within a few polls.
    cl.client.stop(&c.id).await.expect("stop");
    poll_until(
        "the standalone gateway closed the stopped container's port",
        || async { !tcp_open(tcp).await },
    )
    .await;
    drop(gateway);
    cl.stop().await;
}

#[tokio::test]
async fn a_standalone_gateway_refuses_a_bad_token_at_once() {
    let cl = TestCluster::start_with(&config(port_block(15), port_block(16))).await;
    let out = common::kisara_cli(
        &["gateway", "--url", &cl.url, "--listen-host", "127.0.0.1"],
        &[("KISARA_TOKEN", "not-the-token")],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway ports"), "{err}");
    assert!(
        !err.contains("not-the-token"),
        "the token was printed: {err}"
    );
    cl.stop().await;
}

/// A connection to a `kfix tcp-source` that has sent its first byte (retried while the
/// container's program starts, bounded).
async fn source(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let mut first = [0u8; 1];
            if let Ok(Ok(1)) =
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut first)).await
            {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the source on {port} never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_per_instance_bandwidth_cap_holds_the_rate() {
    let cl = TestCluster::start_with(&config(port_block(17), port_block(18))).await;
    cl.server.state().gateway.add_direct_node("local");
    // 1,600 kbit/s = 200,000 bytes/s each way.
    const CAP: f64 = 200_000.0;
    let mut req = echo_request(ExposeMode::Gateway);
    req.cmd = Some(vec!["kfix".into(), "tcp-source".into(), "80".into()]);
    req.ports = vec!["80/tcp".into()];
    req.bandwidth_kbps = Some(1600);
    let c = cl.client.launch(&req).await.expect("launch");
    let port = port_of(&c, Protocol::Tcp);
    // The source writes zeros as fast as it can; the visitor reads 600 KB and times it.
    let mut s = source(port).await;
    // Let the bucket's burst (a quarter second) drain first, then measure.
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = 0usize;
    while drained < 100_000 {
        drained += s.read(&mut buf).await.expect("read");
    }
    let start = Instant::now();
    let mut got = 0usize;
    while got < 600_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the stream stalled")
            .expect("read");
        assert!(n > 0, "the stream ended early");
        got += n;
    }
    let rate = got as f64 / start.elapsed().as_secs_f64();
    assert!(
        (CAP * 0.6..=CAP * 1.25).contains(&rate),
        "measured {rate:.0} B/s against a cap of {CAP} B/s"
    );
    // An uncapped instance on the same gateway runs far faster: the cap is the instance's.
    req.bandwidth_kbps = None;
    let free = cl.client.launch(&req).await.expect("launch uncapped");
    let fport = port_of(&free, Protocol::Tcp);
    let mut f = source(fport).await;
    let start = Instant::now();
    let mut got = 0usize;
    while got < 4_000_000 {
        let n = tokio::time::timeout(Duration::from_secs(10), f.read(&mut buf))
            .await
            .expect("the uncapped stream stalled")
            .expect("read");
        assert!(n > 0);
        got += n;
    }
    let free_rate = got as f64 / start.elapsed().as_secs_f64();
    assert!(
        free_rate > CAP * 4.0,
        "uncapped ran at only {free_rate:.0} B/s"
    );
    drop((s, f));
    cl.client.stop(&c.id).await.expect("stop");
    cl.client.stop(&free.id).await.expect("stop");
    cl.stop().await;
}

#[tokio::test]
async fn a_services_ports_are_leased_from_the_range_and_released_with_it() {
    let host = port_block(19);
    let cl = TestCluster::start_with(&config(port_block(20), host)).await;
    let compose = format!(
        "name: leased\nservices:\n  echo:\n    image: {FIXTURE}\n    command: [\"kfix\", \"tcp-echo\", \"80\"]\n    ports: [\"80\"]\n"
    );
    let req = kisara_api::ServiceRequest {
        compose: Some(compose),
        owner: Some("team1".into()),
        ..Default::default()
    };
    let s = cl.client.launch_service(&req).await.expect("service up");
    let p = &s.containers[0].ports[0];
    assert!(
        (host.0..=host.1).contains(&p.public_port),
        "{:?}",
        s.containers[0].ports
    );
    let leases = cl.server.state().store.list_leases().unwrap();
    assert!(
        leases
            .iter()
            .any(|l| l.port == p.public_port && l.service_id.as_deref() == Some(s.id.as_str())),
        "no lease for the service's port: {leases:?}"
    );
    assert_eq!(tcp_echo(p.public_port, b"svc\n").await, b"svc\n");
    let port = p.public_port;
    cl.client.remove_service(&s.id).await.expect("service down");
    assert!(
        cl.server.state().store.list_leases().unwrap().is_empty(),
        "leases left after the service went"
    );
    // The port is free again and the next service gets it.
    let again = cl
        .client
        .launch_service(&req)
        .await
        .expect("service up again");
    assert_eq!(again.containers[0].ports[0].public_port, port);
    cl.client
        .remove_service(&again.id)
        .await
        .expect("service down");
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn a_services_ports_go_through_the_gateway_in_its_mode() {
    let (gw, host) = (port_block(21), port_block(22));
    // Nodes that name no mode expose through the gateway: a service's default.
    let toml = config(gw, host).replace("[server]\n", "[server]\nexposure = \"gateway\"\n");
    let cl = TestCluster::start_with(&toml).await;
    let compose = format!(
        "name: viagw\nservices:\n  echo:\n    image: {FIXTURE}\n    command: [\"sh\", \"-c\", \"kfix tcp-echo 80 & exec kfix udp-echo 53\"]\n    ports: [\"80\", \"53/udp\"]\n"
    );
    let req = kisara_api::ServiceRequest {
        compose: Some(compose),
        owner: Some("team1".into()),
        // A cap far above what the test sends: carried on the leases, enforced by the gateway.
        bandwidth_kbps: Some(800_000),
        ..Default::default()
    };
    let s = cl.client.launch_service(&req).await.expect("service up");
    let ports = &s.containers[0].ports;
    let tcp = ports.iter().find(|p| p.protocol == Protocol::Tcp).unwrap();
    let udp = ports.iter().find(|p| p.protocol == Protocol::Udp).unwrap();
    assert!(
        (gw.0..=gw.1).contains(&tcp.public_port) && (gw.0..=gw.1).contains(&udp.public_port),
        "not gateway ports: {ports:?}"
    );
    assert_eq!(tcp.public_host, "127.0.0.1");
    assert_eq!(
        s.host_port,
        format!(
            "127.0.0.1:{},127.0.0.1:{}",
            tcp.public_port, udp.public_port
        )
    );
    // Nothing is published on the node; the leases carry the service and its container.
    assert_publishes_nothing(&s.containers[0].docker_id);
    let leases = cl.server.state().store.list_leases().unwrap();
    assert_eq!(leases.len(), 2, "{leases:?}");
    assert!(
        leases.iter().all(|l| l.scope == kisara_store::GATEWAY_SCOPE
            && l.service_id.as_deref() == Some(s.id.as_str())
            && l.container_id.as_deref() == Some(s.containers[0].id.as_str())
            && l.rate_kbps == Some(800_000)),
        "{leases:?}"
    );
    // Visitor → gateway → agent tunnel → the service's container, TCP and UDP.
    assert_eq!(
        tcp_echo(tcp.public_port, b"service via gateway\n").await,
        b"service via gateway\n"
    );
    assert_eq!(udp_echo(udp.public_port, b"svc dgram").await, b"svc dgram");
    // The gateway counted the service container's traffic (its inspect shows it).
    let t = traffic_of(&cl, &s.containers[0].id).await;
    assert!(t.bytes_in >= 20 + 9 && t.bytes_out >= 20 + 9, "{t:?}");
    // A reconnecting agent serves the service's port again; a restarted gateway reopens it.
    let mut cl = cl;
    cl.stop_agent().await;
    cl.start_agent().await;
    cl.wait_ready().await;
    assert_eq!(
        tcp_echo(tcp.public_port, b"agent back\n").await,
        b"agent back\n"
    );
    let cl = cl.restart().await;
    poll_until("the gateway reopened the service's port", || {
        tcp_open(tcp.public_port)
    })
    .await;
    assert_eq!(
        tcp_echo(tcp.public_port, b"server back\n").await,
        b"server back\n"
    );
    assert_eq!(udp_echo(udp.public_port, b"udp back").await, b"udp back");
    let seen = cl.client.service(&s.id).await.expect("service inspect");
    assert_eq!(
        seen.containers[0].ports, *ports,
        "same ports after the restart"
    );
    assert_eq!(seen.host_port, s.host_port);
    // `kisara ps` (the container list) shows the same addresses.
    let list = cl
        .client
        .list_containers(&Default::default())
        .await
        .unwrap();
    let row = list
        .items
        .iter()
        .find(|c| c.id == s.containers[0].id)
        .expect("the service's container is listed");
    assert_eq!(row.ports, *ports);
    assert_eq!(row.host_port, s.host_port);

    // Removed: the listeners close, the leases go back, and the next service gets the ports.
    let (tcp_port, udp_port) = (tcp.public_port, udp.public_port);
    cl.client.remove_service(&s.id).await.expect("service down");
    assert!(
        cl.server.state().store.list_leases().unwrap().is_empty(),
        "leases left after the service went"
    );
    assert!(
        !tcp_open(tcp_port).await,
        "the gateway still listens on {tcp_port}"
    );
    let again = cl
        .client
        .launch_service(&req)
        .await
        .expect("service up again");
    let p2 = &again.containers[0].ports;
    assert!(
        p2.iter()
            .any(|p| p.protocol == Protocol::Tcp && p.public_port == tcp_port)
            && p2
                .iter()
                .any(|p| p.protocol == Protocol::Udp && p.public_port == udp_port),
        "released ports not reused: {p2:?}"
    );
    assert_eq!(tcp_echo(tcp_port, b"again\n").await, b"again\n");
    cl.client
        .remove_service(&again.id)
        .await
        .expect("service down");

    // The request overrides the default (here from the CLI, `kisara service up --expose
    // host`): a host port of the node's range.
    let file = cl.data_dir.join("viagw.yaml");
    std::fs::write(&file, req.compose.as_deref().unwrap()).unwrap();
    let out = cl
        .cli(&[
            "--json",
            "service",
            "up",
            "-f",
            &file.to_string_lossy(),
            "--expose",
            "host",
            "--owner",
            "team1",
        ])
        .await;
    assert!(
        out.status.success(),
        "kisara service up --expose host: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h: kisara_api::Service = serde_json::from_slice(&out.stdout).expect("service JSON");
    let hp = h.containers[0]
        .ports
        .iter()
        .find(|p| p.protocol == Protocol::Tcp)
        .unwrap()
        .public_port;
    assert!(
        (host.0..=host.1).contains(&hp),
        "{:?}",
        h.containers[0].ports
    );
    assert_eq!(tcp_echo(hp, b"host\n").await, b"host\n");
    cl.client.remove_service(&h.id).await.expect("service down");
    cl.assert_clean().await;
    cl.stop().await;
}

#[tokio::test]
async fn the_gateway_token_opens_the_gateways_endpoints_and_nothing_else() {
    let cl = TestCluster::start_with(&config(port_block(24), port_block(25))).await;
    let path = cl.data_dir.join("gateway.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "gateway.token is readable by others");
    let gw_token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert_eq!(gw_token, cl.server.state().gateway_token().expose());
    assert_ne!(gw_token, cl.token);
    let http = reqwest::Client::new();
    let status = |method: reqwest::Method, path: &str, token: &str| {
        let req = http
            .request(method, format!("{}{path}", cl.url))
            .bearer_auth(token);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    // Accepted where the gateway role needs it (and the admin token still is, too).
    assert_eq!(
        status(reqwest::Method::GET, "/v1/gateway/ports", &gw_token).await,
        200
    );
    assert_eq!(
        status(reqwest::Method::GET, "/v1/gateway/ports", &cl.token).await,
        200
    );
    assert_eq!(
        status(reqwest::Method::GET, "/v1/gateway/ports", "ksg_wrong").await,
        401
    );
    // Refused everywhere else: listing, metrics, nodes.
    for path in ["/v1/containers", "/metrics", "/v1/nodes", "/v1/services"] {
        assert_eq!(
            status(reqwest::Method::GET, path, &gw_token).await,
            403,
            "GET {path} with the gateway token"
        );
    }
    // And a launch: refused, nothing made.
    let r = http
        .post(format!("{}/v1/containers", cl.url))
        .bearer_auth(&gw_token)
        .json(&echo_request(ExposeMode::Gateway))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("gateway token"), "{body}");
    assert!(!body.contains(&gw_token), "the token was echoed: {body}");
    assert!(cl
        .client
        .list_containers(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
    cl.assert_clean().await;
    cl.stop().await;
}
