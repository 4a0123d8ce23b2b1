//! Wire types shared by the server, the agent and the SDK.
//!
//! This crate is deliberately dependency-light: the SDK (`kisara-client`) depends on it and on
//! nothing else of Kisara, so platforms can talk to a server without pulling the server in.
//! Field names follow Kisara-the-original where one existed (`image`, `uid`, `port_protocol`,
//! `subnet_name`, `module`, `host_port`) so that existing platform integrations keep working.

pub mod agent;
pub mod bundle;
pub mod container;
pub mod error;
pub mod events;
pub mod exposure;
pub mod image;
pub mod instance;
pub mod network;
pub mod node;
pub mod service;

pub use bundle::*;
pub use container::*;
pub use error::*;
pub use events::{
    CreateWebhookRequest, DeliveryAttempt, DeliveryState, Event, EventFilter, EventQuery, Webhook,
    WebhookDelivery,
};
pub use exposure::{ExposeMode, GatewayPort, NodeExposure, PortRange, Traffic};
pub use image::*;
pub use instance::*;
pub use network::*;
pub use node::*;
pub use service::*;

/// Label keys carried by every Docker object Kisara creates. They are the source of truth from
/// which a node's inventory is rebuilt after a crash.
pub mod labels {
    /// Prefix of every Kisara label.
    pub const PREFIX: &str = "io.kisara.";
    /// Identifies the cluster (one server's data directory) that owns the object.
    pub const CLUSTER: &str = "io.kisara.cluster";
    /// Kisara's id of the container.
    pub const CONTAINER: &str = "io.kisara.container";
    /// Kisara's id of the network.
    pub const NETWORK: &str = "io.kisara.network";
    /// The node the object was created on.
    pub const NODE: &str = "io.kisara.node";
    /// Owner (team or user).
    pub const OWNER: &str = "io.kisara.owner";
    /// Challenge / module.
    pub const MODULE: &str = "io.kisara.module";
    /// Set on networks Kisara created for one container and removes with it.
    pub const OWNED_BY: &str = "io.kisara.owned-by";
    /// Set on spare networks of the warm pool (claimed by launches, then owned by them).
    pub const SPARE: &str = "io.kisara.spare";
    /// Kisara's id of the multi-container service the object belongs to.
    pub const SERVICE: &str = "io.kisara.service";
    /// The object's name inside its service (compose service or network name).
    pub const SERVICE_MEMBER: &str = "io.kisara.service-member";
    /// On a container with a read-only root and flag files: the image made for it (its base
    /// image plus the files), removed with the container.
    pub const FILES_IMAGE: &str = "io.kisara.files-image";
}

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every list answer: the merged items, plus the nodes that could not answer in time. A list
/// never fails as a whole because one node is down.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ListResponse<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub node_errors: Vec<NodeError>,
}

/// A node that failed to answer part of a request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeError {
    pub node_id: String,
    pub error: ErrorDetail,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
}
