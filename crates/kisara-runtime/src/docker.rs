//! [`Runtime`] over a real Docker Engine, through bollard.
//!
//! bollard's types stay inside this module: everything crossing the trait is a Kisara type.
//! Engine answers are treated as untrusted input: every field is optional here, and a missing or
//! odd field degrades to an empty value instead of a panic.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error as BollardError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, EndpointSettings,
    HealthConfig, HostConfig, Ipam, IpamConfig, NetworkConnectRequest, NetworkCreateRequest,
    NetworkingConfig, PortBinding, PortMap, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, ListImagesOptions, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use kisara_api::agent::{
    ContainerConfig, InventoryContainer, InventoryNetwork, LogChunk, NetworkConfig, PublishedPort,
};
use kisara_api::{
    EngineInfo, ExecRequest, ExecResult, ImageSummary, NodeStatus, PortSpec, Protocol, PullProgress,
};

use crate::{LabelFilter, Result, Runtime, RuntimeError};

/// Default and ceiling of an exec's timeout, in seconds (see [`ExecRequest::timeout_secs`]).
pub const EXEC_TIMEOUT_DEFAULT_SECS: u64 = 30;
pub const EXEC_TIMEOUT_MAX_SECS: u64 = 600;
/// Output kept per stream of an exec; the rest is read and dropped so the process never blocks
/// on a full pipe.
pub const EXEC_OUTPUT_CAP: usize = 4 * 1024 * 1024;

/// Time a stop request may take beyond the container's grace period.
const STOP_MARGIN: Duration = Duration::from_secs(30);

/// Docker's option that turns off SNAT for a bridge network (no way out to the internet, while
/// published ports keep working).
const OPT_IP_MASQUERADE: &str = "com.docker.network.bridge.enable_ip_masquerade";
/// Network option naming the Linux bridge (Kisara's isolation rules match its prefix).
const OPT_BRIDGE_NAME: &str = "com.docker.network.bridge.name";

/// A Docker Engine reached over its API.
pub struct DockerRuntime {
    docker: Docker,
    /// Whether the engine runs on this host, so that /proc and statvfs describe its machine.
    local: bool,
    /// Last /proc/stat sample, for CPU use over the interval between two `status` calls.
    cpu_sample: Mutex<Option<CpuSample>>,
}

