//! Network routes, and the pool-backed network creation that launches also use.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use ipnet::Ipv4Net;
use kisara_api::agent::{NetworkConfig, Operation, Reply};
use kisara_api::{
    codes, CreateNetworkRequest, ErrorBody, ListResponse, Network, NetworkFilter, NodeError,
};

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::{new_ordered_id, now, placement, AppState};

const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Another program on the engine (or another Kisara cluster sharing it, which allocates from
/// the same pool) can take a subnet between our look and our create; retry with the next
/// free one this many times. The used-subnets view is cached per session, so the first try
/// may be stale: each retry asks the engine again.
const OVERLAP_RETRIES: usize = 32;

/// Create a network: an explicit subnet, or the next free one from the pool.
#[utoipa::path(post, path = "/v1/networks", request_body = CreateNetworkRequest,
    responses((status = 201, body = Network), (status = 400, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CreateNetworkRequest>,
) -> ApiResult<(StatusCode, Json<Network>)> {
    validate_name(&req.name)?;
    for k in req.labels.keys() {
        if k.starts_with(kisara_api::labels::PREFIX) {
            return Err(ApiError::bad_request(format!(
                "label {k:?} uses the reserved prefix {}",
                kisara_api::labels::PREFIX
            )));
        }
    }
    let subnet = match &req.subnet {
        Some(s) => Some(parse_subnet(&st, s)?),
        None => None,
    };
    let node_id = placement::choose_network_node(&st, req.node.as_deref(), &req.node_selector)?;
    if st.store.get_network(&req.name).is_ok() {
        return Err(ApiError::conflict(format!(
            "a network named {:?} already exists",
            req.name
        )));
    }
    let net = create_on_node(
        &st,
        &node_id,
        &req.name,
        subnet,
        req.internal,
        req.internet,
        None,
        req.labels,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(net)))
}

fn validate_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "network name {name:?} must start with a letter or digit and contain only letters, \
             digits, '_', '.' and '-' (at most 64)"
        )))
    }
}

/// An explicit subnet must be a valid private CIDR (unless the config allows public space).
fn parse_subnet(st: &AppState, s: &str) -> ApiResult<Ipv4Net> {
    let net: Ipv4Net = s
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request(format!("subnet {s:?} is not an IPv4 CIDR")))?;
    if net.network() != net.addr() {
        return Err(ApiError::bad_request(format!(
            "subnet {s:?} has host bits set (did you mean {}?)",
            net.trunc()
        )));
    }
    if !(8..=30).contains(&net.prefix_len()) {
        return Err(ApiError::bad_request(format!(
            "subnet {s:?}: prefix must be between /8 and /30"
        )));
    }
    let private = net.network().is_private() && net.broadcast().is_private();
    if !private && !st.settings.allow_public_subnets {
        return Err(ApiError::bad_request(format!(
            "subnet {s:?} is not in private address space (10/8, 172.16/12, 192.168/16); \
             set allow_public_subnets to use it"
        )));
    }
    Ok(net)
}

