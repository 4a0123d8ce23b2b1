//! Pushing and pulling bundles to and from an OCI registry (oci-client).
//!
//! A bundle travels as what it is in the store: its top manifest (artifact type
//! `application/vnd.kisara.bundle.v1`) and every blob it lists, each uploaded once (blobs the
//! registry has are skipped) and streamed from disk. A pull checks the manifest and every blob
//! against its digest before the bundle gets a name in the store.

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, HashingWriter};
use crate::error::{BundleError, Result};
use crate::manifest::BundleManifest;
use crate::oci::{self, ImageManifest};
use crate::store::{check_consistent, BundleName, Store};

/// How to reach a registry.
#[derive(Clone, Default)]
pub struct RegistryOptions {
    /// Plain HTTP. Loopback registries (`127.0.0.1`, `localhost`, `[::1]`) always use it.
    pub plain_http: bool,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("plain_http", &self.plain_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

fn parse_ref(reference: &str) -> Result<Reference> {
    reference
        .parse::<Reference>()
        .map_err(|e| BundleError::Registry {
            reference: reference.to_string(),
            message: format!("invalid reference: {e}"),
        })
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

fn client(reference: &Reference, opts: &RegistryOptions) -> (oci_client::Client, RegistryAuth) {
    let registry = reference.resolve_registry().to_string();
    let protocol = if opts.plain_http || is_loopback(&registry) {
        ClientProtocol::HttpsExcept(vec![registry])
    } else {
        ClientProtocol::Https
    };
    let auth = match (&opts.username, &opts.password) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        _ => RegistryAuth::Anonymous,
    };
    let config = ClientConfig {
        protocol,
        ..Default::default()
    };
    (oci_client::Client::new(config), auth)
}

/// Progress of a transfer: bytes moved so far and the total.
pub type OnProgress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

/// Pushes bundle `name` as `reference`; answers the manifest digest.
pub async fn push(
    store: &Store,
    name: &str,
    reference: &str,
    opts: &RegistryOptions,
    progress: OnProgress<'_>,
) -> Result<Digest> {
    let b = store.get(name)?;
    let r = parse_ref(reference)?;
    let (client, auth) = client(&r, opts);
    let err = |m: String| BundleError::Registry {
        reference: reference.to_string(),
        message: m,
    };
    client
        .auth(&r, &auth, RegistryOperation::Push)
        .await
        .map_err(|e| err(format!("authentication: {e}")))?;
    let blobs = b.blobs();
    let total: u64 = blobs.iter().map(|d| d.size).sum();
    let mut done = 0;
    for d in &blobs {
        let exists = client
            .blob_exists(&r, d.digest.as_str())
            .await
            .map_err(|e| err(e.to_string()))?;
        if !exists {
            let f = tokio::fs::File::open(store.blob_path(&d.digest))
                .await
                .map_err(|_| {
                    BundleError::Corrupt(format!("blob {} is missing from the store", d.digest))
                })?;
            let body = tokio_util::io::ReaderStream::with_capacity(f, 1 << 20)
                .map(|r| r.map_err(oci_client::errors::OciDistributionError::IoError));
            client
                .push_blob_stream(&r, body, d.digest.as_str(), Some(d.size))
                .await
                .map_err(|e| err(format!("uploading blob {}: {e}", d.digest)))?;
        }
        done += d.size;
        progress(done, total);
    }
    let top = store.read_blob(&b.digest)?;
    let content_type = oci::MEDIA_MANIFEST
        .parse()
        .map_err(|_| err("bad content type".into()))?;
    client
        .push_manifest_raw(&r, top, content_type)
        .await
        .map_err(|e| err(format!("uploading the manifest: {e}")))?;
    Ok(b.digest)
}

/// Pulls `reference` into the store as `name` (default: the repository's last path component
/// and the reference's tag). Answers the name.
pub async fn pull(
    store: &Store,
    reference: &str,
    name: Option<&str>,
    opts: &RegistryOptions,
    progress: OnProgress<'_>,
) -> Result<BundleName> {
    let r = parse_ref(reference)?;
    let name = match name {
        Some(n) => BundleName::parse(n)?,
        None => {
            let repo = r.repository().rsplit('/').next().unwrap_or_default();
            BundleName::parse(&format!("{repo}:{}", r.tag().unwrap_or("latest")))?
        }
    };
    let (client, auth) = client(&r, opts);
    let err = |m: String| BundleError::Registry {
        reference: reference.to_string(),
        message: m,
    };
    let (raw, digest) = client
        .pull_manifest_raw(&r, &auth, &[oci::MEDIA_MANIFEST])
        .await
        .map_err(|e| err(format!("fetching the manifest: {e}")))?;
    let digest = Digest::parse(&digest).unwrap_or_else(|_| Digest::of(&raw));
    crate::digest::verify(&raw, &digest, "bundle manifest")?;
    let manifest: ImageManifest = serde_json::from_slice(&raw)
        .map_err(|e| BundleError::Corrupt(format!("bundle manifest: {e}")))?;
    if manifest.artifact_type.as_deref() != Some(oci::ARTIFACT_BUNDLE) {
        return Err(err("not a Kisara bundle (its artifact type differs)".into()));
    }
    let stage = store.stage()?;
    let mut todo = vec![manifest.config.clone()];
    todo.extend(manifest.layers.iter().cloned());
    let total: u64 = todo.iter().map(|d| d.size).sum();
    let mut done = 0;
    let mut staged = Vec::new();
    for d in &todo {
        if !store.has_blob(&d.digest) && !staged.iter().any(|(g, _)| g == &d.digest) {
            let path = stage.path().join(d.digest.hex());
            let f = tokio::fs::File::create(&path)
                .await
                .map_err(|e| err(format!("staging: {e}")))?;
            let mut w = tokio::io::BufWriter::new(f);
            client
                .pull_blob(&r, d.digest.as_str(), &mut w)
                .await
                .map_err(|e| err(format!("fetching blob {}: {e}", d.digest)))?;
            w.flush().await.map_err(|e| err(format!("staging: {e}")))?;
            // Check independently of the client: what enters the store is what was named.
            let (actual, size) = tokio::task::spawn_blocking({
                let path = path.clone();
                move || -> std::io::Result<(Digest, u64)> {
                    let mut f = std::fs::File::open(path)?;
                    let mut h = HashingWriter::new(std::io::sink());
                    std::io::copy(&mut f, &mut h)?;
                    let (d, n, _) = h.finish();
                    Ok((d, n))
                }
            })
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(format!("staging: {e}")))?;
            if actual != d.digest || size != d.size {
                return Err(BundleError::Corrupt(format!(
                    "blob {} from the registry does not match its digest or size",
                    d.digest
                )));
            }
            staged.push((d.digest.clone(), path));
        }
        done += d.size;
        progress(done, total);
    }
    let config_bytes = match staged.iter().find(|(g, _)| g == &manifest.config.digest) {
        Some((_, p)) => std::fs::read(p).map_err(|e| err(format!("staging: {e}")))?,
        None => store.read_blob(&manifest.config.digest)?,
    };
    let config: BundleManifest = serde_json::from_slice(&config_bytes)
        .map_err(|e| BundleError::Corrupt(format!("bundle config: {e}")))?;
    check_consistent(&name, &manifest, &config)?;
    for (d, p) in &staged {
        store.commit_blob(p, d)?;
    }
    let top = store.put_bytes(oci::MEDIA_MANIFEST, &raw)?;
    store.set_ref(&name, &top)?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_use_plain_http() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn options_debug_hides_the_password() {
        let o = RegistryOptions {
            plain_http: false,
            username: Some("u".into()),
            password: Some("hunter2".into()),
        };
        assert!(!format!("{o:?}").contains("hunter2"));
    }
}
