//! The TOML configuration file, environment overrides, and the resolved settings the server
//! and the agent run with.
//!
//! One file serves `kisara server`, `kisara node` and `kisara up`. Besides Kisara's own
//! sections (`[server]`, `[node]`), it accepts a configuration written for Kisara-the-original
//! (`[kisara]`, `[kisaraClient]`, `[kisaraServer]`, `[takina]`), so a site can switch with the
//! file it has. Unknown keys are errors that name the key: a typo must not silently fall back to
//! a default that exposes something.
//!
//! # Precedence
//!
//! environment ([`Config::apply_env`]) > `[server]` / `[node]` > Kisara's keys > defaults.
//!
//! # Kisara's keys
//!
//! | Kisara key | becomes |
//! |---|---|
//! | `kisaraServer.address` + `port` | `server.listen` (a missing half is taken from the default `127.0.0.1:7474`) |
//! | `kisaraClient.network_cidrs` | `server.subnet_pool` and `node.subnet_pool` (a string with comma-separated entries, or a list) |
//! | `kisaraClient.max_container` | `node.max_containers` |
//! | `kisaraClient.address` | `node.public_address` (unless it is an unspecified address such as `0.0.0.0`) |
//! | `kisaraClient.network_in`, `network_out` | `node.network_in`, `node.network_out`: caps in kbit/s of the node's exposed traffic, each way (enforced in gateway mode) |
//! | `kisara.token` | `server.admin_token` and `node.join_token`: Kisara used one shared token for both |
//! | `kisara.dns` | `server.dns` (kept for container DNS, not applied yet) |
//! | `kisara.mode`, `kisaraClient.port`, `kisaraClient.db_path`, `takina.token` | accepted and ignored: agents dial the server, so no client port; the store lives in `server.data_dir`, because Kisara's database has another schema |
//!
//! Kisara's own default pool `172.[128-255].[0-255].0/24` is public address space; a file that
//! uses it needs `allow_public_subnets = true` under `[server]`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kisara_api::agent::Secret;
use serde::{Deserialize, Deserializer};

use crate::policy::normalize_capability;
use crate::pool::{SubnetPool, DEFAULT_POOL};
use crate::{CoreError, Result};

/// Default address of the HTTP API (and of the agent channel).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7474";
/// Default data directory of the server (store, admin token).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/kisara";
/// Default server URL an agent dials.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:7474";
/// Most CPUs a single container may ask for, whatever the configuration says.
pub const MAX_CPUS: f64 = 64.0;
/// Least memory Docker accepts for a container.
pub const MIN_MEMORY_MB: u64 = 6;

/// The configuration file as written. Every field is optional so that precedence between our
/// sections, Kisara's keys and defaults can be decided in one place ([`Config::server_settings`],
/// [`Config::node_settings`]).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub node: NodeSection,
    #[serde(default)]
    pub kisara: KisaraSection,
    #[serde(default, rename = "kisaraClient")]
    pub kisara_client: KisaraClientSection,
    #[serde(default, rename = "kisaraServer")]
    pub kisara_server: KisaraServerSection,
    #[serde(default)]
    pub takina: TakinaSection,
    /// The gateway role (public listeners tunnelled to nodes).
    #[serde(default)]
    pub gateway: crate::exposure::GatewaySection,
    /// Lifetimes and admission limits of instances.
    #[serde(default)]
    pub instances: crate::instances::InstancesSection,
    #[serde(default)]
    pub flags: crate::flags::FlagsSection,
}

