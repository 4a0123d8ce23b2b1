//! Where new work goes, and the nodes' live view.
//!
//! The server keeps an allocation ledger in memory: per node its scheduling facts (state,
//! flags, labels, capacity, the images it reported) and what Kisara placed there (containers,
//! reserved memory and cpu). It is built from the store at start and kept current by the agent
//! channel (connect, heartbeat, disconnect), by launches and removals, and by reconciliation,
//! so placing a container costs O(nodes) and never scans the containers table.
//!
//! A launch asks the pure scheduler ([`kisara_core::scheduler::place`]) for a plan over the
//! ledger, re-checks the plan with [`scheduler::fits`] against the same, latest state and
//! reserves, all under one short lock; so two concurrent launches can never both take a node's
//! last slot. The reservation is a guard: dropped without [`Reservation::commit`] (the launch
//! failed, or its request was cancelled) it is released.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kisara_api::{LaunchRequest, Node, NodeAllocation, NodeState, NodeStatus};
use kisara_core::scheduler::{
    self, NodeSnapshot, PlacementRequest, Readiness, Resources, Strategy,
};
use kisara_store::{NodeRecord, Store};

use crate::error::{ApiError, ApiResult};
use crate::{now, AppState};

/// How many missed heartbeat intervals make a connected node unreachable.
const MISSED_HEARTBEATS: i64 = 3;

/// Liveness of a node as the agent channel reports it.
#[derive(Debug, Clone, Copy, Default)]
struct Liveness {
    connected: bool,
    last_heartbeat: i64,
    last_seen: i64,
}

struct Entry {
    snap: NodeSnapshot,
    live: Liveness,
    /// Measured totals (engine facts, then heartbeats): cpus and memory bytes.
    cpus: u32,
    memory_total: u64,
}

#[derive(Clone, Copy)]
struct Held {
    node: usize,
    res: Resources,
    /// Recorded in the store; uncommitted ones survive a resync from the store.
    committed: bool,
}

#[derive(Default)]
struct Inner {
    nodes: Vec<Entry>,
    by_id: HashMap<String, usize>,
    /// Container id → what it holds.
    held: HashMap<String, Held>,
    /// The distinct image sets nodes hold (see [`Inner::intern`]).
    image_sets: Vec<Arc<HashSet<String>>>,
}

/// Distinct image sets kept for sharing; past this many, new sets are not interned.
const MAX_IMAGE_SETS: usize = 64;

impl Inner {
    /// Ranks the nodes by (name, id), the scheduler's tie-break (see `NodeSnapshot::rank`).
    fn rerank(&mut self) {
        let mut order: Vec<usize> = (0..self.nodes.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&self.nodes[a].snap, &self.nodes[b].snap);
            (&a.name, &a.id).cmp(&(&b.name, &b.id))
        });
        for (rank, i) in order.into_iter().enumerate() {
            self.nodes[i].snap.rank = u32::try_from(rank).unwrap_or(u32::MAX);
        }
    }

    /// Nodes with the same images share one set, whatever order they report in: the
    /// scheduler then looks an image up once per distinct set, not once per node. Sets no
    /// node holds any more are dropped when a new one arrives.
    fn intern(&mut self, set: HashSet<String>) -> Arc<HashSet<String>> {
        if let Some(same) = self.image_sets.iter().find(|s| ***s == set) {
            return same.clone();
        }
        self.image_sets.retain(|s| Arc::strong_count(s) > 1);
        let set = Arc::new(set);
        if self.image_sets.len() < MAX_IMAGE_SETS {
            self.image_sets.push(set.clone());
        }
        set
    }
}

/// The allocation ledger. Cheap to share: one mutex, held for O(nodes) work at most.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Mutex<Inner>>,
    heartbeat_interval: i64,
    node_grace: i64,
    cpu_overcommit: f64,
    memory_overcommit: f64,
    strategy: Strategy,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ledger")
    }
}

/// A reservation on a node, released on drop unless committed.
pub struct Reservation {
    ledger: Ledger,
    container_id: String,
    node_id: String,
    resources: Resources,
    committed: bool,
}