impl std::fmt::Debug for DockerRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerRuntime")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl DockerRuntime {
    /// Connect as the `docker` CLI would: `DOCKER_HOST` (`unix://` or `tcp://`), else the local
    /// socket. The API version is negotiated down to the engine's (1.41 on the test bed).
    pub async fn connect() -> Result<Self> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_default();
        let docker = Docker::connect_with_defaults().map_err(|e| {
            RuntimeError::Engine(format!("cannot connect to the Docker Engine: {e}"))
        })?;
        Self::finish_connect(docker, is_local_host(&host)).await
    }

    /// Connect to the engine at `host` (`unix:///path/docker.sock`, `tcp://host:port`).
    pub async fn connect_with(host: &str) -> Result<Self> {
        let docker = Docker::connect_with_host(host).map_err(|e| {
            RuntimeError::Engine(format!(
                "cannot connect to the Docker Engine at {host}: {e}"
            ))
        })?;
        Self::finish_connect(docker, is_local_host(host)).await
    }

    async fn finish_connect(docker: Docker, local: bool) -> Result<Self> {
        // Without negotiation bollard speaks its own (newer) API version, which an older engine
        // rejects or misreads.
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| RuntimeError::Engine(format!("Docker Engine unreachable: {e}")))?;
        Ok(DockerRuntime {
            docker,
            local,
            cpu_sample: Mutex::new(None),
        })
    }

    /// The bollard client, for callers inside Kisara that need an engine call the trait lacks
    /// (tests inspect hardening with it).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn inspect_raw(&self, docker_id: &str) -> Result<ContainerInspectResponse> {
        self.docker
            .inspect_container(docker_id, None)
            .await
            .map_err(|e| map_err(e, &format!("container {docker_id}")))
    }

    /// Writes files into a container (created or running) as one tar extracted at `/`, owned
    /// by root with each file's mode. Error messages name paths, never contents.
    pub async fn put_files(
        &self,
        docker_id: &str,
        files: &[kisara_api::agent::ContainerFile],
    ) -> Result<()> {
        let archive = files_tar(files)?;
        let options = bollard::query_parameters::UploadToContainerOptionsBuilder::new()
            .path("/")
            .build();
        self.docker
            .upload_to_container(docker_id, Some(options), bollard::body_full(archive))
            .await
            .map_err(|e| {
                let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
                map_err(e, &format!("files {paths:?} in container {docker_id}"))
            })
    }

    /// Creates the container from `body`, writes its files when `put_files`, joins its extra
    /// networks and starts it; on any error what it made is removed.
    async fn create_and_start(
        &self,
        config: &ContainerConfig,
        body: ContainerCreateBody,
        put_files: bool,
    ) -> Result<InventoryContainer> {
        let mut options = CreateContainerOptionsBuilder::new();
        if !config.name.is_empty() {
            options = options.name(&config.name);
        }
        let created = self
            .docker
            .create_container(Some(options.build()), body)
            .await
            .map_err(|e| create_error(e, &config.image, &format!("container {}", config.name)))?;
        for warning in &created.warnings {
            tracing::debug!(container = %created.id, %warning, "engine warning on create");
        }
        // Files (flags) go in before the first process runs.
        if put_files && !config.files.is_empty() {
            if let Err(e) = self.put_files(&created.id, &config.files).await {
                self.cleanup_container(&created.id).await;
                return Err(e);
            }
        }
        // Engines before API 1.44 attach one network at create; the others join before start,
        // so the container's first process already sees every network.
        for extra in &config.extra_networks {
            let request = NetworkConnectRequest {
                container: created.id.clone(),
                endpoint_config: Some(EndpointSettings {
                    aliases: non_empty(&extra.aliases),
                    ..Default::default()
                }),
            };
            if let Err(e) = self.docker.connect_network(&extra.network, request).await {
                self.cleanup_container(&created.id).await;
                return Err(map_err(e, &format!("network {}", extra.network)));
            }
        }
        match self.start_and_inspect(&created.id).await {
            Ok(container) => Ok(container),
            Err(e) => {
                self.cleanup_container(&created.id).await;
                Err(e)
            }
        }
    }

    /// An image of `config.image` with `config.files` in it (for a read-only root): files go
    /// into a helper container that never runs, which is committed and removed. The image
    /// keeps its base image's configuration; it carries no tag, only the cluster's labels.
    async fn image_with_files(&self, config: &ContainerConfig) -> Result<String> {
        let labels: HashMap<String, String> = config
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() == kisara_api::labels::CLUSTER)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let helper = self
            .docker
            .create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                ContainerCreateBody {
                    image: Some(config.image.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                create_error(
                    e,
                    &config.image,
                    &format!("image {} with flag files", config.image),
                )
            })?;
        let committed = match self.put_files(&helper.id, &config.files).await {
            Ok(()) => self
                .docker
                .commit_container(
                    bollard::query_parameters::CommitContainerOptionsBuilder::new()
                        .container(&helper.id)
                        .pause(false)
                        .build(),
                    bollard::models::ContainerConfig::default(),
                )
                .await
                .map_err(|e| map_err(e, &format!("image {} with flag files", config.image))),
            Err(e) => Err(e),
        };
        self.cleanup_container(&helper.id).await;
        Ok(committed?.id)
    }

    /// Removes an image made by [`Self::image_with_files`]; a failure is only logged (the
    /// image holds no running process, and a later removal of its container retries).
    async fn remove_files_image(&self, image: &str) {
        let opts = RemoveImageOptionsBuilder::new().force(true).build();
        if let Err(e) = self.docker.remove_image(image, Some(opts), None).await {
            tracing::warn!(image = %image, error = %e, "could not remove a container's flag-file image");
        }
    }

    /// Start and inspect a created container; any error is returned for the caller to clean up.
    async fn start_and_inspect(&self, id: &str) -> Result<InventoryContainer> {
        self.docker
            .start_container(id, None)
            .await
            .map_err(|e| map_err(e, &format!("container {id}")))?;
        Ok(container_from_inspect(self.inspect_raw(id).await?))
    }

    /// Remove a half-made container; failure is logged, not returned, since the caller is
    /// already returning the error that caused the cleanup.
    async fn cleanup_container(&self, id: &str) {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        if let Err(e) = self.docker.remove_container(id, Some(opts)).await {
            tracing::warn!(container = id, error = %e, "could not remove a half-launched container");
        }
    }

    async fn run_exec(&self, docker_id: &str, request: &ExecRequest) -> Result<ExecResult> {
        let env: Vec<String> = request
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let options = CreateExecOptions::<String> {
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            cmd: Some(request.cmd.clone()),
            env: (!env.is_empty()).then_some(env),
            user: request.user.clone(),
            working_dir: request.workdir.clone(),
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(docker_id, options)
            .await
            .map_err(|e| map_err(e, &format!("container {docker_id}")))?;
        let started = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| map_err(e, &format!("exec in {docker_id}")))?;
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(item) = output.next().await {
                let item = item.map_err(|e| map_err(e, &format!("exec in {docker_id}")))?;
                let (buf, data) = match item {
                    LogOutput::StdErr { message } => (&mut stderr, message),
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        (&mut stdout, message)
                    }
                    LogOutput::StdIn { .. } => continue,
                };
                let room = EXEC_OUTPUT_CAP.saturating_sub(buf.len());
                buf.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        // The attach stream closes when the process exits, but the engine may record the exit
        // code a moment later: poll briefly (the caller's timeout bounds this too).
        let mut delay = Duration::from_millis(5);
        let exit_code = loop {
            let inspect = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| map_err(e, &format!("exec in {docker_id}")))?;
            if inspect.running != Some(true) {
                break inspect.exit_code;
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        };
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            exit_code,
            timed_out: false,
        })
    }

    async fn list_containers_raw(&self, filter: &LabelFilter) -> Result<Vec<ContainerSummary>> {
        let mut builder = ListContainersOptionsBuilder::new().all(true);
        let filters = label_filters(filter);
        if !filters.is_empty() {
            builder = builder.filters(&filters);
        }
        self.docker
            .list_containers(Some(builder.build()))
            .await
            .map_err(|e| map_err(e, "containers"))
    }

    /// Sample the host's CPU and memory from /proc, when the engine is on this host.
    fn host_usage(&self) -> (f64, u64) {
        if !self.local {
            return (0.0, 0);
        }
        let memory_used = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_meminfo_used(&s))
            .unwrap_or(0);
        let cpu_percent = match std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s))
        {
            Some(now) => {
                let mut last = match self.cpu_sample.lock() {
                    Ok(guard) => guard,
                    // A poisoned lock only means another status call panicked mid-update; the
                    // sample is still a valid pair of numbers.
                    Err(poisoned) => poisoned.into_inner(),
                };
                // The first call has no earlier sample: the average since boot stands in.
                let before = last.unwrap_or_default();
                *last = Some(now);
                now.percent_since(&before)
            }
            None => 0.0,
        };
        (cpu_percent, memory_used)
    }
}

