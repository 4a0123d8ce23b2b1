//! HTTP routes under `/v1`, the bearer-token check, and extractors that answer bad input with
//! Kisara's error shape instead of axum's plain-text rejections.

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use bytes::Bytes;
use kisara_api::Health;
use serde::de::DeserializeOwned;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
use crate::{tokens, AppState};

pub mod awd;
pub mod bundles;
pub mod containers;
pub mod events;
pub mod images;
pub mod lifecycle;
pub mod networks;
pub mod nodes;
pub mod services;
pub mod webhooks;

/// JSON body extractor whose rejections are 400s in Kisara's error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let reject = |text: String| ApiError::bad_request(format!("invalid JSON body: {text}"));
        // The content type every client sends is recognised without parsing it as a MIME
        // type; anything else takes axum's own check (and its words when it fails).
        let plain_json = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == b"application/json");
        if !plain_json {
            return match Json::<T>::from_request(req, state).await {
                Ok(Json(v)) => Ok(ApiJson(v)),
                Err(rej) => Err(reject(rej.body_text())),
            };
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|rej| reject(rej.body_text()))?;
        // Plain serde_json first: axum's deserializer tracks the path of every field it
        // visits, which only the error message of a bad body needs. A body that fails is
        // parsed again that way, so the message names the field as it always did.
        match serde_json::from_slice(&body) {
            Ok(v) => Ok(ApiJson(v)),
            Err(_) => match Json::<T>::from_bytes(&body) {
                Ok(Json(v)) => Ok(ApiJson(v)),
                Err(rej) => Err(reject(rej.body_text())),
            },
        }
    }
}

/// Query-string extractor whose rejections are 400s in Kisara's error shape.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rej) => Err(ApiError::bad_request(format!(
                "invalid query: {}",
                rej.body_text()
            ))),
        }
    }
}

/// The request's bearer token, if it presents one.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn require_token(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    match bearer(&req) {
        None => ApiError::unauthorized("missing bearer token").into_response(),
        Some(t) if tokens::matches(state.admin_token(), t) => {
            // Handlers that answer secrets (flags) ask who is calling.
            req.extensions_mut().insert(crate::instances::Caller::Admin);
            next.run(req).await
        }
        Some(t) if tokens::matches(state.gateway_token(), t) => ApiError::forbidden(
            "the gateway token may only list the gateway's ports and relay its visitors \
             (/v1/gateway/...)",
        )
        .into_response(),
        Some(_) => ApiError::unauthorized("invalid token").into_response(),
    }
}

/// The standalone gateway's endpoints: its own token (`DIR/gateway.token`), or the admin's.
async fn require_gateway_token(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    match bearer(&req) {
        None => ApiError::unauthorized("missing bearer token").into_response(),
        Some(t)
            if tokens::matches(state.gateway_token(), t)
                || tokens::matches(state.admin_token(), t) =>
        {
            next.run(req).await
        }
        Some(_) => ApiError::unauthorized("invalid token").into_response(),
    }
}

