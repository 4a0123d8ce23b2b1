//! Container routes: launch, list, inspect, stop, remove, exec, logs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use kisara_api::agent::{InventoryContainer, LogChunk, Operation, Reply};
use kisara_api::{
    codes, host_port_string, Container, ContainerFilter, ContainerState, ErrorBody, ExecRequest,
    ExecResult, LaunchRequest, ListResponse, LogsQuery, NodeError, PortBinding, RemoveQuery,
};
use kisara_core::policy::{self, LaunchContext};

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::instances::{self, Caller};
use crate::{new_ordered_id, now, placement, AppState};

/// How long a node may take to create and start a container (images are not pulled here).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE_SECS: u32 = 5;
/// How long a list waits for the slowest node before reporting it as an error.
pub const LIST_DEADLINE: Duration = Duration::from_secs(3);

/// Launch a container: placed on a node, on a network of its own unless one is named,
/// hardened by the server's policy. On any failure nothing is left behind.
#[utoipa::path(post, path = "/v1/containers", request_body = LaunchRequest,
    responses((status = 201, body = Container), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn launch(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(mut req): ApiJson<LaunchRequest>,
) -> ApiResult<(StatusCode, Json<Container>)> {
    if req.idempotency_key.is_none() {
        req.idempotency_key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
    }
    launch_container(st, req, Launch { caller, awd: None }).await
}

/// How a launch came to be: who asked, and for an AWD gamebox, which.
#[derive(Debug)]
pub struct Launch {
    pub caller: Caller,
    pub awd: Option<crate::awd::Gamebox>,
}

/// The launch itself, for the route and for AWD games.
pub async fn launch_container(
    st: Arc<AppState>,
    req: LaunchRequest,
    how: Launch,
) -> ApiResult<(StatusCode, Json<Container>)> {
    let caller = how.caller;
    if let Some(key) = &req.idempotency_key {
        if key.len() > 200 {
            return Err(ApiError::bad_request(
                "idempotency key is longer than 200 characters",
            ));
        }
        if let Some(done) = replay(&st, key, caller)? {
            return Ok(done);
        }
    }
    let id = new_ordered_id();
    let _in_flight = st.begin_launch(&id);
    // Lifetime and flags are settled (and refused when bad) before anything is made.
    let mut prepared = instances::prepare(&st, &req, &id, kisara_store::KIND_CONTAINER)?;
    if let Some(gamebox) = how.awd {
        gamebox.shape(&mut prepared);
    }
    // Resolve where it goes before anything is created.
    let existing_network = match &req.network {
        Some(name) => Some(
            st.store
                .get_network(name)
                .map_err(|_| ApiError::not_found(format!("unknown network {name:?}")))?,
        ),
        None => None,
    };
    let forced_node = match &existing_network {
        Some(net) => {
            if let Some(want) = &req.node {
                let node = placement::resolve_node(&st, want)?;
                if node != net.node_id {
                    return Err(ApiError::bad_request(format!(
                        "network {:?} lives on node {}, not on {want}",
                        net.name, net.node_id
                    )));
                }
            }
            Some(net.node_id.clone())
        }
        None => None,
    };
    // Room on the node is reserved before anything is created; the reservation is released
    // when this function returns without committing it.
    let reservation = match placement::reserve_container(&st, &id, &req, forced_node) {
        Ok(r) => r,
        Err(e) => {
            st.metrics.placement_failed(&e.code);
            return Err(e);
        }
    };
    let node_id = reservation.node_id().to_string();
    let session = st
        .hub
        .get(&node_id)
        .ok_or_else(|| ApiError::node_unavailable(format!("node {node_id} is not connected")))?;
    // Validation (and the hardening policy) run before any side effect; the network name is
    // settled below, once we know whether a spare was free.
    let mut ctx = LaunchContext {
        cluster_id: st.cluster_id.clone(),
        container_id: id.clone(),
        node_id: node_id.clone(),
        generated_name: format!("kisara-{id}"),
        network: None,
    };
    policy::container_config(&req, &st.settings, &ctx)?;
    crate::gateway::launch::validate(&st, (&req).into())?;

    // Intent first: the row exists before any engine object does, so a crash at any later
    // point is settled by reconciliation instead of leaving an orphan.
    let mut container = Container {
        id: id.clone(),
        docker_id: String::new(),
        name: req
            .name
            .clone()
            .unwrap_or_else(|| ctx.generated_name.clone()),
        node_id: node_id.clone(),
        image: req.image.clone(),
        owner: req.owner.clone(),
        module: req.module.clone(),
        labels: req.labels.clone(),
        network: None,
        ip_address: None,
        state: ContainerState::Launching,
        status: "launching".into(),
        ports: Vec::new(),
        host_port: String::new(),
        created_at: now(),
        expires_at: prepared.record.expires_at,
        renewals: 0,
        flags: None,
        traffic: None,
    };
    let reserved = reservation.resources();
    // A network of its own comes from the warm pool when a spare is ready (outbound traffic
    // off, like every spare): claimed in the intent's transaction.
    let wants_spare = existing_network.is_none() && !req.internet && st.settings.warm_networks > 0;
    // The intent row, the instance's record, the idempotency key and the claimed spare go in
    // together, under the admission limits: one transaction, and nothing when it fails.
    // A deferred write: concurrent launches share its commit (see `kisara_store::group`).
    let (admitted, intent) = st.store.deferred(|_| {
        instances::admit_container_with(
            &st,
            &container,
            (reserved.memory_mb, reserved.cpu_milli),
            &prepared.record,
            req.idempotency_key.as_deref(),
            wants_spare,
        )
    });
    if wants_spare {
        crate::warm::refill(&st, &node_id);
    }
    let spare = match (admitted, &req.idempotency_key) {
        (Ok(spare), _) => spare,
        (Err(e), Some(key)) if e.code == codes::CONFLICT => {
            // A concurrent request with the same key won the race: answer with its result.
            if let Some(done) = replay(&st, key, caller)? {
                return Ok(done);
            }
            return Err(e);
        }
        (Err(e), _) => return Err(e),
    };
    // The intent is durable before any engine is asked for anything.
    st.store.durable(intent).await?;
    match launch_on_node(
        &st,
        &req,
        &mut ctx,
        &mut container,
        (existing_network, spare),
        &session,
        &prepared,
    )
    .await
    {
        Ok(()) => {
            reservation.commit();
            st.metrics.placements.inc();
            tracing::info!(container = %id, node = %node_id, image = %req.image, "container launched");
            instances::decorate(&mut container, Some(&prepared.record), caller);
            Ok((StatusCode::CREATED, Json(container)))
        }
        Err(e) => {
            let _ = st.store.delete_container(&id);
            crate::gateway::release_container(&st, &id);
            Err(e)
        }
    }
}

/// The answer to a retried launch: the first one's container, or 409 while it is in flight.
fn replay(
    st: &AppState,
    key: &str,
    caller: Caller,
) -> ApiResult<Option<(StatusCode, Json<Container>)>> {
    match st.store.container_by_idempotency_key(key)? {
        None => Ok(None),
        Some(c) if c.state == ContainerState::Launching => Err(ApiError::conflict(format!(
            "a launch with idempotency key {key:?} is still in progress"
        ))),
        Some(mut c) => {
            instances::decorate_one(st, &mut c, caller);
            Ok(Some((StatusCode::OK, Json(c))))
        }
    }
}

/// Network, then container, on the node; on failure removes what it made (the caller drops
/// the row).
async fn launch_on_node(
    st: &Arc<AppState>,
    req: &LaunchRequest,
    ctx: &mut LaunchContext,
    container: &mut Container,
    (existing_network, spare): (Option<kisara_api::Network>, Option<kisara_api::Network>),
    session: &crate::hub::NodeSession,
    prepared: &instances::Prepared,
) -> ApiResult<()> {
    let rendered = &prepared.rendered;
    let id = container.id.clone();
    let node_id = container.node_id.clone();
    // A network of its own: the spare claimed with the intent when there was one, else made
    // now.
    let owned_network = match (spare, &existing_network) {
        (Some(net), _) => Some(net),
        (None, Some(_)) => None,
        (None, None) => {
            let mut labels = std::collections::BTreeMap::new();
            labels.insert(kisara_api::labels::OWNED_BY.to_string(), id.clone());
            let made = super::networks::create_on_node(
                st,
                &node_id,
                &format!("kisara-{id}"),
                None,
                false,
                req.internet,
                Some(id.clone()),
                labels,
            )
            .await;
            match made {
                Ok(net) => Some(net),
                // The last free subnets may be held by spares still being made: wait for
                // one of them rather than failing.
                Err(e) if e.code == codes::POOL_EXHAUSTED && !req.internet => Some(
                    crate::warm::wait_for_spare(st, &node_id, &id)
                        .await
                        .ok_or(e)?,
                ),
                Err(e) => return Err(e),
            }
        }
    };
    let network_name = match (&existing_network, &owned_network) {
        (Some(net), _) | (None, Some(net)) => net.name.clone(),
        (None, None) => format!("kisara-{id}"),
    };
    ctx.network = Some(network_name.clone());
    let undo_network = |st: Arc<AppState>, net: Option<kisara_api::Network>| async move {
        if let Some(net) = &net {
            super::networks::destroy(&st, net).await;
        }
    };
    let mut config = match policy::container_config(req, &st.settings, ctx) {
        Ok(mut c) => {
            crate::flags::apply(&mut c, rendered);
            c.ipv4_address = prepared.ipv4_address.clone();
            c
        }
        Err(e) => {
            undo_network(st.clone(), owned_network).await;
            return Err(e.into());
        }
    };
    // Leases its public ports (host or gateway mode) and launches; see `gateway::launch`.
    let launched =
        crate::gateway::launch::launch(st, req, &id, session, &mut config, LAUNCH_TIMEOUT).await;
    let (inv, public_ports) = match launched {
        Ok(v) => v,
        Err(e) => {
            undo_network(st.clone(), owned_network).await;
            return Err(e);
        }
    };
    // Exec flags go in once it runs; a failing flag command fails the launch.
    if let Err(e) = crate::flags::run_execs(st, &node_id, &inv.docker_id, rendered).await {
        let _ = st
            .hub
            .call(
                &node_id,
                Operation::Remove {
                    docker_id: inv.docker_id.clone(),
                    force: true,
                },
                CALL_TIMEOUT,
            )
            .await;
        undo_network(st.clone(), owned_network).await;
        return Err(e);
    }
    container.docker_id = inv.docker_id.clone();
    container.name = inv.name.trim_start_matches('/').to_string();
    container.network = Some(network_name);
    container.ip_address = inv.ip_address.clone();
    container.state = ContainerState::from_docker(&inv.state);
    container.status = inv.status.clone();
    container.ports = public_ports;
    container.host_port = host_port_string(&container.ports);
    // The completed row and its `container.launch` event are stored together.
    if let Err(e) = st.events.complete_launch(container).await {
        // Keep Docker and the store in step: undo the launch.
        let _ = st
            .hub
            .call(
                &node_id,
                Operation::Remove {
                    docker_id: inv.docker_id.clone(),
                    force: true,
                },
                CALL_TIMEOUT,
            )
            .await;
        undo_network(st.clone(), owned_network).await;
        return Err(e.into());
    }
    Ok(())
}

/// Published ports as players see them: the node's advertised address and the host port.
pub fn bindings(inv: &InventoryContainer, public_address: &str) -> Vec<PortBinding> {
    inv.published
        .iter()
        .map(|p| PortBinding {
            container_port: p.port.port,
            protocol: p.port.protocol,
            public_host: public_address.to_string(),
            public_port: p.host_port,
        })
        .collect()
}

/// Containers known to the store, their state refreshed from every node involved (in
/// parallel, with a deadline); nodes that cannot answer are listed in `node_errors`.
#[utoipa::path(get, path = "/v1/containers", params(ContainerFilter),
    responses((status = 200, body = ListResponse<Container>)))]
