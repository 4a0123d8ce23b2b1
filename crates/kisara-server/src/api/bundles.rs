//! Bundle routes. The server's bundles live in `<data dir>/bundles/` (the same store format
//! as the CLI's, so `kisara build` next to a `kisara up` on one data dir is seen at once);
//! `POST /v1/bundles` adds one from a saved archive, streamed to disk and verified.
//!
//! Agents fetch a bundle's images as one `docker load` archive from
//! `GET /v1/bundles/{name}/images.tar` over a connection of their own, with their node
//! credential (or the admin token) as bearer: bulk bytes never travel the control channel.

use std::collections::HashSet;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::{StreamExt, TryStreamExt};
use kisara_api::agent::Operation;
use kisara_api::{
    BundleImagesRequest, BundleLoadProgress, BundleSummary, ErrorBody, ListResponse, NODE_ID_HEADER,
};
use kisara_bundle::digest::Digest;
use kisara_bundle::store::{Bundle, LayerChains};
use kisara_bundle::{BundleError, Store};
use tokio::io::AsyncWriteExt;

use super::ApiJson;
use crate::error::{ApiError, ApiResult};
use crate::{placement, tokens, AppState};

/// Directory of the server's bundle store inside its data directory.
pub const BUNDLES_DIR: &str = "bundles";

fn store(st: &AppState) -> ApiResult<Store> {
    Store::open(st.data_dir.join(BUNDLES_DIR)).map_err(api_error)
}

fn api_error(e: BundleError) -> ApiError {
    match e {
        BundleError::NotFound(_) => ApiError::not_found(e.to_string()),
        BundleError::InvalidName { .. } | BundleError::Invalid(_) | BundleError::Corrupt(_) => {
            ApiError::bad_request(e.to_string())
        }
        e => ApiError::internal(e.to_string()),
    }
}

fn summary(b: &Bundle) -> BundleSummary {
    BundleSummary {
        name: b.name.to_string(),
        digest: b.digest.to_string(),
        apps: b.config.apps.iter().map(|a| a.name.clone()).collect(),
        images: b
            .config
            .images
            .iter()
            .map(|i| i.reference.clone())
            .collect(),
        size: b.size(),
        created: b.config.created,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BundleError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(api_error)
}

/// Bundles in the server's store.
#[utoipa::path(get, path = "/v1/bundles",
    responses((status = 200, body = ListResponse<BundleSummary>)))]
pub async fn list(State(st): State<Arc<AppState>>) -> ApiResult<Json<ListResponse<BundleSummary>>> {
    let store = store(&st)?;
    let items = blocking(move || {
        let mut out = Vec::new();
        for l in store.list()? {
            out.push(summary(&store.get(&l.name.to_string())?));
        }
        Ok(out)
    })
    .await?;
    Ok(Json(ListResponse {
        items,
        node_errors: Vec::new(),
    }))
}

/// One bundle's manifest (name, apps, launch plan, env, images with digests).
#[utoipa::path(get, path = "/v1/bundles/{name}",
    params(("name" = String, Path, description = "`name[:tag]`")),
    responses((status = 200, body = serde_json::Value), (status = 404, body = ErrorBody)))]
pub async fn inspect(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let store = store(&st)?;
    let b = blocking(move || store.get(&name)).await?;
    let mut v = serde_json::to_value(&b.config).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("digest".into(), b.digest.to_string().into());
        o.insert("size".into(), b.size().into());
    }
    Ok(Json(v))
}

/// Adds bundles from a saved archive (`kisara save`, plain or zstd) sent as the body. The body
/// is written to disk as it arrives, then every blob is checked; a damaged archive adds nothing.
#[utoipa::path(post, path = "/v1/bundles",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ListResponse<BundleSummary>), (status = 400, body = ErrorBody)))]
pub async fn upload(
    State(st): State<Arc<AppState>>,
    body: Body,
) -> ApiResult<(StatusCode, Json<ListResponse<BundleSummary>>)> {
    let store = store(&st)?;
    let stage = store.stage().map_err(api_error)?;
    let path = stage.path().join("upload");
    let mut f = tokio::fs::File::create(&path)
        .await
        .map_err(|e| ApiError::internal(format!("staging the upload: {e}")))?;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data
        .try_next()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?
    {
        f.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("staging the upload: {e}")))?;
    }
    f.flush()
        .await
        .map_err(|e| ApiError::internal(format!("staging the upload: {e}")))?;
    drop(f);
    let items = blocking(move || {
        let file = std::fs::File::open(&path).map_err(|e| BundleError::Io {
            context: "reading the upload".into(),
            source: e,
        })?;
        let names = store.load(file)?;
        drop(stage);
        names
            .iter()
            .map(|n| store.get(&n.to_string()).map(|b| summary(&b)))
            .collect()
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(ListResponse {
            items,
            node_errors: Vec::new(),
        }),
    ))
}

