//! Instance lifecycle routes: renew a container's lifetime (services: `services::renew`).
//! (Destroying is `POST /v1/containers/{id}/stop` or `DELETE /v1/containers/{id}`.)

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;
use kisara_api::{Container, ErrorBody, RenewRequest};

use crate::error::{ApiError, ApiResult};
use crate::instances::{self, Caller};
use crate::AppState;

/// Extend a container's lifetime by `secs` (default: the server's `renew_secs`), within the
/// maximum lifetime, the renewal limit and the hard deadline (409 `quota_exceeded` names the
/// limit hit).
#[utoipa::path(post, path = "/v1/containers/{id}/renew", request_body = RenewRequest,
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix")),
    responses((status = 200, body = Container), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn renew(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Container>> {
    let secs = renew_secs(&body)?;
    let mut c = st.store.get_container(&id)?;
    let rec = instances::renew(&st, &c.id, secs)?;
    instances::decorate(&mut c, Some(&rec), caller);
    Ok(Json(c))
}

/// The extension a renew body asks for. The body is optional: an empty one renews by the
/// default extension.
pub fn renew_secs(body: &[u8]) -> ApiResult<Option<u64>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    Ok(serde_json::from_slice::<RenewRequest>(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
        .secs)
}
