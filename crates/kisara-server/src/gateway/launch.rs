//! Exposure in the launch path: lease the public ports, launch, and say where players connect.
//!
//! Host mode leases host ports of the node (scope `node:<id>`) and hands them to the engine
//! explicitly; when the engine says another program holds one, that port is skipped and the
//! next free one leased. Gateway mode leases gateway ports, opens their listeners before the
//! container exists (a visitor arriving early is turned away cleanly) and publishes nothing.
//! Whatever fails, the caller releases the container's leases (see
//! [`super::release_container`]), so nothing is left held.

use std::collections::BTreeMap;
use std::time::Duration;

use kisara_api::agent::{ContainerConfig, InventoryContainer, Operation, Reply};
use kisara_api::{
    ExposeMode, LaunchRequest, PortBinding, PortRange, PortSpec, Protocol, ServiceRequest,
};
use kisara_store::{Lease, LeaseRequest, GATEWAY_SCOPE};

use crate::error::{ApiError, ApiResult};
use crate::hub::NodeSession;
use crate::{now, AppState};

/// Ports skipped because another program holds them, before giving up on a launch.
const MAX_PORT_RETRIES: usize = 16;

/// How a launch (a container's, or each of a service's containers') asked for its ports to
/// be exposed: the mode, if it named one, and the bandwidth cap.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exposure {
    pub mode: Option<ExposeMode>,
    pub bandwidth_kbps: Option<u64>,
}

impl From<&LaunchRequest> for Exposure {
    fn from(req: &LaunchRequest) -> Exposure {
        Exposure {
            mode: req.expose,
            bandwidth_kbps: req.bandwidth_kbps,
        }
    }
}

impl From<&ServiceRequest> for Exposure {
    fn from(req: &ServiceRequest) -> Exposure {
        Exposure {
            mode: req.expose,
            bandwidth_kbps: req.bandwidth_kbps,
        }
    }
}

/// The mode a launch gets: the request's, else its node's, else the server's default.
pub fn mode_for(st: &AppState, exposure: Exposure, session: &NodeSession) -> ExposeMode {
    exposure
        .mode
        .or(session.hello.exposure.mode)
        .unwrap_or(st.settings.exposure.default_mode)
}

/// Checks a request's exposure before anything is made (400 for what can never work).
pub fn validate(st: &AppState, exposure: Exposure) -> ApiResult<()> {
    if exposure.mode == Some(ExposeMode::Gateway) && !st.gateway.enabled() {
        return Err(ApiError::bad_request(
            "expose \"gateway\" needs the gateway role, which this server does not run \
             (set [gateway] enabled = true)",
        ));
    }
    if exposure.bandwidth_kbps == Some(0) {
        return Err(ApiError::bad_request(
            "bandwidth_kbps must be above 0 (leave it out for no cap)",
        ));
    }
    Ok(())
}

/// Whose ports are leased: a container, and the service it belongs to if any.
#[derive(Clone, Copy)]
struct Owner<'a> {
    container_id: &'a str,
    service_id: Option<&'a str>,
}

fn lease_requests(
    scope: &str,
    mode: ExposeMode,
    node_id: &str,
    owner: Owner<'_>,
    ports: &[PortSpec],
    rate_kbps: Option<u64>,
    avoid: &BTreeMap<Protocol, Vec<u16>>,
) -> Vec<LeaseRequest> {
    ports
        .iter()
        .map(|p| LeaseRequest {
            scope: scope.to_string(),
            protocol: p.protocol,
            mode,
            node_id: node_id.to_string(),
            container_id: Some(owner.container_id.to_string()),
            service_id: owner.service_id.map(str::to_string),
            container_port: p.port,
            rate_kbps,
            avoid: avoid.get(&p.protocol).cloned().unwrap_or_default(),
        })
        .collect()
}

fn release(st: &AppState, leases: &[Lease]) {
    for l in leases {
        let _ = st.store.release_lease(&l.scope, l.protocol, l.port);
        if l.scope == GATEWAY_SCOPE {
            st.gateway.close_listener(l.protocol, l.port);
        }
    }
}

/// Creates and starts the container with its ports exposed as its mode says; returns what
/// the node reported and the public bindings, in the order of `config.ports`.
pub async fn launch(
    st: &std::sync::Arc<AppState>,
    req: &LaunchRequest,
    container_id: &str,
    session: &NodeSession,
    config: &mut ContainerConfig,
    timeout: Duration,
) -> ApiResult<(InventoryContainer, Vec<PortBinding>)> {
    let owner = Owner {
        container_id,
        service_id: None,
    };
    launch_exposed(st, req.into(), owner, session, config, timeout).await
}

