use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `POST /v1/networks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateNetworkRequest {
    pub name: String,
    /// Explicit subnet (`10.201.3.0/24`); the next free one from the pool when absent.
    #[serde(default)]
    pub subnet: Option<String>,
    /// No gateway at all: members reach only each other (and ports cannot be published).
    #[serde(default)]
    pub internal: bool,
    /// Allow outbound traffic (IP masquerade). Off by default.
    #[serde(default)]
    pub internet: bool,
    /// Node id or name; the scheduler picks one when absent.
    #[serde(default)]
    pub node: Option<String>,
    /// Only nodes carrying all these labels are considered.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A network managed by Kisara.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Network {
    /// Kisara's id.
    pub id: String,
    pub name: String,
    pub docker_id: String,
    pub node_id: String,
    pub subnet: String,
    pub gateway: Option<String>,
    pub internal: bool,
    pub internet: bool,
    /// Set when the network was made for one container and goes with it.
    pub owned_by: Option<String>,
    /// Whether the subnet came from the pool (and returns to it on removal).
    pub from_pool: bool,
    pub labels: BTreeMap<String, String>,
    /// Unix seconds.
    pub created_at: i64,
}

/// Query of `GET /v1/networks`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NetworkFilter {
    #[serde(default)]
    pub node: Option<String>,
    /// Also list the warm pool's unclaimed spare networks.
    #[serde(default)]
    pub all: Option<bool>,
}
