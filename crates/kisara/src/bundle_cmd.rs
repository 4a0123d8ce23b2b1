//! Cluster image verbs: `build`, `save`, `load`, `push`, `pull` and `bundle ...`.
//!
//! Handlers are thin: the work is in `kisara-bundle`. The local bundle store is
//! `<data-dir>/bundles/` (the data dir of `--data-dir`/`KISARA_DATA_DIR`, else the default),
//! which is also where a `kisara up` on the same data dir finds bundles; verbs that reach the
//! cluster (`bundle images|up|down`) go through the server like any other client.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use kisara_api::BundleImagesRequest;
use kisara_api::{ServiceConfigContainer, ServiceConfigPort};
use kisara_bundle::apps::AppKind;
use kisara_bundle::build::{BuildOptions, Progress};
use kisara_bundle::registry::RegistryOptions;
use kisara_bundle::store::BundleName;
use kisara_bundle::Store;
use kisara_client::{Client, Service, ServiceConfig, ServiceFilter, ServiceRequest};

use crate::cli::output::{self, Output};
use crate::cli::{resolve_token, ClientArgs};

/// Owner given to every service `bundle up` launches: `bundle:<name:tag>`, so the bundle's name
/// and version label what it launched.
pub fn owner_of(name: &BundleName) -> String {
    format!("bundle:{name}")
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The Kisarafile [default: DIR/Kisarafile, else DIR/Kubefile].
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Name of the bundle, `name[:tag]`.
    #[arg(short = 't', long = "tag")]
    pub tag: String,
    /// Build-time variable for ARG, `KEY=VALUE` (repeatable).
    #[arg(long = "build-arg", value_parser = parse_kv)]
    pub build_args: Vec<(String, String)>,
    /// The build context directory.
    #[arg(default_value = ".")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct SaveArgs {
    /// Bundle `name[:tag]`.
    pub name: String,
    /// Output file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Compress with zstd.
    #[arg(long)]
    pub zstd: bool,
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A saved bundle (tar or zstd tar).
    #[arg(short, long)]
    pub input: PathBuf,
}

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to the registry (always so for loopback registries).
    #[arg(long)]
    pub plain_http: bool,
    /// Registry user (with KISARA_REGISTRY_PASSWORD).
    #[arg(long, env = "KISARA_REGISTRY_USER")]
    pub registry_user: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Bundle `name[:tag]`.
    pub name: String,
    /// Where to: `registry/repository:tag` [default: the bundle's name].
    pub reference: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// `registry/repository:tag`.
    pub reference: String,
    /// Local name [default: the repository's last component and the tag].
    #[arg(short = 't', long = "tag")]
    pub tag: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// List the bundles in the local store.
    #[command(visible_alias = "list")]
    Ls,
    /// Show a bundle's manifest (apps, launch plan, env, images with digests) as JSON.
    Inspect { name: String },
    /// Remove bundles (blobs no other bundle uses are freed).
    #[command(visible_alias = "remove")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Give a bundle another name.
    Tag { source: String, target: String },
    /// Load the bundle's images into nodes' engines through the agents, without a registry.
    Images {
        name: String,
        /// One node (id or name).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        node: Option<String>,
        /// Every connected node.
        #[arg(long)]
        all: bool,
    },
    /// Launch the bundle's apps (LAUNCH, else every APP) as services through the control plane,
    /// then run its CMD commands here.
    Up {
        name: String,
        /// Node (id or name) for every app; the scheduler picks one per app otherwise.
        #[arg(long)]
        node: Option<String>,
        /// Allow outbound traffic from the apps' networks.
        #[arg(long)]
        internet: bool,
        /// Seconds to wait for healthchecks (default 120).
        #[arg(long)]
        health_timeout: Option<u64>,
        /// Do not run the bundle's CMD commands afterwards.
        #[arg(long)]
        no_cmd: bool,
    },
    /// Remove every service `bundle up` launched for the bundle (this name and tag only).
    Down { name: String },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn local_store(args: &ClientArgs) -> anyhow::Result<Store> {
    let dir = args.data_dir().join("bundles");
    Store::open(&dir).with_context(|| format!("opening the bundle store {}", dir.display()))
}

fn client(args: &ClientArgs) -> anyhow::Result<Client> {
    let token = resolve_token(args.token.clone(), &args.data_dir())?;
    Ok(Client::new(&args.url, token)?)
}

fn registry_options(a: &RegistryArgs) -> RegistryOptions {
    RegistryOptions {
        plain_http: a.plain_http,
        username: a.registry_user.clone(),
        password: std::env::var("KISARA_REGISTRY_PASSWORD").ok(),
    }
}

