//! `node ls | inspect | cordon | uncordon | drain | label`.

use std::collections::BTreeMap;

use anyhow::bail;
use clap::Subcommand;
use kisara_client::{Client, Node};

use super::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List the nodes with their state and load.
    #[command(visible_alias = "list")]
    Ls,
    /// Show a node as JSON.
    Inspect {
        /// Node id or name.
        id: String,
    },
    /// Place nothing new on a node; what runs there keeps running.
    Cordon {
        /// Node id or name.
        id: String,
    },
    /// Let the scheduler use a node again (clears cordon and drain).
    Uncordon {
        /// Node id or name.
        id: String,
    },
    /// Cordon a node and list the containers still on it. They are not moved (challenge
    /// instances are not migratable): stop them, or let them expire.
    Drain {
        /// Node id or name.
        id: String,
    },
    /// Set labels (`KEY=VALUE`) or remove them (`KEY-`), merged into the node's.
    Label {
        /// Node id or name.
        id: String,
        /// `KEY=VALUE` sets, `KEY-` removes.
        #[arg(required = true)]
        labels: Vec<String>,
    },
}

pub async fn run(client: &Client, out: &Output, cmd: NodeCommand) -> anyhow::Result<i32> {
    match cmd {
        NodeCommand::Ls => ls(client, out).await,
        NodeCommand::Inspect { id } => {
            out.print_json(&client.node(&id).await?)?;
            Ok(0)
        }
        NodeCommand::Cordon { id } => flagged(out, client.cordon_node(&id).await?),
        NodeCommand::Uncordon { id } => flagged(out, client.uncordon_node(&id).await?),
        NodeCommand::Drain { id } => {
            let report = client.drain_node(&id).await?;
            if out.json {
                out.print_json(&report)?;
            } else {
                println!(
                    "{} drained: {} container(s) still on it",
                    report.node.name,
                    report.containers.len()
                );
                for c in &report.containers {
                    println!("{c}");
                }
            }
            Ok(0)
        }
        NodeCommand::Label { id, labels } => {
            let node = client
                .label_node(&id, parse_label_changes(&labels)?)
                .await?;
            if out.json {
                out.print_json(&node)?;
            } else {
                println!("{}", format_labels(&node.labels));
            }
            Ok(0)
        }
    }
}

fn flagged(out: &Output, node: Node) -> anyhow::Result<i32> {
    if out.json {
        out.print_json(&node)?;
    } else {
        println!("{} {}", node.name, scheduling(&node));
    }
    Ok(0)
}

/// `KEY=VALUE` sets, `KEY-` removes (as `kubectl label` writes it).
fn parse_label_changes(args: &[String]) -> anyhow::Result<BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    for a in args {
        if let Some((k, v)) = a.split_once('=') {
            if k.is_empty() {
                bail!("label {a:?} has no key");
            }
            out.insert(k.to_string(), Some(v.to_string()));
        } else if let Some(k) = a.strip_suffix('-').filter(|k| !k.is_empty()) {
            out.insert(k.to_string(), None);
        } else {
            bail!("label {a:?} is neither KEY=VALUE nor KEY-");
        }
    }
    Ok(out)
}

fn format_labels(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `schedulable`, `cordoned`, `draining`, or the connection state when not ready.
fn scheduling(n: &Node) -> &'static str {
    if n.draining {
        "draining"
    } else if n.cordoned {
        "cordoned"
    } else if n.schedulable {
        "schedulable"
    } else {
        output::node_state(n.state)
    }
}

