//! [`Runtime`] kept in memory, for benchmarks that simulate many nodes and for tests of the
//! control plane without Docker.
//!
//! It follows the Docker runtime's semantics and errors (the conformance suite runs both):
//! missing image → `NotFound`, name taken → `Conflict`, overlapping subnet → `SubnetOverlap`,
//! removing a running container without force → `Conflict`, and so on. Published ports are
//! handed out from 40000 up, container addresses from their network's subnet.
//!
//! No process runs. Commands are *simulated*, enough for tests: `echo`, `true`, `false`,
//! `sleep N` (really waits, so exec timeouts behave) and `sh -c` scripts of those joined by `;`,
//! `&&`, `||` with `>&2` redirection and `exit N`. A container whose command finishes at once
//! (`echo hello`) exits with its output in its logs; any other command keeps it running. Other
//! exec'd commands succeed with no output.
//!
//! It is cheap: one mutex per runtime, no task or timer per container, so a benchmark can hold
//! 100,000 containers across 1,000 runtimes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use ipnet::Ipv4Net;
use kisara_api::agent::{
    ContainerConfig, InventoryContainer, InventoryNetwork, LogChunk, NetworkConfig, PublishedPort,
};
use kisara_api::{EngineInfo, ExecRequest, ExecResult, ImageSummary, NodeStatus, PullProgress};
use tokio::sync::watch;

use crate::docker::{exec_timeout_secs, with_default_tag};
use crate::{LabelFilter, Result, Runtime, RuntimeError};

/// First fake host port handed out; ports wrap back here after 65535.
pub const FIRST_HOST_PORT: u16 = 40000;
/// Subnet of the predefined `bridge` network, as on a default Docker install.
pub const DEFAULT_BRIDGE_SUBNET: &str = "172.17.0.0/16";

/// An in-memory container engine.
pub struct HollowRuntime {
    hostname: String,
    cpus: u32,
    memory_total: u64,
    disk_total: u64,
    /// Shared with streams (pulls, followed logs) that outlive a call.
    state: Arc<Mutex<State>>,
    /// `die` events, for [`Runtime::events`] subscribers.
    events: tokio::sync::broadcast::Sender<crate::RuntimeEvent>,
    /// How long a status query takes (a busy engine, for tests); 0 = at once.
    status_delay_ms: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for HollowRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HollowRuntime")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

impl Default for HollowRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl HollowRuntime {
    /// An empty engine (no images; networks `bridge`, `host`, `none`), 4 CPUs, 8 GiB.
    pub fn new() -> Self {
        let mut state = State {
            containers: HashMap::new(),
            names: HashMap::new(),
            images: Vec::new(),
            networks: HashMap::new(),
            ports_in_use: HashSet::new(),
            next_port: FIRST_HOST_PORT,
        };
        for (name, subnet) in [
            ("bridge", Some(DEFAULT_BRIDGE_SUBNET)),
            ("host", None),
            ("none", None),
        ] {
            let net = subnet.and_then(|s| s.parse::<Ipv4Net>().ok());
            let id = new_id();
            state
                .networks
                .insert(id.clone(), Network::new(id, name, net, None, false, true));
        }
        HollowRuntime {
            hostname: "hollow".to_string(),
            cpus: 4,
            memory_total: 8 << 30,
            disk_total: 100 << 30,
            state: Arc::new(Mutex::new(state)),
            events: tokio::sync::broadcast::channel(1024).0,
            status_delay_ms: Default::default(),
        }
    }

    /// Makes every status query from now on take `delay` (a busy engine; for tests).
    pub fn set_status_delay(&self, delay: std::time::Duration) {
        self.status_delay_ms.store(
            u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Adds images (references like `kisara-test/busybox:latest`) as if they had been pulled.
    pub fn with_images(self, references: &[&str]) -> Self {
        {
            let mut st = lock(&self.state);
            for r in references {
                st.add_image(r);
            }
        }
        self
    }

    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = hostname.into();
        self
    }

    /// CPUs and memory (bytes) the engine reports.
    pub fn with_resources(mut self, cpus: u32, memory_total: u64) -> Self {
        self.cpus = cpus;
        self.memory_total = memory_total;
        self
    }

    /// Number of containers held (any state); for benchmarks.
    pub fn container_count(&self) -> usize {
        lock(&self.state).containers.len()
    }
}

/// Locks the state; a poisoned lock is taken over, since every mutation below leaves the state
/// consistent before anything that could panic.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct State {
    /// By docker id.
    containers: HashMap<String, Container>,
    /// Name → docker id.
    names: HashMap<String, String>,
    images: Vec<Image>,
    /// By docker id.
    networks: HashMap<String, Network>,
    ports_in_use: HashSet<u16>,
    next_port: u16,
}

struct Container {
    inv: InventoryContainer,
    /// Network id while running on a network with addresses, and the address offset held.
    lease: Option<(String, u32)>,
    memory: u64,
    logs: Vec<LogChunk>,
    /// Created on the first followed `logs` call; dropped (ending the followers) on stop/remove.
    stopped_tx: Option<watch::Sender<()>>,
}

struct Image {
    id: String,
    tags: Vec<String>,
    created: i64,
}

struct Network {
    inv: InventoryNetwork,
    net: Option<Ipv4Net>,
    /// Host offsets within the subnet that are taken (the gateway's included).
    used: HashSet<u32>,
    cursor: u32,
    predefined: bool,
}

impl Network {
    fn new(
        id: String,
        name: &str,
        net: Option<Ipv4Net>,
        gateway: Option<Ipv4Addr>,
        internal: bool,
        predefined: bool,
    ) -> Self {
        let mut used = HashSet::new();
        if let Some(net) = net {
            // As Docker does: the gateway is the given address, else the first host.
            let gw = gateway.map_or(1, |g| u32::from(g).wrapping_sub(u32::from(net.network())));
            used.insert(gw);
        }
        Network {
            inv: InventoryNetwork {
                docker_id: id,
                name: name.to_string(),
                subnets: net.map(|n| vec![n.to_string()]).unwrap_or_default(),
                internal,
                labels: BTreeMap::new(),
            },
            net,
            used,
            cursor: 1,
            predefined,
        }
    }

