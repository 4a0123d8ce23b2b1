//! Events: a resumable stream, SDK hooks, and webhook management.
//!
//! [`Client::events`] follows `GET /v1/events` (Server-Sent Events). When the connection drops
//! (a server restart, a proxy timeout) the stream reconnects by itself with backoff and resumes
//! with `Last-Event-ID`, so no stored event is missed or seen twice; it ends only when dropped,
//! or with an error when the server refuses the request (a bad filter, a wrong token).
//!
//! [`Client::hooks`] runs callbacks per event kind from one background task reading such a
//! stream:
//!
//! ```no_run
//! # async fn demo(client: kisara_client::Client) -> Result<(), kisara_client::Error> {
//! let hooks = client.hooks().await?;
//! let launches = hooks.on_container_launch(|ev| {
//!     println!("{} launched for {:?}", ev.container_id.as_deref().unwrap_or("?"), ev.owner);
//! });
//! hooks.on_node_disconnect(|ev| eprintln!("node {:?} went away", ev.node_id));
//! // ...
//! launches.unset(); // or hooks.unset_container_launch()
//! drop(hooks); // stops the background task and every hook
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use kisara_api::events::kinds;
use kisara_api::{CreateWebhookRequest, Event, EventQuery, Webhook, WebhookDelivery};
use reqwest::Method;
use tokio::sync::{mpsc, watch};

use crate::{Client, Error, Result};

/// Backoff between reconnects of an event stream.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// Aborts a task when dropped, so that dropping a stream or hooks stops their work.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// ---- SSE parsing -------------------------------------------------------------------------

/// One dispatched SSE block.
#[derive(Debug, Default, PartialEq)]
struct SseBlock {
    id: Option<String>,
    data: Option<String>,
}

/// Incremental `text/event-stream` parser (the parts Kisara uses: `id`, `event`, `data`,
/// comments).
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    block: SseBlock,
}

impl SseParser {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseBlock>) {
        for &b in chunk {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, out);
            } else {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<SseBlock>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let block = std::mem::take(&mut self.block);
            if block.id.is_some() || block.data.is_some() {
                out.push(block);
            }
            return;
        }
        if line.starts_with(b":") {
            return; // a comment (keep-alive)
        }
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "id" => self.block.id = Some(value.to_string()),
            "data" => match &mut self.block.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.block.data = Some(value.to_string()),
            },
            _ => {} // `event` is also inside the data; `retry` is ours to decide
        }
    }
}

// ---- the stream --------------------------------------------------------------------------

/// A live, resumable stream of events (see the module docs). Dropping it closes the
/// connection.
pub struct EventStream {
    rx: mpsc::Receiver<Result<Event>>,
    last_id: Arc<AtomicU64>,
    _task: AbortOnDrop,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("last_id", &self.last_id())
            .finish_non_exhaustive()
    }
}

impl EventStream {
    /// The position the stream would resume from: the id of the last stored event received,
    /// or of the point the server started it at.
    pub fn last_id(&self) -> u64 {
        self.last_id.load(Ordering::Relaxed)
    }
}

impl Stream for EventStream {
    type Item = Result<Event>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

type Body = futures::stream::BoxStream<'static, std::result::Result<Bytes, reqwest::Error>>;

impl Client {
    /// Opens one SSE connection; `last` is sent as `Last-Event-ID`.
    async fn open_events(&self, query: &EventQuery, last: Option<u64>) -> Result<Body> {
        let mut req = self.req(Method::GET, &["v1", "events"])?.query(query);
        if let Some(id) = last {
            req = req.header("Last-Event-ID", id.to_string());
        }
        req = req.header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = self.send_streaming(req).await?;
        Ok(resp.bytes_stream().boxed())
    }

