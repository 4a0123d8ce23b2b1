//! Port leases: which public port exposes which container port.
//!
//! A lease is held in a *scope*: a node's host ports (`node:<id>`, host mode) or the gateway's
//! ports (`gateway`). Within a scope a port and protocol are leased at most once, enforced by
//! the primary key, and allocation reads and writes in one transaction, so two launches never
//! get the same port. Leases go with their container (or service) or with their node.

use crate::WriteTx;
use std::collections::BTreeSet;

use kisara_api::{ExposeMode, PortRange, Protocol};
use rusqlite::{params, Row};

use crate::{Cached, Result, Store, StoreError};

pub(crate) const MIGRATION_LEASES: &str = r#"
CREATE TABLE IF NOT EXISTS port_leases (
    scope TEXT NOT NULL,
    protocol TEXT NOT NULL,
    port INTEGER NOT NULL,
    mode TEXT NOT NULL,
    node_id TEXT NOT NULL,
    container_id TEXT,
    service_id TEXT,
    container_port INTEGER NOT NULL,
    rate_kbps INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (scope, protocol, port)
);
CREATE INDEX IF NOT EXISTS port_leases_container ON port_leases(container_id);
CREATE INDEX IF NOT EXISTS port_leases_node ON port_leases(node_id);
"#;

/// The scope of the gateway's ports.
pub const GATEWAY_SCOPE: &str = "gateway";

/// The scope of a node's host ports.
pub fn node_scope(node_id: &str) -> String {
    format!("node:{node_id}")
}

/// A public port leased to a container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub scope: String,
    pub protocol: Protocol,
    pub port: u16,
    pub mode: ExposeMode,
    /// The node running the container.
    pub node_id: String,
    pub container_id: Option<String>,
    pub service_id: Option<String>,
    pub container_port: u16,
    /// Bandwidth cap of the instance, kbit/s each way.
    pub rate_kbps: Option<u64>,
    pub created_at: i64,
}

/// What to lease: everything but the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub scope: String,
    pub protocol: Protocol,
    pub mode: ExposeMode,
    pub node_id: String,
    pub container_id: Option<String>,
    pub service_id: Option<String>,
    pub container_port: u16,
    pub rate_kbps: Option<u64>,
    /// Ports not to hand out this time (the engine said another program holds them).
    pub avoid: Vec<u16>,
}

/// The lowest port of `range` that is neither taken nor avoided. Pure: the allocator's rule,
/// property-tested on its own and used inside the store's transaction.
pub fn first_free(range: PortRange, taken: &BTreeSet<u16>, avoid: &[u16]) -> Option<u16> {
    (range.first..=range.last).find(|p| !taken.contains(p) && !avoid.contains(p))
}

fn protocol_str(p: Protocol) -> &'static str {
    p.as_str()
}

