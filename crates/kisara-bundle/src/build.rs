//! Building a bundle from a Kisarafile against a container runtime.
//!
//! The work tree starts empty (`FROM scratch`) or as the base bundle's files; COPY and RUN
//! change it; APP files are read for their images; the images come from the runtime's engine
//! (pulled first only when the reference names a registry, so a build never reaches out to
//! Docker Hub on its own), exported in one `docker save` so shared layers travel once, and
//! stored blob by blob. The bundle's name is recorded only once everything is stored.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use kisara_runtime::Runtime;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::apps;
use crate::digest::Digest;
use crate::dockersave::{self, normalize_reference};
use crate::error::{BundleError, IoContext, Result};
use crate::kisarafile::{self, Instruction, Kisarafile};
use crate::manifest::{AppEntry, BundleManifest, ImageEntry};
use crate::oci::{self, Descriptor, ImageManifest};
use crate::store::{BundleName, Store};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub kisarafile: PathBuf,
    /// The build context: COPY sources and APP paths not made in the work tree are read here.
    pub context: PathBuf,
    pub name: BundleName,
    /// `--build-arg` values, overriding ARG defaults.
    pub build_args: BTreeMap<String, String>,
}

/// Where a build reports what it does; the CLI draws progress bars from it.
pub trait Progress: Send + Sync {
    /// Instruction `index` of `total` starts.
    fn step(&self, _index: usize, _total: usize, _text: &str) {}
    /// A line of a RUN command's output.
    fn output(&self, _line: &str) {}
    fn message(&self, _text: &str) {}
    /// Image data exported so far, in bytes.
    fn transfer(&self, _bytes: u64) {}
}

/// Reports nothing.
pub struct Quiet;
impl Progress for Quiet {}

/// A finished build.
#[derive(Debug, Clone)]
pub struct Built {
    pub name: BundleName,
    pub digest: Digest,
    pub manifest: BundleManifest,
}

struct State {
    vars: BTreeMap<String, String>,
    env: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    apps: Vec<AppEntry>,
    extra_images: Vec<String>,
    launch: Vec<String>,
    cmd: Vec<Vec<String>>,
    inherited: Vec<ImageEntry>,
    from: Option<String>,
}

