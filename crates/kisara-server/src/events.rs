//! The event bus: every fact of the cluster, once, with a durable id.
//!
//! [`EventBus::emit`] appends the event to the store (which also queues it for the webhooks that
//! want it, in the same transaction) and broadcasts it to live subscribers (SSE streams). Both
//! happen under one lock, so the broadcast carries events in id order and a subscriber that
//! reads the store's backlog after subscribing can splice the two with no gap and no duplicate.
//! `node.heartbeat` is broadcast only: it is too chatty to keep.
//!
//! "Exactly once" is structural where it can be (one connect per session, one disconnect when
//! the node's current session ends) and enforced by the store's fact keys where two paths may
//! race or an agent may replay (`container.stop` from stop and remove, `container.die` after a
//! reconnect).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kisara_api::agent::{ContainerEvent, InventoryContainer, ACTION_DIE};
use kisara_api::events::kinds;
use kisara_api::{labels, Container, ContainerState, Event, NodeStatus};
use kisara_store::{OptionalExt, Store, Ticket};
use tokio::sync::broadcast;

use crate::hub::NodeSession;
use crate::webhooks::Dispatcher;

/// Live events buffered per subscriber before it lags (and falls back to the store).
const BROADCAST_CAPACITY: usize = 4096;
/// How long a `die` that arrived before its container's launch was recorded is kept waiting.
const PARKED_DIE_TTL: Duration = Duration::from_secs(120);
/// A container older than this without a recorded launch (launched before events existed, or
/// its launch pruned) gets its `die` at once instead of waiting for a launch.
const LAUNCH_GRACE_SECS: i64 = 60;

/// Retention of stored events.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Newest events kept.
    pub max_events: u64,
    /// Older events are dropped.
    pub max_age: Duration,
    /// How often the pruner runs.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_events: 100_000,
            max_age: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(600),
        }
    }
}

/// What an event's write answers: the stored event and the webhooks it was queued for, or
/// `None` when its fact was already recorded.
type Written = Result<Option<(Event, Vec<String>)>, kisara_store::StoreError>;

/// An event stored by a deferred write, broadcast once its commit is settled.
struct Unsettled {
    ticket: Ticket,
    event: Arc<Event>,
    queued: Vec<String>,
}

/// A `die` waiting for its container's `container.launch`.
struct ParkedDie {
    node_id: String,
    event: ContainerEvent,
    at: Instant,
}

pub struct EventBus {
    store: Store,
    cluster_id: String,
    tx: broadcast::Sender<Arc<Event>>,
    /// Held across append + broadcast so that live order is id order. Holds the events of
    /// deferred writes (see [`EventBus::complete_launch`]) until their commit, in id order.
    order: Mutex<VecDeque<Unsettled>>,
    /// By docker id. Locked before `order` wherever both are taken.
    parked: Mutex<HashMap<String, ParkedDie>>,
    pub webhooks: Dispatcher,
    pub retention: Retention,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").finish_non_exhaustive()
    }
}

/// Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn event(kind: &str) -> Event {
    Event {
        id: 0,
        kind: kind.to_string(),
        time: now_ms(),
        node_id: None,
        container_id: None,
        owner: None,
        module: None,
        data: serde_json::Value::Null,
    }
}

fn container_event(kind: &str, c: &Container, data: serde_json::Value) -> Event {
    Event {
        node_id: Some(c.node_id.clone()),
        container_id: Some(c.id.clone()),
        owner: c.owner.clone(),
        module: c.module.clone(),
        data,
        ..event(kind)
    }
}

/// A service's event: `data` names the service and its containers (`container_id` is unset,
/// since a service is many).
fn service_event(kind: &str, s: &kisara_api::Service) -> Event {
    let containers: Vec<serde_json::Value> = s
        .containers
        .iter()
        .map(|c| serde_json::json!({ "service": c.service, "id": c.id, "docker_id": c.docker_id }))
        .collect();
    Event {
        node_id: Some(s.node_id.clone()),
        owner: s.owner.clone(),
        module: s.module.clone(),
        data: serde_json::json!({
            "service_id": s.id,
            "name": s.name,
            "containers": containers,
            "ports": s.ports,
            "host_port": s.host_port,
        }),
        ..event(kind)
    }
}

