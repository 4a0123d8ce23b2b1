//! Bad input gets a clear error with the right status, and leaves nothing behind.

mod common;

use common::*;
use kisara_api::{CreateNetworkRequest, ErrorBody, LaunchRequest};

fn sleeper() -> LaunchRequest {
    LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec!["sleep".into(), "300".into()]),
        ..Default::default()
    }
}

/// Asserts an API error's status and that its message mentions `needle`.
fn expect_err(r: Result<impl std::fmt::Debug, kisara_client::Error>, status: u16, needle: &str) {
    let e = r.expect_err("should fail");
    assert_eq!(e.status(), Some(status), "{e}");
    assert!(
        e.to_string()
            .to_lowercase()
            .contains(&needle.to_lowercase()),
        "error {e} does not mention {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_launches_are_refused_and_leave_nothing() {
    let k = TestCluster::start().await;
    let c = &k.client;
    expect_err(
        c.launch(&LaunchRequest {
            image: "Bad Image!!".into(),
            ..sleeper()
        })
        .await,
        400,
        "Bad Image!!",
    );
    expect_err(
        c.launch(&LaunchRequest {
            image: "kisara-test/does-not-exist:nope".into(),
            ..sleeper()
        })
        .await,
        404,
        "does-not-exist",
    );
    expect_err(
        c.launch(&LaunchRequest {
            ports: vec!["80/sctp".into()],
            ..sleeper()
        })
        .await,
        400,
        "80/sctp",
    );
    expect_err(
        c.launch(&LaunchRequest {
            port_protocol: Some("99999/tcp".into()),
            ..sleeper()
        })
        .await,
        400,
        "99999",
    );
    expect_err(
        c.launch(&LaunchRequest {
            network: Some("no-such-net".into()),
            ..sleeper()
        })
        .await,
        404,
        "no-such-net",
    );
    expect_err(
        c.launch(&LaunchRequest {
            privileged: true,
            ..sleeper()
        })
        .await,
        403,
        "privileged",
    );
    expect_err(
        c.launch(&LaunchRequest {
            binds: vec!["/etc:/host-etc".into()],
            ..sleeper()
        })
        .await,
        403,
        "bind",
    );
    expect_err(
        c.launch(&LaunchRequest {
            node: Some("no-such-node".into()),
            ..sleeper()
        })
        .await,
        404,
        "no-such-node",
    );
    // The failed launch of a missing image made and removed a network: nothing is left, and
    // the store has no record of any of it.
    k.assert_clean().await;
    assert!(c
        .list_containers(&Default::default())
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(c.list_networks(None).await.unwrap().items.is_empty());
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_networks_are_refused() {
    let k = TestCluster::start().await;
    let c = &k.client;
    let net = |subnet: &str| CreateNetworkRequest {
        name: format!("n-{}", &k.cluster_id[..6]),
        subnet: Some(subnet.into()),
        ..Default::default()
    };
    expect_err(
        c.create_network(&net("10.300.0.0/24")).await,
        400,
        "10.300.0.0/24",
    );
    expect_err(
        c.create_network(&net("10.250.0.1/24")).await,
        400,
        "host bits",
    );
    expect_err(c.create_network(&net("8.8.8.0/24")).await, 400, "private");
    expect_err(
        c.create_network(&CreateNetworkRequest {
            name: "bad name".into(),
            ..Default::default()
        })
        .await,
        400,
        "bad name",
    );
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_exhaustion_is_409_and_release_reuses() {
    // A pool of exactly two /24s, in a range no other test uses.
    let k = TestCluster::start_with("[server]\nsubnet_pool = [\"10.254.[250-251].0/24\"]\n").await;
    let c = &k.client;
    let a = c.launch(&sleeper()).await.expect("first");
    let b = c.launch(&sleeper()).await.expect("second");
    expect_err(c.launch(&sleeper()).await, 409, "pool");
    k.client.stop(&a.id).await.unwrap();
    let d = c
        .launch(&sleeper())
        .await
        .expect("released subnet is reused");
    for id in [&b.id, &d.id] {
        c.stop(id).await.unwrap();
    }
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_and_malformed_json() {
    let k = TestCluster::start().await;
    let http = reqwest::Client::new();
    // No token, wrong token: 401 with the error shape.
    let r = http
        .get(format!("{}/v1/containers", k.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, "unauthorized");
    let r = http
        .get(format!("{}/v1/nodes", k.url))
        .bearer_auth("ksa_wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Health needs no token.
    let r = http.get(format!("{}/healthz", k.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Malformed JSON and unknown fields: 400 naming the problem.
    let r = http
        .post(format!("{}/v1/containers", k.url))
        .bearer_auth(&k.token)
        .header("content-type", "application/json")
        .body("{\"image\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: ErrorBody = r.json().await.unwrap();
    assert_eq!(body.error.code, "bad_request");
    let r = http
        .post(format!("{}/v1/containers", k.url))
        .bearer_auth(&k.token)
        .json(&serde_json::json!({"image": IMAGE, "imgae": "typo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: ErrorBody = r.json().await.unwrap();
    assert!(
        body.error.message.contains("imgae"),
        "{}",
        body.error.message
    );
    // The OpenAPI document describes the routes.
    let spec = k.client.openapi().await.unwrap();
    for path in [
        "/v1/containers",
        "/v1/containers/{id}/exec",
        "/v1/networks",
        "/v1/nodes",
        "/v1/images/{reference}",
    ] {
        assert!(spec["paths"].get(path).is_some(), "openapi lacks {path}");
    }
    let paths = spec["paths"].as_object().unwrap();
    assert!(
        paths.keys().all(|k| !k.contains("{*")),
        "axum-only path syntax leaked into the OpenAPI document"
    );
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_images_and_networks() {
    let k = TestCluster::start().await;
    let c = &k.client;
    let nodes = c.list_nodes().await.unwrap();
    assert_eq!(nodes.items.len(), 1);
    let n = &nodes.items[0];
    assert_eq!(n.name, "local");
    assert!(n.engine.cpus > 0 && n.engine.memory_total > 0, "{n:?}");
    assert_eq!(c.node("local").await.unwrap().id, n.id);
    expect_err(c.node("nope").await, 404, "nope");

    let images = c.list_images(None).await.unwrap();
    assert!(
        images
            .items
            .iter()
            .any(|i| i.tags.iter().any(|t| t == IMAGE) && i.node_id == n.id),
        "test image not listed"
    );

    // Pool and explicit subnets; list, inspect, remove.
    let a = c
        .create_network(&CreateNetworkRequest {
            name: format!("a-{}", &k.cluster_id[..6]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(a.from_pool);
    let b = c
        .create_network(&CreateNetworkRequest {
            name: format!("b-{}", &k.cluster_id[..6]),
            subnet: Some("192.168.251.0/24".into()),
            internal: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(b.subnet, "192.168.251.0/24");
    assert!(b.internal && !b.from_pool);
    expect_err(
        c.create_network(&CreateNetworkRequest {
            name: format!("c-{}", &k.cluster_id[..6]),
            subnet: Some("192.168.251.0/25".into()),
            ..Default::default()
        })
        .await,
        409,
        "192.168.251",
    );
    expect_err(
        c.create_network(&CreateNetworkRequest {
            name: a.name.clone(),
            ..Default::default()
        })
        .await,
        409,
        &a.name,
    );
    assert_eq!(c.list_networks(None).await.unwrap().items.len(), 2);
    assert_eq!(c.network(&a.name).await.unwrap().id, a.id);
    c.remove_network(&a.id).await.unwrap();
    c.remove_network(&b.name).await.unwrap();
    expect_err(c.remove_network(&a.id).await, 404, &a.id);
    k.assert_clean().await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_nodes_placements_failures_and_latency() {
    let k = TestCluster::start().await;
    let http = reqwest::Client::new();
    let scrape = || async {
        let r = http
            .get(format!("{}/metrics", k.url))
            .bearer_auth(&k.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    };
    // Like every route but /healthz, metrics need the token.
    let r = http.get(format!("{}/metrics", k.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let c = k.client.launch(&sleeper()).await.expect("launch");
    expect_err(
        k.client
            .launch(&LaunchRequest {
                node: Some("no-such-node".into()),
                ..sleeper()
            })
            .await,
        404,
        "no-such-node",
    );
    let text = scrape().await;
    assert!(text.contains("kisara_nodes{state=\"ready\"} 1"), "{text}");
    assert!(text.contains("kisara_placements_total 1"), "{text}");
    assert!(
        text.contains("kisara_placement_failures_total{code=\"not_found\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "kisara_containers{{node=\"{}\",state=\"running\"}} 1",
            c.node_id
        )),
        "{text}"
    );
    assert!(
        text.contains("kisara_http_request_duration_seconds_count{method=\"POST\",route=\"/v1/containers\",status=\"201\"} 1"),
        "{text}"
    );
    k.client.stop(&c.id).await.unwrap();
    k.assert_clean().await;
    k.stop().await;
}
