//! Kisara across several real Docker Engines: a `kisara server` process and one `kisara node`
//! process per engine, each engine a `dockerd` of its own started by `scripts/testbed.sh` (see
//! `testbed/mod.rs`). The scenarios are the ones a single engine cannot show: spreading work
//! over nodes, routing requests to the node that holds a container, lists that survive a dead
//! node, a node that crashes and rejoins, and a server killed in the middle of a burst.
//!
//! Each test claims engines of its own, so no two tests share an engine; nextest runs this
//! file's tests one at a time anyway (`.config/nextest.toml`), to
//! keep a 2-core machine responsive.

mod testbed;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kisara_api::{Container, ContainerState, ListResponse};
use testbed::{output_within, poll, Cluster, ClusterOptions, IMAGE};

/// One HTTP request over TCP; the response text, or `None` when the port does not answer.
fn http_get(host: &str, port: u16) -> Option<String> {
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Containers per node name, from a list.
fn per_node(
    items: &[Container],
    names: &BTreeMap<String, String>,
) -> BTreeMap<String, Vec<Container>> {
    let by_id: BTreeMap<&String, &String> = names.iter().map(|(n, id)| (id, n)).collect();
    let mut m: BTreeMap<String, Vec<Container>> = BTreeMap::new();
    for c in items {
        let name = by_id
            .get(&c.node_id)
            .map(|n| n.to_string())
            .unwrap_or_else(|| format!("unknown node {}", c.node_id));
        m.entry(name).or_default().push(c.clone());
    }
    m
}

#[test]
fn launches_without_a_node_spread_evenly_and_publish_on_each_engine() {
    let cluster = Cluster::start(3);
    let names = cluster.node_ids();
    assert_eq!(names.len(), 3, "three nodes: {names:?}");

    let mut launched = Vec::new();
    for _ in 0..9 {
        launched.push(cluster.run(&[
            "-p", "80/tcp", "--owner", "spread", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
        ]));
    }
    let placed = per_node(&launched, &names);
    let counts: BTreeMap<&String, usize> = placed.iter().map(|(n, v)| (n, v.len())).collect();
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "9 launches on 3 empty nodes spread 3/3/3, got {counts:?}"
    );

    for k in 0..3 {
        let name = Cluster::node_name(k);
        // The engine holds exactly what the server says it placed there.
        let on_engine: BTreeSet<String> = cluster
            .engines
            .kisara_containers(k)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let placed_here: BTreeSet<String> = placed[&name].iter().map(|c| c.id.clone()).collect();
        assert_eq!(on_engine, placed_here, "containers on engine of {name}");
        // Each published port answers on its own engine's address.
        for c in &placed[&name] {
            assert_eq!(c.ports.len(), 1, "{c:?}");
            let p = &c.ports[0];
            assert_eq!(p.public_host, cluster.engines.address(k), "{c:?}");
            let answer = poll(
                Duration::from_secs(15),
                &format!("{}:{} answers", p.public_host, p.public_port),
                || http_get(&p.public_host, p.public_port).filter(|b| b.contains("kisara-test")),
            );
            assert!(answer.contains("200 OK"), "{answer}");
        }
    }
}

