//! `kisara-bench scale`: a server (a child process, so that its memory is its own) and many
//! hollow nodes (in this process, over real WebSocket connections), then many launches through
//! the HTTP API. Prints placements per second, API latency p50/p99 and the server's RSS.
//!
//! `kisara-bench serve` is the child: it runs the server on 127.0.0.1:0, prints one line
//! `READY <url> <admin token> <join token>`, and stops when its stdin closes.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use kisara_api::agent::Secret;
use kisara_bench::{
    bench_config, cpu_of, create_networks, launch_many, launch_many_with, launch_request, rss_of,
    wait_ready, HollowNodes, InProcessServer, NodeSpec,
};
use tokio::io::AsyncBufReadExt;

/// The allocator of the `kisara` binary, so the server measured here allocates as it does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Scale benchmark of the Kisara control plane with hollow nodes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark.
    Scale {
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value_t = 100_000)]
        launches: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Kisara's max_container per node (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        max_containers: u32,
        /// Extra `[server]` keys for the server's TOML (e.g. `warm_networks = 0`).
        #[arg(long, default_value = "")]
        server_config: String,
        /// Create N networks first (round-robin over the nodes) and launch onto them
        /// round-robin, instead of a network of its own per container (0 = off).
        #[arg(long, default_value_t = 0)]
        shared_networks: usize,
        /// Worker threads of this process, which runs the hollow nodes and the clients. With
        /// one (a single-threaded runtime) they cost about a quarter less CPU per launch than
        /// with a worker per core, whose threads spend it waking and parking each other; more
        /// let them use more than one core, for rates where one is not enough.
        #[arg(long, default_value_t = 1)]
        load_threads: usize,
    },
    /// The server half (started by `scale`).
    Serve {
        #[arg(long)]
        config: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KISARA_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { config } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(config)),
        Cmd::Scale {
            nodes,
            launches,
            concurrency,
            max_containers,
            server_config,
            shared_networks,
            load_threads,
        } => load_runtime(load_threads)?.block_on(scale(
            nodes,
            launches,
            concurrency,
            max_containers,
            server_config,
            shared_networks,
        )),
    }
}

/// The runtime of the load generator: single-threaded for one thread, else one worker each.
fn load_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()
}

async fn serve(config: String) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = InProcessServer::start(&config, dir.path()).await?;
    println!(
        "READY {} {} {}",
        server.url,
        server.admin_token,
        server.join_token.expose()
    );
    // Until the parent closes our stdin (or goes away).
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {}
    server.stop().await;
    Ok(())
}