    /// Takes the next free address offset (not the network or broadcast address).
    fn allocate(&mut self) -> Option<u32> {
        let net = self.net?;
        let size = 1u64 << (32 - u32::from(net.prefix_len()));
        if size < 4 {
            return None;
        }
        let hosts = (size - 2) as u32; // offsets 1..=hosts
        for _ in 0..hosts {
            self.cursor = if self.cursor >= hosts {
                1
            } else {
                self.cursor + 1
            };
            if self.used.insert(self.cursor) {
                return Some(self.cursor);
            }
        }
        None
    }

    fn address(&self, offset: u32) -> Option<String> {
        let base = u32::from(self.net?.network());
        Some(Ipv4Addr::from(base.wrapping_add(offset)).to_string())
    }
}

impl State {
    fn add_image(&mut self, reference: &str) -> bool {
        let tag = normalize_ref(reference);
        if self.images.iter().any(|i| i.tags.contains(&tag)) {
            return false;
        }
        // Content-addressed like a real engine's: the same image has the same id on every
        // node (the server shares one image set among nodes that report the same images).
        self.images.push(Image {
            id: image_id(&tag),
            tags: vec![tag],
            created: now(),
        });
        true
    }

    fn find_image(&self, reference: &str) -> Option<usize> {
        let tag = normalize_ref(reference);
        self.images.iter().position(|i| {
            i.tags.contains(&tag)
                || i.id == reference
                || (reference.len() >= 4
                    && i.id
                        .strip_prefix("sha256:")
                        .is_some_and(|hex| hex.starts_with(reference)))
        })
    }

    /// Docker resolves a container by id, by name, or by a unique id prefix.
    fn resolve_container(&self, key: &str) -> Result<String> {
        if self.containers.contains_key(key) {
            return Ok(key.to_string());
        }
        if let Some(id) = self.names.get(key.trim_start_matches('/')) {
            return Ok(id.clone());
        }
        let mut found = self.containers.keys().filter(|id| id.starts_with(key));
        match (key.is_empty(), found.next(), found.next()) {
            (false, Some(id), None) => Ok(id.clone()),
            _ => Err(RuntimeError::NotFound(format!(
                "container {key}: No such container: {key}"
            ))),
        }
    }

    fn resolve_network(&self, key: &str) -> Result<String> {
        if self.networks.contains_key(key) {
            return Ok(key.to_string());
        }
        if let Some(n) = self.networks.values().find(|n| n.inv.name == key) {
            return Ok(n.inv.docker_id.clone());
        }
        let mut found = self.networks.keys().filter(|id| id.starts_with(key));
        match (key.is_empty(), found.next(), found.next()) {
            (false, Some(id), None) => Ok(id.clone()),
            _ => Err(RuntimeError::NotFound(format!(
                "network {key}: network {key} not found"
            ))),
        }
    }

    fn allocate_port(&mut self) -> Result<u16> {
        let span = u32::from(u16::MAX - FIRST_HOST_PORT) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port == u16::MAX {
                FIRST_HOST_PORT
            } else {
                port + 1
            };
            if self.ports_in_use.insert(port) {
                return Ok(port);
            }
        }
        Err(RuntimeError::Engine("no free host port left".to_string()))
    }

    /// Gives back a stopped container's address and ports, as Docker does on stop.
    fn release(&mut self, id: &str) {
        let Some(c) = self.containers.get_mut(id) else {
            return;
        };
        for p in c.inv.published.drain(..) {
            self.ports_in_use.remove(&p.host_port);
        }
        c.inv.ip_address = None;
        if let Some((net_id, offset)) = c.lease.take() {
            if let Some(net) = self.networks.get_mut(&net_id) {
                net.used.remove(&offset);
            }
        }
        // Dropping the sender ends every follower of this container's logs.
        c.stopped_tx = None;
    }
}