impl EventBus {
    pub fn new(store: Store, cluster_id: String) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        EventBus {
            webhooks: Dispatcher::new(store.clone()),
            store,
            cluster_id,
            tx,
            order: Mutex::new(VecDeque::new()),
            parked: Mutex::new(HashMap::new()),
            retention: Retention::default(),
        }
    }

    /// Live events from now on. Subscribe before reading the backlog (see the module docs).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// The highest id handed out so far.
    pub fn last_id(&self) -> u64 {
        self.store.last_event_id().unwrap_or(0)
    }

    /// Stored events after `after`, oldest first.
    pub fn backlog(&self, after: u64, limit: usize) -> Vec<Event> {
        match self.store.events_after(after, limit) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read stored events");
                Vec::new()
            }
        }
    }

    /// Stores, queues for webhooks and broadcasts one event. `fact` names the fact: a second
    /// emit with the same key does nothing and answers `None`.
    pub fn emit(&self, event: Event, fact: Option<&str>) -> Option<Arc<Event>> {
        if kinds::is_transient(&event.kind) {
            let event = Arc::new(Event { id: 0, ..event });
            let _ = self.tx.send(event.clone());
            return Some(event);
        }
        match self.append(&event, fact, |s, e, f| s.append_event(e, f)) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(kind = %event.kind, error = %e, "cannot store an event; it is lost");
                None
            }
        }
    }

    /// Stores an event with `write` (an append, possibly with more in its transaction), then
    /// broadcasts it and wakes the webhooks it was queued for.
    fn append(
        &self,
        event: &Event,
        fact: Option<&str>,
        write: impl FnOnce(&Store, &Event, Option<&str>) -> Written,
    ) -> Result<Option<Arc<Event>>, kisara_store::StoreError> {
        let (stored, queued) = {
            let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            let written = write(&self.store, event, fact);
            // An ordinary write commits any group open before it: events stored by deferred
            // writes earlier (lower ids) go out first.
            self.flush_settled(&mut order);
            match written? {
                Some((stored, queued)) => {
                    let stored = Arc::new(stored);
                    let _ = self.tx.send(stored.clone());
                    (stored, queued)
                }
                None => return Ok(None),
            }
        };
        tracing::debug!(id = stored.id, kind = %stored.kind, "event");
        self.webhooks.notify(&queued);
        Ok(Some(stored))
    }

    /// [`EventBus::append`] as a deferred write: the event is broadcast (and its webhooks
    /// woken) only once the write's commit is settled, by [`EventBus::settle`].
    fn append_deferred(
        &self,
        event: &Event,
        fact: Option<&str>,
        write: impl FnOnce(&Store, &Event, Option<&str>) -> Written,
    ) -> Result<Ticket, kisara_store::StoreError> {
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        let (written, ticket) = self.store.deferred(|s| write(s, event, fact));
        if let Some((stored, queued)) = written? {
            order.push_back(Unsettled {
                ticket,
                event: Arc::new(stored),
                queued,
            });
        }
        Ok(ticket)
    }

    /// Waits for a deferred event's commit, then broadcasts every event settled by now, in
    /// id order.
    async fn settle(&self, ticket: Ticket) -> Result<(), kisara_store::StoreError> {
        let r = self.store.durable(ticket).await;
        let mut order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_settled(&mut order);
        r
    }

    /// Broadcasts the waiting events whose commits are settled, oldest first, up to the first
    /// that is not; those of a failed commit were rolled back and are dropped.
    fn flush_settled(&self, order: &mut VecDeque<Unsettled>) {
        while let Some(front) = order.front() {
            match self.store.settled(front.ticket) {
                None => break,
                Some(committed) => {
                    let Some(u) = order.pop_front() else { break };
                    if committed {
                        tracing::debug!(id = u.event.id, kind = %u.event.kind, "event");
                        let _ = self.tx.send(u.event);
                        self.webhooks.notify(&u.queued);
                    }
                }
            }
        }
    }

    // ---- the facts ----

    /// An agent's session was accepted.
    pub fn node_connected(&self, session: &NodeSession) {
        let hello = &session.hello;
        self.emit(
            Event {
                node_id: Some(session.node_id.clone()),
                data: serde_json::json!({
                    "name": hello.name,
                    "agent_version": hello.agent_version,
                    "public_address": hello.public_address,
                    "labels": hello.labels,
                }),
                ..event(kinds::NODE_CONNECT)
            },
            None,
        );
    }

    /// The node's current session ended (not called for a session that another replaced).
    pub fn node_disconnected(&self, session: &NodeSession) {
        self.emit(
            Event {
                node_id: Some(session.node_id.clone()),
                data: serde_json::json!({ "name": session.hello.name }),
                ..event(kinds::NODE_DISCONNECT)
            },
            None,
        );
    }

    /// Every heartbeat; broadcast only.
    pub fn node_heartbeat(&self, node_id: &str, status: &NodeStatus) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        self.emit(
            Event {
                node_id: Some(node_id.to_string()),
                data: serde_json::to_value(status).unwrap_or_default(),
                ..event(kinds::NODE_HEARTBEAT)
            },
            None,
        );
    }

    /// A container was launched and recorded. Fires a `die` that arrived before it, if any.
    pub fn container_launched(&self, c: &Container) {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        self.emit(
            Self::launch_event(c),
            Some(&format!("{}:{}", kinds::CONTAINER_LAUNCH, c.id)),
        );
        self.after_launch(parked, c);
    }

    /// Records a launched container as the node reported it (see
    /// [`kisara_store::Store::complete_container`]) together with its `container.launch`
    /// event, in one transaction. On an error neither is stored.
    pub async fn complete_launch(&self, c: &Container) -> Result<(), kisara_store::StoreError> {
        // A deferred write: launches finishing together share one commit. The caller answers
        // only once it is durable, and the event goes out only then.
        let (ticket, early) = {
            let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
            let fact = format!("{}:{}", kinds::CONTAINER_LAUNCH, c.id);
            let ticket = self.append_deferred(&Self::launch_event(c), Some(&fact), |s, e, f| {
                s.complete_container_with_event(c, e, f)
            })?;
            // A `die` arriving from now on finds the launch recorded and is emitted after it;
            // one that arrived before was parked and is taken here.
            let early = parked.remove(&c.docker_id);
            parked.retain(|_, p| p.at.elapsed() < PARKED_DIE_TTL);
            (ticket, early)
        };
        self.settle(ticket).await?;
        if let Some(p) = early {
            self.die(&p.node_id, c, &p.event);
        }
        Ok(())
    }

    fn launch_event(c: &Container) -> Event {
        let data = serde_json::json!({
            "name": c.name,
            "image": c.image,
            "docker_id": c.docker_id,
            "network": c.network,
            "ports": c.ports,
            "host_port": c.host_port,
        });
        container_event(kinds::CONTAINER_LAUNCH, c, data)
    }

    /// A `die` that arrived before the launch was recorded is reported now.
    fn after_launch(
        &self,
        mut parked: std::sync::MutexGuard<'_, HashMap<String, ParkedDie>>,
        c: &Container,
    ) {
        let early = parked.remove(&c.docker_id);
        parked.retain(|_, p| p.at.elapsed() < PARKED_DIE_TTL);
        drop(parked);
        if let Some(p) = early {
            self.die(&p.node_id, c, &p.event);
        }
    }

    /// A node stayed away past its grace period; `since` (its last sighting) keys the outage.
    pub fn node_down(&self, node_id: &str, name: &str, since: i64) {
        self.emit(
            Event {
                node_id: Some(node_id.to_string()),
                data: serde_json::json!({ "name": name, "last_seen": since }),
                ..event(kinds::NODE_DOWN)
            },
            Some(&format!("{}:{node_id}:{since}", kinds::NODE_DOWN)),
        );
    }

    /// A container went down with its node (once per container per outage).
    pub fn container_lost(&self, c: &Container, since: i64) {
        let data = serde_json::json!({ "name": c.name, "docker_id": c.docker_id });
        self.emit(
            container_event(kinds::CONTAINER_LOST, c, data),
            Some(&format!("{}:{}:{since}", kinds::CONTAINER_LOST, c.id)),
        );
    }

    /// Reconciliation removed a labelled container the store did not know: once per engine
    /// container. `container_id` is the Kisara id its label carried.
    pub fn container_orphan_removed(&self, node_id: &str, c: &InventoryContainer) {
        let label = |k: &str| c.labels.get(k).cloned();
        self.emit(
            Event {
                node_id: Some(node_id.to_string()),
                container_id: label(labels::CONTAINER),
                owner: label(labels::OWNER),
                module: label(labels::MODULE),
                data: serde_json::json!({
                    "name": c.name.trim_start_matches('/'),
                    "image": c.image,
                    "docker_id": c.docker_id,
                    "state": c.state,
                    "service_id": label(labels::SERVICE),
                }),
                ..event(kinds::CONTAINER_ORPHAN_REMOVED)
            },
            Some(&format!(
                "{}:{}",
                kinds::CONTAINER_ORPHAN_REMOVED,
                c.docker_id
            )),
        );
    }

    /// A container was stopped or removed through Kisara: once per container.
    pub fn container_stopped(&self, c: &Container) {
        let data = serde_json::json!({
            "name": c.name,
            "image": c.image,
            "docker_id": c.docker_id,
        });
        self.emit(
            container_event(kinds::CONTAINER_STOP, c, data),
            Some(&format!("{}:{}", kinds::CONTAINER_STOP, c.id)),
        );
    }

    /// A multi-container service is up (every container running, healthy where it has a
    /// healthcheck): once per service.
    pub fn service_started(&self, s: &kisara_api::Service) {
        self.emit(
            service_event(kinds::SERVICE_START, s),
            Some(&format!("{}:{}", kinds::SERVICE_START, s.id)),
        );
    }

    /// A service was taken down through Kisara: once per service.
    pub fn service_stopped(&self, s: &kisara_api::Service) {
        self.emit(
            service_event(kinds::SERVICE_STOP, s),
            Some(&format!("{}:{}", kinds::SERVICE_STOP, s.id)),
        );
    }

    /// An engine event an agent reported.
    pub fn container_event(&self, node_id: &str, ev: ContainerEvent) {
        if ev.action != ACTION_DIE {
            tracing::debug!(action = %ev.action, "ignoring a container event");
            return;
        }
        if ev.labels.get(labels::CLUSTER) != Some(&self.cluster_id) {
            return;
        }
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = self.find(&ev) else {
            // The launch has not been recorded yet (the container died at once): wait for it.
            parked.retain(|_, p| p.at.elapsed() < PARKED_DIE_TTL);
            parked.insert(
                ev.docker_id.clone(),
                ParkedDie {
                    node_id: node_id.to_string(),
                    event: ev,
                    at: Instant::now(),
                },
            );
            return;
        };
        let launched = self
            .store
            .has_fact(&format!("{}:{}", kinds::CONTAINER_LAUNCH, c.id))
            .unwrap_or(true);
        if !launched && crate::now() - c.created_at < LAUNCH_GRACE_SECS {
            parked.insert(
                ev.docker_id.clone(),
                ParkedDie {
                    node_id: node_id.to_string(),
                    event: ev,
                    at: Instant::now(),
                },
            );
            return;
        }
        drop(parked);
        self.die(node_id, &c, &ev);
    }

    fn find(&self, ev: &ContainerEvent) -> Option<Container> {
        if let Some(id) = ev.labels.get(labels::CONTAINER) {
            if let Ok(Some(c)) = self.store.get_container(id).optional() {
                if c.docker_id == ev.docker_id {
                    return Some(c);
                }
            }
        }
        match self.store.get_container(&ev.docker_id).optional() {
            Ok(Some(c)) if c.docker_id == ev.docker_id => Some(c),
            _ => None,
        }
    }

    fn die(&self, node_id: &str, c: &Container, ev: &ContainerEvent) {
        let status = match ev.exit_code {
            Some(code) => format!("Exited ({code})"),
            None => "Exited".to_string(),
        };
        if c.state != ContainerState::Gone {
            if let Err(e) =
                self.store
                    .update_container_state(&c.id, ContainerState::Exited, &status)
            {
                tracing::warn!(container = %c.id, error = %e, "cannot record a container's exit");
            }
        }
        let mut e = container_event(
            kinds::CONTAINER_DIE,
            c,
            serde_json::json!({
                "name": c.name,
                "image": c.image,
                "docker_id": c.docker_id,
                "exit_code": ev.exit_code,
            }),
        );
        e.node_id = Some(node_id.to_string());
        let fact = format!("{}:{}:{}", kinds::CONTAINER_DIE, c.id, ev.time_nano);
        if self.emit(e, Some(&fact)).is_some() {
            tracing::info!(container = %c.id, exit_code = ?ev.exit_code, "container died");
        }
    }

    /// Drops events beyond the retention.
    pub fn prune(&self) {
        let before = now_ms() - self.retention.max_age.as_millis() as i64;
        match self.store.prune_events(self.retention.max_events, before) {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "old events pruned"),
            Err(e) => tracing::warn!(error = %e, "cannot prune events"),
        }
    }
}

/// Starts what runs behind the bus (webhook deliveries, retention); everything stops with
/// `state.shutdown`.
pub fn start(state: &Arc<crate::AppState>) {
    let shutdown = state.shutdown.clone();
    state.events.webhooks.start(shutdown.clone());
    let st = state.clone();
    tokio::spawn(async move {
        let interval = st.events.retention.interval;
        loop {
            st.events.prune();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    });
}