impl Reservation {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }
    pub fn resources(&self) -> Resources {
        self.resources
    }
    /// The container is recorded in the store: keep the reservation until it is removed.
    pub fn commit(mut self) {
        self.committed = true;
        let mut inner = self.ledger.lock();
        if let Some(h) = inner.held.get_mut(&self.container_id) {
            h.committed = true;
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.committed {
            self.ledger.release(&self.container_id);
        }
    }
}

impl Ledger {
    /// Builds the ledger from the store: every node, and what every live container reserved.
    pub fn load(
        store: &Store,
        settings: &kisara_core::config::ServerSettings,
    ) -> Result<Self, kisara_store::StoreError> {
        let ledger = Ledger {
            inner: Default::default(),
            heartbeat_interval: settings.heartbeat_interval.as_secs().max(1) as i64,
            node_grace: settings.node_grace.as_secs() as i64,
            cpu_overcommit: settings.cpu_overcommit,
            memory_overcommit: settings.memory_overcommit,
            strategy: settings.scheduler,
        };
        {
            let mut inner = ledger.lock();
            for rec in store.list_nodes()? {
                ledger.upsert(&mut inner, &rec);
            }
            for r in store.container_reservations(None)? {
                ledger.hold(&mut inner, &r.id, &r.node_id, r.memory_mb, r.cpu_milli);
            }
        }
        Ok(ledger)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation leaves the ledger consistent before anything that could panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, inner: &mut Inner, id: &str, node_id: &str, memory_mb: u64, cpu_milli: u64) {
        let Some(&node) = inner.by_id.get(node_id) else {
            return;
        };
        let res = Resources {
            memory_mb,
            cpu_milli,
        };
        if inner.held.contains_key(id) {
            return;
        }
        inner.nodes[node].snap.reserve(res);
        inner.held.insert(
            id.to_string(),
            Held {
                node,
                res,
                committed: true,
            },
        );
    }

    fn capacity(&self, e: &mut Entry) {
        e.snap.capacity = Resources {
            memory_mb: ((e.memory_total >> 20) as f64 * self.memory_overcommit) as u64,
            cpu_milli: (e.cpus as f64 * 1000.0 * self.cpu_overcommit) as u64,
        };
    }

    /// Adds or refreshes a node from its stored record (flags, labels, limits, engine).
    fn upsert(&self, inner: &mut Inner, rec: &NodeRecord) {
        let mut rerank = false;
        let idx = match inner.by_id.get(&rec.id) {
            Some(&i) => i,
            None => {
                rerank = true;
                inner.nodes.push(Entry {
                    snap: NodeSnapshot::new(rec.id.clone(), rec.name.clone()),
                    live: Liveness {
                        last_seen: rec.last_seen,
                        ..Default::default()
                    },
                    cpus: 0,
                    memory_total: 0,
                });
                inner.by_id.insert(rec.id.clone(), inner.nodes.len() - 1);
                inner.nodes.len() - 1
            }
        };
        let e = &mut inner.nodes[idx];
        if e.snap.name != rec.name {
            e.snap.name = rec.name.clone();
            rerank = true;
        }
        e.snap.cordoned = rec.cordoned || rec.draining;
        e.snap.draining = rec.draining;
        e.snap.labels = rec.effective_labels();
        e.snap.max_containers = rec.max_containers;
        e.cpus = rec.engine.cpus;
        e.memory_total = rec.engine.memory_total;
        self.capacity(e);
        if rerank {
            inner.rerank();
        }
    }

    /// Re-reads a node's record (after it connected, or the operator changed it).
    pub fn refresh_node(&self, store: &Store, node_id: &str) -> ApiResult<()> {
        let rec = store
            .node_by_id(node_id)?
            .ok_or_else(|| ApiError::not_found(format!("unknown node {node_id:?}")))?;
        let mut inner = self.lock();
        self.upsert(&mut inner, &rec);
        Ok(())
    }

    pub fn connected(&self, node_id: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(&i) = inner.by_id.get(node_id) {
            let e = &mut inner.nodes[i];
            e.live.connected = true;
            e.live.last_heartbeat = now;
            e.live.last_seen = now;
        }
    }

    pub fn disconnected(&self, node_id: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(&i) = inner.by_id.get(node_id) {
            let e = &mut inner.nodes[i];
            e.live.connected = false;
            e.live.last_seen = now;
        }
    }