#[async_trait]
impl Runtime for HollowRuntime {
    async fn info(&self) -> Result<EngineInfo> {
        Ok(EngineInfo {
            hostname: self.hostname.clone(),
            engine_version: "hollow".to_string(),
            api_version: "1.41".to_string(),
            os: "linux".to_string(),
            arch: "amd64".to_string(),
            cpus: self.cpus,
            memory_total: self.memory_total,
        })
    }

    async fn status(&self, filter: &LabelFilter) -> Result<NodeStatus> {
        let delay = self
            .status_delay_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let st = lock(&self.state);
        let mut status = NodeStatus {
            cpus: self.cpus,
            cpu_percent: 0.0,
            memory_total: self.memory_total,
            memory_used: 0,
            disk_total: self.disk_total,
            disk_free: self.disk_total / 5 * 4,
            containers: 0,
            containers_running: 0,
            stale: false,
        };
        for c in st.containers.values() {
            let running = c.inv.state == "running";
            if running {
                status.memory_used = status.memory_used.saturating_add(c.memory);
            }
            if matches_labels(&c.inv.labels, filter) {
                status.containers += 1;
                status.containers_running += u32::from(running);
            }
        }
        status.memory_used = status.memory_used.min(self.memory_total);
        Ok(status)
    }

    async fn launch(&self, config: &ContainerConfig) -> Result<InventoryContainer> {
        let mut st = lock(&self.state);
        if st.find_image(&config.image).is_none() {
            return Err(RuntimeError::NotFound(format!(
                "image {} is not on this node (No such image: {})",
                config.image,
                normalize_ref(&config.image)
            )));
        }
        if !config.name.is_empty() {
            if !valid_name(&config.name) {
                return Err(RuntimeError::BadRequest(format!(
                    "container {}: Invalid container name ({}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed",
                    config.name, config.name
                )));
            }
            if let Some(other) = st.names.get(&config.name) {
                return Err(RuntimeError::Conflict(format!(
                    "container {}: Conflict. The container name \"/{}\" is already in use by container \"{other}\"",
                    config.name, config.name
                )));
            }
        }
        let network_key = config.network.as_deref().unwrap_or("bridge");
        let net_id = st.resolve_network(network_key)?;
        for extra in &config.extra_networks {
            st.resolve_network(&extra.network)?;
        }
        let id = new_id();
        let name = if config.name.is_empty() {
            format!("hollow_{}", &id[..12])
        } else {
            config.name.clone()
        };

        let mut argv: Vec<String> = config.entrypoint.clone().unwrap_or_default();
        argv.extend(config.cmd.clone().unwrap_or_default());
        let outcome = simulate(&argv);
        // A command that ends at once leaves an exited container with its output in the logs.
        let finished = !outcome.unknown && outcome.sleep.is_zero();

        let mut inv = InventoryContainer {
            docker_id: id.clone(),
            name: name.clone(),
            image: config.image.clone(),
            labels: config.labels.clone(),
            state: "running".to_string(),
            status: "Up Less than a second".to_string(),
            network: None,
            ip_address: None,
            published: Vec::new(),
            created: now(),
            // A hollow healthcheck passes at once.
            health: config.healthcheck.as_ref().map(|_| "healthy".to_string()),
        };
        let mut lease = None;
        // What the simulated command printed before it ended or settled into running.
        let logs = output_chunks(&outcome.stdout, &outcome.stderr);
        if finished {
            inv.state = "exited".to_string();
            inv.status = format!("Exited ({}) Less than a second ago", outcome.code);
        }
        let network = st
            .networks
            .get_mut(&net_id)
            .ok_or_else(|| RuntimeError::Engine("network vanished".into()))?;
        inv.network = Some(network.inv.name.clone());
        if !finished && network.net.is_some() {
            let offset = network.allocate().ok_or_else(|| {
                RuntimeError::Engine(format!(
                    "no available IPv4 addresses on network {}",
                    network.inv.name
                ))
            })?;
            inv.ip_address = network.address(offset);
            lease = Some((net_id.clone(), offset));
            // Ports are published only on a network with addresses (not host or none).
            for spec in &config.ports {
                let wanted = config.host_ports.get(&spec.to_string()).copied();
                let got = match wanted {
                    // A leased port: taken only if free, as the engine would.
                    Some(p) if st.ports_in_use.insert(p) => Ok(p),
                    Some(p) => Err(RuntimeError::Engine(format!(
                        "Bind for 0.0.0.0:{p} failed: port is already allocated"
                    ))),
                    None => st.allocate_port(),
                };
                match got {
                    Ok(host_port) => inv.published.push(PublishedPort {
                        port: *spec,
                        host_ip: config.publish_host_ip.clone(),
                        host_port,
                    }),
                    Err(e) => {
                        // Undo what this launch took, as the Docker runtime removes its
                        // half-made container.
                        for p in &inv.published {
                            st.ports_in_use.remove(&p.host_port);
                        }
                        if let Some(n) = st.networks.get_mut(&net_id) {
                            n.used.remove(&offset);
                        }
                        return Err(e);
                    }
                }
            }
        }
        st.names.insert(name, id.clone());
        st.containers.insert(
            id,
            Container {
                inv: inv.clone(),
                lease,
                memory: config
                    .memory_bytes
                    .and_then(|m| u64::try_from(m).ok())
                    .unwrap_or(0),
                logs,
                stopped_tx: None,
            },
        );
        drop(st);
        if finished {
            self.died(&inv, outcome.code);
        }
        Ok(inv)
    }