#[async_trait]
impl Runtime for DockerRuntime {
    async fn info(&self) -> Result<EngineInfo> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| map_err(e, "engine info"))?;
        let version = self
            .docker
            .version()
            .await
            .map_err(|e| map_err(e, "engine version"))?;
        Ok(EngineInfo {
            hostname: info.name.unwrap_or_default(),
            engine_version: version.version.or(info.server_version).unwrap_or_default(),
            api_version: version.api_version.unwrap_or_default(),
            // Platform-style names (`linux`, `amd64`), the ones images are built for.
            os: version.os.or(info.os_type).unwrap_or_default(),
            arch: version.arch.or(info.architecture).unwrap_or_default(),
            cpus: info.ncpu.map_or(0, clamp_u32),
            memory_total: info.mem_total.map_or(0, clamp_u64),
        })
    }

    async fn status(&self, filter: &LabelFilter) -> Result<NodeStatus> {
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| map_err(e, "engine info"))?;
        let containers = self.list_containers_raw(filter).await?;
        let running = containers
            .iter()
            .filter(|c| c.state.as_ref().is_some_and(|s| s.to_string() == "running"))
            .count();
        let (cpu_percent, memory_used) = self.host_usage();
        let (disk_total, disk_free) = match (&info.docker_root_dir, self.local) {
            (Some(dir), true) => disk_usage(dir).unwrap_or((0, 0)),
            _ => (0, 0),
        };
        Ok(NodeStatus {
            cpus: info.ncpu.map_or(0, clamp_u32),
            cpu_percent,
            memory_total: info.mem_total.map_or(0, clamp_u64),
            memory_used,
            disk_total,
            disk_free,
            containers: u32::try_from(containers.len()).unwrap_or(u32::MAX),
            containers_running: u32::try_from(running).unwrap_or(u32::MAX),
            stale: false,
        })
    }

    async fn launch(&self, config: &ContainerConfig) -> Result<InventoryContainer> {
        let mut body = create_body(config);
        // The engine refuses to write files into a container whose root is read-only, even
        // before it starts: such a container is made from an image of its own, its base image
        // plus the files, removed with it.
        let files_image = if config.read_only && !config.files.is_empty() {
            let image = self.image_with_files(config).await?;
            body.image = Some(image.clone());
            body.labels
                .get_or_insert_with(HashMap::new)
                .insert(kisara_api::labels::FILES_IMAGE.to_string(), image.clone());
            Some(image)
        } else {
            None
        };
        let created = self
            .create_and_start(config, body, files_image.is_none())
            .await;
        if let (Err(_), Some(image)) = (&created, &files_image) {
            self.remove_files_image(image).await;
        }
        created
    }

    async fn inspect(&self, docker_id: &str) -> Result<InventoryContainer> {
        Ok(container_from_inspect(self.inspect_raw(docker_id).await?))
    }

    async fn stop(&self, docker_id: &str, timeout: Duration) -> Result<()> {
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX);
        // The engine answers only once the container is down, after up to `timeout`: give the
        // request that much beyond the client's usual limit (a clone shares the connection).
        let limit = timeout.saturating_add(STOP_MARGIN);
        let docker = if limit > self.docker.timeout() {
            self.docker.clone().with_timeout(limit)
        } else {
            self.docker.clone()
        };
        // A 304 (already stopped) counts as success in bollard.
        docker
            .stop_container(
                docker_id,
                Some(StopContainerOptionsBuilder::new().t(secs).build()),
            )
            .await
            .map_err(|e| map_err(e, &format!("container {docker_id}")))
    }

    async fn remove(&self, docker_id: &str, force: bool) -> Result<()> {
        // A container made from an image of its own (flag files under a read-only root)
        // takes that image with it.
        let files_image = match self.inspect_raw(docker_id).await {
            Ok(c) => c
                .config
                .and_then(|c| c.labels)
                .and_then(|l| l.get(kisara_api::labels::FILES_IMAGE).cloned()),
            Err(_) => None,
        };
        let opts = RemoveContainerOptionsBuilder::new()
            .force(force)
            .v(true)
            .build();
        self.docker
            .remove_container(docker_id, Some(opts))
            .await
            .map_err(|e| map_err(e, &format!("container {docker_id}")))?;
        if let Some(image) = files_image {
            self.remove_files_image(&image).await;
        }
        Ok(())
    }

    async fn list_containers(&self, filter: &LabelFilter) -> Result<Vec<InventoryContainer>> {
        Ok(self
            .list_containers_raw(filter)
            .await?
            .into_iter()
            .map(container_from_summary)
            .collect())
    }

    async fn exec(&self, docker_id: &str, request: &ExecRequest) -> Result<ExecResult> {
        let secs = exec_timeout_secs(request.timeout_secs);
        match tokio::time::timeout(Duration::from_secs(secs), self.run_exec(docker_id, request))
            .await
        {
            Ok(result) => result,
            // The engine has no call to kill an exec'd process: it runs on in the container
            // until it ends or the container stops. The caller only stops waiting.
            Err(_) => Ok(ExecResult {
                stdout: String::new(),
                stderr: String::new(),
                exit_code: None,
                timed_out: true,
            }),
        }
    }

    fn logs(
        &self,
        docker_id: &str,
        tail: Option<u64>,
        follow: bool,
    ) -> BoxStream<'static, Result<LogChunk>> {
        let tail = tail.map_or_else(|| "all".to_string(), |n| n.to_string());
        let opts = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .follow(follow)
            .timestamps(false)
            .tail(&tail)
            .build();
        let what = format!("container {docker_id}");
        self.docker
            .logs(docker_id, Some(opts))
            .filter_map(move |item| {
                let chunk = match item {
                    Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                        Some(Ok(log_chunk("stdout", &message)))
                    }
                    Ok(LogOutput::StdErr { message }) => Some(Ok(log_chunk("stderr", &message))),
                    Ok(LogOutput::StdIn { .. }) => None,
                    Err(e) => Some(Err(map_err(e, &what))),
                };
                futures::future::ready(chunk)
            })
            .boxed()
    }

    async fn list_images(&self) -> Result<Vec<ImageSummary>> {
        let images = self
            .docker
            .list_images(None::<ListImagesOptions>)
            .await
            .map_err(|e| map_err(e, "images"))?;
        Ok(images
            .into_iter()
            .map(|i| ImageSummary {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                size: i.size,
                created: i.created,
                node_id: String::new(),
            })
            .collect())
    }

    fn pull_image(&self, reference: &str) -> BoxStream<'static, Result<PullProgress>> {
        // Without a tag the engine would pull every tag of the repository.
        let reference = with_default_tag(reference);
        let opts = CreateImageOptionsBuilder::new()
            .from_image(&reference)
            .build();
        let what = format!("image {reference}");
        let progress =
            self.docker
                .create_image(Some(opts), None, None)
                .map(move |item| match item {
                    Ok(info) => Ok(PullProgress {
                        node_id: String::new(),
                        status: info.status.unwrap_or_default(),
                        layer: info.id,
                        current: info
                            .progress_detail
                            .as_ref()
                            .and_then(|p| p.current)
                            .and_then(|n| u64::try_from(n).ok()),
                        total: info
                            .progress_detail
                            .as_ref()
                            .and_then(|p| p.total)
                            .and_then(|n| u64::try_from(n).ok()),
                        error: None,
                    }),
                    Err(e) => Err(map_err(e, &what)),
                });
        // End at the first error: nothing the engine says after a failure is progress.
        stream::unfold(
            (progress.boxed(), false),
            |(mut inner, failed)| async move {
                if failed {
                    return None;
                }
                let item = inner.next().await?;
                let failed = item.is_err();
                Some((item, (inner, failed)))
            },
        )
        .boxed()
    }

    async fn remove_image(&self, reference: &str, force: bool) -> Result<()> {
        let opts = RemoveImageOptionsBuilder::new().force(force).build();
        self.docker
            .remove_image(reference, Some(opts), None)
            .await
            .map(|_| ())
            .map_err(|e| map_err(e, &format!("image {reference}")))
    }

    async fn create_network(&self, config: &NetworkConfig) -> Result<String> {
        // API 1.41 engines accept a second network with the same name unless asked to check,
        // and bollard's request type has no CheckDuplicate field: check by exact name first.
        if self.network_named(&config.name).await?.is_some() {
            return Err(RuntimeError::Conflict(format!(
                "network {} already exists",
                config.name
            )));
        }
        let mut options = HashMap::new();
        if !config.internet {
            options.insert(OPT_IP_MASQUERADE.to_string(), "false".to_string());
        }
        if let Some(bridge) = &config.bridge_name {
            options.insert(OPT_BRIDGE_NAME.to_string(), bridge.clone());
        }
        let request = NetworkCreateRequest {
            name: config.name.clone(),
            driver: Some("bridge".to_string()),
            internal: Some(config.internal),
            ipam: Some(Ipam {
                driver: Some("default".to_string()),
                config: Some(vec![IpamConfig {
                    subnet: Some(config.subnet.clone()),
                    gateway: config.gateway.clone(),
                    ..Default::default()
                }]),
                options: None,
            }),
            options: Some(options),
            labels: Some(to_hash_map(&config.labels)),
            ..Default::default()
        };
        let created = self
            .docker
            .create_network(request)
            .await
            .map_err(|e| match e {
                BollardError::DockerResponseServerError { message, .. }
                    if message.to_ascii_lowercase().contains("overlap") =>
                {
                    RuntimeError::SubnetOverlap(config.subnet.clone())
                }
                e => map_err(e, &format!("network {}", config.name)),
            })?;
        // Lost a race with another creator of the same name: undo ours.
        if created.warning.contains("already exists") {
            if let Err(e) = self.docker.remove_network(&created.id).await {
                tracing::warn!(network = %created.id, error = %e, "could not remove a duplicate network");
            }
            return Err(RuntimeError::Conflict(format!(
                "network {} already exists",
                config.name
            )));
        }
        Ok(created.id)
    }

    async fn remove_network(&self, docker_id: &str) -> Result<()> {
        self.docker
            .remove_network(docker_id)
            .await
            .map_err(|e| map_err(e, &format!("network {docker_id}")))
    }

    async fn list_networks(&self, filter: &LabelFilter) -> Result<Vec<InventoryNetwork>> {
        let mut builder = ListNetworksOptionsBuilder::new();
        let filters = label_filters(filter);
        if !filters.is_empty() {
            builder = builder.filters(&filters);
        }
        let networks = self
            .docker
            .list_networks(Some(builder.build()))
            .await
            .map_err(|e| map_err(e, "networks"))?;
        Ok(networks
            .into_iter()
            .map(|n| InventoryNetwork {
                docker_id: n.id.unwrap_or_default(),
                name: n.name.unwrap_or_default(),
                subnets: ipam_subnets(n.ipam.as_ref()),
                internal: n.internal.unwrap_or(false),
                labels: n.labels.unwrap_or_default().into_iter().collect(),
            })
            .collect())
    }

    async fn used_subnets(&self) -> Result<Vec<String>> {
        let networks = self
            .docker
            .list_networks(None)
            .await
            .map_err(|e| map_err(e, "networks"))?;
        let mut subnets: Vec<String> = networks
            .iter()
            .flat_map(|n| ipam_subnets(n.ipam.as_ref()))
            .filter(|s| !s.contains(':'))
            .collect();
        subnets.sort();
        subnets.dedup();
        Ok(subnets)
    }

    async fn load_images(&self, tar: BoxStream<'static, Result<Bytes>>) -> Result<Vec<String>> {
        let opts = ImportImageOptionsBuilder::new().quiet(true).build();
        let mut replies = self.docker.import_image_stream(opts, tar, None).boxed();
        let mut loaded = Vec::new();
        while let Some(item) = replies.next().await {
            let info = item.map_err(|e| map_err(e, "image load"))?;
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::BadRequest(format!("image load: {msg}")));
            }
            // The engine reports each image as a line `Loaded image: REF` (or `Loaded image
            // ID: sha256:...` for an untagged one).
            for line in info.stream.as_deref().unwrap_or_default().lines() {
                if let Some(r) = loaded_reference(line) {
                    loaded.push(r.to_string());
                }
            }
        }
        if loaded.is_empty() {
            return Err(RuntimeError::BadRequest(
                "image load: the engine loaded no image from the archive".into(),
            ));
        }
        Ok(loaded)
    }

    async fn layer_chains(&self) -> Result<std::collections::HashSet<String>> {
        /// An engine with more images than this is asked about these only.
        const MAX_IMAGES: usize = 5000;
        let images = self
            .docker
            .list_images(None::<ListImagesOptions>)
            .await
            .map_err(|e| map_err(e, "images"))?;
        let docker = self.docker.clone();
        let stacks: Vec<Vec<String>> = futures::stream::iter(images.into_iter().take(MAX_IMAGES))
            .map(|i| {
                let docker = docker.clone();
                async move {
                    docker
                        .inspect_image(&i.id)
                        .await
                        .ok()
                        .and_then(|d| d.root_fs)
                        .and_then(|r| r.layers)
                        .unwrap_or_default()
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        Ok(stacks.iter().flat_map(|l| crate::chain_ids(l)).collect())
    }

    fn export_images(&self, refs: &[String]) -> BoxStream<'static, Result<Bytes>> {
        let names: Vec<&str> = refs.iter().map(String::as_str).collect();
        let what = format!("images {}", refs.join(", "));
        self.docker
            .export_images(&names)
            .map(move |r| r.map_err(|e| map_err(e, &what)))
            .boxed()
    }

    fn events(
        &self,
        filter: &LabelFilter,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<crate::RuntimeEvent>> {
        let mut filters = label_filters(filter);
        filters.insert("type".to_string(), vec!["container".to_string()]);
        filters.insert(
            "event".to_string(),
            vec![kisara_api::agent::ACTION_DIE.to_string()],
        );
        let mut opts = bollard::query_parameters::EventsOptionsBuilder::new().filters(&filters);
        if let Some(ns) = since_nano {
            // The engine takes `seconds.nanoseconds`.
            let since = format!(
                "{}.{:09}",
                ns.div_euclid(1_000_000_000),
                ns.rem_euclid(1_000_000_000)
            );
            opts = opts.since(&since);
        }
        self.docker
            .events(Some(opts.build()))
            .filter_map(|item| {
                futures::future::ready(match item {
                    Ok(m) => runtime_event(m).map(Ok),
                    Err(e) => Some(Err(map_err(e, "engine events"))),
                })
            })
            .boxed()
    }
}

/// A container event from the engine's; `None` for what is not one (no actor id).
fn runtime_event(m: bollard::models::EventMessage) -> Option<crate::RuntimeEvent> {
    let actor = m.actor?;
    let docker_id = actor.id.filter(|id| !id.is_empty())?;
    let attributes = actor.attributes.unwrap_or_default();
    let exit_code = attributes.get("exitCode").and_then(|c| c.parse().ok());
    // Attributes mix the container's labels with `name`, `image`, `exitCode`, ...; Kisara's
    // labels are what tells the server which container this is.
    let labels = attributes
        .into_iter()
        .filter(|(k, _)| k.starts_with(kisara_api::labels::PREFIX))
        .collect();
    let time_nano = m
        .time_nano
        .or_else(|| m.time.map(|t| t.saturating_mul(1_000_000_000)))
        .unwrap_or(0);
    Some(crate::RuntimeEvent {
        docker_id,
        action: m.action.unwrap_or_default(),
        exit_code,
        time_nano,
        labels,
    })
}

/// The reference in one of the engine's `docker load` answer lines.
fn loaded_reference(line: &str) -> Option<&str> {
    let line = line.trim();
    line.strip_prefix("Loaded image: ")
        .or_else(|| line.strip_prefix("Loaded image ID: "))
        .map(str::trim)
        .filter(|r| !r.is_empty())
}

impl DockerRuntime {
    /// The id of the network whose name is exactly `name`, if any.
    async fn network_named(&self, name: &str) -> Result<Option<String>> {
        // The engine's `name` filter matches substrings, so compare exactly afterwards.
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        let networks = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::new().filters(&filters).build(),
            ))
            .await
            .map_err(|e| map_err(e, "networks"))?;
        Ok(networks
            .into_iter()
            .find(|n| n.name.as_deref() == Some(name))
            .map(|n| n.id.unwrap_or_default()))
    }
}

