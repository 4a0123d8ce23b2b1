use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// An image present on a node's engine.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ImageSummary {
    /// `sha256:...`
    pub id: String,
    pub tags: Vec<String>,
    /// Bytes.
    pub size: i64,
    /// Unix seconds.
    pub created: i64,
    pub node_id: String,
}

/// `POST /v1/images/pull`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PullRequest {
    /// Image reference, e.g. `busybox:latest`.
    pub image: String,
    /// Node id or name; every connected node when neither this nor `nodes` is given.
    #[serde(default)]
    pub node: Option<String>,
    /// Several nodes (ids or names), besides `node`.
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// One line of the newline-delimited JSON stream that a pull answers with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PullProgress {
    pub node_id: String,
    /// Engine status text (`Downloading`, `Pull complete`, ...), or `done` / `error` at the end.
    pub status: String,
    /// Layer id the line is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Set on the final line of a failed pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Query of `DELETE /v1/images/{reference}` and `GET /v1/images`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImageQuery {
    /// Node id or name; every node when absent.
    #[serde(default)]
    pub node: Option<String>,
    /// Remove even when containers use the image.
    #[serde(default)]
    pub force: Option<bool>,
}