/// `[server]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// `host:port` of the HTTP API; default [`DEFAULT_LISTEN`].
    pub listen: Option<String>,
    /// Default [`DEFAULT_DATA_DIR`].
    pub data_dir: Option<PathBuf>,
    /// Address advertised for ports published through the server (the gateway).
    pub public_address: Option<String>,
    /// Admin bearer token; when absent the server generates one into its data directory.
    pub admin_token: Option<Secret>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub subnet_pool: Option<Vec<String>>,
    pub allow_public_subnets: Option<bool>,
    pub allow_privileged: Option<bool>,
    pub allow_host_binds: Option<bool>,
    /// Capabilities a request may add beyond the default allow-list (`"ALL"` for any).
    pub cap_allow: Option<Vec<String>>,
    /// Host address container ports are published on; default `0.0.0.0`.
    pub publish_host_ip: Option<String>,
    /// DNS servers for containers.
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub dns: Option<Vec<String>>,
    #[serde(default)]
    pub defaults: DefaultsSection,
    #[serde(default)]
    pub limits: LimitsSection,
    pub heartbeat_interval_secs: Option<u64>,
    pub node_grace_secs: Option<u64>,
    /// How the scheduler ranks nodes: `spread` (default) or `binpack`.
    pub scheduler: Option<crate::scheduler::Strategy>,
    /// How many times a node's CPUs the scheduler may reserve (default 4: CPU is shared,
    /// and challenge containers mostly idle).
    pub cpu_overcommit: Option<f64>,
    /// How many times a node's memory the scheduler may reserve (default 1).
    pub memory_overcommit: Option<f64>,
    /// Spare networks kept ready per node, so a launch without a network does not wait for
    /// the engine to create one (default 2; 0 turns the warm pool off).
    pub warm_networks: Option<u32>,
    /// What reconciliation does with a container of this cluster that the store does not
    /// know: `remove` it (default) or only `report` it on the node.
    pub orphans: Option<OrphanPolicy>,
    /// Seconds after a reconciliation that dropped interrupted launches before the node's
    /// containers are looked at once more for orphans (default 45; an engine may finish an
    /// interrupted launch late).
    pub orphan_recheck_secs: Option<u64>,
    /// PEM certificate chain: with `tls_key`, the API and the agent channel are served over
    /// TLS (`kisara cert` makes one).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Exposure mode of nodes that name none: `host` (default) or `gateway`.
    pub exposure: Option<kisara_api::ExposeMode>,
    /// Host ports of nodes that name no range (default `30000-39999`).
    pub port_range: Option<kisara_api::PortRange>,
}

/// What reconciliation does with a container that carries this cluster's label but that the
/// store does not know (left by a launch a crash interrupted, or made behind Kisara's back).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrphanPolicy {
    /// Remove it through its node's agent, with a `container.orphan_removed` event.
    #[default]
    Remove,
    /// Leave it, log it and list it on the node (`unknown_containers`).
    Report,
}

/// `[server.defaults]`: resources of a container whose request names none.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsSection {
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
}

/// `[server.limits]`: the most any request may ask for.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_memory_mb: Option<u64>,
    pub max_cpus: Option<f64>,
    pub max_pids_limit: Option<i64>,
    /// Containers in one multi-container service (default 64).
    pub max_service_containers: Option<usize>,
    /// Networks made for one multi-container service (default 16).
    pub max_service_networks: Option<usize>,
}

/// `[node]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Node name; the agent uses the host name when absent.
    pub name: Option<String>,
    /// URL of the server to dial; default [`DEFAULT_SERVER_URL`].
    pub server_url: Option<String>,
    pub join_token: Option<Secret>,
    /// Where the agent keeps its node credential.
    pub data_dir: Option<PathBuf>,
    /// Address advertised to players for ports published on this node.
    pub public_address: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// 0 = unlimited.
    pub max_containers: Option<u32>,
    /// Host address this node publishes ports on, overriding the server's choice.
    pub publish_host_ip: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub subnet_pool: Option<Vec<String>>,
    pub network_in: Option<u64>,
    pub network_out: Option<u64>,
    /// PEM CA certificate that signed the server's certificate (for `https://` servers).
    pub ca_file: Option<PathBuf>,
    /// How this node's containers are exposed: `host` or `gateway` (default: the server's).
    pub exposure: Option<kisara_api::ExposeMode>,
    /// Host ports this node leases in host mode (default: the server's range).
    pub port_range: Option<kisara_api::PortRange>,
    /// Install the host firewall rules that keep instances away from the host and, unless
    /// their network asks for internet, from the outside (default true; needs root).
    pub isolation: Option<bool>,
}

/// Kisara's `[kisara]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KisaraSection {
    pub token: Option<Secret>,
    pub mode: Option<String>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub dns: Option<Vec<String>>,
}

/// Kisara's `[kisaraClient]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KisaraClientSection {
    pub address: Option<String>,
    pub port: Option<u16>,
    pub network_in: Option<u64>,
    pub network_out: Option<u64>,
    pub max_container: Option<u32>,
    pub db_path: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_string_or_list")]
    pub network_cidrs: Option<Vec<String>>,
}

/// Kisara's `[kisaraServer]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KisaraServerSection {
    pub address: Option<String>,
    pub port: Option<u16>,
}

/// Kisara's `[takina]` (its port-mapping tunnel); accepted so old files load.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TakinaSection {
    pub token: Option<Secret>,
}

/// Resources of a container whose request names none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceDefaults {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids_limit: i64,
}

/// The most a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResourceLimits {
    pub max_memory_mb: u64,
    /// At most [`MAX_CPUS`].
    pub max_cpus: f64,
    pub max_pids_limit: i64,
    pub max_service_containers: usize,
    pub max_service_networks: usize,
}

