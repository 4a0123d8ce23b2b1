//! Events: what happened in the cluster, each fact once, with a durable id.
//!
//! The server appends every event to its store (except `node.heartbeat`, which is broadcast
//! only) and serves them on `GET /v1/events` as Server-Sent Events, resumable by
//! `Last-Event-ID`; registered webhooks receive them signed; the SDK turns them into hooks.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Event kinds. A filter entry ending in `.` or `.*` matches every kind with that prefix.
pub mod kinds {
    /// An agent's channel was accepted (once per session).
    pub const NODE_CONNECT: &str = "node.connect";
    /// A node's last session closed (once per session that was the node's current one).
    pub const NODE_DISCONNECT: &str = "node.disconnect";
    /// Every heartbeat of every node. Chatty: never stored, and delivered only to subscribers
    /// that name it explicitly.
    pub const NODE_HEARTBEAT: &str = "node.heartbeat";
    /// A container was launched and recorded.
    pub const CONTAINER_LAUNCH: &str = "container.launch";
    /// A container was stopped or removed through Kisara (once per container).
    pub const CONTAINER_STOP: &str = "container.stop";
    /// A container's main process ended without Kisara asking (exit, crash, OOM kill, a
    /// `docker stop` behind Kisara's back).
    pub const CONTAINER_DIE: &str = "container.die";
    /// A multi-container service came up (fires once services exist, issue #4).
    pub const SERVICE_START: &str = "service.start";
    /// A service was taken down (fires once services exist, issue #4).
    pub const SERVICE_STOP: &str = "service.stop";
    /// An instance outlived its lifetime and was removed (fires once TTLs exist, issue #4).
    pub const INSTANCE_EXPIRED: &str = "instance.expired";
    /// A node stayed away past its grace period (once per outage).
    pub const NODE_DOWN: &str = "node.down";
    /// A container's node went down past its grace period (once per container per outage).
    pub const CONTAINER_LOST: &str = "container.lost";
    /// Reconciliation removed a container that carries this cluster's label but that the
    /// store does not know (left by a launch a crash interrupted, or made behind Kisara's
    /// back): once per engine container.
    pub const CONTAINER_ORPHAN_REMOVED: &str = "container.orphan_removed";

    /// Every kind this version knows.
    pub const ALL: &[&str] = &[
        NODE_CONNECT,
        NODE_DISCONNECT,
        NODE_HEARTBEAT,
        CONTAINER_LAUNCH,
        CONTAINER_STOP,
        CONTAINER_DIE,
        SERVICE_START,
        SERVICE_STOP,
        INSTANCE_EXPIRED,
        NODE_DOWN,
        CONTAINER_LOST,
        CONTAINER_ORPHAN_REMOVED,
    ];

    /// Kinds that are broadcast but never stored, so they carry id 0 and cannot be resumed.
    pub fn is_transient(kind: &str) -> bool {
        kind == NODE_HEARTBEAT
    }
}

/// Something that happened in the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Event {
    /// Monotonic and durable (never reused, also after retention pruning); 0 for transient
    /// kinds (`node.heartbeat`), which are not stored.
    pub id: u64,
    /// `container.launch`, `node.connect`, ... (see [`kinds`]).
    pub kind: String,
    /// Unix milliseconds.
    pub time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Kind-specific details (container name, image, exit code, node status, ...).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// Query of `GET /v1/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, PartialEq)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Comma-separated kinds; `container.` or `container.*` matches a prefix, `*` everything
    /// but heartbeats. `node.heartbeat` must be named to be received. Default: all but
    /// heartbeats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kinds: Option<String>,
    /// Only events of this node (id or name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only events of this owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Replay stored events with an id above this first (the `Last-Event-ID` header wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// Which events a subscriber (SSE stream, webhook) wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// Empty: every kind but the transient ones.
    pub kinds: Vec<String>,
    pub node_id: Option<String>,
    pub owner: Option<String>,
}

impl EventFilter {
    /// Kind patterns from a comma-separated list (blanks dropped).
    pub fn parse_kinds(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Whether a pattern is well formed: `*`, a kind, or a prefix ending in `.` or `.*`,
    /// made of lowercase letters, digits, `_`, `-` and `.`.
    pub fn valid_pattern(p: &str) -> bool {
        if p == "*" {
            return true;
        }
        let body = p.strip_suffix('*').unwrap_or(p);
        if p.ends_with('*') && !body.ends_with('.') {
            return false;
        }
        !body.is_empty()
            && body.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
    }

    /// Whether `kind` is selected by these kind patterns.
    pub fn kind_matches(patterns: &[String], kind: &str) -> bool {
        if kinds::is_transient(kind) {
            // Chatty kinds only when named outright.
            return patterns.iter().any(|p| p == kind);
        }
        if patterns.is_empty() {
            return true;
        }
        patterns.iter().any(|p| {
            if p == "*" {
                return true;
            }
            let prefix = p.strip_suffix('*').unwrap_or(p);
            if prefix.ends_with('.') {
                kind.starts_with(prefix)
            } else {
                kind == p
            }
        })
    }

    pub fn matches(&self, e: &Event) -> bool {
        Self::kind_matches(&self.kinds, &e.kind)
            && self
                .node_id
                .as_ref()
                .is_none_or(|n| e.node_id.as_ref() == Some(n))
            && self
                .owner
                .as_ref()
                .is_none_or(|o| e.owner.as_ref() == Some(o))
    }
}

// ---- webhooks ----------------------------------------------------------------------------

/// `POST /v1/webhooks`.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookRequest {
    /// Where events are POSTed (`http://`).
    pub url: String,
    /// Key of the `X-Kisara-Signature` HMAC-SHA256; never shown again.
    pub secret: String,
    /// Kind patterns as in `GET /v1/events`; empty = every kind but heartbeats.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Attempts per event before it is marked failed (1..=20, default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl fmt::Debug for CreateWebhookRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateWebhookRequest")
            .field("url", &self.url)
            .field("secret", &"***")
            .field("kinds", &self.kinds)
            .field("max_attempts", &self.max_attempts)
            .finish()
    }
}

