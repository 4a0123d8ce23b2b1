//! Turning the engine's `docker save` archive into bundle blobs.
//!
//! Two layouts exist: the legacy one (`manifest.json`, `<id>.json` configs, `<id>/layer.tar`),
//! which Docker 20.10 writes, and the OCI layout (`index.json`, `blobs/sha256/...`), which newer
//! engines write (beside a `manifest.json` that points into `blobs/`). Both are read. Every
//! layer becomes a blob named by the digest of its bytes; a legacy `layer.tar` is the
//! uncompressed layer, so its digest is the layer's diff id and it is stored with the media
//! type `application/vnd.oci.image.layer.v1.tar`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::Digest;
use crate::error::{BundleError, Result};
use crate::manifest::ImageEntry;
use crate::oci::{self, Descriptor, ImageManifest, Index};
use crate::store::Store;

/// Files up to this size are also kept in memory while reading (manifests and configs).
const SMALL: u64 = 4 << 20;

struct Staged {
    path: PathBuf,
    digest: Digest,
    size: u64,
}

/// One image found in the archive: its tags, config and layers (in order).
struct Found {
    tags: Vec<String>,
    config: Vec<u8>,
    layers: Vec<(String, Option<String>)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyItem {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    #[serde(default)]
    layers: Vec<String>,
}

/// Reads a `docker save` archive into the store and answers one entry per name in `refs`
/// (each must be among the archive's tags). Blobs are committed to the store; the caller
/// records them in a bundle.
pub fn ingest(store: &Store, archive: impl Read, refs: &[String]) -> Result<Vec<ImageEntry>> {
    let stage = store.stage()?;
    let bad =
        |e: std::io::Error| BundleError::Corrupt(format!("image archive from the engine: {e}"));
    let mut files: HashMap<String, Staged> = HashMap::new();
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(bad)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let size = entry.header().size().map_err(bad)?;
        if size <= SMALL
            && (path.ends_with(".json") || !path.contains('/') || path.starts_with("blobs/"))
        {
            let mut buf = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut buf).map_err(bad)?;
            let (p, digest, size) = store.stage_blob(stage.path(), &mut buf.as_slice())?;
            small.insert(path.clone(), buf);
            files.insert(
                path,
                Staged {
                    path: p,
                    digest,
                    size,
                },
            );
        } else {
            let (p, digest, size) = store.stage_blob(stage.path(), &mut entry)?;
            files.insert(
                path,
                Staged {
                    path: p,
                    digest,
                    size,
                },
            );
        }
    }
    let found = if let Some(text) = small.get("manifest.json") {
        let items: Vec<LegacyItem> = serde_json::from_slice(text)
            .map_err(|e| BundleError::Corrupt(format!("manifest.json from the engine: {e}")))?;
        items
            .into_iter()
            .map(|i| {
                let config = small.get(&i.config).cloned().ok_or_else(|| {
                    BundleError::Corrupt(format!("the engine's archive lacks {}", i.config))
                })?;
                Ok(Found {
                    tags: i.repo_tags.unwrap_or_default(),
                    config,
                    layers: i.layers.into_iter().map(|l| (l, None)).collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?
    } else if let Some(text) = small.get("index.json") {
        oci_images(text, &small)?
    } else {
        return Err(BundleError::Corrupt(
            "the engine's image archive has neither manifest.json nor index.json".into(),
        ));
    };

    let mut out = Vec::new();
    for r in refs {
        let want = normalize_reference(r);
        let img = found
            .iter()
            .find(|f| f.tags.iter().any(|t| normalize_reference(t) == want))
            .ok_or_else(|| BundleError::ImageUnavailable {
                reference: r.clone(),
                message: "the engine's export does not contain it".into(),
            })?;
        let config = store.put_bytes(oci::MEDIA_IMAGE_CONFIG, &img.config)?;
        let mut layers = Vec::new();
        for (path, media) in &img.layers {
            let staged = files.get(path).ok_or_else(|| {
                BundleError::Corrupt(format!("the engine's archive lacks layer {path}"))
            })?;
            let media = match media {
                Some(m) => m.clone(),
                None => sniff_layer(&staged.path),
            };
            if !store.has_blob(&staged.digest) {
                // The same layer file may back several images: copy, the stage keeps its own.
                std::fs::copy(&staged.path, store.blob_path(&staged.digest)).map_err(|e| {
                    BundleError::Io {
                        context: format!("storing layer {}", staged.digest),
                        source: e,
                    }
                })?;
            }
            layers.push(Descriptor::new(&media, staged.digest.clone(), staged.size));
        }
        let manifest = ImageManifest::new(config.clone(), layers.clone());
        let text =
            serde_json::to_vec(&manifest).map_err(|e| BundleError::Invalid(e.to_string()))?;
        let m = store.put_bytes(oci::MEDIA_MANIFEST, &text)?;
        out.push(ImageEntry {
            reference: want,
            manifest: m.digest,
            config,
            layers,
        });
    }
    Ok(out)
}

/// Images of an OCI-layout archive: index → (nested indexes →) manifests → config + layers.
fn oci_images(index: &[u8], small: &HashMap<String, Vec<u8>>) -> Result<Vec<Found>> {
    let corrupt = |m: String| BundleError::Corrupt(format!("the engine's OCI archive: {m}"));
    let blob = |d: &Digest| -> Result<&Vec<u8>> {
        small
            .get(&format!("blobs/sha256/{}", d.hex()))
            .ok_or_else(|| corrupt(format!("blob {d} is missing")))
    };
    let index: Index =
        serde_json::from_slice(index).map_err(|e| corrupt(format!("index.json: {e}")))?;
    let mut out = Vec::new();
    let mut queue: Vec<(Descriptor, Vec<String>)> = index
        .manifests
        .into_iter()
        .map(|d| {
            let tags = ["io.containerd.image.name", oci::ANNOTATION_REF_NAME]
                .iter()
                .filter_map(|k| d.annotations.get(*k).cloned())
                .collect();
            (d, tags)
        })
        .collect();
    let mut steps = 0;
    while let Some((d, tags)) = queue.pop() {
        steps += 1;
        if steps > 10_000 {
            return Err(corrupt("too many nested manifests".into()));
        }
        let data = blob(&d.digest)?;
        crate::digest::verify(data, &d.digest, "manifest")?;
        if d.media_type == oci::MEDIA_INDEX || d.media_type.ends_with("manifest.list.v2+json") {
            let inner: Index = serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
            queue.extend(inner.manifests.into_iter().map(|m| (m, tags.clone())));
            continue;
        }
        let m: ImageManifest = serde_json::from_slice(data).map_err(|e| corrupt(e.to_string()))?;
        let config = blob(&m.config.digest)?.clone();
        out.push(Found {
            tags,
            config,
            layers: m
                .layers
                .iter()
                .map(|l| {
                    (
                        format!("blobs/sha256/{}", l.digest.hex()),
                        Some(l.media_type.clone()),
                    )
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Media type of a layer file from its first bytes.
fn sniff_layer(path: &Path) -> String {
    let mut head = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    match &head[..n] {
        [0x1f, 0x8b, ..] => oci::MEDIA_LAYER_GZIP.to_string(),
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd".to_string(),
        _ => oci::MEDIA_LAYER_TAR.to_string(),
    }
}

/// `busybox` → `busybox:latest`; `docker.io/library/x` → `x:latest`: the form the engine
/// lists tags in.
pub fn normalize_reference(r: &str) -> String {
    let r = r
        .strip_prefix("docker.io/library/")
        .or_else(|| r.strip_prefix("index.docker.io/library/"))
        .or_else(|| r.strip_prefix("docker.io/"))
        .unwrap_or(r);
    let last = r.rsplit('/').next().unwrap_or(r);
    if r.contains('@') || last.contains(':') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized() {
        for (i, o) in [
            ("busybox", "busybox:latest"),
            ("docker.io/library/busybox:1", "busybox:1"),
            ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
            ("127.0.0.1:5000/a/b:v2", "127.0.0.1:5000/a/b:v2"),
        ] {
            assert_eq!(normalize_reference(i), o);
        }
    }
}