/// What the server runs with: defaults filled in, everything validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub public_address: Option<String>,
    pub admin_token: Option<Secret>,
    pub subnet_pool: SubnetPool,
    pub allow_public_subnets: bool,
    pub allow_privileged: bool,
    pub allow_host_binds: bool,
    /// Normalized (`NET_ADMIN`, no `CAP_` prefix); may hold `ALL`.
    pub cap_allow: Vec<String>,
    pub publish_host_ip: IpAddr,
    pub dns: Vec<IpAddr>,
    pub defaults: ResourceDefaults,
    pub limits: ResourceLimits,
    pub heartbeat_interval: Duration,
    /// How long a node may miss heartbeats before it is considered down.
    pub node_grace: Duration,
    pub scheduler: crate::scheduler::Strategy,
    /// Factor on a node's CPUs that the scheduler may reserve.
    pub cpu_overcommit: f64,
    /// Factor on a node's memory that the scheduler may reserve.
    pub memory_overcommit: f64,
    /// Spare networks kept ready per node (0 = none).
    pub warm_networks: u32,
    /// What reconciliation does with labelled containers the store does not know.
    pub orphans: OrphanPolicy,
    /// The second orphan sweep after a reconciliation that dropped interrupted launches.
    pub orphan_recheck: std::time::Duration,
    /// Certificate and key files when the server speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Default exposure mode, host-port range, and the gateway role.
    pub exposure: crate::exposure::ExposureSettings,
    /// Lifetimes and admission limits of instances.
    pub instances: crate::instances::InstanceSettings,
    /// Key of `[team_hash]` flags; generated into the data directory when absent.
    pub flag_secret: Option<Secret>,
}

impl Default for ServerSettings {
    /// The settings of an empty configuration file.
    fn default() -> Self {
        Config::default()
            .server_settings()
            .expect("the defaults are valid (tested)")
    }
}

/// What an agent runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// `None`: the agent uses the host name.
    pub name: Option<String>,
    pub server_url: String,
    pub join_token: Option<Secret>,
    pub data_dir: Option<PathBuf>,
    pub public_address: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// 0 = unlimited.
    pub max_containers: u32,
    /// `None`: publish where the server says.
    pub publish_host_ip: Option<IpAddr>,
    /// A pool of this node's own, where the configuration names one.
    pub subnet_pool: Option<SubnetPool>,
    pub network_in: Option<u64>,
    pub network_out: Option<u64>,
    /// CA certificate that signed the server's, for `https://` servers.
    pub ca_file: Option<PathBuf>,
    /// Mode, host-port range and bandwidth caps this node announces.
    pub exposure: kisara_api::NodeExposure,
    /// Whether the agent installs the host isolation rules.
    pub isolation: bool,
}

