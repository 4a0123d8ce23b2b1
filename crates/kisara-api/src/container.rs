use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

/// A request to launch one container (`POST /v1/containers`).
///
/// Accepts Kisara-the-original's field names: `uid` for `owner` (a number or a string),
/// `port_protocol` (`"80/tcp,22/tcp"`) beside `ports`, `subnet_name` for `network`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LaunchRequest {
    /// Image reference, e.g. `busybox:latest`.
    pub image: String,
    /// Optional container name (unique per node); a name is generated otherwise.
    #[serde(default)]
    pub name: Option<String>,
    /// Command (overrides the image's CMD).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Entrypoint (overrides the image's ENTRYPOINT).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Environment: a map, or a list of `KEY=VALUE` strings.
    #[serde(default, deserialize_with = "env_map_or_list")]
    #[schema(value_type = BTreeMap<String, String>)]
    pub env: BTreeMap<String, String>,
    /// Ports to publish: `"80"`, `"80/tcp"`, `"53/udp"`.
    #[serde(default)]
    pub ports: Vec<String>,
    /// Kisara's comma-separated port list, e.g. `"80/tcp,22/tcp"`; merged with `ports`.
    #[serde(default)]
    pub port_protocol: Option<String>,
    /// Existing network (name or id) to join. Without it the container gets a fresh network of
    /// its own from the subnet pool, removed with the container.
    #[serde(default, alias = "subnet_name")]
    pub network: Option<String>,
    /// Allow outbound traffic from the fresh network (off by default). Ignored with `network`.
    #[serde(default)]
    pub internet: bool,
    /// Owner (team or user). Kisara's `uid` is accepted, as a number or a string.
    #[serde(default, alias = "uid", deserialize_with = "opt_string_or_number")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<String>,
    /// Challenge or module name.
    #[serde(default)]
    pub module: Option<String>,
    /// Extra labels (keys under `io.kisara.` are reserved).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Memory limit in MiB (memory+swap is set to the same value).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores, e.g. `0.5`.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    #[serde(default)]
    pub pids_limit: Option<i64>,
    /// Run privileged: refused unless the server configuration allows it.
    #[serde(default)]
    pub privileged: bool,
    /// Bind mounts `HOST:CONTAINER[:ro]`: refused unless the server configuration allows them.
    #[serde(default)]
    pub binds: Vec<String>,
    /// Extra capabilities beyond the default allow-list (must be in the server's allow-list).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// User to run as.
    #[serde(default)]
    pub user: Option<String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Node (id or name) to launch on; the scheduler picks one otherwise.
    #[serde(default)]
    pub node: Option<String>,
    /// Only nodes carrying all these labels are considered.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Overrides the server's scheduling strategy for this request.
    #[serde(default)]
    pub placement: Option<crate::PlacementStrategy>,
    /// Kisara's `env_mount` (a list of maps merged into `env`).
    #[serde(default)]
    pub env_mount: Vec<BTreeMap<String, String>>,
    /// A retried request with the same key never launches twice: it gets the first one's
    /// container back. Also accepted as the `Idempotency-Key` header.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Lifetime in seconds (default: the server's `default_ttl_secs`; 0 there = none); at
    /// most `max_ttl_secs`. The instance is removed within seconds of expiring unless renewed.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Flags rendered from templates and injected (env, read-only file, or exec command).
    #[serde(default)]
    pub flags: Vec<crate::FlagSpec>,
    /// Kisara's shape: one flag (a fixed value or a template), injected as env `FLAG`, or by
    /// `flag_command` when given.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub flag: Option<crate::agent::Secret>,
    /// Kisara's shape: a shell command run in the container with `$flag` substituted.
    #[serde(default)]
    pub flag_command: Option<String>,
    /// How the ports are exposed (`host` or `gateway`); the node's mode, else the server's
    /// default, when absent.
    #[serde(default)]
    pub expose: Option<crate::ExposeMode>,
    /// Bandwidth cap of this instance's exposed traffic in kbit/s, each direction (enforced
    /// in gateway mode).
    #[serde(default)]
    pub bandwidth_kbps: Option<u64>,
}

/// Transport protocol of a port.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container port (`80/tcp`).
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Where a container port can be reached from outside.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PortBinding {
    pub container_port: u16,
    pub protocol: Protocol,
    /// Address players connect to (the node's advertised address).
    pub public_host: String,
    pub public_port: u16,
}

