//! `kisara`: a cluster-level Docker. This file only parses the command line and hands off to
//! the libraries; `up`, `server` and `node` live in `daemon.rs`, client verbs in `cli/`.

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: the control plane allocates and frees many small
/// objects per request (JSON, frames, rows); the scale benchmark spends about a sixth less CPU
/// per launch with it (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bundle_cmd;
mod cert;
mod cli;
mod daemon;
mod gateway_cmd;

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
    /// Serve the gateway's public ports for a server (`--url`, admin `--token`) from this
    /// machine; run the server with `[gateway] listen = false`.
    Gateway(gateway_cmd::GatewayArgs),
    /// Build a bundle (cluster image) from a Kisarafile.
    Build(bundle_cmd::BuildArgs),
    /// Write a bundle to a file (an OCI image layout in a tar, optionally zstd).
    Save(bundle_cmd::SaveArgs),
    /// Read a saved bundle into the local bundle store (every blob is checked).
    Load(bundle_cmd::LoadArgs),
    /// Push a bundle to an OCI registry.
    Push(bundle_cmd::PushArgs),
    /// Pull a bundle from an OCI registry.
    Pull(bundle_cmd::PullArgs),
    /// Bundles: ls, inspect, rm, tag, images (into nodes), up, down.
    #[command(subcommand)]
    Bundle(bundle_cmd::BundleCommand),
    /// Make a CA and a server certificate for TLS (`[server] tls_cert`/`tls_key`).
    Cert(cert::CertArgs),
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
            Command::Node(NodeCli { agent, .. }) => {
                daemon::node(agent, cli.client.ca.clone()).await.map(|_| 0)
            }
            Command::Gateway(a) => gateway_cmd::run(cli.client, a).await.map(|_| 0),
            Command::Build(a) => bundle_cmd::build(cli.client, a).await,
            Command::Save(a) => bundle_cmd::save(cli.client, a).await,
            Command::Load(a) => bundle_cmd::load(cli.client, a).await,
            Command::Push(a) => bundle_cmd::push(cli.client, a).await,
            Command::Pull(a) => bundle_cmd::pull(cli.client, a).await,
            Command::Bundle(c) => bundle_cmd::bundle(cli.client, c).await,
            Command::Client(c) => cli::run(cli.client, c).await,
            Command::Cert(a) => cert::run(a),
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