impl Config {
    pub fn from_toml_str(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| CoreError::invalid(format!("invalid configuration: {e}")))
    }

    pub fn load(path: impl AsRef<Path>) -> Result<Config> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoreError::invalid(format!("cannot read configuration {}: {e}", path.display()))
        })?;
        Config::from_toml_str(&text)
            .map_err(|e| CoreError::invalid(format!("{}: {e}", path.display())))
    }

    /// Applies environment overrides; `get` is usually `|k| std::env::var(k).ok()`. An empty
    /// value counts as unset, so `KISARA_TOKEN=` cannot blank a token by accident.
    ///
    /// | Variable | Sets |
    /// |---|---|
    /// | `KISARA_LISTEN` | `server.listen` |
    /// | `KISARA_DATA_DIR` | `server.data_dir` |
    /// | `KISARA_PUBLIC_ADDRESS` | `server.public_address` and `node.public_address` |
    /// | `KISARA_SUBNET_POOL` | `server.subnet_pool` (comma-separated entries) |
    /// | `KISARA_ALLOW_PUBLIC_SUBNETS` | `server.allow_public_subnets` |
    /// | `KISARA_ALLOW_PRIVILEGED` | `server.allow_privileged` |
    /// | `KISARA_ALLOW_HOST_BINDS` | `server.allow_host_binds` |
    /// | `KISARA_PUBLISH_HOST_IP` | `server.publish_host_ip` and `node.publish_host_ip` |
    /// | `KISARA_TOKEN` | `server.admin_token` |
    /// | `KISARA_NODE_NAME` | `node.name` |
    /// | `KISARA_SERVER_URL` | `node.server_url` |
    /// | `KISARA_JOIN_TOKEN` | `node.join_token` |
    /// | `KISARA_NODE_DATA_DIR` | `node.data_dir` |
    /// | `KISARA_NODE_LABELS` | `node.labels` (`k=v,k=v`, replacing the file's) |
    /// | `KISARA_MAX_CONTAINERS` | `node.max_containers` |
    /// | `KISARA_NODE_ISOLATION` | `node.isolation` |
    /// | `KISARA_FLAG_SECRET` | `flags.secret` |
    ///
    /// Booleans are `1/true/yes/on` or `0/false/no/off`; anything else is an error naming the
    /// variable.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        let var = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let (server, node) = (&mut self.server, &mut self.node);
        if let Some(v) = var("KISARA_LISTEN") {
            server.listen = Some(v);
        }
        if let Some(v) = var("KISARA_DATA_DIR") {
            server.data_dir = Some(v.into());
        }
        if let Some(v) = var("KISARA_PUBLIC_ADDRESS") {
            server.public_address = Some(v.clone());
            node.public_address = Some(v);
        }
        if let Some(v) = var("KISARA_SUBNET_POOL") {
            server.subnet_pool = Some(vec![v]);
        }
        for (name, slot) in [
            (
                "KISARA_ALLOW_PUBLIC_SUBNETS",
                &mut server.allow_public_subnets,
            ),
            ("KISARA_ALLOW_PRIVILEGED", &mut server.allow_privileged),
            ("KISARA_ALLOW_HOST_BINDS", &mut server.allow_host_binds),
        ] {
            if let Some(v) = var(name) {
                *slot = Some(parse_bool(name, &v)?);
            }
        }
        if let Some(v) = var("KISARA_PUBLISH_HOST_IP") {
            server.publish_host_ip = Some(v.clone());
            node.publish_host_ip = Some(v);
        }
        if let Some(v) = var("KISARA_TOKEN") {
            server.admin_token = Some(Secret(v));
        }
        if let Some(v) = var("KISARA_NODE_NAME") {
            node.name = Some(v);
        }
        if let Some(v) = var("KISARA_SERVER_URL") {
            node.server_url = Some(v);
        }
        if let Some(v) = var("KISARA_JOIN_TOKEN") {
            node.join_token = Some(Secret(v));
        }
        if let Some(v) = var("KISARA_NODE_DATA_DIR") {
            node.data_dir = Some(v.into());
        }
        if let Some(v) = var("KISARA_NODE_ISOLATION") {
            node.isolation = Some(parse_bool("KISARA_NODE_ISOLATION", &v)?);
        }
        if let Some(v) = var("KISARA_FLAG_SECRET") {
            self.flags.secret = Some(Secret(v));
        }
        if let Some(v) = var("KISARA_NODE_LABELS") {
            node.labels = parse_labels("KISARA_NODE_LABELS", &v)?;
        }
        if let Some(v) = var("KISARA_MAX_CONTAINERS") {
            node.max_containers = Some(v.trim().parse().map_err(|_| {
                CoreError::invalid(format!(
                    "KISARA_MAX_CONTAINERS must be a non-negative number, not {v:?}"
                ))
            })?);
        }
        Ok(())
    }

    /// Resolves and validates the server's settings.
    pub fn server_settings(&self) -> Result<ServerSettings> {
        let s = &self.server;
        let listen = match &s.listen {
            Some(listen) => parse_socket_addr("server.listen", listen)?,
            None => match (&self.kisara_server.address, self.kisara_server.port) {
                (None, None) => parse_socket_addr("server.listen", DEFAULT_LISTEN)?,
                (address, port) => {
                    let ip = match address {
                        Some(a) => parse_ip("kisaraServer.address", a)?,
                        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    };
                    SocketAddr::new(ip, port.unwrap_or(7474))
                }
            },
        };

        let allow_public_subnets = s.allow_public_subnets.unwrap_or(false);
        let pool_entries = s
            .subnet_pool
            .clone()
            .or_else(|| self.kisara_client.network_cidrs.clone())
            .unwrap_or_else(|| vec![DEFAULT_POOL.to_string()]);
        let subnet_pool = SubnetPool::parse(&pool_entries, allow_public_subnets)?;

        let mut cap_allow = Vec::new();
        for cap in s.cap_allow.iter().flatten() {
            let normalized = normalize_capability(cap).ok_or_else(|| {
                CoreError::invalid(format!("server.cap_allow: unknown capability {cap:?}"))
            })?;
            if !cap_allow.contains(&normalized) {
                cap_allow.push(normalized);
            }
        }

        let publish_host_ip = match &s.publish_host_ip {
            Some(ip) => parse_ip("server.publish_host_ip", ip)?,
            None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        let dns = s
            .dns
            .as_ref()
            .or(self.kisara.dns.as_ref())
            .into_iter()
            .flatten()
            .flat_map(|d| d.split(','))
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(|d| parse_ip("dns", d))
            .collect::<Result<Vec<_>>>()?;

        let limits = ResourceLimits {
            max_memory_mb: s.limits.max_memory_mb.unwrap_or(16 * 1024),
            max_cpus: s.limits.max_cpus.unwrap_or(MAX_CPUS),
            max_pids_limit: s.limits.max_pids_limit.unwrap_or(4096),
            max_service_containers: s.limits.max_service_containers.unwrap_or(64),
            max_service_networks: s.limits.max_service_networks.unwrap_or(16),
        };
        if limits.max_memory_mb < MIN_MEMORY_MB {
            return Err(CoreError::invalid(format!(
                "server.limits.max_memory_mb must be at least {MIN_MEMORY_MB}"
            )));
        }
        if !(limits.max_cpus.is_finite() && limits.max_cpus > 0.0 && limits.max_cpus <= MAX_CPUS) {
            return Err(CoreError::invalid(format!(
                "server.limits.max_cpus must be above 0 and at most {MAX_CPUS}"
            )));
        }
        if limits.max_pids_limit < 1 {
            return Err(CoreError::invalid(
                "server.limits.max_pids_limit must be at least 1",
            ));
        }
        let defaults = ResourceDefaults {
            memory_mb: s.defaults.memory_mb.unwrap_or(512),
            cpus: s.defaults.cpus.unwrap_or(1.0),
            pids_limit: s.defaults.pids_limit.unwrap_or(256),
        };
        // The defaults go through the same checks as a request, so a bad default is reported
        // at startup rather than on every launch.
        crate::policy::check_memory_mb(defaults.memory_mb, &limits)
            .and_then(|_| crate::policy::check_cpus(defaults.cpus, &limits))
            .and_then(|_| crate::policy::check_pids_limit(defaults.pids_limit, &limits))
            .map_err(|e| CoreError::invalid(format!("server.defaults: {e}")))?;

        let heartbeat_interval_secs = s.heartbeat_interval_secs.unwrap_or(5);
        let node_grace_secs = s.node_grace_secs.unwrap_or(60);
        if heartbeat_interval_secs == 0 {
            return Err(CoreError::invalid(
                "server.heartbeat_interval_secs must be at least 1",
            ));
        }
        if node_grace_secs <= heartbeat_interval_secs {
            return Err(CoreError::invalid(
                "server.node_grace_secs must be longer than server.heartbeat_interval_secs",
            ));
        }

        Ok(ServerSettings {
            listen,
            data_dir: s
                .data_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            public_address: s.public_address.clone().filter(|a| !a.trim().is_empty()),
            admin_token: s.admin_token.clone().or_else(|| self.kisara.token.clone()),
            subnet_pool,
            allow_public_subnets,
            allow_privileged: s.allow_privileged.unwrap_or(false),
            allow_host_binds: s.allow_host_binds.unwrap_or(false),
            cap_allow,
            publish_host_ip,
            dns,
            defaults,
            limits,
            heartbeat_interval: Duration::from_secs(heartbeat_interval_secs),
            node_grace: Duration::from_secs(node_grace_secs),
            scheduler: s.scheduler.unwrap_or_default(),
            cpu_overcommit: overcommit("server.cpu_overcommit", s.cpu_overcommit, 4.0)?,
            memory_overcommit: overcommit("server.memory_overcommit", s.memory_overcommit, 1.0)?,
            tls: match (&s.tls_cert, &s.tls_key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                (None, None) => None,
                _ => {
                    return Err(CoreError::invalid(
                        "server.tls_cert and server.tls_key go together: set both or neither",
                    ))
                }
            },
            instances: self.instances.resolve()?,
            flag_secret: self.flags.secret.clone().filter(|s| !s.expose().is_empty()),
            exposure: crate::exposure::resolve(
                s.exposure,
                s.port_range,
                &self.gateway,
                s.public_address.as_deref(),
            )?,
            orphans: s.orphans.unwrap_or_default(),
            orphan_recheck: match s.orphan_recheck_secs.unwrap_or(45) {
                n @ 1..=3600 => std::time::Duration::from_secs(n),
                n => {
                    return Err(CoreError::invalid(format!(
                        "server.orphan_recheck_secs must be between 1 and 3600, got {n}"
                    )))
                }
            },
            warm_networks: match s.warm_networks.unwrap_or(2) {
                n @ 0..=64 => n,
                n => {
                    return Err(CoreError::invalid(format!(
                        "server.warm_networks must be at most 64, got {n}"
                    )))
                }
            },
        })
    }

    /// Resolves and validates an agent's settings.
    pub fn node_settings(&self) -> Result<NodeSettings> {
        let n = &self.node;
        let kc = &self.kisara_client;
        if let Some(name) = &n.name {
            if !crate::ids::is_valid_name(name) {
                return Err(CoreError::invalid(format!(
                    "node.name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]*"
                )));
            }
        }
        let server_url = n
            .server_url
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVER_URL.to_string());
        if !(server_url.starts_with("http://") || server_url.starts_with("https://")) {
            return Err(CoreError::invalid(format!(
                "node.server_url {server_url:?} must start with http:// or https://"
            )));
        }
        for key in n.labels.keys() {
            if key.trim().is_empty() {
                return Err(CoreError::invalid("node.labels: empty label key"));
            }
        }
        // Kisara's client address was often `0.0.0.0`, which is where it listened rather than
        // where players can reach it; that is no public address.
        let kisara_address = kc
            .address
            .clone()
            .filter(|a| !a.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()));
        let publish_host_ip = n
            .publish_host_ip
            .as_deref()
            .map(|ip| parse_ip("node.publish_host_ip", ip))
            .transpose()?;
        let allow_public = self.server.allow_public_subnets.unwrap_or(false);
        let subnet_pool = n
            .subnet_pool
            .as_ref()
            .or(kc.network_cidrs.as_ref())
            .map(|entries| SubnetPool::parse(entries, allow_public))
            .transpose()?;
        Ok(NodeSettings {
            name: n.name.clone(),
            server_url,
            join_token: n.join_token.clone().or_else(|| self.kisara.token.clone()),
            data_dir: n.data_dir.clone(),
            public_address: n
                .public_address
                .clone()
                .or(kisara_address)
                .filter(|a| !a.trim().is_empty()),
            labels: n.labels.clone(),
            max_containers: n.max_containers.or(kc.max_container).unwrap_or(0),
            publish_host_ip,
            subnet_pool,
            network_in: n.network_in.or(kc.network_in),
            network_out: n.network_out.or(kc.network_out),
            ca_file: n.ca_file.clone(),
            exposure: kisara_api::NodeExposure {
                mode: n.exposure,
                port_range: n.port_range,
                network_in_kbps: n.network_in.or(kc.network_in),
                network_out_kbps: n.network_out.or(kc.network_out),
            },
            isolation: n.isolation.unwrap_or(true),
        })
    }
}