fn bytes_bar(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("{msg:20} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Build progress: steps as lines, RUN output indented, exported bytes on a spinner.
struct BuildProgress {
    spinner: ProgressBar,
}

impl Progress for BuildProgress {
    fn step(&self, index: usize, total: usize, text: &str) {
        self.spinner
            .suspend(|| eprintln!("[{index}/{total}] {text}"));
    }
    fn output(&self, line: &str) {
        self.spinner.suspend(|| eprintln!("    {line}"));
    }
    fn message(&self, text: &str) {
        self.spinner.set_message(text.to_string());
        if self.spinner.is_hidden() {
            eprintln!("{text}");
        }
    }
    fn transfer(&self, bytes: u64) {
        self.spinner.set_position(bytes);
    }
}

pub async fn build(args: ClientArgs, a: BuildArgs) -> anyhow::Result<i32> {
    let store = local_store(&args)?;
    let file = match a.file {
        Some(f) => f,
        None => kisara_bundle::kisarafile::Kisarafile::find_in(&a.dir)
            .with_context(|| format!("no Kisarafile or Kubefile in {}", a.dir.display()))?,
    };
    let name = BundleName::parse(&a.tag)?;
    let spinner = if std::io::stderr().is_terminal() {
        let s = ProgressBar::new_spinner();
        s.set_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        s.enable_steady_tick(Duration::from_millis(120));
        s
    } else {
        ProgressBar::hidden()
    };
    let progress = BuildProgress {
        spinner: spinner.clone(),
    };
    let runtime: Arc<dyn kisara_runtime::Runtime> = Arc::new(
        kisara_runtime::docker::DockerRuntime::connect()
            .await
            .context("kisara build takes images from the local Docker Engine")?,
    );
    let opts = BuildOptions {
        kisarafile: file,
        context: a.dir,
        name,
        build_args: a.build_args.into_iter().collect(),
    };
    let built = kisara_bundle::build::build(&store, runtime, &opts, &progress).await;
    spinner.finish_and_clear();
    let built = built?;
    let out = Output { json: args.json };
    if out.json {
        out.print_json(&serde_json::json!({
            "name": built.name.to_string(), "digest": built.digest.to_string(),
            "images": built.manifest.images.iter().map(|i| &i.reference).collect::<Vec<_>>(),
        }))?;
    } else {
        println!(
            "built {} {} ({} app(s), {} image(s), {})",
            built.name,
            built.digest.short(),
            built.manifest.apps.len(),
            built.manifest.images.len(),
            human(built.manifest.images_size())
        );
    }
    Ok(0)
}

pub async fn save(args: ClientArgs, a: SaveArgs) -> anyhow::Result<i32> {
    let store = local_store(&args)?;
    let b = store.get(&a.name)?;
    let pb = bytes_bar(b.size(), "saving");
    let out_path = a.output.clone();
    let zstd = a.zstd;
    let name = a.name.clone();
    let pb2 = pb.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let tmp = out_path.with_extension("partial");
        let f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        store.save(&name, &mut w, zstd, &|n| pb2.set_position(n))?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &out_path)
            .with_context(|| format!("writing {}", out_path.display()))?;
        Ok(())
    })
    .await??;
    pb.finish_and_clear();
    let len = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    println!(
        "saved {} to {} ({})",
        b.name,
        a.output.display(),
        human(len)
    );
    Ok(0)
}

pub async fn load(args: ClientArgs, a: LoadArgs) -> anyhow::Result<i32> {
    let store = local_store(&args)?;
    let input = a.input.clone();
    let names = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<BundleName>> {
        let f =
            std::fs::File::open(&input).with_context(|| format!("opening {}", input.display()))?;
        Ok(store.load(f)?)
    })
    .await??;
    for n in names {
        println!("loaded {n}");
    }
    Ok(0)
}

pub async fn push(args: ClientArgs, a: PushArgs) -> anyhow::Result<i32> {
    let store = local_store(&args)?;
    let reference = a.reference.clone().unwrap_or_else(|| a.name.clone());
    let b = store.get(&a.name)?;
    let pb = bytes_bar(b.size(), "pushing");
    let digest = kisara_bundle::registry::push(
        &store,
        &a.name,
        &reference,
        &registry_options(&a.registry),
        &|done, _| pb.set_position(done),
    )
    .await?;
    pb.finish_and_clear();
    println!("pushed {} to {reference} ({digest})", b.name);
    Ok(0)
}