/// Maps an engine error onto the trait's error kinds; `what` names the object for the message.
/// A container create's error: a missing image names the image, anything else goes through
/// `map_err` with `what`.
fn create_error(e: BollardError, image: &str, what: &str) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } if message.contains("No such image") => {
            RuntimeError::NotFound(format!("image {image} is not on this node ({message})"))
        }
        e => map_err(e, what),
    }
}

fn map_err(e: BollardError, what: &str) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => match status_code {
            404 => RuntimeError::NotFound(format!("{what}: {message}")),
            409 => RuntimeError::Conflict(format!("{what}: {message}")),
            400 => RuntimeError::BadRequest(format!("{what}: {message}")),
            // The engine answers 403 both for "still in use" (a state conflict) and for
            // requests it will never accept (removing a pre-defined network).
            403 if message.contains("active endpoints") || message.contains("in use") => {
                RuntimeError::Conflict(format!("{what}: {message}"))
            }
            403 => RuntimeError::BadRequest(format!("{what}: {message}")),
            _ => RuntimeError::Engine(format!("{what}: {message} (status {status_code})")),
        },
        BollardError::RequestTimeoutError => {
            RuntimeError::Timeout(format!("{what}: the engine did not answer in time"))
        }
        BollardError::DockerStreamError { error } => {
            let lower = error.to_ascii_lowercase();
            if lower.contains("not found")
                || lower.contains("does not exist")
                || lower.contains("manifest unknown")
            {
                RuntimeError::NotFound(format!("{what}: {error}"))
            } else {
                RuntimeError::Engine(format!("{what}: {error}"))
            }
        }
        e => RuntimeError::Engine(format!("{what}: {e}")),
    }
}

