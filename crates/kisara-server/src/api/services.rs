//! Multi-container services: launch from a compose file or Kisara's `ServiceConfig`, list,
//! inspect, stop.
//!
//! A launch parses and validates everything first (pure, in `kisara_core`), then reserves room
//! for every container on one node, writes the service's row and its containers' rows in
//! `launching` (intent), makes the networks (fresh from the pool; the warm pool's spare serves
//! the default network), and creates the containers in dependency order, waiting for
//! `service_healthy` dependencies. It answers once every container with a healthcheck is
//! healthy. On any failure everything it made is removed: containers, networks and their
//! subnets, rows, reservations. The launch runs in a task of its own, so a caller that goes
//! away mid-launch cannot leave half a service behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kisara_api::agent::{InventoryContainer, Operation, Reply};
use kisara_api::{
    codes, host_port_string, labels, Container, ContainerState, ErrorBody, ExecRequest,
    HealthState, ListResponse, Network, NodeError, Service, ServiceContainer, ServiceFilter,
    ServiceNetwork, ServiceRequest, ServiceState,
};
use kisara_api::{FlagSpec, InstanceFlag, RenewRequest};
use kisara_core::scheduler::{PlacementRequest, Resources};
use kisara_core::service_plan::{
    self, DependCondition, PlannedContainer, PlannedNetwork, ServiceContext, ServicePlan,
};
use kisara_core::{compose, service_config};
use kisara_store::{
    InstanceRecord, OptionalExt, ServiceContainerMember, ServiceNetworkMember, ServiceRecord,
    KIND_SERVICE, SERVICE_LAUNCHING, SERVICE_UP,
};

use super::{ApiJson, ApiQuery};
use crate::error::{status_for_code, ApiError, ApiResult};
use crate::flags::Rendered;
use crate::gateway::launch::Exposure;
use crate::instances::{self, Caller};
use crate::{new_ordered_id, now, placement, AppState};

const LAUNCH_TIMEOUT: Duration = Duration::from_secs(120);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 120;
const MAX_HEALTH_TIMEOUT_SECS: u64 = 3600;
/// How often health is read while waiting for it.
const HEALTH_POLL: Duration = Duration::from_millis(100);
/// How often health is read around the moments the engine runs a probe.
const HEALTH_POLL_FAST: Duration = Duration::from_millis(20);
/// The slowest the fast rate gets when many launches wait for health at once.
const HEALTH_POLL_MAX: Duration = Duration::from_millis(500);
/// Health waits in progress on this server.
static HEALTH_WAITERS: AtomicUsize = AtomicUsize::new(0);

/// Counts a health wait for as long as it lives.
struct Waiting;

impl Waiting {
    fn start() -> Waiting {
        HEALTH_WAITERS.fetch_add(1, Ordering::Relaxed);
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        HEALTH_WAITERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The engine's healthcheck interval when the file names none.
const DOCKER_DEFAULT_INTERVAL: Duration = Duration::from_secs(30);

/// When a container's health can change: the engine probes every `interval` from the start,
/// so health is read often just around those moments and seldom in between (a hundred
/// services waiting at once must not flood their node with inspects).
#[derive(Clone, Copy)]
struct Probes {
    started: tokio::time::Instant,
    interval: Option<Duration>,
}

impl Probes {
    fn of(c: &PlannedContainer, started: tokio::time::Instant) -> Probes {
        let interval = c.healthcheck.as_ref().map(|h| {
            h.interval_ms
                .filter(|ms| *ms > 0)
                .map_or(DOCKER_DEFAULT_INTERVAL, Duration::from_millis)
        });
        Probes { started, interval }
    }

    fn next_poll(&self) -> Duration {
        let Some(iv) = self.interval else {
            return HEALTH_POLL;
        };
        // Many launches waiting at once share their node's attention: the fast rate slows
        // down with their number (each wait is one inspect per poll).
        let waiting = HEALTH_WAITERS.load(Ordering::Relaxed).max(1) as u32;
        let fast = (HEALTH_POLL_FAST * waiting / 2).clamp(HEALTH_POLL_FAST, HEALTH_POLL_MAX);
        let iv_ms = iv.as_millis().max(1) as u64;
        if iv_ms <= 500 {
            return fast;
        }
        let phase = (self.started.elapsed().as_millis() as u64) % iv_ms;
        // A probe runs at each multiple of the interval (measured from a moment just after
        // the start) and takes a few tens of milliseconds.
        if phase < 400 || phase + 50 >= iv_ms {
            fast
        } else {
            Duration::from_millis(iv_ms - 50 - phase)
        }
    }
}
const LIST_DEADLINE: Duration = super::containers::LIST_DEADLINE;

/// Launch a service on one node; answers once it is up (healthy where it has healthchecks).
#[utoipa::path(post, path = "/v1/services", request_body = ServiceRequest,
    responses((status = 201, body = Service), (status = 400, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 503, body = ErrorBody),
              (status = 504, body = ErrorBody)))]