/// Loads the bundle's images into one node's engine or every connected node's, through the
/// agents and without a registry. Answers NDJSON progress; each node ends with `done` (naming
/// the images loaded) or `error`.
#[utoipa::path(post, path = "/v1/bundles/{name}/images", request_body = BundleImagesRequest,
    params(("name" = String, Path, description = "`name[:tag]`")),
    responses((status = 200, content_type = "application/x-ndjson", body = BundleLoadProgress),
              (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn load_images(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<BundleImagesRequest>,
) -> ApiResult<Response> {
    let store = store(&st)?;
    let b = blocking(move || store.get(&name)).await?;
    if b.config.images.is_empty() {
        return Err(ApiError::bad_request(format!(
            "bundle {} carries no image",
            b.name
        )));
    }
    let nodes = match req.node.as_deref() {
        Some(n) => vec![placement::resolve_node(&st, n)?],
        None => {
            let mut v: Vec<String> = st
                .hub
                .sessions()
                .iter()
                .map(|s| s.node_id.clone())
                .collect();
            v.sort();
            v
        }
    };
    if nodes.is_empty() {
        return Err(ApiError::no_node("no node is connected"));
    }
    let url_path = format!("/v1/bundles/{}/images.tar", b.name);
    let mut streams = Vec::new();
    for node in nodes {
        let s = st
            .hub
            .stream(
                &node,
                Operation::LoadImagesFrom {
                    url_path: url_path.clone(),
                },
            )
            .await?;
        streams.push(node_progress(node, s));
    }
    let body = futures::stream::select_all(streams).map(|p| {
        let mut line = serde_json::to_vec(&p).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::io::Error>(bytes::Bytes::from(line))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn node_progress(
    node: String,
    stream: crate::hub::AgentStream,
) -> futures::stream::BoxStream<'static, BundleLoadProgress> {
    futures::stream::unfold(Some((node, stream, false)), |state| async move {
        let (node, mut stream, done) = state?;
        match stream.next().await {
            Some(Ok(v)) => {
                let mut p: BundleLoadProgress = serde_json::from_value(v).unwrap_or_default();
                p.node_id = node.clone();
                let done = done || p.status == "done";
                Some((p, Some((node, stream, done))))
            }
            Some(Err(e)) => Some((
                BundleLoadProgress {
                    node_id: node,
                    status: "error".into(),
                    error: Some(e.message),
                    ..Default::default()
                },
                None,
            )),
            // The agent sends `done` itself; an end without it is a failure.
            None if done => None,
            None => Some((
                BundleLoadProgress {
                    node_id: node,
                    status: "error".into(),
                    error: Some("the node ended the load without a result".into()),
                    ..Default::default()
                },
                None,
            )),
        }
    })
    .boxed()
}

/// Agents' bulk routes take a node credential (with the node id in `x-kisara-node`) or the
/// admin token as bearer.
fn fetch_allowed(st: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    let node = headers.get(NODE_ID_HEADER).and_then(|v| v.to_str().ok());
    let allowed = tokens::matches(st.admin_token(), bearer)
        || node.is_some_and(|id| {
            st.store
                .node_credential_matches(id, bearer)
                .unwrap_or(false)
        });
    if allowed {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid token"))
    }
}

/// Which layer files `images.tar` can leave out.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImagesTarQuery {
    /// Layer digests (64 hex digits each, comma-separated) whose files the node does not need:
    /// `manifest.json` still names them.
    #[serde(default)]
    pub skip: Option<String>,
}

/// Most layers one request may skip (a bundle with more sends the rest).
const MAX_SKIP: usize = 1000;

/// The bundle's images as one `docker load` archive (legacy `docker save` layout), streamed
/// from the store, without the layer files named in `skip`. Bearer: a node credential (with the
/// node id in `x-kisara-node`) or the admin token.
#[utoipa::path(get, path = "/v1/bundles/{name}/images.tar",
    params(("name" = String, Path, description = "`name[:tag]`"), ImagesTarQuery),
    responses((status = 200, content_type = "application/x-tar"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)))]
pub async fn images_tar(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(q): Query<ImagesTarQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    fetch_allowed(&st, &headers)?;
    let mut skip = HashSet::new();
    for hex in q
        .skip
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|h| !h.is_empty())
        .take(MAX_SKIP)
    {
        skip.insert(Digest::from_hex(hex).map_err(api_error)?);
    }
    let store = store(&st)?;
    let (len, body) = blocking(move || {
        let b = store.get(&name)?;
        store.images_tar_without(&b, None, &skip)
    })
    .await?;
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// Each layer file of the bundle's images with the chain ids it sits at, so that a node can
/// ask `images.tar` to leave out the layers its engine holds. Bearer as for `images.tar`.
#[utoipa::path(get, path = "/v1/bundles/{name}/layers",
    params(("name" = String, Path, description = "`name[:tag]`")),
    responses((status = 200, body = serde_json::Value),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn layers(
    State(st): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<LayerChains>>> {
    fetch_allowed(&st, &headers)?;
    let store = store(&st)?;
    let out = blocking(move || {
        let b = store.get(&name)?;
        store.layer_chains(&b)
    })
    .await?;
    Ok(Json(out))
}
