//! Standalone gateways (`kisara gateway`): the ports they listen on, and their visitors
//! relayed through the server.
//!
//! A standalone gateway holds no state and reaches no node: it asks `GET /v1/gateway/ports`
//! (gateway token, `DIR/gateway.token`; the admin token is accepted too) which public ports exist, listens on them, and hands every visitor to the
//! server over a connection of its own, `GET /v1/gateway/relay/{protocol}/{port}` upgraded
//! to raw bytes (framed datagrams for UDP, one connection per visitor address). The server
//! serves that visitor exactly as one of its own listeners would: counted and paced per
//! instance and node, carried straight to the container or through the node's tunnel. So
//! caps, meters and tunnels live in one place, and any number of gateways can front one
//! server. With `[gateway] listen = false` the server leases the ports without binding them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyper_util::rt::TokioIo;
use kisara_api::{GatewayPort, Protocol};

use super::listen::{self, Route};
use crate::error::ApiError;
use crate::AppState;

/// `GET /v1/gateway/ports`: every public port of the gateway role.
pub async fn ports(State(st): State<Arc<AppState>>) -> Response {
    if !st.gateway.enabled() {
        return ApiError::bad_request(
            "this server runs no gateway role (set [gateway] enabled = true)",
        )
        .into_response();
    }
    match st.store.list_leases() {
        Ok(leases) => {
            let ports: Vec<GatewayPort> = leases
                .iter()
                .filter(|l| l.scope == kisara_store::GATEWAY_SCOPE)
                .map(|l| GatewayPort {
                    protocol: l.protocol,
                    port: l.port,
                })
                .collect();
            Json(ports).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, message.into()).into_response()
}

/// `GET /v1/gateway/relay/{protocol}/{port}`: one visitor of a standalone gateway.
pub async fn relay(
    State(st): State<Arc<AppState>>,
    Path((protocol, port)): Path<(String, u16)>,
    mut req: Request,
) -> Response {
    let upgrade_ok = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(kisara_tunnel::upgrade::PROTOCOL));
    if !upgrade_ok {
        return refuse(StatusCode::BAD_REQUEST, "expected Upgrade: kisara-tunnel");
    }
    let protocol = match protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        other => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("protocol {other:?} is neither tcp nor udp"),
            )
        }
    };
    let lease = match st.store.list_leases() {
        Ok(all) => all.into_iter().find(|l| {
            l.scope == kisara_store::GATEWAY_SCOPE && l.protocol == protocol && l.port == port
        }),
        Err(e) => return ApiError::from(e).into_response(),
    };
    let Some(lease) = lease else {
        return refuse(
            StatusCode::NOT_FOUND,
            format!("no gateway port {port}/{protocol}"),
        );
    };
    let route = Route::of(&lease);
    // Refused before the upgrade: the gateway closes its visitor at once.
    if let Err(e) = listen::resolve(&st, &route) {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        );
    };
    let st2 = st.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!(error = %e, "relay upgrade failed");
                return;
            }
        };
        let r = match protocol {
            Protocol::Tcp => listen::serve_tcp(&st2, upgraded, &route).await,
            Protocol::Udp => listen::serve_udp_stream(&st2, upgraded, &route).await,
        };
        if let Err(e) = r {
            tracing::debug!(container = %route.container_id, error = %e,
                "relayed visitor ended with an error");
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut().insert(
        header::UPGRADE,
        HeaderValue::from_static(kisara_tunnel::upgrade::PROTOCOL),
    );
    resp
}