    /// A heartbeat: liveness, and the measured totals where the node reports them.
    pub fn heartbeat(&self, node_id: &str, status: &NodeStatus, now: i64) {
        let mut inner = self.lock();
        if let Some(&i) = inner.by_id.get(node_id) {
            let e = &mut inner.nodes[i];
            e.live.last_heartbeat = now;
            e.live.last_seen = now;
            if status.cpus > 0 && status.memory_total > 0 {
                e.cpus = status.cpus;
                e.memory_total = status.memory_total;
                self.capacity(e);
            }
        }
    }

    /// The images a node reported (ids and tags). A set equal to the last one reported by
    /// any node is shared with it, so the scheduler looks an image up once for all of them.
    pub fn set_images(&self, node_id: &str, images: Vec<String>) {
        let set: HashSet<String> = images.into_iter().collect();
        let mut inner = self.lock();
        let Some(&i) = inner.by_id.get(node_id) else {
            return;
        };
        let set = inner.intern(set);
        inner.nodes[i].snap.images = Some(set);
    }

    /// Records that a node now holds `reference` (after a pull), until its next report.
    pub fn add_image(&self, node_id: &str, reference: &str) {
        let mut inner = self.lock();
        if let Some(&i) = inner.by_id.get(node_id) {
            let mut set: HashSet<String> = inner.nodes[i]
                .snap
                .images
                .as_deref()
                .cloned()
                .unwrap_or_default();
            set.insert(scheduler::with_default_tag(reference));
            let set = inner.intern(set);
            inner.nodes[i].snap.images = Some(set);
        }
    }

    fn readiness(&self, live: &Liveness, now: i64) -> Readiness {
        if live.connected
            && now - live.last_heartbeat <= self.heartbeat_interval * MISSED_HEARTBEATS
        {
            Readiness::Ready
        } else if live.connected || now - live.last_seen <= self.node_grace {
            Readiness::Unreachable
        } else {
            Readiness::Down
        }
    }

    /// Plans, re-checks and reserves in one critical section. `container_id` names the
    /// reservation (so a removal releases exactly what the launch took).
    pub fn reserve(
        &self,
        container_id: &str,
        req: &PlacementRequest,
        strategy: Option<Strategy>,
    ) -> ApiResult<Reservation> {
        let now = now();
        let mut inner = self.lock();
        let node_id = {
            let inner = &mut *inner;
            for e in inner.nodes.iter_mut() {
                e.snap.readiness = self.readiness(&e.live, now);
            }
            // The scheduler works on a slice of snapshots; the entries keep them in place so
            // nothing is copied per launch.
            let snaps: Vec<&NodeSnapshot> = inner.nodes.iter().map(|e| &e.snap).collect();
            let plan = place_refs(&snaps, req, strategy.unwrap_or(self.strategy))?;
            // The optimistic re-check: the plan must still fit the state it is committed to.
            let entry = &mut inner.nodes[plan];
            scheduler::fits(&entry.snap, req).map_err(|r| {
                ApiError::no_node(format!(
                    "node {} can no longer take it: {r}",
                    entry.snap.name
                ))
            })?;
            if req.takes_slot {
                entry.snap.reserve(req.resources);
                inner.held.insert(
                    container_id.to_string(),
                    Held {
                        node: plan,
                        res: req.resources,
                        committed: false,
                    },
                );
            }
            entry.snap.id.clone()
        };
        drop(inner);
        Ok(Reservation {
            ledger: self.clone(),
            container_id: container_id.to_string(),
            node_id,
            resources: req.resources,
            committed: !req.takes_slot,
        })
    }

