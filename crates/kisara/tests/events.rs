//! Events end to end against the real Docker Engine: each fact exactly once on the SSE stream,
//! resume by Last-Event-ID, signed webhooks with retries, and every SDK hook.
//!
//! "Exactly once" is checked with barriers, never with sleeps: events of one subscriber arrive
//! in id order, and engine events arrive in the engine's order, so once a later fact (the
//! death of a second container, a replay up to a known id) has been seen, a duplicate of an
//! earlier one would have been seen too.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use kisara_agent::{Agent, AgentOptions};
use kisara_api::agent::Secret;
use kisara_client::{
    kinds, Client, ContainerState, CreateWebhookRequest, DeliveryState, Event, EventQuery,
    EventStream, LaunchRequest,
};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

fn query(kinds: &str, since: Option<u64>) -> EventQuery {
    EventQuery {
        kinds: Some(kinds.into()),
        since,
        ..Default::default()
    }
}

/// Reads events until `done` holds for what was read, bounded by [`WAIT`].
async fn read_until(
    stream: &mut EventStream,
    what: &str,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !done(&seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Ok(Some(Ok(e))) => seen.push(e),
            Ok(Some(Err(e))) => panic!("event stream failed while waiting for {what}: {e}"),
            Ok(None) => panic!("event stream ended while waiting for {what}"),
            Err(_) => panic!("timed out waiting for {what}; saw {seen:#?}"),
        }
    }
    seen
}

fn is(e: &Event, kind: &str, container: &str) -> bool {
    e.kind == kind && e.container_id.as_deref() == Some(container)
}

fn kinds_of<'a>(seen: &'a [Event], container: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|e| e.container_id.as_deref() == Some(container))
        .map(|e| e.kind.as_str())
        .collect()
}

/// A container whose command exits at once with `code`.
fn exits(code: i32) -> LaunchRequest {
    LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec!["sh".into(), "-c".into(), format!("exit {code}")]),
        owner: Some("team-ev".into()),
        module: Some("crash".into()),
        ..Default::default()
    }
}

