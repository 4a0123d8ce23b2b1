//! Cluster images (bundles) as the server offers them: listing, and loading a bundle's images
//! into nodes' engines.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A bundle in the server's bundle store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BundleSummary {
    /// `name:tag`.
    pub name: String,
    /// Digest of the bundle's top manifest.
    pub digest: String,
    pub apps: Vec<String>,
    /// Image references it carries.
    pub images: Vec<String>,
    /// Bytes of its distinct blobs.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
}

/// `POST /v1/bundles/{name}/images`: load the bundle's images into nodes' engines.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BundleImagesRequest {
    /// Node id or name; every connected node when absent.
    #[serde(default)]
    pub node: Option<String>,
}

/// One line of a bundle image load's progress (NDJSON), per node. The last line of a node is
/// `done` (with `images`) or `error`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BundleLoadProgress {
    #[serde(default)]
    pub node_id: String,
    /// `loading`, `done` or `error`.
    pub status: String,
    /// Bytes received by the node so far.
    #[serde(default)]
    pub current: u64,
    /// Bytes in all.
    #[serde(default)]
    pub total: Option<u64>,
    /// References the engine loaded (on `done`).
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Header with which an agent names itself when it fetches from the server over HTTP with its
/// node credential as the bearer token.
pub const NODE_ID_HEADER: &str = "x-kisara-node";
