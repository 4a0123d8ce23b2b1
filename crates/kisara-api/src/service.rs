//! Multi-container services: `POST/GET /v1/services`, `GET/DELETE /v1/services/{id}`.
//!
//! A service is a set of containers and networks on one node, launched together from a compose
//! file or from Kisara-the-original's `ServiceConfig`, and stopped together. Its containers
//! reach each other by service name on networks made fresh for each instance; only the ports the
//! file declares under `ports:` are published.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::{ContainerState, PortBinding};

/// `POST /v1/services`: exactly one of `compose` (the YAML text) or `config` (Kisara's
/// `ServiceConfig`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceRequest {
    /// A docker-compose file, as text.
    #[serde(default)]
    pub compose: Option<String>,
    /// Kisara's `ServiceConfig`.
    #[serde(default)]
    pub config: Option<ServiceConfig>,
    /// Owner (team or user). Kisara's `uid` is accepted, as a number or a string.
    #[serde(default, alias = "uid", deserialize_with = "opt_string_or_number")]
    #[schema(value_type = Option<String>)]
    pub owner: Option<String>,
    /// Challenge or module name.
    #[serde(default)]
    pub module: Option<String>,
    /// Variables for the compose file's `${VAR}` / `${VAR:-default}` interpolation. Only
    /// these are seen: the server's own environment never leaks into a service.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Node (id or name) to launch on; the scheduler picks one otherwise.
    #[serde(default)]
    pub node: Option<String>,
    /// Only nodes carrying all these labels are considered.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// A name for the service (defaults to the compose file's `name:`, else `service`).
    #[serde(default)]
    pub name: Option<String>,
    /// Allow outbound traffic from the service's networks (off by default).
    #[serde(default)]
    pub internet: bool,
    /// Seconds to wait for containers that others depend on with `service_healthy`, and for
    /// every container with a healthcheck before the service counts as started (default 120).
    #[serde(default)]
    pub health_timeout_secs: Option<u64>,
    /// Lifetime in seconds (default: the server's `default_ttl_secs`; 0 there = none); at
    /// most `max_ttl_secs`. The whole service is removed within seconds of expiring unless
    /// renewed (`POST /v1/services/{id}/renew`).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// Flags rendered from templates and injected into the service's containers (env,
    /// read-only file written before the start, or exec command once the service is up).
    #[serde(default)]
    pub flags: Vec<ServiceFlagSpec>,
    /// How the service's published ports are exposed (`host` or `gateway`); the node's mode,
    /// else the server's default, when absent (as for a container).
    #[serde(default)]
    pub expose: Option<crate::ExposeMode>,
    /// Bandwidth cap of each of the service's containers' exposed traffic in kbit/s, each
    /// direction (enforced in gateway mode).
    #[serde(default)]
    pub bandwidth_kbps: Option<u64>,
}

/// A flag of a service: a [`crate::FlagSpec`] and the container (its name in the file) that
/// gets it. `Debug` never shows the template (a fixed template is the flag itself).
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceFlagSpec {
    /// The container, by its name in the file (compose service name); default: the one
    /// first in start order.
    #[serde(default)]
    pub container: Option<String>,
    pub template: String,
    /// How the flag gets into the container (default: env `FLAG`).
    #[serde(default)]
    pub inject: crate::FlagInjection,
}

impl ServiceFlagSpec {
    /// The flag spec without its container.
    pub fn spec(&self) -> crate::FlagSpec {
        crate::FlagSpec {
            template: self.template.clone(),
            inject: self.inject.clone(),
        }
    }
}

impl fmt::Debug for ServiceFlagSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceFlagSpec")
            .field("container", &self.container)
            .field("template", &"***")
            .field("inject", &self.inject)
            .finish()
    }
}

/// Kisara-the-original's service description.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub containers: Vec<ServiceConfigContainer>,
    /// Must equal the sum of every flag's `flag_score`.
    #[serde(default)]
    pub total_score: i64,
    /// Must equal the number of distinct networks.
    #[serde(default)]
    pub network_count: usize,
    /// Must equal the number of containers.
    #[serde(default)]
    pub container_count: usize,
}

/// One container of a [`ServiceConfig`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfigContainer {
    /// Kisara extension: the name the others reach it by (default `c0`, `c1`, ...).
    #[serde(default)]
    pub name: Option<String>,
    pub image: String,
    /// Kisara extension: the command (overrides the image's CMD).
    #[serde(default, alias = "command")]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Vec<ServiceConfigPort>,
    #[serde(default)]
    pub networks: Vec<ServiceConfigNetwork>,
    #[serde(default)]
    pub flags: Vec<ServiceConfigFlag>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A port of a [`ServiceConfigContainer`], published to players.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfigPort {
    #[serde(deserialize_with = "u16_or_string")]
    #[schema(value_type = u16)]
    pub port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A network of a [`ServiceConfigContainer`]. With `random_cidr` it is made fresh for each
/// instance from the subnet pool and must be named by one capital letter (`A`); without, it
/// names an existing Kisara network (a shared game network in AWD), which forces the node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfigNetwork {
    pub network: String,
    #[serde(default)]
    pub random_cidr: bool,
}