/// Launches a container that exits by itself and waits for its `container.die`: everything
/// the engine reported before that has reached the server by then.
async fn barrier(k: &TestCluster, s: &mut EventStream, code: i32) -> Vec<Event> {
    let b = k.client.launch(&exits(code)).await.expect("launch barrier");
    let seen = read_until(s, "the barrier container's death", |v| {
        v.iter().any(|e| is(e, kinds::CONTAINER_DIE, &b.id))
    })
    .await;
    k.client.stop(&b.id).await.expect("remove barrier");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_and_stop_fire_exactly_once_each() {
    let k = TestCluster::start().await;
    let mut s = k
        .client
        .events(&query("container.", None))
        .await
        .expect("subscribe");
    let before = kisara_server::events::now_ms();
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    k.client.stop(&c.id).await.expect("stop");
    // Stop and remove are both "stop": the second call finds nothing and fires nothing.
    let again = k
        .client
        .remove(&c.id, true)
        .await
        .expect_err("already gone");
    assert!(again.is_not_found(), "{again}");
    let seen = barrier(&k, &mut s, 4).await;

    assert_eq!(
        kinds_of(&seen, &c.id),
        [kinds::CONTAINER_LAUNCH, kinds::CONTAINER_STOP],
        "{seen:#?}"
    );
    let launch = &seen[0];
    assert!(is(launch, kinds::CONTAINER_LAUNCH, &c.id), "{seen:#?}");
    assert_eq!(launch.node_id.as_deref(), Some(c.node_id.as_str()));
    assert_eq!(launch.owner.as_deref(), Some("team1"));
    assert_eq!(launch.module.as_deref(), Some("web1"));
    assert_eq!(launch.data["image"], IMAGE);
    assert_eq!(launch.data["docker_id"], c.docker_id.as_str());
    assert_eq!(launch.data["host_port"], c.host_port.as_str());
    assert!(launch.time >= before, "{} < {before}", launch.time);
    assert!(
        seen.windows(2).all(|w| w[0].id < w[1].id),
        "ids must increase: {seen:#?}"
    );
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_exits_by_itself_dies_exactly_once() {
    let k = TestCluster::start().await;
    let mut s = k
        .client
        .events(&query("container.", None))
        .await
        .expect("subscribe");
    let c = k.client.launch(&exits(3)).await.expect("launch");
    let seen = read_until(&mut s, "container.die", |v| {
        v.iter().any(|e| is(e, kinds::CONTAINER_DIE, &c.id))
    })
    .await;
    let die = seen
        .iter()
        .find(|e| is(e, kinds::CONTAINER_DIE, &c.id))
        .expect("die");
    assert_eq!(die.data["exit_code"], 3, "{die:?}");
    assert_eq!(die.owner.as_deref(), Some("team-ev"));
    assert_eq!(die.node_id.as_deref(), Some(c.node_id.as_str()));
    // It is listed as exited (the engine may take a moment to say so after its event).
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = k
            .client
            .list_containers(&kisara_client::ContainerFilter {
                owner: Some("team-ev".into()),
                ..Default::default()
            })
            .await
            .expect("list");
        let mine = listed.items.iter().find(|x| x.id == c.id).expect("listed");
        if mine.state == ContainerState::Exited {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never listed as exited: {mine:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Stopping it (Kisara's request) is a stop, not a second death.
    k.client.stop(&c.id).await.expect("stop");
    let mut all = seen;
    all.extend(barrier(&k, &mut s, 5).await);
    assert_eq!(
        kinds_of(&all, &c.id),
        [
            kinds::CONTAINER_LAUNCH,
            kinds::CONTAINER_DIE,
            kinds::CONTAINER_STOP
        ],
        "{all:#?}"
    );
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_connect_and_disconnect_fire_once_and_heartbeats_only_on_request() {
    let mut k =
        TestCluster::start_with("[server]\nheartbeat_interval_secs = 1\nnode_grace_secs = 3\n")
            .await;
    let node = k.client.list_nodes().await.expect("nodes").items[0]
        .id
        .clone();
    let mut beats = k
        .client
        .events(&query(kinds::NODE_HEARTBEAT, None))
        .await
        .expect("subscribe");
    // From the beginning: the connect of the running session is replayed.
    let mut nodes = k
        .client
        .events(&query("node.", Some(0)))
        .await
        .expect("subscribe");
    let hb = read_until(&mut beats, "heartbeats", |v| v.len() >= 2).await;
    for b in &hb {
        assert_eq!(b.kind, kinds::NODE_HEARTBEAT);
        assert_eq!(b.id, 0, "heartbeats are not stored");
        assert_eq!(b.node_id.as_deref(), Some(node.as_str()));
        assert!(b.data.is_object(), "{b:?}");
    }
    k.stop_agent().await;
    let seen = read_until(&mut nodes, "node.disconnect", |v| {
        v.iter().any(|e| e.kind == kinds::NODE_DISCONNECT)
    })
    .await;
    // Heartbeats were sent before the disconnect; a subscriber that did not ask has none.
    let got: Vec<&str> = seen.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        got,
        [kinds::NODE_CONNECT, kinds::NODE_DISCONNECT],
        "{seen:#?}"
    );
    assert!(seen
        .iter()
        .all(|e| e.node_id.as_deref() == Some(node.as_str())));
    assert_eq!(seen[0].data["name"], "local");
    k.stop().await;
}

/// A busy engine (its status query hangs) must not make its node look unreachable: the
/// agent's heartbeats keep coming on time, with the last known status marked stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_engine_is_slow_to_answer_keeps_beating_with_stale_status() {
    let k =
        TestCluster::start_with("[server]\nheartbeat_interval_secs = 1\nnode_grace_secs = 30\n")
            .await;
    let mut beats = k
        .client
        .events(&query(kinds::NODE_HEARTBEAT, None))
        .await
        .expect("subscribe");
    let hollow = Arc::new(kisara_runtime::hollow::HollowRuntime::new().with_resources(3, 3 << 30));
    let (stop, task) = extra_agent_on(&k, "slow", hollow.clone());
    let fresh = read_until(&mut beats, "a heartbeat of the hollow node", |v| {
        v.iter().any(|e| e.data["cpus"] == 3)
    })
    .await;
    let node = fresh
        .iter()
        .find(|e| e.data["cpus"] == 3)
        .and_then(|e| e.node_id.clone())
        .expect("node id");
    hollow.set_status_delay(Duration::from_secs(120));
    // Well past the server's silence limit (three intervals): every beat still arrives.
    let seen = read_until(&mut beats, "five stale heartbeats", |v| {
        v.iter()
            .filter(|e| e.node_id.as_deref() == Some(node.as_str()) && e.data["stale"] == true)
            .count()
            >= 5
    })
    .await;
    for e in seen
        .iter()
        .filter(|e| e.node_id.as_deref() == Some(node.as_str()) && e.data["stale"] == true)
    {
        assert_eq!(e.data["cpus"], 3, "not the last known status: {e:?}");
    }
    let n = k.client.node(&node).await.expect("node");
    assert_eq!(n.state, kisara_api::NodeState::Ready, "{n:?}");
    stop.cancel();
    let _ = task.await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_by_last_event_id_yields_exactly_the_events_after_it() {
    let k = TestCluster::start().await;
    let mut s = k
        .client
        .events(&query("container.", None))
        .await
        .expect("subscribe");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let c = k.client.launch(&httpd_request()).await.expect("launch");
        k.client.stop(&c.id).await.expect("stop");
        let seen = read_until(&mut s, "stop", |v| {
            v.iter().any(|e| is(e, kinds::CONTAINER_STOP, &c.id))
        })
        .await;
        ids.extend(seen.iter().map(|e| e.id));
    }
    assert_eq!(ids.len(), 4, "{ids:?}");

    // Raw SSE with the header, as a browser's EventSource would reconnect.
    let http = reqwest::Client::new();
    let resp = http
        .get(format!("{}/v1/events?kinds=container.", k.url))
        .bearer_auth(&k.token)
        .header("Last-Event-ID", ids[1].to_string())
        .send()
        .await
        .expect("sse");
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream")));
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let want_last = format!("id: {}\n", ids[3]);
    let deadline = Instant::now() + WAIT;
    while !text.contains(&want_last) {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, body.next())
            .await
            .expect("timed out reading the replay")
            .expect("body open")
            .expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let replayed: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Event>(d).expect("event json").id)
        .collect();
    assert_eq!(replayed, ids[2..], "{text}");
    assert!(
        text.starts_with(&format!("id: {}\n\n", ids[1])),
        "the stream opens with its position: {text}"
    );

    // The same through the SDK's `since`.
    let mut again = k
        .client
        .events(&query("container.", Some(ids[1])))
        .await
        .expect("subscribe");
    let seen = read_until(&mut again, "replay", |v| v.len() >= 2).await;
    assert_eq!(seen.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);

    // A resume position that is not an id is refused.
    let bad = http
        .get(format!("{}/v1/events", k.url))
        .bearer_auth(&k.token)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .expect("request");
    assert_eq!(bad.status(), 400);
    let bad = k
        .client
        .events(&query("Container!", None))
        .await
        .expect_err("bad kind");
    assert_eq!(bad.status(), Some(400));

    // Ids are durable: after a restart the same events replay with the same ids, and new
    // ones continue above them.
    drop((s, again));
    let k = k.restart().await;
    let mut after = k
        .client
        .events(&query("*", Some(ids[0] - 1)))
        .await
        .expect("subscribe");
    let seen = read_until(&mut after, "replay after restart", |v| {
        v.iter().any(|e| e.id > ids[3])
    })
    .await;
    let stored: Vec<u64> = seen
        .iter()
        .map(|e| e.id)
        .filter(|id| *id <= ids[3])
        .collect();
    assert_eq!(stored, ids);
    k.stop().await;
}

// ---- webhooks ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Hit {
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
    at: Instant,
}

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// How many requests fail (500) before the receiver starts answering 200.
    fail_first: usize,
}

/// A webhook receiver on 127.0.0.1:0 (never anything but loopback).
async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Hit>>>) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    async fn hook(
        State(r): State<Receiver>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let mut hits = r.hits.lock().unwrap();
        hits.push(Hit {
            headers,
            body,
            at: Instant::now(),
        });
        if hits.len() <= r.fail_first {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
    }
    let r = Receiver {
        fail_first,
        ..Default::default()
    };
    let hits = r.hits.clone();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), hits)
}