    async fn inspect(&self, docker_id: &str) -> Result<InventoryContainer> {
        let st = lock(&self.state);
        let id = st.resolve_container(docker_id)?;
        st.containers
            .get(&id)
            .map(|c| c.inv.clone())
            .ok_or_else(|| RuntimeError::NotFound(format!("container {docker_id}")))
    }

    async fn stop(&self, docker_id: &str, _timeout: Duration) -> Result<()> {
        let mut st = lock(&self.state);
        let id = st.resolve_container(docker_id)?;
        let Some(c) = st.containers.get_mut(&id) else {
            return Err(RuntimeError::NotFound(format!("container {docker_id}")));
        };
        if c.inv.state != "running" {
            return Ok(());
        }
        // What SIGTERM through the init process gives.
        c.inv.state = "exited".to_string();
        c.inv.status = "Exited (143) Less than a second ago".to_string();
        let inv = c.inv.clone();
        st.release(&id);
        drop(st);
        self.died(&inv, 143);
        Ok(())
    }

    async fn remove(&self, docker_id: &str, force: bool) -> Result<()> {
        let mut st = lock(&self.state);
        let id = st.resolve_container(docker_id)?;
        let running = st
            .containers
            .get(&id)
            .is_some_and(|c| c.inv.state == "running");
        if running && !force {
            return Err(RuntimeError::Conflict(format!(
                "container {docker_id}: You cannot remove a running container {id}. Stop the container before attempting removal or force remove"
            )));
        }
        st.release(&id);
        if let Some(c) = st.containers.remove(&id) {
            st.names.remove(&c.inv.name);
            drop(st);
            if running {
                // What SIGKILL gives.
                self.died(&c.inv, 137);
            }
        }
        Ok(())
    }

    async fn list_containers(&self, filter: &LabelFilter) -> Result<Vec<InventoryContainer>> {
        let st = lock(&self.state);
        let mut out: Vec<InventoryContainer> = st
            .containers
            .values()
            .filter(|c| matches_labels(&c.inv.labels, filter))
            .map(|c| c.inv.clone())
            .collect();
        // Docker lists newest first.
        out.sort_by(|a, b| {
            b.created
                .cmp(&a.created)
                .then_with(|| a.docker_id.cmp(&b.docker_id))
        });
        Ok(out)
    }

    async fn exec(&self, docker_id: &str, request: &ExecRequest) -> Result<ExecResult> {
        {
            let st = lock(&self.state);
            let id = st.resolve_container(docker_id)?;
            let running = st
                .containers
                .get(&id)
                .is_some_and(|c| c.inv.state == "running");
            if !running {
                return Err(RuntimeError::Conflict(format!(
                    "container {docker_id}: Container {id} is not running"
                )));
            }
        }
        if request.cmd.is_empty() {
            return Err(RuntimeError::BadRequest(format!(
                "exec in {docker_id}: No exec command specified"
            )));
        }
        let timeout = Duration::from_secs(exec_timeout_secs(request.timeout_secs));
        let outcome = simulate(&request.cmd);
        if outcome.sleep >= timeout {
            tokio::time::sleep(timeout).await;
            return Ok(ExecResult {
                stdout: String::new(),
                stderr: String::new(),
                exit_code: None,
                timed_out: true,
            });
        }
        if !outcome.sleep.is_zero() {
            tokio::time::sleep(outcome.sleep).await;
        }
        Ok(ExecResult {
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            exit_code: Some(outcome.code),
            timed_out: false,
        })
    }