pub async fn list(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<ContainerFilter>,
) -> ApiResult<Json<ListResponse<Container>>> {
    let node = match &filter.node {
        Some(n) => Some(placement::resolve_node(&st, n)?),
        None => None,
    };
    let mut items = st.store.list_containers(
        filter.owner.as_deref(),
        filter.module.as_deref(),
        node.as_deref(),
        filter.all.unwrap_or(false),
    )?;
    let mut nodes: Vec<String> = items.iter().map(|c| c.node_id.clone()).collect();
    nodes.sort();
    nodes.dedup();
    let (live, node_errors) = inventories(&st, &nodes).await;
    for c in &mut items {
        refresh(c, live.get(&c.node_id));
    }
    instances::decorate_all(&st, &mut items, caller);
    Ok(Json(ListResponse { items, node_errors }))
}

/// Asks each node for its labelled containers, in parallel, bounded by [`LIST_DEADLINE`].
async fn inventories(
    st: &Arc<AppState>,
    nodes: &[String],
) -> (
    HashMap<String, HashMap<String, InventoryContainer>>,
    Vec<NodeError>,
) {
    let calls = nodes.iter().map(|n| {
        let st = st.clone();
        let n = n.clone();
        async move {
            let r = st
                .hub
                .call(&n, Operation::ListContainers, LIST_DEADLINE)
                .await;
            (n, r)
        }
    });
    let mut live = HashMap::new();
    let mut errors = Vec::new();
    for (node, r) in futures::future::join_all(calls).await {
        match r {
            Ok(Reply::Containers(cs)) => {
                live.insert(
                    node,
                    cs.into_iter().map(|c| (c.docker_id.clone(), c)).collect(),
                );
            }
            Ok(other) => errors.push(NodeError {
                node_id: node,
                error: ApiError::internal(format!("unexpected reply: {other:?}"))
                    .body()
                    .error,
            }),
            Err(e) => errors.push(NodeError {
                node_id: node,
                error: e.body().error,
            }),
        }
    }
    (live, errors)
}

