//! The scale benchmark in small, as a test: a server and hollow nodes in this process, over
//! the real agent protocol and the HTTP API. Checks what the benchmark only measures.

use std::collections::BTreeMap;
use std::time::Duration;

use kisara_bench::{
    bench_config, create_networks, launch_many, launch_many_with, launch_request, wait_ready,
    HollowNodes, InProcessServer, NodeSpec,
};
use kisara_client::{codes, Client};

struct Bed {
    server: InProcessServer,
    nodes: HollowNodes,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn bed(count: usize, max_containers: u32, server_extra: &str) -> Bed {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = InProcessServer::start(&bench_config(server_extra), &dir.path().join("server"))
        .await
        .expect("server starts");
    let spec = NodeSpec {
        count,
        max_containers,
        cpus: 16,
        memory_bytes: 64 << 30,
    };
    let nodes = HollowNodes::start(
        &server.url,
        &server.join_token,
        &spec,
        &dir.path().join("nodes"),
    );
    let client = Client::new(&server.url, Some(server.admin_token.clone())).expect("client");
    wait_ready(&client, count, Duration::from_secs(60))
        .await
        .expect("nodes ready");
    Bed {
        server,
        nodes,
        client,
        _dir: dir,
    }
}

impl Bed {
    async fn stop(self) {
        self.nodes.stop().await;
        self.server.stop().await;
    }
}

fn per_node(placed: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (_, n) in placed {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_launch_is_placed_and_spread_evenly() {
    let b = bed(20, 120, "warm_networks = 0").await;
    let stats = launch_many(
        &b.server.url,
        &b.server.admin_token,
        2000,
        16,
        launch_request(),
    )
    .await
    .expect("launches run");
    assert_eq!(stats.failed, 0, "failures: {:?}", stats.errors);
    assert_eq!(stats.ok, 2000);
    let counts = per_node(&stats.placed);
    assert_eq!(counts.len(), 20, "every node used: {counts:?}");
    let (min, max) = (
        counts.values().min().copied().unwrap_or(0),
        counts.values().max().copied().unwrap_or(0),
    );
    assert!(max - min <= 1, "equal nodes spread within one: {counts:?}");
    assert!(max <= 120);
    // The engines hold exactly what the API answered, and the nodes agree.
    assert_eq!(b.nodes.containers(), 2000);
    let nodes = b.client.list_nodes().await.expect("nodes");
    for n in &nodes.items {
        assert_eq!(
            n.allocation.containers as usize,
            counts.get(&n.id).copied().unwrap_or(0),
            "{}",
            n.name
        );
        assert!(n.allocation.containers <= n.max_containers);
    }
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_launches_never_over_commit_a_node() {
    let b = bed(4, 5, "warm_networks = 0").await;
    // 40 launches at once for 20 slots: exactly 20 succeed, the rest are told why.
    let stats = launch_many(
        &b.server.url,
        &b.server.admin_token,
        40,
        40,
        launch_request(),
    )
    .await
    .expect("launches run");
    assert_eq!(stats.ok, 20, "errors: {:?}", stats.errors);
    assert_eq!(stats.failed, 20);
    assert!(
        stats
            .errors
            .iter()
            .all(|e| e.contains("full (5 of 5 containers)")),
        "{:?}",
        stats.errors
    );
    let counts = per_node(&stats.placed);
    assert!(counts.values().all(|&c| c == 5), "{counts:?}");
    let e = b.client.launch(&launch_request()).await.unwrap_err();
    assert_eq!(e.code(), Some(codes::NO_NODE), "{e}");
    assert_eq!(b.nodes.containers(), 20);

    // Removing one frees its slot for the next launch.
    let (id, node) = stats.placed[0].clone();
    b.client.remove(&id, true).await.expect("remove");
    let c = b
        .client
        .launch(&launch_request())
        .await
        .expect("room again");
    assert_eq!(c.node_id, node);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cordon_drain_labels_and_selectors() {
    let b = bed(3, 0, "warm_networks = 0").await;
    let c = &b.client;
    let nodes = c.list_nodes().await.expect("nodes").items;
    let (n0, n1, n2) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(nodes.iter().all(|n| n.schedulable && !n.cordoned));

    // Cordon two: everything goes to the third.
    assert!(c.cordon_node(&n0.name).await.expect("cordon").cordoned);
    let drained = c.drain_node(&n1.id).await.expect("drain");
    assert!(drained.node.draining && drained.node.cordoned && !drained.node.schedulable);
    for _ in 0..4 {
        assert_eq!(
            c.launch(&launch_request()).await.expect("launch").node_id,
            n2.id
        );
    }
    // Draining reports what is still there; nothing is moved.
    let report = c.drain_node(&n2.name).await.expect("drain");
    assert_eq!(report.containers.len(), 4);
    let e = c.launch(&launch_request()).await.unwrap_err();
    assert_eq!(e.code(), Some(codes::NO_NODE));
    let msg = e.to_string();
    for (n, why) in [(n0, "cordoned"), (n1, "draining"), (n2, "draining")] {
        assert!(msg.contains(&format!("{}: {why}", n.name)), "{msg}");
    }
    for n in [n0, n1, n2] {
        let n = c.uncordon_node(&n.id).await.expect("uncordon");
        assert!(n.schedulable && !n.cordoned && !n.draining);
    }

    // Labels: the agent's `bench=hollow`, merged with the operator's; null deletes.
    let mut change = BTreeMap::new();
    change.insert("zone".to_string(), Some("a".to_string()));
    change.insert("bench".to_string(), None);
    let labelled = c.label_node(&n1.name, change).await.expect("labels");
    assert_eq!(labelled.labels.get("zone").map(String::as_str), Some("a"));
    assert!(
        !labelled.labels.contains_key("bench"),
        "{:?}",
        labelled.labels
    );
    let mut req = launch_request();
    req.node_selector.insert("zone".into(), "a".into());
    for _ in 0..3 {
        assert_eq!(c.launch(&req).await.expect("launch").node_id, n1.id);
    }
    req.node_selector.insert("zone".into(), "b".into());
    let e = c.launch(&req).await.unwrap_err();
    assert!(e.to_string().contains("label zone=b does not match"), "{e}");

    // A named node that cannot take it says so; an unknown one is a 404.
    let mut named = launch_request();
    named.node = Some("nope".into());
    assert_eq!(
        c.launch(&named).await.unwrap_err().code(),
        Some(codes::NOT_FOUND)
    );
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_pool_launches_get_networks_of_their_own_and_one_event_each() {
    // The default path of the benchmark: spares claimed in the intent's transaction, the
    // completion and its event written together.
    let b = bed(4, 0, "warm_networks = 2").await;
    let stats = launch_many(
        &b.server.url,
        &b.server.admin_token,
        200,
        8,
        launch_request(),
    )
    .await
    .expect("launches run");
    assert_eq!(stats.failed, 0, "failures: {:?}", stats.errors);
    assert_eq!(stats.ok, 200);
    let store = &b.server.server.state().store;
    let mut networks = std::collections::HashSet::new();
    for (id, node) in &stats.placed {
        let c = store.get_container(id).expect("the row");
        assert_eq!(&c.node_id, node);
        assert!(!c.docker_id.is_empty(), "completed: {c:?}");
        let name = c.network.clone().expect("a network");
        assert!(networks.insert(name.clone()), "{name} given twice");
        let net = store.get_network(&name).expect("its network");
        assert_eq!(net.owned_by.as_deref(), Some(id.as_str()));
        assert_eq!(&net.node_id, node);
    }
    let launches: Vec<_> = store
        .events_after(0, 10_000)
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == kisara_api::events::kinds::CONTAINER_LAUNCH)
        .filter_map(|e| e.container_id)
        .collect();
    let distinct: std::collections::HashSet<_> = launches.iter().collect();
    assert_eq!(launches.len(), 200, "one container.launch per launch");
    assert_eq!(distinct.len(), 200);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launches_onto_shared_networks_go_to_their_networks_nodes() {
    let b = bed(4, 0, "warm_networks = 0").await;
    let names = create_networks(&b.client, 8, 4, 4)
        .await
        .expect("networks made");
    let nodes = b.client.list_nodes().await.expect("nodes");
    let node_of = |name: &str| {
        nodes
            .items
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.id.clone())
            .expect("node")
    };
    let shared = names.clone();
    let stats = launch_many_with(&b.server.url, &b.server.admin_token, 80, 8, move |i| {
        let mut r = launch_request();
        r.network = Some(shared[i % shared.len()].clone());
        r
    })
    .await
    .expect("launches run");
    assert_eq!(stats.failed, 0, "failures: {:?}", stats.errors);
    let mut per_network: BTreeMap<String, usize> = BTreeMap::new();
    for (id, node) in &stats.placed {
        let c = b.client.container(id).await.expect("container");
        let net = c.network.expect("on a network");
        let i: usize = net
            .strip_prefix("bench-net-")
            .and_then(|n| n.parse().ok())
            .expect("a bench network");
        assert_eq!(node, &node_of(&format!("hollow-{:04}", i % 4)), "{net}");
        *per_network.entry(net).or_default() += 1;
    }
    assert_eq!(per_network.len(), 8);
    assert!(per_network.values().all(|&n| n == 10), "{per_network:?}");
    // No network was made per container.
    let all = b.client.list_networks(None).await.expect("networks");
    assert_eq!(all.items.len(), 8);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subnet_taken_behind_the_servers_back_is_learned_on_overlap() {
    // The server asks a node's used subnets once per session; a network made on the engine
    // after that is learned when the engine refuses the subnet, and the create still works.
    use kisara_runtime::Runtime;
    let b = bed(1, 0, "warm_networks = 0").await;
    let create = |name: &str| kisara_api::CreateNetworkRequest {
        name: name.into(),
        ..Default::default()
    };
    let first = b.client.create_network(&create("n1")).await.expect("n1");
    assert_eq!(first.subnet, "10.0.0.0/28");
    let outside = kisara_api::agent::NetworkConfig {
        name: "made-outside".into(),
        subnet: "10.0.0.16/28".into(),
        gateway: None,
        internal: false,
        internet: false,
        labels: Default::default(),
        bridge_name: None,
    };
    b.nodes.runtimes[0]
        .create_network(&outside)
        .await
        .expect("made on the engine");
    let second = b.client.create_network(&create("n2")).await.expect("n2");
    assert_eq!(second.subnet, "10.0.0.32/28");
    // The refused subnet is not held by anything in the store.
    let held: Vec<String> = b
        .server
        .server
        .state()
        .store
        .subnet_allocations()
        .expect("allocations")
        .into_iter()
        .map(|a| a.subnet.to_string())
        .collect();
    assert_eq!(held, vec!["10.0.0.0/28", "10.0.0.32/28"]);
    b.stop().await;
}
