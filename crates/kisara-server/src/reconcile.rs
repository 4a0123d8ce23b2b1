//! Reconciling the store with a node's inventory (sent by the agent on every connect).
//!
//! Docker holds actual state: a container the store knows but the engine does not was removed
//! behind Kisara's back and is marked gone; a labelled container the store does not know is
//! reported on the node (never silently adopted or deleted).

use std::collections::{HashMap, HashSet};

use kisara_api::agent::{InventoryContainer, InventoryNetwork};
use kisara_api::{labels, ContainerState};

use crate::AppState;

pub fn reconcile_node(
    st: &AppState,
    node_id: &str,
    containers: &[InventoryContainer],
    _networks: &[InventoryNetwork],
) {
    let by_docker: HashMap<&str, &InventoryContainer> = containers
        .iter()
        .map(|c| (c.docker_id.as_str(), c))
        .collect();
    let known = match st.store.list_containers(None, None, Some(node_id), false) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(node = %node_id, error = %e, "reconcile: cannot read store");
            return;
        }
    };
    let mut known_ids = HashSet::new();
    let mut gone = 0;
    for c in &known {
        known_ids.insert(c.id.clone());
        match by_docker.get(c.docker_id.as_str()) {
            Some(inv) => {
                let state = ContainerState::from_docker(&inv.state);
                if state != c.state {
                    let _ = st.store.update_container_state(&c.id, state, &inv.status);
                }
            }
            None => {
                gone += 1;
                let _ = st.store.update_container_state(
                    &c.id,
                    ContainerState::Gone,
                    "removed outside Kisara",
                );
            }
        }
    }
    let unknown: Vec<String> = containers
        .iter()
        .filter(|c| c.labels.get(labels::CLUSTER) == Some(&st.cluster_id))
        .filter(|c| {
            c.labels
                .get(labels::CONTAINER)
                .is_none_or(|id| !known_ids.contains(id))
        })
        .map(|c| c.docker_id.clone())
        .collect();
    if !unknown.is_empty() {
        tracing::warn!(node = %node_id, count = unknown.len(), ids = ?unknown,
            "labelled containers the store does not know");
    }
    if gone > 0 {
        tracing::warn!(node = %node_id, gone, "containers removed behind Kisara's back");
    }
    st.set_unknown_containers(node_id, unknown);
}
