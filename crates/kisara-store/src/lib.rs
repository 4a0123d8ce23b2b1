//! Kisara's embedded store: SQLite in the data directory.
//!
//! The server owns desired state here; Docker holds actual state. Allocations (subnets) are
//! single transactions, so nothing is ever handed out twice, even with concurrent launches.
//! Calls are short and synchronous behind one connection; nothing outside this crate knows the
//! store is SQLite, so a larger installation can move it to PostgreSQL later.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use kisara_api::agent::Hello;
use kisara_api::{Container, ContainerState, EngineInfo, Network, PortBinding};
use kisara_core::pool::{SubnetPool, TakenIndex, TakenSet};
use rusqlite::{params, Connection, OptionalExtension, Row};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

mod events;
mod group;
mod instances;
mod launch;
mod leases;
mod services;
pub use events::{AttemptOutcome, DeliveryCounts, PendingDelivery, WebhookRecord};
pub use group::Ticket;
pub use instances::{AwdGameRecord, InstanceRecord, KIND_CONTAINER, KIND_SERVICE};
pub use leases::{first_free, node_scope, Lease, LeaseRequest, GATEWAY_SCOPE};
pub use services::{
    ServiceContainerMember, ServiceMembers, ServiceNetworkMember, ServiceRecord, SERVICE_LAUNCHING,
    SERVICE_UP,
};

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
    /// An admission limit (quota per owner, one per challenge, global cap) was hit.
    #[error("{0}")]
    QuotaExceeded(String),
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
    /// Set by the operator: nothing new is placed here.
    pub cordoned: bool,
    /// Set by the operator: cordoned and being emptied.
    pub draining: bool,
    /// The operator's label changes over the agent's labels: a value sets, `None` removes.
    pub label_overrides: BTreeMap<String, Option<String>>,
}

impl NodeRecord {
    /// The agent's labels with the operator's changes applied.
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        for (k, v) in &self.label_overrides {
            match v {
                Some(v) => labels.insert(k.clone(), v.clone()),
                None => labels.remove(k),
            };
        }
        labels
    }
}

#[derive(Clone)]
pub struct Store {
    /// The one connection, and the deferred transaction open on it (see [`group`]).
    db: Arc<Mutex<group::Db>>,
    group: Arc<group::Group>,
    /// Set when the commit thread could not start: writes are then never deferred.
    no_committer: Arc<std::sync::atomic::AtomicBool>,
    /// The subnets table in memory (locked after `conn`, never before).
    subnets: Arc<Mutex<Option<SubnetCache>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

/// How much of the database file is read through a memory map (a larger file is read past
/// it as usual). About 1 KiB per container and its rows, so a million containers.
const MMAP_SIZE: i64 = 1 << 30;
/// SQLite's page cache, in KiB (a negative `cache_size`): pages in the WAL and pages being
/// written; the rest is read through the map.
const CACHE_KIB: i64 = -4096;

/// How often the checkpoint thread copies the WAL into the database.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// WAL pages after which a commit checkpoints inline (SQLite's default is 1,000): reached only
/// when the checkpoint thread falls far behind.
const AUTOCHECKPOINT_BACKSTOP: i64 = 16_384;

/// Schema migrations, tracked in SQLite's `user_version`: entry `i` takes a database from
/// version `i` to `i + 1`. Append only; never edit a step that has shipped, since files written
/// by it exist.
const MIGRATIONS: &[&str] = &[
    MIGRATION_1,
    MIGRATION_2,
    events::MIGRATION_EVENTS,
    MIGRATION_SCHEDULING,
    launch::MIGRATION_LAUNCH,
    services::MIGRATION_SERVICES,
    leases::MIGRATION_LEASES,
    instances::MIGRATION_INSTANCES,
    MIGRATION_SPARE_INDEX,
    MIGRATION_NO_DOCKER_ID_INDEX,
];

/// No query ever used `containers_docker` (the docker-id prefix lookup compares a substring,
/// which no index serves), yet every launch changed it twice: its row went in with an empty
/// docker id and got the engine's id when the container ran. Those entries churned (every
/// launch in flight sat in the empty id's run), splitting and merging the index's pages.
const MIGRATION_NO_DOCKER_ID_INDEX: &str = r#"
DROP INDEX IF EXISTS containers_docker;
"#;

/// The warm pool reads a node's unclaimed networks after every launch, and a launch claims
/// the oldest: an index over exactly those rows, in that order. Without it SQLite chose
/// between `networks_node` (every network the node ever had) and `networks_owned_by`
/// (every unclaimed network of every node), and either grew with the cluster.
const MIGRATION_SPARE_INDEX: &str = r#"
CREATE INDEX IF NOT EXISTS networks_unclaimed ON networks(node_id, created_at, id)
    WHERE owned_by IS NULL;
"#;

const MIGRATION_1: &str = r#"
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

/// The Kisara network a container is attached to, when the container was (or the Docker
/// network it names) found gone, and when a subnet was handed out.
const MIGRATION_2: &str = r#"
ALTER TABLE containers ADD COLUMN network_id TEXT;
ALTER TABLE containers ADD COLUMN removed_at INTEGER;
ALTER TABLE subnets ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS containers_name ON containers(name);
CREATE INDEX IF NOT EXISTS networks_node ON networks(node_id);
CREATE INDEX IF NOT EXISTS networks_owned_by ON networks(owned_by);
"#;

/// Scheduling: the operator's flags and label changes on nodes, and what each container
/// reserved (so the server's allocation ledger can be rebuilt at start).
const MIGRATION_SCHEDULING: &str = r#"
ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN label_overrides TEXT NOT NULL DEFAULT '{}';
ALTER TABLE containers ADD COLUMN memory_mb INTEGER NOT NULL DEFAULT 0;
ALTER TABLE containers ADD COLUMN cpu_milli INTEGER NOT NULL DEFAULT 0;
"#;

/// What one container reserved on its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerReservation {
    pub id: String,
    pub node_id: String,
    pub memory_mb: u64,
    pub cpu_milli: u64,
}

/// `holder` of subnets that an engine reported in use outside Kisara (see
/// [`Store::mark_subnet_external`]).
pub const EXTERNAL_HOLDER: &str = "external";

/// One row of the subnet allocation table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetAllocation {
    pub subnet: Ipv4Net,
    /// Who holds it: a network or container id, or [`EXTERNAL_HOLDER`].
    pub holder: String,
    /// Unix seconds; 0 for rows written before this was recorded.
    pub created_at: i64,
}

/// The subnets table in memory, so an allocation neither reads every row nor walks the pool
/// from its start. Valid while `generation` matches the counter that triggers on the table
/// keep (see `Store::init`); any change it did not make itself reloads it.
pub(crate) struct SubnetCache {
    generation: i64,
    taken: TakenIndex,
    /// Per pool: the lowest position in it that may be free.
    hints: Vec<(SubnetPool, u64)>,
}

impl SubnetCache {
    fn hint(&self, pool: &SubnetPool) -> u64 {
        self.hints
            .iter()
            .find(|(p, _)| p == pool)
            .map_or(0, |(_, h)| *h)
    }

