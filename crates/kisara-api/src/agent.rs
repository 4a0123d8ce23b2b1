//! The agent channel: one WebSocket per node, dialled by the agent to `GET /v1/agent/connect`.
//!
//! Frames are JSON text messages. The agent opens with [`AgentMessage::Hello`] carrying either
//! the cluster's join token (first contact) or its per-node credential (every later contact);
//! the server answers [`ServerMessage::Welcome`] (with a fresh credential on first contact) or
//! [`ServerMessage::Rejected`] and closes. After that the agent sends its inventory, heartbeats
//! and replies; the server sends requests, each with an id that its reply carries back.
//! Requests whose answers are long (image pulls, followed logs) answer with any number of
//! [`AgentMessage::Stream`] frames and one [`AgentMessage::StreamEnd`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{EngineInfo, ErrorBody, ExecRequest, ExecResult, ImageSummary, NodeStatus, PortSpec};

/// Version of this protocol; a server refuses agents that speak another.
pub const PROTOCOL_VERSION: u32 = 1;

/// The read buffer of each end of the agent channel. The WebSocket library zero-fills its
/// whole read buffer before every read, and its default is 128 KiB: with frames of a few
/// hundred bytes that fill was the largest single cost of a frame. Larger frames still
/// arrive whole (the buffer grows for them).
pub const CHANNEL_READ_BUFFER: usize = 8 * 1024;

/// A secret string (token, credential): serialized as is, never shown by `Debug` or `Display`.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// First frame from an agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    pub protocol_version: u32,
    pub name: String,
    /// The cluster's join token, on first contact.
    pub join_token: Option<Secret>,
    /// Node id and credential from an earlier Welcome, on later contacts.
    pub node_id: Option<String>,
    pub credential: Option<Secret>,
    pub agent_version: String,
    pub engine: EngineInfo,
    /// Address advertised for ports published on this node.
    pub public_address: String,
    pub labels: BTreeMap<String, String>,
    /// Kisara's `max_container`; 0 = unlimited.
    pub max_containers: u32,
    /// How this node exposes ports (absent from older agents: the server's defaults).
    #[serde(default)]
    pub exposure: crate::NodeExposure,
}

/// Frames the agent sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(Hello),
    /// Everything labelled for this cluster on the node's engine; sent after Welcome.
    Inventory {
        containers: Vec<InventoryContainer>,
        networks: Vec<InventoryNetwork>,
    },
    Heartbeat {
        status: NodeStatus,
        /// Image ids and tags on the engine. Sent on the first beat and then every so often
        /// (and after pulls), not on every beat; absent means "unchanged".
        #[serde(default, skip_serializing_if = "Option::is_none")]
        images: Option<Vec<String>>,
    },
    Reply {
        id: u64,
        result: Result<Reply, ErrorBody>,
    },
    Stream {
        id: u64,
        item: serde_json::Value,
    },
    StreamEnd {
        id: u64,
        error: Option<ErrorBody>,
    },
    /// A container of this cluster changed state on its own (today: `die`). Exits that the
    /// server asked for (stop, forced remove) are not reported.
    ContainerEvent {
        event: ContainerEvent,
    },
}

/// A state change the engine reported for one container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerEvent {
    pub docker_id: String,
    /// Docker's action: `die`.
    pub action: String,
    /// The main process's exit code, for `die`.
    pub exit_code: Option<i64>,
    /// When the engine saw it, unix nanoseconds (with the id, it names the fact: a replayed
    /// event is recognised as the same one).
    pub time_nano: i64,
    /// The container's labels (`io.kisara.*` tell which Kisara container it is).
    pub labels: BTreeMap<String, String>,
}

/// Docker's action for a container whose main process ended.
pub const ACTION_DIE: &str = "die";

/// Frames the server sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        node_id: String,
        /// Present on first contact: the agent stores it and uses it from then on.
        credential: Option<Secret>,
        cluster_id: String,
        heartbeat_interval_ms: u64,
    },
    Rejected {
        reason: String,
    },
    Request {
        id: u64,
        op: Operation,
    },
    /// Stop a streaming request (the client went away).
    Cancel {
        id: u64,
    },
}