    /// Plans and reserves a group of containers (a service) on one node in one critical
    /// section: the scheduler weighs their summed resources, and each member holds its own
    /// share under its own id, released with it (or with the guards, uncommitted).
    pub fn reserve_group(
        &self,
        members: &[(String, Resources)],
        req: &PlacementRequest,
        strategy: Option<Strategy>,
    ) -> ApiResult<Vec<Reservation>> {
        let now = now();
        let total = members
            .iter()
            .fold(Resources::default(), |a, (_, r)| Resources {
                memory_mb: a.memory_mb.saturating_add(r.memory_mb),
                cpu_milli: a.cpu_milli.saturating_add(r.cpu_milli),
            });
        let group = PlacementRequest {
            resources: total,
            takes_slot: true,
            ..req.clone()
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        for e in inner.nodes.iter_mut() {
            e.snap.readiness = self.readiness(&e.live, now);
        }
        let snaps: Vec<&NodeSnapshot> = inner.nodes.iter().map(|e| &e.snap).collect();
        let plan = place_refs(&snaps, &group, strategy.unwrap_or(self.strategy))?;
        let entry = &mut inner.nodes[plan];
        scheduler::fits(&entry.snap, &group).map_err(|r| {
            ApiError::no_node(format!(
                "node {} can no longer take it: {r}",
                entry.snap.name
            ))
        })?;
        let wanted = u32::try_from(members.len()).unwrap_or(u32::MAX);
        if entry.snap.max_containers > 0
            && entry.snap.containers.saturating_add(wanted) > entry.snap.max_containers
        {
            return Err(ApiError::no_node(format!(
                "node {} has room for fewer than {wanted} more containers (max_containers {})",
                entry.snap.name, entry.snap.max_containers
            )));
        }
        let node_id = entry.snap.id.clone();
        for (id, res) in members {
            entry.snap.reserve(*res);
            inner.held.insert(
                id.clone(),
                Held {
                    node: plan,
                    res: *res,
                    committed: false,
                },
            );
        }
        drop(guard);
        Ok(members
            .iter()
            .map(|(id, res)| Reservation {
                ledger: self.clone(),
                container_id: id.clone(),
                node_id: node_id.clone(),
                resources: *res,
                committed: false,
            })
            .collect())
    }

    /// Gives back what a container held; releasing twice (or an unknown id) does nothing.
    pub fn release(&self, container_id: &str) {
        let mut inner = self.lock();
        if let Some(h) = inner.held.remove(container_id) {
            inner.nodes[h.node].snap.release(h.res);
        }
    }

    /// Rebuilds one node's reservations from the store (after reconciliation marked containers
    /// gone, or found them again). Reservations of launches still in flight are kept.
    pub fn resync_node(&self, store: &Store, node_id: &str) -> ApiResult<()> {
        let rows = store.container_reservations(Some(node_id))?;
        let mut inner = self.lock();
        let Some(&node) = inner.by_id.get(node_id) else {
            return Ok(());
        };
        let stale: Vec<String> = inner
            .held
            .iter()
            .filter(|(_, h)| h.node == node && h.committed)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(h) = inner.held.remove(&id) {
                inner.nodes[node].snap.release(h.res);
            }
        }
        for r in rows {
            self.hold(&mut inner, &r.id, &r.node_id, r.memory_mb, r.cpu_milli);
        }
        Ok(())
    }

    /// One node's scheduling view, for the API.
    fn view(&self, node_id: &str, now: i64) -> Option<(NodeState, NodeAllocation, bool)> {
        let inner = self.lock();
        let e = &inner.nodes[*inner.by_id.get(node_id)?];
        let state = match self.readiness(&e.live, now) {
            Readiness::Ready => NodeState::Ready,
            Readiness::Unreachable => NodeState::Unreachable,
            Readiness::Down => NodeState::Down,
        };
        let alloc = NodeAllocation {
            containers: e.snap.containers,
            memory_mb: e.snap.reserved.memory_mb,
            cpus: e.snap.reserved.cpu_milli as f64 / 1000.0,
            memory_capacity_mb: e.snap.capacity.memory_mb,
            cpu_capacity: e.snap.capacity.cpu_milli as f64 / 1000.0,
            images: e.snap.images.as_ref().map_or(0, |s| s.len()),
        };
        let schedulable = state == NodeState::Ready && !e.snap.cordoned && !e.snap.draining;
        Some((state, alloc, schedulable))
    }

    /// Containers counted on each node (for tests and the benchmark).
    pub fn counts(&self) -> BTreeMap<String, u32> {
        let inner = self.lock();
        inner
            .nodes
            .iter()
            .map(|e| (e.snap.id.clone(), e.snap.containers))
            .collect()
    }
}