/// Creates a network on a node and records it. With no explicit subnet, the next free one is
/// allocated from the pool (skipping every subnet the engine already uses) in one store
/// transaction; on failure the allocation is released and nothing is left on the node.
#[allow(clippy::too_many_arguments)]
pub async fn create_on_node(
    st: &Arc<AppState>,
    node_id: &str,
    name: &str,
    explicit: Option<Ipv4Net>,
    internal: bool,
    internet: bool,
    owned_by: Option<String>,
    mut labels: BTreeMap<String, String>,
) -> ApiResult<Network> {
    let id = new_ordered_id();
    let _in_flight = st.begin_launch(&id);
    labels.insert(
        kisara_api::labels::CLUSTER.to_string(),
        st.cluster_id.clone(),
    );
    labels.insert(kisara_api::labels::NETWORK.to_string(), id.clone());
    labels.insert(kisara_api::labels::NODE.to_string(), node_id.to_string());
    // What the engine uses besides Kisara's own networks: asked once per session, and again
    // when the engine refuses a subnet as overlapping or the pool looks exhausted (something
    // made outside Kisara since, or a network of ours removed since we asked).
    let session = st.hub.get(node_id);
    let mut engine_used = match (explicit, session.as_ref().and_then(|s| s.used_subnets())) {
        (None, Some(cached)) => cached.as_ref().clone(),
        _ => used_subnets(st, node_id).await?,
    };
    let mut fresh =
        explicit.is_some() || session.as_ref().is_none_or(|s| s.used_subnets().is_none());
    let mut attempt = 0;
    // Overlap refusals from the engine so far (see the retry below).
    let mut overlaps = 0u32;
    loop {
        attempt += 1;
        // The row goes in before the engine makes the network (intent), so a crash between
        // the two is settled by reconciliation, not leaked.
        let row = Network {
            id: id.clone(),
            name: name.to_string(),
            docker_id: String::new(),
            node_id: node_id.to_string(),
            subnet: String::new(),
            gateway: None,
            internal,
            internet,
            owned_by: owned_by.clone(),
            from_pool: explicit.is_none(),
            labels: labels.clone(),
            created_at: now(),
        };
        let mut net = match explicit {
            Some(net) => {
                if engine_used
                    .iter()
                    .any(|u| kisara_core::pool::overlaps(u, &net))
                {
                    return Err(ApiError::conflict(format!(
                        "subnet {net} overlaps a network already on node {node_id}"
                    )));
                }
                st.store.reserve_subnet(&net, &id)?;
                let row = Network {
                    subnet: net.to_string(),
                    gateway: net.hosts().next().map(|g| g.to_string()),
                    ..row
                };
                if let Err(e) = st.store.insert_network(&row) {
                    let _ = st.store.release_subnet(&net);
                    return Err(e.into());
                }
                row
            }
            // Subnet and row in one transaction, durable before the engine is asked.
            None => match allocate_intent(st, row, &engine_used, overlaps).await {
                Ok(row) => row,
                Err(kisara_store::StoreError::Exhausted(_)) if !fresh => {
                    engine_used = used_subnets(st, node_id).await?;
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
        };
        let subnet: Ipv4Net = net
            .subnet
            .parse()
            .map_err(|_| ApiError::internal(format!("bad subnet {:?}", net.subnet)))?;
        let forget = || {
            let _ = st.store.delete_network(&id);
            let _ = st.store.release_subnet(&subnet);
        };
        let config = NetworkConfig {
            name: name.to_string(),
            subnet: subnet.to_string(),
            gateway: None,
            internal,
            internet,
            labels: labels.clone(),
            // Named for the node's isolation rules: `kn-` (no way out) or `ki-` (internet).
            bridge_name: Some(kisara_api::bridge::name(&id, internet)),
        };
        match st
            .hub
            .call(node_id, Operation::CreateNetwork { config }, CALL_TIMEOUT)
            .await
        {
            Ok(Reply::NetworkCreated { docker_id }) => {
                net.docker_id = docker_id;
                let written = st
                    .store
                    .durably(|s| s.set_network_docker_id(&id, &net.docker_id))
                    .await;
                if let Err(e) = written {
                    destroy(st, &net).await;
                    return Err(e.into());
                }
                return Ok(net);
            }
            Ok(other) => {
                forget();
                return Err(ApiError::internal(format!(
                    "unexpected reply to network create: {other:?}"
                )));
            }
            Err(e) => {
                forget();
                if e.code == "subnet_overlap" && explicit.is_none() && attempt < OVERLAP_RETRIES {
                    // The engine has something we did not know of: ask again.
                    engine_used = used_subnets(st, node_id).await.unwrap_or_default();
                    fresh = true;
                    engine_used.push(subnet);
                    // A first refusal is usually a network made outside Kisara: with the
                    // engine's fresh answer the next subnet in order is right.
                    overlaps += 1;
                    continue;
                }
                return Err(e);
            }
        }
    }
}

/// A pool network's intent row and its subnet, in one transaction: a deferred write (networks
/// made together share the commit), durable when this returns.
async fn allocate_intent(
    st: &Arc<AppState>,
    row: Network,
    engine_used: &[Ipv4Net],
    overlaps: u32,
) -> Result<Network, kisara_store::StoreError> {
    let pool = &st.settings.subnet_pool;
    st.store
        .durably(|s| {
            if overlaps >= 2 {
                // Refused twice, the second time with the engine's fresh answer: another
                // cluster races us on this engine. From a random start, so the two do not
                // collide again on the next subnet in order.
                let start = rand::random::<u64>() % pool.len().max(1);
                s.allocate_network_from(pool, engine_used, row, start)
            } else {
                s.allocate_network(pool, engine_used, row)
            }
        })
        .await
}

/// Asks the node which subnets its engine uses, and remembers the answer in its session.
async fn used_subnets(st: &Arc<AppState>, node_id: &str) -> ApiResult<Vec<Ipv4Net>> {
    let used: Vec<Ipv4Net> = match st
        .hub
        .call(node_id, Operation::UsedSubnets, CALL_TIMEOUT)
        .await?
    {
        Reply::Subnets(s) => s.iter().filter_map(|s| s.parse().ok()).collect(),
        _ => Vec::new(),
    };
    if let Some(session) = st.hub.get(node_id) {
        session.set_used_subnets(Some(Arc::new(used.clone())));
    }
    Ok(used)
}

/// Removes a network from its node, returns its subnet, forgets it. Best effort: used on
/// cleanup paths where the first error has already been reported.
pub async fn destroy(st: &Arc<AppState>, net: &Network) {
    let r = st
        .hub
        .call(
            &net.node_id,
            Operation::RemoveNetwork {
                docker_id: net.docker_id.clone(),
            },
            CALL_TIMEOUT,
        )
        .await;
    match r {
        Ok(_) => {}
        Err(e) if e.code == codes::NOT_FOUND => {}
        Err(e) => {
            tracing::warn!(network = %net.id, error = %e, "could not remove network");
            return;
        }
    }
    if let Ok(subnet) = net.subnet.parse::<Ipv4Net>() {
        let _ = st.store.release_subnet(&subnet);
    }
    let _ = st.store.delete_network(&net.id);
}

/// Networks Kisara manages.
#[utoipa::path(get, path = "/v1/networks", params(NetworkFilter),
    responses((status = 200, body = ListResponse<Network>)))]
