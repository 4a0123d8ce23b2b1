//! Multi-container services: one row per service, beside the ordinary rows of its containers
//! and networks (so every container of a service is also listed, reconciled and evented like
//! any other). The row is written first, in `launching`, and its members are recorded as they
//! are made, so a crash mid-launch leaves intent that reconciliation removes.

use crate::WriteTx;
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::{Cached, Result, Store, StoreError};

pub(crate) const MIGRATION_SERVICES: &str = r#"
CREATE TABLE IF NOT EXISTS services (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    node_id TEXT NOT NULL,
    owner TEXT,
    module TEXT,
    state TEXT NOT NULL,
    members TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS services_owner ON services(owner, module);
CREATE INDEX IF NOT EXISTS services_node ON services(node_id);
"#;

/// A service's row.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceRecord {
    pub id: String,
    pub name: String,
    pub node_id: String,
    pub owner: Option<String>,
    pub module: Option<String>,
    /// [`SERVICE_LAUNCHING`] or [`SERVICE_UP`].
    pub state: String,
    pub members: ServiceMembers,
    pub created_at: i64,
}

pub const SERVICE_LAUNCHING: &str = "launching";
pub const SERVICE_UP: &str = "up";

/// What a service is made of, in start order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceMembers {
    #[serde(default)]
    pub containers: Vec<ServiceContainerMember>,
    #[serde(default)]
    pub networks: Vec<ServiceNetworkMember>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceContainerMember {
    /// Its name in the file.
    pub service: String,
    /// Kisara's container id (a row of the containers table).
    pub container_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceNetworkMember {
    /// Its name in the file.
    pub name: String,
    /// Kisara's network id.
    pub network_id: String,
    /// Made for this service (removed with it), else an existing network it joined.
    pub owned: bool,
}

const COLS: &str = "id, name, node_id, owner, module, state, members, created_at";

fn row(r: &Row<'_>) -> rusqlite::Result<ServiceRecord> {
    let members: String = r.get(6)?;
    Ok(ServiceRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        node_id: r.get(2)?,
        owner: r.get(3)?,
        module: r.get(4)?,
        state: r.get(5)?,
        members: serde_json::from_str(&members).unwrap_or_default(),
        created_at: r.get(7)?,
    })
}

impl Store {
    pub fn insert_service(&self, s: &ServiceRecord) -> Result<()> {
        Self::insert_service_on(&self.conn(), s)
    }