pub async fn pull(args: ClientArgs, a: PullArgs) -> anyhow::Result<i32> {
    let store = local_store(&args)?;
    let pb = bytes_bar(0, "pulling");
    let name = kisara_bundle::registry::pull(
        &store,
        &a.reference,
        a.tag.as_deref(),
        &registry_options(&a.registry),
        &|done, total| {
            pb.set_length(total);
            pb.set_position(done)
        },
    )
    .await?;
    pb.finish_and_clear();
    println!("pulled {} as {name}", a.reference);
    Ok(0)
}

pub async fn bundle(args: ClientArgs, cmd: BundleCommand) -> anyhow::Result<i32> {
    let out = Output { json: args.json };
    match cmd {
        BundleCommand::Ls => {
            let store = local_store(&args)?;
            let mut rows = Vec::new();
            for l in store.list()? {
                let b = store.get(&l.name.to_string())?;
                rows.push(b);
            }
            if out.json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "name": b.name.to_string(), "digest": b.digest.to_string(),
                            "size": b.size(), "created": b.config.created,
                            "apps": b.config.apps.iter().map(|a| &a.name).collect::<Vec<_>>(),
                            "images": b.config.images.iter().map(|i| &i.reference).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                out.print_json(&v)?;
            } else {
                let mut t = output::table(&["NAME", "DIGEST", "APPS", "IMAGES", "SIZE"]);
                for b in &rows {
                    t.add_row(vec![
                        b.name.to_string(),
                        b.digest.short().to_string(),
                        b.config
                            .apps
                            .iter()
                            .map(|a| a.name.as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                        b.config.images.len().to_string(),
                        human(b.size()),
                    ]);
                }
                output::print_table(&t)?;
            }
            Ok(0)
        }
        BundleCommand::Inspect { name } => {
            let store = local_store(&args)?;
            let b = store.get(&name)?;
            let mut v = serde_json::to_value(&b.config)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("digest".into(), b.digest.to_string().into());
                o.insert("size".into(), b.size().into());
            }
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        BundleCommand::Rm { names } => {
            let store = local_store(&args)?;
            let mut code = 0;
            for n in names {
                match store.remove(&n) {
                    Ok(freed) => println!("removed {n} ({} freed)", human(freed)),
                    Err(e) => {
                        eprintln!("error: {e}");
                        code = 1;
                    }
                }
            }
            Ok(code)
        }
        BundleCommand::Tag { source, target } => {
            let store = local_store(&args)?;
            let name = store.tag(&source, &target)?;
            println!("tagged {source} as {name}");
            Ok(0)
        }
        BundleCommand::Images { name, node, all } => images(&args, &name, node, all).await,
        BundleCommand::Up {
            name,
            node,
            internet,
            health_timeout,
            no_cmd,
        } => {
            let o = UpOptions {
                node,
                internet,
                health_timeout,
                no_cmd,
            };
            up(&args, &out, &name, o).await
        }
        BundleCommand::Down { name } => down(&args, &name).await,
    }
}