    /// Follows the cluster's events. The first connection is made before this returns, so
    /// from then on nothing is missed; `query.since` replays stored events after that id
    /// first. Heartbeats come only if `query.kinds` names `node.heartbeat`.
    pub async fn events(&self, query: &EventQuery) -> Result<EventStream> {
        let body = self.open_events(query, None).await?;
        let last_id = Arc::new(AtomicU64::new(query.since.unwrap_or(0)));
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(follow(
            self.clone(),
            query.clone(),
            body,
            last_id.clone(),
            tx,
        ));
        Ok(EventStream {
            rx,
            last_id,
            _task: AbortOnDrop(task),
        })
    }

    // ---- webhooks ----

    /// Registers a webhook; its secret signs every delivery and is never shown again.
    pub async fn create_webhook(&self, req: &CreateWebhookRequest) -> Result<Webhook> {
        self.json(self.req(Method::POST, &["v1", "webhooks"])?.json(req))
            .await
    }

    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>> {
        self.json(self.req(Method::GET, &["v1", "webhooks"])?).await
    }

    pub async fn remove_webhook(&self, id: &str) -> Result<()> {
        self.empty(self.req(Method::DELETE, &["v1", "webhooks", nonempty(id)?])?)
            .await
    }

    /// A webhook's recent deliveries, newest first, with every attempt.
    pub async fn webhook_deliveries(&self, id: &str) -> Result<Vec<WebhookDelivery>> {
        let path = ["v1", "webhooks", nonempty(id)?, "deliveries"];
        self.json(self.req(Method::GET, &path)?).await
    }

    /// Starts SDK hooks (see the module docs). The subscription is live when this returns.
    pub async fn hooks(&self) -> Result<Hooks> {
        let set = Arc::new(HookSet::default());
        let stream = self.events(&hook_query(false, None)).await?;
        let (heartbeat_tx, heartbeat_rx) = watch::channel(false);
        let task = tokio::spawn(run_hooks(self.clone(), set.clone(), stream, heartbeat_rx));
        Ok(Hooks {
            set,
            heartbeat: heartbeat_tx,
            _task: AbortOnDrop(task),
        })
    }
}

fn nonempty(id: &str) -> Result<&str> {
    if id.is_empty() {
        Err(Error::InvalidUrl("empty id".into()))
    } else {
        Ok(id)
    }
}

/// Whether a failure to connect is final (the server refused the request itself).
fn is_final(e: &Error) -> bool {
    matches!(e.status(), Some(400..=499)) && e.status() != Some(408) && e.status() != Some(429)
}

/// Reads one connection after another into `tx`, resuming from `last_id`.
async fn follow(
    client: Client,
    query: EventQuery,
    mut body: Body,
    last_id: Arc<AtomicU64>,
    tx: mpsc::Sender<Result<Event>>,
) {
    let mut backoff = RECONNECT_MIN;
    loop {
        let mut parser = SseParser::default();
        let mut blocks = Vec::new();
        loop {
            let chunk = tokio::select! {
                c = body.next() => c,
                _ = tx.closed() => return,
            };
            let Some(Ok(chunk)) = chunk else { break };
            parser.feed(&chunk, &mut blocks);
            for b in blocks.drain(..) {
                if let Some(id) = b.id.as_deref().and_then(|s| s.trim().parse::<u64>().ok()) {
                    last_id.fetch_max(id, Ordering::Relaxed);
                }
                let Some(data) = b.data else { continue };
                match serde_json::from_str::<Event>(&data) {
                    Ok(ev) => {
                        backoff = RECONNECT_MIN;
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        if tx.send(Err(Error::Decode(e))).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        // The connection ended: come back where we left off.
        body = loop {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = tx.closed() => return,
            }
            backoff = (backoff * 2).min(RECONNECT_MAX);
            let last = last_id.load(Ordering::Relaxed);
            match client.open_events(&query, Some(last)).await {
                Ok(b) => break b,
                Err(e) if is_final(&e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Err(_) => continue,
            }
        };
    }
}

// ---- hooks -------------------------------------------------------------------------------

type Callback = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Default)]
struct HookSet {
    /// Kind → (registration number, callback).
    slots: Mutex<HashMap<String, (u64, Callback)>>,
    next: AtomicU64,
}

impl HookSet {
    fn set(&self, kind: &str, f: Callback) -> u64 {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.insert(kind.to_string(), (generation, f));
        generation
    }

    fn unset(&self, kind: &str, generation: Option<u64>) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        match (slots.get(kind), generation) {
            (Some((g, _)), Some(want)) if *g != want => false,
            (Some(_), _) => slots.remove(kind).is_some(),
            (None, _) => false,
        }
    }

    fn get(&self, kind: &str) -> Option<Callback> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.get(kind).map(|(_, f)| f.clone())
    }

    fn has(&self, kind: &str) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.contains_key(kind)
    }
}

