//! Node routes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use kisara_api::{ErrorBody, ListResponse, Node};

use crate::error::ApiResult;
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
    let node_id = placement::resolve_node(&st, &id)?;
    placement::nodes(&st)?
        .into_iter()
        .find(|n| n.id == node_id)
        .map(Json)
        .ok_or_else(|| crate::ApiError::not_found(format!("unknown node {id:?}")))
}
