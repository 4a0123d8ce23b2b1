//! Group commit: the writes of concurrent launches share one SQLite commit.
//!
//! A commit is the expensive part of a write (WAL frames for every page touched, their
//! checksums, the page-cache bookkeeping): measured in the scale benchmark it was about 70 µs,
//! four times per launch, more than half of the server's CPU. Writes made through
//! [`Store::deferred`] run at once, inside a transaction the store keeps open for a short
//! window, and return a [`Ticket`]; the caller awaits [`Store::durable`] before it lets
//! anything outside the store act on them (an engine call, an HTTP answer, an event). A
//! committer thread commits the open transaction when the window ends, so every deferred
//! write of that window pays one commit between them.
//!
//! Every other write keeps its old meaning — durable when the call returns: a write that
//! changes rows while a deferred transaction is open commits it on the spot (with whatever
//! deferred writes it holds, which is only sooner than promised). Reads see deferred writes
//! before they are committed, as they would see them a window later.
//!
//! A failed commit rolls the window's transaction back: its tickets answer with an error, and
//! their callers undo what they started, as for any failed write.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::{Result, Store, StoreError, SubnetCache};

/// The longest a deferred write waits for others to join its commit.
const COMMIT_WINDOW: Duration = Duration::from_millis(10);

/// A group stays open for this many times what the last commit cost (up to
/// [`COMMIT_WINDOW`]), so commits take at most about a ninth of the store's time: under load
/// commits grow, and so does the window and the number of writes sharing each; a lightly loaded
/// store commits small groups at once, and a lone write on an idle store is committed by its own
/// caller as soon as it asks.
const WINDOW_FACTOR: u32 = 8;

/// Commits that failed, remembered for the tickets still waiting on them.
const FAILED_KEPT: usize = 256;

/// What [`Store::deferred`] wrote belongs to this commit; [`Store::durable`] waits for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use = "a deferred write is not durable until `Store::durable` says so"]
pub struct Ticket(Option<u64>);

/// The connection and the open deferred transaction, under the store's one lock.
pub(crate) struct Db {
    pub(crate) conn: Connection,
    /// The generation of the deferred transaction now open, if one is.
    open: Option<u64>,
    /// When the last group commit ended, and how long it took, for the committer's window.
    last_commit: Instant,
    last_cost: Duration,
    /// The generation the next deferred transaction gets.
    next: u64,
}

impl Db {
    pub(crate) fn new(conn: Connection) -> Db {
        Db {
            conn,
            open: None,
            last_commit: Instant::now(),
            last_cost: Duration::ZERO,
            next: 1,
        }
    }

    /// How long the open group may still gather writes: [`WINDOW_FACTOR`] times what the
    /// last commit cost, at most [`COMMIT_WINDOW`], counted from the end of the last commit.
    fn window_left(&self) -> Duration {
        (self.last_cost * WINDOW_FACTOR)
            .min(COMMIT_WINDOW)
            .saturating_sub(self.last_commit.elapsed())
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // The last handle is gone: what deferred writes remain are committed, not lost.
        if self.open.take().is_some() {
            if let Err(e) = self.conn.execute_batch("COMMIT") {
                tracing::error!(error = %e, "the store's last deferred writes could not be committed");
            }
        }
    }
}

/// Settled generations, published to waiting tickets.
#[derive(Debug, Clone, Default)]
struct Settled {
    /// Every generation up to this one is settled (committed or failed).
    through: u64,
    /// Generations whose commit failed (the most recent [`FAILED_KEPT`]).
    failed: Vec<u64>,
}

/// What the store's handles share for group commit.
pub(crate) struct Group {
    settled: tokio::sync::watch::Sender<Settled>,
    /// Signalled (with the store's lock) when a deferred transaction opens.
    opened: Condvar,
}

impl Default for Group {
    fn default() -> Self {
        Group {
            settled: tokio::sync::watch::Sender::new(Settled::default()),
            opened: Condvar::new(),
        }
    }
}

thread_local! {
    /// Set while [`Store::deferred`] runs its closure on this thread.
    static DEFER: Cell<bool> = const { Cell::new(false) };
    /// The newest generation a deferred write on this thread joined.
    static JOINED: Cell<u64> = const { Cell::new(0) };
}

