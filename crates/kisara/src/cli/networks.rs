//! `network ls | create | inspect | rm`.

use clap::Subcommand;
use kisara_client::{Client, CreateNetworkRequest};

use super::containers::{each_id, parse_key_value};
use super::output::{self, Output};

#[derive(Debug, Subcommand)]
pub enum NetworkCommand {
    /// List networks.
    #[command(visible_alias = "list")]
    Ls {
        /// Only this node (id or name).
        #[arg(long)]
        node: Option<String>,
    },
    /// Create a network that containers can join with `run --network`.
    Create {
        name: String,
        /// Subnet, e.g. 10.201.3.0/24; the next free one from the pool otherwise.
        #[arg(long)]
        subnet: Option<String>,
        /// No gateway: members reach only each other.
        #[arg(long)]
        internal: bool,
        /// Allow outbound traffic.
        #[arg(long)]
        internet: bool,
        /// Node (id or name); the scheduler picks one otherwise.
        #[arg(long)]
        node: Option<String>,
        /// Extra label.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
    },
    /// Show a network as JSON.
    Inspect { id: String },
    /// Remove networks.
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

pub async fn run(client: &Client, out: &Output, cmd: NetworkCommand) -> anyhow::Result<i32> {
    match cmd {
        NetworkCommand::Ls { node } => ls(client, out, node.as_deref()).await,
        NetworkCommand::Create {
            name,
            subnet,
            internal,
            internet,
            node,
            labels,
        } => {
            let req = CreateNetworkRequest {
                name,
                subnet,
                internal,
                internet,
                node,
                node_selector: Default::default(),
                labels: labels.into_iter().collect(),
            };
            let n = client.create_network(&req).await?;
            if out.json {
                out.print_json(&n)?;
            } else {
                output::line(&n.id)?;
            }
            Ok(0)
        }
        NetworkCommand::Inspect { id } => {
            out.print_json(&client.network(&id).await?)?;
            Ok(0)
        }
        NetworkCommand::Rm { ids } => {
            each_id(out, &ids, async |id| client.remove_network(id).await).await
        }
    }
}

async fn ls(client: &Client, out: &Output, node: Option<&str>) -> anyhow::Result<i32> {
    let list = client.list_networks(node).await?;
    output::warn_node_errors(&list.node_errors);
    if out.json {
        out.print_json(&list)?;
        return Ok(0);
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut t = output::table(&[
        "ID", "NAME", "NODE", "SUBNET", "GATEWAY", "INTERNAL", "INTERNET", "OWNED BY",
    ]);
    for n in &list.items {
        t.add_row(vec![
            output::short_id(&n.id),
            &n.name,
            output::short_id(&n.node_id),
            &n.subnet,
            output::or_dash(n.gateway.as_deref()),
            yes_no(n.internal),
            yes_no(n.internet),
            output::or_dash(n.owned_by.as_deref().map(output::short_id)),
        ]);
    }
    output::print_table(&t)?;
    Ok(0)
}