    fn insert_service_on(conn: &rusqlite::Connection, s: &ServiceRecord) -> Result<()> {
        let members = serde_json::to_string(&s.members).unwrap_or_else(|_| "{}".into());
        conn.exec(
            "INSERT INTO services(id, name, node_id, owner, module, state, members, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                s.id,
                s.name,
                s.node_id,
                s.owner,
                s.module,
                s.state,
                members,
                s.created_at
            ],
        )?;
        Ok(())
    }

    /// Admits a service as an instance: its row, its containers' intent rows (container,
    /// reserved memory MB, reserved CPU millis) and its instance record, in one transaction
    /// under `limits` (see [`Store::admit_instance`]). Nothing is written when refused.
    pub fn admit_service(
        &self,
        s: &ServiceRecord,
        containers: &[(kisara_api::Container, u64, u64)],
        rec: &crate::InstanceRecord,
        limits: &kisara_core::instances::AdmissionLimits,
    ) -> Result<()> {
        self.admit_instance(rec, limits, |tx| {
            Self::insert_service_on(tx, s)?;
            for (c, memory_mb, cpu_milli) in containers {
                Store::insert_container_on(tx, c, *memory_mb, *cpu_milli)?;
            }
            Ok(())
        })
    }

    /// Records the members made so far and the state.
    pub fn update_service(&self, s: &ServiceRecord) -> Result<()> {
        let members = serde_json::to_string(&s.members).unwrap_or_else(|_| "{}".into());
        let n = self.conn().exec(
            "UPDATE services SET state = ?2, members = ?3 WHERE id = ?1",
            params![s.id, s.state, members],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no such service: {}", s.id)));
        }
        Ok(())
    }

    /// By id, or by name when exactly one service has it.
    pub fn get_service(&self, key: &str) -> Result<ServiceRecord> {
        let conn = self.conn();
        let by_id = conn
            .row(
                &format!("SELECT {COLS} FROM services WHERE id = ?1"),
                [key],
                row,
            )
            .optional()?;
        if let Some(s) = by_id {
            return Ok(s);
        }
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLS} FROM services WHERE name = ?1 LIMIT 2"
        ))?;
        let found: Vec<ServiceRecord> = stmt
            .query_map([key], row)?
            .collect::<rusqlite::Result<_>>()?;
        match found.len() {
            1 => Ok(found.into_iter().next().expect("one element")),
            0 => Err(StoreError::NotFound(format!("no such service: {key}"))),
            _ => Err(StoreError::Conflict(format!(
                "several services are named {key:?}; use the id"
            ))),
        }
    }

    pub fn list_services(
        &self,
        owner: Option<&str>,
        module: Option<&str>,
        node_id: Option<&str>,
    ) -> Result<Vec<ServiceRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLS} FROM services
             WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR module = ?2)
               AND (?3 IS NULL OR node_id = ?3)
             ORDER BY created_at, id"
        ))?;
        let out = stmt
            .query_map(params![owner, module, node_id], row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(out)
    }

    /// Deletes a service's row and its instance record (lifetime, flags) with it.
    pub fn delete_service(&self, id: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        tx.exec("DELETE FROM services WHERE id = ?1", [id])?;
        tx.exec(
            "DELETE FROM instances WHERE id = ?1 AND kind = ?2",
            params![id, crate::KIND_SERVICE],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, owner: &str) -> ServiceRecord {
        ServiceRecord {
            id: id.into(),
            name: "chal".into(),
            node_id: "n1".into(),
            owner: Some(owner.into()),
            module: Some("web".into()),
            state: SERVICE_LAUNCHING.into(),
            members: ServiceMembers::default(),
            created_at: 1,
        }
    }

    #[test]
    fn round_trip_update_list_delete() {
        let store = Store::open_in_memory().unwrap();
        store.insert_service(&rec("s1", "t1")).unwrap();
        store.insert_service(&rec("s2", "t2")).unwrap();
        let mut s = store.get_service("s1").unwrap();
        s.state = SERVICE_UP.into();
        s.members.containers.push(ServiceContainerMember {
            service: "web".into(),
            container_id: "c1".into(),
        });
        store.update_service(&s).unwrap();
        assert_eq!(store.get_service("s1").unwrap(), s);
        assert_eq!(
            store.list_services(Some("t2"), None, None).unwrap().len(),
            1
        );
        assert_eq!(
            store
                .list_services(None, Some("web"), Some("n1"))
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            store.get_service("chal"),
            Err(StoreError::Conflict(_))
        ));
        store.delete_service("s1").unwrap();
        assert_eq!(store.get_service("chal").unwrap().id, "s2");
        assert!(matches!(
            store.get_service("s1"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn services_are_admitted_as_one_instance_and_free_it_when_deleted() {
        use crate::{InstanceRecord, KIND_SERVICE};
        use kisara_core::instances::AdmissionLimits;
        let store = Store::open_in_memory().unwrap();
        let limits = AdmissionLimits {
            quota_per_owner: Some(5),
            one_per_challenge: true,
            global_cap: None,
        };
        let member = |id: &str| -> kisara_api::Container {
            serde_json::from_value(serde_json::json!({
                "id": id, "docker_id": "", "name": format!("c-{id}"), "node_id": "n1",
                "image": "busybox", "owner": "t1", "module": "web", "labels": {},
                "network": null, "ip_address": null, "state": "launching", "status": "",
                "ports": [], "host_port": "", "created_at": 0
            }))
            .unwrap()
        };
        let inst = |id: &str| InstanceRecord {
            id: id.into(),
            kind: KIND_SERVICE.into(),
            owner: Some("t1".into()),
            module: Some("web".into()),
            ..Default::default()
        };
        let rows = [(member("s1-a"), 64, 100), (member("s1-b"), 64, 100)];
        store
            .admit_service(&rec("s1", "t1"), &rows, &inst("s1"), &limits)
            .unwrap();
        assert_eq!(store.instance("s1").unwrap().unwrap().kind, KIND_SERVICE);
        assert!(store.get_container("s1-b").is_ok());
        // One per (owner, challenge): the second is refused and writes nothing.
        let rows2 = [(member("s2-a"), 64, 100)];
        let e = store
            .admit_service(&rec("s2", "t1"), &rows2, &inst("s2"), &limits)
            .unwrap_err();
        assert!(matches!(e, StoreError::QuotaExceeded(_)), "{e}");
        assert!(store.get_service("s2").is_err());
        assert!(store.get_container("s2-a").is_err());
        assert!(store.instance("s2").unwrap().is_none());
        // Deleting the service drops its instance record, which frees the slot.
        store.delete_container("s1-a").unwrap();
        store.delete_container("s1-b").unwrap();
        store.delete_service("s1").unwrap();
        assert!(store.instance("s1").unwrap().is_none());
        store
            .admit_service(&rec("s2", "t1"), &rows2, &inst("s2"), &limits)
            .unwrap();
    }
}
