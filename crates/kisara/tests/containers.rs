//! End to end against the real Docker Engine: launch → the port answers → exec → logs → stop →
//! nothing of Kisara left in Docker.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use kisara_api::{ContainerFilter, ContainerState, ExecRequest, LaunchRequest, Protocol};
use kisara_runtime::Runtime;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_serve_exec_logs_stop_leaves_nothing() {
    let k = TestCluster::start().await;
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    assert_eq!(c.state, ContainerState::Running);
    assert_eq!(c.owner.as_deref(), Some("team1"));
    assert_eq!(c.ports.len(), 1);
    let p = &c.ports[0];
    assert_eq!((p.container_port, p.protocol), (80, Protocol::Tcp));
    assert_eq!(p.public_host, "127.0.0.1");
    assert_ne!(p.public_port, 0);
    assert_eq!(c.host_port, format!("127.0.0.1:{}", p.public_port));
    assert!(c.network.as_deref().unwrap_or("").starts_with("kisara-"));

    // A player reaches it.
    let answer = http_get(&p.public_host, p.public_port).await;
    assert!(
        answer.contains("kisara-test"),
        "unexpected answer: {answer:?}"
    );

    // Exec gives output and exit code back.
    let r = k
        .client
        .exec(
            &c.id,
            &ExecRequest {
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "echo out; echo err >&2; exit 3".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    assert_eq!(r.exit_code, Some(3));
    assert!(!r.timed_out);

    // Exec timeout is honoured.
    let r = k
        .client
        .exec(
            &c.id,
            &ExecRequest {
                cmd: vec!["sleep".into(), "30".into()],
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await
        .expect("exec with timeout");
    assert!(r.timed_out);
    assert_eq!(r.exit_code, None);

    // Inspect by id, by name and by docker id prefix.
    assert_eq!(k.client.container(&c.id).await.unwrap().id, c.id);
    assert_eq!(k.client.container(&c.name).await.unwrap().id, c.id);
    assert_eq!(
        k.client.container(&c.docker_id[..12]).await.unwrap().id,
        c.id
    );

    // Filters.
    let mine = k
        .client
        .list_containers(&ContainerFilter {
            owner: Some("team1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(mine.items.len(), 1);
    let none = k
        .client
        .list_containers(&ContainerFilter {
            module: Some("other".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.items.is_empty());

    // Stop = stop and remove, with its network; nothing of Kisara is left.
    k.client.stop(&c.id).await.expect("stop");
    let e = k.client.container(&c.id).await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_defaults_are_visible_in_docker_inspect() {
    let k = TestCluster::start().await;
    let c = k
        .client
        .launch(&LaunchRequest {
            image: IMAGE.into(),
            cmd: Some(vec!["sleep".into(), "300".into()]),
            memory_mb: Some(64),
            cpus: Some(0.5),
            pids_limit: Some(50),
            ..Default::default()
        })
        .await
        .expect("launch");
    let i = docker_inspect(&c.docker_id);
    let hc = &i["HostConfig"];
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]), "{hc}");
    assert!(hc["SecurityOpt"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o.as_str().unwrap().starts_with("no-new-privileges")));
    assert_eq!(hc["Memory"], 64 * 1024 * 1024);
    assert_eq!(hc["MemorySwap"], hc["Memory"]);
    assert_eq!(hc["NanoCpus"], 500_000_000i64);
    assert_eq!(hc["PidsLimit"], 50);
    assert_eq!(hc["Init"], true);
    assert_eq!(hc["Privileged"], false);
    let labels = &i["Config"]["Labels"];
    assert_eq!(labels["io.kisara.cluster"], k.cluster_id.as_str());
    assert_eq!(labels["io.kisara.container"], c.id.as_str());
    // Defaults apply when the request names no limits.
    let d = k
        .client
        .launch(&LaunchRequest {
            image: IMAGE.into(),
            cmd: Some(vec!["sleep".into(), "300".into()]),
            ..Default::default()
        })
        .await
        .expect("launch");
    let hc = docker_inspect(&d.docker_id)["HostConfig"].clone();
    assert!(hc["Memory"].as_i64().unwrap() > 0);
    assert_eq!(hc["MemorySwap"], hc["Memory"]);
    assert!(hc["NanoCpus"].as_i64().unwrap() > 0);
    assert!(hc["PidsLimit"].as_i64().unwrap() > 0);
    for id in [&c.id, &d.id] {
        k.client.remove(id, true).await.expect("remove");
    }
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_and_follow() {
    let k = TestCluster::start().await;
    let c = k
        .client
        .launch(&LaunchRequest {
            image: IMAGE.into(),
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                "echo one; echo two; sleep 1; echo three; sleep 300".into(),
            ]),
            ..Default::default()
        })
        .await
        .expect("launch");
    // Follow until "three" arrives (bounded).
    let mut s = k.client.logs(&c.id, None, true).await.expect("logs");
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.contains("three") {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Ok(Some(Ok(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            other => panic!("log stream ended early ({seen:?}): {:?}", other.is_ok()),
        }
    }
    assert!(seen.starts_with("one\ntwo\n"), "{seen:?}");
    drop(s);
    // Tail returns just the end.
    let mut s = k.client.logs(&c.id, Some(1), false).await.expect("logs");
    let mut tail = String::new();
    while let Some(Ok(b)) = s.next().await {
        tail.push_str(&String::from_utf8_lossy(&b));
    }
    assert_eq!(tail, "three\n");
    k.client.stop(&c.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kisara_compatible_fields_and_named_network() {
    let k = TestCluster::start().await;
    let net = k
        .client
        .create_network(&kisara_api::CreateNetworkRequest {
            name: format!("teams-{}", &k.cluster_id[..6]),
            ..Default::default()
        })
        .await
        .expect("network");
    // Kisara's own request shape: uid as a number, port_protocol, subnet_name, module.
    let req: LaunchRequest = serde_json::from_value(serde_json::json!({
        "image": IMAGE,
        "uid": 7,
        "port_protocol": "80/tcp,8080/tcp",
        "subnet_name": net.name,
        "module": "pwn",
        "cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
    }))
    .unwrap();
    let c = k.client.launch(&req).await.expect("launch");
    assert_eq!(c.owner.as_deref(), Some("7"));
    assert_eq!(c.network.as_deref(), Some(net.name.as_str()));
    assert_eq!(c.ports.len(), 2);
    assert_eq!(c.host_port.split(',').count(), 2);
    let ip: std::net::Ipv4Addr = c.ip_address.as_deref().unwrap().parse().unwrap();
    let subnet: ipnet::Ipv4Net = net.subnet.parse().unwrap();
    assert!(subnet.contains(&ip), "{ip} not in {subnet}");
    // A network in use is not removed.
    let e = k.client.remove_network(&net.id).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    k.client.stop(&c.id).await.unwrap();
    // Stopping does not take a network the container did not own.
    assert!(k.client.network(&net.id).await.is_ok());
    k.client.remove_network(&net.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_keeps_containers_and_reconciles() {
    let k = TestCluster::start().await;
    let a = k.client.launch(&httpd_request()).await.expect("launch a");
    let b = k.client.launch(&httpd_request()).await.expect("launch b");
    // Restart: containers keep running and are known again.
    let k = k.restart().await;
    let a2 = k.client.container(&a.id).await.expect("a survives restart");
    assert_eq!(a2.state, ContainerState::Running);
    assert_eq!(a2.ports, a.ports);
    assert!(http_get("127.0.0.1", a.ports[0].public_port)
        .await
        .contains("kisara-test"));
    // Remove b behind Kisara's back; after a restart it is reported gone, not lost silently.
    k.runtime.remove(&b.docker_id, true).await.unwrap();
    let k = k.restart().await;
    let list = k
        .client
        .list_containers(&ContainerFilter {
            all: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let b2 = list.items.iter().find(|c| c.id == b.id).expect("b listed");
    assert_eq!(b2.state, ContainerState::Gone);
    // Gone containers can be cleared away.
    k.client.remove(&b.id, true).await.expect("remove gone");
    k.client.stop(&a.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

/// Test clusters share one engine and race for the same subnets: two clusters each creating
/// many networks at once from one pool all succeed, each on a subnet of its own (an engine's
/// overlap answer sends the next try to a random place in the pool, retries bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_on_one_engine_create_many_networks_at_once_from_one_pool() {
    const CONFIG: &str = "[server]\nsubnet_pool = [\"10.196.[0-63].0/24\"]\nwarm_networks = 0\n";
    const EACH: usize = 12;
    let (a, b) = tokio::join!(
        TestCluster::start_with(CONFIG),
        TestCluster::start_with(CONFIG)
    );
    let make = |k: &TestCluster| {
        let client = k.client.clone();
        async move {
            let tag = kisara_server::new_id();
            futures::future::join_all((0..EACH).map(|i| {
                let client = client.clone();
                let name = format!("race-{tag}-{i}");
                async move {
                    client
                        .create_network(&kisara_api::CreateNetworkRequest {
                            name,
                            ..Default::default()
                        })
                        .await
                }
            }))
            .await
        }
    };
    let (made_a, made_b) = tokio::join!(make(&a), make(&b));
    let mut subnets = Vec::new();
    for r in made_a.iter().chain(&made_b) {
        let net = r.as_ref().expect("every network is made");
        subnets.push(net.subnet.clone());
    }
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), 2 * EACH, "a subnet handed out twice");
    for (k, made) in [(&a, &made_a), (&b, &made_b)] {
        for net in made.iter().flatten() {
            k.client.remove_network(&net.id).await.expect("remove");
        }
        k.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

/// An inventory is taken before reconciliation reads the store: a container launched in
/// between is missing from it, and must not be marked gone for that; one the engine really
/// lost is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_launched_after_the_inventory_is_not_marked_gone() {
    let k = TestCluster::start().await;
    let node = k.client.list_nodes().await.unwrap().items[0].id.clone();
    let fresh = k.client.launch(&httpd_request()).await.expect("launch");
    let removed = k.client.launch(&httpd_request()).await.expect("launch");
    k.runtime.remove(&removed.docker_id, true).await.unwrap();
    // An inventory from before both launches.
    kisara_server::reconcile::reconcile_node(k.server.state(), &node, &[], &[]).await;
    let all = k
        .client
        .list_containers(&ContainerFilter {
            all: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .items;
    let state = |id: &str| all.iter().find(|c| c.id == id).map(|c| c.state);
    assert_eq!(state(&fresh.id), Some(ContainerState::Running));
    assert_eq!(state(&removed.id), Some(ContainerState::Gone));
    assert_eq!(
        k.server
            .state()
            .store
            .get_container(&fresh.id)
            .unwrap()
            .state,
        ContainerState::Running,
        "the store took a fresh launch for gone"
    );
    k.client.stop(&fresh.id).await.unwrap();
    k.client.remove(&removed.id, true).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

/// Reconciliation reads the node's rows once, then waits on the node row by row: a launch
/// that completes meanwhile must keep its row and its container (it was acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_completing_during_reconciliation_keep_their_rows() {
    let k = TestCluster::start().await;
    let node = k.client.list_nodes().await.unwrap().items[0].id.clone();
    let client = k.client.clone();
    let launches = tokio::spawn(async move {
        futures::future::join_all((0..6).map(|_| {
            let client = client.clone();
            async move { client.launch(&httpd_request()).await }
        }))
        .await
    });
    // Inventories taken before any of them: every completed row is asked about on the node.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !launches.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "launches never finished"
        );
        kisara_server::reconcile::reconcile_node(k.server.state(), &node, &[], &[]).await;
    }
    let launched: Vec<_> = launches.await.unwrap().into_iter().flatten().collect();
    assert!(!launched.is_empty(), "no launch succeeded");
    for c in &launched {
        let row = k.server.state().store.get_container(&c.id);
        assert!(
            row.as_ref()
                .is_ok_and(|r| r.state == ContainerState::Running),
            "an acknowledged launch lost its row: {row:?}"
        );
        assert!(
            k.runtime.inspect(&c.docker_id).await.is_ok(),
            "an acknowledged launch lost its container"
        );
        k.client.stop(&c.id).await.unwrap();
    }
    k.assert_clean().await;
    k.stop().await;
}

/// Polls (bounded) until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The orphans the issue counts after a crash: containers labelled for this cluster and node
/// that the store does not know. Reconciliation removes them on the agent's next connect
/// (`container.orphan_removed` once each), but never one a launch of this process is working
/// on, nor one of another cluster sharing the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_removes_orphans_once_and_nothing_else() {
    use kisara_api::labels::{CLUSTER, CONTAINER, NODE};
    let mut k = TestCluster::start().await;
    let node = k.client.list_nodes().await.unwrap().items[0].id.clone();
    k.stop_agent().await;
    let (orphan_id, busy_id) = (kisara_server::new_id(), kisara_server::new_id());
    let ours =
        |id: &str| docker_run_labelled(&[(CLUSTER, &k.cluster_id), (CONTAINER, id), (NODE, &node)]);
    let orphan = ours(&orphan_id);
    let busy = ours(&busy_id);
    let other_cluster = format!("other-{}", kisara_server::new_id());
    let foreign = docker_run_labelled(&[
        (CLUSTER, &other_cluster),
        (CONTAINER, &kisara_server::new_id()),
        (NODE, &node),
    ]);
    // A launch under way in this process (its guard held): hands off.
    let in_flight = k.server.state().begin_launch(&busy_id);

    k.start_agent().await;
    until("the orphan is removed", || !orphan.exists()).await;
    // One reconciliation decided all three: the others are still there.
    assert!(
        busy.exists(),
        "a container whose launch is in flight was removed"
    );
    assert!(foreign.exists(), "another cluster's container was removed");
    let removed = stored_events(&k.client, "container.orphan_removed").await;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].container_id.as_deref(), Some(orphan_id.as_str()));
    assert_eq!(removed[0].node_id.as_deref(), Some(node.as_str()));
    assert_eq!(removed[0].data["docker_id"], orphan.0.as_str());

    // Once the launch is over, the same container is an orphan like any other; the first
    // one's event does not fire again.
    drop(in_flight);
    k.stop_agent().await;
    k.start_agent().await;
    until("the abandoned launch's container is removed", || {
        !busy.exists()
    })
    .await;
    let removed = stored_events(&k.client, "container.orphan_removed").await;
    let ids: Vec<_> = removed
        .iter()
        .filter_map(|e| e.container_id.clone())
        .collect();
    assert_eq!(ids, vec![orphan_id, busy_id], "{removed:?}");
    assert!(foreign.exists(), "another cluster's container was removed");
    drop(foreign);
    k.assert_clean().await;
    k.stop().await;
}

/// A launch the crash interrupted may finish on the engine after the restart's reconciliation
/// dropped its row: a reconciliation that dropped launches looks at the node once more
/// (`orphan_recheck_secs` later), and that second look removes the late container. The first
/// look cannot see it: it is made only after the row is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_that_finishes_after_its_row_was_dropped_is_removed_by_the_recheck() {
    use kisara_api::labels::{CLUSTER, CONTAINER, NODE};
    let k = TestCluster::start_with("[server]\nwarm_networks = 0\norphan_recheck_secs = 1\n").await;
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    let late_id = kisara_server::new_id();
    let k = k
        .restart_editing(|store| {
            let mut never = c.clone();
            never.id = late_id.clone();
            never.name = format!("late-{late_id}");
            never.docker_id = String::new();
            never.state = ContainerState::Launching;
            never.ports.clear();
            store.insert_container(&never).unwrap();
        })
        .await;
    // The restart's reconciliation drops the intent the engine never saw...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while k.client.container(&late_id).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the intent was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and then the engine finishes that launch.
    let late = docker_run_labelled(&[
        (CLUSTER, &k.cluster_id),
        (CONTAINER, &late_id),
        (NODE, &c.node_id),
    ]);
    until("the late container is removed", || !late.exists()).await;
    let removed = stored_events(&k.client, "container.orphan_removed").await;
    let ids: Vec<_> = removed
        .iter()
        .filter_map(|e| e.container_id.clone())
        .collect();
    assert_eq!(ids, vec![late_id], "{removed:?}");
    // The container that was running all along is untouched.
    assert_eq!(k.wait_running(&c.id).await.docker_id, c.docker_id);
    k.client.stop(&c.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

/// With `orphans = "report"` an orphan is left in place and listed on its node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_only_reported_when_configured_so() {
    use kisara_api::labels::{CLUSTER, CONTAINER, NODE};
    let mut k = TestCluster::start_with("[server]\norphans = \"report\"\n").await;
    let node = k.client.list_nodes().await.unwrap().items[0].id.clone();
    k.stop_agent().await;
    let orphan = docker_run_labelled(&[
        (CLUSTER, &k.cluster_id),
        (CONTAINER, &kisara_server::new_id()),
        (NODE, &node),
    ]);
    k.start_agent().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n = k.client.node(&node).await.unwrap();
        if n.unknown_containers.contains(&orphan.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(orphan.exists(), "removed although orphans = \"report\"");
    assert!(stored_events(&k.client, "container.orphan_removed")
        .await
        .is_empty());
    drop(orphan);
    k.assert_clean().await;
    k.stop().await;
}

/// Polls (bounded) until the node has `want` unclaimed spare networks; returns them.
async fn spares(k: &TestCluster, want: usize) -> Vec<kisara_api::Network> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = k
            .client
            .list_networks_filtered(&kisara_api::NetworkFilter {
                node: None,
                all: Some(true),
            })
            .await
            .unwrap()
            .items;
        let s: Vec<_> = all
            .into_iter()
            .filter(|n| n.owned_by.is_none() && n.labels.contains_key(kisara_api::labels::SPARE))
            .collect();
        if s.len() == want {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "warm pool has {} spares, want {want}",
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_pool_hands_out_spare_networks_and_refills() {
    let k = TestCluster::start_with("[server]\nwarm_networks = 2\n").await;
    let before = spares(&k, 2).await;
    // Spares are hidden from the normal list.
    assert!(k.client.list_networks(None).await.unwrap().items.is_empty());
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    let net = c.network.clone().unwrap();
    assert!(
        before.iter().any(|n| n.name == net),
        "{net} was not a spare"
    );
    // The claimed network is the container's own now, and the pool is topped up.
    let owned = k.client.network(&net).await.unwrap();
    assert_eq!(owned.owned_by.as_deref(), Some(c.id.as_str()));
    let after = spares(&k, 2).await;
    assert!(after.iter().all(|n| n.name != net));
    assert!(http_get("127.0.0.1", c.ports[0].public_port)
        .await
        .contains("kisara-test"));
    // Outbound traffic asked for: never a spare (spares have it off).
    let d = k
        .client
        .launch(&LaunchRequest {
            internet: true,
            ..httpd_request()
        })
        .await
        .expect("launch with internet");
    assert_eq!(
        d.network.as_deref(),
        Some(format!("kisara-{}", d.id).as_str())
    );
    assert!(
        k.client
            .network(&format!("kisara-{}", d.id))
            .await
            .unwrap()
            .internet
    );
    // Stop removes the claimed network; it never goes back to the pool.
    k.client.stop(&c.id).await.unwrap();
    k.client.stop(&d.id).await.unwrap();
    assert_eq!(
        k.client.network(&net).await.unwrap_err().status(),
        Some(404)
    );
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_launches_are_settled_on_restart() {
    let k = TestCluster::start_with("[server]\nwarm_networks = 0\n").await;
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    let node_id = c.node_id.clone();
    let stale = ipnet::Ipv4Net::new("10.254.240.0".parse().unwrap(), 24).unwrap();
    // Stage what a server killed mid-launch leaves: (1) a container the node made whose row
    // still says launching, (2) a launch row the node never heard of, from before the crash,
    // (3) a subnet allocated for a network whose row was never written.
    let k = k
        .restart_editing(|store| {
            let mut half = c.clone();
            half.docker_id = String::new();
            half.state = ContainerState::Launching;
            half.ports.clear();
            store.complete_container(&half).unwrap();
            let mut never = c.clone();
            never.id = "deadbeef0001".into();
            never.name = "never-made".into();
            never.docker_id = String::new();
            never.state = ContainerState::Launching;
            never.created_at = 1;
            store.insert_container(&never).unwrap();
            store.reserve_subnet(&stale, "no-such-network").unwrap();
        })
        .await;
    // The container the node has is adopted, with its ports, and still serves.
    let adopted = k.wait_running(&c.id).await;
    assert_eq!(adopted.docker_id, c.docker_id);
    assert_eq!(adopted.ports, c.ports);
    assert_eq!(adopted.node_id, node_id);
    // The launch that never reached the node is dropped, and the orphan subnet released.
    let e = k.client.container("deadbeef0001").await.unwrap_err();
    assert_eq!(e.status(), Some(404));
    let k = k
        .restart_editing(|store| {
            assert!(!store.allocated_subnets().unwrap().contains(&stale));
        })
        .await;
    k.client.stop(&c.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_never_launches_twice() {
    let k = TestCluster::start().await;
    let req = LaunchRequest {
        idempotency_key: Some(format!("retry-{}", k.cluster_id)),
        ..httpd_request()
    };
    let a = k.client.launch(&req).await.expect("first");
    let b = k.client.launch(&req).await.expect("retry");
    assert_eq!(a.id, b.id);
    assert_eq!(a.docker_id, b.docker_id);
    // The header form works too, and finds the same container.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/containers", k.url))
        .bearer_auth(&k.token)
        .header("Idempotency-Key", format!("retry-{}", k.cluster_id))
        .json(&httpd_request())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c: kisara_api::Container = r.json().await.unwrap();
    assert_eq!(c.id, a.id);
    let (cs, _) = k.leftovers().await;
    assert_eq!(cs.len(), 1, "launched more than once");
    k.client.stop(&a.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_past_its_grace_loses_its_containers_once_and_finds_them_again() {
    let mut k =
        TestCluster::start_with("[server]\nheartbeat_interval_secs = 1\nnode_grace_secs = 2\n")
            .await;
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    k.stop_agent().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let x = k.client.container(&c.id).await.unwrap();
        if x.state == ContainerState::Lost {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never lost: {x:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the janitor run a few more rounds: the facts still fire once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lost = stored_events(&k.client, "container.lost,node.down").await;
    assert_eq!(
        lost.iter().filter(|e| e.kind == "container.lost").count(),
        1,
        "{lost:?}"
    );
    assert_eq!(lost.iter().filter(|e| e.kind == "node.down").count(), 1);
    assert!(lost
        .iter()
        .any(|e| e.container_id.as_deref() == Some(c.id.as_str())));
    // The node comes back: its inventory sets the real state again.
    let k = k.restart().await;
    let back = k.client.container(&c.id).await.unwrap();
    assert_eq!(back.state, ContainerState::Running);
    k.client.stop(&c.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}

/// An agent whose process freezes keeps its TCP connection open but says nothing: the server
/// must close the channel after three missed heartbeats, so the disconnect is a fact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_is_disconnected_after_three_heartbeats() {
    use tokio_tungstenite::tungstenite::Message;
    let k =
        TestCluster::start_with("[server]\nheartbeat_interval_secs = 1\nnode_grace_secs = 30\n")
            .await;
    let join = std::fs::read_to_string(k.data_dir.join("join.token")).unwrap();
    let url = format!("{}/v1/agent/connect", k.url.replacen("http://", "ws://", 1));
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let hello = serde_json::json!({
        "type": "hello", "protocol_version": kisara_api::agent::PROTOCOL_VERSION,
        "name": "mute", "join_token": join.trim(), "node_id": null, "credential": null,
        "agent_version": "test",
        "engine": serde_json::to_value(kisara_api::EngineInfo::default()).unwrap(),
        "public_address": "127.0.0.1",
        "labels": {}, "max_containers": 0,
    });
    ws.send(Message::text(hello.to_string())).await.unwrap();
    let welcome = ws.next().await.expect("welcome").expect("welcome");
    assert!(
        welcome.to_text().unwrap().contains("welcome"),
        "{welcome:?}"
    );
    let t0 = tokio::time::Instant::now();
    // Say nothing: the server ends the session (3 s here), not the test's deadline.
    loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break,
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("the server kept a silent agent's channel open"),
        }
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
        "closed after {waited:?}"
    );
    let mute = k.client.node("mute").await.unwrap();
    assert_ne!(mute.state, kisara_api::NodeState::Ready);
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_cluster_leaves_nothing_on_the_engine_after_stop() {
    // Stopped as soon as it is ready: the warm pool is still making its spares (several, so
    // a create is under way in the engine when the agent is told to stop).
    let k = TestCluster::start_with("[server]\nwarm_networks = 6\n").await;
    let runtime = k.runtime.clone();
    let filter = vec![(
        kisara_api::labels::CLUSTER.to_string(),
        k.cluster_id.clone(),
    )];
    k.stop().await;
    // Nothing with the cluster's id is left, and nothing turns up later either (a create the
    // engine was still working on would land after a cleanup that did not wait for it).
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let cs = runtime.list_containers(&filter).await.unwrap();
        let ns = runtime.list_networks(&filter).await.unwrap();
        assert!(cs.is_empty(), "containers left behind: {cs:?}");
        assert!(ns.is_empty(), "networks left behind: {ns:?}");
        if tokio::time::Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_the_store_forgot_are_removed_on_the_next_start() {
    // The store loses its spares while the server is down (what a server stopped between
    // the engine's create and its own write would leave): the next start removes the
    // engine's unknown spares and tops the pool up with known ones.
    let k = TestCluster::start_with("[server]\nwarm_networks = 3\n").await;
    spares(&k, 3).await;
    let forgotten = std::sync::Mutex::new(Vec::new());
    let k = k
        .restart_editing(|store| {
            for n in store.list_networks(None).unwrap() {
                if n.labels.contains_key(kisara_api::labels::SPARE) {
                    store.delete_network(&n.id).unwrap();
                    store.release_subnet(&n.subnet.parse().unwrap()).unwrap();
                    forgotten.lock().unwrap().push(n.id);
                }
            }
        })
        .await;
    let forgotten = forgotten.into_inner().unwrap();
    // (A spare whose create was under way at the stop is forgotten by the stopping server
    // itself; the engine still has it.)
    assert!(
        !forgotten.is_empty(),
        "no spare in the store at the restart"
    );
    let known = spares(&k, 3).await;
    assert!(known.iter().all(|n| !forgotten.contains(&n.id)));
    // Polled: the removal runs when the node's inventory is settled.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (cs, ns) = k.leftovers().await;
        assert!(cs.is_empty(), "{cs:?}");
        if ns.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "unknown networks kept: {ns:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    k.stop().await;
}
