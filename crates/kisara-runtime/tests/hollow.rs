//! Behaviour of the hollow runtime beyond the shared conformance suite: its fake allocations,
//! image handling, and that it stays cheap at benchmark scale.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use futures::StreamExt;
use kisara_api::agent::{ContainerConfig, NetworkConfig};
use kisara_api::{PortSpec, Protocol};
use kisara_runtime::hollow::{HollowRuntime, FIRST_HOST_PORT};
use kisara_runtime::{Runtime, RuntimeError};

const IMAGE: &str = "kisara-test/busybox:latest";

fn config(name: &str) -> ContainerConfig {
    ContainerConfig {
        name: name.to_string(),
        image: IMAGE.to_string(),
        cmd: Some(vec!["httpd".into(), "-f".into(), "-p".into(), "80".into()]),
        labels: BTreeMap::from([("io.kisara.cluster".to_string(), "bench".to_string())]),
        ports: vec![PortSpec {
            port: 80,
            protocol: Protocol::Tcp,
        }],
        publish_host_ip: "0.0.0.0".to_string(),
        ..Default::default()
    }
}

#[tokio::test]
async fn ports_count_up_from_40000_and_addresses_come_from_the_subnet() {
    let rt = HollowRuntime::new().with_images(&[IMAGE]);
    rt.create_network(&NetworkConfig {
        name: "n1".into(),
        subnet: "10.213.200.0/24".into(),
        gateway: Some("10.213.200.1".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut ports = HashSet::new();
    let mut ips = HashSet::new();
    for i in 0..10 {
        let mut c = config(&format!("c{i}"));
        c.network = Some("n1".into());
        let c = rt.launch(&c).await.unwrap();
        let port = c.published[0].host_port;
        assert!(port >= FIRST_HOST_PORT);
        assert!(ports.insert(port));
        let ip = c.ip_address.unwrap();
        assert!(
            ip.starts_with("10.213.200.") && ip != "10.213.200.1",
            "{ip}"
        );
        assert!(ips.insert(ip));
    }
    assert!(ports.contains(&FIRST_HOST_PORT));
    // Default bridge when no network is named, as Docker.
    let c = rt.launch(&config("onbridge")).await.unwrap();
    assert_eq!(c.network.as_deref(), Some("bridge"));
    assert!(c.ip_address.unwrap().starts_with("172.17."));
    let bad = rt
        .create_network(&NetworkConfig {
            name: "n2".into(),
            subnet: "not-a-subnet".into(),
            ..Default::default()
        })
        .await;
    assert!(matches!(bad, Err(RuntimeError::BadRequest(_))), "{bad:?}");
    let predefined = rt.remove_network("bridge").await;
    assert!(
        matches!(predefined, Err(RuntimeError::BadRequest(_))),
        "{predefined:?}"
    );
}

#[tokio::test]
async fn pulled_images_can_be_launched_and_removed() {
    let rt = HollowRuntime::new();
    let missing = rt.launch(&config("ca")).await;
    assert!(
        matches!(missing, Err(RuntimeError::NotFound(_))),
        "{missing:?}"
    );
    let progress: Vec<_> = rt.pull_image("kisara-test/busybox").collect().await;
    assert!(progress.iter().all(|p| p.is_ok()), "{progress:?}");
    let c = rt.launch(&config("ca")).await.unwrap();
    let in_use = rt.remove_image(IMAGE, true).await;
    assert!(
        matches!(in_use, Err(RuntimeError::Conflict(_))),
        "{in_use:?}"
    );
    rt.remove(&c.docker_id, true).await.unwrap();
    rt.remove_image(IMAGE, false).await.unwrap();
    assert!(rt.list_images().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_thousand_runtimes_hold_a_hundred_thousand_containers() {
    let runtimes: Vec<HollowRuntime> = (0..1000)
        .map(|i| {
            HollowRuntime::new()
                .with_images(&[IMAGE])
                .with_hostname(format!("node-{i}"))
        })
        .collect();
    let started = Instant::now();
    for (n, rt) in runtimes.iter().enumerate() {
        for i in 0..100 {
            rt.launch(&config(&format!("c-{n}-{i}"))).await.unwrap();
        }
    }
    let elapsed = started.elapsed();
    let total: usize = runtimes.iter().map(|r| r.container_count()).sum();
    assert_eq!(total, 100_000);
    let st = runtimes[0]
        .status(&vec![("io.kisara.cluster".into(), "bench".into())])
        .await
        .unwrap();
    assert_eq!(st.containers, 100);
    // Generous even for an unoptimized build on a busy machine; a regression to per-container
    // tasks or global scans would blow well past it.
    assert!(elapsed.as_secs() < 30, "100,000 launches took {elapsed:?}");
    eprintln!("100,000 hollow launches in {elapsed:?}");
}
