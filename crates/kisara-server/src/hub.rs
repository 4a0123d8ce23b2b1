//! The agent hub: one session per connected node, and request/reply over its channel.
//!
//! Every request gets an id; the reply (or the stream of items ending with `StreamEnd`) comes
//! back with it. When a session closes, every request still waiting on it is answered at once
//! with "node disconnected", so nothing in flight hangs until a timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kisara_api::agent::{Hello, Operation, Reply, ServerMessage};
use kisara_api::{codes, ErrorBody, NodeStatus};
use tokio::sync::{mpsc, oneshot};

use crate::error::ApiError;

/// What a streaming request yields.
#[derive(Debug)]
pub enum StreamEvent {
    Item(serde_json::Value),
    End(Option<ErrorBody>),
}

enum Pending {
    Call(oneshot::Sender<Result<Reply, ErrorBody>>),
    Stream(mpsc::Sender<StreamEvent>),
}

/// A connected agent.
pub struct NodeSession {
    pub node_id: String,
    pub hello: Hello,
    pub connected_at: i64,
    last_heartbeat: AtomicI64,
    status: Mutex<NodeStatus>,
    tx: mpsc::Sender<ServerMessage>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// The subnets the engine reported in use (`UsedSubnets`), asked once per session and
    /// again only when a network create meets an overlap or an exhausted pool (see
    /// `api::networks::create_on_node`). Kisara's own allocations are in the store.
    used_subnets: Mutex<Option<Arc<Vec<ipnet::Ipv4Net>>>>,
}

impl std::fmt::Debug for NodeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSession")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl NodeSession {
    pub fn new(node_id: String, hello: Hello, tx: mpsc::Sender<ServerMessage>, now: i64) -> Self {
        NodeSession {
            node_id,
            hello,
            connected_at: now,
            last_heartbeat: AtomicI64::new(now),
            status: Mutex::new(NodeStatus::default()),
            tx,
            pending: Mutex::new(HashMap::new()),
            used_subnets: Mutex::new(None),
        }
    }

    /// The engine's used subnets as last asked in this session, if they were.
    pub fn used_subnets(&self) -> Option<Arc<Vec<ipnet::Ipv4Net>>> {
        self.used_subnets.lock().ok()?.clone()
    }

    /// Remembers what the engine reported (`None` forgets it, so the next create asks).
    pub fn set_used_subnets(&self, used: Option<Arc<Vec<ipnet::Ipv4Net>>>) {
        if let Ok(mut u) = self.used_subnets.lock() {
            *u = used;
        }
    }

    pub fn heartbeat(&self, status: NodeStatus, now: i64) {
        self.last_heartbeat.store(now, Ordering::Relaxed);
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
    }

    pub fn last_heartbeat(&self) -> i64 {
        self.last_heartbeat.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> NodeStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Routes a reply frame to whoever waits for it.
    pub fn deliver_reply(&self, id: u64, result: Result<Reply, ErrorBody>) {
        let pending = self.pending.lock().ok().and_then(|mut p| p.remove(&id));
        if let Some(Pending::Call(tx)) = pending {
            let _ = tx.send(result);
        }
    }

    /// Routes a stream item; a receiver that went away cancels the stream on the agent.
    pub async fn deliver_stream(&self, id: u64, event: StreamEvent) {
        let end = matches!(event, StreamEvent::End(_));
        let tx = {
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            match p.get(&id) {
                Some(Pending::Stream(tx)) => {
                    let tx = tx.clone();
                    if end {
                        p.remove(&id);
                    }
                    tx
                }
                _ => return,
            }
        };
        if tx.send(event).await.is_err() && !end {
            self.forget(id);
            let _ = self.tx.send(ServerMessage::Cancel { id }).await;
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&id);
        }
    }

    /// Fails everything in flight; called when the channel closes.
    pub fn fail_all(&self) {
        if let Ok(mut p) = self.pending.lock() {
            // Dropping the senders answers every waiter with "disconnected".
            p.clear();
        }
    }
}