/// Makes sure the server has the bundle (uploading it from the local store if not), then has
/// the agents fetch and load its images.
async fn images(
    args: &ClientArgs,
    name: &str,
    node: Option<String>,
    all: bool,
) -> anyhow::Result<i32> {
    let client = client(args)?;
    let bname = BundleName::parse(name)?;
    match client.bundle(&bname.to_string()).await {
        Ok(_) => {}
        Err(e) if e.status() == Some(404) => {
            let store = local_store(args)?;
            let b = store.get(name)?;
            eprintln!("uploading {} to the server", b.name);
            let stage = store.stage()?;
            let path = stage.path().join("upload.tar");
            {
                let f = std::fs::File::create(&path)?;
                let mut w = std::io::BufWriter::new(f);
                store.save(name, &mut w, false, &|_| {})?;
                w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            let f = tokio::fs::File::open(&path).await?;
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
            client.upload_bundle(body).await?;
        }
        Err(e) => return Err(e.into()),
    }
    let _ = all;
    let mut s = client
        .load_bundle_images(&bname.to_string(), &BundleImagesRequest { node })
        .await?;
    let mut bars: BTreeMap<String, ProgressBar> = BTreeMap::new();
    let mut failed = 0;
    while let Some(p) = s.next().await {
        let p = p?;
        let pb = bars.entry(p.node_id.clone()).or_insert_with(|| {
            bytes_bar(
                p.total.unwrap_or(0),
                &format!("node {}", output::short_id(&p.node_id)),
            )
        });
        if let Some(t) = p.total {
            pb.set_length(t);
        }
        pb.set_position(p.current);
        match p.status.as_str() {
            "done" => {
                pb.finish_and_clear();
                // Layers the node's engine held were not sent: the bytes say how much was.
                println!(
                    "node {}: loaded {} ({} bytes received)",
                    p.node_id,
                    p.images.join(", "),
                    p.current
                );
            }
            "error" => {
                pb.finish_and_clear();
                failed += 1;
                eprintln!("node {}: error: {}", p.node_id, p.error.unwrap_or_default());
            }
            _ => {}
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// How `bundle up` launches: where, with what network access, how long to wait for health.
pub struct UpOptions {
    pub node: Option<String>,
    pub internet: bool,
    pub health_timeout: Option<u64>,
    pub no_cmd: bool,
}

/// The services request for one app of the bundle: a compose file goes as it is (the bundle's
/// `ENV` are its `${VAR}` interpolation variables); a Kisara service spec goes as the server's
/// `ServiceConfig` (its `name` key aside), or, in the bundle's shorter form (`port_protocol`,
/// ports as numbers, no counts), converted to one, the bundle's `ENV` under each container's own.
pub fn service_request(
    b: &kisara_bundle::store::Bundle,
    app: &kisara_bundle::manifest::AppEntry,
    text: &str,
) -> anyhow::Result<ServiceRequest> {
    let mut req = ServiceRequest {
        owner: Some(owner_of(&b.name)),
        module: Some(app.name.clone()),
        name: Some(app.name.clone()),
        ..Default::default()
    };
    let spec = kisara_bundle::apps::parse_app(&app.name, &app.path, text, &b.config.env)?;
    match spec.kind {
        AppKind::Compose => {
            req.compose = Some(text.to_string());
            req.env = b.config.env.clone();
        }
        // The request's `env` interpolates compose files only (the server refuses it with a
        // config): here the values go into each container's own environment instead.
        AppKind::KisaraService => {
            let mut doc = kisara_bundle::apps::document(&app.name, &app.path, text)?;
            if let Some(o) = doc.as_object_mut() {
                o.remove("name");
            }
            // The bundle's form has no counts: a spec without one counts its containers,
            // as a converted one does.
            let counted = doc.get("container_count").is_some();
            let config = match serde_json::from_value::<ServiceConfig>(doc) {
                Ok(mut c) => {
                    if !counted {
                        c.container_count = c.containers.len();
                    }
                    for ct in &mut c.containers {
                        let mut env = b.config.env.clone();
                        env.append(&mut ct.env);
                        ct.env = env;
                    }
                    c
                }
                Err(_) => convert_spec(b, app, &spec)?,
            };
            req.config = Some(config);
        }
    }
    Ok(req)
}

fn convert_spec(
    b: &kisara_bundle::store::Bundle,
    app: &kisara_bundle::manifest::AppEntry,
    spec: &kisara_bundle::apps::AppSpec,
) -> anyhow::Result<ServiceConfig> {
    let mut containers = Vec::new();
    for s in &spec.services {
        if s.entrypoint.is_some() {
            bail!(
                "app {} ({}): container {} sets an entrypoint, which a Kisara service spec cannot \
                 carry; use a compose file for it",
                app.name,
                app.path,
                s.name
            );
        }
        let mut env = b.config.env.clone();
        env.extend(s.environment.clone());
        containers.push(ServiceConfigContainer {
            name: Some(s.name.clone()),
            image: s.image.clone(),
            cmd: s.command.clone(),
            ports: s
                .ports
                .iter()
                .map(|p| ServiceConfigPort {
                    port: p.target,
                    protocol: Some(p.protocol.clone()),
                })
                .collect(),
            env,
            ..Default::default()
        });
    }
    Ok(ServiceConfig {
        container_count: containers.len(),
        containers,
        ..Default::default()
    })
}

/// The services the bundle's apps run as (owner `bundle:<name:tag>`).
async fn bundle_services(client: &Client, name: &BundleName) -> anyhow::Result<Vec<Service>> {
    let list = client
        .list_services(&ServiceFilter {
            owner: Some(owner_of(name)),
            ..Default::default()
        })
        .await?;
    output::warn_node_errors(&list.node_errors);
    Ok(list.items)
}

/// Launches each app of the launch plan as one service (POST /v1/services: placement, networks,
/// health waits and an all-or-nothing launch are the control plane's), then runs `CMD`. If an
/// app fails, the apps launched before it are removed again.
async fn up(args: &ClientArgs, out: &Output, name: &str, o: UpOptions) -> anyhow::Result<i32> {
    let store = local_store(args)?;
    let b = store.get(name)?;
    let client = client(args)?;
    let plan = b.config.launch_plan();
    if plan.is_empty() {
        bail!("bundle {} has no apps to launch", b.name);
    }
    let running = bundle_services(&client, &b.name).await?;
    if !running.is_empty() {
        let ids: Vec<&str> = running.iter().map(|s| s.id.as_str()).collect();
        bail!(
            "bundle {} is already up (services {}); `kisara bundle down {}` first",
            b.name,
            ids.join(", "),
            b.name
        );
    }
    // Every request is made (and so every app file checked) before anything is launched.
    let mut requests = Vec::new();
    for app in &plan {
        let text = store.read_file(&b, &app.path)?;
        let text =
            String::from_utf8(text).with_context(|| format!("app {} is not UTF-8", app.name))?;
        let mut req = service_request(&b, app, &text)?;
        req.node = o.node.clone();
        req.internet = o.internet;
        req.health_timeout_secs = o.health_timeout;
        requests.push((app.name.clone(), req));
    }
    let mut launched: Vec<(String, Service)> = Vec::new();
    for (app, req) in &requests {
        eprintln!("launching app {app}");
        match client.launch_service(req).await {
            Ok(s) => launched.push((app.clone(), s)),
            Err(e) => {
                // Leave nothing half-made: the apps already up go again.
                for (_, s) in &launched {
                    if let Err(e) = client.remove_service(&s.id).await {
                        eprintln!("warning: removing service {}: {e}", s.id);
                    }
                }
                return Err(anyhow::Error::new(e).context(format!("launching app {app}")));
            }
        }
    }
    if out.json {
        let v: Vec<_> = launched
            .iter()
            .map(|(a, s)| serde_json::json!({"app": a, "service": s}))
            .collect();
        out.print_json(&v)?;
    } else {
        let mut t = output::table(&["APP", "SERVICE", "CONTAINER", "NODE", "STATE", "PORTS"]);
        for (a, s) in &launched {
            for c in &s.containers {
                t.add_row(vec![
                    a.clone(),
                    output::short_id(&s.id).to_string(),
                    c.service.clone(),
                    output::short_id(&s.node_id).to_string(),
                    output::container_state(c.state).to_string(),
                    output::format_ports(&c.ports),
                ]);
            }
        }
        output::print_table(&t)?;
    }
    if !o.no_cmd && !b.config.cmd.is_empty() {
        let stage = store.stage()?;
        store.extract_files(&b, stage.path())?;
        for argv in &b.config.cmd {
            let Some((prog, rest)) = argv.split_first() else {
                continue;
            };
            // The apps stay up when a CMD fails: they are healthy, and `bundle down` removes them.
            let mut cmd = tokio::process::Command::new(prog);
            if out.json {
                // stdout carries the JSON answer alone; what CMD prints goes to stderr.
                use std::os::fd::AsFd;
                let fd = std::io::stderr()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("duplicating stderr for CMD")?;
                cmd.stdout(std::process::Stdio::from(fd));
            }
            let status = cmd
                .args(rest)
                .current_dir(stage.path())
                .envs(&b.config.env)
                .env("KISARA_URL", &args.url)
                .env("KISARA_BUNDLE", b.name.to_string())
                .env("KISARA_OWNER", owner_of(&b.name))
                .status()
                .await
                .with_context(|| format!("running CMD {argv:?}"))?;
            if !status.success() {
                bail!(
                    "CMD {argv:?} failed: {status} (the apps are up; `kisara bundle down {}` removes them)",
                    b.name
                );
            }
        }
    }
    Ok(0)
}

/// Removes every service the bundle's `bundle up` launched (owner `bundle:<name:tag>`), and
/// nothing else: other bundles, and other versions of this one, keep theirs.
async fn down(args: &ClientArgs, name: &str) -> anyhow::Result<i32> {
    let bname = BundleName::parse(name)?;
    let client = client(args)?;
    let services = bundle_services(&client, &bname).await?;
    if services.is_empty() {
        eprintln!("bundle {bname} has no services up");
        return Ok(0);
    }
    let mut code = 0;
    for s in &services {
        match client.remove_service(&s.id).await {
            Ok(()) => println!(
                "removed app {} (service {}, {} container(s))",
                s.module.as_deref().unwrap_or(&s.name),
                s.id,
                s.containers.len()
            ),
            Err(e) if e.status() == Some(404) => {}
            Err(e) => {
                output::print_error(&e);
                code = 1;
            }
        }
    }
    Ok(code)
}

fn human(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
