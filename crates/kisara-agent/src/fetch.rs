//! Bulk data from the server over HTTP connections of their own (never through the control
//! channel, where a large transfer would hold up every other request behind it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kisara_api::agent::{AgentMessage, Secret};
use kisara_api::{codes, BundleLoadProgress, ErrorBody, NODE_ID_HEADER};
use kisara_runtime::{Runtime, RuntimeError};
use tokio::sync::mpsc;

/// How this agent reaches the server over plain HTTP.
pub struct Fetcher {
    /// `http://host:port`.
    pub base: String,
    pub node_id: String,
    pub credential: Option<Secret>,
    pub http: reqwest::Client,
}

impl Fetcher {
    /// `ca_pem`: the CA an `https://` server's certificate is signed by (else the system's).
    pub fn new(
        server_url: &str,
        node_id: String,
        credential: Option<Secret>,
        ca_pem: Option<&[u8]>,
    ) -> Self {
        let base = server_url.trim_end_matches('/');
        let base = if let Some(rest) = base.strip_prefix("ws://") {
            format!("http://{rest}")
        } else if let Some(rest) = base.strip_prefix("wss://") {
            format!("https://{rest}")
        } else {
            base.to_string()
        };
        Fetcher {
            base,
            node_id,
            credential,
            http: {
                let mut b = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
                if let Some(certs) =
                    ca_pem.and_then(|p| reqwest::Certificate::from_pem_bundle(p).ok())
                {
                    b = b.tls_certs_only(certs);
                }
                b.build().unwrap_or_default()
            },
        }
    }
}

/// Downloads the archive at `url_path` and streams it into the engine's `docker load`,
/// reporting bytes received about twice a second and the loaded references at the end.
/// Layers the engine already holds (by chain id) are asked to be left out of the archive; if
/// the engine refuses such an archive, the whole one is fetched and loaded instead.
pub async fn load_images_from(
    rt: Arc<dyn Runtime>,
    id: u64,
    url_path: &str,
    fetch: &Fetcher,
    tx: &mpsc::Sender<AgentMessage>,
) {
    let fail = |message: String| AgentMessage::StreamEnd {
        id,
        error: Some(ErrorBody::new(codes::RUNTIME, message)),
    };
    if !url_path.starts_with("/v1/") || url_path.contains('?') {
        let _ = tx
            .send(fail(format!("refusing to fetch {url_path:?}")))
            .await;
        return;
    }
    let skip = skippable(rt.as_ref(), url_path, fetch).await;
    let mut result = if skip.is_empty() {
        fetch_and_load(rt.clone(), id, url_path, fetch, tx).await
    } else {
        let path = format!("{url_path}?skip={}", skip.join(","));
        fetch_and_load(rt.clone(), id, &path, fetch, tx).await
    };
    if let Err(Failure::Load(e)) = &result {
        if !skip.is_empty() {
            tracing::warn!(
                "the engine refused the archive without the {} layer(s) it holds ({e}); loading the whole archive",
                skip.len()
            );
            result = fetch_and_load(rt, id, url_path, fetch, tx).await;
        }
    }
    match result {
        Ok(()) => {
            let _ = tx.send(AgentMessage::StreamEnd { id, error: None }).await;
        }
        Err(Failure::Gone) => {}
        Err(Failure::Fetch(message)) => {
            let _ = tx.send(fail(message)).await;
        }
        Err(Failure::Load(e)) => {
            let _ = tx
                .send(AgentMessage::StreamEnd {
                    id,
                    error: Some(crate::error_body(&e)),
                })
                .await;
        }
    }
}

enum Failure {
    /// The server's side of the stream is gone: nobody to tell.
    Gone,
    Fetch(String),
    Load(RuntimeError),
}

/// One layer file of the bundle's images, as `GET /v1/bundles/{name}/layers` lists it.
#[derive(serde::Deserialize)]
struct LayerChains {
    digest: String,
    #[serde(default)]
    chains: Vec<String>,
    #[serde(default)]
    always: bool,
}

/// The hex digests of the bundle's layer files the engine needs not receive: every chain each
/// sits at is one the engine holds. Empty when anything is unknown (then all is sent).
async fn skippable(rt: &dyn Runtime, url_path: &str, fetch: &Fetcher) -> Vec<String> {
    let Some(base) = url_path.strip_suffix("/images.tar") else {
        return Vec::new();
    };
    let have = match rt.layer_chains().await {
        Ok(h) if !h.is_empty() => h,
        _ => return Vec::new(),
    };
    let mut req = fetch
        .http
        .get(format!("{}{base}/layers", fetch.base))
        .timeout(Duration::from_secs(30))
        .header(NODE_ID_HEADER, &fetch.node_id);
    if let Some(c) = &fetch.credential {
        req = req.bearer_auth(c.expose());
    }
    let layers: Vec<LayerChains> = match req.send().await {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
        _ => return Vec::new(),
    };
    layers
        .into_iter()
        .filter(|l| !l.always && !l.chains.is_empty() && l.chains.iter().all(|c| have.contains(c)))
        .filter_map(|l| {
            let hex = l.digest.strip_prefix("sha256:")?;
            (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
        })
        .collect()
}

async fn fetch_and_load(
    rt: Arc<dyn Runtime>,
    id: u64,
    path: &str,
    fetch: &Fetcher,
    tx: &mpsc::Sender<AgentMessage>,
) -> Result<(), Failure> {
    let mut req = fetch
        .http
        .get(format!("{}{path}", fetch.base))
        .header(NODE_ID_HEADER, &fetch.node_id);
    if let Some(c) = &fetch.credential {
        req = req.bearer_auth(c.expose());
    }
    let what = path.split('?').next().unwrap_or(path);
    let resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            return Err(Failure::Fetch(format!("fetching {what}: {status}: {body}")));
        }
        Err(e) => return Err(Failure::Fetch(format!("fetching {what}: {e}"))),
    };
    let total = resp.content_length();
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let body = resp
        .bytes_stream()
        .map(move |chunk| {
            chunk
                .inspect(|c| {
                    counter.fetch_add(c.len() as u64, Ordering::Relaxed);
                })
                .map_err(|e| RuntimeError::Engine(format!("download from the server: {e}")))
        })
        .boxed();
    let progress = |status: &str, images: Vec<String>| {
        let p = BundleLoadProgress {
            node_id: String::new(),
            status: status.to_string(),
            current: received.load(Ordering::Relaxed),
            total,
            images,
            error: None,
        };
        AgentMessage::Stream {
            id,
            item: serde_json::to_value(p).unwrap_or_default(),
        }
    };
    let load = rt.load_images(body);
    tokio::pin!(load);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let result = loop {
        tokio::select! {
            r = &mut load => break r,
            _ = tick.tick() => {
                if tx.send(progress("loading", Vec::new())).await.is_err() {
                    return Err(Failure::Gone);
                }
            }
        }
    };
    match result {
        Ok(images) => {
            if tx.send(progress("done", images)).await.is_err() {
                return Err(Failure::Gone);
            }
            Ok(())
        }
        Err(e) => Err(Failure::Load(e)),
    }
}