/// Callbacks per event kind, run in order from one background task. One callback per kind:
/// setting another replaces it. Keep callbacks quick (hand long work to a task of your own);
/// a callback that panics is reported and the others keep running. Dropping `Hooks` stops them
/// all.
pub struct Hooks {
    set: Arc<HookSet>,
    heartbeat: watch::Sender<bool>,
    _task: AbortOnDrop,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kinds: Vec<String> = self
            .set
            .slots
            .lock()
            .map(|s| s.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Hooks").field("kinds", &kinds).finish()
    }
}

/// One registered hook. Dropping the handle keeps the hook; [`HookHandle::unset`] removes it
/// (unless another has replaced it since).
#[derive(Debug)]
pub struct HookHandle {
    set: Weak<HookSet>,
    heartbeat: watch::Sender<bool>,
    kind: String,
    generation: u64,
}

impl std::fmt::Debug for HookSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookSet")
    }
}

impl HookHandle {
    /// Removes this hook. Answers whether it was still set.
    pub fn unset(self) -> bool {
        let Some(set) = self.set.upgrade() else {
            return false;
        };
        let removed = set.unset(&self.kind, Some(self.generation));
        if self.kind == kinds::NODE_HEARTBEAT && removed {
            let _ = self.heartbeat.send(false);
        }
        removed
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }
}

macro_rules! named_hooks {
    ($($on:ident, $unset:ident, $kind:expr, $what:literal;)*) => {
        impl Hooks {
            $(
                #[doc = concat!("Runs `f` on every `", $what, "` event (replacing an earlier hook of that kind).")]
                pub fn $on(&self, f: impl Fn(&Event) + Send + Sync + 'static) -> HookHandle {
                    self.on($kind, f)
                }

                #[doc = concat!("Removes the `", $what, "` hook. Answers whether one was set.")]
                pub fn $unset(&self) -> bool {
                    self.unset($kind)
                }
            )*
        }
    };
}

named_hooks! {
    on_node_connect, unset_node_connect, kinds::NODE_CONNECT, "node.connect";
    on_node_disconnect, unset_node_disconnect, kinds::NODE_DISCONNECT, "node.disconnect";
    on_node_heartbeat, unset_node_heartbeat, kinds::NODE_HEARTBEAT, "node.heartbeat";
    on_container_launch, unset_container_launch, kinds::CONTAINER_LAUNCH, "container.launch";
    on_container_stop, unset_container_stop, kinds::CONTAINER_STOP, "container.stop";
    on_container_die, unset_container_die, kinds::CONTAINER_DIE, "container.die";
    on_service_start, unset_service_start, kinds::SERVICE_START, "service.start";
    on_service_stop, unset_service_stop, kinds::SERVICE_STOP, "service.stop";
    on_instance_expired, unset_instance_expired, kinds::INSTANCE_EXPIRED, "instance.expired";
}

impl Hooks {
    /// Runs `f` on every event of `kind` (exact, e.g. `container.launch`), replacing an
    /// earlier hook of that kind.
    pub fn on(&self, kind: &str, f: impl Fn(&Event) + Send + Sync + 'static) -> HookHandle {
        let generation = self.set.set(kind, Arc::new(f));
        if kind == kinds::NODE_HEARTBEAT {
            // Heartbeats are sent only to subscribers that ask: resubscribe with them.
            let _ = self.heartbeat.send(true);
        }
        HookHandle {
            set: Arc::downgrade(&self.set),
            heartbeat: self.heartbeat.clone(),
            kind: kind.to_string(),
            generation,
        }
    }

