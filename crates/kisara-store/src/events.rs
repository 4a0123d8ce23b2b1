//! Events and webhooks in the store.
//!
//! An event is appended together with one delivery row per webhook that wants it, in one
//! transaction, so an event is never stored without its deliveries nor delivered without being
//! stored, and deliveries survive a restart. A fact key (unique) makes appending the same fact
//! twice a no-op: that is how "exactly once per fact" holds even when two paths race or an
//! agent replays engine events after a reconnect.

use crate::WriteTx;
use kisara_api::{DeliveryAttempt, DeliveryState, Event, EventFilter, WebhookDelivery};
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{from_json, json, Cached, Result, Store, StoreError};

/// Tables of events, webhooks and their deliveries.
pub(crate) const MIGRATION_EVENTS: &str = r#"
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    time INTEGER NOT NULL,
    node_id TEXT,
    container_id TEXT,
    owner TEXT,
    module TEXT,
    data TEXT NOT NULL,
    fact TEXT UNIQUE
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    kinds TEXT NOT NULL,
    max_attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_queue ON webhook_deliveries(webhook_id, state, id);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    delivery_id INTEGER NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt INTEGER NOT NULL,
    time INTEGER NOT NULL,
    status INTEGER,
    error TEXT,
    PRIMARY KEY (delivery_id, attempt)
);
"#;

/// A webhook as stored, secret included (the server signs with it; the API never shows it).
#[derive(Clone, PartialEq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub kinds: Vec<String>,
    pub max_attempts: u32,
    pub created_at: i64,
}

impl std::fmt::Debug for WebhookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRecord")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("kinds", &self.kinds)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

/// The head of a webhook's queue: what to send next.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelivery {
    pub id: u64,
    pub webhook_id: String,
    pub event_id: u64,
    pub kind: String,
    /// The event as JSON, exactly the body that is sent and signed.
    pub payload: String,
    pub attempts: u32,
    pub next_attempt_at: i64,
}

/// What became of one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Delivered,
    /// Try again at this time (unix ms).
    Retry {
        at: i64,
    },
    Failed,
}

/// Counts of a webhook's deliveries by state: pending, delivered, failed.
pub type DeliveryCounts = (u64, u64, u64);

fn event_row(r: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        id: r.get::<_, i64>(0)? as u64,
        kind: r.get(1)?,
        time: r.get(2)?,
        node_id: r.get(3)?,
        container_id: r.get(4)?,
        owner: r.get(5)?,
        module: r.get(6)?,
        data: serde_json::from_str(&r.get::<_, String>(7)?).unwrap_or_default(),
    })
}

fn webhook_row(r: &Row<'_>) -> rusqlite::Result<WebhookRecord> {
    Ok(WebhookRecord {
        id: r.get(0)?,
        url: r.get(1)?,
        secret: r.get(2)?,
        kinds: from_json(&r.get::<_, String>(3)?),
        max_attempts: r.get(4)?,
        created_at: r.get(5)?,
    })
}

fn delivery_state(s: &str) -> DeliveryState {
    match s {
        "delivered" => DeliveryState::Delivered,
        "failed" => DeliveryState::Failed,
        _ => DeliveryState::Pending,
    }
}

const EVENT_COLS: &str = "id, kind, time, node_id, container_id, owner, module, data";
const WEBHOOK_COLS: &str = "id, url, secret, kinds, max_attempts, created_at";

impl Store {
    /// Appends an event (its `id` is ignored and assigned here) and queues it for every
    /// webhook whose kinds select it. With a `fact` key already stored, nothing happens and
    /// `None` is answered. Otherwise: the stored event and the webhooks it was queued for.
    pub fn append_event(
        &self,
        event: &Event,
        fact: Option<&str>,
    ) -> Result<Option<(Event, Vec<String>)>> {
        self.append_event_after(event, fact, |_| Ok(()))
    }

    /// Completes a launched container's row (see [`Store::complete_container`]) and appends
    /// its launch event in one transaction: an acknowledged launch always has its event, and
    /// a failed completion stores neither. The event part answers as [`Store::append_event`].
    pub fn complete_container_with_event(
        &self,
        c: &kisara_api::Container,
        event: &Event,
        fact: Option<&str>,
    ) -> Result<Option<(Event, Vec<String>)>> {
        self.append_event_after(event, fact, |conn| Store::complete_container_on(conn, c))
    }

