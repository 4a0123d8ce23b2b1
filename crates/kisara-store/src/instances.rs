//! Instances: the lifecycle record beside a container (or a service) launched for an owner
//! and a challenge — its lifetime, renewals and flags — and AWD games.
//!
//! Admission limits (quota per owner, one per challenge, global cap) are counted in the same
//! transaction that writes the instance's rows, so concurrent launches can never pass a limit
//! together. An instance row goes with its container: a trigger deletes it when the container
//! row is deleted, whichever path deletes it (stop, remove, a dropped launch, expiry).

use crate::WriteTx;
use kisara_api::InstanceFlag;
use kisara_core::instances::AdmissionLimits;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{Cached, Result, Store, StoreError};

pub(crate) const MIGRATION_INSTANCES: &str = r#"
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    owner TEXT,
    module TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    deadline_at INTEGER,
    renewals INTEGER NOT NULL DEFAULT 0,
    flags TEXT NOT NULL DEFAULT '[]',
    awd_game TEXT,
    awd_team TEXT
);
CREATE INDEX IF NOT EXISTS instances_owner ON instances(owner, module);
CREATE INDEX IF NOT EXISTS instances_expiry ON instances(expires_at)
    WHERE expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS instances_awd ON instances(awd_game) WHERE awd_game IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS containers_delete_instance AFTER DELETE ON containers
    BEGIN DELETE FROM instances WHERE id = old.id AND kind = 'container'; END;
CREATE TABLE IF NOT EXISTS awd_games (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    node_id TEXT NOT NULL,
    network_id TEXT NOT NULL,
    spec TEXT NOT NULL,
    round INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL
);
"#;

/// What kind of object an instance is.
pub const KIND_CONTAINER: &str = "container";
/// A multi-container service (its id is the service's).
pub const KIND_SERVICE: &str = "service";

/// The lifecycle record of one instance. `Debug` masks the flags (see [`InstanceFlag`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstanceRecord {
    /// The container's or service's Kisara id.
    pub id: String,
    /// [`KIND_CONTAINER`] or [`KIND_SERVICE`].
    pub kind: String,
    pub owner: Option<String>,
    pub module: Option<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub deadline_at: Option<i64>,
    pub renewals: u32,
    pub flags: Vec<InstanceFlag>,
    /// Set on AWD gameboxes: the game's id and the team.
    pub awd_game: Option<String>,
    pub awd_team: Option<String>,
}

/// An AWD game as stored; `spec` is the creation request (JSON) minus nothing secret but the
/// flag template, which never leaves the server.
#[derive(Debug, Clone, PartialEq)]
pub struct AwdGameRecord {
    pub id: String,
    pub name: String,
    pub node_id: String,
    pub network_id: String,
    pub spec: String,
    pub round: u64,
    pub created_at: i64,
}

const INSTANCE_COLS: &str = "id, kind, owner, module, created_at, expires_at, deadline_at, \
    renewals, flags, awd_game, awd_team";

fn instance_row(r: &Row<'_>) -> rusqlite::Result<InstanceRecord> {
    let flags: String = r.get(8)?;
    Ok(InstanceRecord {
        id: r.get(0)?,
        kind: r.get(1)?,
        owner: r.get(2)?,
        module: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        deadline_at: r.get(6)?,
        renewals: r.get::<_, i64>(7)?.clamp(0, u32::MAX as i64) as u32,
        flags: serde_json::from_str(&flags).unwrap_or_default(),
        awd_game: r.get(9)?,
        awd_team: r.get(10)?,
    })
}

/// Live instances counted against limits: gameboxes are not, nor containers found gone.
const LIVE: &str = "awd_game IS NULL AND NOT EXISTS
    (SELECT 1 FROM containers c WHERE c.id = instances.id AND c.state = 'gone')";

