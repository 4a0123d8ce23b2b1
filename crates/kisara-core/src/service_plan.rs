//! The normalized form of a multi-container service, whatever file it came from.
//!
//! A compose file ([`crate::compose`]) and Kisara's `ServiceConfig` ([`crate::service_config`])
//! both become a [`ServicePlan`]: containers in start order with everything the server needs to
//! resolve each into a [`ContainerConfig`], and the networks they join. Every check that does
//! not need the cluster's state runs while the plan is built, so a launch that starts has
//! nothing left to refuse but what only the node can (a missing image, a full pool).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kisara_api::agent::{ContainerConfig, HealthCheck, NetworkAttachment};
use kisara_api::{labels, LaunchRequest, PortSpec};

use crate::config::ServerSettings;
use crate::ids::is_valid_name;
use crate::policy::{self, LaunchContext};
use crate::{CoreError, Result};

/// A service ready to launch.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePlan {
    /// The file's own name for itself (compose `name:`), if any.
    pub name: Option<String>,
    /// In start order: every container comes after those it depends on.
    pub containers: Vec<PlannedContainer>,
    /// Every network some container joins.
    pub networks: Vec<PlannedNetwork>,
}

/// A network of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedNetwork {
    /// Its name in the file.
    pub name: String,
    /// No gateway: members reach only each other.
    pub internal: bool,
    /// An existing Kisara network (name) joined instead of a fresh one.
    pub existing: Option<String>,
    /// Labels to put on a fresh network (never under `io.kisara.`).
    pub labels: BTreeMap<String, String>,
}

/// When a dependency counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DependCondition {
    /// Created and started.
    Started,
    /// Its healthcheck passes.
    Healthy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependency {
    pub service: String,
    pub condition: DependCondition,
}

/// A network a container joins, with extra names it is known by there (its own name always).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkJoin {
    pub network: String,
    pub aliases: Vec<String>,
}

/// A flag to put into a container. The flag engine (dynamic flags, rotation) reads these; the
/// launch hands them over in one place (see the server's `services` module). The command may
/// carry a flag, so `Debug` masks it.
#[derive(Clone, PartialEq, Eq)]
pub struct FlagSpec {
    /// Kisara's `flag_command`: run in the container to place the flag.
    pub command: String,
    pub score: i64,
    pub uuid: String,
}

impl fmt::Debug for FlagSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlagSpec")
            .field("command", &"***")
            .field("score", &self.score)
            .field("uuid", &self.uuid)
            .finish()
    }
}

/// One container of a service, before the server resolves it.
#[derive(Clone, Default, PartialEq)]
pub struct PlannedContainer {
    /// Its name in the file: the others reach it by this name.
    pub service: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// May carry secrets: `Debug` shows keys only.
    pub env: BTreeMap<String, String>,
    /// Published to players (`ports:`).
    pub ports: Vec<PortSpec>,
    /// Reachable on the service's networks only (`expose:`); recorded, never published.
    pub expose: Vec<PortSpec>,
    /// The first is the container's primary network. Never empty in a built plan.
    pub networks: Vec<NetworkJoin>,
    pub depends_on: Vec<Dependency>,
    pub healthcheck: Option<HealthCheck>,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    pub read_only: bool,
    /// Path → mount options (may be empty).
    pub tmpfs: BTreeMap<String, String>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub user: Option<String>,
    pub workdir: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub restart: Option<String>,
    pub privileged: bool,
    /// Flags to place once the container runs (Kisara's `ServiceConfig`); see [`FlagSpec`].
    pub flags: Vec<FlagSpec>,
}

impl fmt::Debug for PlannedContainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlannedContainer")
            .field("service", &self.service)
            .field("image", &self.image)
            .field("command", &self.command)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("ports", &self.ports)
            .field("networks", &self.networks)
            .field("depends_on", &self.depends_on)
            .field("healthcheck", &self.healthcheck.is_some())
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// Where the server put a service and what it made for it: the ids and the Docker network names
/// each planned network resolved to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceContext {
    pub cluster_id: String,
    pub service_id: String,
    pub node_id: String,
    pub owner: Option<String>,
    pub module: Option<String>,
    /// Planned network name → Docker network name on the node.
    pub networks: BTreeMap<String, String>,
}

