//! `node ls | inspect`.

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
}

pub async fn run(client: &Client, out: &Output, cmd: NodeCommand) -> anyhow::Result<i32> {
    match cmd {
        NodeCommand::Ls => ls(client, out).await,
        NodeCommand::Inspect { id } => {
            out.print_json(&client.node(&id).await?)?;
            Ok(0)
        }
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
        "ADDRESS",
        "CPU",
        "MEMORY",
        "CONTAINERS",
        "ENGINE",
    ]);
    for n in &list.items {
        t.add_row(vec![
            output::short_id(&n.id).to_string(),
            n.name.clone(),
            output::node_state(n.state).to_string(),
            output::or_dash(Some(&n.public_address)).to_string(),
            cpu(n),
            memory(n),
            containers(n),
            output::or_dash(Some(&n.engine.engine_version)).to_string(),
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
    }
}