/// A service's container: its ports exposed in the service's mode (the request's, else its
/// node's, else the server's default), the leases carrying the service's id, so no port is
/// handed out twice and they go back when the service goes.
pub async fn launch_service_container(
    st: &std::sync::Arc<AppState>,
    exposure: Exposure,
    node_id: &str,
    service_id: &str,
    container_id: &str,
    config: &mut ContainerConfig,
    timeout: Duration,
) -> ApiResult<(InventoryContainer, Vec<PortBinding>)> {
    if config.ports.is_empty() {
        let inv = call_launch(st, node_id, config, timeout).await?;
        return Ok((inv, Vec::new()));
    }
    let session = st
        .hub
        .get(node_id)
        .ok_or_else(|| ApiError::node_unavailable(format!("node {node_id} is not connected")))?;
    let owner = Owner {
        container_id,
        service_id: Some(service_id),
    };
    launch_exposed(st, exposure, owner, &session, config, timeout).await
}

async fn launch_exposed(
    st: &std::sync::Arc<AppState>,
    exposure: Exposure,
    owner: Owner<'_>,
    session: &NodeSession,
    config: &mut ContainerConfig,
    timeout: Duration,
) -> ApiResult<(InventoryContainer, Vec<PortBinding>)> {
    let node_id = session.node_id.clone();
    let ports = config.ports.clone();
    let mode = mode_for(st, exposure, session);
    if ports.is_empty() {
        let inv = call_launch(st, &node_id, config, timeout).await?;
        return Ok((inv, Vec::new()));
    }
    match mode {
        ExposeMode::Gateway => {
            if !st.gateway.enabled() {
                return Err(ApiError::bad_request(format!(
                    "node {} exposes in gateway mode, but this server runs no gateway \
                     (set [gateway] enabled = true, or expose \"host\")",
                    session.hello.name
                )));
            }
            let leases =
                lease_gateway(st, &node_id, owner, &ports, exposure.bandwidth_kbps).await?;
            // Nothing is published on the node: the gateway reaches the container itself.
            config.ports.clear();
            config.host_ports.clear();
            let inv = match call_launch(st, &node_id, config, timeout).await {
                Ok(inv) => inv,
                Err(e) => {
                    release(st, &leases);
                    return Err(e);
                }
            };
            Ok((inv, gateway_bindings(st, &leases)))
        }
        ExposeMode::Host => {
            let (inv, leases) =
                launch_host(st, session, owner, exposure.bandwidth_kbps, config, timeout).await?;
            let bindings = host_bindings(&inv, &leases, &session.hello.public_address);
            Ok((inv, bindings))
        }
    }
}

/// Host mode: leases host ports of the node and has its engine publish exactly those; a port
/// another program holds is skipped and the next one leased. Nothing stays leased on failure.
async fn launch_host(
    st: &std::sync::Arc<AppState>,
    session: &NodeSession,
    owner: Owner<'_>,
    rate_kbps: Option<u64>,
    config: &mut ContainerConfig,
    timeout: Duration,
) -> ApiResult<(InventoryContainer, Vec<Lease>)> {
    let node_id = session.node_id.clone();
    let ports = config.ports.clone();
    let range = session
        .hello
        .exposure
        .port_range
        .unwrap_or(st.settings.exposure.host_port_range);
    let scope = kisara_store::node_scope(&node_id);
    let mut avoid: BTreeMap<Protocol, Vec<u16>> = BTreeMap::new();
    for _ in 0..MAX_PORT_RETRIES {
        let reqs = lease_requests(
            &scope,
            ExposeMode::Host,
            &node_id,
            owner,
            &ports,
            rate_kbps,
            &avoid,
        );
        let leases = st.store.lease_ports(range, &reqs, now())?;
        config.host_ports = leases
            .iter()
            .map(|l| {
                (
                    PortSpec {
                        port: l.container_port,
                        protocol: l.protocol,
                    }
                    .to_string(),
                    l.port,
                )
            })
            .collect();
        match call_launch(st, &node_id, config, timeout).await {
            Ok(inv) => return Ok((inv, leases)),
            Err(e) if port_taken(&e.message) => {
                // Another program holds one of them: skip it and lease again.
                let named: Vec<&Lease> = leases
                    .iter()
                    .filter(|l| e.message.contains(&format!(":{}", l.port)))
                    .collect();
                let skip: Vec<&Lease> = if named.is_empty() {
                    leases.iter().collect()
                } else {
                    named
                };
                for l in skip {
                    avoid.entry(l.protocol).or_default().push(l.port);
                }
                tracing::info!(node = %node_id, avoid = ?avoid, "host port taken by another program; leasing the next");
                release(st, &leases);
            }
            Err(e) => {
                release(st, &leases);
                return Err(e);
            }
        }
    }
    Err(ApiError::exhausted(format!(
        "node {}: every host port tried in {range} is held by another program",
        session.hello.name
    )))
}

