//! Reconciling the store with a node's inventory (sent by the agent on every connect).
//!
//! Docker holds actual state. A container the store knows but the engine does not was removed
//! behind Kisara's back and is marked gone. Intent left by a launch that a crash interrupted
//! (rows in `launching`, networks without an engine id) is settled here: the engine's object is
//! adopted when it exists, and the intent dropped (with its subnet) when it does not and no
//! launch of this process is still working on it.
//!
//! A container that carries this cluster's label and this node's, but that the store does not
//! know at all and that no launch of this process is working on, is an *orphan*: a launch a
//! crash interrupted after its row was dropped, or a container made behind Kisara's back. It is
//! removed through the agent like any removal (with the network made for it), and
//! `container.orphan_removed` fires once; with `[server] orphans = "report"` it is only logged
//! and listed on the node. Containers of another cluster, or of another node of this cluster
//! sharing the engine, are never touched.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kisara_api::agent::{InventoryContainer, InventoryNetwork, Operation};
use kisara_api::{host_port_string, labels, Container, ContainerState};
use kisara_core::config::OrphanPolicy;
use kisara_store::OptionalExt;

use crate::AppState;

pub async fn reconcile_node(
    st: &Arc<AppState>,
    node_id: &str,
    containers: &[InventoryContainer],
    networks: &[InventoryNetwork],
) {
    settle_network_rows(st, node_id, networks);
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
            // `known` was read a while ago and this loop waits on the node: a launch of this
            // process settles its own row, and one that finished since is settled already.
            // In flight first, then a fresh read (a launch completes its row before it ends).
            if st.is_in_flight(&c.id) || !still_launching(st, &c.id) {
                continue;
            }
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
                None => {
                    for net in st.store.networks_owned_by(&c.id).unwrap_or_default() {
                        crate::api::networks::destroy(st, &net).await;
                    }
                    let _ = st.store.delete_container(&c.id);
                    dropped += 1;
                }
            }
            continue;
        }
        match by_docker.get(c.docker_id.as_str()) {
            Some(inv) => record_state(st, c, inv),
            // The inventory was taken before the store was read: a launch that completed in
            // between is not in it. Only the engine's own "no such container" makes it gone.
            None => match still_there(st, node_id, &c.docker_id).await {
                Some(Some(inv)) => record_state(st, c, &inv),
                Some(None) => {
                    gone += 1;
                    let _ = st.store.update_container_state(
                        &c.id,
                        ContainerState::Gone,
                        "removed outside Kisara",
                    );
                }
                None => {}
            },
        }
    }
    if gone > 0 {
        tracing::warn!(node = %node_id, gone, "containers removed behind Kisara's back");
    }
    if adopted + dropped > 0 {
        tracing::info!(node = %node_id, adopted, dropped, "settled interrupted launches");
    }
    let candidates: Vec<&InventoryContainer> = containers
        .iter()
        .filter(|c| {
            c.labels
                .get(labels::CONTAINER)
                .is_none_or(|id| !known_ids.contains(id))
        })
        .collect();
    sweep_orphans(st, node_id, &candidates).await;
    // A launch the crash interrupted may still be finishing on the engine (the agent lets its
    // operations finish for a bounded time only): its container would appear after this
    // inventory, with its intent already dropped. Look once more, later.
    if dropped > 0 {
        recheck_later(st, node_id);
    }
    // Networks of interrupted launches go once the orphans that used them are gone.
    remove_unknown_networks(st, node_id, networks).await;
    crate::api::services::reconcile_node(st, node_id).await;
}

/// Writes the state the engine reported for `c` when it differs from the row's. The report
/// may be older than the row (an inventory is, and the loop waits on the node): the state is
/// written only over the one it was compared with, never over a change made meanwhile (a stop
/// through the API).
fn record_state(st: &AppState, c: &Container, inv: &InventoryContainer) {
    let state = ContainerState::from_docker(&inv.state);
    if state != c.state {
        let _ = st
            .store
            .update_container_state_from(&c.id, c.state, state, &inv.status);
    }
}

/// Whether the store holds `id` in state `launching` right now.
fn still_launching(st: &AppState, id: &str) -> bool {
    matches!(st.store.get_container(id).optional(),
        Ok(Some(c)) if c.id == id && c.state == ContainerState::Launching)
}