/// A flag of a [`ServiceConfigContainer`]. `flag_command` may carry a flag, so `Debug` masks it.
#[derive(Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfigFlag {
    #[serde(default)]
    pub flag_command: String,
    #[serde(default)]
    pub flag_score: i64,
    #[serde(default)]
    pub flag_uuid: String,
}

impl fmt::Debug for ServiceConfigFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceConfigFlag")
            .field("flag_command", &"***")
            .field("flag_score", &self.flag_score)
            .field("flag_uuid", &self.flag_uuid)
            .finish()
    }
}

/// Lifecycle state of a service.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Being launched (or a launch a crash interrupted, settled at reconciliation).
    Launching,
    /// Every container runs, and is healthy where it has a healthcheck.
    Running,
    /// Some container has not come up healthy yet.
    Starting,
    /// Some container exited, is unhealthy, or was removed behind Kisara's back.
    Degraded,
    /// The node is not connected, so the state cannot be known.
    Unknown,
}

/// A container's health as its healthcheck reports it (absent without a healthcheck).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Starting,
    Healthy,
    Unhealthy,
}

impl HealthState {
    /// Docker's `State.Health.Status`; `none` and unknown words are no health at all.
    pub fn from_docker(s: &str) -> Option<Self> {
        match s {
            "starting" => Some(HealthState::Starting),
            "healthy" => Some(HealthState::Healthy),
            "unhealthy" => Some(HealthState::Unhealthy),
            _ => None,
        }
    }
}

/// One container of a service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ServiceContainer {
    /// Its name in the file (compose service name): the others reach it by this name.
    pub service: String,
    /// Kisara's container id (also listed by `GET /v1/containers`).
    pub id: String,
    pub docker_id: String,
    /// Docker's container name.
    pub name: String,
    pub image: String,
    pub state: ContainerState,
    pub status: String,
    /// `None` when the container has no healthcheck.
    pub health: Option<HealthState>,
    pub ip_address: Option<String>,
    pub ports: Vec<PortBinding>,
    pub host_port: String,
}

/// One network of a service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ServiceNetwork {
    /// Its name in the file.
    pub name: String,
    /// Kisara's network id.
    pub id: String,
    /// The Docker network's name on the node.
    pub docker_name: String,
    pub subnet: String,
    /// Made for this service (removed with it), or an existing network it joined.
    pub owned: bool,
}

/// A multi-container service.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub node_id: String,
    pub owner: Option<String>,
    pub module: Option<String>,
    pub state: ServiceState,
    /// In start order.
    pub containers: Vec<ServiceContainer>,
    pub networks: Vec<ServiceNetwork>,
    /// Every published port of every container, in container order.
    pub ports: Vec<PortBinding>,
    /// Kisara's `host_port` string over [`Service::ports`].
    pub host_port: String,
    /// Unix seconds.
    pub created_at: i64,
    /// When the service expires (unix seconds); absent: it lives until stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Renewals so far.
    #[serde(default)]
    pub renewals: u32,
    /// The flags injected at launch (target `CONTAINER/env:NAME`, `CONTAINER/file:PATH`,
    /// `CONTAINER/exec`): only in answers to admin callers, never otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<crate::InstanceFlag>>,
}

/// Filters for `GET /v1/services`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ServiceFilter {
    #[serde(default, alias = "uid")]
    pub owner: Option<String>,
    #[serde(default)]
    pub module: Option<String>,
    /// Node id or name.
    #[serde(default)]
    pub node: Option<String>,
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

fn u16_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        S(String),
        I(i64),
    }
    let v = V::deserialize(d)?;
    let n = match &v {
        V::S(s) => s.trim().parse::<i64>().ok(),
        V::I(i) => Some(*i),
    };
    n.and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| serde::de::Error::custom("port must be a number in 1..=65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kisara_service_config_reads() {
        let r: ServiceRequest = serde_json::from_str(
            r#"{"uid": 7, "config": {"containers":[{"image":"web","ports":[{"port":"80","protocol":"tcp"}],
                "networks":[{"network":"A","random_cidr":true}],
                "flags":[{"flag_command":"echo flag{x} > /flag","flag_score":100,"flag_uuid":"u1"}],
                "env":{"K":"V"}}],"total_score":100,"network_count":1,"container_count":1}}"#,
        )
        .unwrap();
        assert_eq!(r.owner.as_deref(), Some("7"));
        let c = r.config.unwrap();
        assert_eq!(c.containers[0].ports[0].port, 80);
        let d = format!("{:?}", c.containers[0].flags);
        assert!(!d.contains("flag{x}"), "{d}");
    }

    #[test]
    fn unknown_field_is_named() {
        let e = serde_json::from_str::<ServiceRequest>(r#"{"compose":"x","composse":"y"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("composse"), "{e}");
    }
}