/// An overcommit factor: finite, at least 0.1 and at most 1000.
fn overcommit(what: &str, v: Option<f64>, default: f64) -> Result<f64> {
    let v = v.unwrap_or(default);
    if v.is_finite() && (0.1..=1000.0).contains(&v) {
        Ok(v)
    } else {
        Err(CoreError::invalid(format!(
            "{what} must be between 0.1 and 1000, got {v}"
        )))
    }
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(CoreError::invalid(format!(
            "{name} must be true or false, not {value:?}"
        ))),
    }
}

fn parse_ip(what: &str, text: &str) -> Result<IpAddr> {
    text.trim()
        .parse()
        .map_err(|_| CoreError::invalid(format!("{what}: {text:?} is not an IP address")))
}

fn parse_socket_addr(what: &str, text: &str) -> Result<SocketAddr> {
    text.trim().parse().map_err(|_| {
        CoreError::invalid(format!(
            "{what}: {text:?} is not an IP:PORT address (e.g. 127.0.0.1:7474)"
        ))
    })
}

fn parse_labels(what: &str, text: &str) -> Result<BTreeMap<String, String>> {
    text.split(',')
        .map(str::trim)
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(CoreError::invalid(format!(
                "{what}: {kv:?} is not KEY=VALUE"
            ))),
        })
        .collect()
}

