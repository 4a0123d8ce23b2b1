//! The gateway: public listeners that carry players' connections to containers.
//!
//! Every gateway-mode port is a lease in the store (scope `gateway`) and a listener here. A
//! visitor's connection goes straight to the container's private address when the container's
//! node runs in this process (`kisara up`), and otherwise through a tunnel: the owning node's
//! agent is asked over its control channel to open a data connection of its own to this
//! server (`GET /v1/agent/tunnel/{id}`, upgraded to raw bytes) after it has connected to the
//! container, and the two are spliced. No helper container joins any tenant network, and a
//! container in gateway mode publishes no host port at all.
//!
//! Listeners are reopened from the leases when the server starts, and a sweeper releases the
//! leases of containers that are gone, lost with their node, or exited, closing their
//! listeners (Takina leaked those ports).

pub mod launch;
mod listen;
pub mod relay;
pub mod tunnel;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kisara_api::{Protocol, Traffic};
use kisara_core::exposure::GatewaySettings;
use kisara_tunnel::relay::Accounting;
use kisara_tunnel::{Bucket, Meter};

use crate::AppState;

/// How often leases are checked against their containers (and missing listeners reopened).
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Buckets for visitor → container and container → visitor.
type BucketPair = (Arc<Bucket>, Arc<Bucket>);

