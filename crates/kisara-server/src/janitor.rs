//! Background upkeep: nodes silent past their grace period have their containers marked lost;
//! expired instances are removed (by [`crate::instances::expiry_loop`], run from here).
//!
//! A lost container is not deleted: when its node comes back, the inventory reconciliation
//! sets its real state again (running, or gone if the engine lost it too).

use std::sync::Arc;

use kisara_api::ContainerState;

use crate::{now, AppState};

/// Marks the containers of nodes down past the grace period as lost. Returns how many.
pub fn mark_lost(st: &AppState) -> usize {
    let grace = st.settings.node_grace.as_secs() as i64;
    let t = now();
    let mut marked = 0;
    let Ok(nodes) = st.store.list_nodes() else {
        return 0;
    };
    for node in nodes {
        if st.hub.get(&node.id).is_some() || t - node.last_seen <= grace {
            continue;
        }
        let Ok(containers) = st.store.list_containers(None, None, Some(&node.id), false) else {
            continue;
        };
        st.events.node_down(&node.id, &node.name, node.last_seen);
        for c in containers {
            if matches!(
                c.state,
                ContainerState::Lost | ContainerState::Gone | ContainerState::Launching
            ) {
                continue;
            }
            if st
                .store
                .update_container_state(&c.id, ContainerState::Lost, "node down")
                .is_ok()
            {
                marked += 1;
                st.events.container_lost(&c, node.last_seen);
                tracing::warn!(container = %c.id, node = %node.name, "container lost with its node");
            }
        }
    }
    marked
}

/// Runs the upkeep until the server shuts down: the lost-node check every heartbeat
/// interval, and instance expiry on its own, faster tick (see [`crate::instances`]).
pub async fn run(st: Arc<AppState>) {
    tokio::join!(lost_nodes(st.clone()), crate::instances::expiry_loop(st));
}

async fn lost_nodes(st: Arc<AppState>) {
    let mut tick = tokio::time::interval(st.settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = st.shutdown.cancelled() => return,
        }
        mark_lost(&st);
    }
}