/// Leases gateway ports and opens their listeners; a port some other program holds on the
/// gateway's host is skipped.
async fn lease_gateway(
    st: &std::sync::Arc<AppState>,
    node_id: &str,
    owner: Owner<'_>,
    ports: &[PortSpec],
    rate_kbps: Option<u64>,
) -> ApiResult<Vec<Lease>> {
    let range: PortRange = st.gateway.settings.port_range;
    let mut avoid: BTreeMap<Protocol, Vec<u16>> = BTreeMap::new();
    for _ in 0..MAX_PORT_RETRIES {
        let reqs = lease_requests(
            GATEWAY_SCOPE,
            ExposeMode::Gateway,
            node_id,
            owner,
            ports,
            rate_kbps,
            &avoid,
        );
        let leases = st.store.lease_ports(range, &reqs, now())?;
        st.gateway.set_instance_cap(owner.container_id, rate_kbps);
        if !st.gateway.settings.listen {
            // Standalone gateways listen (they poll the leases); nothing to bind here.
            return Ok(leases);
        }
        let mut failed = None;
        for l in &leases {
            if let Err(e) = super::listen::open(st, l).await {
                failed = Some((l.protocol, l.port, e));
                break;
            }
        }
        match failed {
            None => return Ok(leases),
            Some((protocol, port, e)) => {
                release(st, &leases);
                if e.kind() != std::io::ErrorKind::AddrInUse {
                    return Err(ApiError::internal(format!(
                        "gateway cannot listen on port {port}/{protocol}: {e}"
                    )));
                }
                avoid.entry(protocol).or_default().push(port);
            }
        }
    }
    Err(ApiError::exhausted(format!(
        "every gateway port tried in {range} is held by another program"
    )))
}

/// Whether an engine error says a host port is in use.
fn port_taken(message: &str) -> bool {
    message.contains("port is already allocated") || message.contains("address already in use")
}

async fn call_launch(
    st: &AppState,
    node_id: &str,
    config: &ContainerConfig,
    timeout: Duration,
) -> ApiResult<InventoryContainer> {
    match st
        .hub
        .call(
            node_id,
            Operation::Launch {
                config: Box::new(config.clone()),
            },
            timeout,
        )
        .await?
    {
        Reply::Launched(c) => Ok(c),
        other => Err(ApiError::internal(format!(
            "unexpected reply to launch: {other:?}"
        ))),
    }
}

/// The public bindings of a container whose launch was interrupted and is adopted: its gateway
/// leases where it has any (a gateway-mode container publishes nothing on its node), else what
/// its engine published.
pub fn adopted_bindings(
    st: &AppState,
    container_id: &str,
    inv: &InventoryContainer,
    public_address: &str,
) -> Vec<PortBinding> {
    let leases: Vec<Lease> = st
        .store
        .container_leases(container_id)
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.scope == GATEWAY_SCOPE)
        .collect();
    if leases.is_empty() {
        return crate::api::containers::bindings(inv, public_address);
    }
    gateway_bindings(st, &leases)
}

/// Gateway-mode bindings: the gateway's public address and the leased ports.
fn gateway_bindings(st: &AppState, leases: &[Lease]) -> Vec<PortBinding> {
    let public = &st.gateway.settings.public_address;
    leases
        .iter()
        .map(|l| PortBinding {
            container_port: l.container_port,
            protocol: l.protocol,
            public_host: public.clone(),
            public_port: l.port,
        })
        .collect()
}

/// Host-mode bindings: the node's address and the port the engine published (the leased one).
fn host_bindings(inv: &InventoryContainer, leases: &[Lease], public: &str) -> Vec<PortBinding> {
    leases
        .iter()
        .map(|l| {
            let published = inv
                .published
                .iter()
                .find(|p| p.port.port == l.container_port && p.port.protocol == l.protocol)
                .map(|p| p.host_port)
                .unwrap_or(l.port);
            PortBinding {
                container_port: l.container_port,
                protocol: l.protocol,
                public_host: public.to_string(),
                public_port: published,
            }
        })
        .collect()
}
