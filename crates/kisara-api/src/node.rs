use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Connection and scheduling state of a node.
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
}
