//! Webhook delivery: one worker per webhook sends its queue (kept in the store) in order.
//!
//! Each event is POSTed as JSON with `X-Kisara-Event`, `X-Kisara-Event-Id`,
//! `X-Kisara-Delivery` and `X-Kisara-Signature: sha256=<hex HMAC-SHA256(secret, body)>`. A 2xx
//! answer delivers it; anything else (another status, no answer, a timeout) is retried with
//! exponential backoff until the webhook's `max_attempts`, then the delivery is marked failed
//! and the queue moves on. The head of the queue blocks the ones behind it, so a receiver sees
//! events in order. Since the queue is in the store, deliveries survive a restart. Redirects are
//! not followed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use kisara_api::events::headers;
use kisara_api::DeliveryAttempt;
use kisara_store::{AttemptOutcome, PendingDelivery, Store, StoreError};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::events::now_ms;

/// How deliveries are retried.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryPolicy {
    /// Wait after the first failed attempt; doubled after each further one.
    pub backoff_base: Duration,
    /// Longest wait between two attempts.
    pub backoff_max: Duration,
    /// Time a receiver has to answer.
    pub timeout: Duration,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Attempts per event unless the webhook says otherwise, and the most it may say.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 8;
pub const MAX_ATTEMPTS_LIMIT: u32 = 20;

impl DeliveryPolicy {
    /// The wait after `failed` attempts (1 = after the first).
    pub fn backoff(&self, failed: u32) -> Duration {
        let factor = 1u32 << failed.saturating_sub(1).min(20);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the value of `X-Kisara-Signature`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

struct Worker {
    notify: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The webhook workers.
pub struct Dispatcher {
    store: Store,
    http: reqwest::Client,
    pub policy: Mutex<DeliveryPolicy>,
    workers: Mutex<HashMap<String, Worker>>,
    /// Set once the server runs: workers exist only from then on.
    running: Mutex<Option<CancellationToken>>,
}

impl Dispatcher {
    pub fn new(store: Store) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kisara-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Dispatcher {
            store,
            http,
            policy: Mutex::new(DeliveryPolicy::default()),
            workers: Mutex::new(HashMap::new()),
            running: Mutex::new(None),
        }
    }

    fn policy(&self) -> DeliveryPolicy {
        *self.policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a worker per stored webhook (their queues may hold deliveries from before a
    /// restart). Workers stop with `shutdown`.
    pub fn start(&self, shutdown: CancellationToken) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(shutdown);
        match self.store.list_webhooks() {
            Ok(hooks) => {
                for h in hooks {
                    self.added(&h.id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list webhooks"),
        }
    }

    /// A webhook was registered: give it a worker.
    pub fn added(&self, id: &str) {
        let Some(shutdown) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let notify = Arc::new(Notify::new());
        let task = tokio::spawn(run_worker(
            id.to_string(),
            self.store.clone(),
            self.http.clone(),
            self.policy(),
            notify.clone(),
            shutdown,
        ));
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        workers.insert(id.to_string(), Worker { notify, task });
    }

    /// A webhook was deleted: stop its worker.
    pub fn removed(&self, id: &str) {
        let w = self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        drop(w);
    }

    /// New deliveries were queued for these webhooks.
    pub fn notify(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            if let Some(w) = workers.get(id) {
                w.notify.notify_one();
            }
        }
    }
}

async fn run_worker(
    id: String,
    store: Store,
    http: reqwest::Client,
    policy: DeliveryPolicy,
    notify: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let next = match store.next_delivery(&id) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "cannot read the delivery queue");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let Some(d) = next else {
            tokio::select! {
                _ = notify.notified() => continue,
                _ = shutdown.cancelled() => return,
            }
        };
        let wait = d.next_attempt_at - now_ms();
        if wait > 0 {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let hook = match store.get_webhook(&id) {
            Ok(h) => h,
            Err(StoreError::NotFound(_)) => return,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "cannot read a webhook");
                continue;
            }
        };
        let attempt = d.attempts + 1;
        let (status_code, error) = tokio::select! {
            r = send(&http, &hook.url, &hook.secret, &d, policy.timeout) => r,
            _ = shutdown.cancelled() => return,
        };
        let ok = status_code.is_some_and(|s| (200..300).contains(&s));
        let time = now_ms();
        let outcome = if ok {
            AttemptOutcome::Delivered
        } else if attempt >= hook.max_attempts {
            AttemptOutcome::Failed
        } else {
            AttemptOutcome::Retry {
                at: time + policy.backoff(attempt).as_millis() as i64,
            }
        };
        match &outcome {
            AttemptOutcome::Delivered => {
                tracing::debug!(webhook = %id, delivery = d.id, "delivered")
            }
            AttemptOutcome::Retry { .. } => tracing::info!(webhook = %id, delivery = d.id,
                attempt, status = ?status_code, error = ?error, "webhook delivery failed; will retry"),
            AttemptOutcome::Failed => tracing::warn!(webhook = %id, delivery = d.id, attempt,
                status = ?status_code, error = ?error, "webhook delivery failed; giving up"),
        }
        let record = DeliveryAttempt {
            attempt,
            time,
            status_code,
            error,
        };
        if let Err(e) = store.record_attempt(d.id, &record, &outcome) {
            tracing::warn!(webhook = %id, error = %e, "cannot record a delivery attempt");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// One POST: the receiver's status, or why there was none.
async fn send(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    d: &PendingDelivery,
    timeout: Duration,
) -> (Option<u16>, Option<String>) {
    let body = d.payload.clone().into_bytes();
    let signature = sign(secret, &body);
    let r = http
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(headers::EVENT, &d.kind)
        .header(headers::EVENT_ID, d.event_id.to_string())
        .header(headers::DELIVERY, d.id.to_string())
        .header(headers::SIGNATURE, signature)
        .body(body)
        .send()
        .await;
    match r {
        Ok(resp) => (Some(resp.status().as_u16()), None),
        Err(e) => (None, Some(describe(e))),
    }
}

/// A transport error as text, without the URL (which the webhook's owner already knows).
fn describe(e: reqwest::Error) -> String {
    let timeout = e.is_timeout();
    let e = e.without_url();
    let mut s = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    if timeout {
        s.push_str(" (timed out)");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = DeliveryPolicy {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
        };
        let waits: Vec<u64> = (1..=6).map(|n| p.backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(10));
    }
}