fn label_filters(filter: &LabelFilter) -> HashMap<String, Vec<String>> {
    if filter.is_empty() {
        return HashMap::new();
    }
    // Several `label` filters are ANDed by the engine.
    HashMap::from([(
        "label".to_string(),
        filter.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )])
}

fn to_hash_map(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn non_empty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// A tar of `files`, paths relative to `/`.
fn files_tar(files: &[kisara_api::agent::ContainerFile]) -> Result<Bytes> {
    let mut builder = tar::Builder::new(Vec::new());
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for f in files {
        let rel = f.path.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == ".." || c.is_empty()) {
            return Err(RuntimeError::BadRequest(format!(
                "file path {:?} must be absolute and plain",
                f.path
            )));
        }
        let data = f.contents.expose().as_bytes();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(f.mode & 0o7777);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, rel, data)
            .map_err(|e| RuntimeError::BadRequest(format!("file {:?}: {e}", f.path)))?;
    }
    builder
        .into_inner()
        .map(Bytes::from)
        .map_err(|e| RuntimeError::Engine(format!("building the files archive: {e}")))
}

/// The engine's create request for a fully resolved Kisara container.
fn create_body(config: &ContainerConfig) -> ContainerCreateBody {
    let mut exposed = Vec::with_capacity(config.ports.len());
    let mut bindings: PortMap = HashMap::new();
    for port in &config.ports {
        let key = port.to_string();
        exposed.push(key.clone());
        // The port leased for it; empty: the engine picks a free ephemeral port.
        let host_port = config
            .host_ports
            .get(&key)
            .map(u16::to_string)
            .unwrap_or_default();
        bindings.insert(
            key,
            Some(vec![PortBinding {
                host_ip: Some(config.publish_host_ip.clone()),
                host_port: Some(host_port),
            }]),
        );
    }
    let networking_config = config.network.as_ref().map(|net| NetworkingConfig {
        endpoints_config: Some(HashMap::from([(
            net.clone(),
            EndpointSettings {
                aliases: non_empty(&config.network_aliases),
                ipam_config: config.ipv4_address.as_ref().map(|ip| {
                    bollard::models::EndpointIpamConfig {
                        ipv4_address: Some(ip.clone()),
                        ..Default::default()
                    }
                }),
                ..Default::default()
            },
        )])),
    });
    let host_config = HostConfig {
        memory: config.memory_bytes,
        // Memory and memory+swap equal: the container gets no swap on top of its limit.
        memory_swap: config.memory_bytes,
        nano_cpus: config.nano_cpus,
        pids_limit: config.pids_limit,
        cap_drop: non_empty(&config.cap_drop),
        cap_add: non_empty(&config.cap_add),
        security_opt: non_empty(&config.security_opt),
        init: Some(config.init),
        privileged: Some(config.privileged),
        binds: non_empty(&config.binds),
        readonly_rootfs: Some(config.read_only),
        tmpfs: (!config.tmpfs.is_empty()).then(|| to_hash_map(&config.tmpfs)),
        network_mode: config.network.clone(),
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        restart_policy: config.restart.as_deref().and_then(restart_policy),
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(config.image.clone()),
        cmd: config.cmd.clone(),
        entrypoint: config.entrypoint.clone(),
        env: non_empty(&config.env),
        labels: Some(to_hash_map(&config.labels)),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        user: config.user.clone(),
        working_dir: config.workdir.clone(),
        host_config: Some(host_config),
        networking_config,
        healthcheck: config.healthcheck.as_ref().map(health_config),
        ..Default::default()
    }
}