pub async fn build(
    store: &Store,
    runtime: Arc<dyn Runtime>,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Built> {
    let file = Kisarafile::read(&opts.kisarafile)?;
    let stage = store.stage()?;
    let work = stage.path().join("files");
    std::fs::create_dir_all(&work).ctx(|| format!("creating {}", work.display()))?;
    let mut st = State {
        vars: BTreeMap::new(),
        env: BTreeMap::new(),
        labels: BTreeMap::new(),
        apps: Vec::new(),
        extra_images: Vec::new(),
        launch: Vec::new(),
        cmd: Vec::new(),
        inherited: Vec::new(),
        from: None,
    };
    let total = file.steps.len();
    for (i, step) in file.steps.iter().enumerate() {
        let err = |message: String| BundleError::Kisarafile {
            file: file.path.clone(),
            line: step.line,
            message,
        };
        let mut all_vars = st.vars.clone();
        all_vars.extend(st.env.clone());
        let x = |s: &str| kisarafile::expand(s, &all_vars).map_err(&err);
        progress.step(i + 1, total, &describe(&step.instruction));
        match &step.instruction {
            Instruction::From(None) => {}
            Instruction::From(Some(base)) => {
                let base = x(base)?;
                if base != "scratch" {
                    let b = store
                        .get(&base)
                        .map_err(|e| err(format!("FROM {base}: {e}")))?;
                    store.extract_files(&b, &work)?;
                    let c = b.config;
                    st.env.extend(c.env);
                    st.labels.extend(c.labels);
                    st.apps = c.apps;
                    st.launch = c.launch;
                    st.cmd = c.cmd;
                    st.inherited = c.images;
                    st.from = Some(b.name.to_string());
                }
            }
            Instruction::Arg { name, default } => {
                let v = opts
                    .build_args
                    .get(name)
                    .cloned()
                    .or(default.as_deref().map(&x).transpose()?)
                    .unwrap_or_default();
                st.vars.insert(name.clone(), v);
            }
            Instruction::Env(pairs) => {
                for (k, v) in pairs {
                    let v = x(v)?;
                    st.env.insert(k.clone(), v);
                }
            }
            Instruction::Label(pairs) => {
                for (k, v) in pairs {
                    st.labels.insert(x(k)?, x(v)?);
                }
            }
            Instruction::Copy { sources, dest } => {
                let dest = x(dest)?;
                let dest_rel = relative(&dest).map_err(&err)?;
                let into_dir =
                    dest.ends_with('/') || sources.len() > 1 || work.join(&dest_rel).is_dir();
                for src in sources {
                    let src = x(src)?;
                    let src_rel = relative(&src).map_err(&err)?;
                    let from = opts.context.join(&src_rel);
                    if !from.exists() {
                        return Err(err(format!(
                            "COPY: {src} is not in the build context {}",
                            opts.context.display()
                        )));
                    }
                    let to = if into_dir && from.is_file() {
                        work.join(&dest_rel)
                            .join(from.file_name().unwrap_or_default())
                    } else {
                        work.join(&dest_rel)
                    };
                    copy_tree(&from, &to).map_err(|e| err(format!("COPY {src}: {e}")))?;
                }
            }
            Instruction::Run(cmd) => {
                // The shell expands variables: ARG and ENV values are in its environment.
                let cmd = cmd.clone();
                run(&cmd, &work, &all_vars, progress)
                    .await
                    .map_err(|message| BundleError::RunFailed {
                        file: file.path.clone(),
                        line: step.line,
                        command: cmd.clone(),
                        message,
                    })?;
            }
            Instruction::App { name, path } => {
                let path = x(path)?;
                let rel = relative(&path).map_err(&err)?;
                let in_work = work.join(&rel);
                if !in_work.is_file() {
                    let in_context = opts.context.join(&rel);
                    if !in_context.is_file() {
                        return Err(err(format!(
                            "APP {name}: {path} is neither in the bundle's files nor in the build context"
                        )));
                    }
                    copy_tree(&in_context, &in_work)
                        .map_err(|e| err(format!("APP {name}: {e}")))?;
                }
                let text = std::fs::read_to_string(&in_work)
                    .map_err(|e| err(format!("APP {name}: cannot read {path}: {e}")))?;
                let spec = apps::parse_app(name, &path, &text, &st.env)?;
                let entry = AppEntry {
                    name: name.clone(),
                    path: rel.to_string_lossy().to_string(),
                    kind: spec.kind,
                    images: spec
                        .images()
                        .iter()
                        .map(|i| normalize_reference(i))
                        .collect(),
                };
                st.apps.retain(|a| &a.name != name);
                st.apps.push(entry);
            }
            Instruction::Image(r) => {
                let r = normalize_reference(&x(r)?);
                if !st.extra_images.contains(&r) {
                    st.extra_images.push(r);
                }
            }
            Instruction::Launch(apps) => {
                st.launch = apps.iter().map(|a| x(a)).collect::<Result<_>>()?;
            }
            Instruction::Cmd(argv) => {
                // Run later with the bundle's env, where the shell expands what it refers to.
                st.cmd.push(argv.clone());
            }
        }
    }
    if let Some(missing) = st
        .launch
        .iter()
        .find(|l| !st.apps.iter().any(|a| &a.name == *l))
    {
        return Err(BundleError::Kisarafile {
            file: file.path.clone(),
            line: 0,
            message: format!("LAUNCH names app {missing}, which no APP defines"),
        });
    }

    // Images: every app's and every IMAGE line's, each once; inherited ones are already here.
    let mut wanted: Vec<String> = Vec::new();
    let inherited_refs: Vec<String> = st.inherited.iter().map(|i| i.reference.clone()).collect();
    for r in st
        .apps
        .iter()
        .flat_map(|a| a.images.iter())
        .chain(&st.extra_images)
        .chain(&inherited_refs)
    {
        if !wanted.contains(r) {
            wanted.push(r.clone());
        }
    }
    let mut images: Vec<ImageEntry> = Vec::new();
    let mut to_export = Vec::new();
    for r in &wanted {
        match st.inherited.iter().find(|i| &i.reference == r) {
            Some(i) => images.push(i.clone()),
            None => to_export.push(r.clone()),
        }
    }
    if !to_export.is_empty() {
        ensure_local(runtime.as_ref(), &to_export, progress).await?;
        progress.message(&format!(
            "exporting {} image(s) from the engine",
            to_export.len()
        ));
        let archive = stage.path().join("images.tar");
        export_to(runtime.as_ref(), &to_export, &archive, progress).await?;
        let store2 = store.clone();
        let refs = to_export.clone();
        let entries = tokio::task::spawn_blocking(move || {
            let f =
                std::fs::File::open(&archive).ctx(|| format!("opening {}", archive.display()))?;
            dockersave::ingest(&store2, std::io::BufReader::new(f), &refs)
        })
        .await
        .map_err(|e| BundleError::Invalid(format!("image ingest task: {e}")))??;
        images.extend(entries);
    }
    // Keep the order the images were asked for.
    images.sort_by_key(|i| wanted.iter().position(|w| w == &i.reference));

    progress.message("writing the bundle");
    let files = pack_files(store, &work, stage.path())?;
    let manifest = BundleManifest {
        name: opts.name.name.clone(),
        version: opts.name.tag.clone(),
        created: now(),
        from: st.from,
        labels: st.labels,
        env: st.env,
        apps: st.apps,
        launch: st.launch,
        cmd: st.cmd,
        images,
        files,
    };
    let digest = commit(store, &opts.name, &manifest)?;
    Ok(Built {
        name: opts.name.clone(),
        digest,
        manifest,
    })
}

/// Stores the bundle config and its top manifest, then records the name.
pub fn commit(store: &Store, name: &BundleName, manifest: &BundleManifest) -> Result<Digest> {
    let config_text =
        serde_json::to_vec_pretty(manifest).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let config = store.put_bytes(oci::MEDIA_BUNDLE_CONFIG, &config_text)?;
    let mut layers: Vec<Descriptor> = Vec::new();
    let mut push = |d: Descriptor| {
        if !layers.iter().any(|l| l.digest == d.digest) {
            layers.push(d);
        }
    };
    if let Some(f) = &manifest.files {
        push(f.clone());
    }
    for img in &manifest.images {
        let size = std::fs::metadata(store.blob_path(&img.manifest))
            .map(|m| m.len())
            .map_err(|_| {
                BundleError::Corrupt(format!("image manifest {} is missing", img.manifest))
            })?;
        push(Descriptor::new(
            oci::MEDIA_MANIFEST,
            img.manifest.clone(),
            size,
        ));
        push(img.config.clone());
        for l in &img.layers {
            push(l.clone());
        }
    }
    let mut top = ImageManifest::new(config, layers);
    top.artifact_type = Some(oci::ARTIFACT_BUNDLE.to_string());
    top.config.media_type = oci::MEDIA_BUNDLE_CONFIG.to_string();
    let text = serde_json::to_vec(&top).map_err(|e| BundleError::Invalid(e.to_string()))?;
    let d = store.put_bytes(oci::MEDIA_MANIFEST, &text)?;
    store.set_ref(name, &d)?;
    Ok(d.digest)
}

fn describe(i: &Instruction) -> String {
    match i {
        Instruction::From(b) => format!("FROM {}", b.as_deref().unwrap_or("scratch")),
        Instruction::Arg { name, .. } => format!("ARG {name}"),
        Instruction::Env(p) => format!(
            "ENV {}",
            p.iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Instruction::Label(p) => format!(
            "LABEL {}",
            p.iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Instruction::Copy { sources, dest } => format!("COPY {} {dest}", sources.join(" ")),
        Instruction::Run(c) => format!("RUN {c}"),
        Instruction::App { name, path } => format!("APP {name} {path}"),
        Instruction::Image(r) => format!("IMAGE {r}"),
        Instruction::Launch(a) => format!("LAUNCH {}", a.join(" ")),
        Instruction::Cmd(c) => format!("CMD {}", c.join(" ")),
    }
}

/// A path inside the work tree or context: relative, without `..`.
fn relative(p: &str) -> std::result::Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!(
                    "{p}: paths may not leave the build context or work tree"
                ))
            }
        }
    }
    Ok(out)
}