/// The store's connection, locked. Dropping it after a write commits an open deferred
/// transaction, unless the write itself was deferred.
pub(crate) struct ConnGuard<'a> {
    db: MutexGuard<'a, Db>,
    store: &'a Store,
    changes: u64,
    defer: bool,
}

impl std::ops::Deref for ConnGuard<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.db.conn
    }
}

impl std::ops::DerefMut for ConnGuard<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.db.conn
    }
}

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        let Some(generation) = self.db.open else {
            return;
        };
        if self.defer {
            JOINED.with(|j| j.set(j.get().max(generation)));
        } else if self.db.conn.total_changes() != self.changes {
            commit(&mut self.db, &self.store.group, &self.store.subnets);
        }
    }
}

/// Commits the open deferred transaction, if any, and tells its tickets how it went.
fn commit(db: &mut Db, group: &Group, subnets: &Mutex<Option<SubnetCache>>) {
    let Some(generation) = db.open.take() else {
        return;
    };
    let started = Instant::now();
    let result = db.conn.execute_batch("COMMIT");
    db.last_commit = Instant::now();
    db.last_cost = db.last_commit - started;
    let ok = match result {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(error = %e, "a group commit failed; its writes are rolled back");
            if !db.conn.is_autocommit() {
                let _ = db.conn.execute_batch("ROLLBACK");
            }
            // Allocations made in memory for rolled-back rows are forgotten with them.
            *subnets.lock().unwrap_or_else(|p| p.into_inner()) = None;
            false
        }
    };
    group.settled.send_modify(|s| {
        s.through = s.through.max(generation);
        if !ok {
            s.failed.push(generation);
            if s.failed.len() > FAILED_KEPT {
                s.failed.remove(0);
            }
        }
    });
}

/// A handle that does not keep the store open (for its own threads).
pub(crate) struct WeakStore {
    db: Weak<Mutex<Db>>,
    group: Weak<Group>,
    no_committer: Weak<std::sync::atomic::AtomicBool>,
    subnets: Weak<Mutex<Option<SubnetCache>>>,
}

impl WeakStore {
    /// The store, while any handle of it lives.
    pub(crate) fn upgrade(&self) -> Option<Store> {
        Some(Store {
            db: self.db.upgrade()?,
            group: self.group.upgrade()?,
            no_committer: self.no_committer.upgrade()?,
            subnets: self.subnets.upgrade()?,
        })
    }
}

impl Store {
    pub(crate) fn downgrade(&self) -> WeakStore {
        WeakStore {
            db: Arc::downgrade(&self.db),
            group: Arc::downgrade(&self.group),
            no_committer: Arc::downgrade(&self.no_committer),
            subnets: Arc::downgrade(&self.subnets),
        }
    }