/// What the server asks an agent to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// Create and start; on any failure the agent removes what it made.
    Launch {
        config: Box<ContainerConfig>,
    },
    Inspect {
        docker_id: String,
    },
    Stop {
        docker_id: String,
        timeout_secs: u32,
    },
    Remove {
        docker_id: String,
        force: bool,
    },
    Exec {
        docker_id: String,
        request: ExecRequest,
    },
    /// Streams [`LogChunk`]s.
    Logs {
        docker_id: String,
        tail: Option<u64>,
        follow: bool,
    },
    ListContainers,
    ListImages,
    /// Streams [`crate::PullProgress`] items.
    PullImage {
        reference: String,
    },
    RemoveImage {
        reference: String,
        force: bool,
    },
    CreateNetwork {
        config: NetworkConfig,
    },
    RemoveNetwork {
        docker_id: String,
    },
    ListNetworks,
    /// Subnets already used by any network on the engine (not only Kisara's).
    UsedSubnets,
    /// Fetch a `docker load` archive from the server at `url_path` (over a connection of its
    /// own, with the node credential, never through this channel) and load it into the
    /// engine. Streams [`crate::BundleLoadProgress`] items.
    LoadImagesFrom {
        url_path: String,
    },
    /// A visitor reached the gateway: connect to `target` (the container's private
    /// `ip:port`), then open a data connection of its own to the server
    /// (`GET /v1/agent/tunnel/{tunnel_id}`, upgraded to raw bytes) and copy both ways. UDP
    /// datagrams travel on it length-prefixed. Answers `Done` once the data connection is
    /// up, or an error (the container refused, the server could not be reached).
    OpenTunnel {
        tunnel_id: String,
        target: String,
        protocol: crate::Protocol,
    },
}

/// Answers to [`Operation`]s that are not streams.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Reply {
    Done,
    Launched(InventoryContainer),
    Container(InventoryContainer),
    Containers(Vec<InventoryContainer>),
    Exec(ExecResult),
    Images(Vec<ImageSummary>),
    NetworkCreated { docker_id: String },
    Networks(Vec<InventoryNetwork>),
    Subnets(Vec<String>),
}

/// A fully resolved container to create: the server has applied its policy (hardening, limits,
/// labels) and the agent creates exactly this.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE`; may carry secrets, so `Debug` shows only the keys.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    /// Host address ports are published on (e.g. `0.0.0.0`).
    pub publish_host_ip: String,
    /// Docker network name to attach to.
    pub network: Option<String>,
    pub network_aliases: Vec<String>,
    pub memory_bytes: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub cap_drop: Vec<String>,
    pub cap_add: Vec<String>,
    pub security_opt: Vec<String>,
    pub init: bool,
    pub privileged: bool,
    pub binds: Vec<String>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub read_only: bool,
    /// Path to mount options, e.g. `/tmp` → `rw,size=64m`.
    pub tmpfs: BTreeMap<String, String>,
    /// Files written into the container after it is created and before it starts (flags):
    /// they are there for the first instruction, also under a read-only root.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ContainerFile>,
    /// A fixed address on `network` (an AWD gamebox keeps its address across a reset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    /// Docker healthcheck; the engine reports the container's health from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthCheck>,
    /// Networks joined besides `network` (before the container starts), with their aliases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_networks: Vec<NetworkAttachment>,
    /// Docker restart policy: `no`, `always`, `unless-stopped`, `on-failure[:N]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    /// Host port leased for a port (`80/tcp` → 30001); ports not named here get one the
    /// engine chooses.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_ports: BTreeMap<String, u16>,
}

/// A container's healthcheck, in the engine's terms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HealthCheck {
    /// `["CMD", prog, args..]`, `["CMD-SHELL", "command"]` or `["NONE"]`.
    pub test: Vec<String>,
    pub interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub retries: Option<u32>,
    pub start_period_ms: Option<u64>,
}

/// A further network a container joins, with the names it is known by there.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkAttachment {
    pub network: String,
    pub aliases: Vec<String>,
}

/// A file to place in a container before it starts. `Debug` never shows the contents.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerFile {
    /// Absolute path in the container; missing parent directories are created.
    pub path: String,
    /// Permission bits, e.g. `0o444`.
    pub mode: u32,
    pub contents: Secret,
}

