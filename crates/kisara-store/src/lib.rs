//! Kisara's embedded store: SQLite in the data directory.
//!
//! (Written by the lead while kisara-core was in progress: extend it rather than replace it —
//! the server is built against exactly these methods.)
//!
//! The server owns desired state here; Docker holds actual state. Allocations (subnets) are
//! single transactions, so nothing is ever handed out twice, even with concurrent launches.
//! Calls are short and synchronous behind one connection; nothing outside this crate knows the
//! store is SQLite, so a larger installation can move it to PostgreSQL later.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;
use kisara_api::agent::Hello;
use kisara_api::{Container, ContainerState, EngineInfo, Network, PortBinding};
use kisara_core::pool::{SubnetPool, TakenSet};
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A node as the store remembers it (live state comes from its session).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub public_address: String,
    pub labels: BTreeMap<String, String>,
    pub max_containers: u32,
    pub engine: EngineInfo,
    pub agent_version: String,
    pub created_at: i64,
    pub last_seen: i64,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    credential_hash TEXT NOT NULL,
    public_address TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    max_containers INTEGER NOT NULL DEFAULT 0,
    engine TEXT NOT NULL DEFAULT '{}',
    agent_version TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS containers (
    id TEXT PRIMARY KEY,
    docker_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    name TEXT NOT NULL,
    image TEXT NOT NULL,
    owner TEXT,
    module TEXT,
    labels TEXT NOT NULL,
    network TEXT,
    ip_address TEXT,
    state TEXT NOT NULL,
    status TEXT NOT NULL,
    ports TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS containers_node ON containers(node_id);
CREATE INDEX IF NOT EXISTS containers_owner ON containers(owner);
CREATE INDEX IF NOT EXISTS containers_docker ON containers(docker_id);
CREATE TABLE IF NOT EXISTS networks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    docker_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    subnet TEXT NOT NULL,
    gateway TEXT,
    internal INTEGER NOT NULL,
    internet INTEGER NOT NULL,
    owned_by TEXT,
    from_pool INTEGER NOT NULL,
    labels TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS subnets (
    subnet TEXT PRIMARY KEY,
    holder TEXT NOT NULL
);
"#;

fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned + Default>(s: &str) -> T {
    serde_json::from_str(s).unwrap_or_default()
}

fn state_str(s: ContainerState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn state_from(s: &str) -> ContainerState {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .unwrap_or(ContainerState::Unknown)
}

impl Store {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        Self::init(conn)
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Store> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Corrupt(format!(
                "the database has schema {version}, newer than this Kisara ({SCHEMA_VERSION})"
            )));
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- meta ----

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    // ---- nodes ----

    pub fn create_node(&self, id: &str, name: &str, credential: &str, now: i64) -> Result<()> {
        let r = self.conn().execute(
            "INSERT INTO nodes(id, name, credential_hash, created_at, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![id, name, hash(credential), now],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!("a node named {name:?} exists")))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_node_credential(&self, id: &str, credential: &str) -> Result<()> {
        let n = self.conn().execute(
            "UPDATE nodes SET credential_hash = ?2 WHERE id = ?1",
            params![id, hash(credential)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("unknown node {id}")));
        }
        Ok(())
    }

    /// Whether `credential` is the node's, compared in constant time on hashes.
    pub fn node_credential_matches(&self, id: &str, credential: &str) -> Result<bool> {
        let stored: Option<String> = self
            .conn()
            .query_row(
                "SELECT credential_hash FROM nodes WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match stored {
            Some(h) => bool::from(h.as_bytes().ct_eq(hash(credential).as_bytes())),
            None => false,
        })
    }

    /// Records what a node said about itself when it connected.
    pub fn update_node_hello(&self, id: &str, hello: &Hello, now: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET public_address = ?2, labels = ?3, max_containers = ?4,
                 engine = ?5, agent_version = ?6, last_seen = ?7 WHERE id = ?1",
            params![
                id,
                hello.public_address,
                json(&hello.labels),
                hello.max_containers,
                json(&hello.engine),
                hello.agent_version,
                now
            ],
        )?;
        Ok(())
    }

    pub fn update_node_seen(&self, id: &str, now: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET last_seen = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }

    fn node_row(r: &Row<'_>) -> rusqlite::Result<NodeRecord> {
        Ok(NodeRecord {
            id: r.get(0)?,
            name: r.get(1)?,
            public_address: r.get(2)?,
            labels: from_json(&r.get::<_, String>(3)?),
            max_containers: r.get(4)?,
            engine: from_json(&r.get::<_, String>(5)?),
            agent_version: r.get(6)?,
            created_at: r.get(7)?,
            last_seen: r.get(8)?,
        })
    }

    const NODE_COLS: &'static str = "id, name, public_address, labels, max_containers, engine, \
                                     agent_version, created_at, last_seen";

    pub fn node_by_id(&self, id: &str) -> Result<Option<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes WHERE id = ?1", Self::NODE_COLS);
        Ok(self.conn().query_row(&sql, [id], Self::node_row).optional()?)
    }

    pub fn node_by_name(&self, name: &str) -> Result<Option<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes WHERE name = ?1", Self::NODE_COLS);
        Ok(self
            .conn()
            .query_row(&sql, [name], Self::node_row)
            .optional()?)
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes ORDER BY name", Self::NODE_COLS);
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([], Self::node_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    // ---- containers ----

    pub fn insert_container(&self, c: &Container) -> Result<()> {
        self.conn().execute(
            "INSERT INTO containers(id, docker_id, node_id, name, image, owner, module, labels,
                 network, ip_address, state, status, ports, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                c.id,
                c.docker_id,
                c.node_id,
                c.name,
                c.image,
                c.owner,
                c.module,
                json(&c.labels),
                c.network,
                c.ip_address,
                state_str(c.state),
                c.status,
                json(&c.ports),
                c.created_at
            ],
        )?;
        Ok(())
    }

    fn container_row(r: &Row<'_>) -> rusqlite::Result<Container> {
        let ports: Vec<PortBinding> = from_json(&r.get::<_, String>(12)?);
        Ok(Container {
            id: r.get(0)?,
            docker_id: r.get(1)?,
            node_id: r.get(2)?,
            name: r.get(3)?,
            image: r.get(4)?,
            owner: r.get(5)?,
            module: r.get(6)?,
            labels: from_json(&r.get::<_, String>(7)?),
            network: r.get(8)?,
            ip_address: r.get(9)?,
            state: state_from(&r.get::<_, String>(10)?),
            status: r.get(11)?,
            host_port: kisara_api::host_port_string(&ports),
            ports,
            created_at: r.get(13)?,
        })
    }

    const CONTAINER_COLS: &'static str = "id, docker_id, node_id, name, image, owner, module, \
        labels, network, ip_address, state, status, ports, created_at";

    /// By exact Kisara id, then exact name, then a Docker id prefix of at least 6 characters.
    pub fn get_container(&self, key: &str) -> Result<Container> {
        let conn = self.conn();
        let by = |col: &str| -> rusqlite::Result<Option<Container>> {
            let sql = format!(
                "SELECT {} FROM containers WHERE {col} = ?1",
                Self::CONTAINER_COLS
            );
            conn.query_row(&sql, [key], Self::container_row).optional()
        };
        if let Some(c) = by("id")? {
            return Ok(c);
        }
        if let Some(c) = by("name")? {
            return Ok(c);
        }
        let is_hex = key.len() >= 6 && key.chars().all(|c| c.is_ascii_hexdigit());
        if is_hex {
            let sql = format!(
                "SELECT {} FROM containers WHERE substr(docker_id, 1, ?2) = ?1 LIMIT 2",
                Self::CONTAINER_COLS
            );
            let mut stmt = conn.prepare(&sql)?;
            let found = stmt
                .query_map(params![key, key.len() as i64], Self::container_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            match found.len() {
                1 => return Ok(found.into_iter().next().expect("one")),
                0 => {}
                _ => {
                    return Err(StoreError::Conflict(format!(
                        "{key:?} matches more than one container; give more of the id"
                    )))
                }
            }
        }
        Err(StoreError::NotFound(format!("no such container: {key}")))
    }

    pub fn list_containers(
        &self,
        owner: Option<&str>,
        module: Option<&str>,
        node_id: Option<&str>,
        include_gone: bool,
    ) -> Result<Vec<Container>> {
        let sql = format!(
            "SELECT {} FROM containers
             WHERE (?1 IS NULL OR owner = ?1) AND (?2 IS NULL OR module = ?2)
               AND (?3 IS NULL OR node_id = ?3) AND (?4 OR state != 'gone')
             ORDER BY created_at, id",
            Self::CONTAINER_COLS
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![owner, module, node_id, include_gone],
            Self::container_row,
        )?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn update_container_state(
        &self,
        id: &str,
        state: ContainerState,
        status: &str,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE containers SET state = ?2, status = ?3 WHERE id = ?1",
            params![id, state_str(state), status],
        )?;
        Ok(())
    }

    pub fn delete_container(&self, id: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM containers WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- networks ----

    pub fn insert_network(&self, n: &Network) -> Result<()> {
        let r = self.conn().execute(
            "INSERT INTO networks(id, name, docker_id, node_id, subnet, gateway, internal,
                 internet, owned_by, from_pool, labels, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                n.id,
                n.name,
                n.docker_id,
                n.node_id,
                n.subnet,
                n.gateway,
                n.internal,
                n.internet,
                n.owned_by,
                n.from_pool,
                json(&n.labels),
                n.created_at
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "a network named {:?} already exists",
                    n.name
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn network_row(r: &Row<'_>) -> rusqlite::Result<Network> {
        Ok(Network {
            id: r.get(0)?,
            name: r.get(1)?,
            docker_id: r.get(2)?,
            node_id: r.get(3)?,
            subnet: r.get(4)?,
            gateway: r.get(5)?,
            internal: r.get(6)?,
            internet: r.get(7)?,
            owned_by: r.get(8)?,
            from_pool: r.get(9)?,
            labels: from_json(&r.get::<_, String>(10)?),
            created_at: r.get(11)?,
        })
    }

    const NETWORK_COLS: &'static str = "id, name, docker_id, node_id, subnet, gateway, internal, \
        internet, owned_by, from_pool, labels, created_at";

    /// By id, then by name.
    pub fn get_network(&self, key: &str) -> Result<Network> {
        let sql = format!(
            "SELECT {} FROM networks WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1",
            Self::NETWORK_COLS
        );
        self.conn()
            .query_row(&sql, [key], Self::network_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such network: {key}")))
    }

    pub fn list_networks(&self, node_id: Option<&str>) -> Result<Vec<Network>> {
        let sql = format!(
            "SELECT {} FROM networks WHERE (?1 IS NULL OR node_id = ?1) ORDER BY created_at, id",
            Self::NETWORK_COLS
        );
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![node_id], Self::network_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn delete_network(&self, id: &str) -> Result<()> {
        self.conn().execute("DELETE FROM networks WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- subnets ----

    fn allocated(tx: &rusqlite::Transaction<'_>) -> Result<Vec<Ipv4Net>> {
        let mut stmt = tx.prepare("SELECT subnet FROM subnets")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for s in rows {
            let s = s?;
            out.push(
                s.parse()
                    .map_err(|_| StoreError::Corrupt(format!("subnet {s:?}")))?,
            );
        }
        Ok(out)
    }

    /// Hands out the first subnet of `pool` that overlaps neither an allocation nor any of
    /// `extra_taken` (subnets the engine already uses), in one transaction.
    pub fn allocate_subnet(
        &self,
        pool: &SubnetPool,
        extra_taken: &[Ipv4Net],
        holder: &str,
    ) -> Result<Ipv4Net> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut taken = Self::allocated(&tx)?;
        taken.extend_from_slice(extra_taken);
        let taken = TakenSet::new(taken);
        let net = pool.next_free(&|n| taken.overlaps(n)).ok_or_else(|| {
            StoreError::Exhausted(format!(
                "the subnet pool {pool} is exhausted: every subnet is allocated or used on the \
                 engine"
            ))
        })?;
        tx.execute(
            "INSERT INTO subnets(subnet, holder) VALUES (?1, ?2)",
            params![net.to_string(), holder],
        )?;
        tx.commit()?;
        Ok(net)
    }

    /// Reserves an explicit subnet; `Conflict` if it overlaps one already allocated.
    pub fn reserve_subnet(&self, net: &Ipv4Net, holder: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let taken = Self::allocated(&tx)?;
        if let Some(t) = taken
            .iter()
            .find(|t| kisara_core::pool::overlaps(t, net))
        {
            return Err(StoreError::Conflict(format!(
                "subnet {net} overlaps {t}, already allocated"
            )));
        }
        tx.execute(
            "INSERT INTO subnets(subnet, holder) VALUES (?1, ?2)",
            params![net.to_string(), holder],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn release_subnet(&self, net: &Ipv4Net) -> Result<()> {
        self.conn()
            .execute("DELETE FROM subnets WHERE subnet = ?1", [net.to_string()])?;
        Ok(())
    }

    pub fn allocated_subnets(&self) -> Result<Vec<Ipv4Net>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let v = Self::allocated(&tx)?;
        tx.commit()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(s: &str) -> SubnetPool {
        SubnetPool::parse(&[s.to_string()], false).unwrap()
    }

    #[test]
    fn exhaustion_and_reuse() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-1].0/24");
        let a = st.allocate_subnet(&p, &[], "a").unwrap();
        let b = st.allocate_subnet(&p, &[], "b").unwrap();
        assert_ne!(a, b);
        assert!(matches!(
            st.allocate_subnet(&p, &[], "c"),
            Err(StoreError::Exhausted(_))
        ));
        st.release_subnet(&a).unwrap();
        assert_eq!(st.allocate_subnet(&p, &[], "d").unwrap(), a);
    }

    #[test]
    fn engine_subnets_are_skipped_by_overlap() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-3].0/24");
        let used: Ipv4Net = "10.9.0.0/23".parse().unwrap();
        assert_eq!(
            st.allocate_subnet(&p, &[used], "a").unwrap().to_string(),
            "10.9.2.0/24"
        );
        let explicit: Ipv4Net = "10.9.2.128/25".parse().unwrap();
        assert!(matches!(
            st.reserve_subnet(&explicit, "x"),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        {
            let st = Store::open(&path).unwrap();
            st.set_meta("cluster_id", "abc").unwrap();
            st.create_node("n1", "node-1", "cred", 1).unwrap();
        }
        let st = Store::open(&path).unwrap();
        assert_eq!(st.get_meta("cluster_id").unwrap().as_deref(), Some("abc"));
        assert!(st.node_credential_matches("n1", "cred").unwrap());
        assert!(!st.node_credential_matches("n1", "other").unwrap());
        assert!(!st.node_credential_matches("n2", "cred").unwrap());
        assert_eq!(st.node_by_name("node-1").unwrap().unwrap().id, "n1");
    }

    #[test]
    fn containers_by_id_name_and_prefix() {
        let st = Store::open_in_memory().unwrap();
        let mk = |id: &str, docker: &str, name: &str| Container {
            id: id.into(),
            docker_id: docker.into(),
            name: name.into(),
            node_id: "n".into(),
            image: "i".into(),
            owner: Some("t1".into()),
            module: None,
            labels: Default::default(),
            network: None,
            ip_address: None,
            state: ContainerState::Running,
            status: String::new(),
            ports: vec![],
            host_port: String::new(),
            created_at: 0,
        };
        st.insert_container(&mk("c1", "abcdef1234", "web")).unwrap();
        st.insert_container(&mk("c2", "abcdef9999", "db")).unwrap();
        assert_eq!(st.get_container("c1").unwrap().id, "c1");
        assert_eq!(st.get_container("db").unwrap().id, "c2");
        assert_eq!(st.get_container("abcdef99").unwrap().id, "c2");
        assert!(matches!(
            st.get_container("abcdef"),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            st.get_container("zzz"),
            Err(StoreError::NotFound(_))
        ));
        st.update_container_state("c2", ContainerState::Gone, "x")
            .unwrap();
        assert_eq!(st.list_containers(None, None, None, false).unwrap().len(), 1);
        assert_eq!(st.list_containers(None, None, None, true).unwrap().len(), 2);
        assert_eq!(
            st.list_containers(Some("t1"), None, Some("n"), true)
                .unwrap()
                .len(),
            2
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Release(usize),
    }

    proptest! {
        #[test]
        fn live_allocations_never_overlap(ops in prop::collection::vec(
            prop_oneof![Just(Op::Alloc), (0usize..16).prop_map(Op::Release)], 1..60)) {
            let st = Store::open_in_memory().unwrap();
            let p = SubnetPool::parse(&["10.7.[0-7].0/24".to_string()], false).unwrap();
            let mut live: Vec<Ipv4Net> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => {
                        if let Ok(n) = st.allocate_subnet(&p, &[], "h") {
                            for l in &live {
                                prop_assert!(!kisara_core::pool::overlaps(l, &n), "{n} overlaps {l}");
                            }
                            live.push(n);
                        }
                    }
                    Op::Release(i) => {
                        if !live.is_empty() {
                            let n = live.remove(i % live.len());
                            st.release_subnet(&n).unwrap();
                        }
                    }
                }
            }
        }
    }
}