pub async fn launch(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    ApiJson(req): ApiJson<ServiceRequest>,
) -> ApiResult<(StatusCode, Json<Service>)> {
    let plan = plan_of(&req)?;
    service_plan::validate(&plan, &st.settings)?;
    crate::gateway::launch::validate(&st, (&req).into())?;
    let service_id = new_ordered_id();
    // Lifetime and flags are settled (and refused when bad) before anything is made.
    let flags = render_flags(&st, &req, &plan)?;
    let record = instances::record(
        &st,
        &service_id,
        KIND_SERVICE,
        req.ttl_secs,
        req.owner.as_deref(),
        req.module.as_deref(),
        flags.all.clone(),
    )?;
    let name = req
        .name
        .clone()
        .or_else(|| plan.name.clone())
        .unwrap_or_else(|| "service".to_string());
    service_plan::check_member_name("service", &name)?;
    let health_timeout = req
        .health_timeout_secs
        .unwrap_or(DEFAULT_HEALTH_TIMEOUT_SECS);
    if health_timeout == 0 || health_timeout > MAX_HEALTH_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!(
            "health_timeout_secs must be 1..={MAX_HEALTH_TIMEOUT_SECS}"
        )));
    }
    // Runs to the end (success or full cleanup) even if the caller hangs up.
    let task_st = st.clone();
    let task = tokio::spawn(async move {
        launch_service(
            &task_st,
            Launch {
                req,
                plan,
                name,
                health_timeout: Duration::from_secs(health_timeout),
                record,
                flags,
            },
        )
        .await
    });
    let mut service = task
        .await
        .map_err(|e| ApiError::internal(format!("service launch task failed: {e}")))??;
    decorate(&st, &mut service, caller);
    Ok((StatusCode::CREATED, Json(service)))
}

/// A service's flags, rendered: per container (by its name in the file), and all of them as
/// the caller and the instance record see them (targets prefixed with the container's name).
#[derive(Debug, Default)]
struct ServiceFlags {
    per_container: HashMap<String, Rendered>,
    all: Vec<InstanceFlag>,
}

/// Validates the request's flags against the plan and renders them.
fn render_flags(
    st: &AppState,
    req: &ServiceRequest,
    plan: &ServicePlan,
) -> ApiResult<ServiceFlags> {
    let mut specs: BTreeMap<String, Vec<FlagSpec>> = BTreeMap::new();
    let first = plan.containers.first().map(|c| c.service.clone());
    for (i, f) in req.flags.iter().enumerate() {
        let container = match (&f.container, &first) {
            (Some(c), _) => {
                if !plan.containers.iter().any(|p| p.service == *c) {
                    return Err(ApiError::bad_request(format!(
                        "flags[{i}]: the service has no container named {c:?}"
                    )));
                }
                c.clone()
            }
            (None, Some(c)) => c.clone(),
            (None, None) => return Err(ApiError::bad_request("the service has no containers")),
        };
        specs.entry(container).or_default().push(f.spec());
    }
    let mut out = ServiceFlags::default();
    for (container, specs) in specs {
        kisara_core::flags::validate_all(&specs)
            .map_err(|e| ApiError::bad_request(format!("flags of {container}: {e}")))?;
        let rendered =
            crate::flags::render(st, &specs, req.owner.as_deref(), req.module.as_deref(), 0)?;
        out.all.extend(rendered.flags.iter().map(|f| InstanceFlag {
            target: format!("{container}/{}", f.target),
            value: f.value.clone(),
        }));
        out.per_container.insert(container, rendered);
    }
    Ok(out)
}

/// Fills a service's lifecycle fields from its instance record; flags only for admins.
fn decorate(st: &AppState, s: &mut Service, caller: Caller) {
    let rec = st.store.instance(&s.id).ok().flatten();
    decorate_with(s, rec.as_ref(), caller);
}

fn decorate_with(s: &mut Service, rec: Option<&InstanceRecord>, caller: Caller) {
    match rec {
        Some(rec) => {
            s.expires_at = rec.expires_at;
            s.renewals = rec.renewals;
            s.flags = caller.sees_flags().then(|| rec.flags.clone());
        }
        None => {
            s.expires_at = None;
            s.renewals = 0;
            s.flags = None;
        }
    }
}

/// Everything a launch needs, settled before it starts.
struct Launch {
    req: ServiceRequest,
    plan: ServicePlan,
    name: String,
    health_timeout: Duration,
    record: InstanceRecord,
    flags: ServiceFlags,
}

fn plan_of(req: &ServiceRequest) -> ApiResult<ServicePlan> {
    match (&req.compose, &req.config) {
        (Some(text), None) => Ok(compose::parse(text, &req.env)?),
        (None, Some(config)) => {
            if !req.env.is_empty() {
                return Err(ApiError::bad_request(
                    "env interpolates compose files; a ServiceConfig takes env per container",
                ));
            }
            Ok(service_config::plan(config)?)
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give either compose or config, not both",
        )),
        (None, None) => Err(ApiError::bad_request(
            "a service needs compose (the file's text) or config (a Kisara ServiceConfig)",
        )),
    }
}

/// What a launch made on the node so far, for the cleanup of a failed one.
#[derive(Default)]
struct Made {
    /// Kisara container id → Docker id.
    containers: Vec<(String, String)>,
    networks: Vec<Network>,
}

