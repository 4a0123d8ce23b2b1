//! `kisara`: a cluster-level Docker. This file only parses the command line and hands off to
//! the libraries; `up`, `server` and `node` live in `daemon.rs`, client verbs in `cli/`.

use clap::{Parser, Subcommand};

mod cli;
mod daemon;

#[derive(Parser)]
#[command(name = "kisara", version, about = "A cluster-level Docker for CTF/AWD ranges")]
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
    /// Run a node agent that joins a server and drives the local Docker Engine.
    Node(daemon::NodeArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
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
            Command::Node(a) => daemon::node(a).await.map(|_| 0),
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