fn millis_to_nanos(ms: Option<u64>) -> Option<i64> {
    ms.map(|ms| i64::try_from(ms.saturating_mul(1_000_000)).unwrap_or(i64::MAX))
}

fn health_config(h: &kisara_api::agent::HealthCheck) -> HealthConfig {
    HealthConfig {
        test: Some(h.test.clone()),
        interval: millis_to_nanos(h.interval_ms),
        timeout: millis_to_nanos(h.timeout_ms),
        retries: h.retries.map(i64::from),
        start_period: millis_to_nanos(h.start_period_ms),
        start_interval: None,
    }
}

/// `no`, `always`, `unless-stopped`, `on-failure[:N]` (validated by the server's policy; an
/// unknown word means no policy).
fn restart_policy(spec: &str) -> Option<RestartPolicy> {
    let (name, count) = match spec.split_once(':') {
        Some((n, c)) => (n, c.parse::<i64>().ok()),
        None => (spec, None),
    };
    let name = match name {
        "no" => RestartPolicyNameEnum::NO,
        "always" => RestartPolicyNameEnum::ALWAYS,
        "unless-stopped" => RestartPolicyNameEnum::UNLESS_STOPPED,
        "on-failure" => RestartPolicyNameEnum::ON_FAILURE,
        _ => return None,
    };
    Some(RestartPolicy {
        name: Some(name),
        maximum_retry_count: count,
    })
}

/// The health word in a `docker ps` status line: `Up 3 seconds (healthy)`,
/// `(health: starting)`, `(unhealthy)`.
fn health_from_status(status: &str) -> Option<String> {
    if status.ends_with("(health: starting)") {
        Some("starting".into())
    } else if status.ends_with("(unhealthy)") {
        Some("unhealthy".into())
    } else if status.ends_with("(healthy)") {
        Some("healthy".into())
    } else {
        None
    }
}

/// Parses `80/tcp` (a key of the engine's port map).
fn parse_port_key(key: &str) -> Option<PortSpec> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    Some(PortSpec {
        port: port.parse().ok()?,
        protocol: parse_protocol(proto)?,
    })
}

fn parse_protocol(proto: &str) -> Option<Protocol> {
    match proto {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => None,
    }
}

/// One published port per container port: engines that bind both IPv4 and IPv6 report two
/// bindings, the IPv4 one is kept.
fn push_published(out: &mut Vec<PublishedPort>, port: PortSpec, host_ip: String, host_port: u16) {
    if host_port == 0 {
        return;
    }
    if let Some(existing) = out.iter_mut().find(|p| p.port == port) {
        if existing.host_ip.contains(':') && !host_ip.contains(':') {
            existing.host_ip = host_ip;
            existing.host_port = host_port;
        }
        return;
    }
    out.push(PublishedPort {
        port,
        host_ip,
        host_port,
    });
}