    fn logs(
        &self,
        docker_id: &str,
        tail: Option<u64>,
        follow: bool,
    ) -> BoxStream<'static, Result<LogChunk>> {
        let mut st = lock(&self.state);
        let id = match st.resolve_container(docker_id) {
            Ok(id) => id,
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        let Some(c) = st.containers.get_mut(&id) else {
            return stream::empty().boxed();
        };
        // The hollow logs are one chunk per line, so `tail` counts chunks.
        let skip = tail.map_or(0, |t| {
            c.logs
                .len()
                .saturating_sub(usize::try_from(t).unwrap_or(usize::MAX))
        });
        let chunks: Vec<Result<LogChunk>> = c.logs[skip..].iter().cloned().map(Ok).collect();
        let history = stream::iter(chunks);
        if !follow || c.inv.state != "running" {
            return history.boxed();
        }
        // Following a running container: the stream stays open until it stops or goes.
        let mut rx = c
            .stopped_tx
            .get_or_insert_with(|| watch::channel(()).0)
            .subscribe();
        let until_stopped = stream::once(async move {
            // Only the sender's drop is ever signalled.
            while rx.changed().await.is_ok() {}
        })
        .filter_map(|()| futures::future::ready(None));
        history.chain(until_stopped).boxed()
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let st = lock(&self.state);
        Ok(st
            .images
            .iter()
            .map(|i| ImageSummary {
                id: i.id.clone(),
                tags: i.tags.clone(),
                size: 2 << 20,
                created: i.created,
                node_id: String::new(),
            })
            .collect())
    }