async fn launch_service(st: &Arc<AppState>, launch: Launch) -> ApiResult<Service> {
    let Launch {
        req,
        plan,
        name,
        health_timeout,
        record,
        flags,
    } = launch;
    let service_id = record.id.clone();
    // Existing networks (AWD game networks) pin the node.
    let mut existing: BTreeMap<String, Network> = BTreeMap::new();
    let mut pinned: Option<String> = None;
    for n in &plan.networks {
        let Some(want) = &n.existing else { continue };
        let net = st.store.get_network(want).map_err(|_| {
            ApiError::not_found(format!(
                "network {:?} (of the service) does not exist",
                want
            ))
        })?;
        match &pinned {
            Some(node) if *node != net.node_id => {
                return Err(ApiError::bad_request(format!(
                    "the service's existing networks live on different nodes ({node} and {})",
                    net.node_id
                )))
            }
            _ => pinned = Some(net.node_id.clone()),
        }
        existing.insert(n.name.clone(), net);
    }
    if let (Some(want), Some(node)) = (&req.node, &pinned) {
        if placement::resolve_node(st, want)? != *node {
            return Err(ApiError::bad_request(format!(
                "the service's existing networks live on node {node}, not on {want}"
            )));
        }
    }
    let ids: Vec<String> = plan.containers.iter().map(|_| new_ordered_id()).collect();
    // Reconciliation must not settle these rows while this launch is still working on them.
    let _in_flight: Vec<_> = std::iter::once(&service_id)
        .chain(ids.iter())
        .map(|id| st.begin_launch(id))
        .collect();
    let members: Vec<(String, Resources)> = plan
        .containers
        .iter()
        .zip(&ids)
        .map(|(c, id)| {
            (
                id.clone(),
                Resources::new(
                    c.memory_mb.unwrap_or(st.settings.defaults.memory_mb),
                    c.cpus.unwrap_or(st.settings.defaults.cpus),
                ),
            )
        })
        .collect();
    let preq = PlacementRequest {
        node: pinned.or_else(|| req.node.clone()),
        node_selector: req.node_selector.clone(),
        resources: Resources::default(),
        takes_slot: true,
        image: plan.containers.first().map(|c| c.image.clone()),
    };
    // Released when dropped uncommitted (any early return below).
    let reservations = match st.placement.reserve_group(&members, &preq, None) {
        Ok(r) => r,
        Err(e) => {
            st.metrics.placement_failed(&e.code);
            return Err(e);
        }
    };
    let node_id = match reservations.first() {
        Some(r) => r.node_id().to_string(),
        None => return Err(ApiError::bad_request("the service has no containers")),
    };
    if st.hub.get(&node_id).is_none() {
        return Err(ApiError::node_unavailable(format!(
            "node {node_id} is not connected"
        )));
    }

    // Intent: the service's row and its containers' rows exist before anything on the node.
    let mut rec = ServiceRecord {
        id: service_id.clone(),
        name: name.clone(),
        node_id: node_id.clone(),
        owner: req.owner.clone(),
        module: req.module.clone(),
        state: SERVICE_LAUNCHING.to_string(),
        members: kisara_store::ServiceMembers {
            containers: plan
                .containers
                .iter()
                .zip(&ids)
                .map(|(c, id)| ServiceContainerMember {
                    service: c.service.clone(),
                    container_id: id.clone(),
                })
                .collect(),
            networks: Vec::new(),
        },
        created_at: now(),
    };
    let mut rows = Vec::with_capacity(ids.len());
    for ((c, id), (_, res)) in plan.containers.iter().zip(&ids).zip(&members) {
        let row = container_row(id, &node_id, c, &req, &service_id)?;
        rows.push((row, res.memory_mb, res.cpu_milli));
    }
    // The service's rows and its instance record go in together, under the admission limits
    // (409 `quota_exceeded` names the limit hit; nothing is written then).
    st.store
        .admit_service(&rec, &rows, &record, &instances::limits(st))?;
    let mut made = Made::default();
    let result = build(
        st,
        &req,
        &plan,
        &mut rec,
        &ids,
        health_timeout,
        &existing,
        &flags,
        &mut made,
    )
    .await;
    match result {
        Ok(()) => {
            rec.state = SERVICE_UP.to_string();
            if let Err(e) = st.store.update_service(&rec) {
                undo(st, &rec, &ids, &made).await;
                return Err(e.into());
            }
            for r in reservations {
                r.commit();
            }
            st.metrics.placements.inc();
            let live = node_inventory(st, &node_id).await.ok();
            let service = view(st, &rec, live.as_ref());
            for c in &service.containers {
                if let Ok(Some(row)) = st.store.get_container(&c.id).optional() {
                    st.events.container_launched(&row);
                }
            }
            st.events.service_started(&service);
            tracing::info!(service = %service_id, node = %node_id, containers = ids.len(), "service launched");
            Ok(service)
        }
        Err(e) => {
            undo(st, &rec, &ids, &made).await;
            tracing::info!(service = %service_id, error = %e, "service launch failed; everything it made was removed");
            Err(e)
        }
    }
}

/// A container's row before the node makes it (state `launching`).
fn container_row(
    id: &str,
    node_id: &str,
    c: &PlannedContainer,
    req: &ServiceRequest,
    service_id: &str,
) -> ApiResult<Container> {
    let mut row_labels = c.labels.clone();
    row_labels.insert(labels::SERVICE.to_string(), service_id.to_string());
    row_labels.insert(labels::SERVICE_MEMBER.to_string(), c.service.clone());
    // Built through serde so that fields other parts of Kisara add to `Container` (with their
    // serde defaults) need no change here.
    serde_json::from_value(serde_json::json!({
        "id": id,
        "docker_id": "",
        "name": service_plan::container_docker_name(service_id, &c.service),
        "node_id": node_id,
        "image": c.image,
        "owner": req.owner,
        "module": req.module,
        "labels": row_labels,
        "network": null,
        "ip_address": null,
        "state": "launching",
        "status": "launching",
        "ports": [],
        "host_port": "",
        "created_at": now(),
    }))
    .map_err(|e| ApiError::internal(format!("container row: {e}")))
}