/// All connected nodes.
#[derive(Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, Arc<NodeSession>>>,
    next_id: AtomicU64,
}

fn disconnected(node_id: &str) -> ApiError {
    ApiError::node_unavailable(format!("node {node_id} disconnected before it answered"))
}

impl Hub {
    /// Registers a session, replacing (and failing) any older one of the same node.
    pub fn register(&self, session: Arc<NodeSession>) {
        let old = self
            .sessions
            .lock()
            .ok()
            .and_then(|mut s| s.insert(session.node_id.clone(), session));
        if let Some(old) = old {
            old.fail_all();
        }
    }

    /// Removes a session if it is still the current one for its node.
    pub fn unregister(&self, session: &Arc<NodeSession>) -> bool {
        let removed = match self.sessions.lock() {
            Ok(mut s) => match s.get(&session.node_id) {
                Some(cur) if Arc::ptr_eq(cur, session) => {
                    s.remove(&session.node_id);
                    true
                }
                _ => false,
            },
            Err(_) => false,
        };
        session.fail_all();
        removed
    }

    pub fn get(&self, node_id: &str) -> Option<Arc<NodeSession>> {
        self.sessions.lock().ok()?.get(node_id).cloned()
    }

    pub fn sessions(&self) -> Vec<Arc<NodeSession>> {
        self.sessions
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    fn session(&self, node_id: &str) -> Result<Arc<NodeSession>, ApiError> {
        self.get(node_id)
            .ok_or_else(|| ApiError::node_unavailable(format!("node {node_id} is not connected")))
    }

    /// Sends a request and waits for its reply.
    pub async fn call(
        &self,
        node_id: &str,
        op: Operation,
        timeout: Duration,
    ) -> Result<Reply, ApiError> {
        let session = self.session(node_id)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut p) = session.pending.lock() {
            p.insert(id, Pending::Call(tx));
        }
        if session
            .tx
            .send(ServerMessage::Request { id, op })
            .await
            .is_err()
        {
            session.forget(id);
            return Err(disconnected(node_id));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(body))) => Err(ApiError::from_body(body)),
            Ok(Err(_)) => Err(disconnected(node_id)),
            Err(_) => {
                session.forget(id);
                Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    codes::TIMEOUT,
                    format!(
                        "node {node_id} did not answer within {}s",
                        timeout.as_secs()
                    ),
                ))
            }
        }
    }

    /// Starts a streaming request. Dropping the returned stream cancels it on the agent.
    pub async fn stream(&self, node_id: &str, op: Operation) -> Result<AgentStream, ApiError> {
        let session = self.session(node_id)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(64);
        if let Ok(mut p) = session.pending.lock() {
            p.insert(id, Pending::Stream(tx));
        }
        if session
            .tx
            .send(ServerMessage::Request { id, op })
            .await
            .is_err()
        {
            session.forget(id);
            return Err(disconnected(node_id));
        }
        Ok(AgentStream {
            rx,
            id,
            session,
            ended: false,
        })
    }
}

/// The receiving end of a streaming request.
pub struct AgentStream {
    rx: mpsc::Receiver<StreamEvent>,
    id: u64,
    session: Arc<NodeSession>,
    ended: bool,
}

impl AgentStream {
    /// Next item; `None` after the end. A dropped channel ends with an error.
    pub async fn next(&mut self) -> Option<Result<serde_json::Value, ApiError>> {
        if self.ended {
            return None;
        }
        match self.rx.recv().await {
            Some(StreamEvent::Item(v)) => Some(Ok(v)),
            Some(StreamEvent::End(None)) => {
                self.ended = true;
                None
            }
            Some(StreamEvent::End(Some(e))) => {
                self.ended = true;
                Some(Err(ApiError::from_body(e)))
            }
            None => {
                self.ended = true;
                Some(Err(disconnected(&self.session.node_id)))
            }
        }
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        if !self.ended {
            self.session.forget(self.id);
            let _ = self
                .session
                .tx
                .try_send(ServerMessage::Cancel { id: self.id });
        }
    }
}