    fn pull_image(&self, reference: &str) -> BoxStream<'static, Result<PullProgress>> {
        let reference = with_default_tag(reference);
        let state = Arc::clone(&self.state);
        // The image appears when the stream is polled, as a real pull happens while read.
        stream::once(async move {
            if reference.is_empty() || reference.starts_with(':') || reference.contains(' ') {
                return vec![Err(RuntimeError::BadRequest(format!(
                    "image {reference}: invalid reference format"
                )))];
            }
            let added = lock(&state).add_image(&reference);
            let line = |status: String, layer: Option<&str>| {
                Ok(PullProgress {
                    status,
                    layer: layer.map(str::to_string),
                    ..Default::default()
                })
            };
            let tag = reference.rsplit(':').next().unwrap_or("latest");
            if added {
                vec![
                    line("Pulling from hollow".to_string(), Some(tag)),
                    line(
                        format!("Status: Downloaded newer image for {reference}"),
                        None,
                    ),
                ]
            } else {
                vec![line(
                    format!("Status: Image is up to date for {reference}"),
                    None,
                )]
            }
        })
        .flat_map(stream::iter)
        .boxed()
    }

    async fn remove_image(&self, reference: &str, force: bool) -> Result<()> {
        let mut st = lock(&self.state);
        let Some(idx) = st.find_image(reference) else {
            return Err(RuntimeError::NotFound(format!(
                "image {reference}: No such image: {reference}"
            )));
        };
        let tag = normalize_ref(reference);
        // Several tags and one named: only untag, as Docker does.
        if st.images[idx].tags.len() > 1 && st.images[idx].tags.contains(&tag) {
            st.images[idx].tags.retain(|t| *t != tag);
            return Ok(());
        }
        let image = &st.images[idx];
        let users: Vec<&Container> = st
            .containers
            .values()
            .filter(|c| {
                let r = normalize_ref(&c.inv.image);
                image.tags.contains(&r) || c.inv.image == image.id
            })
            .collect();
        if let Some(c) = users.iter().find(|c| c.inv.state == "running") {
            return Err(RuntimeError::Conflict(format!(
                "image {reference}: image is being used by running container {}",
                c.inv.docker_id
            )));
        }
        if let (Some(c), false) = (users.first(), force) {
            return Err(RuntimeError::Conflict(format!(
                "image {reference}: image is being used by stopped container {}",
                c.inv.docker_id
            )));
        }
        st.images.remove(idx);
        Ok(())
    }

    async fn create_network(&self, config: &NetworkConfig) -> Result<String> {
        let mut st = lock(&self.state);
        if config.name.is_empty() {
            return Err(RuntimeError::BadRequest(
                "network name is empty".to_string(),
            ));
        }
        if st.networks.values().any(|n| n.inv.name == config.name) {
            return Err(RuntimeError::Conflict(format!(
                "network {} already exists",
                config.name
            )));
        }
        let net: Ipv4Net = config.subnet.parse().map_err(|_| {
            RuntimeError::BadRequest(format!(
                "network {}: invalid subnet {}",
                config.name, config.subnet
            ))
        })?;
        let net = net.trunc();
        let gateway = match &config.gateway {
            Some(g) => {
                let ip: Ipv4Addr = g.parse().map_err(|_| {
                    RuntimeError::BadRequest(format!(
                        "network {}: invalid gateway {g}",
                        config.name
                    ))
                })?;
                if !net.contains(&ip) {
                    return Err(RuntimeError::BadRequest(format!(
                        "network {}: gateway {g} is not in subnet {net}",
                        config.name
                    )));
                }
                Some(ip)
            }
            None => None,
        };
        let overlaps = st
            .networks
            .values()
            .filter_map(|n| n.net)
            .any(|other| other.contains(&net.network()) || net.contains(&other.network()));
        if overlaps {
            return Err(RuntimeError::SubnetOverlap(config.subnet.clone()));
        }
        let id = new_id();
        let mut network = Network::new(
            id.clone(),
            &config.name,
            Some(net),
            gateway,
            config.internal,
            false,
        );
        network.inv.labels = config.labels.clone();
        st.networks.insert(id.clone(), network);
        Ok(id)
    }

    async fn remove_network(&self, docker_id: &str) -> Result<()> {
        let mut st = lock(&self.state);
        let id = st.resolve_network(docker_id)?;
        let Some(net) = st.networks.get(&id) else {
            return Err(RuntimeError::NotFound(format!("network {docker_id}")));
        };
        if net.predefined {
            return Err(RuntimeError::BadRequest(format!(
                "network {docker_id}: {} is a pre-defined network and cannot be removed",
                net.inv.name
            )));
        }
        // Only running containers hold an endpoint, as in Docker.
        if st
            .containers
            .values()
            .any(|c| c.lease.as_ref().is_some_and(|(n, _)| *n == id))
        {
            return Err(RuntimeError::Conflict(format!(
                "network {docker_id}: network {} id {id} has active endpoints",
                net.inv.name
            )));
        }
        st.networks.remove(&id);
        Ok(())
    }

    async fn list_networks(&self, filter: &LabelFilter) -> Result<Vec<InventoryNetwork>> {
        let st = lock(&self.state);
        Ok(st
            .networks
            .values()
            .filter(|n| matches_labels(&n.inv.labels, filter))
            .map(|n| n.inv.clone())
            .collect())
    }

    async fn used_subnets(&self) -> Result<Vec<String>> {
        let st = lock(&self.state);
        let mut out: Vec<String> = st
            .networks
            .values()
            .filter_map(|n| n.net.map(|n| n.to_string()))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn load_images(&self, tar: BoxStream<'static, Result<Bytes>>) -> Result<Vec<String>> {
        // Nothing is unpacked: the archive is read through (so the sender sees it consumed) and
        // only the references in its `manifest.json` are recorded.
        let reader = tokio_util::io::StreamReader::new(
            tar.map(|r| r.map_err(|e| std::io::Error::other(e.to_string()))),
        );
        let bridge = tokio_util::io::SyncIoBridge::new(reader);
        let refs = tokio::task::spawn_blocking(move || manifest_tags(bridge))
            .await
            .map_err(|e| RuntimeError::Engine(format!("image load: {e}")))??;
        if refs.is_empty() {
            return Err(RuntimeError::BadRequest(
                "image load: the archive has no manifest.json naming an image".into(),
            ));
        }
        let mut st = lock(&self.state);
        for r in &refs {
            st.add_image(r);
        }
        Ok(refs)
    }

    fn export_images(&self, refs: &[String]) -> BoxStream<'static, Result<Bytes>> {
        let st = lock(&self.state);
        let mut found = Vec::new();
        for r in refs {
            match st.find_image(r) {
                Some(i) => found.push((normalize_ref(r), st.images[i].id.clone())),
                None => {
                    return stream::once(futures::future::ready(Err(RuntimeError::NotFound(
                        format!("image {r}: No such image: {r}"),
                    ))))
                    .boxed()
                }
            }
        }
        drop(st);
        stream::once(futures::future::ready(
            hollow_save_tar(&found).map(Bytes::from),
        ))
        .boxed()
    }

    fn events(
        &self,
        filter: &LabelFilter,
        _since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<crate::RuntimeEvent>> {
        // No history is kept: a subscriber sees what happens from now on.
        let rx = self.events.subscribe();
        let filter = filter.clone();
        stream::unfold((rx, filter), |(mut rx, filter)| async move {
            loop {
                match rx.recv().await {
                    Ok(e) if matches_labels(&e.labels, &filter) => {
                        return Some((Ok(e), (rx, filter)))
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

impl HollowRuntime {
    /// Tells event subscribers that a container's main process ended.
    fn died(&self, inv: &InventoryContainer, exit_code: i64) {
        let time_nano = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let _ = self.events.send(crate::RuntimeEvent {
            docker_id: inv.docker_id.clone(),
            action: kisara_api::agent::ACTION_DIE.to_string(),
            exit_code: Some(exit_code),
            time_nano,
            labels: inv.labels.clone(),
        });
    }
}

/// The `RepoTags` of a `docker save` archive's `manifest.json`; every other entry is skipped.
fn manifest_tags(reader: impl std::io::Read) -> Result<Vec<String>> {
    let bad = |e: std::io::Error| RuntimeError::BadRequest(format!("image load: {e}"));
    let mut archive = tar::Archive::new(reader);
    let mut tags = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let is_manifest = entry
            .path()
            .map(|p| p.as_os_str() == "manifest.json")
            .unwrap_or(false);
        if !is_manifest {
            continue;
        }
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut text).map_err(bad)?;
        let items: Vec<serde_json::Value> = serde_json::from_slice(&text)
            .map_err(|e| RuntimeError::BadRequest(format!("image load: manifest.json: {e}")))?;
        for item in items {
            if let Some(ts) = item.get("RepoTags").and_then(|t| t.as_array()) {
                tags.extend(ts.iter().filter_map(|t| t.as_str()).map(str::to_string));
            }
        }
    }
    Ok(tags)
}

/// A minimal `docker save` archive (manifest and empty configs, no layers) for hollow images.
fn hollow_save_tar(images: &[(String, String)]) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| RuntimeError::Engine(format!("image export: {e}"));
    let mut builder = tar::Builder::new(Vec::new());
    let mut manifest = Vec::new();
    let add = |builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, path, data).map_err(io)
    };
    for (tag, id) in images {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        let config = format!("{hex}.json");
        add(
            &mut builder,
            &config,
            br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )?;
        manifest.push(serde_json::json!({"Config": config, "RepoTags": [tag], "Layers": []}));
    }
    let text = serde_json::to_vec(&manifest).unwrap_or_default();
    add(&mut builder, "manifest.json", &text)?;
    builder.into_inner().map_err(io)
}

fn matches_labels(labels: &BTreeMap<String, String>, filter: &LabelFilter) -> bool {
    filter
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

/// Docker's rule for container names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() >= 2
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// `docker.io/library/busybox` → `busybox:latest`, the form the engine lists tags in.
fn normalize_ref(reference: &str) -> String {
    let r = reference
        .strip_prefix("docker.io/library/")
        .or_else(|| reference.strip_prefix("index.docker.io/library/"))
        .or_else(|| reference.strip_prefix("docker.io/"))
        .unwrap_or(reference);
    with_default_tag(r)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A stable image id for a reference: `sha256:` and the hex SHA-256 of the reference.
fn image_id(reference: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(reference.as_bytes()))
    )
}

/// A 64-hex-digit id, unique within the process (a counter through a bijective mix, salted so
/// that two processes do not produce the same ids).
fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    static SALT: OnceLock<u64> = OnceLock::new();
    let salt = *SALT.get_or_init(|| RandomState::new().hash_one(std::process::id()));
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:016x}{:016x}{:016x}{:016x}",
        mix(n ^ salt),
        mix(n),
        mix(salt.wrapping_add(n)),
        mix(!n)
    )
}