    fn set_hint(&mut self, pool: &SubnetPool, hint: u64) {
        match self.hints.iter_mut().find(|(p, _)| p == pool) {
            Some((_, h)) => *h = hint,
            None => self.hints.push((pool.clone(), hint)),
        }
    }

    /// A subnet came free: positions at or after it may be free again.
    fn freed(&mut self, net: &Ipv4Net) {
        for (pool, hint) in &mut self.hints {
            match pool.position(net) {
                Some(pos) => *hint = (*hint).min(pos),
                // A subnet outside the pool can still have blocked pool members.
                None => *hint = 0,
            }
        }
    }
}

fn subnet_generation(conn: &Connection) -> Result<i64> {
    Ok(conn.row("SELECT n FROM temp.subnet_generation", [], |r| r.get(0))?)
}

const STATEMENT_CACHE: usize = 256;

/// Statements through the connection's prepared-statement cache: the store runs the same few
/// dozen statements over and over, and parsing each anew cost more than running it.
pub(crate) trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// A transaction that nests: a real one when the connection has none open, else a savepoint
/// inside the open one (a deferred group transaction, see [`group`]). Either way it commits
/// with [`Tx::commit`] and rolls back when dropped.
pub(crate) enum Tx<'c> {
    Top(rusqlite::Transaction<'c>),
    Nested(rusqlite::Savepoint<'c>),
}

impl Tx<'_> {
    pub(crate) fn commit(self) -> rusqlite::Result<()> {
        match self {
            Tx::Top(t) => t.commit(),
            Tx::Nested(s) => s.commit(),
        }
    }
}

impl std::ops::Deref for Tx<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            Tx::Top(t) => t,
            Tx::Nested(s) => s,
        }
    }
}

pub(crate) trait WriteTx {
    /// A transaction taking the write lock at once (`BEGIN IMMEDIATE`), or a savepoint.
    fn write_tx(&mut self) -> rusqlite::Result<Tx<'_>>;
    /// A transaction that takes locks as it goes (`BEGIN DEFERRED`), or a savepoint.
    fn read_tx(&mut self) -> rusqlite::Result<Tx<'_>>;
}

impl WriteTx for Connection {
    fn write_tx(&mut self) -> rusqlite::Result<Tx<'_>> {
        if self.is_autocommit() {
            Ok(Tx::Top(self.transaction_with_behavior(
                rusqlite::TransactionBehavior::Immediate,
            )?))
        } else {
            Ok(Tx::Nested(self.savepoint()?))
        }
    }

    fn read_tx(&mut self) -> rusqlite::Result<Tx<'_>> {
        if self.is_autocommit() {
            Ok(Tx::Top(self.transaction()?))
        } else {
            Ok(Tx::Nested(self.savepoint()?))
        }
    }
}

