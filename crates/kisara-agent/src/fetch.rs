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
    if !url_path.starts_with("/v1/") {
        let _ = tx
            .send(fail(format!("refusing to fetch {url_path:?}")))
            .await;
        return;
    }
    let mut req = fetch
        .http
        .get(format!("{}{url_path}", fetch.base))
        .header(NODE_ID_HEADER, &fetch.node_id);
    if let Some(c) = &fetch.credential {
        req = req.bearer_auth(c.expose());
    }
    let resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            let _ = tx
                .send(fail(format!("fetching {url_path}: {status}: {body}")))
                .await;
            return;
        }
        Err(e) => {
            let _ = tx.send(fail(format!("fetching {url_path}: {e}"))).await;
            return;
        }
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
                    return;
                }
            }
        }
    };
    match result {
        Ok(images) => {
            let _ = tx.send(progress("done", images)).await;
            let _ = tx.send(AgentMessage::StreamEnd { id, error: None }).await;
        }
        Err(e) => {
            let _ = tx
                .send(AgentMessage::StreamEnd {
                    id,
                    error: Some(crate::error_body(&e)),
                })
                .await;
        }
    }
}