    /// Runs `f` under the store's lock with no group transaction open (the open one is
    /// committed first, sooner than promised): nothing commits while `f` runs.
    pub(crate) fn quiesced<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        commit(&mut db, &self.group, &self.subnets);
        f()
    }

    /// The store's connection, locked (see [`ConnGuard`]); inside [`Store::deferred`], with a
    /// group transaction open on it.
    pub(crate) fn conn(&self) -> ConnGuard<'_> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back on drop), so a poisoned lock is safe to keep using.
        let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let defer = DEFER.with(|d| d.get())
            && !self.no_committer.load(std::sync::atomic::Ordering::Relaxed);
        if defer && db.open.is_none() && db.conn.is_autocommit() {
            match db.conn.execute_batch("BEGIN IMMEDIATE") {
                Ok(()) => {
                    db.open = Some(db.next);
                    db.next += 1;
                    self.group.opened.notify_one();
                }
                // Not deferred, then: the write commits on its own as it always did.
                Err(e) => tracing::warn!(error = %e, "cannot open a group transaction"),
            }
        }
        let changes = db.conn.total_changes();
        ConnGuard {
            db,
            store: self,
            changes,
            defer,
        }
    }

    /// Runs `write` with its writes deferred to the next group commit. The result is the
    /// closure's; nothing it wrote may be acted on outside the store until
    /// [`Store::durable`] has accepted the ticket. A write that fails inside `write` is
    /// rolled back as usual (each store call is its own savepoint). Two store calls in `write`
    /// may land in two groups (the committer may run between them); the ticket covers both.
    pub fn deferred<R>(&self, write: impl FnOnce(&Store) -> R) -> (R, Ticket) {
        let was = DEFER.with(|d| d.replace(true));
        let joined_before = JOINED.with(|j| j.replace(0));
        let r = write(self);
        DEFER.with(|d| d.set(was));
        let joined = JOINED.with(|j| j.replace(joined_before.max(j.get())));
        let ticket = Ticket((joined > 0).then_some(joined));
        (r, ticket)
    }

    /// [`Store::deferred`], then [`Store::durable`] when the write succeeded: its value once
    /// it is committed.
    pub async fn durably<T>(&self, write: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let (written, ticket) = self.deferred(write);
        let value = written?;
        self.durable(ticket).await?;
        Ok(value)
    }

    /// Waits until the writes behind `ticket` are committed; an error when their commit
    /// failed (they are rolled back).
    pub async fn durable(&self, ticket: Ticket) -> Result<()> {
        let Some(generation) = ticket.0 else {
            return Ok(());
        };
        {
            // The window is over already (an idle store, or one lightly loaded): the caller
            // commits, rather than handing over to the committer thread and waiting for it.
            let mut db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            if db.open == Some(generation) && db.window_left().is_zero() {
                commit(&mut db, &self.group, &self.subnets);
            }
        }
        let mut rx = self.group.settled.subscribe();
        loop {
            {
                let s = rx.borrow_and_update();
                if s.through >= generation {
                    return if s.failed.contains(&generation) {
                        Err(StoreError::Db(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                            Some("the group commit holding this write failed".into()),
                        )))
                    } else {
                        Ok(())
                    };
                }
            }
            if rx.changed().await.is_err() {
                return Err(StoreError::Corrupt("the store was closed".into()));
            }
        }
    }

    /// Whether the writes behind `ticket` are settled yet: `Some(true)` committed,
    /// `Some(false)` rolled back by a failed commit, `None` still waiting.
    pub fn settled(&self, ticket: Ticket) -> Option<bool> {
        let Some(generation) = ticket.0 else {
            return Some(true);
        };
        let s = self.group.settled.borrow();
        (s.through >= generation).then(|| !s.failed.contains(&generation))
    }

    /// The committer: commits each deferred transaction once its window has passed, for as
    /// long as any handle of this store lives.
    pub(crate) fn spawn_committer(&self) {
        let db = Arc::downgrade(&self.db);
        let group = Arc::downgrade(&self.group);
        let subnets = Arc::downgrade(&self.subnets);
        let spawned = std::thread::Builder::new()
            .name("kisara-store-commit".into())
            .spawn(move || committer(db, group, subnets));
        if let Err(e) = spawned {
            // Without it deferred writes would wait for the next ordinary write: commit them
            // at once instead, by never deferring.
            tracing::error!(error = %e, "no group-commit thread");
            self.no_committer
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn committer(db: Weak<Mutex<Db>>, group: Weak<Group>, subnets: Weak<Mutex<Option<SubnetCache>>>) {
    loop {
        let (Some(db), Some(group), Some(subnets)) =
            (db.upgrade(), group.upgrade(), subnets.upgrade())
        else {
            return;
        };
        let guard = db.lock().unwrap_or_else(|p| p.into_inner());
        // Woken when a transaction opens; the timeout only notices a store that went away.
        let (mut guard, _) = group
            .opened
            .wait_timeout_while(guard, Duration::from_millis(200), |d| d.open.is_none())
            .unwrap_or_else(|p| p.into_inner());
        if guard.open.is_none() {
            continue;
        }
        let wait = guard.window_left();
        if !wait.is_zero() {
            drop(guard);
            std::thread::sleep(wait);
            guard = db.lock().unwrap_or_else(|p| p.into_inner());
        }
        commit(&mut guard, &group, &subnets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_disk() -> (tempfile::TempDir, std::path::PathBuf, Store) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kisara.db");
        let store = Store::open(&path).unwrap();
        (dir, path, store)
    }

    /// What a second connection (as after a crash) finds in the file.
    fn meta_on_disk(path: &std::path::Path, key: &str) -> Option<String> {
        let c = Connection::open(path).unwrap();
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .ok()
    }

    #[tokio::test]
    async fn a_deferred_write_is_read_at_once_and_on_disk_once_durable() {
        let (_d, path, store) = on_disk();
        let (r, ticket) = store.deferred(|s| s.set_meta("k", "v"));
        r.unwrap();
        assert!(ticket.0.is_some(), "the write joined a group transaction");
        // The same store reads it before the commit.
        assert_eq!(store.get_meta("k").unwrap().as_deref(), Some("v"));
        store.durable(ticket).await.unwrap();
        assert_eq!(meta_on_disk(&path, "k").as_deref(), Some("v"));
        // Both steps in one: on disk when it answers.
        store.durably(|s| s.set_meta("k2", "v2")).await.unwrap();
        assert_eq!(meta_on_disk(&path, "k2").as_deref(), Some("v2"));
    }

    #[tokio::test]
    async fn an_ordinary_write_is_durable_when_it_returns_and_takes_the_group_along() {
        let (_d, path, store) = on_disk();
        let (r, ticket) = store.deferred(|s| s.set_meta("deferred", "1"));
        r.unwrap();
        store.set_meta("plain", "2").unwrap();
        // Whether the committer came first or the ordinary write committed the open group,
        // both are in the file now, and the deferred ticket is settled.
        assert_eq!(meta_on_disk(&path, "plain").as_deref(), Some("2"));
        assert_eq!(meta_on_disk(&path, "deferred").as_deref(), Some("1"));
        assert!(store.group.settled.borrow().through >= ticket.0.unwrap());
        store.durable(ticket).await.unwrap();
        // A read alone commits nothing early, and a ticket with nothing behind it is ready.
        let (_, none) = store.deferred(|_| ());
        assert_eq!(none, Ticket::default());
        store.durable(none).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_group_commit_fails_its_tickets_and_rolls_their_writes_back() {
        let (_d, path, store) = on_disk();
        store
            .conn()
            .execute_batch(
                "CREATE TABLE parent(id INTEGER PRIMARY KEY);
                 CREATE TABLE child(p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);",
            )
            .unwrap();
        // Both writes in one group: a good one, and one that only fails at COMMIT. Under one
        // lock, so the committer cannot commit between them (two store calls may land in two
        // groups).
        let (r, ticket) = store.deferred(|s| {
            let conn = s.conn();
            conn.execute("INSERT INTO meta(key, value) VALUES ('good', '1')", [])?;
            conn.execute("INSERT INTO child(p) VALUES (42)", [])?;
            Ok::<_, StoreError>(())
        });
        r.unwrap();
        let err = store.durable(ticket).await.unwrap_err();
        assert!(err.to_string().contains("group commit"), "{err}");
        assert_eq!(meta_on_disk(&path, "good"), None);
        assert_eq!(store.get_meta("good").unwrap(), None);
        // The store goes on.
        let (r, t) = store.deferred(|s| s.set_meta("after", "2"));
        r.unwrap();
        store.durable(t).await.unwrap();
        assert_eq!(meta_on_disk(&path, "after").as_deref(), Some("2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_deferred_writes_share_commits() {
        let (_d, path, store) = on_disk();
        let commits_before = store.group.settled.borrow().through;
        let mut tasks = Vec::new();
        for t in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50 {
                    let (r, ticket) = store.deferred(|s| s.set_meta(&format!("k{t}-{i}"), "v"));
                    r.unwrap();
                    store.durable(ticket).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let commits = store.group.settled.borrow().through - commits_before;
        // 400 writes, each awaited before the next of its task: with eight tasks writing at
        // once they gather in groups.
        assert!(
            commits > 0 && commits <= 400 / 3,
            "{commits} commits for 400 writes"
        );
        let c = Connection::open(&path).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM meta WHERE key LIKE 'k%-%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 400);
    }
}