/// [`scheduler::place`] over borrowed snapshots: the ledger keeps them inside its entries.
fn place_refs(
    nodes: &[&NodeSnapshot],
    req: &PlacementRequest,
    strategy: Strategy,
) -> ApiResult<usize> {
    // The scheduler is written over a slice of snapshots; the ledger's are not contiguous, so
    // it is run over a view that borrows them. Cloning 1,000 snapshots per launch (labels,
    // names) would cost more than the placement itself.
    match scheduler::place_by(nodes.len(), |i| nodes[i], req, strategy) {
        Ok(p) => Ok(p),
        Err(e) if e.unknown_node.is_some() => Err(ApiError::not_found(e.to_string())),
        Err(e) if req.node.is_some() && e.named_node_not_ready() => {
            Err(ApiError::node_unavailable(e.to_string()))
        }
        Err(e) => Err(ApiError::no_node(e.to_string())),
    }
}

/// A node id from an id or a name.
pub fn resolve_node(st: &AppState, id_or_name: &str) -> ApiResult<String> {
    if let Some(n) = st.store.node_by_id(id_or_name)? {
        return Ok(n.id);
    }
    if let Some(n) = st.store.node_by_name(id_or_name)? {
        return Ok(n.id);
    }
    Err(ApiError::not_found(format!("unknown node {id_or_name:?}")))
}

/// What a launch asks of the scheduler: the server's defaults fill in memory and cpu.
pub fn container_request(
    st: &AppState,
    req: &LaunchRequest,
    node: Option<String>,
) -> PlacementRequest {
    PlacementRequest {
        node: node.or_else(|| req.node.clone()),
        node_selector: req.node_selector.clone(),
        resources: Resources::new(
            req.memory_mb.unwrap_or(st.settings.defaults.memory_mb),
            req.cpus.unwrap_or(st.settings.defaults.cpus),
        ),
        takes_slot: true,
        image: Some(req.image.clone()),
    }
}

/// Reserves room for container `id` on the node the scheduler picks (or on `node`, which a
/// named network forces).
pub fn reserve_container(
    st: &AppState,
    id: &str,
    req: &LaunchRequest,
    node: Option<String>,
) -> ApiResult<Reservation> {
    st.placement
        .reserve(id, &container_request(st, req, node), req.placement)
}

/// The node a new network goes to: takes no slot and reserves nothing.
pub fn choose_network_node(
    st: &AppState,
    node: Option<&str>,
    node_selector: &BTreeMap<String, String>,
) -> ApiResult<String> {
    let req = PlacementRequest {
        node: node.map(str::to_string),
        node_selector: node_selector.clone(),
        takes_slot: false,
        ..Default::default()
    };
    Ok(st.placement.reserve("", &req, None)?.node_id().to_string())
}

/// Every known node with its live state.
pub fn nodes(st: &AppState) -> ApiResult<Vec<Node>> {
    let unknown = st.unknown_containers();
    let t = now();
    let mut out = Vec::new();
    for rec in st.store.list_nodes()? {
        out.push(node_view(st, rec, &unknown, t));
    }
    Ok(out)
}

/// One node, by id or name.
pub fn node(st: &AppState, id_or_name: &str) -> ApiResult<Node> {
    let id = resolve_node(st, id_or_name)?;
    let rec = st
        .store
        .node_by_id(&id)?
        .ok_or_else(|| ApiError::not_found(format!("unknown node {id_or_name:?}")))?;
    Ok(node_view(st, rec, &st.unknown_containers(), now()))
}

fn node_view(
    st: &AppState,
    rec: NodeRecord,
    unknown: &HashMap<String, Vec<String>>,
    t: i64,
) -> Node {
    let session = st.hub.get(&rec.id);
    let (state, allocation, schedulable) = st.placement.view(&rec.id, t).unwrap_or((
        NodeState::Down,
        NodeAllocation::default(),
        false,
    ));
    let labels = rec.effective_labels();
    let mut node = Node {
        id: rec.id.clone(),
        name: rec.name,
        state,
        public_address: rec.public_address,
        labels,
        max_containers: rec.max_containers,
        engine: rec.engine,
        status: Default::default(),
        agent_version: rec.agent_version,
        connected_at: None,
        last_heartbeat: None,
        unknown_containers: unknown.get(&rec.id).cloned().unwrap_or_default(),
        cordoned: rec.cordoned || rec.draining,
        draining: rec.draining,
        schedulable,
        allocation,
    };
    if let Some(s) = session {
        node.status = s.status();
        node.connected_at = Some(s.connected_at);
        node.last_heartbeat = Some(s.last_heartbeat());
    }
    node.status.containers = node.status.containers.max(node.allocation.containers);
    node
}
