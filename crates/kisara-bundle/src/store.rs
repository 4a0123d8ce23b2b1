//! The local bundle store: a directory that is itself an OCI image layout.
//!
//! ```text
//! <root>/oci-layout
//! <root>/index.json          one entry per bundle name, annotated with its `name:tag`
//! <root>/blobs/sha256/<hex>  every blob once, whichever bundles and images share it
//! <root>/tmp/                staging for builds and loads (same filesystem: renames are atomic)
//! ```
//! A blob enters the store only after its digest was checked, and a bundle's index entry is
//! written only after all its blobs are in, so a failed build or load leaves nothing behind but
//! staging files that are removed with their stage.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};

use crate::digest::{verify, Digest, HashingWriter};
use crate::error::{BundleError, IoContext, Result};
use crate::manifest::{BundleManifest, ImageEntry};
use crate::oci::{self, Descriptor, ImageManifest, Index};

/// `name[:tag]`, tag `latest` by default. Names are what `kisara bundle ls` shows and what the
/// server's `/v1/bundles/{name}` routes take, so they stay URL- and file-name-safe.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleName {
    pub name: String,
    pub tag: String,
}

impl BundleName {
    pub fn parse(s: &str) -> Result<BundleName> {
        let bad = |why: &str| BundleError::InvalidName {
            name: s.to_string(),
            why: why.to_string(),
        };
        let (name, tag) = match s.rsplit_once(':') {
            Some((n, t)) => (n, t),
            None => (s, "latest"),
        };
        let name_ok = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            });
        if !name_ok {
            return Err(bad(
                "a name is lowercase letters, digits, '.', '_' and '-' (no '/'), up to 128",
            ));
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !tag_ok {
            return Err(bad("a tag is letters, digits, '.', '_' and '-', up to 128"));
        }
        Ok(BundleName {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

impl fmt::Display for BundleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// A bundle found in the store.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub name: BundleName,
    /// Digest of the top manifest.
    pub digest: Digest,
    pub manifest: ImageManifest,
    pub config: BundleManifest,
}

impl Bundle {
    /// Every blob of the bundle (top manifest, config, files, image manifests, configs, layers).
    pub fn blobs(&self) -> Vec<Descriptor> {
        let mut seen = BTreeSet::new();
        std::iter::once(&self.manifest.config)
            .chain(&self.manifest.layers)
            .filter(|d| seen.insert(d.digest.clone()))
            .cloned()
            .collect()
    }

    /// Sum of the sizes of its blobs.
    pub fn size(&self) -> u64 {
        self.blobs().iter().map(|d| d.size).sum()
    }
}

/// A layer file of a bundle's images and the chain ids it sits at ([`Store::layer_chains`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerChains {
    pub digest: Digest,
    pub size: u64,
    pub chains: Vec<String>,
    /// Some image using it lists no diff ids: it is sent whatever the engine holds.
    #[serde(default)]
    pub always: bool,
}

/// A listing entry.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: BundleName,
    pub digest: Digest,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Blobs read into memory (manifests, configs) are capped: a larger one is not what it claims.
const MAX_JSON_BLOB: u64 = 16 << 20;

impl Store {
    /// Opens the store at `root`, creating an empty layout if there is none.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        let blobs = root.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).ctx(|| format!("creating {}", blobs.display()))?;
        std::fs::create_dir_all(root.join("tmp"))
            .ctx(|| format!("creating {}/tmp", root.display()))?;
        let layout = root.join("oci-layout");
        if !layout.exists() {
            std::fs::write(&layout, oci::OCI_LAYOUT)
                .ctx(|| format!("writing {}", layout.display()))?;
        }
        let store = Store { root };
        if !store.root.join("index.json").exists() {
            store.write_index(&Index::default())?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A staging directory inside the store, removed when dropped.
    pub fn stage(&self) -> Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix("stage-")
            .tempdir_in(self.root.join("tmp"))
            .ctx(|| format!("creating a staging directory in {}", self.root.display()))
    }

    /// Holds the store's lock (index changes and garbage collection are serialised).
    fn lock(&self) -> Result<File> {
        let path = self.root.join(".lock");
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        f.lock().ctx(|| format!("locking {}", path.display()))?;
        Ok(f)
    }

    fn read_index(&self) -> Result<Index> {
        let path = self.root.join("index.json");
        let text = std::fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| BundleError::Corrupt(format!("{}: {e}", path.display())))
    }

    fn write_index(&self, index: &Index) -> Result<()> {
        let path = self.root.join("index.json");
        let tmp = self.root.join("tmp/index.json.new");
        let text = serde_json::to_vec_pretty(index)
            .map_err(|e| BundleError::Invalid(format!("index: {e}")))?;
        std::fs::write(&tmp, text).ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).ctx(|| format!("replacing {}", path.display()))
    }

    /// Streams `reader` into a staged file, hashing it; answers the file, digest and size.
    pub fn stage_blob(
        &self,
        stage: &Path,
        reader: &mut dyn Read,
    ) -> Result<(PathBuf, Digest, u64)> {
        let (file, path) = staged_file(stage)?;
        let mut w = HashingWriter::new(std::io::BufWriter::new(file));
        std::io::copy(reader, &mut w).ctx(|| "reading blob data".to_string())?;
        let (digest, size, mut inner) = w.finish();
        inner
            .flush()
            .ctx(|| format!("writing {}", path.display()))?;
        Ok((path, digest, size))
    }

    /// Moves a staged, already verified blob into the store (a no-op if it is there).
    pub fn commit_blob(&self, staged: &Path, digest: &Digest) -> Result<()> {
        let dest = self.blob_path(digest);
        if dest.exists() {
            return Ok(());
        }
        std::fs::rename(staged, &dest).ctx(|| format!("storing blob {digest}"))
    }

    /// Adds a small blob from memory.
    pub fn put_bytes(&self, media_type: &str, data: &[u8]) -> Result<Descriptor> {
        let digest = Digest::of(data);
        let dest = self.blob_path(&digest);
        if !dest.exists() {
            let tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))
                .ctx(|| "creating a blob".to_string())?;
            std::fs::write(tmp.path(), data).ctx(|| format!("writing blob {digest}"))?;
            tmp.persist(&dest).map_err(|e| BundleError::Io {
                context: format!("storing blob {digest}"),
                source: e.error,
            })?;
        }
        Ok(Descriptor::new(media_type, digest, data.len() as u64))
    }

    /// Reads a small blob, checking it against its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let path = self.blob_path(d);
        let len = std::fs::metadata(&path)
            .map_err(|_| BundleError::Corrupt(format!("blob {d} is missing from the store")))?
            .len();
        if len > MAX_JSON_BLOB {
            return Err(BundleError::Corrupt(format!(
                "blob {d} is too large to be metadata"
            )));
        }
        let data = std::fs::read(&path).ctx(|| format!("reading {}", path.display()))?;
        verify(&data, d, &format!("blob {d}"))?;
        Ok(data)
    }

    /// Records `name` → the top manifest `digest`, replacing whatever had that name.
    pub fn set_ref(&self, name: &BundleName, manifest: &Descriptor) -> Result<()> {
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let key = name.to_string();
        index
            .manifests
            .retain(|d| ref_name(d) != Some(key.as_str()));
        let mut d = manifest.clone();
        d.annotations
            .insert(oci::ANNOTATION_REF_NAME.to_string(), key);
        d.artifact_type = Some(oci::ARTIFACT_BUNDLE.to_string());
        index.manifests.push(d);
        self.write_index(&index)
    }

    pub fn list(&self) -> Result<Vec<Listed>> {
        let index = self.read_index()?;
        let mut out: Vec<Listed> = index
            .manifests
            .iter()
            .filter_map(|d| {
                let name = BundleName::parse(ref_name(d)?).ok()?;
                Some(Listed {
                    name,
                    digest: d.digest.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Finds a bundle by name and reads (and checks) its manifest and config.
    pub fn get(&self, name: &str) -> Result<Bundle> {
        let name = BundleName::parse(name)?;
        let key = name.to_string();
        let index = self.read_index()?;
        let d = index
            .manifests
            .iter()
            .find(|d| ref_name(d) == Some(key.as_str()))
            .ok_or_else(|| BundleError::NotFound(key.clone()))?;
        self.bundle_at(name, &d.digest)
    }

    fn bundle_at(&self, name: BundleName, digest: &Digest) -> Result<Bundle> {
        let manifest: ImageManifest = serde_json::from_slice(&self.read_blob(digest)?)
            .map_err(|e| BundleError::Corrupt(format!("bundle {name} manifest: {e}")))?;
        let config: BundleManifest =
            serde_json::from_slice(&self.read_blob(&manifest.config.digest)?)
                .map_err(|e| BundleError::Corrupt(format!("bundle {name} config: {e}")))?;
        Ok(Bundle {
            name,
            digest: digest.clone(),
            manifest,
            config,
        })
    }

    /// Gives bundle `src` the name `dst` too.
    pub fn tag(&self, src: &str, dst: &str) -> Result<BundleName> {
        let b = self.get(src)?;
        let dst = BundleName::parse(dst)?;
        let text = self.read_blob(&b.digest)?;
        self.set_ref(
            &dst,
            &Descriptor::new(oci::MEDIA_MANIFEST, b.digest.clone(), text.len() as u64),
        )?;
        Ok(dst)
    }

    /// Removes a name, then every blob no remaining bundle uses. Answers the bytes freed.
    pub fn remove(&self, name: &str) -> Result<u64> {
        let name = BundleName::parse(name)?;
        let key = name.to_string();
        let _lock = self.lock()?;
        let mut index = self.read_index()?;
        let before = index.manifests.len();
        index
            .manifests
            .retain(|d| ref_name(d) != Some(key.as_str()));
        if index.manifests.len() == before {
            return Err(BundleError::NotFound(key));
        }
        self.write_index(&index)?;
        self.gc_locked(&index)
    }

    fn gc_locked(&self, index: &Index) -> Result<u64> {
        let mut live: BTreeSet<String> = BTreeSet::new();
        for d in &index.manifests {
            live.insert(d.digest.hex().to_string());
            if let Ok(b) = self.bundle_at(
                BundleName {
                    name: "gc".into(),
                    tag: "gc".into(),
                },
                &d.digest,
            ) {
                live.extend(b.blobs().iter().map(|d| d.digest.hex().to_string()));
            } else {
                // An unreadable bundle keeps everything: never delete what we cannot account for.
                return Ok(0);
            }
        }
        let dir = self.root.join("blobs/sha256");
        let mut freed = 0;
        for entry in std::fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
            let entry = entry.ctx(|| format!("listing {}", dir.display()))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !live.contains(&name) {
                freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(freed)
    }

    /// Writes the bundle as an OCI image layout in a tar (zstd-compressed if asked): the
    /// layout marker, every blob, and `index.json` last, so a cut-off archive is never
    /// mistaken for a whole one.
    pub fn save(
        &self,
        name: &str,
        out: impl Write,
        zstd: bool,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        let b = self.get(name)?;
        if zstd {
            let mut enc =
                zstd::stream::write::Encoder::new(out, 3).ctx(|| "starting zstd".to_string())?;
            // Two worker threads where the library has them; plain otherwise.
            let _ = enc.multithread(2);
            let enc = self.write_layout(&b, enc, progress)?;
            enc.finish().ctx(|| "finishing zstd".to_string())?;
        } else {
            self.write_layout(&b, out, progress)?;
        }
        Ok(())
    }

    fn write_layout<W: Write>(&self, b: &Bundle, out: W, progress: &dyn Fn(u64)) -> Result<W> {
        let mut tar = tar::Builder::new(out);
        let io = |what: String| {
            move |e| BundleError::Io {
                context: what,
                source: e,
            }
        };
        append_bytes(&mut tar, "oci-layout", oci::OCI_LAYOUT.as_bytes())
            .map_err(io("writing the archive".into()))?;
        let top = self.read_blob(&b.digest)?;
        append_bytes(&mut tar, &format!("blobs/sha256/{}", b.digest.hex()), &top)
            .map_err(io("writing the archive".into()))?;
        let mut done = top.len() as u64;
        for d in b.blobs() {
            let path = self.blob_path(&d.digest);
            let f = File::open(&path).map_err(|_| {
                BundleError::Corrupt(format!("blob {} is missing from the store", d.digest))
            })?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if len != d.size {
                return Err(BundleError::Corrupt(format!(
                    "blob {} has {len} bytes in the store, {} expected",
                    d.digest, d.size
                )));
            }
            let mut header = tar::Header::new_ustar();
            header.set_size(len);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, format!("blobs/sha256/{}", d.digest.hex()), f)
                .map_err(io(format!("writing blob {}", d.digest)))?;
            done += len;
            progress(done);
        }
        let mut top_desc = Descriptor::new(oci::MEDIA_MANIFEST, b.digest.clone(), top.len() as u64);
        top_desc.artifact_type = Some(oci::ARTIFACT_BUNDLE.into());
        top_desc
            .annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), b.name.to_string());
        let index = Index {
            manifests: vec![top_desc],
            ..Index::default()
        };
        let text = serde_json::to_vec(&index).map_err(|e| BundleError::Invalid(e.to_string()))?;
        append_bytes(&mut tar, "index.json", &text).map_err(io("writing the archive".into()))?;
        tar.into_inner().map_err(io("finishing the archive".into()))
    }

    /// Reads a saved bundle (tar or zstd tar). Every blob is checked against its digest and
    /// every blob a bundle needs must be there; only then is anything added to the store.
    /// Answers the names loaded.
    pub fn load(&self, input: impl Read) -> Result<Vec<BundleName>> {
        let mut input = BufReader::with_capacity(LOAD_CHUNK, input);
        let head = input
            .fill_buf()
            .ctx(|| "reading the bundle archive".to_string())?;
        let is_zstd = head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
        let reader: Box<dyn Read> = if is_zstd {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(input)
                    .ctx(|| "starting zstd".to_string())?,
            )
        } else {
            Box::new(input)
        };
        let stage = self.stage()?;
        let truncated = |e: std::io::Error| {
            BundleError::Corrupt(format!("the archive is truncated or unreadable: {e}"))
        };
        let mut index_json: Option<Vec<u8>> = None;
        let mut saw_layout = false;
        // Decompressing and reading the tar here, hashing and writing blobs on a second thread:
        // the two halves of a load overlap instead of taking turns.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Piece>(8);
        let stage_path = stage.path().to_path_buf();
        let (read, written) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || write_blobs(&stage_path, rx));
            let read = (|| -> Result<Vec<(Digest, u64)>> {
                let mut expected = Vec::new();
                let mut archive = tar::Archive::new(reader);
                for entry in archive.entries().map_err(truncated)? {
                    let mut entry = entry.map_err(truncated)?;
                    if !entry.header().entry_type().is_file() {
                        continue;
                    }
                    let path = entry
                        .path()
                        .map_err(truncated)?
                        .to_string_lossy()
                        .to_string();
                    let path = path.trim_start_matches("./").to_string();
                    let declared = entry.header().size().map_err(truncated)?;
                    if path == "index.json" || path == "oci-layout" {
                        if declared > MAX_JSON_BLOB {
                            return Err(BundleError::Corrupt(format!("{path} is too large")));
                        }
                        let mut buf = Vec::new();
                        entry.read_to_end(&mut buf).map_err(truncated)?;
                        if path == "index.json" {
                            index_json = Some(buf);
                        } else {
                            saw_layout = true;
                        }
                    } else if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                        let digest = Digest::from_hex(hex)?;
                        // A closed channel means the writer failed: its error is the one told.
                        if tx.send(Piece::Begin).is_err() {
                            break;
                        }
                        loop {
                            let mut buf = vec![0u8; LOAD_CHUNK];
                            let n = read_up_to(&mut entry, &mut buf).map_err(truncated)?;
                            if n == 0 {
                                break;
                            }
                            buf.truncate(n);
                            if tx.send(Piece::Data(buf)).is_err() {
                                break;
                            }
                        }
                        if tx.send(Piece::End).is_err() {
                            break;
                        }
                        expected.push((digest, declared));
                    }
                }
                Ok(expected)
            })();
            drop(tx);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(BundleError::Invalid("the blob writer panicked".into())));
            (read, written)
        });
        let written = written?;
        let read = read?;
        if written.len() != read.len() {
            return Err(BundleError::Invalid("the blob writer stopped early".into()));
        }
        let mut staged: HashMap<Digest, (PathBuf, u64)> = HashMap::new();
        for ((expected, declared), (file, actual, size)) in read.into_iter().zip(written) {
            if size != declared {
                return Err(truncated(std::io::Error::other(format!(
                    "blob {expected} is cut short"
                ))));
            }
            if actual != expected {
                return Err(BundleError::Corrupt(format!(
                    "blob {expected} does not match its digest (found {actual}): the archive was altered or damaged"
                )));
            }
            staged.insert(expected, (file, size));
        }
        if !saw_layout {
            return Err(BundleError::Corrupt(
                "no oci-layout file: not a bundle archive (or cut short)".into(),
            ));
        }
        let index_json = index_json.ok_or_else(|| {
            BundleError::Corrupt("no index.json: the archive is truncated or not a bundle".into())
        })?;
        let index: Index = serde_json::from_slice(&index_json)
            .map_err(|e| BundleError::Corrupt(format!("index.json: {e}")))?;
        // Check every bundle completely before adding anything.
        let need = |d: &Descriptor| -> Result<PathBuf> {
            match staged.get(&d.digest) {
                Some((p, size)) if *size == d.size => Ok(p.clone()),
                Some((_, size)) => Err(BundleError::Corrupt(format!(
                    "blob {} has {size} bytes, {} expected",
                    d.digest, d.size
                ))),
                None => Err(BundleError::Corrupt(format!(
                    "blob {} is missing from the archive",
                    d.digest
                ))),
            }
        };
        let mut bundles = Vec::new();
        for top in &index.manifests {
            let name = ref_name(top)
                .ok_or_else(|| BundleError::Corrupt("an index entry has no name".into()))?;
            let name = BundleName::parse(name)?;
            let top_path = need(top)?;
            let manifest: ImageManifest = serde_json::from_slice(
                &std::fs::read(&top_path).ctx(|| "reading a staged blob".to_string())?,
            )
            .map_err(|e| BundleError::Corrupt(format!("bundle {name} manifest: {e}")))?;
            if manifest.artifact_type.as_deref() != Some(oci::ARTIFACT_BUNDLE) {
                return Err(BundleError::Corrupt(format!(
                    "{name} is not a Kisara bundle"
                )));
            }
            let config_path = need(&manifest.config)?;
            let config: BundleManifest = serde_json::from_slice(
                &std::fs::read(config_path).ctx(|| "reading a staged blob".to_string())?,
            )
            .map_err(|e| BundleError::Corrupt(format!("bundle {name} config: {e}")))?;
            let mut blobs = vec![
                (top.digest.clone(), top_path),
                (manifest.config.digest.clone(), need(&manifest.config)?),
            ];
            for d in &manifest.layers {
                blobs.push((d.digest.clone(), need(d)?));
            }
            check_consistent(&name, &manifest, &config)?;
            bundles.push((name, top.clone(), blobs));
        }
        if bundles.is_empty() {
            return Err(BundleError::Corrupt("the archive holds no bundle".into()));
        }
        let mut names = Vec::new();
        for (name, top, blobs) in bundles {
            for (digest, path) in blobs {
                self.commit_blob(&path, &digest)?;
            }
            self.set_ref(&name, &top)?;
            names.push(name);
        }
        Ok(names)
    }

    /// Unpacks the bundle's work tree into `dest`.
    pub fn extract_files(&self, b: &Bundle, dest: &Path) -> Result<()> {
        let Some(files) = &b.config.files else {
            return Ok(());
        };
        let f = File::open(self.blob_path(&files.digest))
            .map_err(|_| BundleError::Corrupt(format!("blob {} is missing", files.digest)))?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        archive.set_preserve_permissions(true);
        archive
            .unpack(dest)
            .ctx(|| format!("unpacking bundle files into {}", dest.display()))
    }

    /// Reads one file of the bundle's work tree.
    pub fn read_file(&self, b: &Bundle, path: &str) -> Result<Vec<u8>> {
        let Some(files) = &b.config.files else {
            return Err(BundleError::NotFound(format!(
                "{path} in bundle {}",
                b.name
            )));
        };
        let f = File::open(self.blob_path(&files.digest))
            .map_err(|_| BundleError::Corrupt(format!("blob {} is missing", files.digest)))?;
        let mut archive = tar::Archive::new(BufReader::new(f));
        let want = path.trim_start_matches("./");
        for entry in archive
            .entries()
            .ctx(|| "reading bundle files".to_string())?
        {
            let mut entry = entry.ctx(|| "reading bundle files".to_string())?;
            let p = entry
                .path()
                .map(|p| p.to_string_lossy().trim_start_matches("./").to_string())
                .unwrap_or_default();
            if p == want {
                let mut buf = Vec::new();
                entry
                    .read_to_end(&mut buf)
                    .ctx(|| format!("reading {path}"))?;
                return Ok(buf);
            }
        }
        Err(BundleError::NotFound(format!(
            "{path} in bundle {}",
            b.name
        )))
    }

    /// The bundle's images (all, or those whose reference is in `only`) as one archive in the
    /// legacy `docker save` layout, which every engine's `docker load` reads: each config as
    /// `<hex>.json`, each distinct layer once as `<hex>/layer.tar`, and `manifest.json`.
    /// Answers the archive's exact length and a stream that reads blobs as it goes.
    pub fn images_tar(
        &self,
        b: &Bundle,
        only: Option<&[String]>,
    ) -> Result<(u64, BoxStream<'static, std::io::Result<Bytes>>)> {
        self.images_tar_without(b, only, &HashSet::new())
    }

    /// Each distinct layer file of the bundle's images with the chain ids it sits at (see
    /// `kisara_runtime::chain_ids`; from each image config's `rootfs.diff_ids`). A layer whose
    /// chains an engine all holds need not be sent to it. An image whose config does not list
    /// its diff ids gives its layers no chains, so they are always sent.
    pub fn layer_chains(&self, b: &Bundle) -> Result<Vec<LayerChains>> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            rootfs: Option<RootFs>,
        }
        #[derive(serde::Deserialize)]
        struct RootFs {
            #[serde(default)]
            diff_ids: Vec<String>,
        }
        let mut out: Vec<LayerChains> = Vec::new();
        for img in &b.config.images {
            let config: Config = serde_json::from_slice(&self.read_blob(&img.config.digest)?)
                .map_err(|e| {
                    BundleError::Corrupt(format!("image config of {}: {e}", img.reference))
                })?;
            let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
            let chains = if diff_ids.len() == img.layers.len() {
                kisara_runtime::chain_ids(&diff_ids)
            } else {
                Vec::new()
            };
            for (i, l) in img.layers.iter().enumerate() {
                let k = match out.iter().position(|x| x.digest == l.digest) {
                    Some(k) => k,
                    None => {
                        out.push(LayerChains {
                            digest: l.digest.clone(),
                            size: l.size,
                            chains: Vec::new(),
                            always: false,
                        });
                        out.len() - 1
                    }
                };
                match chains.get(i) {
                    Some(c) => out[k].chains.push(c.clone()),
                    None => out[k].always = true,
                }
            }
        }
        Ok(out)
    }

    /// [`Store::images_tar`] without the files of the layers in `skip`; `manifest.json` still
    /// names them (an engine that holds a layer's chain never opens its file).
    pub fn images_tar_without(
        &self,
        b: &Bundle,
        only: Option<&[String]>,
        skip: &HashSet<Digest>,
    ) -> Result<(u64, BoxStream<'static, std::io::Result<Bytes>>)> {
        let images: Vec<&ImageEntry> = b
            .config
            .images
            .iter()
            .filter(|i| only.is_none_or(|o| o.contains(&i.reference)))
            .collect();
        if images.is_empty() {
            return Err(BundleError::Invalid(format!(
                "bundle {} carries no such image",
                b.name
            )));
        }
        let mut entries: Vec<(String, TarSource)> = Vec::new();
        let mut manifest = Vec::new();
        let mut seen = BTreeSet::new();
        for img in &images {
            let config = format!("{}.json", img.config.digest.hex());
            if seen.insert(config.clone()) {
                entries.push((
                    config.clone(),
                    TarSource::File(self.blob_path(&img.config.digest), img.config.size),
                ));
            }
            let mut layers = Vec::new();
            for l in &img.layers {
                let p = format!("{}/layer.tar", l.digest.hex());
                if seen.insert(p.clone()) && !skip.contains(&l.digest) {
                    entries.push((
                        p.clone(),
                        TarSource::File(self.blob_path(&l.digest), l.size),
                    ));
                }
                layers.push(p);
            }
            manifest.push(serde_json::json!({
                "Config": config, "RepoTags": [img.reference], "Layers": layers,
            }));
        }
        let text =
            serde_json::to_vec(&manifest).map_err(|e| BundleError::Invalid(e.to_string()))?;
        entries.insert(
            0,
            ("manifest.json".into(), TarSource::Bytes(Bytes::from(text))),
        );
        for (_, src) in &entries {
            if let TarSource::File(p, size) = src {
                let len = std::fs::metadata(p).map(|m| m.len()).map_err(|_| {
                    BundleError::Corrupt(format!("blob {} is missing from the store", p.display()))
                })?;
                if len != *size {
                    return Err(BundleError::Corrupt(format!(
                        "blob {} has the wrong size",
                        p.display()
                    )));
                }
            }
        }
        let total: u64 = entries
            .iter()
            .map(|(_, s)| 512 + s.len().div_ceil(512) * 512)
            .sum::<u64>()
            + 1024;
        let body = stream::iter(entries)
            .map(|(name, src)| tar_entry(name, src))
            .flatten()
            .chain(stream::once(async { Ok(Bytes::from(vec![0u8; 1024])) }));
        Ok((total, body.boxed()))
    }
}