/// Asks the node for a container the inventory did not list: `Some(Some(_))` it is there after
/// all, `Some(None)` the engine has no such container, `None` no clear answer (left as is).
async fn still_there(
    st: &Arc<AppState>,
    node_id: &str,
    docker_id: &str,
) -> Option<Option<InventoryContainer>> {
    if docker_id.is_empty() {
        return Some(None);
    }
    let r = st
        .hub
        .call(
            node_id,
            Operation::Inspect {
                docker_id: docker_id.to_string(),
            },
            REMOVE_TIMEOUT,
        )
        .await;
    match r {
        Ok(kisara_api::agent::Reply::Container(inv)) => Some(Some(inv)),
        Err(e) if e.code == kisara_api::codes::NOT_FOUND => Some(None),
        _ => None,
    }
}

/// Removes (or, with `orphans = "report"`, lists) the orphans among `candidates` (containers
/// on the node's engine); records what is left in place on the node.
async fn sweep_orphans(st: &Arc<AppState>, node_id: &str, candidates: &[&InventoryContainer]) {
    let mut unknown = Vec::new();
    let mut removed = 0;
    for &c in candidates {
        if c.labels.get(labels::CLUSTER) != Some(&st.cluster_id) {
            continue;
        }
        match orphan_verdict(st, node_id, c) {
            Verdict::Busy | Verdict::Known => {}
            Verdict::Report => unknown.push(c.docker_id.clone()),
            Verdict::Orphan if st.settings.orphans == OrphanPolicy::Report => {
                unknown.push(c.docker_id.clone())
            }
            Verdict::Orphan => {
                if remove_orphan(st, node_id, c).await {
                    removed += 1;
                } else {
                    unknown.push(c.docker_id.clone());
                }
            }
        }
    }
    if removed > 0 {
        tracing::warn!(node = %node_id, removed,
            "removed orphaned containers (labelled for this cluster and node, unknown to the store)");
    }
    if !unknown.is_empty() {
        tracing::warn!(node = %node_id, count = unknown.len(), ids = ?unknown,
            "labelled containers the store does not know (left in place)");
    }
    st.set_unknown_containers(node_id, unknown);
}

/// One more orphan sweep of the node after `[server] orphan_recheck_secs` (45 s by default:
/// longer than an agent lets its operations finish after a drop), on a fresh list of its
/// containers (skipped when the node is gone or the server stops first).
fn recheck_later(st: &Arc<AppState>, node_id: &str) {
    let st = st.clone();
    let node_id = node_id.to_string();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(st.settings.orphan_recheck) => {}
            _ = st.shutdown.cancelled() => return,
        }
        let listed = st
            .hub
            .call(&node_id, Operation::ListContainers, REMOVE_TIMEOUT)
            .await;
        match listed {
            Ok(kisara_api::agent::Reply::Containers(cs)) => {
                let all: Vec<&InventoryContainer> = cs.iter().collect();
                sweep_orphans(&st, &node_id, &all).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(node = %node_id, error = %e, "orphan recheck skipped");
            }
        }
    });
}

/// What to do with a labelled container of this cluster that the node's rows do not list.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// The store has a row for it (on some node, in some state).
    Known,
    /// A launch of this process is working on it (a container, or a service's member): hands
    /// off.
    Busy,
    /// Not provably an orphan of this node (no Kisara id or node label, another node's label,
    /// or the store could not be read): left in place and listed.
    Report,
    /// Unknown to the whole store, labelled for this node, and no launch is working on it.
    Orphan,
}

fn orphan_verdict(st: &AppState, node_id: &str, c: &InventoryContainer) -> Verdict {
    let in_flight = |key: &str| c.labels.get(key).is_some_and(|id| st.is_in_flight(id));
    if in_flight(labels::CONTAINER) || in_flight(labels::SERVICE) {
        return Verdict::Busy;
    }
    let Some(id) = c.labels.get(labels::CONTAINER) else {
        return Verdict::Report;
    };
    // Several nodes of one cluster may share an engine (test clusters do): another node's
    // container is that node's business.
    if c.labels.get(labels::NODE).map(String::as_str) != Some(node_id) {
        return Verdict::Report;
    }
    // Unknown by Kisara id and by engine id, on any node and in any state (a row found gone
    // whose container turns up again is not an orphan).
    for key in [id.as_str(), c.docker_id.as_str()] {
        match st.store.get_container(key).optional() {
            Ok(None) => {}
            Ok(Some(_)) => return Verdict::Known,
            Err(_) => return Verdict::Report,
        }
    }
    Verdict::Orphan
}