async fn scale(
    nodes: usize,
    launches: usize,
    concurrency: usize,
    max_containers: u32,
    server_extra: String,
    shared_networks: usize,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let mut child = std::process::Command::new(exe)
        .args(["serve", "--config", &bench_config(&server_extra)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the server process")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("server stdout")?;
    let line = std::io::BufReader::new(stdout)
        .lines()
        .next()
        .context("the server said nothing")??;
    let parts: Vec<&str> = line.split_whitespace().collect();
    let [ready, url, admin, join] = parts.as_slice() else {
        bail!("unexpected line from the server: {line:?}");
    };
    if *ready != "READY" {
        bail!("unexpected line from the server: {line:?}");
    }
    let (url, admin, join) = (url.to_string(), admin.to_string(), Secret(join.to_string()));

    let state = tempfile::tempdir()?;
    let spec = NodeSpec {
        count: nodes,
        max_containers,
        cpus: 16,
        memory_bytes: 64 << 30,
    };
    let t = Instant::now();
    let hollow = HollowNodes::start(&url, &join, &spec, state.path());
    let client = kisara_client::Client::new(&url, Some(admin.clone()))?;
    wait_ready(&client, nodes, Duration::from_secs(120)).await?;
    println!(
        "{nodes} hollow nodes ready in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let (rss_idle, _) = rss_of(pid).unwrap_or((0, 0));

    let mut req = launch_request();
    req.labels.insert("bench".into(), "scale".into());
    // Networks made first and launched onto round-robin: a launch then costs placement
    // (forced onto its network's node) and the container, not a network of its own.
    let mut shared = Vec::new();
    if shared_networks > 0 {
        // Pool networks are /28s: 13 addresses for containers each.
        if launches > shared_networks * 13 {
            bail!(
                "--shared-networks {shared_networks} holds at most {} containers (13 per /28 \
                 network); raise it or lower --launches",
                shared_networks * 13
            );
        }
        let t = Instant::now();
        shared = create_networks(&client, shared_networks, nodes, concurrency).await?;
        println!(
            "{shared_networks} shared networks made in {:.1}s",
            t.elapsed().as_secs_f64()
        );
    }
    let cpu_before = (cpu_of(pid), cpu_of(std::process::id()));
    let stats = if shared.is_empty() {
        launch_many(&url, &admin, launches, concurrency, req).await?
    } else {
        launch_many_with(&url, &admin, launches, concurrency, move |i| {
            let mut r = req.clone();
            r.network = Some(shared[i % shared.len()].clone());
            r
        })
        .await?
    };
    let (rss, hwm) = rss_of(pid).unwrap_or((0, 0));
    // CPU time per successful launch, of the server and of this process (agents + clients):
    // unlike the wall-clock rate, it does not depend on what else the machine runs.
    let per_launch = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) if stats.ok > 0 => {
            a.saturating_sub(b).as_micros() as f64 / stats.ok as f64
        }
        _ => 0.0,
    };
    let server_us = per_launch(cpu_before.0, cpu_of(pid));
    let bench_us = per_launch(cpu_before.1, cpu_of(std::process::id()));

    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for (_, n) in &stats.placed {
        *per_node.entry(n.clone()).or_default() += 1;
    }
    let (min, max) = (
        per_node.values().min().copied().unwrap_or(0),
        per_node.values().max().copied().unwrap_or(0),
    );
    println!(
        "launches: {} ok, {} failed in {:.1}s with {concurrency} clients",
        stats.ok,
        stats.failed,
        stats.elapsed.as_secs_f64()
    );
    for e in &stats.errors {
        println!("  error: {e}");
    }
    println!("placements/s: {:.0}", stats.per_second());
    println!(
        "latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        stats.percentile(0.50).as_secs_f64() * 1e3,
        stats.percentile(0.99).as_secs_f64() * 1e3,
        stats.percentile(1.0).as_secs_f64() * 1e3
    );
    println!("CPU per launch: server {server_us:.0} µs, hollow nodes + clients {bench_us:.0} µs");
    println!(
        "server RSS: {} MiB after join, {} MiB at the end, peak {} MiB",
        rss_idle >> 20,
        rss >> 20,
        hwm >> 20
    );
    println!(
        "spread: {} nodes used, {min}..{max} containers per node; hollow engines hold {}",
        per_node.len(),
        hollow.containers()
    );
    println!(
        "{}",
        serde_json::json!({
            "nodes": nodes, "launches": launches, "concurrency": concurrency,
            "shared_networks": shared_networks,
            "ok": stats.ok, "failed": stats.failed,
            "seconds": stats.elapsed.as_secs_f64(),
            "placements_per_second": stats.per_second(),
            "p50_ms": stats.percentile(0.5).as_secs_f64() * 1e3,
            "p99_ms": stats.percentile(0.99).as_secs_f64() * 1e3,
            "server_cpu_us_per_launch": server_us, "bench_cpu_us_per_launch": bench_us,
            "server_rss_mib": rss >> 20, "server_peak_rss_mib": hwm >> 20,
            "per_node_min": min, "per_node_max": max,
        })
    );
    hollow.stop().await;
    drop(child.stdin.take());
    let _ = child.wait();
    Ok(())
}