/// splitmix64's finalizer: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn output_chunks(stdout: &str, stderr: &str) -> Vec<LogChunk> {
    let lines = |stream: &str, text: &str| -> Vec<LogChunk> {
        text.split_inclusive('\n')
            .map(|l| LogChunk {
                stream: stream.to_string(),
                data: l.to_string(),
            })
            .collect()
    };
    let mut out = lines("stdout", stdout);
    out.extend(lines("stderr", stderr));
    out
}

/// What a simulated command does: it ends (after `sleep`) with this output and code. `unknown`
/// is set when it ran a command the simulator does not know; at launch that is taken for a
/// long-running server.
#[derive(Debug, PartialEq)]
struct Outcome {
    stdout: String,
    stderr: String,
    code: i64,
    sleep: Duration,
    unknown: bool,
}

#[derive(Debug, PartialEq)]
enum Token {
    Word(String),
    /// `;`, newline, `&&` or `||`.
    Op(&'static str),
}

/// Splits a shell script into words and operators, with '...' and "..." quoting.
fn tokenize(script: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let flush = |out: &mut Vec<Token>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            out.push(Token::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    word.push(q);
                }
            }
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                word.push(e);
                            }
                        }
                        _ => word.push(q),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(e) = chars.next() {
                    word.push(e);
                }
            }
            ';' | '\n' => {
                flush(&mut out, &mut word, &mut in_word);
                out.push(Token::Op(";"));
            }
            '&' if chars.peek() == Some(&'&') => {
                chars.next();
                flush(&mut out, &mut word, &mut in_word);
                out.push(Token::Op("&&"));
            }
            '|' if chars.peek() == Some(&'|') => {
                chars.next();
                flush(&mut out, &mut word, &mut in_word);
                out.push(Token::Op("||"));
            }
            c if c.is_whitespace() => flush(&mut out, &mut word, &mut in_word),
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    flush(&mut out, &mut word, &mut in_word);
    out
}

#[derive(Default)]
struct Sim {
    stdout: String,
    stderr: String,
    sleep: Duration,
    unknown: bool,
}