    /// [`Store::append_event`] after `first` ran in the same transaction (an error from it
    /// writes nothing).
    fn append_event_after(
        &self,
        event: &Event,
        fact: Option<&str>,
        first: impl FnOnce(&Connection) -> Result<()>,
    ) -> Result<Option<(Event, Vec<String>)>> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        first(&tx)?;
        if let Some(fact) = fact {
            let known = tx
                .prepare_cached("SELECT 1 FROM events WHERE fact = ?1")?
                .exists([fact])?;
            if known {
                // The fact is stored already; what `first` wrote still counts. (Not left to
                // the insert's conflict clause: a skipped insert still uses up an id.)
                tx.commit()?;
                return Ok(None);
            }
        }
        let inserted = tx
            .prepare_cached(
                "INSERT INTO events(kind, time, node_id, container_id, owner, module, data, fact)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(fact) DO NOTHING",
            )?
            .execute(params![
                event.kind,
                event.time,
                event.node_id,
                event.container_id,
                event.owner,
                event.module,
                json(&event.data),
                fact
            ])?;
        if inserted == 0 {
            return Ok(None);
        }
        let mut stored = event.clone();
        stored.id = tx.last_insert_rowid() as u64;
        let hooks: Vec<(String, Vec<String>)> = {
            let mut stmt = tx.prepare_cached("SELECT id, kinds FROM webhooks ORDER BY id")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, from_json(&r.get::<_, String>(1)?)))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        let mut queued = Vec::new();
        let payload = json(&stored);
        for (id, kinds) in hooks {
            if !EventFilter::kind_matches(&kinds, &stored.kind) {
                continue;
            }
            tx.exec(
                "INSERT INTO webhook_deliveries(webhook_id, event_id, kind, payload, state,
                     next_attempt_at, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?5)",
                params![id, stored.id as i64, stored.kind, payload, stored.time],
            )?;
            queued.push(id);
        }
        tx.commit()?;
        Ok(Some((stored, queued)))
    }

    /// Whether an event with this fact key is stored.
    pub fn has_fact(&self, fact: &str) -> Result<bool> {
        Ok(self
            .conn()
            .row("SELECT 1 FROM events WHERE fact = ?1", [fact], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Stored events with an id above `after`, oldest first, at most `limit`.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let sql = format!("SELECT {EVENT_COLS} FROM events WHERE id > ?1 ORDER BY id LIMIT ?2");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![after as i64, limit as i64], event_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// The highest event id ever handed out (0 before the first event), pruned or not.
    pub fn last_event_id(&self) -> Result<u64> {
        let seq: Option<i64> = self
            .conn()
            .row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.unwrap_or(0).max(0) as u64)
    }

    /// Drops events beyond the newest `keep` and those older than `before` (unix ms), and
    /// finished deliveries older than `before`. Answers how many events went.
    pub fn prune_events(&self, keep: u64, before: i64) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        let n = tx.exec(
            "DELETE FROM events WHERE time < ?1
                 OR id <= (SELECT coalesce(max(id), 0) FROM events) - ?2",
            params![before, keep as i64],
        )?;
        tx.exec(
            "DELETE FROM webhook_deliveries WHERE state != 'pending' AND updated_at < ?1",
            params![before],
        )?;
        tx.commit()?;
        Ok(n)
    }

    // ---- webhooks ----

    pub fn insert_webhook(&self, w: &WebhookRecord) -> Result<()> {
        self.conn().exec(
            "INSERT INTO webhooks(id, url, secret, kinds, max_attempts, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                w.id,
                w.url,
                w.secret,
                json(&w.kinds),
                w.max_attempts,
                w.created_at
            ],
        )?;
        Ok(())
    }

    pub fn get_webhook(&self, id: &str) -> Result<WebhookRecord> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks WHERE id = ?1");
        self.conn()
            .row(&sql, [id], webhook_row)
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no such webhook: {id}")))
    }

    pub fn list_webhooks(&self) -> Result<Vec<WebhookRecord>> {
        let sql = format!("SELECT {WEBHOOK_COLS} FROM webhooks ORDER BY created_at, id");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map([], webhook_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Removes a webhook with its queue and history.
    pub fn delete_webhook(&self, id: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        tx.exec(
            "DELETE FROM webhook_attempts WHERE delivery_id IN
                 (SELECT id FROM webhook_deliveries WHERE webhook_id = ?1)",
            [id],
        )?;
        tx.exec("DELETE FROM webhook_deliveries WHERE webhook_id = ?1", [id])?;
        let n = tx.exec("DELETE FROM webhooks WHERE id = ?1", [id])?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no such webhook: {id}")));
        }
        tx.commit()?;
        Ok(())
    }

    pub fn delivery_counts(&self, webhook_id: &str) -> Result<DeliveryCounts> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT state, count(*) FROM webhook_deliveries WHERE webhook_id = ?1 GROUP BY state",
        )?;
        let rows = stmt.query_map([webhook_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut counts = (0, 0, 0);
        for row in rows {
            let (state, n) = row?;
            let n = n.max(0) as u64;
            match delivery_state(&state) {
                DeliveryState::Pending => counts.0 += n,
                DeliveryState::Delivered => counts.1 += n,
                DeliveryState::Failed => counts.2 += n,
            }
        }
        Ok(counts)
    }

    /// The oldest pending delivery of a webhook: deliveries go out in order, one at a time.
    pub fn next_delivery(&self, webhook_id: &str) -> Result<Option<PendingDelivery>> {
        Ok(self
            .conn()
            .row(
                "SELECT id, webhook_id, event_id, kind, payload, attempts, next_attempt_at
                 FROM webhook_deliveries WHERE webhook_id = ?1 AND state = 'pending'
                 ORDER BY id LIMIT 1",
                [webhook_id],
                |r| {
                    Ok(PendingDelivery {
                        id: r.get::<_, i64>(0)? as u64,
                        webhook_id: r.get(1)?,
                        event_id: r.get::<_, i64>(2)? as u64,
                        kind: r.get(3)?,
                        payload: r.get(4)?,
                        attempts: r.get(5)?,
                        next_attempt_at: r.get(6)?,
                    })
                },
            )
            .optional()?)
    }

    /// Records one attempt and what follows from it, in one transaction.
    pub fn record_attempt(
        &self,
        delivery_id: u64,
        attempt: &DeliveryAttempt,
        outcome: &AttemptOutcome,
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.read_tx()?;
        tx.exec(
            "INSERT OR REPLACE INTO webhook_attempts(delivery_id, attempt, time, status, error)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                delivery_id as i64,
                attempt.attempt,
                attempt.time,
                attempt.status_code,
                attempt.error
            ],
        )?;
        let (state, next) = match outcome {
            AttemptOutcome::Delivered => ("delivered", attempt.time),
            AttemptOutcome::Retry { at } => ("pending", *at),
            AttemptOutcome::Failed => ("failed", attempt.time),
        };
        tx.exec(
            "UPDATE webhook_deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4,
                 updated_at = ?5 WHERE id = ?1",
            params![
                delivery_id as i64,
                state,
                attempt.attempt,
                next,
                attempt.time
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A webhook's newest deliveries first, each with its attempts.
    pub fn list_deliveries(&self, webhook_id: &str, limit: usize) -> Result<Vec<WebhookDelivery>> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT id, event_id, kind, state, attempts, next_attempt_at, created_at
             FROM webhook_deliveries WHERE webhook_id = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![webhook_id, limit as i64], |r| {
            let state = delivery_state(&r.get::<_, String>(3)?);
            Ok(WebhookDelivery {
                id: r.get::<_, i64>(0)? as u64,
                event_id: r.get::<_, i64>(1)? as u64,
                kind: r.get(2)?,
                state,
                attempts: r.get(4)?,
                next_attempt_at: (state == DeliveryState::Pending).then_some(r.get::<_, i64>(5)?),
                created_at: r.get(6)?,
                history: Vec::new(),
            })
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        let mut attempts = conn.prepare_cached(
            "SELECT attempt, time, status, error FROM webhook_attempts
             WHERE delivery_id = ?1 ORDER BY attempt",
        )?;
        for d in &mut out {
            let rows = attempts.query_map([d.id as i64], |r| {
                Ok(DeliveryAttempt {
                    attempt: r.get(0)?,
                    time: r.get(1)?,
                    status_code: r.get(2)?,
                    error: r.get(3)?,
                })
            })?;
            d.history = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_and_its_launch_event_are_stored_together() {
        let s = Store::open_in_memory().unwrap();
        let mut c: kisara_api::Container = serde_json::from_value(serde_json::json!({
            "id": "c1", "docker_id": "", "name": "c-1", "node_id": "n1", "image": "busybox",
            "owner": null, "module": null, "labels": {}, "network": null, "ip_address": null,
            "state": "launching", "status": "", "ports": [], "host_port": "", "created_at": 0
        }))
        .expect("a minimal container parses");
        // No row to complete: neither the completion nor the event is stored.
        let e = s
            .complete_container_with_event(&c, &ev("container.launch", 1), Some("launch:c1"))
            .unwrap_err();
        assert!(matches!(e, StoreError::NotFound(_)), "{e}");
        assert!(!s.has_fact("launch:c1").unwrap());
        s.insert_container(&c).unwrap();
        c.docker_id = "abcdef123456".into();
        c.state = kisara_api::ContainerState::Running;
        let (stored, _) = s
            .complete_container_with_event(&c, &ev("container.launch", 1), Some("launch:c1"))
            .unwrap()
            .expect("the event is new");
        assert!(stored.id > 0);
        assert!(s.has_fact("launch:c1").unwrap());
        assert_eq!(s.get_container("c1").unwrap().docker_id, "abcdef123456");
        // The fact again: no second event, but the completion still counts.
        c.status = "Up 1 second".into();
        assert!(s
            .complete_container_with_event(&c, &ev("container.launch", 2), Some("launch:c1"))
            .unwrap()
            .is_none());
        assert_eq!(s.get_container("c1").unwrap().status, "Up 1 second");
        assert_eq!(s.events_after(0, 10).unwrap().len(), 1);
    }

    fn ev(kind: &str, time: i64) -> Event {
        Event {
            id: 0,
            kind: kind.into(),
            time,
            node_id: Some("n1".into()),
            container_id: Some("c1".into()),
            owner: None,
            module: None,
            data: serde_json::json!({"k": 1}),
        }
    }

    fn hook(id: &str, kinds: &[&str]) -> WebhookRecord {
        WebhookRecord {
            id: id.into(),
            url: "http://127.0.0.1:9/".into(),
            secret: "s3cret".into(),
            kinds: kinds.iter().map(|s| s.to_string()).collect(),
            max_attempts: 3,
            created_at: 1,
        }
    }

    #[test]
    fn facts_are_stored_once_and_ids_never_reused() {
        let s = Store::open_in_memory().unwrap();
        assert_eq!(s.last_event_id().unwrap(), 0);
        let (a, _) = s
            .append_event(&ev("container.launch", 10), Some("launch:c1"))
            .unwrap()
            .unwrap();
        assert_eq!(a.id, 1);
        assert!(s
            .append_event(&ev("container.launch", 11), Some("launch:c1"))
            .unwrap()
            .is_none());
        let (b, _) = s
            .append_event(&ev("node.connect", 12), None)
            .unwrap()
            .unwrap();
        let (c, _) = s
            .append_event(&ev("node.connect", 13), None)
            .unwrap()
            .unwrap();
        assert_eq!((b.id, c.id), (2, 3));
        assert_eq!(s.events_after(1, 10).unwrap(), vec![b.clone(), c.clone()]);
        assert_eq!(s.events_after(0, 1).unwrap(), vec![a]);
        // Prune all but the newest; the next id still goes up.
        assert_eq!(s.prune_events(1, 0).unwrap(), 2);
        assert_eq!(s.events_after(0, 10).unwrap(), vec![c]);
        s.prune_events(0, i64::MAX).unwrap();
        assert!(s.events_after(0, 10).unwrap().is_empty());
        assert_eq!(s.last_event_id().unwrap(), 3);
        let (d, _) = s
            .append_event(&ev("node.connect", 14), None)
            .unwrap()
            .unwrap();
        assert_eq!(d.id, 4);
    }

    #[test]
    fn deliveries_queue_in_order_and_record_attempts() {
        let s = Store::open_in_memory().unwrap();
        s.insert_webhook(&hook("w1", &["container."])).unwrap();
        s.insert_webhook(&hook("w2", &["node.connect"])).unwrap();
        let (e1, q1) = s
            .append_event(&ev("container.launch", 10), None)
            .unwrap()
            .unwrap();
        assert_eq!(q1, vec!["w1".to_string()]);
        let (_, q2) = s
            .append_event(&ev("node.connect", 11), None)
            .unwrap()
            .unwrap();
        assert_eq!(q2, vec!["w2".to_string()]);
        let (e3, _) = s
            .append_event(&ev("container.stop", 12), None)
            .unwrap()
            .unwrap();

        let head = s.next_delivery("w1").unwrap().unwrap();
        assert_eq!(head.event_id, e1.id);
        let sent: Event = serde_json::from_str(&head.payload).unwrap();
        assert_eq!(sent, e1);
        let failed = DeliveryAttempt {
            attempt: 1,
            time: 20,
            status_code: Some(500),
            error: None,
        };
        s.record_attempt(head.id, &failed, &AttemptOutcome::Retry { at: 1020 })
            .unwrap();
        let again = s.next_delivery("w1").unwrap().unwrap();
        assert_eq!(
            (again.id, again.attempts, again.next_attempt_at),
            (head.id, 1, 1020)
        );
        let ok = DeliveryAttempt {
            attempt: 2,
            time: 1020,
            status_code: Some(200),
            error: None,
        };
        s.record_attempt(head.id, &ok, &AttemptOutcome::Delivered)
            .unwrap();
        assert_eq!(s.next_delivery("w1").unwrap().unwrap().event_id, e3.id);
        assert_eq!(s.delivery_counts("w1").unwrap(), (1, 1, 0));

        let list = s.list_deliveries("w1", 10).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[1].state, DeliveryState::Delivered);
        assert_eq!(list[1].history, vec![failed, ok]);
        assert_eq!(list[0].state, DeliveryState::Pending);

        s.delete_webhook("w1").unwrap();
        assert!(s.next_delivery("w1").unwrap().is_none());
        assert!(matches!(s.get_webhook("w1"), Err(StoreError::NotFound(_))));
        assert!(!format!("{:?}", s.get_webhook("w2").unwrap()).contains("s3cret"));
    }
}