/// The Docker name of a service's container: unique per engine, readable in `docker ps`.
pub fn container_docker_name(service_id: &str, member: &str) -> String {
    let mut name = format!("kisara-{service_id}-{member}");
    name.truncate(crate::ids::MAX_NAME_LEN);
    name
}

/// The Docker name of a network made fresh for a service.
pub fn network_docker_name(service_id: &str, network: &str) -> String {
    let mut name = format!("kisara-{service_id}-{network}");
    name.truncate(64);
    name
}

/// Resolves one planned container into what its node creates: the server's hardening policy
/// (the same as for single containers) plus the service's networks, aliases, healthcheck and
/// the compose settings the policy does not know.
pub fn container_config(
    c: &PlannedContainer,
    settings: &ServerSettings,
    ctx: &ServiceContext,
    container_id: &str,
) -> Result<ContainerConfig> {
    let network_of = |name: &str| {
        ctx.networks.get(name).cloned().ok_or_else(|| {
            CoreError::invalid(format!(
                "service {}: network {name:?} was not made for this service",
                c.service
            ))
        })
    };
    let primary = c
        .networks
        .first()
        .ok_or_else(|| CoreError::invalid(format!("service {} joins no network", c.service)))?;
    let req = LaunchRequest {
        image: c.image.clone(),
        name: Some(container_docker_name(&ctx.service_id, &c.service)),
        cmd: c.command.clone(),
        entrypoint: c.entrypoint.clone(),
        env: c.env.clone(),
        ports: c.ports.iter().map(|p| p.to_string()).collect(),
        owner: ctx.owner.clone(),
        module: ctx.module.clone(),
        labels: c.labels.clone(),
        memory_mb: c.memory_mb,
        cpus: c.cpus,
        pids_limit: c.pids_limit,
        privileged: c.privileged,
        cap_add: c.cap_add.clone(),
        user: c.user.clone(),
        workdir: c.workdir.clone(),
        ..Default::default()
    };
    let launch_ctx = LaunchContext {
        cluster_id: ctx.cluster_id.clone(),
        container_id: container_id.to_string(),
        node_id: ctx.node_id.clone(),
        generated_name: container_docker_name(&ctx.service_id, &c.service),
        network: Some(network_of(&primary.network)?),
    };
    let mut config = policy::container_config(&req, settings, &launch_ctx)
        .map_err(|e| prefix(e, &format!("service {}: ", c.service)))?;
    config.network_aliases = aliases(c, primary);
    config.extra_networks = c.networks[1..]
        .iter()
        .map(|j| {
            Ok(NetworkAttachment {
                network: network_of(&j.network)?,
                aliases: aliases(c, j),
            })
        })
        .collect::<Result<_>>()?;
    // `cap_drop` narrows the allow-list the policy kept (everything else is dropped already).
    let dropped: BTreeSet<String> = c
        .cap_drop
        .iter()
        .map(|cap| {
            policy::normalize_capability(cap).ok_or_else(|| {
                CoreError::invalid(format!("service {}: unknown capability {cap:?}", c.service))
            })
        })
        .collect::<Result<_>>()?;
    if dropped.contains("ALL") {
        config.cap_add.retain(|cap| {
            c.cap_add
                .iter()
                .any(|a| policy::normalize_capability(a).as_deref() == Some(cap))
        });
    } else {
        config.cap_add.retain(|cap| !dropped.contains(cap));
    }
    config.read_only = c.read_only;
    config.tmpfs = c.tmpfs.clone();
    config.healthcheck = c.healthcheck.clone();
    config.restart = c.restart.clone();
    config
        .labels
        .insert(labels::SERVICE.to_string(), ctx.service_id.clone());
    config
        .labels
        .insert(labels::SERVICE_MEMBER.to_string(), c.service.clone());
    Ok(config)
}

