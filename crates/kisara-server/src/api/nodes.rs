//! Node routes: list, inspect, and the operator's verbs (cordon, uncordon, drain, labels).
//!
//! Cordon and drain are flags in the store, so they survive restarts and reconnects. Drain is
//! cordon plus a report of what still runs there: Kisara does not move containers off a node,
//! since a challenge instance is not migratable (its flag, its team's state, its address all
//! live on that node); stop them, or let them expire, and the node is empty.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use kisara_api::{DrainReport, ErrorBody, ListResponse, Node, NodeLabelsRequest};

use super::ApiJson;
use crate::error::{ApiError, ApiResult};
use crate::{placement, AppState};

/// Every node that ever joined, with its live state and last reported status.
#[utoipa::path(get, path = "/v1/nodes", responses((status = 200, body = ListResponse<Node>)))]
pub async fn list(State(st): State<Arc<AppState>>) -> ApiResult<Json<ListResponse<Node>>> {
    let items = placement::nodes(&st)?;
    Ok(Json(ListResponse {
        items,
        node_errors: Vec::new(),
    }))
}

/// One node, by id or name.
#[utoipa::path(get, path = "/v1/nodes/{id}",
    params(("id" = String, Path, description = "Node id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    Ok(Json(placement::node(&st, &id)?))
}

fn set_flags(st: &AppState, id: &str, cordoned: bool, draining: bool) -> ApiResult<Node> {
    let node_id = placement::resolve_node(st, id)?;
    st.store.set_node_flags(&node_id, cordoned, draining)?;
    st.placement.refresh_node(&st.store, &node_id)?;
    tracing::info!(node = %node_id, cordoned, draining, "node scheduling flags changed");
    placement::node(st, &node_id)
}

/// Stop placing new containers and networks on a node; what runs there keeps running.
#[utoipa::path(post, path = "/v1/nodes/{id}/cordon",
    params(("id" = String, Path, description = "Node id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn cordon(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    Ok(Json(set_flags(&st, &id, true, false)?))
}

/// Let the scheduler use a node again (clears cordon and drain).
#[utoipa::path(post, path = "/v1/nodes/{id}/uncordon",
    params(("id" = String, Path, description = "Node id or name")),
    responses((status = 200, body = Node), (status = 404, body = ErrorBody)))]
pub async fn uncordon(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Node>> {
    Ok(Json(set_flags(&st, &id, false, false)?))
}

/// Cordon a node and report the containers still on it. They are not moved (challenge
/// instances are not migratable); stop them and the node is empty.
#[utoipa::path(post, path = "/v1/nodes/{id}/drain",
    params(("id" = String, Path, description = "Node id or name")),
    responses((status = 200, body = DrainReport), (status = 404, body = ErrorBody)))]
pub async fn drain(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<DrainReport>> {
    let node = set_flags(&st, &id, true, true)?;
    let containers = st
        .store
        .container_reservations(Some(&node.id))?
        .into_iter()
        .map(|r| r.id)
        .collect();
    Ok(Json(DrainReport { node, containers }))
}

/// Merge labels into a node's: a value sets the key, `null` deletes it (also a key that the
/// agent's configuration sets). The change outlives the agent's reconnects.
#[utoipa::path(put, path = "/v1/nodes/{id}/labels", request_body = NodeLabelsRequest,
    params(("id" = String, Path, description = "Node id or name")),
    responses((status = 200, body = Node), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub async fn labels(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NodeLabelsRequest>,
) -> ApiResult<Json<Node>> {
    for k in req.labels.keys() {
        if k.trim().is_empty() || k.len() > 128 {
            return Err(ApiError::bad_request(format!(
                "label key {k:?} must be 1-128 characters"
            )));
        }
    }
    let node_id = placement::resolve_node(&st, &id)?;
    let rec = st
        .store
        .node_by_id(&node_id)?
        .ok_or_else(|| ApiError::not_found(format!("unknown node {id:?}")))?;
    let mut overrides = rec.label_overrides;
    for (k, v) in req.labels {
        match v {
            Some(v) => overrides.insert(k, Some(v)),
            // Deleting a key the operator set (and the agent does not) leaves no trace.
            None if !rec.labels.contains_key(&k) => overrides.remove(&k),
            None => overrides.insert(k, None),
        };
    }
    st.store.set_node_label_overrides(&node_id, &overrides)?;
    st.placement.refresh_node(&st.store, &node_id)?;
    Ok(Json(placement::node(&st, &node_id)?))
}