/// Copies a file or a directory's contents; symbolic links are copied as links.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let target = std::fs::read_link(from)?;
        let _ = std::fs::remove_file(to);
        return std::os::unix::fs::symlink(target, to);
    }
    if meta.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(from, to).map(|_| ())
}

async fn run(
    cmd: &str,
    work: &Path,
    vars: &BTreeMap<String, String>,
    progress: &dyn Progress,
) -> std::result::Result<(), String> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        // One stream for both outputs, in the order the command wrote them.
        .arg(format!("exec 2>&1\n{cmd}"))
        .current_dir(work)
        .envs(vars)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start sh: {e}"))?;
    if let Some(out) = child.stdout.take() {
        let mut lines = tokio::io::BufReader::new(out).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            progress.output(&line);
        }
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(match status.code() {
            Some(c) => format!("exit code {c}"),
            None => "killed by a signal".into(),
        })
    }
}

/// Whether a reference names a registry host (`host.domain/...`, `host:port/...`, `localhost/...`).
fn names_registry(r: &str) -> bool {
    match r.split_once('/') {
        Some((first, _)) => first.contains('.') || first.contains(':') || first == "localhost",
        None => false,
    }
}

/// Every image must be in the engine; one that is not is pulled if its reference names a
/// registry, and otherwise fails the build, named.
async fn ensure_local(
    runtime: &dyn Runtime,
    refs: &[String],
    progress: &dyn Progress,
) -> Result<()> {
    let have: Vec<String> = runtime
        .list_images()
        .await?
        .into_iter()
        .flat_map(|i| i.tags)
        .map(|t| normalize_reference(&t))
        .collect();
    for r in refs {
        if have.contains(r) {
            continue;
        }
        if !names_registry(r) {
            return Err(BundleError::ImageUnavailable {
                reference: r.clone(),
                message:
                    "not in the local engine, and the reference names no registry to pull it from"
                        .into(),
            });
        }
        progress.message(&format!("pulling {r}"));
        let mut s = runtime.pull_image(r);
        while let Some(item) = s.next().await {
            item.map_err(|e| BundleError::ImageUnavailable {
                reference: r.clone(),
                message: format!("not in the local engine, and the pull failed: {e}"),
            })?;
        }
    }
    Ok(())
}

