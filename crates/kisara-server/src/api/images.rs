//! Image routes: list (fan-out), pull (streamed progress), remove.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use futures::StreamExt;
use kisara_api::agent::{Operation, Reply};
use kisara_api::{
    ErrorBody, ImageQuery, ImageSummary, ListResponse, NodeError, PullProgress, PullRequest,
};

use super::{ApiJson, ApiQuery};
use crate::error::{ApiError, ApiResult};
use crate::{placement, AppState};

const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Nodes a request addresses: the one named, or every connected node.
fn target_nodes(st: &AppState, node: Option<&str>) -> ApiResult<Vec<String>> {
    match node {
        Some(n) => Ok(vec![placement::resolve_node(st, n)?]),
        None => {
            let mut v: Vec<String> = st
                .hub
                .sessions()
                .iter()
                .map(|s| s.node_id.clone())
                .collect();
            v.sort();
            Ok(v)
        }
    }
}

/// Images on every node (or one), merged; unreachable nodes are reported, not fatal.
#[utoipa::path(get, path = "/v1/images", params(ImageQuery),
    responses((status = 200, body = ListResponse<ImageSummary>)))]
pub async fn list(
    State(st): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<ImageQuery>,
) -> ApiResult<Json<ListResponse<ImageSummary>>> {
    let nodes = target_nodes(&st, q.node.as_deref())?;
    let calls = nodes.into_iter().map(|n| {
        let st = st.clone();
        async move {
            let r = st
                .hub
                .call(&n, Operation::ListImages, super::containers::LIST_DEADLINE)
                .await;
            (n, r)
        }
    });
    let mut items = Vec::new();
    let mut node_errors = Vec::new();
    for (node, r) in futures::future::join_all(calls).await {
        match r {
            Ok(Reply::Images(imgs)) => items.extend(imgs.into_iter().map(|mut i| {
                i.node_id = node.clone();
                i
            })),
            Ok(_) => {}
            Err(e) => node_errors.push(NodeError {
                node_id: node,
                error: e.body().error,
            }),
        }
    }
    Ok(Json(ListResponse { items, node_errors }))
}

/// Pull an image onto one node or all; answers newline-delimited JSON progress, ending with a
/// line whose status is `done` or `error` for each node.
#[utoipa::path(post, path = "/v1/images/pull", request_body = PullRequest,
    responses((status = 200, content_type = "application/x-ndjson", body = PullProgress),
              (status = 400, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pull(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<PullRequest>,
) -> ApiResult<Response> {
    kisara_core::policy::validate_image_reference(&req.image)?;
    let nodes = if req.nodes.is_empty() {
        target_nodes(&st, req.node.as_deref())?
    } else {
        // `node` and `nodes` together name the targets, each once.
        let mut v = Vec::new();
        for n in req.node.iter().chain(req.nodes.iter()) {
            let id = placement::resolve_node(&st, n)?;
            if !v.contains(&id) {
                v.push(id);
            }
        }
        v
    };
    if nodes.is_empty() {
        return Err(ApiError::no_node("no node is connected"));
    }
    let mut streams = Vec::new();
    for node in nodes {
        let s = st
            .hub
            .stream(
                &node,
                Operation::PullImage {
                    reference: req.image.clone(),
                },
            )
            .await?;
        let (st2, image) = (st.clone(), req.image.clone());
        let on_done = move |node: &str| st2.placement.add_image(node, &image);
        streams.push(node_progress(node, s, on_done));
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

/// One node's progress items, ended by a `done` or `error` line.
fn node_progress(
    node: String,
    stream: crate::hub::AgentStream,
    on_done: impl Fn(&str) + Send + Sync + 'static,
) -> futures::stream::BoxStream<'static, PullProgress> {
    let on_done = Arc::new(on_done);
    futures::stream::unfold(Some((node, stream)), move |st| {
        let on_done = on_done.clone();
        async move {
            let (node, mut stream) = st?;
            match stream.next().await {
                Some(Ok(v)) => {
                    let mut p: PullProgress = serde_json::from_value(v).unwrap_or_default();
                    p.node_id = node.clone();
                    Some((p, Some((node, stream))))
                }
                Some(Err(e)) => Some((
                    PullProgress {
                        node_id: node,
                        status: "error".into(),
                        error: Some(e.message),
                        ..Default::default()
                    },
                    None,
                )),
                None => {
                    // The scheduler prefers nodes that hold the image.
                    on_done(&node);
                    Some((
                        PullProgress {
                            node_id: node,
                            status: "done".into(),
                            ..Default::default()
                        },
                        None,
                    ))
                }
            }
        }
    })
    .boxed()
}

/// Remove an image from one node or all.
#[utoipa::path(delete, path = "/v1/images/{*reference}", params(
        ("reference" = String, Path, description = "Image reference or id"), ImageQuery),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn remove(
    State(st): State<Arc<AppState>>,
    Path(reference): Path<String>,
    ApiQuery(q): ApiQuery<ImageQuery>,
) -> ApiResult<StatusCode> {
    let nodes = target_nodes(&st, q.node.as_deref())?;
    if nodes.is_empty() {
        return Err(ApiError::no_node("no node is connected"));
    }
    let mut removed = 0;
    let mut last_err = None;
    for node in nodes {
        match st
            .hub
            .call(
                &node,
                Operation::RemoveImage {
                    reference: reference.clone(),
                    force: q.force.unwrap_or(false),
                },
                CALL_TIMEOUT,
            )
            .await
        {
            Ok(_) => removed += 1,
            Err(e) => last_err = Some(e),
        }
    }
    match (removed, last_err) {
        (0, Some(e)) => Err(e),
        _ => Ok(StatusCode::NO_CONTENT),
    }
}