/// A listener task, aborted on drop.
struct Listener(tokio::task::JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The gateway's live state (leases themselves live in the store).
pub struct Gateway {
    pub settings: GatewaySettings,
    listeners: Mutex<HashMap<(Protocol, u16), Listener>>,
    /// Tunnels asked of an agent and not yet connected: id → (node, where the stream goes).
    pending: tunnel::Pending,
    /// Bytes and connections per container.
    meters: Mutex<HashMap<String, Arc<Meter>>>,
    /// A container's cap, each way.
    instance_buckets: Mutex<HashMap<String, BucketPair>>,
    /// A node's `network_in`/`network_out` caps, made from its hello.
    node_buckets: Mutex<HashMap<String, NodeBuckets>>,
    /// Names of nodes whose agent runs in this process: their containers are reached directly.
    direct_nodes: Mutex<HashSet<String>>,
}

#[derive(Clone)]
struct NodeBuckets {
    kbps: (Option<u64>, Option<u64>),
    limit_in: Option<Arc<Bucket>>,
    limit_out: Option<Arc<Bucket>>,
}

impl Gateway {
    pub fn new(settings: GatewaySettings) -> Gateway {
        Gateway {
            settings,
            listeners: Default::default(),
            pending: Default::default(),
            meters: Default::default(),
            instance_buckets: Default::default(),
            node_buckets: Default::default(),
            direct_nodes: Default::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.settings.enabled
    }

    /// Marks a node (by name) as running in this process: the gateway connects to its
    /// containers itself instead of asking its agent for a tunnel.
    pub fn add_direct_node(&self, name: &str) {
        if let Ok(mut d) = self.direct_nodes.lock() {
            d.insert(name.to_string());
        }
    }

    fn is_direct(&self, node_name: &str) -> bool {
        self.direct_nodes
            .lock()
            .map(|d| d.contains(node_name))
            .unwrap_or(false)
    }

    fn meter(&self, container_id: &str) -> Arc<Meter> {
        let mut m = self.meters.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(container_id.to_string()).or_default().clone()
    }

    /// What the gateway carried for a container, if anything.
    pub fn traffic(&self, container_id: &str) -> Option<Traffic> {
        let m = self.meters.lock().ok()?;
        let meter = m.get(container_id)?;
        Some(Traffic {
            bytes_in: meter.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            bytes_out: meter.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
            connections: meter.open.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Every container's traffic (for `/metrics`).
    pub fn all_traffic(&self) -> Vec<(String, Traffic)> {
        let keys: Vec<String> = self
            .meters
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        keys.into_iter()
            .filter_map(|k| self.traffic(&k).map(|t| (k, t)))
            .collect()
    }

    /// Counting and pacing for one visitor of `container_id` on `node_id`.
    fn accounting(&self, st: &AppState, container_id: &str, node_id: &str) -> Accounting {
        let mut acct = Accounting {
            meters: vec![self.meter(container_id)],
            ..Default::default()
        };
        if let Some((i, o)) = self
            .instance_buckets
            .lock()
            .ok()
            .and_then(|b| b.get(container_id).cloned())
        {
            acct.limit_in.push(i);
            acct.limit_out.push(o);
        }
        let nb = self.node_buckets(st, node_id);
        acct.limit_in.extend(nb.limit_in);
        acct.limit_out.extend(nb.limit_out);
        acct
    }

    /// The node's buckets, remade when its announced caps change.
    fn node_buckets(&self, st: &AppState, node_id: &str) -> NodeBuckets {
        let kbps = st
            .hub
            .get(node_id)
            .map(|s| {
                (
                    s.hello.exposure.network_in_kbps,
                    s.hello.exposure.network_out_kbps,
                )
            })
            .unwrap_or((None, None));
        let mut all = self.node_buckets.lock().unwrap_or_else(|p| p.into_inner());
        match all.get(node_id) {
            Some(b) if b.kbps == kbps => b.clone(),
            _ => {
                let b = NodeBuckets {
                    kbps,
                    limit_in: kbps
                        .0
                        .filter(|k| *k > 0)
                        .map(|k| Arc::new(Bucket::from_kbps(k))),
                    limit_out: kbps
                        .1
                        .filter(|k| *k > 0)
                        .map(|k| Arc::new(Bucket::from_kbps(k))),
                };
                all.insert(node_id.to_string(), b.clone());
                b
            }
        }
    }

    fn set_instance_cap(&self, container_id: &str, kbps: Option<u64>) {
        let Ok(mut b) = self.instance_buckets.lock() else {
            return;
        };
        match kbps.filter(|k| *k > 0) {
            Some(k) => {
                b.insert(
                    container_id.to_string(),
                    (
                        Arc::new(Bucket::from_kbps(k)),
                        Arc::new(Bucket::from_kbps(k)),
                    ),
                );
            }
            None => {
                b.remove(container_id);
            }
        }
    }

    fn forget_container(&self, container_id: &str) {
        if let Ok(mut b) = self.instance_buckets.lock() {
            b.remove(container_id);
        }
        if let Ok(mut m) = self.meters.lock() {
            m.remove(container_id);
        }
    }

    fn close_listener(&self, protocol: Protocol, port: u16) {
        let l = self
            .listeners
            .lock()
            .ok()
            .and_then(|mut l| l.remove(&(protocol, port)));
        drop(l);
    }

    fn has_listener(&self, protocol: Protocol, port: u16) -> bool {
        self.listeners
            .lock()
            .map(|l| l.contains_key(&(protocol, port)))
            .unwrap_or(false)
    }

    /// Ports listened on now (for tests and `kisara node inspect`-like views).
    pub fn listening(&self) -> Vec<(Protocol, u16)> {
        let mut v: Vec<_> = self
            .listeners
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Starts the gateway's background work: reopens the listeners of every gateway lease and
/// sweeps stale leases until the server shuts down.
pub fn start(st: &Arc<AppState>) -> Option<tokio::task::JoinHandle<()>> {
    let st = st.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = st.shutdown.cancelled() => break,
            }
            sweep(&st).await;
        }
        // Listeners stop with the server.
        if let Ok(mut l) = st.gateway.listeners.lock() {
            l.clear();
        }
    }))
}

/// Releases leases nobody can use any more and makes sure every gateway lease listens.
pub async fn sweep(st: &Arc<AppState>) {
    match st.store.stale_leases() {
        Ok(stale) => {
            for lease in stale {
                if let Ok(true) = st
                    .store
                    .release_lease(&lease.scope, lease.protocol, lease.port)
                {
                    tracing::info!(port = lease.port, protocol = %lease.protocol,
                        container = ?lease.container_id, "released the port of a container that is gone");
                }
                if lease.scope == kisara_store::GATEWAY_SCOPE {
                    st.gateway.close_listener(lease.protocol, lease.port);
                }
                if let Some(c) = &lease.container_id {
                    st.gateway.set_instance_cap(c, None);
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read port leases"),
    }
    if !st.gateway.enabled() || !st.gateway.settings.listen {
        return;
    }
    let leases = match st.store.list_leases() {
        Ok(l) => l,
        Err(_) => return,
    };
    for lease in leases {
        if lease.scope != kisara_store::GATEWAY_SCOPE
            || st.gateway.has_listener(lease.protocol, lease.port)
        {
            continue;
        }
        if let Some(c) = &lease.container_id {
            st.gateway.set_instance_cap(c, lease.rate_kbps);
        }
        if let Err(e) = listen::open(st, &lease).await {
            tracing::warn!(port = lease.port, protocol = %lease.protocol, error = %e,
                "cannot reopen a gateway listener; retrying");
        }
    }
}

/// Releases a container's leases and closes its listeners (on stop, removal, failed launch).
pub fn release_container(st: &AppState, container_id: &str) {
    match st.store.release_container_leases(container_id) {
        Ok(leases) => {
            for l in leases {
                if l.scope == kisara_store::GATEWAY_SCOPE {
                    st.gateway.close_listener(l.protocol, l.port);
                }
            }
        }
        Err(e) => tracing::warn!(container = %container_id, error = %e,
            "could not release the container's ports; the sweeper will"),
    }
    st.gateway.forget_container(container_id);
}