/// Turns "not found" into `None`, for callers to whom absence is not an error.
pub trait OptionalExt<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExt<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn is_constraint(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

/// Unix seconds, for bookkeeping columns whose time the caller does not pass.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Brings the schema to the newest version, all pending steps in one transaction so that a
/// failed upgrade leaves the old schema as it was.
fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let target = MIGRATIONS.len() as i64;
    if current > target {
        return Err(StoreError::Corrupt(format!(
            "the database has schema {current}, newer than this Kisara ({target})"
        )));
    }
    if current == target {
        return Ok(());
    }
    let tx = conn.read_tx()?;
    for step in &MIGRATIONS[current.max(0) as usize..] {
        tx.execute_batch(step)?;
    }
    tx.pragma_update(None, "user_version", target)?;
    tx.commit()?;
    Ok(())
}

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
        // The database is read through a memory map (up to [`MMAP_SIZE`]): a lookup touches the
        // OS's copy of a page instead of reading it into SQLite's cache, which then holds only
        // pages newer than the database file (those in the WAL) and the ones being written.
        // A large cache (it was 64 MiB) cost more than it saved: SQLite's B-tree code
        // parks a page at a page number far past the end while reordering siblings, and every
        // commit after that scans the cache's whole hash table (it was 5 % of the server at
        // 100,000 containers).
        conn.pragma_update(None, "mmap_size", MMAP_SIZE)?;
        conn.pragma_update(None, "cache_size", CACHE_KIB)?;
        // Checkpoints (copying the WAL into the database, with an fsync of each) run on a
        // thread of their own instead of inside whichever commit crossed the threshold, where
        // they held the store's lock for every caller; the automatic one stays as a backstop.
        conn.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_BACKSTOP)?;
        let store = Self::init(conn)?;
        store.spawn_checkpointer(path);
        Ok(store)
    }

    /// Checkpoints the WAL from a second connection every [`CHECKPOINT_EVERY`] while this
    /// store (any clone of it) lives, in two steps. The bulk, in `PASSIVE` mode, runs beside
    /// the store's writers and copies what was committed when it began. The tail runs under
    /// the store's lock with no group open: it copies the frames committed during the bulk, so
    /// the whole WAL is in the database and the next write starts the WAL over from its top.
    /// Without the tail the WAL only grew (a write restarts it only when it begins with every
    /// frame copied, and under load one always landed first) until the backstop checkpointed
    /// inside a commit, fsyncs and all, holding every caller. A failed checkpoint is retried
    /// at the next tick (the backstop bounds the WAL meanwhile).
    fn spawn_checkpointer(&self, path: &Path) {
        let alive = self.downgrade();
        let path = path.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("kisara-store-checkpoint".into())
            .spawn(move || {
                let conn = match Connection::open(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "no checkpoint connection; SQLite checkpoints inline");
                        return;
                    }
                };
                let checkpoint = || {
                    if let Err(e) = conn.row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::debug!(error = %e, "checkpoint failed; retried");
                    }
                };
                loop {
                    std::thread::sleep(CHECKPOINT_EVERY);
                    if alive.upgrade().is_none() {
                        break;
                    }
                    checkpoint();
                    let Some(store) = alive.upgrade() else {
                        break;
                    };
                    store.quiesced(checkpoint);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no checkpoint thread; SQLite checkpoints inline");
        }
    }

    pub fn open_in_memory() -> Result<Store> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(mut conn: Connection) -> Result<Store> {
        // Another process holding the write lock (a backup, a second server by mistake) makes
        // us wait briefly instead of failing at once.
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Room for every statement the store runs (see [`Cached`]); the default holds 16.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Temporary tables, and the journals of savepoints (every store call inside a group
        // transaction is one, see [`group`]), stay in memory instead of spilling to files.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        migrate(&mut conn)?;
        // Every change to the subnets table, by any statement of this connection, bumps a
        // counter: the in-memory copy is trusted only while the counter is where it left it.
        conn.execute_batch(
            "CREATE TEMP TABLE subnet_generation(n INTEGER NOT NULL);
             INSERT INTO subnet_generation VALUES (0);
             CREATE TEMP TRIGGER subnets_ins AFTER INSERT ON main.subnets
                 BEGIN UPDATE subnet_generation SET n = n + 1; END;
             CREATE TEMP TRIGGER subnets_del AFTER DELETE ON main.subnets
                 BEGIN UPDATE subnet_generation SET n = n + 1; END;
             CREATE TEMP TRIGGER subnets_upd AFTER UPDATE ON main.subnets
                 BEGIN UPDATE subnet_generation SET n = n + 1; END;",
        )?;
        let store = Store {
            subnets: Default::default(),
            db: Arc::new(Mutex::new(group::Db::new(conn))),
            group: Default::default(),
            no_committer: Default::default(),
        };
        store.spawn_committer();
        Ok(store)
    }

    // ---- meta ----

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.conn().exec(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    // ---- nodes ----

    pub fn create_node(&self, id: &str, name: &str, credential: &str, now: i64) -> Result<()> {
        let r = self.conn().exec(
            "INSERT INTO nodes(id, name, credential_hash, created_at, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![id, name, hash(credential), now],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Conflict(format!(
                    "a node named {name:?} exists"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_node_credential(&self, id: &str, credential: &str) -> Result<()> {
        let n = self.conn().exec(
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
            .row(
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
        self.conn().exec(
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
        self.conn().exec(
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
            cordoned: r.get(9)?,
            draining: r.get(10)?,
            label_overrides: from_json(&r.get::<_, String>(11)?),
        })
    }

    const NODE_COLS: &'static str = "id, name, public_address, labels, max_containers, engine, \
                                     agent_version, created_at, last_seen, cordoned, draining, \
                                     label_overrides";

    /// Sets the operator's scheduling flags of a node.
    pub fn set_node_flags(&self, id: &str, cordoned: bool, draining: bool) -> Result<()> {
        let n = self.conn().exec(
            "UPDATE nodes SET cordoned = ?2, draining = ?3 WHERE id = ?1",
            params![id, cordoned, draining],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("unknown node {id}")));
        }
        Ok(())
    }

    /// Replaces the operator's label changes of a node (see [`NodeRecord::label_overrides`]).
    pub fn set_node_label_overrides(
        &self,
        id: &str,
        overrides: &BTreeMap<String, Option<String>>,
    ) -> Result<()> {
        let n = self.conn().exec(
            "UPDATE nodes SET label_overrides = ?2 WHERE id = ?1",
            params![id, json(overrides)],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("unknown node {id}")));
        }
        Ok(())
    }

    pub fn node_by_id(&self, id: &str) -> Result<Option<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes WHERE id = ?1", Self::NODE_COLS);
        Ok(self.conn().row(&sql, [id], Self::node_row).optional()?)
    }

    pub fn node_by_name(&self, name: &str) -> Result<Option<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes WHERE name = ?1", Self::NODE_COLS);
        Ok(self.conn().row(&sql, [name], Self::node_row).optional()?)
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let sql = format!("SELECT {} FROM nodes ORDER BY name", Self::NODE_COLS);
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([], Self::node_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    // ---- containers ----

    /// `Conflict` if a container with this id exists.
    pub fn insert_container(&self, c: &Container) -> Result<()> {
        self.insert_container_reserved(c, 0, 0)
    }

    /// Inserts a container with what it reserved on its node (memory MiB, cpu millicores).
    pub fn insert_container_reserved(
        &self,
        c: &Container,
        memory_mb: u64,
        cpu_milli: u64,
    ) -> Result<()> {
        Self::insert_container_on(&self.conn(), c, memory_mb, cpu_milli)
    }

    /// [`Store::insert_container_reserved`] on a connection or inside a transaction.
    pub(crate) fn insert_container_on(
        conn: &Connection,
        c: &Container,
        memory_mb: u64,
        cpu_milli: u64,
    ) -> Result<()> {
        let r = conn
            .prepare_cached(
                "INSERT INTO containers(id, docker_id, node_id, name, image, owner, module, labels,
                 network, ip_address, state, status, ports, created_at, memory_mb, cpu_milli)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .and_then(|mut stmt| {
                stmt.execute(params![
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
                    c.created_at,
                    memory_mb as i64,
                    cpu_milli as i64
                ])
            });
        match r {
            Ok(_) => Ok(()),
            Err(e) if is_constraint(&e) => Err(StoreError::Conflict(format!(
                "a container with id {} exists",
                c.id
            ))),
            Err(e) => Err(e.into()),
        }
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
            // Lifecycle fields live in the instances table; the server fills them in.
            expires_at: None,
            renewals: 0,
            flags: None,
            traffic: None,
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
            conn.row(&sql, [key], Self::container_row).optional()
        };
        if let Some(c) = by("id")? {
            return Ok(c);
        }
        // Names are unique per engine, not across the cluster, and a container found gone
        // keeps its name; a name that still picks more than one is ambiguous, not a guess.
        let sql = format!(
            "SELECT {} FROM containers WHERE name = ?1 ORDER BY state = 'gone', created_at",
            Self::CONTAINER_COLS
        );
        let mut named = {
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query_map([key], Self::container_row)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        if named.len() > 1 {
            named.retain(|c| c.state != ContainerState::Gone);
        }
        match named.len() {
            0 => {}
            1 => return Ok(named.remove(0)),
            _ => {
                return Err(StoreError::Conflict(format!(
                    "{key:?} names more than one container; use its id"
                )))
            }
        }
        let is_hex = key.len() >= 6 && key.chars().all(|c| c.is_ascii_hexdigit());
        if is_hex {
            let sql = format!(
                "SELECT {} FROM containers WHERE substr(docker_id, 1, ?2) = ?1 LIMIT 2",
                Self::CONTAINER_COLS
            );
            let mut stmt = conn.prepare_cached(&sql)?;
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
        let mut stmt = conn.prepare_cached(&sql)?;
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
        self.write_container_state(id, None, state, status)
            .map(|_| ())
    }

    /// [`Store::update_container_state`], only while the row is still in state `from`: whether
    /// it was written. For a state seen on an engine a while ago, which must not undo a change
    /// made since (a stop through the API while a reconciliation waited on the node).
    pub fn update_container_state_from(
        &self,
        id: &str,
        from: ContainerState,
        state: ContainerState,
        status: &str,
    ) -> Result<bool> {
        self.write_container_state(id, Some(from), state, status)
    }

    /// The state write of both: `from`, when given, must be the row's state.
    fn write_container_state(
        &self,
        id: &str,
        from: Option<ContainerState>,
        state: ContainerState,
        status: &str,
    ) -> Result<bool> {
        // removed_at records when the container was first found gone, and is cleared if it
        // turns up again (an engine that was briefly unreachable).
        let n = self.conn().exec(
            "UPDATE containers SET state = ?2, status = ?3,
                 removed_at = CASE WHEN ?2 = 'gone' THEN coalesce(removed_at, ?4) END
             WHERE id = ?1 AND (?5 IS NULL OR state = ?5)",
            params![
                id,
                state_str(state),
                status,
                unix_now(),
                from.map(state_str)
            ],
        )?;
        Ok(n > 0)
    }

    /// When the container was found gone (unix seconds), if it was.
    pub fn container_removed_at(&self, id: &str) -> Result<Option<i64>> {
        self.conn()
            .row(
                "SELECT removed_at FROM containers WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such container: {id}")))
    }

    /// Records the Kisara network (id) the container is attached to.
    pub fn set_container_network_id(&self, id: &str, network_id: Option<&str>) -> Result<()> {
        let n = self.conn().exec(
            "UPDATE containers SET network_id = ?2 WHERE id = ?1",
            params![id, network_id],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no such container: {id}")));
        }
        Ok(())
    }

    /// The Kisara network (id) the container is attached to, if recorded.
    pub fn container_network_id(&self, id: &str) -> Result<Option<String>> {
        self.conn()
            .row(
                "SELECT network_id FROM containers WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such container: {id}")))
    }

    /// What every container not found gone reserved; with `node_id`, on that node only.
    pub fn container_reservations(
        &self,
        node_id: Option<&str>,
    ) -> Result<Vec<ContainerReservation>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, node_id, memory_mb, cpu_milli FROM containers
             WHERE state != 'gone' AND (?1 IS NULL OR node_id = ?1)",
        )?;
        let rows = stmt.query_map(params![node_id], |r| {
            Ok(ContainerReservation {
                id: r.get(0)?,
                node_id: r.get(1)?,
                memory_mb: r.get::<_, i64>(2)?.max(0) as u64,
                cpu_milli: r.get::<_, i64>(3)?.max(0) as u64,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn delete_container(&self, id: &str) -> Result<()> {
        self.conn()
            .exec("DELETE FROM containers WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- networks ----

    pub fn insert_network(&self, n: &Network) -> Result<()> {
        Self::insert_network_on(&self.conn(), n)
    }

    /// [`Store::insert_network`] on a connection or inside a transaction.
    fn insert_network_on(conn: &Connection, n: &Network) -> Result<()> {
        let r = conn.exec(
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
            .row(&sql, [key], Self::network_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such network: {key}")))
    }

    pub fn list_networks(&self, node_id: Option<&str>) -> Result<Vec<Network>> {
        let sql = format!(
            "SELECT {} FROM networks WHERE (?1 IS NULL OR node_id = ?1) ORDER BY created_at, id",
            Self::NETWORK_COLS
        );
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![node_id], Self::network_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// A node's unclaimed networks carrying `spare_label` that the engine has made, oldest
    /// first (ties by id). Read through the `networks_unclaimed` index and ordered here: with
    /// an `ORDER BY` SQLite re-prepared the statement on every run (an equality on a bound
    /// parameter beside an ORDER BY marks the plan as depending on the value), which cost more
    /// than the query.
    fn unclaimed_spares(
        conn: &Connection,
        node_id: &str,
        spare_label: &str,
    ) -> Result<Vec<Network>> {
        let mut stmt = conn.prepare_cached(&Self::unclaimed_sql())?;
        let rows = stmt.query_map([node_id], Self::network_row)?;
        let mut out = Vec::new();
        for n in rows {
            let n = n?;
            if n.labels.contains_key(spare_label) {
                out.push(n);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// The statement of [`Store::unclaimed_spares`].
    fn unclaimed_sql() -> String {
        format!(
            "SELECT {} FROM networks INDEXED BY networks_unclaimed
             WHERE node_id = ?1 AND owned_by IS NULL AND docker_id != ''",
            Self::NETWORK_COLS,
        )
    }

    /// How many spare networks `node_id` has, made or being made (not yet claimed), counted
    /// without reading the rows (the warm pool asks twice per launch).
    pub fn spare_count(&self, node_id: &str, spare_label: &str) -> Result<usize> {
        let n: i64 = self
            .conn()
            .row(&Self::spare_count_sql(spare_label), [node_id], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The statement of [`Store::spare_count`]. The label is written into it as a JSON path
    /// (the warm pool's is a constant), not bound: with a bound label, or with `json_each`,
    /// SQLite re-prepared the statement on every run, which cost more than reading the rows.
    fn spare_count_sql(spare_label: &str) -> String {
        format!(
            "SELECT count(*) FROM networks INDEXED BY networks_unclaimed
             WHERE node_id = ?1 AND owned_by IS NULL
               AND json_type(labels, '$.{}') IS NOT NULL",
            serde_json::Value::String(spare_label.to_string())
                .to_string()
                .replace('\'', "''")
        )
    }

    /// Claims one spare network of `node_id` for `owner`, atomically: two launches never get
    /// the same network.
    pub fn claim_spare_network(
        &self,
        node_id: &str,
        spare_label: &str,
        owner: &str,
    ) -> Result<Option<Network>> {
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        let net = Self::claim_spare_on(&tx, node_id, spare_label, owner)?;
        if net.is_some() {
            tx.commit()?;
        }
        Ok(net)
    }

    /// [`Store::claim_spare_network`] inside the caller's transaction.
    pub(crate) fn claim_spare_on(
        conn: &Connection,
        node_id: &str,
        spare_label: &str,
        owner: &str,
    ) -> Result<Option<Network>> {
        let candidate = Self::unclaimed_spares(conn, node_id, spare_label)?;
        let Some(mut net) = candidate.into_iter().next() else {
            return Ok(None);
        };
        conn.exec(
            "UPDATE networks SET owned_by = ?2 WHERE id = ?1",
            params![net.id, owner],
        )?;
        net.owned_by = Some(owner.to_string());
        Ok(Some(net))
    }

    pub fn networks_owned_by(&self, owner: &str) -> Result<Vec<Network>> {
        let sql = format!(
            "SELECT {} FROM networks WHERE owned_by = ?1 ORDER BY created_at, id",
            Self::NETWORK_COLS
        );
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([owner], Self::network_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn delete_network(&self, id: &str) -> Result<()> {
        self.conn()
            .exec("DELETE FROM networks WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- subnets ----

    fn allocated(tx: &Connection) -> Result<Vec<Ipv4Net>> {
        Ok(Self::allocations(tx)?
            .into_iter()
            .map(|a| a.subnet)
            .collect())
    }

    fn allocations(conn: &Connection) -> Result<Vec<SubnetAllocation>> {
        let mut stmt =
            conn.prepare_cached("SELECT subnet, holder, created_at FROM subnets ORDER BY subnet")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (subnet, holder, created_at) = row?;
            let subnet = subnet
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("subnet {subnet:?}")))?;
            out.push(SubnetAllocation {
                subnet,
                holder,
                created_at,
            });
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
        self.allocate_subnet_then(pool, extra_taken, holder, None, |_, _| Ok(()))
    }

    /// Allocates a subnet from `pool` for `net` (its id holds the subnet), fills in its
    /// subnet and gateway, and writes its row in the same transaction: both are stored or
    /// neither (a name conflict hands no subnet out).
    pub fn allocate_network(
        &self,
        pool: &SubnetPool,
        extra_taken: &[Ipv4Net],
        net: Network,
    ) -> Result<Network> {
        self.allocate_network_at(pool, extra_taken, net, None)
    }

    /// [`Store::allocate_network`], but the first free subnet at or after position `start`
    /// of the pool (wrapping around): after an engine refused a subnet as overlapping (another
    /// cluster sharing the engine took it), a random start keeps racing clusters from
    /// colliding again on the next one in order.
    pub fn allocate_network_from(
        &self,
        pool: &SubnetPool,
        extra_taken: &[Ipv4Net],
        net: Network,
        start: u64,
    ) -> Result<Network> {
        self.allocate_network_at(pool, extra_taken, net, Some(start))
    }

    fn allocate_network_at(
        &self,
        pool: &SubnetPool,
        extra_taken: &[Ipv4Net],
        mut net: Network,
        start: Option<u64>,
    ) -> Result<Network> {
        let holder = net.id.clone();
        self.allocate_subnet_then(pool, extra_taken, &holder, start, |conn, subnet| {
            net.subnet = subnet.to_string();
            net.gateway = subnet.hosts().next().map(|g| g.to_string());
            Self::insert_network_on(conn, &net)
        })?;
        Ok(net)
    }

    /// [`Store::allocate_subnet`], running `then` in the same transaction before it commits;
    /// an error from `then` rolls the allocation back.
    fn allocate_subnet_then(
        &self,
        pool: &SubnetPool,
        extra_taken: &[Ipv4Net],
        holder: &str,
        start: Option<u64>,
        then: impl FnOnce(&Connection, Ipv4Net) -> Result<()>,
    ) -> Result<Ipv4Net> {
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        // The table in memory, reloaded only when something changed it behind the cache.
        let generation = subnet_generation(&tx)?;
        let mut cache = self.subnets.lock().unwrap_or_else(|p| p.into_inner());
        if cache.as_ref().is_none_or(|c| c.generation != generation) {
            *cache = Some(SubnetCache {
                generation,
                taken: TakenIndex::new(Self::allocated(&tx)?),
                hints: Vec::new(),
            });
        }
        let Some(c) = cache.as_mut() else {
            return Err(StoreError::Corrupt("subnet cache".into()));
        };
        let extra = TakenSet::new(extra_taken.iter().copied());
        // The first free subnet in pool order, as before, but starting from the lowest
        // position that may be free instead of from the start of the pool.
        let mut hint = c.hint(pool);
        let mut found = None;
        if let Some(start) = start {
            // From `start`, wrapping around; the hint (lowest position that may be free) is
            // left as it is.
            let len = pool.len();
            found = (0..len)
                .map(|k| (start % len + k) % len)
                .filter_map(|i| pool.nth(i).map(|n| (i, n)))
                .find(|(_, n)| !c.taken.overlaps(n) && !extra.overlaps(n));
        } else {
            let mut below_all_taken = true;
            let mut i = hint;
            while let Some(n) = pool.nth(i) {
                if c.taken.overlaps(&n) {
                    if below_all_taken {
                        hint = i + 1;
                    }
                } else {
                    below_all_taken = false;
                    if !extra.overlaps(&n) {
                        found = Some((i, n));
                        break;
                    }
                }
                i += 1;
            }
            c.set_hint(pool, hint);
        }
        let Some((index, net)) = found else {
            return Err(StoreError::Exhausted(format!(
                "the subnet pool {pool} is exhausted: every subnet is allocated or used on the \
                 engine"
            )));
        };
        tx.exec(
            "INSERT INTO subnets(subnet, holder, created_at) VALUES (?1, ?2, ?3)",
            params![net.to_string(), holder, unix_now()],
        )?;
        let after = subnet_generation(&tx)?;
        then(&tx, net)?;
        tx.commit()?;
        c.taken.insert(&net);
        c.generation = after;
        if start.is_none() && index == hint {
            c.set_hint(pool, index + 1);
        }
        Ok(net)
    }

    /// Reserves an explicit subnet; `Conflict` if it overlaps one already allocated or one an
    /// engine reported in use. Host bits are ignored (`10.1.2.3/24` is `10.1.2.0/24`).
    pub fn reserve_subnet(&self, net: &Ipv4Net, holder: &str) -> Result<()> {
        let net = net.trunc();
        let mut conn = self.conn();
        let tx = conn.write_tx()?;
        if let Some(t) = Self::allocations(&tx)?
            .into_iter()
            .find(|t| kisara_core::pool::overlaps(&t.subnet, &net))
        {
            let why = if t.holder == EXTERNAL_HOLDER {
                "in use on an engine".to_string()
            } else {
                format!("held by {}", t.holder)
            };
            return Err(StoreError::Conflict(format!(
                "subnet {net} overlaps {}, {why}",
                t.subnet
            )));
        }
        tx.exec(
            "INSERT INTO subnets(subnet, holder, created_at) VALUES (?1, ?2, ?3)",
            params![net.to_string(), holder, unix_now()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Returns a subnet to the pool (or forgets an external one). Releasing a subnet that is
    /// not allocated is not an error, so cleanup paths can be retried.
    pub fn release_subnet(&self, net: &Ipv4Net) -> Result<()> {
        let conn = self.conn();
        let before = subnet_generation(&conn)?;
        let n = conn.exec(
            "DELETE FROM subnets WHERE subnet = ?1",
            [net.trunc().to_string()],
        )?;
        self.after_subnet_write(&conn, before, |c| {
            if n > 0 {
                c.taken.remove(net);
                c.freed(net);
            }
        })
    }

    /// Applies our own change to the cached table, or drops the cache when the table changed
    /// in some other way since it was read.
    fn after_subnet_write(
        &self,
        conn: &Connection,
        before: i64,
        apply: impl FnOnce(&mut SubnetCache),
    ) -> Result<()> {
        let after = subnet_generation(conn)?;
        let mut cache = self.subnets.lock().unwrap_or_else(|p| p.into_inner());
        match cache.as_mut() {
            Some(c) if c.generation == before => {
                apply(c);
                c.generation = after;
            }
            _ => *cache = None,
        }
        Ok(())
    }

    /// Remembers a subnet an engine reported in use (`UsedSubnets`), so later allocations
    /// skip it even when the caller passes no `extra_taken`. It may overlap allocations (an
    /// engine reports Kisara's own networks too); a subnet already recorded, under any holder,
    /// is left alone. Returns whether a row was added.
    pub fn mark_subnet_external(&self, net: &Ipv4Net) -> Result<bool> {
        let conn = self.conn();
        let before = subnet_generation(&conn)?;
        let n = conn.exec(
            "INSERT INTO subnets(subnet, holder, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(subnet) DO NOTHING",
            params![net.trunc().to_string(), EXTERNAL_HOLDER, unix_now()],
        )?;
        self.after_subnet_write(&conn, before, |c| {
            if n > 0 {
                c.taken.insert(&net.trunc());
            }
        })?;
        Ok(n > 0)
    }

    /// Forgets every externally used subnet, before re-marking what the engines report now;
    /// otherwise a network removed outside Kisara would keep its subnet out of the pool.
    pub fn clear_external_subnets(&self) -> Result<usize> {
        Ok(self
            .conn()
            .exec("DELETE FROM subnets WHERE holder = ?1", [EXTERNAL_HOLDER])?)
    }

    /// Every row of the allocation table, with holders, ordered by subnet text.
    pub fn subnet_allocations(&self) -> Result<Vec<SubnetAllocation>> {
        Self::allocations(&self.conn())
    }

    pub fn allocated_subnets(&self) -> Result<Vec<Ipv4Net>> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
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
    fn an_allocation_from_a_start_wraps_around_and_keeps_the_order_of_the_rest() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-3].0/24");
        let row = |id: &str| Network {
            subnet: String::new(),
            gateway: None,
            ..network(id, &format!("net-{id}"), "n1", None)
        };
        let a = st.allocate_network_from(&p, &[], row("a"), 2).unwrap();
        assert_eq!(a.subnet, "10.9.2.0/24");
        // Taken or used on the engine from the start on: wraps around to the first free one.
        let b = st
            .allocate_network_from(&p, &[n("10.9.3.0/24")], row("b"), 6)
            .unwrap();
        assert_eq!(b.subnet, "10.9.0.0/24");
        // In-order allocation still finds the lowest free subnet.
        let c = st.allocate_network(&p, &[], row("c")).unwrap();
        assert_eq!(c.subnet, "10.9.1.0/24");
        let d = st.allocate_network(&p, &[], row("d")).unwrap();
        assert_eq!(d.subnet, "10.9.3.0/24");
        let e = st.allocate_network_from(&p, &[], row("e"), 1).unwrap_err();
        assert!(matches!(e, StoreError::Exhausted(_)), "{e}");
        assert!(st.get_network("e").is_err());
    }

    #[test]
    fn a_network_and_its_subnet_are_stored_together() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-3].0/24");
        let row = |id: &str, name: &str| Network {
            subnet: String::new(),
            gateway: None,
            ..network(id, name, "n1", None)
        };
        let a = st.allocate_network(&p, &[], row("a", "net-a")).unwrap();
        assert_eq!(a.subnet, "10.9.0.0/24");
        assert_eq!(a.gateway.as_deref(), Some("10.9.0.1"));
        assert_eq!(st.get_network("net-a").unwrap(), a);
        // A name already taken: no row and no subnet handed out.
        let e = st.allocate_network(&p, &[], row("b", "net-a")).unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        assert!(st.get_network("b").is_err());
        assert_eq!(st.allocated_subnets().unwrap(), vec![n("10.9.0.0/24")]);
        // The engine's subnets are skipped, and the next one goes to the next network.
        let c = st
            .allocate_network(&p, &[n("10.9.1.0/24")], row("c", "net-c"))
            .unwrap();
        assert_eq!(c.subnet, "10.9.2.0/24");
        let held: Vec<String> = st
            .subnet_allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.holder)
            .collect();
        assert_eq!(held, vec!["a", "c"]);
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
            expires_at: None,
            renewals: 0,
            flags: None,
            traffic: None,
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
        assert_eq!(
            st.list_containers(None, None, None, false).unwrap().len(),
            1
        );
        assert_eq!(st.list_containers(None, None, None, true).unwrap().len(), 2);
        assert_eq!(
            st.list_containers(Some("t1"), None, Some("n"), true)
                .unwrap()
                .len(),
            2
        );
    }

    fn container(id: &str, docker: &str, name: &str, node: &str) -> Container {
        Container {
            id: id.into(),
            docker_id: docker.into(),
            name: name.into(),
            node_id: node.into(),
            image: "busybox".into(),
            owner: None,
            module: None,
            labels: Default::default(),
            network: None,
            ip_address: None,
            state: ContainerState::Running,
            status: String::new(),
            ports: vec![],
            host_port: String::new(),
            created_at: 0,
            expires_at: None,
            renewals: 0,
            flags: None,
            traffic: None,
        }
    }

    fn network(id: &str, name: &str, node: &str, owned_by: Option<&str>) -> Network {
        Network {
            id: id.into(),
            name: name.into(),
            docker_id: format!("d-{id}"),
            node_id: node.into(),
            subnet: "10.9.0.0/24".into(),
            gateway: Some("10.9.0.1".into()),
            internal: false,
            internet: true,
            owned_by: owned_by.map(str::to_string),
            from_pool: true,
            labels: BTreeMap::from([("k".to_string(), "v".to_string())]),
            created_at: 7,
        }
    }

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// Spares come oldest first and are claimed in that order, each once; the statements the
    /// warm pool runs after every launch are prepared once, never re-prepared per run.
    #[test]
    fn spares_are_claimed_oldest_first_with_statements_prepared_once() {
        let st = Store::open_in_memory().unwrap();
        for (id, at) in [("s3", 5), ("s1", 9), ("s2", 5)] {
            let mut net = network(id, &format!("net-{id}"), "n1", None);
            net.labels = BTreeMap::from([("spare".to_string(), "true".to_string())]);
            net.created_at = at;
            st.insert_network(&net).unwrap();
        }
        st.insert_network(&network("plain", "net-plain", "n1", None))
            .unwrap();
        st.insert_network(&network("other", "net-other", "n2", None))
            .unwrap();
        assert_eq!(st.spare_count("n1", "spare").unwrap(), 3);
        assert_eq!(st.spare_count("n2", "spare").unwrap(), 0);
        // A label key is matched whole (a dot or a quote in it is no JSON path).
        assert_eq!(st.spare_count("n1", "io.kisara.spare").unwrap(), 0);
        assert_eq!(st.spare_count("n1", "sp'are").unwrap(), 0);
        let mut claimed = Vec::new();
        while let Some(net) = st.claim_spare_network("n1", "spare", "c").unwrap() {
            claimed.push(net.id);
        }
        assert_eq!(claimed, ["s2", "s3", "s1"]);
        assert_eq!(st.spare_count("n1", "spare").unwrap(), 0);
        let conn = st.conn();
        for sql in [Store::unclaimed_sql(), Store::spare_count_sql("spare")] {
            let stmt = conn.prepare_cached(&sql).unwrap();
            assert!(stmt.get_status(rusqlite::StatementStatus::Run) >= 2);
            assert_eq!(
                stmt.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "{sql} was re-prepared"
            );
        }
    }

    #[test]
    fn containers_round_trip_with_ports() {
        let st = Store::open_in_memory().unwrap();
        let mut c = container("c1", "abcdef0123", "web", "n1");
        c.owner = Some("team-1".into());
        c.module = Some("pwn".into());
        c.network = Some("kisara-net-c1".into());
        c.ip_address = Some("10.9.0.2".into());
        c.ports = vec![PortBinding {
            container_port: 80,
            protocol: kisara_api::Protocol::Tcp,
            public_host: "198.51.100.1".into(),
            public_port: 30001,
        }];
        c.labels.insert("io.kisara.owner".into(), "team-1".into());
        st.insert_container(&c).unwrap();
        let got = st.get_container("c1").unwrap();
        assert_eq!(got.host_port, "198.51.100.1:30001");
        c.host_port = got.host_port.clone();
        assert_eq!(got, c);
        assert!(matches!(
            st.insert_container(&c),
            Err(StoreError::Conflict(_))
        ));
        st.delete_container("c1").unwrap();
        assert!(matches!(
            st.get_container("c1"),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn ambiguous_names_are_conflicts() {
        let st = Store::open_in_memory().unwrap();
        st.insert_container(&container("c1", "aaaaaa1", "web", "n1"))
            .unwrap();
        st.insert_container(&container("c2", "bbbbbb1", "web", "n2"))
            .unwrap();
        let err = st.get_container("web").unwrap_err();
        assert!(
            matches!(&err, StoreError::Conflict(m) if m.contains("web")),
            "{err}"
        );
        // A container found gone no longer competes for its name.
        st.update_container_state("c1", ContainerState::Gone, "")
            .unwrap();
        assert_eq!(st.get_container("web").unwrap().id, "c2");
        // Short or non-hex keys never match by Docker id prefix.
        assert!(matches!(
            st.get_container("aaaaa"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            st.get_container("aaaa%_"),
            Err(StoreError::NotFound(_))
        ));
    }

    /// A state seen on an engine a while ago is written only over the state it was compared
    /// with: a change made since (here a stop) stands.
    #[test]
    fn a_state_is_written_only_over_the_one_it_was_compared_with() {
        let st = Store::open_in_memory().unwrap();
        let mut c = container("c1", "aaaaaa1", "web", "n1");
        c.state = ContainerState::Running;
        st.insert_container(&c).unwrap();
        // Read as running; stopped meanwhile; the engine's older "paused" must not land.
        st.update_container_state("c1", ContainerState::Exited, "stopped")
            .unwrap();
        let wrote = st
            .update_container_state_from(
                "c1",
                ContainerState::Running,
                ContainerState::Paused,
                "Paused",
            )
            .unwrap();
        assert!(!wrote);
        let row = st.get_container("c1").unwrap();
        assert_eq!(
            (row.state, row.status.as_str()),
            (ContainerState::Exited, "stopped")
        );
        // Over the state it was compared with, it is written.
        assert!(st
            .update_container_state_from("c1", ContainerState::Exited, ContainerState::Gone, "x")
            .unwrap());
        assert_eq!(st.get_container("c1").unwrap().state, ContainerState::Gone);
        assert!(st.container_removed_at("c1").unwrap().is_some());
    }

    #[test]
    fn gone_containers_remember_when() {
        let st = Store::open_in_memory().unwrap();
        st.insert_container(&container("c1", "aaaaaa1", "web", "n1"))
            .unwrap();
        assert_eq!(st.container_removed_at("c1").unwrap(), None);
        st.update_container_state("c1", ContainerState::Gone, "")
            .unwrap();
        let at = st.container_removed_at("c1").unwrap();
        assert!(at.is_some_and(|t| t > 0));
        st.update_container_state("c1", ContainerState::Gone, "again")
            .unwrap();
        assert_eq!(
            st.container_removed_at("c1").unwrap(),
            at,
            "first time kept"
        );
        st.update_container_state("c1", ContainerState::Running, "Up")
            .unwrap();
        assert_eq!(st.container_removed_at("c1").unwrap(), None);
        assert!(matches!(
            st.container_removed_at("zz"),
            Err(StoreError::NotFound(_))
        ));

        assert_eq!(st.container_network_id("c1").unwrap(), None);
        st.set_container_network_id("c1", Some("net1")).unwrap();
        assert_eq!(
            st.container_network_id("c1").unwrap().as_deref(),
            Some("net1")
        );
        assert!(st.set_container_network_id("zz", None).is_err());
    }

    #[test]
    fn networks() {
        let st = Store::open_in_memory().unwrap();
        let a = network("net1", "kisara-net-c1", "n1", Some("c1"));
        let b = network("net2", "teams", "n2", None);
        st.insert_network(&a).unwrap();
        st.insert_network(&b).unwrap();
        assert_eq!(st.get_network("net1").unwrap(), a);
        assert_eq!(st.get_network("teams").unwrap(), b);
        assert!(matches!(
            st.get_network("nope"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            st.insert_network(&network("net3", "teams", "n1", None)),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(st.list_networks(None).unwrap().len(), 2);
        assert_eq!(st.list_networks(Some("n2")).unwrap(), vec![b]);
        assert_eq!(st.networks_owned_by("c1").unwrap(), vec![a]);
        st.delete_network("net1").unwrap();
        assert!(st.networks_owned_by("c1").unwrap().is_empty());
    }

    #[test]
    fn nodes() {
        let st = Store::open_in_memory().unwrap();
        st.create_node("n1", "node-1", "cred-1", 100).unwrap();
        assert!(matches!(
            st.create_node("n2", "node-1", "cred-2", 100),
            Err(StoreError::Conflict(_))
        ));
        let hello = Hello {
            protocol_version: kisara_api::agent::PROTOCOL_VERSION,
            name: "node-1".into(),
            join_token: None,
            node_id: Some("n1".into()),
            credential: None,
            agent_version: "0.1.0".into(),
            engine: EngineInfo {
                hostname: "h".into(),
                cpus: 4,
                ..Default::default()
            },
            public_address: "203.0.113.9".into(),
            labels: BTreeMap::from([("zone".to_string(), "a".to_string())]),
            max_containers: 80,
            exposure: Default::default(),
        };
        st.update_node_hello("n1", &hello, 200).unwrap();
        st.update_node_seen("n1", 300).unwrap();
        let rec = st.node_by_id("n1").unwrap().unwrap();
        assert_eq!(rec.public_address, "203.0.113.9");
        assert_eq!(rec.labels["zone"], "a");
        assert_eq!((rec.max_containers, rec.engine.cpus), (80, 4));
        assert_eq!((rec.created_at, rec.last_seen), (100, 300));
        assert_eq!(st.list_nodes().unwrap(), vec![rec]);
        assert!(st.node_by_id("zz").unwrap().is_none());

        st.set_node_credential("n1", "rotated").unwrap();
        assert!(!st.node_credential_matches("n1", "cred-1").unwrap());
        assert!(st.node_credential_matches("n1", "rotated").unwrap());
        assert!(st.set_node_credential("zz", "x").is_err());
        // Only the hash is stored.
        let stored: String = st
            .conn()
            .row("SELECT credential_hash FROM nodes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored.len(), 64);
        assert!(!stored.contains("rotated"));
    }

    #[test]
    fn external_subnets_are_skipped_until_cleared() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-3].0/24");
        assert!(st.mark_subnet_external(&n("10.9.0.0/23")).unwrap());
        assert!(!st.mark_subnet_external(&n("10.9.0.0/23")).unwrap());
        let got = st.allocate_subnet(&p, &[], "net1").unwrap();
        assert_eq!(got, n("10.9.2.0/24"));
        // The engine reports Kisara's own networks too: that must not disturb the allocation.
        assert!(!st.mark_subnet_external(&got).unwrap());
        let err = st.reserve_subnet(&n("10.9.1.0/24"), "x").unwrap_err();
        assert!(err.to_string().contains("in use on an engine"), "{err}");
        let rows = st.subnet_allocations().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().any(|r| r.holder == EXTERNAL_HOLDER));
        assert!(rows.iter().all(|r| r.created_at > 0));
        assert_eq!(st.clear_external_subnets().unwrap(), 1);
        assert_eq!(st.allocated_subnets().unwrap(), vec![got]);
        assert_eq!(
            st.allocate_subnet(&p, &[], "net2").unwrap(),
            n("10.9.0.0/24")
        );
    }

    #[test]
    fn reserve_ignores_host_bits_and_release_is_idempotent() {
        let st = Store::open_in_memory().unwrap();
        st.reserve_subnet(&n("10.50.1.7/24"), "net1").unwrap();
        assert_eq!(st.allocated_subnets().unwrap(), vec![n("10.50.1.0/24")]);
        let err = st.reserve_subnet(&n("10.50.0.0/16"), "net2").unwrap_err();
        assert!(err.to_string().contains("held by net1"), "{err}");
        st.release_subnet(&n("10.50.1.7/24")).unwrap();
        st.release_subnet(&n("10.50.1.0/24")).unwrap();
        assert!(st.allocated_subnets().unwrap().is_empty());
    }

    #[test]
    fn upgrades_a_version_1_file_and_refuses_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATION_1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.exec(
                "INSERT INTO subnets(subnet, holder) VALUES ('10.9.0.0/24', 'old')",
                [],
            )
            .unwrap();
        }
        let st = Store::open(&path).unwrap();
        let rows = st.subnet_allocations().unwrap();
        assert_eq!((rows[0].holder.as_str(), rows[0].created_at), ("old", 0));
        let version: i64 = st
            .conn()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = st
            .conn()
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode.to_ascii_lowercase(), "wal");
        // Version 10 dropped the docker-id index no query used; the file is read through a map.
        let indexes: i64 = st
            .conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = 'containers_docker'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
        let mmap: i64 = st
            .conn()
            .pragma_query_value(None, "mmap_size", |r| r.get(0))
            .unwrap();
        assert_eq!(mmap, MMAP_SIZE);
        drop(st);

        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(err.contains("99"), "{err}");
    }

    /// The WAL's checkpoint sequence number (its header, bytes 12..16): SQLite adds one each
    /// time a write starts the WAL over from its top.
    fn wal_restarts(path: &Path) -> u32 {
        let wal = std::fs::read(path.with_extension("db-wal")).unwrap_or_default();
        wal.get(12..16)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    }

    /// Under writes that never pause, the checkpoint thread still lets the WAL start over
    /// (its tail step runs between two group commits). Before, the WAL grew until SQLite's
    /// backstop (16,384 pages) checkpointed inside a commit, holding every caller through its
    /// fsyncs: without the tail step this test sees its restarts only after the WAL has grown
    /// past the backstop, and fails on the length.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_starts_over_while_writes_continue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kisara.db");
        let st = Store::open(&path).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let (st, stop) = (st.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    // Bounded: at most 20 s of writes, however slow the machine.
                    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed)
                        && std::time::Instant::now() < until
                    {
                        n += 1;
                        let value = format!("{n:0>400}");
                        st.durably(|s| s.set_meta(&format!("w{w}-{}", n % 64), &value))
                            .await
                            .unwrap();
                    }
                    n
                })
            })
            .collect();
        let first = wal_restarts(&path);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        let mut restarts = 0;
        while std::time::Instant::now() < deadline {
            restarts = wal_restarts(&path).wrapping_sub(first);
            if restarts >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut writes = 0;
        for w in writers {
            writes += w.await.unwrap();
        }
        let frames = std::fs::metadata(path.with_extension("db-wal"))
            .map(|m| m.len() / 4120)
            .unwrap_or(0);
        assert!(
            restarts >= 3,
            "the WAL started over {restarts} times in {writes} writes ({frames} frames long)"
        );
        assert!(frames < AUTOCHECKPOINT_BACKSTOP as u64, "{frames} frames");
    }

    #[test]
    fn optional_ext() {
        let st = Store::open_in_memory().unwrap();
        assert!(st.get_container("x").optional().unwrap().is_none());
    }

    #[test]
    fn clones_share_one_database_across_threads() {
        let st = Store::open_in_memory().unwrap();
        let p = pool("10.9.[0-255].0/24");
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let st = st.clone();
                let p = p.clone();
                std::thread::spawn(move || {
                    (0..16)
                        .map(|j| st.allocate_subnet(&p, &[], &format!("{i}-{j}")).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<Ipv4Net> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 128);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Release(usize),
        /// An explicit subnet: 10.7.(third).0/(prefix).
        Reserve(u8, u8),
        /// A subnet an engine reports: 10.7.(third).0/(prefix).
        External(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Alloc),
            2 => (0usize..16).prop_map(Op::Release),
            1 => (0u8..10, 22u8..=25).prop_map(|(t, p)| Op::Reserve(t, p)),
            1 => (0u8..10, 21u8..=25).prop_map(|(t, p)| Op::External(t, p)),
        ]
    }

    proptest! {
        /// The store against a model: whatever the sequence, a subnet handed out (allocated or
        /// reserved) never overlaps anything recorded at that moment, exhaustion and conflicts
        /// are reported exactly when the model says, and the table matches the model.
        #[test]
        fn live_allocations_never_overlap(ops in prop::collection::vec(op(), 1..60)) {
            let st = Store::open_in_memory().unwrap();
            let p = SubnetPool::parse(&["10.7.[0-7].0/24".to_string()], false).unwrap();
            let overlaps = kisara_core::pool::overlaps;
            // Everything recorded: (subnet, is_external).
            let mut live: Vec<(Ipv4Net, bool)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc => match st.allocate_subnet(&p, &[], "h") {
                        Ok(got) => {
                            prop_assert!(p.contains(&got));
                            for (l, _) in &live {
                                prop_assert!(!overlaps(l, &got), "{got} overlaps {l}");
                            }
                            live.push((got, false));
                        }
                        Err(StoreError::Exhausted(_)) => {
                            for m in p.iter() {
                                prop_assert!(live.iter().any(|(l, _)| overlaps(l, &m)), "{m} was free");
                            }
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    },
                    Op::Release(i) => {
                        if !live.is_empty() {
                            let (net, _) = live.remove(i % live.len());
                            st.release_subnet(&net).unwrap();
                        }
                    }
                    Op::Reserve(third, prefix) => {
                        let net = Ipv4Net::new([10, 7, third, 0].into(), prefix).unwrap().trunc();
                        let clash = live.iter().any(|(l, _)| overlaps(l, &net));
                        match st.reserve_subnet(&net, "r") {
                            Ok(()) => {
                                prop_assert!(!clash, "{net} reserved over a live subnet");
                                live.push((net, false));
                            }
                            Err(StoreError::Conflict(_)) => prop_assert!(clash, "{net} refused"),
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::External(third, prefix) => {
                        let net = Ipv4Net::new([10, 7, third, 0].into(), prefix).unwrap().trunc();
                        let added = st.mark_subnet_external(&net).unwrap();
                        prop_assert_eq!(added, !live.iter().any(|(l, _)| *l == net));
                        if added {
                            live.push((net, true));
                        }
                    }
                }
                // Subnets Kisara handed out never overlap each other.
                let handed: Vec<Ipv4Net> = live.iter().filter(|(_, e)| !e).map(|(n, _)| *n).collect();
                for (i, a) in handed.iter().enumerate() {
                    for b in &handed[i + 1..] {
                        prop_assert!(!overlaps(a, b), "{a} and {b} both live");
                    }
                }
            }
            let mut model: Vec<Ipv4Net> = live.iter().map(|(n, _)| *n).collect();
            let mut stored = st.allocated_subnets().unwrap();
            model.sort();
            stored.sort();
            prop_assert_eq!(stored, model);
        }
    }
}
