//! Reconciling the store with a node's inventory (sent by the agent on every connect).
//!
//! Docker holds actual state. A container the store knows but the engine does not was removed
//! behind Kisara's back and is marked gone; a labelled container the store does not know is
//! reported on the node (never silently adopted or deleted). Intent left by a launch that a
//! crash interrupted (rows in `launching`, networks without an engine id) is settled here: the
//! engine's object is adopted when it exists, and the intent dropped (with its subnet) when it
//! does not and no launch of this process is still working on it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kisara_api::agent::{InventoryContainer, InventoryNetwork};
use kisara_api::{host_port_string, labels, ContainerState};

use crate::AppState;

pub async fn reconcile_node(
    st: &Arc<AppState>,
    node_id: &str,
    containers: &[InventoryContainer],
    networks: &[InventoryNetwork],
) {
    settle_networks(st, node_id, networks).await;
    let by_docker: HashMap<&str, &InventoryContainer> = containers
        .iter()
        .map(|c| (c.docker_id.as_str(), c))
        .collect();
    let by_kisara_id: HashMap<&str, &InventoryContainer> = containers
        .iter()
        .filter(|c| c.labels.get(labels::CLUSTER) == Some(&st.cluster_id))
        .filter_map(|c| c.labels.get(labels::CONTAINER).map(|id| (id.as_str(), c)))
        .collect();
    let known = match st.store.list_containers(None, None, Some(node_id), false) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(node = %node_id, error = %e, "reconcile: cannot read store");
            return;
        }
    };
    let public_address = st
        .hub
        .get(node_id)
        .map(|s| s.hello.public_address.clone())
        .unwrap_or_default();
    let mut known_ids = HashSet::new();
    let (mut gone, mut adopted, mut dropped) = (0, 0, 0);
    for c in &known {
        known_ids.insert(c.id.clone());
        if c.state == ContainerState::Launching {
            match by_kisara_id.get(c.id.as_str()) {
                Some(inv) => {
                    let mut done = c.clone();
                    done.docker_id = inv.docker_id.clone();
                    done.name = inv.name.trim_start_matches('/').to_string();
                    done.ip_address = inv.ip_address.clone();
                    done.network = inv.network.clone().or(done.network);
                    done.state = ContainerState::from_docker(&inv.state);
                    done.status = inv.status.clone();
                    done.ports =
                        crate::gateway::launch::adopted_bindings(st, &c.id, inv, &public_address);
                    done.host_port = host_port_string(&done.ports);
                    if st.store.complete_container(&done).is_ok() {
                        adopted += 1;
                    }
                }
                // Intent that no launch of this process is working on was interrupted (by a
                // crash or restart) and is abandoned; a launch still under way is left alone.
                None if !st.is_in_flight(&c.id) => {
                    for net in st.store.networks_owned_by(&c.id).unwrap_or_default() {
                        crate::api::networks::destroy(st, &net).await;
                    }
                    let _ = st.store.delete_container(&c.id);
                    dropped += 1;
                }
                None => {}
            }
            continue;
        }
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
    if adopted + dropped > 0 {
        tracing::info!(node = %node_id, adopted, dropped, "settled interrupted launches");
    }
    st.set_unknown_containers(node_id, unknown);
    crate::api::services::reconcile_node(st, node_id).await;
}

/// Networks: rows written before the engine made them get their engine id, or are dropped;
/// labelled networks of this cluster that the store does not know are removed (they can only
/// come from a launch a crash interrupted, and the engine refuses while anything uses them).
async fn settle_networks(st: &Arc<AppState>, node_id: &str, networks: &[InventoryNetwork]) {
    let rows = st.store.list_networks(Some(node_id)).unwrap_or_default();
    let row_ids: HashSet<&str> = rows.iter().map(|n| n.id.as_str()).collect();
    let by_id: HashMap<&str, &InventoryNetwork> = networks
        .iter()
        .filter(|n| n.labels.get(labels::CLUSTER) == Some(&st.cluster_id))
        .filter_map(|n| n.labels.get(labels::NETWORK).map(|id| (id.as_str(), n)))
        .collect();
    for row in &rows {
        if !row.docker_id.is_empty() {
            continue;
        }
        match by_id.get(row.id.as_str()) {
            Some(inv) => {
                let _ = st.store.set_network_docker_id(&row.id, &inv.docker_id);
            }
            None if !st.is_in_flight(&row.id) => {
                if let Ok(subnet) = row.subnet.parse::<ipnet::Ipv4Net>() {
                    let _ = st.store.release_subnet(&subnet);
                }
                let _ = st.store.delete_network(&row.id);
            }
            None => {}
        }
    }
    for (id, inv) in &by_id {
        if !row_ids.contains(id) {
            let r = st
                .hub
                .call(
                    node_id,
                    kisara_api::agent::Operation::RemoveNetwork {
                        docker_id: inv.docker_id.clone(),
                    },
                    std::time::Duration::from_secs(30),
                )
                .await;
            tracing::info!(node = %node_id, network = %inv.name, removed = r.is_ok(),
                "network of an interrupted launch");
        }
    }
}