fn published_from_map(ports: Option<&PortMap>) -> Vec<PublishedPort> {
    let mut out = Vec::new();
    for (key, bindings) in ports.into_iter().flatten() {
        let Some(spec) = parse_port_key(key) else {
            continue;
        };
        for b in bindings.iter().flatten() {
            let Some(host_port) = b.host_port.as_deref().and_then(|p| p.parse().ok()) else {
                continue;
            };
            push_published(
                &mut out,
                spec,
                b.host_ip.clone().unwrap_or_default(),
                host_port,
            );
        }
    }
    out.sort_by_key(|p| p.port);
    out
}

/// The network a container is on and its address there. `mode` is the container's network mode
/// (a network name, `default`, `host`, `container:<id>` ...).
fn network_and_ip(
    mode: Option<&str>,
    networks: Option<&HashMap<String, EndpointSettings>>,
) -> (Option<String>, Option<String>) {
    let mode = match mode {
        None | Some("") | Some("default") => "bridge",
        Some(m) => m,
    };
    let endpoint = networks.and_then(|nets| {
        nets.get(mode).map(|e| (mode.to_string(), e)).or_else(|| {
            // The mode may be a network id; fall back to the (first) attached network.
            let mut names: Vec<&String> = nets.keys().collect();
            names.sort();
            names
                .first()
                .and_then(|n| nets.get(*n).map(|e| ((*n).clone(), e)))
        })
    });
    match endpoint {
        Some((name, e)) => (Some(name), e.ip_address.clone().filter(|ip| !ip.is_empty())),
        None => (Some(mode.to_string()), None),
    }
}

fn container_from_inspect(c: ContainerInspectResponse) -> InventoryContainer {
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let state_str = state
        .status
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    // Inspect has no status line; build one like `docker ps` shows.
    let status = match state_str.as_str() {
        "running" => format!("Up since {}", state.started_at.as_deref().unwrap_or("?")),
        "exited" => format!("Exited ({})", state.exit_code.unwrap_or(0)),
        other => other.to_string(),
    };
    let health = state
        .health
        .as_ref()
        .and_then(|h| h.status.as_ref())
        .map(|s| s.to_string())
        .filter(|s| matches!(s.as_str(), "starting" | "healthy" | "unhealthy"));
    let network_settings = c.network_settings.unwrap_or_default();
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref());
    let (network, ip_address) = network_and_ip(mode, network_settings.networks.as_ref());
    InventoryContainer {
        docker_id: c.id.unwrap_or_default(),
        name: c
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        state: state_str,
        status,
        network,
        ip_address,
        published: published_from_map(network_settings.ports.as_ref()),
        created: c
            .created
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok())
            .and_then(|v| v.as_str().and_then(parse_rfc3339))
            .unwrap_or(0),
        health,
    }
}

fn container_from_summary(c: ContainerSummary) -> InventoryContainer {
    let mut published = Vec::new();
    for p in c.ports.iter().flatten() {
        let protocol = match p.typ.as_ref().map(|t| t.to_string()) {
            Some(t) => match parse_protocol(&t) {
                Some(proto) => proto,
                None => continue,
            },
            None => Protocol::Tcp,
        };
        if let Some(public) = p.public_port {
            push_published(
                &mut published,
                PortSpec {
                    port: p.private_port,
                    protocol,
                },
                p.ip.clone().unwrap_or_default(),
                public,
            );
        }
    }
    published.sort_by_key(|p| p.port);
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.as_deref());
    let (network, ip_address) = network_and_ip(
        mode,
        c.network_settings
            .as_ref()
            .and_then(|n| n.networks.as_ref()),
    );
    InventoryContainer {
        docker_id: c.id.unwrap_or_default(),
        name: c
            .names
            .and_then(|n| n.into_iter().next())
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        image: c.image.unwrap_or_default(),
        labels: c.labels.unwrap_or_default().into_iter().collect(),
        state: c.state.map(|s| s.to_string()).unwrap_or_default(),
        health: c.status.as_deref().and_then(health_from_status),
        status: c.status.unwrap_or_default(),
        network,
        ip_address,
        published,
        created: c.created.unwrap_or(0),
    }
}

fn ipam_subnets(ipam: Option<&Ipam>) -> Vec<String> {
    ipam.and_then(|i| i.config.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.subnet.clone())
        .filter(|s| !s.is_empty())
        .collect()
}

fn log_chunk(stream: &str, data: &[u8]) -> LogChunk {
    LogChunk {
        stream: stream.to_string(),
        data: String::from_utf8_lossy(data).into_owned(),
    }
}

/// Exec timeout in seconds: the request's, else the default, within 1..=max.
pub(crate) fn exec_timeout_secs(requested: Option<u64>) -> u64 {
    requested
        .unwrap_or(EXEC_TIMEOUT_DEFAULT_SECS)
        .clamp(1, EXEC_TIMEOUT_MAX_SECS)
}

/// `busybox` → `busybox:latest`; references with a tag or digest are kept.
pub(crate) fn with_default_tag(reference: &str) -> String {
    let last = reference.rsplit('/').next().unwrap_or(reference);
    if last.contains(':') || last.contains('@') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    }
}

fn clamp_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

fn clamp_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Whether a `DOCKER_HOST` value points at this machine (empty = the default local socket).
fn is_local_host(host: &str) -> bool {
    if host.is_empty() || host.starts_with("unix://") || host.starts_with('/') {
        return true;
    }
    let rest = host
        .strip_prefix("tcp://")
        .or_else(|| host.strip_prefix("http://"))
        .or_else(|| host.strip_prefix("https://"))
        .unwrap_or(host);
    let hostname = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
    matches!(
        hostname.trim_matches(['[', ']']),
        "localhost" | "127.0.0.1" | "::1"
    )
}