/// Blob data is read and handed to the writer in pieces of this size.
const LOAD_CHUNK: usize = 1 << 20;

/// What the reading half of a load hands the writing half.
enum Piece {
    Begin,
    Data(Vec<u8>),
    End,
}

/// The writing half of a load: each blob between `Begin` and `End` into a staged file of its
/// own, hashed as it is written. Answers the files with their digests and sizes, in order.
fn write_blobs(
    stage: &Path,
    rx: std::sync::mpsc::Receiver<Piece>,
) -> Result<Vec<(PathBuf, Digest, u64)>> {
    let mut out = Vec::new();
    let mut current: Option<(PathBuf, HashingWriter<File>)> = None;
    for piece in rx {
        match piece {
            Piece::Begin => {
                let (file, path) = staged_file(stage)?;
                current = Some((path, HashingWriter::new(file)));
            }
            Piece::Data(data) => {
                if let Some((path, w)) = current.as_mut() {
                    w.write_all(&data)
                        .ctx(|| format!("writing {}", path.display()))?;
                }
            }
            Piece::End => {
                if let Some((path, w)) = current.take() {
                    let (digest, size, _file) = w.finish();
                    out.push((path, digest, size));
                }
            }
        }
    }
    Ok(out)
}

/// Reads until `buf` is full or the reader ends; answers the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations
        .get(oci::ANNOTATION_REF_NAME)
        .map(String::as_str)
}