fn refresh(c: &mut Container, live: Option<&HashMap<String, InventoryContainer>>) {
    if matches!(c.state, ContainerState::Gone | ContainerState::Launching) {
        return;
    }
    match live {
        // A container lost with its node stays lost until the node is back.
        None if c.state == ContainerState::Lost => {}
        None => c.state = ContainerState::Unknown,
        Some(m) => match m.get(&c.docker_id) {
            Some(inv) => {
                c.state = ContainerState::from_docker(&inv.state);
                c.status = inv.status.clone();
                c.ip_address = inv.ip_address.clone().or(c.ip_address.take());
            }
            None => {
                c.state = ContainerState::Gone;
                c.status = "removed outside Kisara".into();
            }
        },
    }
}

/// One container, its state read live from its node.
#[utoipa::path(get, path = "/v1/containers/{id}",
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix")),
    responses((status = 200, body = Container), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Container>> {
    let mut c = st.store.get_container(&id)?;
    if !matches!(c.state, ContainerState::Gone | ContainerState::Launching) {
        match st
            .hub
            .call(
                &c.node_id,
                Operation::Inspect {
                    docker_id: c.docker_id.clone(),
                },
                CALL_TIMEOUT,
            )
            .await
        {
            Ok(Reply::Container(inv)) => {
                let mut m = HashMap::new();
                m.insert(inv.docker_id.clone(), inv);
                refresh(&mut c, Some(&m));
            }
            Err(e) if e.code == codes::NOT_FOUND => refresh(&mut c, Some(&HashMap::new())),
            _ if c.state == ContainerState::Lost => {}
            _ => c.state = ContainerState::Unknown,
        }
        if c.state == ContainerState::Gone {
            let _ = st
                .store
                .update_container_state(&c.id, ContainerState::Gone, &c.status);
        }
    }
    c.traffic = st.gateway.traffic(&c.id);
    instances::decorate_one(&st, &mut c, caller);
    Ok(Json(c))
}

/// Stop and remove a container and the network made for it (Kisara's stop semantics).
#[utoipa::path(post, path = "/v1/containers/{id}/stop",
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn stop(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let c = st.store.get_container(&id)?;
    if !matches!(c.state, ContainerState::Gone | ContainerState::Launching) {
        let r = st
            .hub
            .call(
                &c.node_id,
                Operation::Stop {
                    docker_id: c.docker_id.clone(),
                    timeout_secs: STOP_GRACE_SECS,
                },
                CALL_TIMEOUT + Duration::from_secs(STOP_GRACE_SECS as u64),
            )
            .await;
        tolerate_not_found(r)?;
    }
    remove_everything(&st, &c, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a container (refused while it runs unless `force`).
#[utoipa::path(delete, path = "/v1/containers/{id}",
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix"), RemoveQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<RemoveQuery>,
) -> ApiResult<StatusCode> {
    let c = st.store.get_container(&id)?;
    remove_everything(&st, &c, q.force.unwrap_or(false)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn tolerate_not_found(r: ApiResult<Reply>) -> ApiResult<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code == codes::NOT_FOUND => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the container on its node, then its own network, then the store's record.
pub async fn remove_everything(st: &Arc<AppState>, c: &Container, force: bool) -> ApiResult<()> {
    if c.state == ContainerState::Launching {
        return Err(ApiError::conflict(format!(
            "container {} is still being launched; try again in a moment",
            c.id
        )));
    }
    if c.state != ContainerState::Gone {
        let r = st
            .hub
            .call(
                &c.node_id,
                Operation::Remove {
                    docker_id: c.docker_id.clone(),
                    force,
                },
                CALL_TIMEOUT,
            )
            .await;
        match r {
            Err(e) if e.code == codes::CONFLICT => {
                return Err(ApiError::conflict(format!(
                    "container {} is running; stop it or remove it with force=true",
                    c.id
                )))
            }
            other => tolerate_not_found(other)?,
        }
    }
    for net in st.store.list_networks(Some(&c.node_id))? {
        if net.owned_by.as_deref() == Some(c.id.as_str()) {
            super::networks::destroy(st, &net).await;
        }
    }
    st.store.delete_container(&c.id)?;
    crate::gateway::release_container(st, &c.id);
    st.placement.release(&c.id);
    st.events.container_stopped(c);
    tracing::info!(container = %c.id, "container removed");
    Ok(())
}

/// Run a command in a container and return its output and exit code.
#[utoipa::path(post, path = "/v1/containers/{id}/exec", request_body = ExecRequest,
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix")),
    responses((status = 200, body = ExecResult), (status = 404, body = ErrorBody)))]
pub async fn exec(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> ApiResult<Json<ExecResult>> {
    if req.cmd.is_empty() {
        return Err(ApiError::bad_request("exec needs a command (cmd is empty)"));
    }
    let timeout = req.timeout_secs.unwrap_or(30);
    if timeout == 0 || timeout > 600 {
        return Err(ApiError::bad_request(format!(
            "timeout_secs must be 1..=600, got {timeout}"
        )));
    }
    let c = st.store.get_container(&id)?;
    match st
        .hub
        .call(
            &c.node_id,
            Operation::Exec {
                docker_id: c.docker_id.clone(),
                request: req,
            },
            Duration::from_secs(timeout + 10),
        )
        .await?
    {
        Reply::Exec(r) => Ok(Json(r)),
        other => Err(ApiError::internal(format!(
            "unexpected reply to exec: {other:?}"
        ))),
    }
}

/// A container's output as plain text; `follow` keeps streaming.
#[utoipa::path(get, path = "/v1/containers/{id}/logs",
    params(("id" = String, Path, description = "Kisara id, name, or Docker id prefix"), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
pub async fn logs(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let c = st.store.get_container(&id)?;
    let mut stream = st
        .hub
        .stream(
            &c.node_id,
            Operation::Logs {
                docker_id: c.docker_id.clone(),
                tail: q.tail,
                follow: q.follow.unwrap_or(false),
            },
        )
        .await?;
    // Wait for the first item so that a missing container is a 404, not an empty 200.
    let first = stream.next().await;
    if let Some(Err(e)) = first {
        return Err(e);
    }
    let shutdown = st.shutdown.clone();
    let body = async_stream(first, stream, shutdown);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn async_stream(
    first: Option<Result<serde_json::Value, ApiError>>,
    stream: crate::hub::AgentStream,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    fn chunk(v: serde_json::Value) -> bytes::Bytes {
        serde_json::from_value::<LogChunk>(v)
            .map(|c| bytes::Bytes::from(c.data))
            .unwrap_or_default()
    }
    let head = futures::stream::iter(first.and_then(|r| r.ok()).map(|v| Ok(chunk(v))));
    let tail = futures::stream::unfold((stream, shutdown), |(mut stream, shutdown)| async move {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = shutdown.cancelled() => None,
        };
        match next? {
            Ok(v) => Some((Ok(chunk(v)), (stream, shutdown))),
            Err(e) => Some((Err(std::io::Error::other(e.message)), (stream, shutdown))),
        }
    });
    futures::StreamExt::chain(head, tail)
}