fn count(tx: &Connection, owner: Option<&str>, module: Option<&str>) -> Result<u64> {
    let sql = format!(
        "SELECT count(*) FROM instances WHERE (?1 IS NULL OR owner = ?1)
           AND (?2 IS NULL OR module = ?2) AND {LIVE}"
    );
    let n: i64 = tx.row(&sql, params![owner, module], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Refuses the admission of `rec` when a limit would be passed.
fn check_limits(tx: &Connection, rec: &InstanceRecord, limits: &AdmissionLimits) -> Result<()> {
    if let Some(cap) = limits.global_cap {
        let n = count(tx, None, None)?;
        if n >= cap as u64 {
            return Err(StoreError::QuotaExceeded(format!(
                "the cluster runs {n} instances, its global cap is {cap}"
            )));
        }
    }
    let Some(owner) = rec.owner.as_deref() else {
        return Ok(());
    };
    if let Some(quota) = limits.quota_per_owner {
        let n = count(tx, Some(owner), None)?;
        if n >= quota as u64 {
            return Err(StoreError::QuotaExceeded(format!(
                "owner {owner:?} has {n} live instances, the quota per owner is {quota}"
            )));
        }
    }
    if limits.one_per_challenge {
        if let Some(module) = rec.module.as_deref() {
            let sql = format!(
                "SELECT id FROM instances WHERE owner = ?1 AND module = ?2 AND {LIVE} LIMIT 1"
            );
            let existing: Option<String> = tx
                .row(&sql, params![owner, module], |r| r.get(0))
                .optional()?;
            if let Some(existing) = existing {
                return Err(StoreError::QuotaExceeded(format!(
                    "owner {owner:?} already has an instance of challenge {module:?} ({existing}); \
                     one per challenge is allowed"
                )));
            }
        }
    }
    Ok(())
}

fn insert(tx: &Connection, rec: &InstanceRecord) -> Result<()> {
    tx.exec(
        &format!(
            "INSERT INTO instances({INSTANCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ),
        params![
            rec.id,
            rec.kind,
            rec.owner,
            rec.module,
            rec.created_at,
            rec.expires_at,
            rec.deadline_at,
            rec.renewals as i64,
            serde_json::to_string(&rec.flags).unwrap_or_else(|_| "[]".into()),
            rec.awd_game,
            rec.awd_team,
        ],
    )
    .map_err(|e| {
        if crate::is_constraint(&e) {
            StoreError::Conflict(format!("an instance with id {} exists", rec.id))
        } else {
            e.into()
        }
    })?;
    Ok(())
}

impl Store {
    /// Admits an instance: checks `limits`, then runs `rows` (which writes the instance's own
    /// rows: its container's intent row, or its service's) and records `rec`, all in one
    /// transaction. `QuotaExceeded` names the limit that was hit; nothing is written then.
    pub fn admit_instance(
        &self,
        rec: &InstanceRecord,
        limits: &AdmissionLimits,
        rows: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        check_limits(&tx, rec, limits)?;
        rows(&tx)?;
        insert(&tx, rec)?;
        tx.commit()?;
        Ok(())
    }

    /// Admits a container instance: its intent row (see [`Store::insert_container_reserved`])
    /// and its instance row, under `limits`.
    pub fn admit_container(
        &self,
        c: &kisara_api::Container,
        memory_mb: u64,
        cpu_milli: u64,
        rec: &InstanceRecord,
        limits: &AdmissionLimits,
    ) -> Result<()> {
        self.admit_instance(rec, limits, |tx| {
            Store::insert_container_on(tx, c, memory_mb, cpu_milli)
        })
    }

    /// [`Store::admit_container`] that, in the same transaction, also attaches the launch's
    /// idempotency key (`Conflict` when another container has it) and claims one spare
    /// network of the container's node for it (`spare`: the label spares carry). Returns the
    /// claimed spare; on any error nothing is written.
    pub fn admit_container_with(
        &self,
        c: &kisara_api::Container,
        reserved: (u64, u64),
        rec: &InstanceRecord,
        limits: &AdmissionLimits,
        idempotency_key: Option<&str>,
        spare: Option<&str>,
    ) -> Result<Option<kisara_api::Network>> {
        let mut claimed = None;
        self.admit_instance(rec, limits, |tx| {
            Store::insert_container_on(tx, c, reserved.0, reserved.1)?;
            if let Some(key) = idempotency_key {
                Store::set_idempotency_key_on(tx, &c.id, key)?;
            }
            if let Some(label) = spare {
                claimed = Store::claim_spare_on(tx, &c.node_id, label, &c.id)?;
            }
            Ok(())
        })?;
        Ok(claimed)
    }

    pub fn instance(&self, id: &str) -> Result<Option<InstanceRecord>> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1");
        Ok(self.conn().row(&sql, [id], instance_row).optional()?)
    }

    /// Every instance record (a list answer decorates its containers from these).
    pub fn list_instances(&self) -> Result<Vec<InstanceRecord>> {
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances ORDER BY created_at, id");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([], instance_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Instances whose expiry is at or before `now`, soonest first.
    pub fn expired_instances(&self, now: i64, limit: usize) -> Result<Vec<InstanceRecord>> {
        let sql = format!(
            "SELECT {INSTANCE_COLS} FROM instances
             WHERE expires_at IS NOT NULL AND expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
        );
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![now, limit as i64], instance_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Renews an instance atomically: `decide` sees the current record and answers the new
    /// expiry (or refuses); the renewal count goes up by one with it.
    pub fn renew_instance<E>(
        &self,
        id: &str,
        decide: impl FnOnce(&InstanceRecord) -> std::result::Result<i64, E>,
    ) -> Result<std::result::Result<InstanceRecord, E>> {
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        let sql = format!("SELECT {INSTANCE_COLS} FROM instances WHERE id = ?1");
        let mut rec = tx
            .row(&sql, [id], instance_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such instance: {id}")))?;
        let expires_at = match decide(&rec) {
            Ok(e) => e,
            Err(e) => return Ok(Err(e)),
        };
        rec.expires_at = Some(expires_at);
        rec.renewals = rec.renewals.saturating_add(1);
        tx.exec(
            "UPDATE instances SET expires_at = ?2, renewals = ?3 WHERE id = ?1",
            params![id, expires_at, rec.renewals as i64],
        )?;
        tx.commit()?;
        Ok(Ok(rec))
    }

    /// Replaces an instance's flags (AWD rotation).
    pub fn set_instance_flags(&self, id: &str, flags: &[InstanceFlag]) -> Result<()> {
        self.conn().exec(
            "UPDATE instances SET flags = ?2 WHERE id = ?1",
            params![
                id,
                serde_json::to_string(flags).unwrap_or_else(|_| "[]".into())
            ],
        )?;
        Ok(())
    }

    /// Records an instance outside admission (an AWD gamebox relaunched under a new id).
    pub fn insert_instance(&self, rec: &InstanceRecord) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        insert(&tx, rec)?;
        tx.commit()?;
        Ok(())
    }

    pub fn delete_instance(&self, id: &str) -> Result<()> {
        self.conn()
            .exec("DELETE FROM instances WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Gameboxes of an AWD game.
    pub fn awd_gameboxes(&self, game_id: &str) -> Result<Vec<InstanceRecord>> {
        let sql =
            format!("SELECT {INSTANCE_COLS} FROM instances WHERE awd_game = ?1 ORDER BY awd_team");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([game_id], instance_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    // ---- AWD games ----

    pub fn insert_awd_game(&self, g: &AwdGameRecord) -> Result<()> {
        let r = self.conn().exec(
            "INSERT INTO awd_games(id, name, node_id, network_id, spec, round, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                g.id,
                g.name,
                g.node_id,
                g.network_id,
                g.spec,
                g.round as i64,
                g.created_at
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(e) if crate::is_constraint(&e) => Err(StoreError::Conflict(format!(
                "an AWD game named {:?} exists",
                g.name
            ))),
            Err(e) => Err(e.into()),
        }
    }

    fn awd_row(r: &Row<'_>) -> rusqlite::Result<AwdGameRecord> {
        Ok(AwdGameRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            node_id: r.get(2)?,
            network_id: r.get(3)?,
            spec: r.get(4)?,
            round: r.get::<_, i64>(5)?.max(0) as u64,
            created_at: r.get(6)?,
        })
    }

    /// By id, then by name.
    pub fn awd_game(&self, key: &str) -> Result<AwdGameRecord> {
        let conn = self.conn();
        for col in ["id", "name"] {
            let sql = format!(
                "SELECT id, name, node_id, network_id, spec, round, created_at
                 FROM awd_games WHERE {col} = ?1"
            );
            if let Some(g) = conn.row(&sql, [key], Self::awd_row).optional()? {
                return Ok(g);
            }
        }
        Err(StoreError::NotFound(format!("no such AWD game: {key}")))
    }

    pub fn list_awd_games(&self) -> Result<Vec<AwdGameRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, node_id, network_id, spec, round, created_at
             FROM awd_games ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], Self::awd_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Moves a game to its next round; answers the new round.
    pub fn next_awd_round(&self, id: &str) -> Result<u64> {
        let conn = self.conn();
        conn.exec("UPDATE awd_games SET round = round + 1 WHERE id = ?1", [id])?;
        let round: i64 = conn
            .row("SELECT round FROM awd_games WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such AWD game: {id}")))?;
        Ok(round.max(0) as u64)
    }

    pub fn delete_awd_game(&self, id: &str) -> Result<()> {
        self.conn()
            .exec("DELETE FROM awd_games WHERE id = ?1", [id])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_api::{Container, ContainerState};

    fn container(id: &str, owner: &str, module: &str) -> Container {
        // From JSON, so that fields other crates add later take their defaults.
        let mut c: Container = serde_json::from_value(serde_json::json!({
            "id": id, "docker_id": "", "name": format!("c-{id}"), "node_id": "n1",
            "image": "busybox", "owner": owner, "module": module, "labels": {},
            "network": null, "ip_address": null, "state": "launching", "status": "",
            "ports": [], "host_port": "", "created_at": 0
        }))
        .expect("a minimal container parses");
        c.state = ContainerState::Launching;
        c
    }

    fn rec(c: &Container) -> InstanceRecord {
        InstanceRecord {
            id: c.id.clone(),
            kind: KIND_CONTAINER.into(),
            owner: c.owner.clone(),
            module: c.module.clone(),
            ..Default::default()
        }
    }

    fn admit(s: &Store, id: &str, owner: &str, module: &str, l: &AdmissionLimits) -> Result<()> {
        let c = container(id, owner, module);
        s.admit_container(&c, 0, 0, &rec(&c), l)
    }

    /// A ready spare of node `n1` (engine id set, no owner, the spare label).
    fn spare(s: &Store, id: &str) {
        let net: kisara_api::Network = serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("spare-{id}"), "docker_id": format!("d-{id}"),
            "node_id": "n1", "subnet": "10.9.0.0/28", "gateway": null, "internal": false,
            "internet": false, "owned_by": null, "from_pool": true,
            "labels": {"io.kisara.spare": "true"}, "created_at": 0
        }))
        .expect("a minimal network parses");
        s.insert_network(&net).unwrap();
    }

    #[test]
    fn admission_claims_a_spare_and_keys_the_launch_in_one_transaction() {
        let s = Store::open_in_memory().unwrap();
        let l = AdmissionLimits::default();
        spare(&s, "s1");
        spare(&s, "s2");
        let a = container("a", "t1", "web");
        let got = s
            .admit_container_with(
                &a,
                (64, 100),
                &rec(&a),
                &l,
                Some("k1"),
                Some("io.kisara.spare"),
            )
            .unwrap()
            .expect("a spare is claimed");
        assert_eq!(got.id, "s1");
        assert_eq!(s.get_network("s1").unwrap().owned_by.as_deref(), Some("a"));
        assert_eq!(
            s.container_by_idempotency_key("k1").unwrap().unwrap().id,
            "a"
        );
        // The same key again: refused, and nothing of it is left (no row, no instance, the
        // second spare still free).
        let b = container("b", "t2", "web");
        let e = s
            .admit_container_with(
                &b,
                (64, 100),
                &rec(&b),
                &l,
                Some("k1"),
                Some("io.kisara.spare"),
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        assert!(s.get_container("b").is_err());
        assert!(s.instance("b").unwrap().is_none());
        assert_eq!(s.get_network("s2").unwrap().owned_by, None);
        // Refused by a limit: the spare is not taken either.
        let quota = AdmissionLimits {
            global_cap: Some(1),
            ..Default::default()
        };
        let e = s
            .admit_container_with(
                &b,
                (64, 100),
                &rec(&b),
                &quota,
                None,
                Some("io.kisara.spare"),
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::QuotaExceeded(_)), "{e}");
        assert_eq!(s.get_network("s2").unwrap().owned_by, None);
        // No spare left after the last one: admitted without one.
        s.admit_container_with(&b, (64, 100), &rec(&b), &l, None, Some("io.kisara.spare"))
            .unwrap();
        let c = container("c", "t3", "web");
        let none = s
            .admit_container_with(&c, (64, 100), &rec(&c), &l, None, Some("io.kisara.spare"))
            .unwrap();
        assert!(none.is_none());
        assert_eq!(s.container_reservations(None).unwrap().len(), 3);
    }

    #[test]
    fn limits_are_enforced_and_named() {
        let s = Store::open_in_memory().unwrap();
        let l = AdmissionLimits {
            quota_per_owner: Some(2),
            one_per_challenge: true,
            global_cap: Some(3),
        };
        admit(&s, "a", "t1", "web", &l).unwrap();
        let e = admit(&s, "b", "t1", "web", &l).unwrap_err().to_string();
        assert!(e.contains("one per challenge"), "{e}");
        admit(&s, "b", "t1", "pwn", &l).unwrap();
        let e = admit(&s, "c", "t1", "misc", &l).unwrap_err().to_string();
        assert!(e.contains("quota per owner is 2"), "{e}");
        admit(&s, "c", "t2", "web", &l).unwrap();
        let e = admit(&s, "d", "t3", "web", &l).unwrap_err();
        assert!(matches!(e, StoreError::QuotaExceeded(_)), "{e}");
        // Nothing half-made: the refused container has no row.
        assert!(s.get_container("d").is_err());
        // Gone containers do not count; deleting a container drops its instance.
        s.update_container_state("a", ContainerState::Gone, "x")
            .unwrap();
        admit(&s, "d", "t3", "web", &l).unwrap();
        s.delete_container("b").unwrap();
        assert!(s.instance("b").unwrap().is_none());
        assert!(s.instance("c").unwrap().is_some());
    }

    #[test]
    fn expiry_and_renewal() {
        let s = Store::open_in_memory().unwrap();
        let c = container("a", "t1", "web");
        let r = InstanceRecord {
            expires_at: Some(100),
            flags: vec![InstanceFlag {
                target: "env:FLAG".into(),
                value: "flag{x}".into(),
            }],
            ..rec(&c)
        };
        s.admit_container(&c, 0, 0, &r, &AdmissionLimits::default())
            .unwrap();
        assert!(s.expired_instances(99, 10).unwrap().is_empty());
        assert_eq!(s.expired_instances(100, 10).unwrap()[0].id, "a");
        let renewed = s
            .renew_instance("a", |r| Ok::<_, ()>(r.expires_at.unwrap() + 50))
            .unwrap()
            .unwrap();
        assert_eq!((renewed.expires_at, renewed.renewals), (Some(150), 1));
        assert_eq!(s.renew_instance("a", |_| Err("no")).unwrap(), Err("no"));
        let back = s.instance("a").unwrap().unwrap();
        assert_eq!(back.renewals, 1);
        assert_eq!(back.flags[0].value, "flag{x}");
    }
}