/// Kisara's `host_port` string: `host:port` per published port, comma-separated, in the same
/// order as the structured `ports` list.
pub fn host_port_string(ports: &[PortBinding]) -> String {
    ports
        .iter()
        .map(|p| format!("{}:{}", p.public_host, p.public_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Lifecycle state of a container as Kisara sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    /// Recorded before the node was asked to create it; a launch in flight, or one a crash
    /// interrupted (settled when the node's inventory is reconciled).
    Launching,
    Created,
    Running,
    Paused,
    Restarting,
    Exited,
    Dead,
    /// Removed behind Kisara's back (found missing when the node's inventory was reconciled).
    Gone,
    /// The node is not connected, so the state cannot be known.
    Unknown,
    /// Its node has been down past the grace period.
    Lost,
}

impl ContainerState {
    /// Maps Docker's `State.Status` string.
    pub fn from_docker(s: &str) -> Self {
        match s {
            "created" => ContainerState::Created,
            "running" => ContainerState::Running,
            "paused" => ContainerState::Paused,
            "restarting" => ContainerState::Restarting,
            "exited" | "removing" => ContainerState::Exited,
            "dead" => ContainerState::Dead,
            _ => ContainerState::Unknown,
        }
    }
}

/// A container managed by Kisara.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Container {
    /// Kisara's id.
    pub id: String,
    /// The Docker Engine's id on its node.
    pub docker_id: String,
    pub name: String,
    pub node_id: String,
    pub image: String,
    pub owner: Option<String>,
    pub module: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Network name the container is attached to.
    pub network: Option<String>,
    /// Private address on that network.
    pub ip_address: Option<String>,
    pub state: ContainerState,
    /// Docker's status line (`Up 3 seconds`), where known.
    pub status: String,
    pub ports: Vec<PortBinding>,
    /// Kisara's `host_port` string, see [`host_port_string`].
    pub host_port: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When the instance expires (unix seconds); absent: it lives until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Renewals so far.
    #[serde(default)]
    pub renewals: u32,
    /// The flags injected at launch: only in answers to admin callers, never otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<crate::InstanceFlag>>,
    /// Bytes the gateway carried for it (gateway mode; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::Traffic>,
}

/// Filters for `GET /v1/containers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ContainerFilter {
    #[serde(default, alias = "uid")]
    pub owner: Option<String>,
    #[serde(default)]
    pub module: Option<String>,
    /// Node id or name.
    #[serde(default)]
    pub node: Option<String>,
    /// Include containers found gone.
    #[serde(default)]
    pub all: Option<bool>,
}

/// `POST /v1/containers/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Command and arguments, e.g. `["sh", "-c", "id"]`.
    pub cmd: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Seconds before the command is abandoned (default 30, at most 600).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
}

/// Result of an exec: output and exit code.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ExecResult {
    pub stdout: String,
    pub stderr: String,
    /// `None` when the command timed out.
    pub exit_code: Option<i64>,
    pub timed_out: bool,
}

/// Query of `GET /v1/containers/{id}/logs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Number of lines from the end (all when absent).
    #[serde(default)]
    pub tail: Option<u64>,
    /// Keep streaming new output.
    #[serde(default)]
    pub follow: Option<bool>,
}

/// Query of `DELETE /v1/containers/{id}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Remove even when running.
    #[serde(default)]
    pub force: Option<bool>,
}

fn env_map_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Env {
        Map(BTreeMap<String, String>),
        List(Vec<String>),
    }
    match Env::deserialize(d)? {
        Env::Map(m) => Ok(m),
        Env::List(l) => l
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(serde::de::Error::custom(format!(
                    "env entry {kv:?} is not KEY=VALUE"
                ))),
            })
            .collect(),
    }
}

fn opt_string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        I(i64),
    }
    Ok(Option::<V>::deserialize(d)?.map(|v| match v {
        V::S(s) => s,
        V::I(i) => i.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kisara_field_names() {
        let r: LaunchRequest = serde_json::from_str(
            r#"{"image":"web","uid":42,"port_protocol":"80/tcp,22/tcp","subnet_name":"teams","module":"pwn1"}"#,
        )
        .unwrap();
        assert_eq!(r.owner.as_deref(), Some("42"));
        assert_eq!(r.network.as_deref(), Some("teams"));
        assert_eq!(r.port_protocol.as_deref(), Some("80/tcp,22/tcp"));
        assert_eq!(r.module.as_deref(), Some("pwn1"));
    }

    #[test]
    fn env_as_list_or_map() {
        let r: LaunchRequest =
            serde_json::from_str(r#"{"image":"x","env":["A=1","B=x=y"]}"#).unwrap();
        assert_eq!(r.env["B"], "x=y");
        let r: LaunchRequest = serde_json::from_str(r#"{"image":"x","env":{"A":"1"}}"#).unwrap();
        assert_eq!(r.env["A"], "1");
        let e = serde_json::from_str::<LaunchRequest>(r#"{"image":"x","env":["NOEQ"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOEQ"), "{e}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = serde_json::from_str::<LaunchRequest>(r#"{"image":"x","imgae":"y"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("imgae"), "{e}");
    }

    #[test]
    fn host_port_string_joins_in_order() {
        let ports = vec![
            PortBinding {
                container_port: 80,
                protocol: Protocol::Tcp,
                public_host: "10.0.0.1".into(),
                public_port: 30001,
            },
            PortBinding {
                container_port: 53,
                protocol: Protocol::Udp,
                public_host: "10.0.0.1".into(),
                public_port: 30002,
            },
        ];
        assert_eq!(host_port_string(&ports), "10.0.0.1:30001,10.0.0.1:30002");
    }
}