/// Seconds since the epoch of an RFC 3339 timestamp such as `2026-05-07T21:09:36.123456789Z`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |range: std::ops::Range<usize>| -> Option<i64> { s.get(range)?.parse().ok() };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Offset after the optional fraction: `Z`, `+hh:mm` or `-hh:mm`.
    let tail = s.get(19..)?;
    let tail = tail.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match tail.as_bytes().first() {
        None | Some(b'Z') | Some(b'z') => 0,
        Some(sign @ (b'+' | b'-')) => {
            let h: i64 = tail.get(1..3)?.parse().ok()?;
            let m: i64 = tail.get(4..6)?.parse().ok()?;
            let off = h * 3600 + m * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        Some(_) => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// Aggregate CPU jiffies from the first line of /proc/stat.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuSample {
    busy: u64,
    total: u64,
    cpus: u32,
}

impl CpuSample {
    /// Use between `before` and `self`, in percent of one CPU (so up to 100 × cpus).
    fn percent_since(&self, before: &CpuSample) -> f64 {
        let total = self.total.saturating_sub(before.total);
        let busy = self.busy.saturating_sub(before.busy);
        if total == 0 {
            return 0.0;
        }
        busy as f64 / total as f64 * 100.0 * f64::from(self.cpus.max(1))
    }
}

fn parse_proc_stat(s: &str) -> Option<CpuSample> {
    let mut lines = s.lines();
    let first = lines.next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let values: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    // counted in user, so only the first eight add up to the total.
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    let cpus = lines
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    Some(CpuSample {
        busy: total.saturating_sub(idle),
        total,
        cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
    })
}

/// MemTotal − MemAvailable, in bytes.
fn parse_meminfo_used(s: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some(field("MemTotal:")?.saturating_sub(field("MemAvailable:")?))
}

/// Total and free bytes of the file system holding `path`.
fn disk_usage(path: &str) -> Option<(u64, u64)> {
    let c_path = std::ffi::CString::new(path).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` points to writable memory of
    // the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    // The field types differ between targets (u32 or u64).
    #[allow(clippy::unnecessary_cast)]
    let (frsize, blocks, avail) = (st.f_frsize as u64, st.f_blocks as u64, st.f_bavail as u64);
    Some((blocks * frsize, avail * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2026-05-07T21:09:36.123456789Z"),
            Some(1_778_188_176)
        );
        assert_eq!(
            parse_rfc3339("2026-05-07T23:09:36+02:00"),
            Some(1_778_188_176)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339(""), None);
        assert_eq!(parse_rfc3339("2026-13-07T21:09:36Z"), None);
    }

    #[test]
    fn default_tag() {
        assert_eq!(with_default_tag("busybox"), "busybox:latest");
        assert_eq!(with_default_tag("a/b:1"), "a/b:1");
        assert_eq!(
            with_default_tag("localhost:5000/b"),
            "localhost:5000/b:latest"
        );
        assert_eq!(with_default_tag("b@sha256:00"), "b@sha256:00");
    }

    #[test]
    fn proc_parsing() {
        let stat = "cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 50 0 50 350 50 0 0 0 0 0\ncpu1 50 0 50 350 50 0 0 0 0 0\nintr 1\n";
        let s = parse_proc_stat(stat).unwrap();
        assert_eq!(
            s,
            CpuSample {
                busy: 200,
                total: 1000,
                cpus: 2
            }
        );
        let later = CpuSample {
            busy: 300,
            total: 1100,
            cpus: 2,
        };
        assert!((later.percent_since(&s) - 200.0).abs() < 1e-9);
        assert_eq!(parse_proc_stat("nonsense"), None);
        let mem = "MemTotal:       1000 kB\nMemFree: 10 kB\nMemAvailable:    400 kB\n";
        assert_eq!(parse_meminfo_used(mem), Some(600 * 1024));
        assert_eq!(parse_meminfo_used("MemTotal: x kB"), None);
    }

    #[test]
    fn local_hosts() {
        assert!(is_local_host(""));
        assert!(is_local_host("unix:///var/run/docker.sock"));
        assert!(is_local_host("tcp://127.0.0.1:2375"));
        assert!(!is_local_host("tcp://10.0.0.5:2375"));
    }

    #[test]
    fn port_map() {
        let map: PortMap = HashMap::from([
            (
                "80/tcp".to_string(),
                Some(vec![
                    PortBinding {
                        host_ip: Some("::".into()),
                        host_port: Some("40001".into()),
                    },
                    PortBinding {
                        host_ip: Some("0.0.0.0".into()),
                        host_port: Some("40001".into()),
                    },
                ]),
            ),
            ("53/udp".to_string(), None),
            ("x/tcp".to_string(), Some(vec![])),
            (
                "22/sctp".to_string(),
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: Some("1".into()),
                }]),
            ),
        ]);
        let p = published_from_map(Some(&map));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].host_ip, "0.0.0.0");
        assert_eq!(p[0].host_port, 40001);
        assert_eq!(
            p[0].port,
            PortSpec {
                port: 80,
                protocol: Protocol::Tcp
            }
        );
    }

    #[test]
    fn create_body_hardening() {
        let cfg = ContainerConfig {
            name: "x".into(),
            image: "img".into(),
            memory_bytes: Some(64 << 20),
            ports: vec![PortSpec {
                port: 80,
                protocol: Protocol::Tcp,
            }],
            publish_host_ip: "127.0.0.1".into(),
            network: Some("net".into()),
            network_aliases: vec!["web".into()],
            ..Default::default()
        };
        let body = create_body(&cfg);
        let hc = body.host_config.unwrap();
        assert_eq!(hc.memory, hc.memory_swap);
        assert_eq!(hc.network_mode.as_deref(), Some("net"));
        let b = &hc.port_bindings.unwrap()["80/tcp"];
        assert_eq!(b.as_ref().unwrap()[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(body.exposed_ports.unwrap(), vec!["80/tcp".to_string()]);
        let eps = body.networking_config.unwrap().endpoints_config.unwrap();
        assert_eq!(
            eps["net"].aliases.as_deref(),
            Some(&["web".to_string()][..])
        );
    }
}