#[test]
fn exec_logs_and_stop_reach_the_right_engine_without_naming_the_node() {
    let cluster = Cluster::start(3);
    let names = cluster.node_ids();
    let n2 = &names["n2"];
    let c = cluster.run(&[
        "--node",
        "n2",
        IMAGE,
        "sh",
        "-c",
        "echo started-here; exec sleep 600",
    ]);
    assert_eq!(&c.node_id, n2);
    // It really is on engine 2, and only there.
    assert_eq!(cluster.engines.running(1, &c.docker_id), Some(true));
    assert_eq!(cluster.engines.running(0, &c.docker_id), None);
    assert_eq!(cluster.engines.running(2, &c.docker_id), None);
    let inspect = cluster.engines.docker(
        1,
        &[
            "inspect",
            "-f",
            "{{index .Config.Labels \"io.kisara.container\"}}",
            &c.docker_id,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&inspect.stdout).trim(), c.id);

    // exec by Kisara id, then by name: the server finds the node.
    let out = cluster.kisara(&[
        "exec",
        &c.id,
        "--",
        "sh",
        "-c",
        "hostname; echo out; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let hostname = cluster
        .engines
        .docker(1, &["inspect", "-f", "{{.Config.Hostname}}", &c.docker_id]);
    assert_eq!(
        stdout,
        format!(
            "{}\nout\n",
            String::from_utf8_lossy(&hostname.stdout).trim()
        )
    );
    let out = cluster.kisara(&["exec", &c.name, "--", "echo", "by-name"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "by-name\n");

    // logs come from engine 2.
    let out = poll(Duration::from_secs(10), "logs show the start line", || {
        let out = cluster.kisara(&["logs", &c.id]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout).contains("started-here"))
            .then_some(out)
    });
    assert_eq!(String::from_utf8_lossy(&out.stdout), "started-here\n");

    // inspect and stop: gone from engine 2, and from the list.
    let again: Container = cluster.json(&["inspect", &c.id]);
    assert_eq!(again.node_id, *n2);
    assert_eq!(again.state, ContainerState::Running);
    let out = cluster.kisara(&["stop", &c.id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(cluster.engines.running(1, &c.docker_id), None);
    assert!(cluster.engines.kisara_containers(1).is_empty());
    assert!(!cluster.ps().items.iter().any(|x| x.id == c.id));
}

#[test]
fn a_list_answers_with_one_node_down() {
    let mut cluster = Cluster::start(3);
    let names = cluster.node_ids();
    let mut mine: BTreeMap<String, Vec<Container>> = BTreeMap::new();
    for k in 0..3 {
        let name = Cluster::node_name(k);
        for _ in 0..2 {
            let c = cluster.run(&["--node", &name, IMAGE, "sleep", "600"]);
            mine.entry(name.clone()).or_default().push(c);
        }
    }

    cluster.kill_agent(2);
    let dead = &names["n3"];
    // The server notices the channel closing; the list answers without the dead node.
    let list: ListResponse<Container> = poll(
        Duration::from_secs(30),
        "ps reports n3 in node_errors",
        || {
            let list = cluster.ps();
            list.node_errors
                .iter()
                .any(|e| &e.node_id == dead)
                .then_some(list)
        },
    );
    assert_eq!(
        list.node_errors.len(),
        1,
        "only n3 fails: {:?}",
        list.node_errors
    );
    let listed: BTreeSet<&String> = list.items.iter().map(|c| &c.id).collect();
    for name in ["n1", "n2"] {
        for c in &mine[name] {
            assert!(listed.contains(&c.id), "{} of {name} listed", c.id);
        }
    }
    // The live nodes still serve requests.
    let out = cluster.kisara(&["exec", &mine["n1"][0].id, "--", "true"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The dead node's containers keep running on its engine.
    for c in &mine["n3"] {
        assert_eq!(cluster.engines.running(2, &c.docker_id), Some(true));
    }
    // A request to the dead node fails, clearly and quickly.
    let started = Instant::now();
    let out = cluster.kisara(&["exec", &mine["n3"][0].id, "--", "true"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_killed_node_rejoins_as_itself_with_its_containers() {
    let mut cluster = Cluster::start(3);
    let before = cluster.wait_ready(1);
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(cluster.run(&["--node", "n2", IMAGE, "sleep", "600"]));
    }
    let others = cluster.run(&["--node", "n1", IMAGE, "sleep", "600"]);

    cluster.kill_agent(1);
    poll(Duration::from_secs(30), "n2 seen as gone", || {
        cluster
            .ps()
            .node_errors
            .iter()
            .any(|e| e.node_id == before.id)
            .then_some(())
    });

    // Back with its stored credential, no join token.
    cluster.start_agent(1);
    let after = cluster.wait_ready(1);
    assert_eq!(after.id, before.id, "same node id after rejoining");
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 3, "no duplicate node: {nodes:?}");

    let list = cluster.ps();
    assert!(list.node_errors.is_empty(), "{:?}", list.node_errors);
    let ids: Vec<&String> = list.items.iter().map(|c| &c.id).collect();
    let unique: BTreeSet<&String> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "duplicates in {ids:?}");
    assert_eq!(list.items.len(), 4, "{:?}", list.items);
    for c in &mine {
        let listed = list.items.iter().find(|x| x.id == c.id).expect("listed");
        assert_eq!(listed.node_id, before.id);
        assert_eq!(listed.docker_id, c.docker_id, "not re-created");
        assert_eq!(listed.state, ContainerState::Running);
        assert_eq!(cluster.engines.running(1, &c.docker_id), Some(true));
    }
    assert!(list.items.iter().any(|x| x.id == others.id));
    // Exactly the three on its engine: nothing launched twice.
    assert_eq!(cluster.engines.kisara_containers(1).len(), 3);
    // And it serves requests again.
    let out = cluster.kisara(&["exec", &mine[0].id, "--", "echo", "back"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "back\n");
}

#[test]
fn a_server_killed_mid_burst_leaves_no_orphaned_or_lost_containers() {
    const BURST: usize = 30;
    let mut cluster = Cluster::start(3);
    let names = cluster.node_ids();

    // 30 launches at once, each a `kisara run --json` of its own.
    let acked = Arc::new(Mutex::new(Vec::<Container>::new()));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..BURST {
        // Small reservations: capacity is not what this test is about (three nodes on a 2-core
        // machine offer 3 x 8 CPUs to the scheduler, less than 30 x the default 1).
        let mut cmd = cluster.kisara_cmd(&[
            "--json", "run", "--owner", "burst", "--cpus", "0.1", "--memory", "32", IMAGE, "sleep",
            "600",
        ]);
        let acked = acked.clone();
        let finished = finished.clone();
        threads.push(std::thread::spawn(move || {
            if let Some(out) = output_within(&mut cmd, Duration::from_secs(120)) {
                match serde_json::from_slice::<Container>(&out.stdout) {
                    Ok(c) if out.status.success() => acked.lock().unwrap().push(c),
                    _ => eprintln!(
                        "a launch failed (expected around the kill): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                }
            }
            finished.fetch_add(1, Ordering::SeqCst);
        }));
    }
    // Partway: once a few launches have been answered, and while most are in flight.
    poll(
        Duration::from_secs(90),
        "the first launches are answered",
        || (acked.lock().unwrap().len() >= 3).then_some(()),
    );
    let in_flight = BURST - finished.load(Ordering::SeqCst);
    cluster.kill_server();
    cluster.start_server();
    for t in threads {
        t.join().expect("launch thread");
    }
    for k in 0..3 {
        cluster.wait_ready(k);
    }
    let acked: Vec<Container> = acked.lock().unwrap().clone();
    eprintln!(
        "burst: {} of {BURST} launches answered, {in_flight} in flight at the kill",
        acked.len()
    );

    // Let reconciliation settle (bounded), then compare the engines with the server's list.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (settled, report) = loop {
        let (orphans, lost, dups, launching) = accounting(&cluster, &acked);
        let report = format!(
            "orphaned (on an engine, unknown to the server): {orphans:?}\n\
             lost (listed or acknowledged, on no engine): {lost:?}\n\
             on engines twice: {dups:?}\nstill launching: {launching:?}"
        );
        if orphans.is_empty() && lost.is_empty() && dups.is_empty() && launching.is_empty() {
            break (true, report);
        }
        if Instant::now() >= deadline {
            break (false, report);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let on_engines: usize = (0..3)
        .map(|k| cluster.engines.kisara_containers(k).len())
        .sum();
    eprintln!("after the restart: {on_engines} containers on the engines\n{report}");
    assert!(settled, "after a server crash mid-burst:\n{report}");
    // Everything acknowledged is running, on the node the server says.
    let list = cluster.ps();
    for c in &acked {
        let listed = list
            .items
            .iter()
            .find(|x| x.id == c.id)
            .expect("acknowledged launch listed");
        assert_eq!(listed.state, ContainerState::Running, "{listed:?}");
        assert_eq!(listed.node_id, c.node_id, "{listed:?}");
        let k = (0..3)
            .find(|k| names[&Cluster::node_name(*k)] == c.node_id)
            .expect("a node of this cluster");
        assert_eq!(
            cluster.engines.running(k, &c.docker_id),
            Some(true),
            "{c:?}"
        );
    }
}

/// Orphaned, lost, duplicated and still-launching Kisara ids after a crash: the engines' labelled
/// containers against the server's list and the launches it acknowledged.
fn accounting(
    cluster: &Cluster,
    acked: &[Container],
) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let mut on_engines: BTreeMap<String, usize> = BTreeMap::new();
    for k in 0..cluster.engines.count() {
        for (id, _) in cluster.engines.kisara_containers(k) {
            *on_engines.entry(id).or_default() += 1;
        }
    }
    let out = cluster.kisara(&["--json", "ps"]);
    let Ok(list) = serde_json::from_slice::<ListResponse<Container>>(&out.stdout) else {
        return (
            vec![],
            vec!["the server does not answer ps".into()],
            vec![],
            vec![],
        );
    };
    let listed: BTreeSet<String> = list.items.iter().map(|c| c.id.clone()).collect();
    let orphans = on_engines
        .keys()
        .filter(|id| !listed.contains(*id))
        .cloned()
        .collect();
    let lost = listed
        .iter()
        .chain(acked.iter().map(|c| &c.id))
        .filter(|id| !on_engines.contains_key(*id))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let dups = on_engines
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.clone())
        .collect();
    let launching = list
        .items
        .iter()
        .filter(|c| c.state == ContainerState::Launching)
        .map(|c| c.id.clone())
        .collect();
    (orphans, lost, dups, launching)
}

/// Tries a TCP connection to `addr` whose packets can only leave through `device` (the host's
/// end of a test bed veth), so the attempt never reaches any network but the test's own.
/// `Ok` when it connected; otherwise the error kind.
fn connect_via(device: &str, addr: std::net::SocketAddr) -> Result<(), std::io::ErrorKind> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.kind())?;
    s.bind_device(Some(device.as_bytes()))
        .expect("SO_BINDTODEVICE (needs root)");
    s.connect_timeout(&addr.into(), Duration::from_secs(2))
        .map_err(|e| e.kind())
}

#[test]
fn a_node_with_no_public_address_and_no_inbound_traffic_is_served_through_the_gateway() {
    // The node's agent runs inside its engine's network namespace and only connects out, to
    // the server on the host side of the veth; the gateway listens on the host's loopback.
    // Gateway ports below the ephemeral range, apart from tests/exposure.rs's blocks.
    let gw = 15000 + (std::process::id() % 200) as u16 * 4;
    let opts = ClusterOptions {
        server_toml: Some(format!(
            "[gateway]\nenabled = true\nlisten_host = \"127.0.0.1\"\npublic_address = \"127.0.0.1\"\nport_range = \"{}-{}\"\n",
            gw,
            gw + 3
        )),
        // The node's own configuration names gateway mode (no request does).
        node_toml: Some("[node]\nexposure = \"gateway\"\n".into()),
        agents_in_netns: true,
    };
    let cluster = Cluster::start_with(1, opts);
    let ns = cluster.engines.netns(0);
    // Nothing may connect into the node: new inbound connections on its uplink are dropped
    // (the namespace, and the rule with it, goes when the engine is torn down).
    let fw = Command::new("nsenter")
        .args([&format!("--net=/run/netns/{ns}"), "--"])
        .args(["iptables", "-I", "INPUT", "-i", "uplink", "-m", "conntrack"])
        .args(["--ctstate", "NEW", "-j", "DROP"])
        .output()
        .expect("iptables");
    assert!(fw.status.success(), "iptables: {}", stderr(&fw));
    // Control of the control: a closed port of the node's address now times out instead of
    // being refused.
    let node_addr: std::net::IpAddr = cluster.engines.address(0).parse().unwrap();
    let probe = connect_via(
        &cluster.engines.host_interface(0),
        std::net::SocketAddr::new(node_addr, 9),
    );
    assert_eq!(
        probe,
        Err(std::io::ErrorKind::TimedOut),
        "inbound is not dropped"
    );

    let c = cluster.run(&[
        "-p", "80/tcp", "--owner", "outbound", IMAGE, "httpd", "-f", "-p", "80", "-h", "/www",
    ]);
    assert_eq!(c.ports.len(), 1, "{c:?}");
    let p = &c.ports[0];
    assert_eq!(p.public_host, "127.0.0.1", "{c:?}");
    assert!(
        (gw..=gw + 3).contains(&p.public_port),
        "not a gateway port: {c:?}"
    );
    let private: std::net::IpAddr = c
        .ip_address
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .unwrap_or_else(|| panic!("no private address: {c:?}"));
    // Nothing is published on the engine.
    let published = cluster.engines.docker(
        0,
        &[
            "inspect",
            "-f",
            "{{json .HostConfig.PortBindings}}",
            &c.docker_id,
        ],
    );
    let published = String::from_utf8_lossy(&published.stdout)
        .trim()
        .to_string();
    assert!(matches!(published.as_str(), "{}" | "null"), "{published}");

    // Positive control: inside the node's namespace the container answers at its private
    // address.
    let inside = output_within(
        Command::new("nsenter")
            .args([&format!("--net=/run/netns/{ns}"), "--", "bash", "-c"])
            .arg(format!(
                "exec 3<>/dev/tcp/{private}/80 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3"
            )),
        Duration::from_secs(20),
    )
    .expect("the request inside the namespace finished");
    let inside = String::from_utf8_lossy(&inside.stdout).into_owned();
    assert!(
        inside.contains("kisara-test"),
        "inside the namespace: {inside:?}"
    );
    // Negative control: from the host, over the only link it has to that namespace, the
    // private address cannot be reached.
    let direct = connect_via(
        &cluster.engines.host_interface(0),
        std::net::SocketAddr::new(private, 80),
    );
    assert!(direct.is_err(), "the host reached {private}:80 directly");

    // The visitor on the host reaches it through the gateway: visitor → server's listener →
    // tunnel the agent dialled out → container.
    let answer = poll(
        Duration::from_secs(20),
        &format!("127.0.0.1:{} answers through the gateway", p.public_port),
        || http_get("127.0.0.1", p.public_port).filter(|b| b.contains("kisara-test")),
    );
    assert!(answer.contains("200 OK"), "{answer}");

    // Removed: the port closes.
    let out = cluster.kisara(&["stop", &c.id]);
    assert!(out.status.success(), "stop: {}", stderr(&out));
    poll(Duration::from_secs(20), "the gateway port closes", || {
        http_get("127.0.0.1", p.public_port).is_none().then_some(())
    });
}
