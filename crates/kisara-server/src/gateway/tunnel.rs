//! The server's end of tunnels: ask an agent for a data connection, and accept it.
//!
//! `GET /v1/agent/tunnel/{id}` is answered `101 Switching Protocols` (`Upgrade:
//! kisara-tunnel`) when the caller presents the node credential of the node the tunnel was
//! asked of; the upgraded connection is handed to the visitor waiting for it. Tunnel ids are
//! random, single-use, and expire with the wait.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use kisara_api::agent::{Operation, Reply};
use kisara_api::{Protocol, NODE_ID_HEADER};
use kisara_tunnel::udp::Duplex;
use tokio::sync::oneshot;

use crate::AppState;

/// How long an agent has to connect to the container and dial back.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A data connection from an agent.
pub type TunnelStream = Box<dyn Duplex>;

struct Waiting {
    node_id: String,
    tx: oneshot::Sender<TunnelStream>,
}

/// Tunnels asked for and not yet dialled.
#[derive(Default)]
pub struct Pending(Mutex<HashMap<String, Waiting>>);

impl Pending {
    fn insert(&self, id: &str, w: Waiting) {
        if let Ok(mut p) = self.0.lock() {
            p.insert(id.to_string(), w);
        }
    }
    fn take(&self, id: &str) -> Option<Waiting> {
        self.0.lock().ok()?.remove(id)
    }
    fn node_of(&self, id: &str) -> Option<String> {
        self.0.lock().ok()?.get(id).map(|w| w.node_id.clone())
    }
}

/// Removes a pending tunnel however the wait ends.
struct Forget<'a>(&'a Pending, String);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.take(&self.1);
    }
}

/// A fresh unguessable tunnel id.
fn tunnel_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// Asks `node_id`'s agent to connect to `target` and dial back; returns the data connection.
/// A container that refuses, an agent that is not connected or does not dial back in time
/// are errors (the visitor's connection is then closed).
pub async fn open(
    st: &Arc<AppState>,
    node_id: &str,
    target: &str,
    protocol: Protocol,
) -> io::Result<TunnelStream> {
    let id = tunnel_id();
    let (tx, rx) = oneshot::channel();
    st.gateway.pending.insert(
        &id,
        Waiting {
            node_id: node_id.to_string(),
            tx,
        },
    );
    let _forget = Forget(&st.gateway.pending, id.clone());
    let reply = st
        .hub
        .call(
            node_id,
            Operation::OpenTunnel {
                tunnel_id: id.clone(),
                target: target.to_string(),
                protocol,
            },
            OPEN_TIMEOUT,
        )
        .await;
    match reply {
        Ok(Reply::Done) => {}
        Ok(other) => {
            return Err(io::Error::other(format!(
                "unexpected reply to a tunnel: {other:?}"
            )))
        }
        Err(e) => {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("node {node_id}: {}", e.message),
            ))
        }
    }
    // The agent answers once its data connection was upgraded; the stream is on its way.
    match tokio::time::timeout(OPEN_TIMEOUT, rx).await {
        Ok(Ok(stream)) => Ok(stream),
        _ => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the agent's data connection never arrived",
        )),
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, message.to_string()).into_response()
}

/// `GET /v1/agent/tunnel/{id}`: an agent's data connection.
pub async fn accept(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    mut req: Request,
) -> Response {
    let headers = req.headers();
    let upgrade_ok = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(kisara_tunnel::upgrade::PROTOCOL));
    if !upgrade_ok {
        return refuse(StatusCode::BAD_REQUEST, "expected Upgrade: kisara-tunnel");
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let node = headers
        .get(NODE_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let authorized = !node.is_empty()
        && st
            .store
            .node_credential_matches(&node, &bearer)
            .unwrap_or(false);
    if !authorized {
        return refuse(StatusCode::UNAUTHORIZED, "invalid node credential");
    }
    // Only the node the tunnel was asked of may answer it.
    if st.gateway.pending.node_of(&id).as_deref() != Some(node.as_str()) {
        return refuse(StatusCode::NOT_FOUND, "no such tunnel");
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded",
        );
    };
    let Some(waiting) = st.gateway.pending.take(&id) else {
        return refuse(StatusCode::NOT_FOUND, "no such tunnel");
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let _ = waiting.tx.send(Box::new(TokioIo::new(upgraded)));
            }
            Err(e) => tracing::debug!(error = %e, "tunnel upgrade failed"),
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
