//! The server end of the agent channel (`GET /v1/agent/connect`, WebSocket).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use kisara_api::agent::{AgentMessage, Hello, Secret, ServerMessage, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::hub::{NodeSession, StreamEvent};
use crate::{now, tokens, AppState};

/// Largest frame an agent may send (inventories of big nodes are the largest).
const MAX_FRAME: usize = 64 << 20;

pub async fn connect(State(state): State<Arc<AppState>>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(MAX_FRAME)
        .read_buffer_size(kisara_api::agent::CHANNEL_READ_BUFFER)
        .on_upgrade(move |socket| serve_agent(state, socket))
}

async fn send(socket: &mut WebSocket, msg: &ServerMessage) -> bool {
    match serde_json::to_string(msg) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// Authenticates a Hello: returns the node id and, on first contact, a new credential.
fn authenticate(state: &AppState, hello: &Hello) -> Result<(String, Option<Secret>), String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "agent speaks protocol {}, server speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        ));
    }
    if let (Some(id), Some(cred)) = (&hello.node_id, &hello.credential) {
        return match state.store.node_credential_matches(id, cred.expose()) {
            Ok(true) => Ok((id.clone(), None)),
            Ok(false) => Err("invalid node credential".into()),
            Err(e) => Err(format!("store: {e}")),
        };
    }
    let Some(join) = &hello.join_token else {
        return Err("neither a join token nor a node credential was presented".into());
    };
    if !tokens::matches(state.join_token(), join.expose()) {
        return Err("invalid join token".into());
    }
    validate_node_name(&hello.name)?;
    let credential = tokens::generate("ksn_");
    match state.store.node_by_name(&hello.name) {
        Ok(Some(node)) => {
            // The join token may re-admit a known node that lost its credential, but never
            // take over one that is connected right now.
            if state.hub.get(&node.id).is_some() {
                return Err(format!("a node named {} is already connected", hello.name));
            }
            state
                .store
                .set_node_credential(&node.id, credential.expose())
                .map_err(|e| format!("store: {e}"))?;
            Ok((node.id, Some(credential)))
        }
        Ok(None) => {
            let id = crate::new_id();
            state
                .store
                .create_node(&id, &hello.name, credential.expose(), now())
                .map_err(|e| format!("store: {e}"))?;
            Ok((id, Some(credential)))
        }
        Err(e) => Err(format!("store: {e}")),
    }
}

fn validate_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?} must be 1-63 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

async fn serve_agent(state: Arc<AppState>, mut socket: WebSocket) {
    // The first frame must be a Hello, and soon.
    let first = tokio::time::timeout(Duration::from_secs(10), socket.next()).await;
    let hello = match first {
        Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<AgentMessage>(&t) {
            Ok(AgentMessage::Hello(h)) => h,
            _ => {
                let _ = send(
                    &mut socket,
                    &ServerMessage::Rejected {
                        reason: "the first frame must be a hello".into(),
                    },
                )
                .await;
                return;
            }
        },
        _ => return,
    };
    let (node_id, credential) = match authenticate(&state, &hello) {
        Ok(v) => v,
        Err(reason) => {
            tracing::warn!(node = %hello.name, %reason, "agent rejected");
            let _ = send(&mut socket, &ServerMessage::Rejected { reason }).await;
            return;
        }
    };
    if let Err(e) = state.store.update_node_hello(&node_id, &hello, now()) {
        tracing::warn!(%node_id, error = %e, "could not record node details");
    }
    let welcome = ServerMessage::Welcome {
        node_id: node_id.clone(),
        credential,
        cluster_id: state.cluster_id.clone(),
        heartbeat_interval_ms: state.settings.heartbeat_interval.as_millis() as u64,
    };
    if !send(&mut socket, &welcome).await {
        return;
    }

    let (tx, mut rx) = mpsc::channel::<ServerMessage>(1024);
    let session = Arc::new(NodeSession::new(node_id.clone(), hello, tx, now()));
    state.hub.register(session.clone());
    state.events.node_connected(&session);
    if let Err(e) = state.placement.refresh_node(&state.store, &node_id) {
        tracing::warn!(%node_id, error = %e, "could not refresh the node's scheduling facts");
    }
    state.placement.connected(&node_id, now());
    tracing::info!(node = %node_id, name = %session.hello.name, "node connected");
    crate::warm::refill(&state, &node_id);

    let (mut sink, mut stream) = socket.split();
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Ok(text) = serde_json::to_string(&msg) else {
                continue;
            };
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let shutdown = state.shutdown.clone();
    let silence_limit = state.settings.heartbeat_interval * 3;
    // One timer for the session, re-armed only when it fires (not per frame): a busy node
    // sends thousands of frames a second.
    let mut last_frame = tokio::time::Instant::now();
    let silence = tokio::time::sleep(silence_limit);
    tokio::pin!(silence);
    loop {
        // An agent that says nothing for three heartbeat intervals is gone, even if its TCP
        // connection is not (a frozen process, a cut cable): close the session, so that the
        // disconnect is a fact and the node's grace period starts.
        let frame = tokio::select! {
            f = stream.next() => {
                last_frame = tokio::time::Instant::now();
                f
            }
            _ = &mut silence => {
                if last_frame.elapsed() < silence_limit {
                    silence.as_mut().reset(last_frame + silence_limit);
                    continue;
                }
                tracing::warn!(node = %node_id, "agent silent for {silence_limit:?}; closing its channel");
                break;
            }
            _ = shutdown.cancelled() => break,
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let msg = match serde_json::from_str::<AgentMessage>(&text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(node = %node_id, error = %e, "undecodable frame from agent");
                continue;
            }
        };
        match msg {
            AgentMessage::Hello(_) => {}
            AgentMessage::Heartbeat { status, images } => {
                state.events.node_heartbeat(&node_id, &status);
                state.placement.heartbeat(&node_id, &status, now());
                session.heartbeat(status, now());
                if let Some(images) = images {
                    state.placement.set_images(&node_id, images);
                }
            }
            AgentMessage::Inventory {
                containers,
                networks,
            } => {
                let state = state.clone();
                let node_id = node_id.clone();
                tokio::spawn(async move {
                    crate::reconcile::reconcile_node(&state, &node_id, &containers, &networks)
                        .await;
                    // Containers found gone (or back) change what the node holds.
                    if let Err(e) = state.placement.resync_node(&state.store, &node_id) {
                        tracing::warn!(%node_id, error = %e, "could not resync the node's allocations");
                    }
                });
            }
            AgentMessage::Reply { id, result } => session.deliver_reply(id, result),
            AgentMessage::Stream { id, item } => {
                session.deliver_stream(id, StreamEvent::Item(item)).await
            }
            AgentMessage::StreamEnd { id, error } => {
                session.deliver_stream(id, StreamEvent::End(error)).await
            }
            AgentMessage::ContainerEvent { event } => state.events.container_event(&node_id, event),
        }
    }
    // A session that another of the same node replaced is not a disconnect of the node.
    if state.hub.unregister(&session) {
        state.placement.disconnected(&node_id, now());
        state.events.node_disconnected(&session);
    }
    let _ = state.store.update_node_seen(&node_id, now());
    writer.abort();
    tracing::info!(node = %node_id, "node disconnected");
}