fn protocol_from(s: &str) -> Protocol {
    if s == "udp" {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}

const LEASE_COLS: &str = "scope, protocol, port, mode, node_id, container_id, service_id, \
                          container_port, rate_kbps, created_at";

fn lease_row(r: &Row<'_>) -> rusqlite::Result<Lease> {
    let protocol: String = r.get(1)?;
    let mode: String = r.get(3)?;
    let port: i64 = r.get(2)?;
    let container_port: i64 = r.get(7)?;
    let rate: Option<i64> = r.get(8)?;
    Ok(Lease {
        scope: r.get(0)?,
        protocol: protocol_from(&protocol),
        port: u16::try_from(port).unwrap_or(0),
        mode: mode.parse().unwrap_or_default(),
        node_id: r.get(4)?,
        container_id: r.get(5)?,
        service_id: r.get(6)?,
        container_port: u16::try_from(container_port).unwrap_or(0),
        rate_kbps: rate.and_then(|r| u64::try_from(r).ok()),
        created_at: r.get(9)?,
    })
}

impl Store {
    /// Leases one port per request from `range`, all in one transaction: either every
    /// request gets a port or none does (`Exhausted` names the scope and range).
    pub fn lease_ports(
        &self,
        range: PortRange,
        requests: &[LeaseRequest],
        now: i64,
    ) -> Result<Vec<Lease>> {
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        let mut out = Vec::with_capacity(requests.len());
        for req in requests {
            let taken: BTreeSet<u16> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT port FROM port_leases WHERE scope = ?1 AND protocol = ?2
                     AND port BETWEEN ?3 AND ?4",
                )?;
                let rows = stmt.query_map(
                    params![
                        req.scope,
                        protocol_str(req.protocol),
                        range.first,
                        range.last
                    ],
                    |r| r.get::<_, i64>(0),
                )?;
                let mut set = BTreeSet::new();
                for p in rows {
                    if let Ok(p) = u16::try_from(p?) {
                        set.insert(p);
                    }
                }
                set
            };
            let port = first_free(range, &taken, &req.avoid).ok_or_else(|| {
                StoreError::Exhausted(format!(
                    "no free {} port left in {range} ({})",
                    req.protocol,
                    if req.scope == GATEWAY_SCOPE {
                        "the gateway's port_range".to_string()
                    } else {
                        format!("port_range of node {}", req.node_id)
                    }
                ))
            })?;
            tx.exec(
                "INSERT INTO port_leases (scope, protocol, port, mode, node_id, container_id,
                     service_id, container_port, rate_kbps, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    req.scope,
                    protocol_str(req.protocol),
                    port,
                    req.mode.as_str(),
                    req.node_id,
                    req.container_id,
                    req.service_id,
                    req.container_port,
                    req.rate_kbps.map(|r| i64::try_from(r).unwrap_or(i64::MAX)),
                    now
                ],
            )?;
            out.push(Lease {
                scope: req.scope.clone(),
                protocol: req.protocol,
                port,
                mode: req.mode,
                node_id: req.node_id.clone(),
                container_id: req.container_id.clone(),
                service_id: req.service_id.clone(),
                container_port: req.container_port,
                rate_kbps: req.rate_kbps,
                created_at: now,
            });
        }
        tx.commit()?;
        Ok(out)
    }

    /// Gives one lease back; `false` when it was not held.
    pub fn release_lease(&self, scope: &str, protocol: Protocol, port: u16) -> Result<bool> {
        let n = self.conn().exec(
            "DELETE FROM port_leases WHERE scope = ?1 AND protocol = ?2 AND port = ?3",
            params![scope, protocol_str(protocol), port],
        )?;
        Ok(n > 0)
    }

    /// Gives back every lease of a container; returns what was released.
    pub fn release_container_leases(&self, container_id: &str) -> Result<Vec<Lease>> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        let leases = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {LEASE_COLS} FROM port_leases WHERE container_id = ?1"
            ))?;
            let rows = stmt.query_map([container_id], lease_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        tx.exec(
            "DELETE FROM port_leases WHERE container_id = ?1",
            [container_id],
        )?;
        tx.commit()?;
        Ok(leases)
    }

    /// Gives back every lease of a service.
    pub fn release_service_leases(&self, service_id: &str) -> Result<usize> {
        Ok(self.conn().exec(
            "DELETE FROM port_leases WHERE service_id = ?1",
            [service_id],
        )?)
    }

    /// Every lease, ordered by scope, protocol and port.
    pub fn list_leases(&self) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LEASE_COLS} FROM port_leases ORDER BY scope, protocol, port"
        ))?;
        let rows = stmt.query_map([], lease_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The leases of one container.
    pub fn container_leases(&self, container_id: &str) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {LEASE_COLS} FROM port_leases WHERE container_id = ?1 ORDER BY protocol, port"
        ))?;
        let rows = stmt.query_map([container_id], lease_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Leases whose container is gone from the store, is gone or lost, or has exited:
    /// nobody can be served through them any more.
    pub fn stale_leases(&self) -> Result<Vec<Lease>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {} FROM port_leases l WHERE l.container_id IS NOT NULL AND NOT EXISTS (
                 SELECT 1 FROM containers c WHERE c.id = l.container_id
                 AND c.state NOT IN ('gone', 'lost', 'exited', 'dead'))",
            LEASE_COLS
                .split(", ")
                .map(|c| format!("l.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
        let rows = stmt.query_map([], lease_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(scope: &str, proto: Protocol, container: &str) -> LeaseRequest {
        LeaseRequest {
            scope: scope.into(),
            protocol: proto,
            mode: ExposeMode::Gateway,
            node_id: "n1".into(),
            container_id: Some(container.into()),
            service_id: None,
            container_port: 80,
            rate_kbps: Some(512),
            avoid: vec![],
        }
    }

    #[test]
    fn lowest_free_then_exhausted_then_reused() {
        let s = Store::open_in_memory().unwrap();
        let range: PortRange = "40000-40002".parse().unwrap();
        let g = GATEWAY_SCOPE;
        let a = s
            .lease_ports(
                range,
                &[req(g, Protocol::Tcp, "a"), req(g, Protocol::Udp, "a")],
                1,
            )
            .unwrap();
        // TCP and UDP ports are separate spaces.
        assert_eq!((a[0].port, a[1].port), (40000, 40000));
        assert_eq!(a[0].rate_kbps, Some(512));
        let b = s
            .lease_ports(
                range,
                &[req(g, Protocol::Tcp, "b"), req(g, Protocol::Tcp, "b")],
                1,
            )
            .unwrap();
        assert_eq!((b[0].port, b[1].port), (40001, 40002));
        // Exhausted: nothing half-made (the UDP request of the same call is not kept).
        let e = s
            .lease_ports(
                range,
                &[req(g, Protocol::Udp, "c"), req(g, Protocol::Tcp, "c")],
                1,
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Exhausted(_)), "{e}");
        assert!(s.container_leases("c").unwrap().is_empty());
        // Another scope has its own ports.
        let n = s
            .lease_ports(range, &[req(&node_scope("n1"), Protocol::Tcp, "c")], 1)
            .unwrap();
        assert_eq!(n[0].port, 40000);
        // A released port is handed out again.
        assert_eq!(s.release_container_leases("a").unwrap().len(), 2);
        let d = s
            .lease_ports(range, &[req(g, Protocol::Tcp, "d")], 1)
            .unwrap();
        assert_eq!(d[0].port, 40000);
        // Avoided ports are skipped.
        s.release_container_leases("d").unwrap();
        let mut r = req(g, Protocol::Tcp, "e");
        r.avoid = vec![40000];
        assert!(
            s.lease_ports(range, &[r], 1).is_err(),
            "40000 avoided, the rest taken"
        );
    }

    #[test]
    fn stale_leases_are_those_without_a_live_container() {
        let s = Store::open_in_memory().unwrap();
        let range: PortRange = "40000-40010".parse().unwrap();
        s.lease_ports(range, &[req(GATEWAY_SCOPE, Protocol::Tcp, "nobody")], 1)
            .unwrap();
        let stale = s.stale_leases().unwrap();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].container_id.as_deref(), Some("nobody"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Lease { container: u8, udp: bool, n: u8 },
        Release { container: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6, any::<bool>(), 1u8..4).prop_map(|(container, udp, n)| Op::Lease {
                container,
                udp,
                n
            }),
            (0u8..6).prop_map(|container| Op::Release { container }),
        ]
    }

    proptest! {
        /// Whatever the order of leases and releases, no port is ever held twice in a scope
        /// and protocol, every lease is inside the range, and exhaustion happens exactly when
        /// the range is full.
        #[test]
        fn never_handed_out_twice(ops in proptest::collection::vec(op(), 1..60)) {
            let s = Store::open_in_memory().unwrap();
            let range: PortRange = "50000-50009".parse().unwrap();
            let mut held: std::collections::HashMap<(bool, u16), u8> = Default::default();
            for op in ops {
                match op {
                    Op::Lease { container, udp, n } => {
                        let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
                        let reqs: Vec<_> = (0..n)
                            .map(|_| req(GATEWAY_SCOPE, proto, &container.to_string()))
                            .collect();
                        let free = range.len() as usize
                            - held.keys().filter(|(u, _)| *u == udp).count();
                        match s.lease_ports(range, &reqs, 1) {
                            Ok(leases) => {
                                prop_assert!(n as usize <= free);
                                for l in leases {
                                    prop_assert!(range.contains(l.port));
                                    prop_assert!(held.insert((udp, l.port), container).is_none(),
                                        "port {} handed out twice", l.port);
                                }
                            }
                            Err(StoreError::Exhausted(_)) => prop_assert!(n as usize > free),
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Release { container } => {
                        let released = s.release_container_leases(&container.to_string()).unwrap();
                        for l in &released {
                            let udp = l.protocol == Protocol::Udp;
                            prop_assert_eq!(held.remove(&(udp, l.port)), Some(container));
                        }
                        prop_assert!(!held.values().any(|c| *c == container));
                    }
                }
            }
            prop_assert_eq!(s.list_leases().unwrap().len(), held.len());
        }

        #[test]
        fn first_free_is_free_and_lowest(
            taken in proptest::collection::btree_set(1000u16..1020, 0..20),
            avoid in proptest::collection::vec(1000u16..1020, 0..5),
        ) {
            let range = PortRange { first: 1000, last: 1019 };
            match first_free(range, &taken, &avoid) {
                Some(p) => {
                    prop_assert!(range.contains(p) && !taken.contains(&p) && !avoid.contains(&p));
                    prop_assert!((1000..p).all(|q| taken.contains(&q) || avoid.contains(&q)));
                }
                None => prop_assert!((1000..1020).all(|q| taken.contains(&q) || avoid.contains(&q))),
            }
        }
    }
}