#[allow(clippy::too_many_arguments)]
async fn build(
    st: &Arc<AppState>,
    req: &ServiceRequest,
    plan: &ServicePlan,
    rec: &mut ServiceRecord,
    ids: &[String],
    health_timeout: Duration,
    existing: &BTreeMap<String, Network>,
    flags: &ServiceFlags,
    made: &mut Made,
) -> ApiResult<()> {
    let node_id = rec.node_id.clone();
    let service_id = rec.id.clone();
    let mut ctx = ServiceContext {
        cluster_id: st.cluster_id.clone(),
        service_id: service_id.clone(),
        node_id: node_id.clone(),
        owner: req.owner.clone(),
        module: req.module.clone(),
        networks: BTreeMap::new(),
    };
    // Networks, all at once.
    let fresh: Vec<&PlannedNetwork> = plan
        .networks
        .iter()
        .filter(|n| n.existing.is_none())
        .collect();
    let results = futures::future::join_all(
        fresh
            .iter()
            .map(|n| make_network(st, &node_id, &service_id, n, req.internet)),
    )
    .await;
    let mut first_error = None;
    for (n, r) in fresh.iter().zip(results) {
        match r {
            Ok(net) => {
                rec.members.networks.push(ServiceNetworkMember {
                    name: n.name.clone(),
                    network_id: net.id.clone(),
                    owned: true,
                });
                ctx.networks.insert(n.name.clone(), net.name.clone());
                made.networks.push(net);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for (name, net) in existing {
        rec.members.networks.push(ServiceNetworkMember {
            name: name.clone(),
            network_id: net.id.clone(),
            owned: false,
        });
        ctx.networks.insert(name.clone(), net.name.clone());
    }
    st.store.update_service(rec)?;
    if let Some(e) = first_error {
        return Err(e);
    }

    // Containers, in waves: each as soon as what it depends on is up (healthy where asked).
    let deadline = tokio::time::Instant::now() + health_timeout;
    // service → docker id, and when its health can change
    let mut started: HashMap<String, (String, Probes)> = HashMap::new();
    let mut healthy: BTreeSet<String> = BTreeSet::new();
    let mut pending: Vec<usize> = (0..plan.containers.len()).collect();
    while !pending.is_empty() {
        let wave: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&i| {
                plan.containers[i]
                    .depends_on
                    .iter()
                    .all(|d| started.contains_key(&d.service))
            })
            .collect();
        if wave.is_empty() {
            // Cannot happen for a plan in start order; never loop forever if it does.
            return Err(ApiError::internal("no container of the service can start"));
        }
        let mut waits: BTreeMap<String, String> = BTreeMap::new(); // dependency → needed by
        for &i in &wave {
            let c = &plan.containers[i];
            for d in &c.depends_on {
                if d.condition == DependCondition::Healthy && !healthy.contains(&d.service) {
                    waits
                        .entry(d.service.clone())
                        .or_insert_with(|| c.service.clone());
                }
            }
        }
        let checks =
            waits.iter().map(|(dep, by)| {
                // Every dependency of the wave was started (that is what put it in the wave).
                let (docker_id, probes) = started.get(dep).cloned().unwrap_or((
                    String::new(),
                    Probes {
                        started: tokio::time::Instant::now(),
                        interval: None,
                    },
                ));
                let node_id = node_id.clone();
                async move {
                    wait_healthy(st, &node_id, &docker_id, dep, Some(by), probes, deadline).await
                }
            });
        for r in futures::future::join_all(checks).await {
            r?;
        }
        healthy.extend(waits.into_keys());
        let launches = wave.iter().map(|&i| {
            let c = &plan.containers[i];
            let rendered = flags.per_container.get(&c.service);
            launch_one(st, c, &ids[i], &ctx, req.into(), rendered)
        });
        let results = futures::future::join_all(launches).await;
        let mut first_error = None;
        for (&i, r) in wave.iter().zip(results) {
            match r {
                Ok(docker_id) => {
                    made.containers.push((ids[i].clone(), docker_id.clone()));
                    let probes = Probes::of(&plan.containers[i], tokio::time::Instant::now());
                    started.insert(plan.containers[i].service.clone(), (docker_id, probes));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        pending.retain(|i| !wave.contains(i));
    }

    // Up means healthy wherever there is a healthcheck (the file's or the image's).
    let checks = plan
        .containers
        .iter()
        .filter(|c| !healthy.contains(&c.service))
        .filter(|c| {
            c.healthcheck
                .as_ref()
                .is_none_or(|h| h.test.first().map(String::as_str) != Some("NONE"))
        })
        .filter_map(|c| {
            let (docker_id, probes) = started.get(&c.service).cloned()?;
            let node_id = node_id.clone();
            let has_check = c.healthcheck.is_some();
            Some(async move {
                if has_check {
                    wait_healthy(st, &node_id, &docker_id, &c.service, None, probes, deadline).await
                } else {
                    wait_image_health(st, &node_id, &docker_id, &c.service, probes, deadline).await
                }
            })
        });
    for r in futures::future::join_all(checks).await {
        r?;
    }

    for (c, id) in plan.containers.iter().zip(ids) {
        let docker_id = started
            .get(&c.service)
            .map(|(d, _)| d.clone())
            .unwrap_or_default();
        place_flags(st, &node_id, c, id, &docker_id).await?;
        // Exec flags, once the service is up; a failing flag command fails the launch.
        if let Some(rendered) = flags.per_container.get(&c.service) {
            crate::flags::run_execs(st, &node_id, &docker_id, rendered)
                .await
                .map_err(|e| ApiError {
                    message: format!("service {}: {}", c.service, e.message),
                    ..e
                })?;
        }
    }
    Ok(())
}

/// A fresh network for the service: the warm pool's spare for the plain default network, else
/// a new one from the subnet pool, owned by the service and removed with it.
async fn make_network(
    st: &Arc<AppState>,
    node_id: &str,
    service_id: &str,
    n: &PlannedNetwork,
    internet: bool,
) -> ApiResult<Network> {
    let spare_fits =
        n.name == compose::DEFAULT_NETWORK && !internet && !n.internal && n.labels.is_empty();
    if spare_fits {
        if let Some(net) = crate::warm::claim(st, node_id, service_id) {
            return Ok(net);
        }
    }
    let mut net_labels = n.labels.clone();
    net_labels.insert(labels::OWNED_BY.to_string(), service_id.to_string());
    net_labels.insert(labels::SERVICE.to_string(), service_id.to_string());
    net_labels.insert(labels::SERVICE_MEMBER.to_string(), n.name.clone());
    let made = super::networks::create_on_node(
        st,
        node_id,
        &service_plan::network_docker_name(service_id, &n.name),
        None,
        n.internal,
        internet,
        Some(service_id.to_string()),
        net_labels,
    )
    .await;
    match made {
        Ok(net) => Ok(net),
        Err(e) if e.code == codes::POOL_EXHAUSTED && spare_fits => {
            crate::warm::wait_for_spare(st, node_id, service_id)
                .await
                .ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// Resolves, creates and starts one container, and records what the node reported.
async fn launch_one(
    st: &Arc<AppState>,
    c: &PlannedContainer,
    id: &str,
    ctx: &ServiceContext,
    exposure: Exposure,
    flags: Option<&Rendered>,
) -> ApiResult<String> {
    let mut config = service_plan::container_config(c, &st.settings, ctx, id)?;
    // Env and file flags go into the config: files are written before the start, so they
    // work with a read-only root.
    if let Some(rendered) = flags {
        crate::flags::apply(&mut config, rendered);
    }
    // Published ports are leased (host ports of the node, or gateway ports) and released with
    // the container or the service.
    let (inv, ports) = crate::gateway::launch::launch_service_container(
        st,
        exposure,
        &ctx.node_id,
        &ctx.service_id,
        id,
        &mut config,
        LAUNCH_TIMEOUT,
    )
    .await
    .map_err(|e| ApiError {
        message: format!("service {}: {}", c.service, e.message),
        ..e
    })?;
    let mut row = st.store.get_container(id)?;
    row.docker_id = inv.docker_id.clone();
    row.name = inv.name.trim_start_matches('/').to_string();
    row.network = inv.network.clone();
    row.ip_address = inv.ip_address.clone();
    row.state = ContainerState::from_docker(&inv.state);
    row.status = inv.status.clone();
    row.ports = ports;
    row.host_port = host_port_string(&row.ports);
    if let Err(e) = st.store.complete_container(&row) {
        // Returned with its Docker id so the cleanup removes it.
        remove_container(st, &ctx.node_id, &inv.docker_id).await;
        return Err(e.into());
    }
    Ok(inv.docker_id)
}

/// The one place where flags enter a service's containers: each planned flag's command runs
/// in its container once the service is up (Kisara's `ServiceConfig` `flag_command`). The
/// flag engine (dynamic flags, rotation) hooks in here. Neither the command nor its output is
/// logged or returned: both may carry the flag.
async fn place_flags(
    st: &Arc<AppState>,
    node_id: &str,
    c: &PlannedContainer,
    _container_id: &str,
    docker_id: &str,
) -> ApiResult<()> {
    for f in &c.flags {
        if f.command.trim().is_empty() {
            continue;
        }
        let request = ExecRequest {
            cmd: vec!["sh".into(), "-c".into(), f.command.clone()],
            timeout_secs: Some(30),
            ..Default::default()
        };
        let r = st
            .hub
            .call(
                node_id,
                Operation::Exec {
                    docker_id: docker_id.to_string(),
                    request,
                },
                Duration::from_secs(40),
            )
            .await?;
        match r {
            Reply::Exec(x) if x.exit_code == Some(0) => {}
            Reply::Exec(x) => {
                return Err(ApiError::conflict(format!(
                    "service {}: the flag command of flag {:?} failed (exit code {:?}{})",
                    c.service,
                    f.uuid,
                    x.exit_code,
                    if x.timed_out { ", timed out" } else { "" }
                )))
            }
            other => {
                return Err(ApiError::internal(format!(
                    "unexpected reply to exec: {other:?}"
                )))
            }
        }
    }
    Ok(())
}

fn timeout_error(msg: String) -> ApiError {
    ApiError::new(status_for_code(codes::TIMEOUT), codes::TIMEOUT, msg)
}

async fn inspect(
    st: &Arc<AppState>,
    node_id: &str,
    docker_id: &str,
) -> ApiResult<InventoryContainer> {
    match st
        .hub
        .call(
            node_id,
            Operation::Inspect {
                docker_id: docker_id.to_string(),
            },
            CALL_TIMEOUT,
        )
        .await?
    {
        Reply::Container(inv) => Ok(inv),
        other => Err(ApiError::internal(format!(
            "unexpected reply to inspect: {other:?}"
        ))),
    }
}

/// Waits until a container's healthcheck passes; fails at once when it turns unhealthy or the
/// container stops, and at the deadline.
async fn wait_healthy(
    st: &Arc<AppState>,
    node_id: &str,
    docker_id: &str,
    service: &str,
    needed_by: Option<&str>,
    probes: Probes,
    deadline: tokio::time::Instant,
) -> ApiResult<()> {
    let why = match needed_by {
        Some(by) => format!(" ({by} depends on it with condition service_healthy)"),
        None => String::new(),
    };
    let _waiting = Waiting::start();
    loop {
        let inv = match inspect(st, node_id, docker_id).await {
            Ok(inv) => Some(inv),
            // A node busy with many launches may answer late: that is not an answer.
            Err(e) if e.code == codes::TIMEOUT && tokio::time::Instant::now() < deadline => None,
            Err(e) => return Err(e),
        };
        let Some(inv) = inv else { continue };
        match (inv.state.as_str(), inv.health.as_deref()) {
            (_, Some("healthy")) => return Ok(()),
            (_, Some("unhealthy")) => {
                return Err(ApiError::conflict(format!(
                    "service {service} is unhealthy{why}"
                )))
            }
            ("running" | "restarting" | "created", Some(_)) => {}
            ("running", None) => {
                return Err(ApiError::bad_request(format!(
                    "service {service} has no healthcheck{why}"
                )))
            }
            (state, _) => {
                return Err(ApiError::conflict(format!(
                    "service {service} stopped before it was healthy (state {state}, {}){why}",
                    inv.status
                )))
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(timeout_error(format!(
                "service {service} was not healthy within the health timeout{why}"
            )));
        }
        let now = tokio::time::Instant::now();
        tokio::time::sleep(
            probes
                .next_poll()
                .min(deadline.saturating_duration_since(now)),
        )
        .await;
    }
}

/// A container without a healthcheck in the file may have one from its image: wait for that
/// one too, and for nothing when there is none.
async fn wait_image_health(
    st: &Arc<AppState>,
    node_id: &str,
    docker_id: &str,
    service: &str,
    probes: Probes,
    deadline: tokio::time::Instant,
) -> ApiResult<()> {
    let inv = inspect(st, node_id, docker_id).await?;
    if inv.health.is_none() {
        return Ok(());
    }
    wait_healthy(st, node_id, docker_id, service, None, probes, deadline).await
}

async fn remove_container(st: &Arc<AppState>, node_id: &str, docker_id: &str) -> bool {
    if docker_id.is_empty() {
        return true;
    }
    let r = st
        .hub
        .call(
            node_id,
            Operation::Remove {
                docker_id: docker_id.to_string(),
                force: true,
            },
            CALL_TIMEOUT,
        )
        .await;
    match r {
        Ok(_) => true,
        Err(e) if e.code == codes::NOT_FOUND => true,
        Err(e) => {
            tracing::warn!(container = %docker_id, error = %e, "could not remove a service container");
            false
        }
    }
}

/// Removes everything a failed launch made: containers, networks (with their subnets), rows.
async fn undo(st: &Arc<AppState>, rec: &ServiceRecord, ids: &[String], made: &Made) {
    futures::future::join_all(
        made.containers
            .iter()
            .map(|(_, docker_id)| remove_container(st, &rec.node_id, docker_id)),
    )
    .await;
    for id in ids {
        let _ = st.store.delete_container(id);
        crate::gateway::release_container(st, id);
    }
    for net in &made.networks {
        super::networks::destroy(st, net).await;
    }
    // Networks recorded but not in `made` (a create that failed after its row) are settled by
    // `networks::create_on_node` itself; anything owned by the service that is still recorded
    // goes too.
    for net in st.store.networks_owned_by(&rec.id).unwrap_or_default() {
        super::networks::destroy(st, &net).await;
    }
    let _ = st.store.delete_service(&rec.id);
}

/// Services, their containers' state and health read live from their nodes.
#[utoipa::path(get, path = "/v1/services", params(ServiceFilter),
    responses((status = 200, body = ListResponse<Service>)))]
pub async fn list(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    ApiQuery(filter): ApiQuery<ServiceFilter>,
) -> ApiResult<Json<ListResponse<Service>>> {
    let node = match &filter.node {
        Some(n) => Some(placement::resolve_node(&st, n)?),
        None => None,
    };
    let recs = st.store.list_services(
        filter.owner.as_deref(),
        filter.module.as_deref(),
        node.as_deref(),
    )?;
    let mut nodes: Vec<String> = recs.iter().map(|r| r.node_id.clone()).collect();
    nodes.sort();
    nodes.dedup();
    let answers = futures::future::join_all(nodes.iter().map(|n| node_inventory(&st, n))).await;
    let mut live = HashMap::new();
    let mut node_errors = Vec::new();
    for (n, a) in nodes.into_iter().zip(answers) {
        match a {
            Ok(m) => {
                live.insert(n, m);
            }
            Err(e) => node_errors.push(NodeError {
                node_id: n,
                error: e.body().error,
            }),
        }
    }
    let instances: HashMap<String, InstanceRecord> = st
        .store
        .list_instances()
        .unwrap_or_default()
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    let items = recs
        .iter()
        .map(|r| {
            let mut s = view(&st, r, live.get(&r.node_id));
            decorate_with(&mut s, instances.get(&r.id), caller);
            s
        })
        .collect();
    Ok(Json(ListResponse { items, node_errors }))
}

/// One service (by id, or by name when it is unique).
#[utoipa::path(get, path = "/v1/services/{id}",
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 200, body = Service), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<Service>> {
    let rec = st.store.get_service(&id)?;
    let live = node_inventory(&st, &rec.node_id).await.ok();
    let mut s = view(&st, &rec, live.as_ref());
    decorate(&st, &mut s, caller);
    Ok(Json(s))
}

/// Extend a service's lifetime by `secs` (default: the server's `renew_secs`), within the
/// maximum lifetime, the renewal limit and the hard deadline (409 `quota_exceeded` names the
/// limit hit).
#[utoipa::path(post, path = "/v1/services/{id}/renew", request_body = RenewRequest,
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 200, body = Service), (status = 400, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn renew(
    State(st): State<Arc<AppState>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Service>> {
    let secs = super::lifecycle::renew_secs(&body)?;
    let rec = st.store.get_service(&id)?;
    let inst = instances::renew(&st, &rec.id, secs)?;
    let mut s = view(&st, &rec, None);
    decorate_with(&mut s, Some(&inst), caller);
    Ok(Json(s))
}

/// Stop a service: every container and every network made for it is removed.
#[utoipa::path(delete, path = "/v1/services/{id}",
    params(("id" = String, Path, description = "service id or name")),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
              (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let rec = st.store.get_service(&id)?;
    if rec.state == SERVICE_LAUNCHING {
        return Err(ApiError::conflict(format!(
            "service {} is still being launched; try again in a moment",
            rec.id
        )));
    }
    let task_st = st.clone();
    tokio::spawn(async move { take_down(&task_st, &rec).await })
        .await
        .map_err(|e| ApiError::internal(format!("service stop task failed: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a service that is up: its containers, its own networks, its rows (and its
/// instance record); `service.stop` once. On an error what is left stays recorded, and a
/// retry finishes the job.
pub(crate) async fn take_down(st: &Arc<AppState>, rec: &ServiceRecord) -> ApiResult<()> {
    let service = view(st, rec, None);
    let rows: Vec<Container> = rec
        .members
        .containers
        .iter()
        .filter_map(|m| {
            st.store
                .get_container(&m.container_id)
                .optional()
                .ok()
                .flatten()
        })
        .collect();
    let removals = rows.iter().map(|c| async move {
        if c.state == ContainerState::Gone {
            return Ok(());
        }
        let r = st
            .hub
            .call(
                &c.node_id,
                Operation::Remove {
                    docker_id: c.docker_id.clone(),
                    force: true,
                },
                CALL_TIMEOUT,
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code == codes::NOT_FOUND => Ok(()),
            Err(e) => Err(e),
        }
    });
    let results = futures::future::join_all(removals).await;
    let mut first_error = None;
    for (c, r) in rows.iter().zip(results) {
        match r {
            Ok(()) => {
                st.store.delete_container(&c.id)?;
                crate::gateway::release_container(st, &c.id);
                st.placement.release(&c.id);
                st.events.container_stopped(c);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        // The service stays, with what is left of it; a retry finishes the job.
        return Err(e);
    }
    for m in &rec.members.networks {
        if !m.owned {
            continue;
        }
        if let Ok(net) = st.store.get_network(&m.network_id) {
            super::networks::destroy(st, &net).await;
        }
    }
    st.store.delete_service(&rec.id)?;
    st.events.service_stopped(&service);
    tracing::info!(service = %rec.id, "service removed");
    Ok(())
}

/// The labelled containers of one node, by Docker id, within the list deadline.
async fn node_inventory(
    st: &Arc<AppState>,
    node_id: &str,
) -> ApiResult<HashMap<String, InventoryContainer>> {
    match st
        .hub
        .call(node_id, Operation::ListContainers, LIST_DEADLINE)
        .await?
    {
        Reply::Containers(cs) => Ok(cs.into_iter().map(|c| (c.docker_id.clone(), c)).collect()),
        other => Err(ApiError::internal(format!("unexpected reply: {other:?}"))),
    }
}

/// A service as the API shows it: its rows, with state and health from the node's inventory
/// where it answered (`live`).
fn view(
    st: &AppState,
    rec: &ServiceRecord,
    live: Option<&HashMap<String, InventoryContainer>>,
) -> Service {
    let mut containers = Vec::new();
    for m in &rec.members.containers {
        let row = st
            .store
            .get_container(&m.container_id)
            .optional()
            .ok()
            .flatten();
        let mut sc = ServiceContainer {
            service: m.service.clone(),
            id: m.container_id.clone(),
            docker_id: String::new(),
            name: service_plan::container_docker_name(&rec.id, &m.service),
            image: String::new(),
            state: ContainerState::Gone,
            status: "removed".into(),
            health: None,
            ip_address: None,
            ports: Vec::new(),
            host_port: String::new(),
        };
        if let Some(row) = row {
            sc.docker_id = row.docker_id.clone();
            sc.name = row.name.clone();
            sc.image = row.image.clone();
            sc.state = row.state;
            sc.status = row.status.clone();
            sc.ip_address = row.ip_address.clone();
            sc.ports = row.ports.clone();
            sc.host_port = row.host_port.clone();
            if !matches!(row.state, ContainerState::Launching | ContainerState::Gone) {
                match live {
                    None if row.state == ContainerState::Lost => {}
                    None => sc.state = ContainerState::Unknown,
                    Some(m) => match m.get(&row.docker_id) {
                        Some(inv) => {
                            sc.state = ContainerState::from_docker(&inv.state);
                            sc.status = inv.status.clone();
                            sc.health = inv.health.as_deref().and_then(HealthState::from_docker);
                            sc.ip_address = inv.ip_address.clone().or(sc.ip_address);
                        }
                        None => {
                            sc.state = ContainerState::Gone;
                            sc.status = "removed outside Kisara".into();
                        }
                    },
                }
            }
        }
        containers.push(sc);
    }
    let state = if rec.state == SERVICE_LAUNCHING {
        ServiceState::Launching
    } else if containers
        .iter()
        .any(|c| matches!(c.state, ContainerState::Unknown | ContainerState::Lost))
    {
        ServiceState::Unknown
    } else if containers.iter().all(|c| {
        c.state == ContainerState::Running && matches!(c.health, None | Some(HealthState::Healthy))
    }) {
        ServiceState::Running
    } else if containers
        .iter()
        .all(|c| c.state == ContainerState::Running && c.health != Some(HealthState::Unhealthy))
    {
        ServiceState::Starting
    } else {
        ServiceState::Degraded
    };
    let networks = rec
        .members
        .networks
        .iter()
        .map(|m| {
            let net = st.store.get_network(&m.network_id).ok();
            ServiceNetwork {
                name: m.name.clone(),
                id: m.network_id.clone(),
                docker_name: net.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
                subnet: net.map(|n| n.subnet).unwrap_or_default(),
                owned: m.owned,
            }
        })
        .collect();
    let ports: Vec<_> = containers.iter().flat_map(|c| c.ports.clone()).collect();
    Service {
        id: rec.id.clone(),
        name: rec.name.clone(),
        node_id: rec.node_id.clone(),
        owner: rec.owner.clone(),
        module: rec.module.clone(),
        state,
        host_port: host_port_string(&ports),
        ports,
        containers,
        networks,
        created_at: rec.created_at,
        expires_at: None,
        renewals: 0,
        flags: None,
    }
}

/// Settles services a crash interrupted mid-launch on this node (called when its inventory is
/// reconciled): what they made is removed, like a failed launch. A launch this process is
/// still running is left alone (it settles its own rows).
pub async fn reconcile_node(st: &Arc<AppState>, node_id: &str) {
    let recs = match st.store.list_services(None, None, Some(node_id)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(node = %node_id, error = %e, "reconcile: cannot read services");
            return;
        }
    };
    for rec in recs {
        if rec.state != SERVICE_LAUNCHING || st.is_in_flight(&rec.id) {
            continue;
        }
        // Read again now that it is known not to be in flight: a launch that finished since
        // the list was read has settled its own rows (it updates them before it ends).
        match st.store.get_service(&rec.id).optional() {
            Ok(Some(now)) if now.id == rec.id && now.state == SERVICE_LAUNCHING => {}
            _ => continue,
        }
        let mut made = Made::default();
        let ids: Vec<String> = rec
            .members
            .containers
            .iter()
            .map(|m| m.container_id.clone())
            .collect();
        for id in &ids {
            if let Ok(Some(c)) = st.store.get_container(id).optional() {
                made.containers.push((c.id.clone(), c.docker_id.clone()));
                st.placement.release(&c.id);
            }
        }
        undo(st, &rec, &ids, &made).await;
        tracing::info!(service = %rec.id, node = %node_id, "dropped a service launch a crash interrupted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        Service {
            id: "s1".into(),
            name: "chal".into(),
            node_id: "n1".into(),
            owner: Some("t1".into()),
            module: Some("web".into()),
            state: ServiceState::Running,
            containers: Vec::new(),
            networks: Vec::new(),
            ports: Vec::new(),
            host_port: String::new(),
            created_at: 1,
            expires_at: None,
            renewals: 0,
            flags: None,
        }
    }

    #[test]
    fn flags_are_shown_to_admins_only_and_lifetimes_to_all() {
        let rec = InstanceRecord {
            id: "s1".into(),
            kind: KIND_SERVICE.into(),
            expires_at: Some(100),
            renewals: 2,
            flags: vec![InstanceFlag {
                target: "web/env:FLAG".into(),
                value: "flag{x}".into(),
            }],
            ..Default::default()
        };
        let mut s = service();
        decorate_with(&mut s, Some(&rec), Caller::Other);
        assert_eq!((s.expires_at, s.renewals), (Some(100), 2));
        assert_eq!(s.flags, None);
        assert!(!serde_json::to_string(&s).unwrap().contains("flag{x}"));
        decorate_with(&mut s, Some(&rec), Caller::Admin);
        assert_eq!(s.flags, Some(rec.flags.clone()));
        decorate_with(&mut s, None, Caller::Admin);
        assert_eq!((s.expires_at, s.flags), (None, None));
    }
}