fn aliases(c: &PlannedContainer, join: &NetworkJoin) -> Vec<String> {
    let mut out = vec![c.service.clone()];
    for a in &join.aliases {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

fn prefix(e: CoreError, p: &str) -> CoreError {
    match e {
        CoreError::Invalid(m) => CoreError::Invalid(format!("{p}{m}")),
        CoreError::Forbidden(m) => CoreError::Forbidden(format!("{p}{m}")),
        CoreError::Conflict(m) => CoreError::Conflict(format!("{p}{m}")),
        CoreError::Exhausted(m) => CoreError::Exhausted(format!("{p}{m}")),
    }
}

/// Checks a plan against the server's limits and resolves every container with placeholder
/// networks, so a plan that passes cannot be refused by the policy once things are made.
pub fn validate(plan: &ServicePlan, settings: &ServerSettings) -> Result<()> {
    let limits = &settings.limits;
    if plan.containers.is_empty() {
        return Err(CoreError::invalid("the service has no containers"));
    }
    if plan.containers.len() > limits.max_service_containers {
        return Err(CoreError::invalid(format!(
            "the service has {} containers; the server allows at most {} \
             (limits.max_service_containers)",
            plan.containers.len(),
            limits.max_service_containers
        )));
    }
    let fresh = plan
        .networks
        .iter()
        .filter(|n| n.existing.is_none())
        .count();
    if fresh > limits.max_service_networks {
        return Err(CoreError::invalid(format!(
            "the service needs {fresh} networks; the server allows at most {} \
             (limits.max_service_networks)",
            limits.max_service_networks
        )));
    }
    let ctx = ServiceContext {
        cluster_id: "validate".into(),
        service_id: "0000000000000000".into(),
        node_id: "validate".into(),
        networks: plan
            .networks
            .iter()
            .map(|n| (n.name.clone(), format!("net-{}", n.name)))
            .collect(),
        ..Default::default()
    };
    for c in &plan.containers {
        container_config(c, settings, &ctx, "0000000000000000")?;
    }
    Ok(())
}

/// A valid name for a container or network inside a service: also a valid DNS label part.
pub fn check_member_name(kind: &str, name: &str) -> Result<()> {
    if is_valid_name(name) && name.len() <= 63 {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "{kind} name {name:?} must match [a-zA-Z0-9][a-zA-Z0-9_.-]* and be at most 63 characters"
        )))
    }
}

/// Puts containers in start order (each after what it depends on; otherwise in file order).
/// A dependency on an unknown container or a cycle is an error that names it.
pub fn start_order(containers: Vec<PlannedContainer>) -> Result<Vec<PlannedContainer>> {
    let names: Vec<String> = containers.iter().map(|c| c.service.clone()).collect();
    for c in &containers {
        for d in &c.depends_on {
            if !names.contains(&d.service) {
                return Err(CoreError::invalid(format!(
                    "service {} depends on {}, which is not defined",
                    c.service, d.service
                )));
            }
            if d.service == c.service {
                return Err(CoreError::invalid(format!(
                    "service {} depends on itself",
                    c.service
                )));
            }
        }
    }
    let mut remaining: Vec<Option<PlannedContainer>> = containers.into_iter().map(Some).collect();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut out = Vec::with_capacity(remaining.len());
    while out.len() < names.len() {
        let next = remaining.iter().position(|slot| {
            slot.as_ref()
                .is_some_and(|c| c.depends_on.iter().all(|d| placed.contains(&d.service)))
        });
        match next.and_then(|i| remaining[i].take()) {
            Some(c) => {
                placed.insert(c.service.clone());
                out.push(c);
            }
            None => {
                let stuck: Vec<&PlannedContainer> = remaining.iter().flatten().collect();
                return Err(CoreError::invalid(format!(
                    "dependency cycle: {}",
                    describe_cycle(&stuck)
                )));
            }
        }
    }
    Ok(out)
}