async fn wait_hits(hits: &Arc<Mutex<Vec<Hit>>>, n: usize) -> Vec<Hit> {
    let deadline = Instant::now() + WAIT;
    loop {
        let h = hits.lock().unwrap().clone();
        if h.len() >= n {
            return h;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} deliveries",
            h.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn header<'a>(h: &'a Hit, name: &str) -> &'a str {
    h.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_in_order_and_visible() {
    let k = TestCluster::start().await;
    let (url, hits) = receiver(2).await;
    let secret = "correct horse battery staple";
    let hook = k
        .client
        .create_webhook(&CreateWebhookRequest {
            url: url.clone(),
            secret: secret.into(),
            kinds: vec![kinds::CONTAINER_LAUNCH.into()],
            max_attempts: Some(5),
        })
        .await
        .expect("register");
    assert_eq!(hook.secret, "********");

    let c = k.client.launch(&httpd_request()).await.expect("launch");
    // 500, 500, then 200.
    let got = wait_hits(&hits, 3).await;
    for h in &got {
        assert_eq!(header(h, "x-kisara-signature"), hmac_hex(secret, &h.body));
        assert_eq!(header(h, "x-kisara-event"), kinds::CONTAINER_LAUNCH);
        assert_eq!(
            header(h, "x-kisara-delivery"),
            header(&got[0], "x-kisara-delivery")
        );
        assert_eq!(h.body, got[0].body, "every retry sends the same body");
        let ev: Event = serde_json::from_slice(&h.body).expect("event json");
        assert_eq!(ev.container_id.as_deref(), Some(c.id.as_str()));
        assert_eq!(header(h, "x-kisara-event-id"), ev.id.to_string());
    }
    // Backoff: about 1 s, then about 2 s.
    assert!(got[1].at - got[0].at >= Duration::from_millis(900));
    assert!(got[2].at - got[1].at >= Duration::from_millis(1900));

    // The deliveries say so.
    let deadline = Instant::now() + WAIT;
    let d = loop {
        let ds = k
            .client
            .webhook_deliveries(&hook.id)
            .await
            .expect("deliveries");
        if ds
            .first()
            .is_some_and(|d| d.state == DeliveryState::Delivered)
        {
            break ds;
        }
        assert!(Instant::now() < deadline, "never marked delivered: {ds:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].attempts, 3);
    let codes: Vec<Option<u16>> = d[0].history.iter().map(|a| a.status_code).collect();
    assert_eq!(codes, [Some(500), Some(500), Some(200)]);
    let listed = k.client.list_webhooks().await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].delivered, listed[0].pending), (1, 0));
    let raw = reqwest::Client::new()
        .get(format!("{}/v1/webhooks", k.url))
        .bearer_auth(&k.token)
        .send()
        .await
        .expect("list")
        .text()
        .await
        .expect("body");
    assert!(!raw.contains(secret), "the secret leaked: {raw}");

    // Only the kinds asked for: the stop is not sent, the next launch is (in order).
    k.client.stop(&c.id).await.expect("stop");
    let c2 = k.client.launch(&httpd_request()).await.expect("launch");
    let got = wait_hits(&hits, 4).await;
    let ev: Event = serde_json::from_slice(&got[3].body).expect("event json");
    assert_eq!(
        (ev.kind.as_str(), ev.container_id.as_deref()),
        (kinds::CONTAINER_LAUNCH, Some(c2.id.as_str()))
    );
    k.client.stop(&c2.id).await.expect("stop");

    k.client.remove_webhook(&hook.id).await.expect("delete");
    assert!(k.client.list_webhooks().await.expect("list").is_empty());
    let gone = k
        .client
        .webhook_deliveries(&hook.id)
        .await
        .expect_err("gone");
    assert!(gone.is_not_found());
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_never_answers_well_gives_up_and_says_why() {
    let k = TestCluster::start().await;
    // A receiver that always fails, and a port where nothing listens.
    let (url, hits) = receiver(usize::MAX).await;
    let failing = k
        .client
        .create_webhook(&CreateWebhookRequest {
            url,
            secret: "s".into(),
            kinds: vec!["container.".into()],
            max_attempts: Some(2),
        })
        .await
        .expect("register");
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead_url = format!("http://{}/", closed.local_addr().expect("addr"));
    drop(closed);
    let dead = k
        .client
        .create_webhook(&CreateWebhookRequest {
            url: dead_url,
            secret: "s".into(),
            kinds: vec![kinds::CONTAINER_LAUNCH.into()],
            max_attempts: Some(1),
        })
        .await
        .expect("register");
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    wait_hits(&hits, 2).await;
    for (id, attempts) in [(&failing.id, 2), (&dead.id, 1)] {
        let deadline = Instant::now() + WAIT;
        let d = loop {
            let ds = k.client.webhook_deliveries(id).await.expect("deliveries");
            if ds.iter().any(|d| d.state == DeliveryState::Failed) {
                break ds;
            }
            assert!(Instant::now() < deadline, "never failed: {ds:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let f = d
            .iter()
            .find(|d| d.state == DeliveryState::Failed)
            .expect("failed");
        assert_eq!(f.attempts, attempts);
        assert_eq!(f.history.len(), attempts as usize);
        let last = f.history.last().expect("an attempt");
        if id == &dead.id {
            assert_eq!(last.status_code, None);
            assert!(
                last.error.as_deref().is_some_and(|e| !e.is_empty()),
                "{last:?}"
            );
        } else {
            assert_eq!(last.status_code, Some(500));
        }
    }
    k.client.stop(&c.id).await.expect("stop");

    // Bad registrations are refused.
    for (url, secret, kinds) in [
        ("https://127.0.0.1:1/", "s", vec![]),
        ("ftp://127.0.0.1/", "s", vec![]),
        ("http://user:pw@127.0.0.1:1/", "s", vec![]),
        ("http://127.0.0.1:1/", "", vec![]),
        ("http://127.0.0.1:1/", "s", vec!["Container*".to_string()]),
    ] {
        let e = k
            .client
            .create_webhook(&CreateWebhookRequest {
                url: url.into(),
                secret: secret.into(),
                kinds,
                max_attempts: None,
            })
            .await
            .expect_err(url);
        assert_eq!(e.status(), Some(400), "{url}: {e}");
    }
    k.stop().await;
}

// ---- SDK hooks ---------------------------------------------------------------------------

type Log = Arc<Mutex<Vec<(&'static str, Event)>>>;

fn recorder(log: &Log, name: &'static str) -> impl Fn(&Event) + Send + Sync + 'static {
    let log = log.clone();
    move |e: &Event| log.lock().unwrap().push((name, e.clone()))
}

async fn wait_log(log: &Log, what: &str, pred: impl Fn(&(&'static str, Event)) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if log.lock().unwrap().iter().any(&pred) {
            return;
        }
        assert!(Instant::now() < deadline, "hook never fired: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Another agent on the same engine, joining as its own node.
fn extra_agent(k: &TestCluster, name: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    extra_agent_on(k, name, k.runtime.clone())
}

/// Another agent, on the engine `runtime`, joining as its own node.
fn extra_agent_on(
    k: &TestCluster,
    name: &str,
    runtime: Arc<dyn kisara_runtime::Runtime>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let join = std::fs::read_to_string(k.data_dir.join(kisara_server::JOIN_TOKEN_FILE))
        .expect("join token");
    let agent = Agent::new(
        runtime,
        AgentOptions {
            server_url: k.url.clone(),
            name: name.into(),
            join_token: Some(Secret(join.trim().to_string())),
            state_dir: k.data_dir.join(format!("agent-{name}")),
            public_address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            max_containers: 0,
        },
    );
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let _ = agent.run(s).await;
    });
    (stop, task)
}

fn count(log: &Log, name: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n == name)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sdk_hook_fires_and_stops_firing_after_unset() {
    let k = TestCluster::start_with("[server]\nheartbeat_interval_secs = 1\nnode_grace_secs = 3\n")
        .await;
    let mut s = k.client.events(&query("*", None)).await.expect("subscribe");
    let hooks = k.client.hooks().await.expect("hooks");
    let log: Log = Default::default();
    hooks.on_node_connect(recorder(&log, "connect"));
    hooks.on_node_disconnect(recorder(&log, "disconnect"));
    let beat = hooks.on_node_heartbeat(recorder(&log, "heartbeat"));
    hooks.on_container_launch(recorder(&log, "launch"));
    let stop = hooks.on_container_stop(recorder(&log, "stop"));
    hooks.on_container_die(recorder(&log, "die"));

    wait_log(&log, "node.heartbeat", |(n, _)| *n == "heartbeat").await;

    let c = k.client.launch(&httpd_request()).await.expect("launch");
    wait_log(&log, "container.launch", |(n, e)| {
        *n == "launch" && e.container_id.as_deref() == Some(c.id.as_str())
    })
    .await;
    k.client.stop(&c.id).await.expect("stop");
    wait_log(&log, "container.stop", |(n, e)| {
        *n == "stop" && e.container_id.as_deref() == Some(c.id.as_str())
    })
    .await;

    let d = k.client.launch(&exits(3)).await.expect("launch");
    wait_log(&log, "container.die", |(n, e)| {
        *n == "die" && e.container_id.as_deref() == Some(d.id.as_str())
    })
    .await;
    k.client.stop(&d.id).await.expect("stop");

    let (second, task) = extra_agent(&k, "second");
    wait_log(&log, "node.connect", |(n, e)| {
        *n == "connect" && e.data["name"] == "second"
    })
    .await;
    let second_id = log
        .lock()
        .unwrap()
        .iter()
        .find(|(n, e)| *n == "connect" && e.data["name"] == "second")
        .and_then(|(_, e)| e.node_id.clone())
        .expect("node id");
    second.cancel();
    let _ = task.await;
    wait_log(&log, "node.disconnect", |(n, e)| {
        *n == "disconnect" && e.node_id.as_deref() == Some(second_id.as_str())
    })
    .await;

    // Unset every one, each way.
    assert!(beat.unset());
    assert!(stop.unset());
    assert!(hooks.unset_container_launch());
    assert!(hooks.unset_container_die());
    assert!(hooks.unset_node_connect());
    assert!(hooks.unset_node_disconnect());
    assert!(!hooks.unset_container_launch(), "already unset");
    let counts: Vec<usize> = [
        "heartbeat",
        "stop",
        "launch",
        "die",
        "connect",
        "disconnect",
    ]
    .iter()
    .map(|n| count(&log, n))
    .collect();

    // Make every kind happen again, seen on an independent stream first.
    let (third, task) = extra_agent(&k, "third");
    read_until(&mut s, "third connects", |v| {
        v.iter()
            .any(|e| e.kind == kinds::NODE_CONNECT && e.data["name"] == "third")
    })
    .await;
    third.cancel();
    let _ = task.await;
    read_until(&mut s, "third disconnects", |v| {
        v.iter().any(|e| e.kind == kinds::NODE_DISCONNECT)
    })
    .await;
    let d = k.client.launch(&exits(4)).await.expect("launch");
    read_until(&mut s, "die", |v| {
        v.iter().any(|e| is(e, kinds::CONTAINER_DIE, &d.id))
    })
    .await;
    k.client.stop(&d.id).await.expect("stop");
    let mut beats = k
        .client
        .events(&query(kinds::NODE_HEARTBEAT, None))
        .await
        .expect("subscribe");
    read_until(&mut beats, "heartbeats after unset", |v| v.len() >= 2).await;

    // Barrier: a new hook on a kind after all of the above; hooks run in event order.
    hooks.on(kinds::CONTAINER_STOP, recorder(&log, "barrier"));
    let c = k.client.launch(&httpd_request()).await.expect("launch");
    k.client.stop(&c.id).await.expect("stop");
    wait_log(&log, "barrier", |(n, e)| {
        *n == "barrier" && e.container_id.as_deref() == Some(c.id.as_str())
    })
    .await;
    let after: Vec<usize> = [
        "heartbeat",
        "stop",
        "launch",
        "die",
        "connect",
        "disconnect",
    ]
    .iter()
    .map(|n| count(&log, n))
    .collect();
    assert_eq!(after, counts, "a hook fired after it was unset");
    drop(hooks);
    k.stop().await;
}

/// `service.start` and `service.stop` come from services (issue #4); the hooks for them are
/// proved here on events the bus carries like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_hooks_fire_for_service_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        kisara_server::Server::open(Default::default(), dir.path().to_path_buf()).expect("server");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let task = tokio::spawn(
        server
            .clone()
            .run(listener, async move { s.cancelled().await }),
    );
    let token = server.state().admin_token().expose().to_string();
    let client = Client::new(&url, Some(token)).expect("client");

    let hooks = client.hooks().await.expect("hooks");
    let log: Log = Default::default();
    hooks.on_service_start(recorder(&log, "start"));
    let h = hooks.on_service_stop(recorder(&log, "stop"));
    hooks.on_instance_expired(recorder(&log, "expired"));
    let emit = |kind: &str, svc: &str| {
        server.state().events.emit(
            Event {
                id: 0,
                kind: kind.into(),
                time: kisara_server::events::now_ms(),
                node_id: None,
                container_id: None,
                owner: Some("team1".into()),
                module: Some(svc.into()),
                data: serde_json::json!({ "service": svc }),
            },
            None,
        )
    };
    emit(kinds::SERVICE_START, "s1").expect("stored");
    emit(kinds::SERVICE_STOP, "s1").expect("stored");
    emit(kinds::INSTANCE_EXPIRED, "s1").expect("stored");
    wait_log(&log, "service.start", |(n, _)| *n == "start").await;
    wait_log(&log, "service.stop", |(n, _)| *n == "stop").await;
    wait_log(&log, "instance.expired", |(n, _)| *n == "expired").await;

    assert!(h.unset());
    assert!(hooks.unset_service_start());
    emit(kinds::SERVICE_START, "s2").expect("stored");
    emit(kinds::SERVICE_STOP, "s2").expect("stored");
    emit(kinds::INSTANCE_EXPIRED, "s2").expect("stored");
    wait_log(&log, "instance.expired s2", |(n, e)| {
        *n == "expired" && e.module.as_deref() == Some("s2")
    })
    .await;
    assert_eq!((count(&log, "start"), count(&log, "stop")), (1, 1));
    drop(hooks);
    shutdown.cancel();
    let _ = task.await;
}

// ---- CLI ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kisara_events_streams_lines_until_stopped() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let k = TestCluster::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kisara"))
        .args([
            "events",
            "--kind",
            "container.launch",
            "--json",
            "--url",
            &k.url,
        ])
        .env("KISARA_TOKEN", &k.token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kisara events");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut human = tokio::process::Command::new(env!("CARGO_BIN_EXE_kisara"))
        .args(["events", "--kind", "container.", "--url", &k.url])
        .env("KISARA_TOKEN", &k.token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kisara events");
    let mut human_lines = BufReader::new(human.stdout.take().expect("stdout")).lines();

    // The CLI is subscribed once the server counts it; launch until its line shows up
    // (bounded), since a launch before it subscribed is rightly not shown.
    let deadline = Instant::now() + WAIT;
    let mut launched = Vec::new();
    let event = loop {
        assert!(Instant::now() < deadline, "kisara events printed nothing");
        let c = k.client.launch(&httpd_request()).await.expect("launch");
        launched.push(c.id.clone());
        if let Ok(line) = tokio::time::timeout(Duration::from_secs(2), lines.next_line()).await {
            let line = line.expect("read").expect("a line");
            break serde_json::from_str::<Event>(&line).expect("a JSON event per line");
        }
    };
    assert_eq!(event.kind, kinds::CONTAINER_LAUNCH);
    assert!(launched.contains(&event.container_id.clone().unwrap_or_default()));
    let line = tokio::time::timeout(WAIT, human_lines.next_line())
        .await
        .expect("a human line")
        .expect("read")
        .expect("a line");
    assert!(
        line.contains("container.launch") && line.contains("owner=team1"),
        "{line}"
    );

    // Ctrl-C ends it with status 0.
    let pid = child.id().expect("pid").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits after SIGINT")
        .expect("wait");
    assert!(status.success(), "{status:?}");
    for id in launched {
        k.client.stop(&id).await.expect("stop");
    }
    k.stop().await;
}