pub async fn list(
    State(st): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<NetworkFilter>,
) -> ApiResult<Json<ListResponse<Network>>> {
    let node = match &q.node {
        Some(n) => Some(placement::resolve_node(&st, n)?),
        None => None,
    };
    let all = q.all.unwrap_or(false);
    let items = st
        .store
        .list_networks(node.as_deref())?
        .into_iter()
        .filter(|n| {
            all || n.owned_by.is_some() || !n.labels.contains_key(kisara_api::labels::SPARE)
        })
        .collect();
    let node_errors: Vec<NodeError> = Vec::new();
    Ok(Json(ListResponse { items, node_errors }))
}

/// One network.
#[utoipa::path(get, path = "/v1/networks/{id}",
    params(("id" = String, Path, description = "Kisara id or name")),
    responses((status = 200, body = Network), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Network>> {
    Ok(Json(st.store.get_network(&id)?))
}

/// Remove a network (refused while containers use it).
#[utoipa::path(delete, path = "/v1/networks/{id}",
    params(("id" = String, Path, description = "Kisara id or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let net = st.store.get_network(&id)?;
    let r = st
        .hub
        .call(
            &net.node_id,
            Operation::RemoveNetwork {
                docker_id: net.docker_id.clone(),
            },
            CALL_TIMEOUT,
        )
        .await;
    match r {
        Ok(_) => {}
        Err(e) if e.code == codes::NOT_FOUND => {}
        Err(e) if e.code == codes::CONFLICT => {
            return Err(ApiError::conflict(format!(
                "network {} is in use by containers",
                net.name
            )))
        }
        Err(e) => return Err(e),
    }
    if let Ok(subnet) = net.subnet.parse::<Ipv4Net>() {
        st.store.release_subnet(&subnet)?;
    }
    st.store.delete_network(&net.id)?;
    Ok(StatusCode::NO_CONTENT)
}