/// A registered webhook. Its secret is never returned.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub kinds: Vec<String>,
    /// Always `********`: the secret is write-only.
    pub secret: String,
    pub max_attempts: u32,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Deliveries waiting (or retrying), delivered, and given up.
    pub pending: u64,
    pub delivered: u64,
    pub failed: u64,
}

/// What the masked secret reads as.
pub const MASKED_SECRET: &str = "********";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not yet delivered; retried at `next_attempt_at`.
    Pending,
    Delivered,
    /// Every attempt failed.
    Failed,
}

/// One try to deliver an event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DeliveryAttempt {
    /// 1 for the first try.
    pub attempt: u32,
    /// Unix milliseconds.
    pub time: i64,
    /// HTTP status the receiver answered, if it answered.
    pub status_code: Option<u16>,
    /// Why the attempt failed without an answer (connection refused, timeout, ...).
    pub error: Option<String>,
}

/// One event on its way to one webhook, with its attempts (newest deliveries first).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WebhookDelivery {
    /// Also sent as `X-Kisara-Delivery`.
    pub id: u64,
    pub event_id: u64,
    pub kind: String,
    pub state: DeliveryState,
    pub attempts: u32,
    /// Unix milliseconds of the next try, while pending.
    pub next_attempt_at: Option<i64>,
    pub created_at: i64,
    pub history: Vec<DeliveryAttempt>,
}

/// Header names of a webhook delivery.
pub mod headers {
    /// The event's kind.
    pub const EVENT: &str = "X-Kisara-Event";
    /// The event's id.
    pub const EVENT_ID: &str = "X-Kisara-Event-Id";
    /// The delivery's id (the same on every retry).
    pub const DELIVERY: &str = "X-Kisara-Delivery";
    /// `sha256=<hex HMAC-SHA256(secret, body)>`.
    pub const SIGNATURE: &str = "X-Kisara-Signature";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: &str) -> Event {
        Event {
            id: 1,
            kind: kind.into(),
            time: 0,
            node_id: Some("n1".into()),
            container_id: None,
            owner: Some("team1".into()),
            module: None,
            data: serde_json::Value::Null,
        }
    }

    #[test]
    fn kind_patterns() {
        let p = |s: &str| EventFilter::parse_kinds(s);
        assert!(EventFilter::kind_matches(&[], "container.launch"));
        assert!(!EventFilter::kind_matches(&[], "node.heartbeat"));
        assert!(EventFilter::kind_matches(&p("container."), "container.die"));
        assert!(EventFilter::kind_matches(
            &p("container.*"),
            "container.die"
        ));
        assert!(!EventFilter::kind_matches(&p("container."), "node.connect"));
        assert!(!EventFilter::kind_matches(&p("container"), "container.die"));
        assert!(EventFilter::kind_matches(&p("*"), "service.start"));
        assert!(!EventFilter::kind_matches(&p("*,node."), "node.heartbeat"));
        assert!(EventFilter::kind_matches(
            &p(" node.heartbeat ,x"),
            "node.heartbeat"
        ));
        assert!(EventFilter::kind_matches(
            &p("node.connect,node.disconnect"),
            "node.disconnect"
        ));
    }

    #[test]
    fn pattern_validation() {
        for ok in [
            "*",
            "container.",
            "container.*",
            "node.heartbeat",
            "a_b-c.d",
        ] {
            assert!(EventFilter::valid_pattern(ok), "{ok}");
        }
        for bad in ["", "Container.launch", "container*", "a b", ".*x", "*."] {
            assert!(!EventFilter::valid_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn filters_on_node_and_owner() {
        let f = EventFilter {
            kinds: vec![],
            node_id: Some("n1".into()),
            owner: Some("team1".into()),
        };
        assert!(f.matches(&ev("container.launch")));
        let mut e = ev("container.launch");
        e.owner = Some("team2".into());
        assert!(!f.matches(&e));
        e.owner = None;
        assert!(!f.matches(&e));
    }

    #[test]
    fn webhook_secret_is_not_in_debug() {
        let r = CreateWebhookRequest {
            url: "http://127.0.0.1:1/".into(),
            secret: "hunter2".into(),
            ..Default::default()
        };
        assert!(!format!("{r:?}").contains("hunter2"));
    }

    #[test]
    fn events_round_trip_without_empty_fields() {
        let e = ev("node.connect");
        let s = serde_json::to_string(&e).unwrap();
        assert!(!s.contains("container_id"), "{s}");
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
    }
}