/// Kisara wrote lists as one comma-separated string (`network_cidrs = "a,b"`); we also take a
/// TOML array. Splitting on commas happens where the entries are parsed.
fn opt_string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Option::<OneOrMany>::deserialize(d)?.map(|v| match v {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KISARA_FILE: &str = r#"
[kisara]
token = "test"
mode = "dev"
dns = "8.8.8.8"

[kisaraClient]
address = "0.0.0.0"
port = 25570
network_in = 52428800
network_out = 52428800
max_container = 80
db_path = "db/kisara.db"
network_cidrs = "172.[128-255].[0-255].0/24"

[kisaraServer]
address = "0.0.0.0"
port = 7474

[takina]
token = "testtest"
"#;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn orphans_are_removed_unless_configured_to_be_reported() {
        let parse = |t: &str| Config::from_toml_str(t).and_then(|c| c.server_settings());
        assert_eq!(parse("").unwrap().orphans, OrphanPolicy::Remove);
        let report = parse("[server]\norphans = \"report\"\n").unwrap();
        assert_eq!(report.orphans, OrphanPolicy::Report);
        assert_eq!(
            parse("").unwrap().orphan_recheck,
            std::time::Duration::from_secs(45)
        );
        assert_eq!(
            parse("[server]\norphan_recheck_secs = 2\n")
                .unwrap()
                .orphan_recheck,
            std::time::Duration::from_secs(2)
        );
        let zero = parse("[server]\norphan_recheck_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("orphan_recheck_secs"), "{zero}");
        let bad = parse("[server]\norphans = \"delete\"\n")
            .unwrap_err()
            .to_string();
        assert!(bad.contains("orphans") || bad.contains("delete"), "{bad}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml_str("").unwrap();
        let s = c.server_settings().unwrap();
        assert_eq!(s.listen, "127.0.0.1:7474".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(s.subnet_pool, SubnetPool::default());
        assert!(!s.allow_privileged && !s.allow_host_binds && !s.allow_public_subnets);
        assert!(s.cap_allow.is_empty() && s.admin_token.is_none());
        assert_eq!(s.publish_host_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(
            s.defaults,
            ResourceDefaults {
                memory_mb: 512,
                cpus: 1.0,
                pids_limit: 256
            }
        );
        assert_eq!(s.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(s.node_grace, Duration::from_secs(60));
        assert_eq!(s.scheduler, crate::scheduler::Strategy::Spread);
        assert_eq!((s.cpu_overcommit, s.memory_overcommit), (4.0, 1.0));
        assert_eq!(s, ServerSettings::default());
        let n = c.node_settings().unwrap();
        assert_eq!(n.server_url, DEFAULT_SERVER_URL);
        assert_eq!(n.max_containers, 0);
        assert!(n.subnet_pool.is_none() && n.join_token.is_none());
    }

    #[test]
    fn kisara_file_maps_onto_ours() {
        let c = Config::from_toml_str(KISARA_FILE).unwrap();
        // Kisara's default pool is public space: refused until the operator says so.
        let err = c.server_settings().unwrap_err().to_string();
        assert!(err.contains("allow_public_subnets"), "{err}");

        let c = Config::from_toml_str(&format!(
            "{KISARA_FILE}\n[server]\nallow_public_subnets = true\n"
        ))
        .unwrap();
        let s = c.server_settings().unwrap();
        assert_eq!(s.listen, "0.0.0.0:7474".parse().unwrap());
        assert_eq!(s.subnet_pool.len(), 128 * 256);
        assert_eq!(s.admin_token.as_ref().map(Secret::expose), Some("test"));
        assert_eq!(s.dns, vec!["8.8.8.8".parse::<IpAddr>().unwrap()]);
        let n = c.node_settings().unwrap();
        assert_eq!(n.max_containers, 80);
        assert_eq!(n.join_token.as_ref().map(Secret::expose), Some("test"));
        assert_eq!(n.public_address, None, "0.0.0.0 is not a public address");
        assert_eq!(n.network_in, Some(52428800));
        assert_eq!(n.subnet_pool.map(|p| p.len()), Some(128 * 256));
    }

    #[test]
    fn our_sections_win_over_kisara_keys() {
        let c = Config::from_toml_str(
            r#"
[kisara]
token = "shared"
[kisaraServer]
port = 9000
[kisaraClient]
address = "203.0.113.5"
max_container = 10
network_cidrs = "10.1.0.0/16/24"
[server]
subnet_pool = ["10.2.[0-3].0/24"]
admin_token = "admin"
[node]
max_containers = 20
"#,
        )
        .unwrap();
        let s = c.server_settings().unwrap();
        assert_eq!(s.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.subnet_pool.len(), 4);
        assert_eq!(s.admin_token.as_ref().map(Secret::expose), Some("admin"));
        let n = c.node_settings().unwrap();
        assert_eq!(n.max_containers, 20);
        assert_eq!(n.public_address.as_deref(), Some("203.0.113.5"));
        assert_eq!(n.join_token.as_ref().map(Secret::expose), Some("shared"));
        assert_eq!(n.subnet_pool.map(|p| p.len()), Some(256));
    }

    #[test]
    fn unknown_keys_are_named() {
        let cases = [
            ("[server]\nlisten_addr = \"x\"\n", "listen_addr"),
            ("[server.defaults]\nmemory = 5\n", "memory"),
            ("[node]\nlabel = {}\n", "label"),
            ("[kisaraClient]\nmax_containers = 3\n", "max_containers"),
            ("[kisara]\ntokn = \"x\"\n", "tokn"),
            ("[sever]\n", "sever"),
            ("top = 1\n", "top"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text:?}: {err}");
        }
    }

    #[test]
    fn invalid_values_are_reported() {
        let cases = [
            ("[server]\nlisten = \"localhost\"\n", "server.listen"),
            ("[server]\nsubnet_pool = \"8.8.8.0/24\"\n", "8.8.8.0/24"),
            ("[server]\ncap_allow = [\"NET_ADMN\"]\n", "NET_ADMN"),
            ("[server]\npublish_host_ip = \"x\"\n", "publish_host_ip"),
            ("[server.defaults]\ncpus = 0.0\n", "server.defaults"),
            (
                "[server.defaults]\nmemory_mb = 99999999\n",
                "server.defaults",
            ),
            ("[server.limits]\nmax_cpus = 65.0\n", "max_cpus"),
            ("[server]\nheartbeat_interval_secs = 0\n", "heartbeat"),
            ("[server]\nnode_grace_secs = 5\n", "node_grace_secs"),
            ("[server]\ncpu_overcommit = 0.0\n", "server.cpu_overcommit"),
            ("[kisara]\ndns = \"dns.google\"\n", "dns.google"),
            (
                "[kisaraServer]\naddress = \"example.com\"\n",
                "kisaraServer.address",
            ),
        ];
        for (text, needle) in cases {
            let c = Config::from_toml_str(text).unwrap();
            let err = c.server_settings().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
        let node_cases = [
            ("[node]\nname = \"-x\"\n", "node.name"),
            ("[node]\nserver_url = \"ftp://x\"\n", "server_url"),
            (
                "[node]\npublish_host_ip = \"nope\"\n",
                "node.publish_host_ip",
            ),
        ];
        for (text, needle) in node_cases {
            let c = Config::from_toml_str(text).unwrap();
            let err = c.node_settings().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn env_overrides_file() {
        let mut c = Config::from_toml_str(
            "[server]\nlisten = \"127.0.0.1:1\"\nallow_privileged = true\nadmin_token = \"file\"\n",
        )
        .unwrap();
        c.apply_env(env(&[
            ("KISARA_LISTEN", "0.0.0.0:8000"),
            ("KISARA_DATA_DIR", "/tmp/k"),
            ("KISARA_PUBLIC_ADDRESS", "198.51.100.7"),
            ("KISARA_SUBNET_POOL", "10.5.0.0/24, 10.6.[0-1].0/24"),
            ("KISARA_ALLOW_PRIVILEGED", "off"),
            ("KISARA_ALLOW_HOST_BINDS", "YES"),
            ("KISARA_TOKEN", "env-token"),
            ("KISARA_JOIN_TOKEN", "join"),
            ("KISARA_NODE_NAME", "node-1"),
            ("KISARA_SERVER_URL", "https://kisara.example:7474"),
            ("KISARA_NODE_LABELS", "zone=a, gpu=no"),
            ("KISARA_MAX_CONTAINERS", "12"),
            ("KISARA_PUBLISH_HOST_IP", "127.0.0.1"),
            ("KISARA_ALLOW_PUBLIC_SUBNETS", ""),
        ]))
        .unwrap();
        let s = c.server_settings().unwrap();
        assert_eq!(s.listen, "0.0.0.0:8000".parse().unwrap());
        assert_eq!(s.data_dir, PathBuf::from("/tmp/k"));
        assert_eq!(s.public_address.as_deref(), Some("198.51.100.7"));
        assert_eq!(s.subnet_pool.len(), 3);
        assert!(!s.allow_privileged && s.allow_host_binds && !s.allow_public_subnets);
        assert_eq!(
            s.admin_token.as_ref().map(Secret::expose),
            Some("env-token")
        );
        assert_eq!(s.publish_host_ip.to_string(), "127.0.0.1");
        let n = c.node_settings().unwrap();
        assert_eq!(n.name.as_deref(), Some("node-1"));
        assert_eq!(n.server_url, "https://kisara.example:7474");
        assert_eq!(n.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(n.labels.get("gpu").map(String::as_str), Some("no"));
        assert_eq!(n.max_containers, 12);
        assert_eq!(n.join_token.as_ref().map(Secret::expose), Some("join"));
        assert_eq!(n.public_address.as_deref(), Some("198.51.100.7"));
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let cases = [
            ("KISARA_ALLOW_PRIVILEGED", "maybe"),
            ("KISARA_MAX_CONTAINERS", "-1"),
            ("KISARA_NODE_LABELS", "novalue"),
        ];
        for (k, v) in cases {
            let err = Config::default().apply_env(env(&[(k, v)])).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let c = Config::from_toml_str(
            "[kisara]\ntoken = \"s3cret-a\"\n[node]\njoin_token = \"s3cret-b\"\n",
        )
        .unwrap();
        let debug = format!("{c:?} {:?} {:?}", c.server_settings(), c.node_settings());
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/ exists at the repo root") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                c.server_settings()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                c.node_settings()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen > 0, "no example configuration under {}", dir.display());
    }
}
