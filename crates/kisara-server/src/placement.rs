//! Which node a request goes to, and nodes' live view.
//!
//! This placement is deliberately simple (the least-loaded ready node with room left);
//! the pure, table-tested scheduler of the cluster issue replaces `choose_node`.

use std::collections::HashMap;

use kisara_api::{Node, NodeState};

use crate::error::{ApiError, ApiResult};
use crate::{now, AppState};

/// How many missed heartbeat intervals make a connected node unreachable.
const MISSED_HEARTBEATS: i64 = 3;

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

fn state_of(st: &AppState, node_id: &str, last_seen: i64) -> NodeState {
    let interval = st.settings.heartbeat_interval.as_secs().max(1) as i64;
    let t = now();
    match st.hub.get(node_id) {
        Some(s) if t - s.last_heartbeat() <= interval * MISSED_HEARTBEATS => NodeState::Ready,
        Some(_) => NodeState::Unreachable,
        None if t - last_seen <= st.settings.node_grace.as_secs() as i64 => NodeState::Unreachable,
        None => NodeState::Down,
    }
}

/// Every known node with its live state.
pub fn nodes(st: &AppState) -> ApiResult<Vec<Node>> {
    let counts = container_counts(st)?;
    let unknown = st.unknown_containers();
    let mut out = Vec::new();
    for rec in st.store.list_nodes()? {
        let session = st.hub.get(&rec.id);
        let state = state_of(st, &rec.id, rec.last_seen);
        let mut node = Node {
            id: rec.id.clone(),
            name: rec.name.clone(),
            state,
            public_address: rec.public_address.clone(),
            labels: rec.labels.clone(),
            max_containers: rec.max_containers,
            engine: rec.engine.clone(),
            status: Default::default(),
            agent_version: rec.agent_version.clone(),
            connected_at: None,
            last_heartbeat: None,
            unknown_containers: unknown.get(&rec.id).cloned().unwrap_or_default(),
        };
        if let Some(s) = session {
            node.status = s.status();
            node.connected_at = Some(s.connected_at);
            node.last_heartbeat = Some(s.last_heartbeat());
        }
        node.status.containers = node
            .status
            .containers
            .max(*counts.get(&rec.id).unwrap_or(&0));
        out.push(node);
    }
    Ok(out)
}

fn container_counts(st: &AppState) -> ApiResult<HashMap<String, u32>> {
    let mut m = HashMap::new();
    for c in st.store.list_containers(None, None, None, false)? {
        *m.entry(c.node_id).or_insert(0) += 1;
    }
    Ok(m)
}

/// The node a new object goes to: the one named (which must be ready and have room), or the
/// ready node with the fewest Kisara containers that is below its `max_containers`.
pub fn choose_node(st: &AppState, wanted: Option<&str>) -> ApiResult<String> {
    let counts = container_counts(st)?;
    let has_room = |n: &Node| {
        n.max_containers == 0 || counts.get(&n.id).copied().unwrap_or(0) < n.max_containers
    };
    let all = nodes(st)?;
    if let Some(w) = wanted {
        let id = resolve_node(st, w)?;
        let n = all
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ApiError::not_found(format!("unknown node {w:?}")))?;
        if n.state != NodeState::Ready {
            return Err(ApiError::node_unavailable(format!(
                "node {} is {:?}",
                n.name, n.state
            )));
        }
        if !has_room(n) {
            return Err(ApiError::no_node(format!(
                "node {} is full ({} containers)",
                n.name, n.max_containers
            )));
        }
        return Ok(id);
    }
    let mut reasons = Vec::new();
    let mut best: Option<(&Node, u32)> = None;
    for n in &all {
        if n.state != NodeState::Ready {
            reasons.push(format!("{}: {:?}", n.name, n.state));
            continue;
        }
        if !has_room(n) {
            reasons.push(format!("{}: full", n.name));
            continue;
        }
        let c = counts.get(&n.id).copied().unwrap_or(0);
        if best.is_none_or(|(_, bc)| c < bc) {
            best = Some((n, c));
        }
    }
    match best {
        Some((n, _)) => Ok(n.id.clone()),
        None if reasons.is_empty() => Err(ApiError::no_node("no node has joined the cluster")),
        None => Err(ApiError::no_node(format!(
            "no node can take it: {}",
            reasons.join("; ")
        ))),
    }
}
