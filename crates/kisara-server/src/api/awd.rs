//! AWD routes: create a game, list and inspect games, rotate flags, reset a gamebox, delete.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kisara_api::{
    AwdGame, AwdResetRequest, AwdRotateResponse, CreateAwdGameRequest, ErrorBody, ListResponse,
};

use super::ApiJson;
use crate::error::ApiResult;
use crate::instances::Caller;
use crate::{awd, AppState};

/// Create an AWD game: one shared game network (outbound off) and a gamebox per team.
#[utoipa::path(post, path = "/v1/awd/games", request_body = CreateAwdGameRequest,
    responses((status = 201, body = AwdGame), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(req): ApiJson<CreateAwdGameRequest>,
) -> ApiResult<(StatusCode, Json<AwdGame>)> {
    let game = awd::create(&st, req, caller).await?;
    Ok((StatusCode::CREATED, Json(game)))
}

/// Every AWD game.
#[utoipa::path(get, path = "/v1/awd/games",
    responses((status = 200, body = ListResponse<AwdGame>)))]
pub async fn list(
    State(st): State<Arc<AppState>>,
    caller: Caller,
) -> ApiResult<Json<ListResponse<AwdGame>>> {
    let mut items = Vec::new();
    for g in st.store.list_awd_games()? {
        items.push(awd::view(&st, &g, caller)?);
    }
    Ok(Json(ListResponse {
        items,
        node_errors: Vec::new(),
    }))
}

/// One AWD game (by id or name), with the current flag per team for admins.
#[utoipa::path(get, path = "/v1/awd/games/{id}",
    params(("id" = String, Path, description = "Game id or name")),
    responses((status = 200, body = AwdGame), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<AwdGame>> {
    let g = st.store.awd_game(&id)?;
    Ok(Json(awd::view(&st, &g, caller)?))
}

/// Remove a game: its gameboxes and its network.
#[utoipa::path(delete, path = "/v1/awd/games/{id}",
    params(("id" = String, Path, description = "Game id or name")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let g = st.store.awd_game(&id)?;
    awd::remove(&st, &g).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run the game's flag command in every gamebox with a fresh flag; answers the new flag per
/// team (admin only).
#[utoipa::path(post, path = "/v1/awd/games/{id}/rotate",
    params(("id" = String, Path, description = "Game id or name")),
    responses((status = 200, body = AwdRotateResponse), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn rotate(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<AwdRotateResponse>> {
    if !caller.sees_flags() {
        return Err(crate::error::ApiError::forbidden(
            "rotating flags answers them, which only admin tokens may see",
        ));
    }
    let g = st.store.awd_game(&id)?;
    Ok(Json(awd::rotate(&st, &g).await?))
}

/// Recreate a team's gamebox from its image (same name and address where possible, the
/// current flag).
#[utoipa::path(post, path = "/v1/awd/games/{id}/reset", request_body = AwdResetRequest,
    params(("id" = String, Path, description = "Game id or name")),
    responses((status = 200, body = AwdGame), (status = 404, body = ErrorBody)))]
pub async fn reset(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<AwdResetRequest>,
) -> ApiResult<Json<AwdGame>> {
    let g = st.store.awd_game(&id)?;
    Ok(Json(awd::reset(&st, &g, &req.team, caller).await?))
}
