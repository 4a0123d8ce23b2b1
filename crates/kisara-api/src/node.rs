use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Connection state of a node. Whether new work may go there also depends on the
/// operator's flags ([`Node::cordoned`], [`Node::draining`]); [`Node::schedulable`] sums it up.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Connected and heartbeating.
    Ready,
    /// Heartbeats missed; not scheduled onto.
    Unreachable,
    /// Gone past the grace period.
    Down,
}

/// Measured status a node reports with every heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeStatus {
    pub cpus: u32,
    /// Host CPU use over the last interval, 0..=100 × cpus.
    pub cpu_percent: f64,
    pub memory_total: u64,
    pub memory_used: u64,
    pub disk_total: u64,
    pub disk_free: u64,
    /// Containers carrying this cluster's labels on the node.
    pub containers: u32,
    pub containers_running: u32,
    /// Set when the engine did not answer the status query in time: the figures are the last
    /// ones it gave (zero if it never answered). The heartbeat itself is on time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stale: bool,
}

/// How the scheduler ranks the nodes that can take a request.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PlacementStrategy {
    /// The least loaded node (by the fullest of its cpu, memory and slot fractions).
    #[default]
    Spread,
    /// The most loaded node that still fits, keeping other nodes empty.
    Binpack,
}

/// Static facts about a node's engine, sent when it connects.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct EngineInfo {
    pub hostname: String,
    pub engine_version: String,
    pub api_version: String,
    pub os: String,
    pub arch: String,
    pub cpus: u32,
    pub memory_total: u64,
}

/// A node of the cluster.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Node {
    pub id: String,
    pub name: String,
    pub state: NodeState,
    /// Address advertised to players for ports published on this node.
    pub public_address: String,
    pub labels: BTreeMap<String, String>,
    /// Most containers Kisara will place here (Kisara's `max_container`); 0 = unlimited.
    pub max_containers: u32,
    pub engine: EngineInfo,
    pub status: NodeStatus,
    pub agent_version: String,
    /// Unix seconds.
    pub connected_at: Option<i64>,
    pub last_heartbeat: Option<i64>,
    /// Labelled containers the engine has that the store does not know (found at reconcile).
    pub unknown_containers: Vec<String>,
    /// Set by `cordon`: nothing new is placed here; what runs keeps running.
    #[serde(default)]
    pub cordoned: bool,
    /// Set by `drain`: cordoned, and waiting for its containers to be stopped.
    #[serde(default)]
    pub draining: bool,
    /// Ready, neither cordoned nor draining: the scheduler may place new work here.
    #[serde(default)]
    pub schedulable: bool,
    /// What the scheduler counts against this node: its capacity and what is reserved.
    #[serde(default)]
    pub allocation: NodeAllocation,
}

/// A node's capacity and what Kisara has reserved on it, in the scheduler's units.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeAllocation {
    /// Kisara containers placed here (and not found gone).
    pub containers: u32,
    /// Memory reserved by those containers, MiB.
    pub memory_mb: u64,
    /// CPU reserved by those containers, in cores.
    pub cpus: f64,
    /// Memory the scheduler may hand out here, MiB (total × memory overcommit); 0 = unknown.
    pub memory_capacity_mb: u64,
    /// CPU the scheduler may hand out here, cores (count × cpu overcommit); 0 = unknown.
    pub cpu_capacity: f64,
    /// Images the node reported (ids and tags), as of its last report.
    pub images: usize,
}

/// `PUT /v1/nodes/{id}/labels`: merged into the node's labels; a `null` value deletes the key
/// (also a key the agent's configuration sets).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeLabelsRequest {
    #[schema(value_type = BTreeMap<String, Option<String>>)]
    pub labels: BTreeMap<String, Option<String>>,
}

/// Answer of `POST /v1/nodes/{id}/drain`: the node, and the containers still on it. Kisara does
/// not move them (challenge instances are not migratable): stop them, or let them expire, and
/// the node is empty.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DrainReport {
    pub node: Node,
    /// Kisara ids of the containers still on the node.
    pub containers: Vec<String>,
}