async fn ls(client: &Client, out: &Output) -> anyhow::Result<i32> {
    let list = client.list_nodes().await?;
    output::warn_node_errors(&list.node_errors);
    if out.json {
        out.print_json(&list)?;
        return Ok(0);
    }
    let mut t = output::table(&[
        "ID",
        "NAME",
        "STATE",
        "SCHEDULING",
        "ADDRESS",
        "CPU",
        "MEMORY",
        "CONTAINERS",
        "ENGINE",
        "LABELS",
    ]);
    for n in &list.items {
        t.add_row(vec![
            output::short_id(&n.id).to_string(),
            n.name.clone(),
            output::node_state(n.state).to_string(),
            scheduling(n).to_string(),
            output::or_dash(Some(&n.public_address)).to_string(),
            cpu(n),
            memory(n),
            containers(n),
            output::or_dash(Some(&n.engine.engine_version)).to_string(),
            format_labels(&n.labels),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}

/// `37.5% of 4`: use over the last interval, against the number of cores.
fn cpu(n: &Node) -> String {
    let cpus = if n.status.cpus > 0 {
        n.status.cpus
    } else {
        n.engine.cpus
    };
    format!("{:.1}% of {cpus}", n.status.cpu_percent)
}

/// `1.2 GiB / 7.8 GiB`.
fn memory(n: &Node) -> String {
    let total = if n.status.memory_total > 0 {
        n.status.memory_total
    } else {
        n.engine.memory_total
    };
    format!(
        "{} / {}",
        output::human_bytes(n.status.memory_used),
        output::human_bytes(total)
    )
}

/// `5 (3 running)`, or `5/50 (3 running)` where the node has a container limit.
fn containers(n: &Node) -> String {
    let s = &n.status;
    let limit = if n.max_containers > 0 {
        format!("/{}", n.max_containers)
    } else {
        String::new()
    };
    format!("{}{limit} ({} running)", s.containers, s.containers_running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_client::{EngineInfo, NodeState, NodeStatus};

    fn node() -> Node {
        Node {
            id: "n1".into(),
            name: "local".into(),
            state: NodeState::Ready,
            public_address: "10.0.0.1".into(),
            labels: Default::default(),
            max_containers: 0,
            engine: EngineInfo {
                cpus: 8,
                memory_total: 16 << 30,
                ..Default::default()
            },
            status: NodeStatus {
                cpus: 4,
                cpu_percent: 37.5,
                memory_total: 8 << 30,
                memory_used: 3 << 29,
                containers: 5,
                containers_running: 3,
                ..Default::default()
            },
            agent_version: "0.1.0".into(),
            connected_at: None,
            last_heartbeat: None,
            unknown_containers: vec![],
            cordoned: false,
            draining: false,
            schedulable: true,
            allocation: Default::default(),
        }
    }

    #[test]
    fn columns() {
        let mut n = node();
        assert_eq!(cpu(&n), "37.5% of 4");
        assert_eq!(memory(&n), "1.5 GiB / 8.0 GiB");
        assert_eq!(containers(&n), "5 (3 running)");
        n.max_containers = 50;
        n.status.cpus = 0;
        n.status.memory_total = 0;
        assert_eq!(containers(&n), "5/50 (3 running)");
        assert_eq!(cpu(&n), "37.5% of 8");
        assert_eq!(memory(&n), "1.5 GiB / 16.0 GiB");
        assert_eq!(scheduling(&n), "schedulable");
        n.cordoned = true;
        assert_eq!(scheduling(&n), "cordoned");
        n.draining = true;
        assert_eq!(scheduling(&n), "draining");
    }

    #[test]
    fn label_changes() {
        let got = parse_label_changes(&["zone=a".into(), "gpu-".into(), "x=".into()]).unwrap();
        assert_eq!(got["zone"].as_deref(), Some("a"));
        assert_eq!(got["gpu"], None);
        assert_eq!(got["x"].as_deref(), Some(""));
        assert!(parse_label_changes(&["zone".into()]).is_err());
        assert!(parse_label_changes(&["=a".into()]).is_err());
        assert!(parse_label_changes(&["-".into()]).is_err());
        let labels = BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]);
        assert_eq!(format_labels(&labels), "a=1,b=2");
        assert_eq!(format_labels(&BTreeMap::new()), "-");
    }
}
