//! Crash-safe launches: a container's row is written before its node is asked to create it
//! (state `launching`), and networks' rows before the engine makes them, so a server killed at
//! any point leaves intent in the store that reconciliation settles against the node's
//! inventory: adopted when the engine has the object, dropped when it does not. Idempotency
//! keys live here too: a retried launch finds the first one's row.

use kisara_api::{Container, ContainerState};
use rusqlite::{params, Connection, OptionalExtension};

use crate::{Cached, Result, Store, StoreError};

pub(crate) const MIGRATION_LAUNCH: &str = r#"
ALTER TABLE containers ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS containers_idempotency
    ON containers(idempotency_key) WHERE idempotency_key IS NOT NULL;
"#;

impl Store {
    /// Attaches an idempotency key to a container row; `Conflict` when another row has it.
    pub fn set_idempotency_key(&self, id: &str, key: &str) -> Result<()> {
        Self::set_idempotency_key_on(&self.conn(), id, key)
    }

    /// [`Store::set_idempotency_key`] on a connection or inside a transaction.
    pub(crate) fn set_idempotency_key_on(conn: &Connection, id: &str, key: &str) -> Result<()> {
        let r = conn.exec(
            "UPDATE containers SET idempotency_key = ?2 WHERE id = ?1",
            params![id, key],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "idempotency key {key:?} is already used"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The container launched with this idempotency key, if any.
    pub fn container_by_idempotency_key(&self, key: &str) -> Result<Option<Container>> {
        let sql = format!(
            "SELECT {} FROM containers WHERE idempotency_key = ?1",
            Self::CONTAINER_COLS
        );
        Ok(self
            .conn()
            .row(&sql, [key], Self::container_row)
            .optional()?)
    }

    /// Fills in what the node reported once the container exists.
    pub fn complete_container(&self, c: &Container) -> Result<()> {
        Self::complete_container_on(&self.conn(), c)
    }

    /// [`Store::complete_container`] on a connection or inside a transaction.
    pub(crate) fn complete_container_on(conn: &Connection, c: &Container) -> Result<()> {
        let ports = serde_json::to_string(&c.ports).unwrap_or_else(|_| "[]".into());
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let n = conn
            .prepare_cached(
                "UPDATE containers SET docker_id = ?2, name = ?3, ip_address = ?4, state = ?5,
                 status = ?6, ports = ?7, network = ?8 WHERE id = ?1",
            )?
            .execute(params![
                c.id,
                c.docker_id,
                c.name,
                c.ip_address,
                state,
                c.status,
                ports,
                c.network
            ])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no such container: {}", c.id)));
        }
        Ok(())
    }

    /// Rows of a node still in `launching`.
    pub fn launching_containers(&self, node_id: &str) -> Result<Vec<Container>> {
        Ok(self
            .list_containers(None, None, Some(node_id), true)?
            .into_iter()
            .filter(|c| c.state == ContainerState::Launching)
            .collect())
    }

    /// Records the engine's id of a network whose row was written before it was made.
    pub fn set_network_docker_id(&self, id: &str, docker_id: &str) -> Result<()> {
        self.conn().exec(
            "UPDATE networks SET docker_id = ?2 WHERE id = ?1",
            params![id, docker_id],
        )?;
        Ok(())
    }

    /// Returns to the pool every subnet held by a network the store no longer has (a crash
    /// between allocation and the network's row). Run before serving.
    pub fn release_orphan_subnets(&self) -> Result<usize> {
        Ok(self.conn().exec(
            "DELETE FROM subnets WHERE holder != ?1
               AND holder NOT IN (SELECT id FROM networks)",
            [crate::EXTERNAL_HOLDER],
        )?)
    }
}
