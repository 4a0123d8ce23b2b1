//! `kisara`: a cluster-level Docker. This file only parses the command line and hands off to
//! the libraries; `up`, `server` and `node` live in `daemon.rs`, client verbs in `cli/`.

use clap::{Parser, Subcommand};

mod cli;
mod daemon;

#[derive(Parser)]
#[command(
    name = "kisara",
    version,
    about = "A cluster-level Docker for CTF/AWD ranges"
)]
struct Cli {
    #[command(flatten)]
    client: cli::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server and one local node agent in one process, on the local Docker Engine.
    Up(daemon::UpArgs),
    /// Run the control plane alone; nodes join with `kisara node`.
    Server(daemon::ServerArgs),
    /// Run a node agent (`kisara node --server URL --join-token T`), or inspect nodes
    /// (`kisara node ls|inspect`).
    Node(NodeCli),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// `kisara node` is both the agent and the node verbs: with a verb it is a client call.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct NodeCli {
    #[command(subcommand)]
    verb: Option<cli::nodes::NodeCommand>,
    #[command(flatten)]
    agent: daemon::NodeArgs,
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(async move {
        let result = match cli.command {
            Command::Up(a) => daemon::up(a).await.map(|_| 0),
            Command::Server(a) => daemon::server(a).await.map(|_| 0),
            Command::Node(NodeCli {
                verb: Some(verb), ..
            }) => cli::run(cli.client, cli::ClientCommand::Node(verb)).await,
            Command::Node(NodeCli { agent, .. }) => daemon::node(agent).await.map(|_| 0),
            Command::Client(c) => cli::run(cli.client, c).await,
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                1
            }
        }
    });
    std::process::exit(code);
}