/// Runs one simple command; `Some(code)` to go on, or the exit code of an `exit`.
fn run_simple(words: &[String], sim: &mut Sim) -> (i64, bool) {
    // Redirection of stdout to stderr (`>&2`, `1>&2`) anywhere in the command.
    let to_stderr = words.iter().any(|w| w == ">&2" || w == "1>&2");
    let args: Vec<&str> = words
        .iter()
        .map(String::as_str)
        .filter(|w| !matches!(*w, ">&2" | "1>&2" | "2>&1"))
        .collect();
    let Some((cmd, rest)) = args.split_first() else {
        return (0, false);
    };
    let program = cmd.rsplit('/').next().unwrap_or(cmd);
    match program {
        "echo" => {
            let (newline, rest) = match rest.first() {
                Some(&"-n") => (false, &rest[1..]),
                _ => (true, rest),
            };
            let out = if to_stderr {
                &mut sim.stderr
            } else {
                &mut sim.stdout
            };
            out.push_str(&rest.join(" "));
            if newline {
                out.push('\n');
            }
            (0, false)
        }
        "true" | ":" => (0, false),
        "false" => (1, false),
        "exit" => (
            rest.first()
                .and_then(|c| c.parse::<i64>().ok())
                .unwrap_or(0)
                & 0xff,
            true,
        ),
        "sleep" => match rest.first().and_then(|s| s.parse::<f64>().ok()) {
            Some(secs) if secs.is_finite() && secs >= 0.0 => {
                sim.sleep = sim
                    .sleep
                    .saturating_add(Duration::from_secs_f64(secs.min(1e9)));
                (0, false)
            }
            _ => (1, false),
        },
        "sh" | "ash" | "bash" if rest.first() == Some(&"-c") => {
            let code = run_script(rest.get(1).copied().unwrap_or(""), sim);
            (code, false)
        }
        _ => {
            sim.unknown = true;
            (0, false)
        }
    }
}

/// Runs a script of simple commands joined by `;`, `&&`, `||`; returns its exit code.
fn run_script(script: &str, sim: &mut Sim) -> i64 {
    let mut code = 0;
    let mut words: Vec<String> = Vec::new();
    let mut skip = false;
    let mut tokens = tokenize(script);
    tokens.push(Token::Op(";"));
    for token in tokens {
        match token {
            Token::Word(w) => words.push(w),
            Token::Op(op) => {
                if !skip && !words.is_empty() {
                    let (c, exited) = run_simple(&words, sim);
                    code = c;
                    if exited {
                        return code;
                    }
                }
                words.clear();
                skip = match op {
                    "&&" => code != 0,
                    "||" => code == 0,
                    _ => false,
                };
            }
        }
    }
    code
}

fn simulate(argv: &[String]) -> Outcome {
    let mut sim = Sim::default();
    let (code, _) = run_simple(argv, &mut sim);
    if argv.is_empty() {
        // The image's default command: a server, as far as the simulation knows.
        sim.unknown = true;
    }
    Outcome {
        stdout: sim.stdout,
        stderr: sim.stderr,
        code,
        sleep: sim.sleep,
        unknown: sim.unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn exit(stdout: &str, stderr: &str, code: i64) -> Outcome {
        Outcome {
            stdout: stdout.into(),
            stderr: stderr.into(),
            code,
            sleep: Duration::ZERO,
            unknown: false,
        }
    }

    #[test]
    fn simulated_commands() {
        assert_eq!(simulate(&argv(&["echo", "a", "b"])), exit("a b\n", "", 0));
        assert_eq!(simulate(&argv(&["sh", "-c", "exit 7"])), exit("", "", 7));
        assert_eq!(
            simulate(&argv(&["sh", "-c", "echo out; echo err >&2; exit 3"])),
            exit("out\n", "err\n", 3)
        );
        assert_eq!(
            simulate(&argv(&["/bin/sh", "-c", "false && echo no || echo 'y es'"])),
            exit("y es\n", "", 0)
        );
        assert_eq!(
            simulate(&argv(&["sleep", "10"])).sleep,
            Duration::from_secs(10)
        );
        let server = simulate(&argv(&["httpd", "-f", "-p", "80"]));
        assert!(server.unknown && server.code == 0);
        // Odd input never panics.
        for s in [
            "'", "\"", "\\", "&&", "||;;", "exit x", "sleep -1", "echo -n",
        ] {
            let _ = simulate(&argv(&["sh", "-c", s]));
        }
        let _ = simulate(&[]);
    }

    #[test]
    fn names_and_refs() {
        assert!(valid_name("web-1_a.b"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("a"));
        assert!(!valid_name("a b"));
        assert_eq!(normalize_ref("docker.io/library/busybox"), "busybox:latest");
        assert_eq!(
            normalize_ref("kisara-test/busybox"),
            "kisara-test/busybox:latest"
        );
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 64);
    }

    #[test]
    fn addresses_skip_gateway_and_wrap() {
        let net: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let mut n = Network::new("x".into(), "x", Some(net), None, false, false);
        // /30: hosts .1 (gateway) and .2.
        assert_eq!(n.allocate(), Some(2));
        assert_eq!(n.allocate(), None);
        n.used.remove(&2);
        let again = n.allocate().unwrap();
        assert_eq!(n.address(again).as_deref(), Some("10.0.0.2"));
    }
}