impl fmt::Debug for ContainerFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContainerFile")
            .field("path", &self.path)
            .field("mode", &format_args!("{:04o}", self.mode))
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ContainerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env_keys: Vec<&str> = self
            .env
            .iter()
            .map(|kv| kv.split_once('=').map_or(kv.as_str(), |(k, _)| k))
            .collect();
        f.debug_struct("ContainerConfig")
            .field("name", &self.name)
            .field("image", &self.image)
            .field("cmd", &self.cmd)
            .field("entrypoint", &self.entrypoint)
            .field("env_keys", &env_keys)
            .field("labels", &self.labels)
            .field("ports", &self.ports)
            .field("network", &self.network)
            .field("memory_bytes", &self.memory_bytes)
            .field("nano_cpus", &self.nano_cpus)
            .field("pids_limit", &self.pids_limit)
            .field("cap_add", &self.cap_add)
            .field("privileged", &self.privileged)
            .field("binds", &self.binds)
            .field("files", &self.files)
            .field("ipv4_address", &self.ipv4_address)
            .field("extra_networks", &self.extra_networks)
            .field("healthcheck", &self.healthcheck.is_some())
            .finish_non_exhaustive()
    }
}

/// A port published on the node's host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedPort {
    pub port: PortSpec,
    pub host_ip: String,
    pub host_port: u16,
}

/// A container as the node's engine reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InventoryContainer {
    pub docker_id: String,
    pub name: String,
    pub image: String,
    pub labels: BTreeMap<String, String>,
    /// Docker's `State.Status` (`running`, `exited`, ...).
    pub state: String,
    /// Docker's status line.
    pub status: String,
    pub network: Option<String>,
    pub ip_address: Option<String>,
    pub published: Vec<PublishedPort>,
    /// Unix seconds.
    pub created: i64,
    /// Docker's health status (`starting`, `healthy`, `unhealthy`) for containers with a
    /// healthcheck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
}

/// A network to create.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkConfig {
    pub name: String,
    pub subnet: String,
    pub gateway: Option<String>,
    pub internal: bool,
    /// IP masquerade on (outbound traffic allowed).
    pub internet: bool,
    pub labels: BTreeMap<String, String>,
    /// Name of the Linux bridge (at most 15 characters). Kisara names its bridges so that
    /// the node's isolation rules match them by prefix (see `kisara-agent`'s `isolation`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_name: Option<String>,
}

/// A network as the node's engine reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InventoryNetwork {
    pub docker_id: String,
    pub name: String,
    pub subnets: Vec<String>,
    pub internal: bool,
    pub labels: BTreeMap<String, String>,
}

/// One piece of a container's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogChunk {
    /// `stdout` or `stderr`.
    pub stream: String,
    pub data: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_debug() {
        let h = Hello {
            protocol_version: PROTOCOL_VERSION,
            name: "n1".into(),
            join_token: Some(Secret("topsecret".into())),
            node_id: None,
            credential: Some(Secret("alsosecret".into())),
            agent_version: "0".into(),
            engine: EngineInfo::default(),
            public_address: "127.0.0.1".into(),
            labels: BTreeMap::new(),
            max_containers: 0,
            exposure: Default::default(),
        };
        let d = format!("{h:?}");
        assert!(!d.contains("topsecret") && !d.contains("alsosecret"), "{d}");
        let c = ContainerConfig {
            env: vec!["FLAG=flag{x}".into()],
            files: vec![ContainerFile {
                path: "/flag".into(),
                mode: 0o444,
                contents: Secret("flag{in-a-file}".into()),
            }],
            ..Default::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("flag{x}") && d.contains("FLAG"), "{d}");
        assert!(!d.contains("flag{in-a-file}") && d.contains("/flag"), "{d}");
    }

    #[test]
    fn frames_round_trip() {
        let m = ServerMessage::Request {
            id: 7,
            op: Operation::Stop {
                docker_id: "abc".into(),
                timeout_secs: 3,
            },
        };
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ServerMessage>(&s).unwrap(), m);
        let r = AgentMessage::Reply {
            id: 7,
            result: Ok(Reply::NetworkCreated {
                docker_id: "n".into(),
            }),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<AgentMessage>(&s).unwrap(), r);
    }
}