/// Every blob the bundle config names must be listed by the top manifest (which is what save,
/// load, push and pull carry).
pub(crate) fn check_consistent(
    name: &BundleName,
    m: &ImageManifest,
    c: &BundleManifest,
) -> Result<()> {
    let listed: BTreeSet<&Digest> = m.layers.iter().map(|d| &d.digest).collect();
    let wanted = c
        .images
        .iter()
        .flat_map(|i| {
            std::iter::once(&i.manifest)
                .chain(std::iter::once(&i.config.digest))
                .chain(i.layers.iter().map(|l| &l.digest))
        })
        .chain(c.files.iter().map(|f| &f.digest));
    for d in wanted {
        if !listed.contains(d) {
            return Err(BundleError::Corrupt(format!(
                "bundle {name} needs blob {d}, which its manifest does not list"
            )));
        }
    }
    Ok(())
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, path, data)
}

enum TarSource {
    Bytes(Bytes),
    File(PathBuf, u64),
}

impl TarSource {
    fn len(&self) -> u64 {
        match self {
            TarSource::Bytes(b) => b.len() as u64,
            TarSource::File(_, n) => *n,
        }
    }
}

/// One tar entry as a stream: header, content (read from disk as it goes), padding.
fn tar_entry(name: String, src: TarSource) -> BoxStream<'static, std::io::Result<Bytes>> {
    let size = src.len();
    let mut header = tar::Header::new_ustar();
    let header_ok = header.set_path(&name);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    if let Err(e) = header_ok {
        return stream::once(async move { Err(e) }).boxed();
    }
    let head = stream::once({
        let h = Bytes::copy_from_slice(header.as_bytes());
        async move { Ok(h) }
    });
    let pad = (512 - (size % 512) as usize) % 512;
    let body: BoxStream<'static, std::io::Result<Bytes>> = match src {
        TarSource::Bytes(b) => stream::once(async move { Ok(b) }).boxed(),
        TarSource::File(path, _) => stream::once(async move { tokio::fs::File::open(path).await })
            .map_ok(move |f| {
                // Exactly `size` bytes: a blob that grew would corrupt the archive.
                tokio_util::io::ReaderStream::with_capacity(
                    tokio::io::AsyncReadExt::take(f, size),
                    256 << 10,
                )
            })
            .try_flatten()
            .boxed(),
    };
    let tail = stream::once(async move { Ok(Bytes::from(vec![0u8; pad])) }).filter(
        |r: &std::io::Result<Bytes>| {
            futures::future::ready(r.as_ref().map_or(true, |b| !b.is_empty()))
        },
    );
    head.chain(body).chain(tail).boxed()
}

/// A new file in the staging dir `stage`, kept (not deleted on drop): its handle and path.
fn staged_file(stage: &Path) -> Result<(File, PathBuf)> {
    let f = tempfile::Builder::new()
        .prefix("blob-")
        .tempfile_in(stage)
        .ctx(|| format!("creating a file in {}", stage.display()))?;
    f.keep().map_err(|e| BundleError::Io {
        context: "keeping a staged blob".into(),
        source: e.error,
    })
}