async fn export_to(
    runtime: &dyn Runtime,
    refs: &[String],
    path: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let mut f = tokio::fs::File::create(path)
        .await
        .ctx(|| format!("creating {}", path.display()))?;
    let mut s = runtime.export_images(refs);
    let mut n = 0u64;
    while let Some(chunk) = s.next().await {
        let chunk = chunk.map_err(|e| BundleError::ImageUnavailable {
            reference: refs.join(", "),
            message: format!("export failed: {e}"),
        })?;
        n += chunk.len() as u64;
        f.write_all(&chunk)
            .await
            .ctx(|| format!("writing {}", path.display()))?;
        progress.transfer(n);
    }
    f.flush()
        .await
        .ctx(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The work tree as a tar blob (`None` when empty).
fn pack_files(store: &Store, work: &Path, stage: &Path) -> Result<Option<Descriptor>> {
    let empty = std::fs::read_dir(work)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    if empty {
        return Ok(None);
    }
    let tar_path = stage.join("files.tar");
    {
        let f =
            std::fs::File::create(&tar_path).ctx(|| format!("creating {}", tar_path.display()))?;
        let mut b = tar::Builder::new(std::io::BufWriter::new(f));
        b.follow_symlinks(false);
        b.append_dir_all(".", work)
            .ctx(|| "packing the work tree".to_string())?;
        b.into_inner()
            .and_then(|mut w| std::io::Write::flush(&mut w))
            .ctx(|| "packing the work tree".to_string())?;
    }
    let mut f = std::fs::File::open(&tar_path).ctx(|| format!("opening {}", tar_path.display()))?;
    let (staged, digest, size) = store.stage_blob(stage, &mut f)?;
    store.commit_blob(&staged, &digest)?;
    Ok(Some(Descriptor::new(oci::MEDIA_BUNDLE_FILES, digest, size)))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_detection_and_relative_paths() {
        assert!(names_registry("127.0.0.1:5000/a:1"));
        assert!(names_registry("registry.example/a"));
        assert!(names_registry("localhost/a"));
        assert!(!names_registry("kisara-test/busybox:latest"));
        assert!(!names_registry("busybox"));
        assert_eq!(relative("/a/./b").unwrap(), PathBuf::from("a/b"));
        assert!(relative("../x").is_err());
        assert!(relative("a/../../x").is_err());
    }
}
