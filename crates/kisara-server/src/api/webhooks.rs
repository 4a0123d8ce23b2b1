//! Webhook routes: register, list, delete, and see deliveries.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kisara_api::events::MASKED_SECRET;
use kisara_api::{CreateWebhookRequest, ErrorBody, EventFilter, Webhook, WebhookDelivery};
use kisara_store::WebhookRecord;
use serde::Deserialize;
use utoipa::IntoParams;

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::events::now_ms;
use crate::webhooks::{DEFAULT_MAX_ATTEMPTS, MAX_ATTEMPTS_LIMIT};
use crate::{new_id, AppState};

/// Longest accepted URL and secret.
const MAX_URL: usize = 2048;
const MAX_SECRET: usize = 512;

fn validate(req: &CreateWebhookRequest) -> ApiResult<()> {
    if req.url.len() > MAX_URL {
        return Err(ApiError::bad_request("url is too long"));
    }
    let url = reqwest::Url::parse(&req.url)
        .map_err(|e| ApiError::bad_request(format!("invalid url {:?}: {e}", req.url)))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(ApiError::bad_request(
                "https webhooks are not supported by this build yet; use http:// (for \
                 example to a local relay)",
            ))
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "url scheme {other:?} is not supported; use http://"
            )))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request("url needs a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ApiError::bad_request(
            "url must not carry credentials; the secret signs every delivery",
        ));
    }
    if req.secret.is_empty() || req.secret.len() > MAX_SECRET {
        return Err(ApiError::bad_request(format!(
            "secret must be 1-{MAX_SECRET} bytes"
        )));
    }
    if let Some(bad) = req.kinds.iter().find(|k| !EventFilter::valid_pattern(k)) {
        return Err(ApiError::bad_request(format!("invalid event kind {bad:?}")));
    }
    if let Some(n) = req.max_attempts {
        if n == 0 || n > MAX_ATTEMPTS_LIMIT {
            return Err(ApiError::bad_request(format!(
                "max_attempts must be 1..={MAX_ATTEMPTS_LIMIT}, got {n}"
            )));
        }
    }
    Ok(())
}

fn to_api(st: &AppState, w: WebhookRecord) -> ApiResult<Webhook> {
    let (pending, delivered, failed) = st.store.delivery_counts(&w.id)?;
    Ok(Webhook {
        id: w.id,
        url: w.url,
        kinds: w.kinds,
        secret: MASKED_SECRET.to_string(),
        max_attempts: w.max_attempts,
        created_at: w.created_at,
        pending,
        delivered,
        failed,
    })
}

/// Register a webhook: matching events are POSTed to `url`, signed with `secret`
/// (`X-Kisara-Signature: sha256=<hex HMAC-SHA256(secret, body)>`), retried with backoff.
#[utoipa::path(post, path = "/v1/webhooks", request_body = CreateWebhookRequest,
    responses((status = 201, body = Webhook), (status = 400, body = ErrorBody)))]
pub async fn create(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateWebhookRequest>,
) -> ApiResult<(StatusCode, Json<Webhook>)> {
    validate(&req)?;
    let record = WebhookRecord {
        id: new_id(),
        url: req.url,
        secret: req.secret,
        kinds: req.kinds,
        max_attempts: req.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
        created_at: now_ms(),
    };
    st.store.insert_webhook(&record)?;
    st.events.webhooks.added(&record.id);
    tracing::info!(webhook = %record.id, url = %record.url, "webhook registered");
    Ok((StatusCode::CREATED, Json(to_api(&st, record)?)))
}

/// Registered webhooks (secrets masked) with counts of their deliveries.
#[utoipa::path(get, path = "/v1/webhooks", responses((status = 200, body = Vec<Webhook>)))]
pub async fn list(State(st): State<Arc<AppState>>) -> ApiResult<Json<Vec<Webhook>>> {
    let hooks = st.store.list_webhooks()?;
    let out = hooks
        .into_iter()
        .map(|w| to_api(&st, w))
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Json(out))
}

/// Delete a webhook, dropping what it had not delivered yet.
#[utoipa::path(delete, path = "/v1/webhooks/{id}",
    params(("id" = String, Path, description = "Webhook id")),
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    st.store.delete_webhook(&id)?;
    st.events.webhooks.removed(&id);
    tracing::info!(webhook = %id, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Most recent deliveries to return (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// A webhook's recent deliveries, newest first, each with its attempts (status code or error).
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries",
    params(("id" = String, Path, description = "Webhook id"), DeliveriesQuery),
    responses((status = 200, body = Vec<WebhookDelivery>), (status = 404, body = ErrorBody)))]
pub async fn deliveries(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<DeliveriesQuery>,
) -> ApiResult<Json<Vec<WebhookDelivery>>> {
    st.store.get_webhook(&id)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(st.store.list_deliveries(&id, limit)?))
}
