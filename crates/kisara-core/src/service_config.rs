//! Kisara-the-original's `ServiceConfig` → [`ServicePlan`], with its checks: `total_score`
//! equals the sum of the flags' scores, `network_count` the number of distinct networks,
//! `container_count` the number of containers, and networks with `random_cidr` are named by
//! one capital letter. A failed check is an error naming it.
//!
//! A `random_cidr` network is made fresh for each instance from the subnet pool; one without
//! it names an existing Kisara network (a shared AWD game network). Containers reach each other
//! by their `name` (a Kisara extension; `c0`, `c1`, ... by default). A container that names no
//! network joins the service's default network.

use std::collections::BTreeMap;

use kisara_api::{PortSpec, Protocol, ServiceConfig};

use crate::compose::DEFAULT_NETWORK;
use crate::service_plan::{
    check_member_name, FlagSpec, NetworkJoin, PlannedContainer, PlannedNetwork, ServicePlan,
};
use crate::{CoreError, Result};

pub fn plan(config: &ServiceConfig) -> Result<ServicePlan> {
    if config.container_count != config.containers.len() {
        return Err(CoreError::invalid(format!(
            "check container_count failed: container_count is {} but there are {} containers",
            config.container_count,
            config.containers.len()
        )));
    }
    let score: i64 = config
        .containers
        .iter()
        .flat_map(|c| c.flags.iter())
        .try_fold(0i64, |acc, f| acc.checked_add(f.flag_score))
        .ok_or_else(|| CoreError::invalid("check total_score failed: the flag scores overflow"))?;
    if score != config.total_score {
        return Err(CoreError::invalid(format!(
            "check total_score failed: total_score is {} but the flags' scores add up to {score}",
            config.total_score
        )));
    }
    let mut networks: Vec<PlannedNetwork> = Vec::new();
    for c in &config.containers {
        for n in &c.networks {
            if n.random_cidr {
                let mut chars = n.network.chars();
                let one_capital = matches!((chars.next(), chars.next()), (Some(ch), None) if ch.is_ascii_uppercase());
                if !one_capital {
                    return Err(CoreError::invalid(format!(
                        "check random_cidr failed: network {:?} has random_cidr and must be named by one capital letter (A-Z)",
                        n.network
                    )));
                }
            } else {
                check_member_name("network", &n.network)?;
            }
            match networks.iter().find(|p| p.name == n.network) {
                Some(p) if p.existing.is_none() != n.random_cidr => {
                    return Err(CoreError::invalid(format!(
                        "network {:?} is listed both with and without random_cidr",
                        n.network
                    )))
                }
                Some(_) => {}
                None => networks.push(PlannedNetwork {
                    name: n.network.clone(),
                    internal: false,
                    existing: (!n.random_cidr).then(|| n.network.clone()),
                    labels: BTreeMap::new(),
                }),
            }
        }
    }
    if config.network_count != networks.len() {
        return Err(CoreError::invalid(format!(
            "check network_count failed: network_count is {} but the containers use {} distinct networks",
            config.network_count,
            networks.len()
        )));
    }
    let mut containers = Vec::new();
    for (i, c) in config.containers.iter().enumerate() {
        let name = c.name.clone().unwrap_or_else(|| format!("c{i}"));
        check_member_name("container", &name)?;
        if containers
            .iter()
            .any(|x: &PlannedContainer| x.service == name)
        {
            return Err(CoreError::invalid(format!(
                "two containers are named {name:?}"
            )));
        }
        let mut ports = Vec::new();
        for p in &c.ports {
            let protocol = match p
                .protocol
                .as_deref()
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                None | Some("") | Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                Some(other) => {
                    return Err(CoreError::invalid(format!(
                        "container {name}: port protocol {other:?} must be tcp or udp"
                    )))
                }
            };
            ports.push(PortSpec {
                port: p.port,
                protocol,
            });
        }
        let mut joins: Vec<NetworkJoin> = c
            .networks
            .iter()
            .map(|n| NetworkJoin {
                network: n.network.clone(),
                aliases: Vec::new(),
            })
            .collect();
        joins.dedup_by(|a, b| a.network == b.network);
        if joins.is_empty() {
            joins.push(NetworkJoin {
                network: DEFAULT_NETWORK.into(),
                aliases: Vec::new(),
            });
            if !networks.iter().any(|n| n.name == DEFAULT_NETWORK) {
                networks.push(PlannedNetwork {
                    name: DEFAULT_NETWORK.into(),
                    internal: false,
                    existing: None,
                    labels: BTreeMap::new(),
                });
            }
        }
        containers.push(PlannedContainer {
            service: name,
            image: c.image.clone(),
            command: c.cmd.clone(),
            env: c.env.clone(),
            ports,
            networks: joins,
            flags: c
                .flags
                .iter()
                .map(|f| FlagSpec {
                    command: f.flag_command.clone(),
                    score: f.flag_score,
                    uuid: f.flag_uuid.clone(),
                })
                .collect(),
            ..Default::default()
        });
    }
    Ok(ServicePlan {
        name: None,
        containers,
        networks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_api::{
        ServiceConfigContainer, ServiceConfigFlag, ServiceConfigNetwork, ServiceConfigPort,
    };

    fn config() -> ServiceConfig {
        let flag = |score| ServiceConfigFlag {
            flag_command: "echo $FLAG > /flag".into(),
            flag_score: score,
            flag_uuid: "u".into(),
        };
        let net = |n: &str, random| ServiceConfigNetwork {
            network: n.into(),
            random_cidr: random,
        };
        ServiceConfig {
            containers: vec![
                ServiceConfigContainer {
                    name: Some("web".into()),
                    image: "web:1".into(),
                    ports: vec![ServiceConfigPort {
                        port: 80,
                        protocol: Some("tcp".into()),
                    }],
                    networks: vec![net("A", true), net("B", true)],
                    flags: vec![flag(100), flag(50)],
                    ..Default::default()
                },
                ServiceConfigContainer {
                    image: "db:1".into(),
                    networks: vec![net("B", true)],
                    flags: vec![flag(50)],
                    ..Default::default()
                },
            ],
            total_score: 200,
            network_count: 2,
            container_count: 2,
        }
    }

    #[test]
    fn a_valid_config_plans() {
        let plan = plan(&config()).unwrap();
        assert_eq!(plan.containers.len(), 2);
        assert_eq!(plan.containers[1].service, "c1");
        assert_eq!(plan.containers[0].flags.len(), 2);
        assert_eq!(plan.networks.len(), 2);
        assert!(plan.networks.iter().all(|n| n.existing.is_none()));
    }

    #[test]
    fn each_check_is_named() {
        let mut c = config();
        c.total_score = 150;
        assert!(plan(&c).unwrap_err().to_string().contains("total_score"));
        let mut c = config();
        c.network_count = 3;
        assert!(plan(&c).unwrap_err().to_string().contains("network_count"));
        let mut c = config();
        c.container_count = 1;
        assert!(plan(&c)
            .unwrap_err()
            .to_string()
            .contains("container_count"));
        let mut c = config();
        c.containers[0].networks[0].network = "net1".into();
        assert!(plan(&c).unwrap_err().to_string().contains("random_cidr"));
        let mut c = config();
        c.containers[0].ports[0].protocol = Some("sctp".into());
        assert!(plan(&c).unwrap_err().to_string().contains("sctp"));
    }

    #[test]
    fn a_shared_network_is_joined_not_made() {
        let mut c = config();
        c.containers[1].networks.push(ServiceConfigNetwork {
            network: "game".into(),
            random_cidr: false,
        });
        c.network_count = 3;
        let p = plan(&c).unwrap();
        assert_eq!(p.networks[2].existing.as_deref(), Some("game"));
    }
}