/// `a -> b -> a` for one cycle among `stuck` (every one of which waits on another of them).
fn describe_cycle(stuck: &[&PlannedContainer]) -> String {
    let by_name: BTreeMap<&str, &PlannedContainer> =
        stuck.iter().map(|c| (c.service.as_str(), *c)).collect();
    let Some(first) = stuck.first() else {
        return String::new();
    };
    let mut path: Vec<&str> = vec![first.service.as_str()];
    let mut current = *first;
    loop {
        let Some(next) = current
            .depends_on
            .iter()
            .find_map(|d| by_name.get(d.service.as_str()))
        else {
            return path.join(" -> ");
        };
        if let Some(i) = path.iter().position(|p| *p == next.service) {
            let mut cycle: Vec<&str> = path[i..].to_vec();
            cycle.push(next.service.as_str());
            return cycle.join(" -> ");
        }
        path.push(next.service.as_str());
        current = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, deps: &[&str]) -> PlannedContainer {
        PlannedContainer {
            service: name.into(),
            image: "busybox".into(),
            networks: vec![NetworkJoin {
                network: "default".into(),
                aliases: vec![],
            }],
            depends_on: deps
                .iter()
                .map(|d| Dependency {
                    service: d.to_string(),
                    condition: DependCondition::Started,
                })
                .collect(),
            ..Default::default()
        }
    }

    fn order(cs: Vec<PlannedContainer>) -> Result<Vec<String>> {
        Ok(start_order(cs)?.into_iter().map(|c| c.service).collect())
    }

    #[test]
    fn dependencies_come_first_else_file_order() {
        assert_eq!(
            order(vec![
                c("web", &["api"]),
                c("api", &["db"]),
                c("db", &[]),
                c("x", &[])
            ])
            .unwrap(),
            ["db", "api", "web", "x"]
        );
        assert_eq!(order(vec![c("b", &[]), c("a", &[])]).unwrap(), ["b", "a"]);
    }

    #[test]
    fn cycles_and_unknowns_are_named() {
        let e = order(vec![
            c("a", &["b"]),
            c("b", &["c"]),
            c("c", &["a"]),
            c("d", &[]),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("cycle") && e.contains("a -> b -> c -> a"), "{e}");
        let e = order(vec![c("a", &["ghost"])]).unwrap_err().to_string();
        assert!(e.contains("ghost"), "{e}");
        let e = order(vec![c("a", &["a"])]).unwrap_err().to_string();
        assert!(e.contains("itself"), "{e}");
    }

    #[test]
    fn resolves_with_aliases_networks_and_hardening() {
        let settings = ServerSettings::default();
        let mut web = c("web", &[]);
        web.networks.push(NetworkJoin {
            network: "back".into(),
            aliases: vec!["www".into()],
        });
        web.cap_drop = vec!["chown".into()];
        web.read_only = true;
        let ctx = ServiceContext {
            service_id: "s1".into(),
            networks: [
                ("default".to_string(), "kisara-s1-default".to_string()),
                ("back".to_string(), "kisara-s1-back".to_string()),
            ]
            .into(),
            ..Default::default()
        };
        let cfg = container_config(&web, &settings, &ctx, "c1").unwrap();
        assert_eq!(cfg.network.as_deref(), Some("kisara-s1-default"));
        assert_eq!(cfg.network_aliases, ["web"]);
        assert_eq!(cfg.extra_networks[0].network, "kisara-s1-back");
        assert_eq!(cfg.extra_networks[0].aliases, ["web", "www"]);
        assert_eq!(cfg.cap_drop, ["ALL"]);
        assert!(!cfg.cap_add.contains(&"CHOWN".to_string()));
        assert!(cfg.cap_add.contains(&"KILL".to_string()));
        assert!(cfg.read_only && cfg.init);
        assert_eq!(cfg.labels[labels::SERVICE], "s1");
        assert_eq!(cfg.labels[labels::SERVICE_MEMBER], "web");
        web.networks.push(NetworkJoin {
            network: "ghost".into(),
            aliases: vec![],
        });
        assert!(container_config(&web, &settings, &ctx, "c1").is_err());
    }

    #[test]
    fn limits_are_configurable() {
        let mut settings = ServerSettings::default();
        let plan = ServicePlan {
            name: None,
            containers: (0..5).map(|i| c(&format!("c{i}"), &[])).collect(),
            networks: vec![PlannedNetwork {
                name: "default".into(),
                internal: false,
                existing: None,
                labels: BTreeMap::new(),
            }],
        };
        validate(&plan, &settings).unwrap();
        settings.limits.max_service_containers = 4;
        let e = validate(&plan, &settings).unwrap_err().to_string();
        assert!(e.contains("max_service_containers"), "{e}");
    }

    #[test]
    fn flags_are_masked() {
        let mut x = c("x", &[]);
        x.flags.push(FlagSpec {
            command: "echo flag{s3cret} > /flag".into(),
            score: 10,
            uuid: "u".into(),
        });
        x.env.insert("FLAG".into(), "flag{s3cret}".into());
        let d = format!("{x:?}");
        assert!(!d.contains("s3cret"), "{d}");
    }
}