/// Removes an orphan through its node, as a normal removal would (forced, then the network
/// made for it and anything still held in its name). True when the engine no longer has it.
async fn remove_orphan(st: &Arc<AppState>, node_id: &str, c: &InventoryContainer) -> bool {
    let r = st
        .hub
        .call(
            node_id,
            Operation::Remove {
                docker_id: c.docker_id.clone(),
                force: true,
            },
            REMOVE_TIMEOUT,
        )
        .await;
    match r {
        Ok(_) => {}
        Err(e) if e.code == kisara_api::codes::NOT_FOUND => {}
        Err(e) => {
            tracing::warn!(node = %node_id, docker_id = %c.docker_id, error = %e,
                "could not remove an orphaned container");
            return false;
        }
    }
    if let Some(id) = c.labels.get(labels::CONTAINER) {
        for net in st.store.networks_owned_by(id).unwrap_or_default() {
            crate::api::networks::destroy(st, &net).await;
        }
        crate::gateway::release_container(st, id);
        st.placement.release(id);
    }
    st.events.container_orphan_removed(node_id, c);
    tracing::info!(node = %node_id, docker_id = %c.docker_id, name = %c.name.trim_start_matches('/'),
        container = ?c.labels.get(labels::CONTAINER), "orphaned container removed");
    true
}

/// Network rows written before the engine made them get their engine id, or are dropped (with
/// their subnet) when no launch of this process is still making them.
fn settle_network_rows(st: &Arc<AppState>, node_id: &str, networks: &[InventoryNetwork]) {
    let rows = st.store.list_networks(Some(node_id)).unwrap_or_default();
    let by_id = labelled_networks(st, networks);
    for row in &rows {
        if !row.docker_id.is_empty() {
            continue;
        }
        match by_id.get(row.id.as_str()) {
            Some(inv) => {
                let _ = st.store.set_network_docker_id(&row.id, &inv.docker_id);
            }
            // `rows` was read before this check: a create that finished since (its guard
            // gone) has its engine id now. In flight first, then a fresh read.
            None if !st.is_in_flight(&row.id) && still_without_engine_id(st, &row.id) => {
                if let Ok(subnet) = row.subnet.parse::<ipnet::Ipv4Net>() {
                    let _ = st.store.release_subnet(&subnet);
                }
                let _ = st.store.delete_network(&row.id);
            }
            None => {}
        }
    }
}

/// The network row is still an intent (no engine id), read now.
fn still_without_engine_id(st: &AppState, id: &str) -> bool {
    matches!(st.store.get_network(id).optional(),
        Ok(Some(n)) if n.id == id && n.docker_id.is_empty())
}

/// This cluster's networks on the engine, by Kisara id.
fn labelled_networks<'a>(
    st: &AppState,
    networks: &'a [InventoryNetwork],
) -> HashMap<&'a str, &'a InventoryNetwork> {
    networks
        .iter()
        .filter(|n| n.labels.get(labels::CLUSTER) == Some(&st.cluster_id))
        .filter_map(|n| n.labels.get(labels::NETWORK).map(|id| (id.as_str(), n)))
        .collect()
}

/// Labelled networks of this cluster that the store does not know are removed: they can only
/// come from a launch a crash interrupted (and the engine refuses while anything uses them).
async fn remove_unknown_networks(st: &Arc<AppState>, node_id: &str, networks: &[InventoryNetwork]) {
    let rows = st.store.list_networks(Some(node_id)).unwrap_or_default();
    let row_ids: HashSet<&str> = rows.iter().map(|n| n.id.as_str()).collect();
    for (id, inv) in labelled_networks(st, networks) {
        if row_ids.contains(id) || st.is_in_flight(id) {
            continue;
        }
        let r = st
            .hub
            .call(
                node_id,
                Operation::RemoveNetwork {
                    docker_id: inv.docker_id.clone(),
                },
                REMOVE_TIMEOUT,
            )
            .await;
        tracing::info!(node = %node_id, network = %inv.name, removed = r.is_ok(),
            "network of an interrupted launch");
    }
}

/// How long a node may take to remove an orphan or a network.
const REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