/// Liveness probe, the only route without a token.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// The API with its OpenAPI description, both built from the same handlers.
pub fn api_router(state: Arc<AppState>) -> (axum::Router, utoipa::openapi::OpenApi) {
    let (protected, spec) = OpenApiRouter::with_openapi(crate::openapi::base())
        .routes(routes!(containers::launch, containers::list))
        .routes(routes!(containers::inspect, containers::remove))
        .routes(routes!(containers::stop))
        .routes(routes!(containers::exec))
        .routes(routes!(containers::logs))
        .routes(routes!(images::list))
        .routes(routes!(images::pull))
        .routes(routes!(images::remove))
        .routes(routes!(networks::create, networks::list))
        .routes(routes!(networks::inspect, networks::remove))
        .routes(routes!(nodes::list))
        .routes(routes!(nodes::inspect))
        .routes(routes!(bundles::list, bundles::upload))
        .routes(routes!(bundles::inspect))
        .routes(routes!(bundles::load_images))
        .routes(routes!(nodes::cordon))
        .routes(routes!(nodes::uncordon))
        .routes(routes!(nodes::drain))
        .routes(routes!(nodes::labels))
        .routes(routes!(events::stream))
        .routes(routes!(webhooks::create, webhooks::list))
        .routes(routes!(webhooks::remove))
        .routes(routes!(webhooks::deliveries))
        .routes(routes!(services::launch, services::list))
        .routes(routes!(services::get, services::remove))
        .routes(routes!(services::renew))
        .routes(routes!(lifecycle::renew))
        .routes(routes!(awd::create, awd::list))
        .routes(routes!(awd::inspect, awd::remove))
        .routes(routes!(awd::rotate))
        .routes(routes!(awd::reset))
        .split_for_parts();
    let (public, public_spec) = OpenApiRouter::new()
        .routes(routes!(healthz))
        // Authenticates on its own: agents fetch with their node credential.
        .routes(routes!(bundles::images_tar))
        .routes(routes!(bundles::layers))
        .split_for_parts();
    let mut spec = spec;
    spec.merge(public_spec);
    // axum spells a catch-all segment `{*name}`; OpenAPI has no such template, so the
    // document names it plainly (the value may hold `/`).
    let catch_all: Vec<String> = spec
        .paths
        .paths
        .keys()
        .filter(|k| k.contains("{*"))
        .cloned()
        .collect();
    for key in catch_all {
        if let Some(item) = spec.paths.paths.remove(&key) {
            spec.paths.paths.insert(key.replace("{*", "{"), item);
        }
    }
    let protected = protected
        .route("/v1/openapi.json", get(crate::openapi::serve))
        .route("/metrics", get(crate::metrics::serve))
        // Timed per route template, inside the token check.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state.clone());
    // Standalone gateways (`kisara gateway`, gateway token): their ports and visitors.
    let gateway = axum::Router::new()
        .route("/v1/gateway/ports", get(crate::gateway::relay::ports))
        .route(
            "/v1/gateway/relay/{protocol}/{port}",
            get(crate::gateway::relay::relay),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            require_gateway_token,
        ))
        .with_state(state.clone());
    let app = axum::Router::new()
        .merge(public.with_state(state.clone()))
        .route("/v1/agent/connect", get(crate::ws::connect))
        // Agents' data connections for gateway tunnels (node credential, upgraded to bytes).
        .route("/v1/agent/tunnel/{id}", get(crate::gateway::tunnel::accept))
        .with_state(state)
        .merge(gateway)
        .merge(protected);
    (app, spec)
}

pub fn router(state: Arc<AppState>) -> axum::Router {
    let (app, spec) = api_router(state);
    let spec = Arc::new(spec);
    app.layer(axum::Extension(spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_api::LaunchRequest;

    async fn extract(content_type: Option<&str>, body: &str) -> Result<LaunchRequest, ApiError> {
        let mut req = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/containers");
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let req = req
            .body(axum::body::Body::from(body.to_string()))
            .expect("request");
        ApiJson::<LaunchRequest>::from_request(req, &())
            .await
            .map(|ApiJson(v)| v)
    }

    #[tokio::test]
    async fn json_bodies_parse_on_both_paths_and_bad_ones_name_the_problem() {
        let good = r#"{"image":"busybox","cmd":["sleep","1"]}"#;
        for ct in ["application/json", "application/json; charset=utf-8"] {
            let req = extract(Some(ct), good).await.expect(ct);
            assert_eq!(req.image, "busybox");
            assert_eq!(req.cmd, Some(vec!["sleep".to_string(), "1".to_string()]));
        }
        // The errors read as axum's did: the field at fault, by its path.
        let e = extract(
            Some("application/json"),
            r#"{"image":"x","labels":{"a":7}}"#,
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(
            e.message.starts_with("invalid JSON body: "),
            "{}",
            e.message
        );
        assert!(e.message.contains("labels.a"), "{}", e.message);
        let e = extract(Some("application/json"), r#"{"image":"x","imgae":"y"}"#)
            .await
            .unwrap_err();
        assert!(e.message.contains("imgae"), "{}", e.message);
        // Trailing bytes, truncated bodies and a missing content type are refused.
        for (ct, body) in [
            (Some("application/json"), r#"{"image":"x"} {}"#),
            (Some("application/json"), r#"{"image": "#),
            (Some("text/plain"), good),
            (None, good),
        ] {
            let e = extract(ct, body).await.unwrap_err();
            assert_eq!(
                e.status,
                axum::http::StatusCode::BAD_REQUEST,
                "{ct:?} {body}"
            );
            assert!(
                e.message.starts_with("invalid JSON body: "),
                "{}",
                e.message
            );
        }
    }
}