    /// Removes the hook of `kind`. Answers whether one was set.
    pub fn unset(&self, kind: &str) -> bool {
        let removed = self.set.unset(kind, None);
        if kind == kinds::NODE_HEARTBEAT && removed {
            let _ = self.heartbeat.send(false);
        }
        removed
    }
}

fn hook_query(heartbeats: bool, since: Option<u64>) -> EventQuery {
    let mut kinds = "*".to_string();
    if heartbeats {
        kinds.push(',');
        kinds.push_str(kinds::NODE_HEARTBEAT);
    }
    EventQuery {
        kinds: Some(kinds),
        since,
        ..Default::default()
    }
}

async fn run_hooks(
    client: Client,
    set: Arc<HookSet>,
    mut stream: EventStream,
    mut heartbeat: watch::Receiver<bool>,
) {
    let mut with_heartbeats = false;
    loop {
        tokio::select! {
            item = stream.next() => match item {
                Some(Ok(ev)) => {
                    if let Some(f) = set.get(&ev.kind) {
                        let run = std::panic::AssertUnwindSafe(|| f(&ev));
                        if std::panic::catch_unwind(run).is_err() {
                            eprintln!("kisara-client: the {} hook panicked", ev.kind);
                        }
                    }
                }
                Some(Err(e)) => {
                    eprintln!("kisara-client: hooks stopped: {e}");
                    return;
                }
                None => return,
            },
            changed = heartbeat.changed() => {
                if changed.is_err() {
                    return;
                }
                let want = *heartbeat.borrow_and_update() && set.has(kinds::NODE_HEARTBEAT);
                if want == with_heartbeats {
                    continue;
                }
                // Resubscribe from where this stream is, with or without heartbeats.
                let since = stream.last_id();
                let mut backoff = RECONNECT_MIN;
                stream = loop {
                    match client.events(&hook_query(want, Some(since))).await {
                        Ok(s) => break s,
                        Err(e) if is_final(&e) => {
                            eprintln!("kisara-client: hooks stopped: {e}");
                            return;
                        }
                        Err(_) => {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(RECONNECT_MAX);
                        }
                    }
                };
                with_heartbeats = want;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&str]) -> Vec<SseBlock> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c.as_bytes(), &mut out);
        }
        out
    }

    #[test]
    fn sse_blocks_split_anywhere() {
        let out = parse(&[
            "id: 7\n\n: keep-alive\n\nid: 8\nevent: container.launch\nda",
            "ta: {\"a\":1}\r\n\r\nevent: node.heartbeat\ndata: x\ndata: y\n\n",
        ]);
        assert_eq!(
            out,
            vec![
                SseBlock {
                    id: Some("7".into()),
                    data: None
                },
                SseBlock {
                    id: Some("8".into()),
                    data: Some("{\"a\":1}".into())
                },
                SseBlock {
                    id: None,
                    data: Some("x\ny".into())
                },
            ]
        );
    }

    #[test]
    fn hooks_replace_and_unset_by_generation() {
        let set = HookSet::default();
        let g1 = set.set("a", Arc::new(|_: &Event| {}));
        let g2 = set.set("a", Arc::new(|_: &Event| {}));
        assert!(
            !set.unset("a", Some(g1)),
            "an old handle must not unset a newer hook"
        );
        assert!(set.has("a"));
        assert!(set.unset("a", Some(g2)));
        assert!(!set.has("a"));
        set.set("b", Arc::new(|_: &Event| {}));
        assert!(set.unset("b", None));
        assert!(!set.unset("b", None));
    }

    #[test]
    fn only_client_errors_are_final() {
        let api = |status| Error::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        };
        assert!(is_final(&api(401)));
        assert!(is_final(&api(400)));
        assert!(!is_final(&api(429)));
        assert!(!is_final(&api(503)));
        assert!(!is_final(&Error::Timeout));
    }
}
