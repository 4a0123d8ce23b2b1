//! The warm network pool: a few spare networks kept ready on every node.
//!
//! Creating a bridge network costs the engine ~85 ms (bridge, iptables rules), a third of a
//! launch. A launch that needs a network of its own claims a spare in one store transaction
//! instead, and the pool is refilled in the background. Spares are ordinary pool networks
//! carrying the `io.kisara.spare` label and no owner; a claimed spare is owned by its container
//! and removed with it like any network made for one (never handed to a second tenant).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use kisara_api::{labels, Network};

use crate::{new_ordered_id, AppState};

/// Which nodes are being refilled right now (one refill task per node at a time).
#[derive(Default)]
pub struct WarmPool {
    refilling: Mutex<HashSet<String>>,
}

/// Takes a spare network of `node_id` for `owner`, and starts a refill.
pub fn claim(st: &Arc<AppState>, node_id: &str, owner: &str) -> Option<Network> {
    if st.settings.warm_networks == 0 {
        return None;
    }
    let net = match st.store.claim_spare_network(node_id, labels::SPARE, owner) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(node = %node_id, error = %e, "cannot claim a spare network");
            None
        }
    };
    refill(st, node_id);
    net
}

/// Claims a spare that is still being made, waiting a few seconds at most: used when the
/// pool's last subnets are held by spares in the making.
pub async fn wait_for_spare(st: &Arc<AppState>, node_id: &str, owner: &str) -> Option<Network> {
    let pending = |st: &AppState| {
        st.store
            .list_networks(Some(node_id))
            .map(|v| {
                v.iter().any(|n| {
                    n.owned_by.is_none()
                        && n.docker_id.is_empty()
                        && n.labels.contains_key(labels::SPARE)
                })
            })
            .unwrap_or(false)
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(net)) = st.store.claim_spare_network(node_id, labels::SPARE, owner) {
            refill(st, node_id);
            return Some(net);
        }
        if !pending(st) {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    None
}

/// Tops the node's spares up to the configured count, in the background.
pub fn refill(st: &Arc<AppState>, node_id: &str) {
    let target = st.settings.warm_networks as usize;
    // Nothing new is started once the server is stopping: a spare made now would only be
    // left for the next start to settle.
    if target == 0 || st.shutdown.is_cancelled() {
        return;
    }
    {
        let Ok(mut r) = st.warm.refilling.lock() else {
            return;
        };
        if !r.insert(node_id.to_string()) {
            return;
        }
    }
    let st = st.clone();
    let node_id = node_id.to_string();
    tokio::spawn(async move {
        loop {
            if st.shutdown.is_cancelled() || st.hub.get(&node_id).is_none() {
                break;
            }
            let have = match st.store.spare_count(&node_id, labels::SPARE) {
                Ok(n) => n,
                Err(_) => break,
            };
            if have >= target {
                break;
            }
            let mut l = BTreeMap::new();
            l.insert(labels::SPARE.to_string(), "true".to_string());
            let name = format!("kisara-net-{}", new_ordered_id());
            if let Err(e) = crate::api::networks::create_on_node(
                &st, &node_id, &name, None, false, false, None, l,
            )
            .await
            {
                // An exhausted pool or a busy node is not an error worth more than a debug
                // line: launches then create their networks themselves.
                tracing::debug!(node = %node_id, error = %e, "warm pool not refilled");
                break;
            }
        }
        if let Ok(mut r) = st.warm.refilling.lock() {
            r.remove(&node_id);
        }
    });
}
