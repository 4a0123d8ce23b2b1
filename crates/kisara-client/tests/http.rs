//! The SDK against a tiny in-test server that speaks the contract: auth header, error bodies,
//! path encoding, and streaming bodies whose chunks do not line up with lines.

use std::time::Duration;

use axum::{
    body::{Body, Bytes},
    extract::{Path, RawQuery},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use futures::StreamExt;
use kisara_client::{
    Client, Container, ContainerFilter, ContainerState, Error, ErrorBody, ExecRequest, ExecResult,
    Health, ListResponse, PullRequest,
};

const TOKEN: &str = "t0ken";

/// The 401 answer, unless the request carries the right token.
fn unauthorized(headers: &HeaderMap) -> Option<Response> {
    match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        Some(v) if v == format!("Bearer {TOKEN}") => None,
        _ => Some(
            (
                StatusCode::UNAUTHORIZED,
                Json(ErrorBody::new("unauthorized", "missing or wrong token")),
            )
                .into_response(),
        ),
    }
}

fn container(name: &str) -> Container {
    Container {
        id: "c1".into(),
        docker_id: "d1".into(),
        name: name.into(),
        node_id: "n1".into(),
        image: "busybox".into(),
        owner: None,
        module: None,
        labels: Default::default(),
        network: None,
        ip_address: None,
        state: ContainerState::Running,
        status: String::new(),
        ports: vec![],
        host_port: String::new(),
        created_at: 0,
        expires_at: None,
        renewals: 0,
        flags: None,
        traffic: None,
    }
}

/// A body sent as the given chunks, with a pause before each.
fn chunked(chunks: Vec<&'static [u8]>, pause: Duration) -> Body {
    Body::from_stream(futures::stream::iter(chunks).then(move |c| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::convert::Infallible>(Bytes::from_static(c))
    }))
}

async fn serve() -> String {
    let app = Router::new()
        .route(
            "/healthz",
            get(|| async {
                Json(Health {
                    status: "ok".into(),
                    version: "test".into(),
                })
            }),
        )
        .route(
            "/v1/containers",
            get(|headers: HeaderMap, RawQuery(q): RawQuery| async move {
                if let Some(denied) = unauthorized(&headers) {
                    return denied;
                }
                // The query string comes back as the name, so the test sees what was sent.
                Json(ListResponse {
                    items: vec![container(&q.unwrap_or_default())],
                    node_errors: vec![],
                })
                .into_response()
            }),
        )
        .route(
            "/v1/containers/{id}",
            get(|Path(id): Path<String>| async move {
                (
                    StatusCode::NOT_FOUND,
                    Json(ErrorBody::new("not_found", format!("no container {id}"))),
                )
            }),
        )
        .route(
            "/v1/containers/{id}/stop",
            post(|| async { StatusCode::NO_CONTENT }),
        )
        .route(
            "/v1/containers/{id}/exec",
            post(|Json(req): Json<ExecRequest>| async move {
                // Longer than the client's 1 s timeout, shorter than the exec's own.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Json(ExecResult {
                    stdout: req.cmd.join(" "),
                    exit_code: Some(0),
                    ..Default::default()
                })
            }),
        )
        .route(
            "/v1/containers/{id}/logs",
            get(|RawQuery(q): RawQuery| async move {
                assert_eq!(q.as_deref(), Some("tail=5&follow=true"));
                // The pauses add up to more than the client's timeout: only the head is timed.
                chunked(
                    vec![b"line 1\n", b"line ", b"2\n"],
                    Duration::from_millis(600),
                )
            }),
        )
        .route(
            "/v1/images/{*reference}",
            delete(
                |Path(reference): Path<String>, RawQuery(q): RawQuery| async move {
                    if reference == "reg:5000/ns/app:1.0" && q.as_deref() == Some("force=true") {
                        StatusCode::NO_CONTENT.into_response()
                    } else {
                        (StatusCode::BAD_REQUEST, format!("got {reference} {q:?}")).into_response()
                    }
                },
            ),
        )
        .route(
            "/v1/images/pull",
            post(|| async {
                chunked(
                    vec![
                        b"{\"node_id\":\"n1\",\"status\":\"Downloading\",\"lay",
                        b"er\":\"abc\",\"current\":5,\"total\":10}\n{\"node_id\":\"n1\",",
                        b"\"status\":\"error\",\"error\":\"manifest unknown\"}\n",
                    ],
                    Duration::from_millis(10),
                )
            }),
        )
        .route(
            "/v1/networks/{id}",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                StatusCode::OK
            }),
        )
        .route(
            "/v1/nodes",
            get(|| async { (StatusCode::BAD_GATEWAY, "upstream exploded") }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn client() -> Client {
    Client::builder(&serve().await)
        .token(TOKEN)
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap()
}

#[tokio::test]
async fn health_needs_no_token() {
    let c = Client::new(&serve().await, None).unwrap();
    assert_eq!(c.health().await.unwrap().status, "ok");
}

#[tokio::test]
async fn token_is_sent_and_filters_become_the_query() {
    let c = client().await;
    let filter = ContainerFilter {
        owner: Some("team 7".into()),
        all: Some(true),
        ..Default::default()
    };
    let list = c.list_containers(&filter).await.unwrap();
    assert_eq!(list.items[0].name, "owner=team+7&all=true");

    let anon = Client::new(c.base_url().as_str(), None).unwrap();
    let e = anon
        .list_containers(&ContainerFilter::default())
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401));
    assert_eq!(e.code(), Some("unauthorized"));
}

#[tokio::test]
async fn api_errors_carry_code_and_message() {
    let c = client().await;
    let e = c.container("nope").await.unwrap_err();
    assert!(e.is_not_found());
    assert!(e.to_string().contains("no container nope"), "{e}");

    let e = c.list_nodes().await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert!(e.to_string().contains("upstream exploded"), "{e}");
}

#[tokio::test]
async fn no_content_answers_are_ok() {
    let c = client().await;
    c.stop("c1").await.unwrap();
}

#[tokio::test]
async fn image_reference_keeps_its_slashes_and_colons() {
    let c = client().await;
    c.remove_image("reg:5000/ns/app:1.0", None, true)
        .await
        .unwrap();
    let e = c.remove_image("other", None, false).await.unwrap_err();
    assert_eq!(e.status(), Some(400));
}

#[tokio::test]
async fn slow_answers_time_out() {
    let c = client().await;
    assert!(matches!(c.network("x").await, Err(Error::Timeout)));
}

#[tokio::test]
async fn exec_waits_for_its_own_timeout_not_the_clients() {
    let c = client().await;
    let r = c
        .exec(
            "c1",
            &ExecRequest {
                cmd: vec!["echo".into(), "hi".into()],
                timeout_secs: Some(1),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "echo hi");
}

#[tokio::test]
async fn logs_stream_outlives_the_timeout() {
    let c = client().await;
    let stream = c.logs("c1", Some(5), true).await.unwrap();
    let chunks: Vec<Bytes> = stream.map(|r| r.unwrap()).collect().await;
    assert_eq!(chunks.concat(), b"line 1\nline 2\n");
}

#[tokio::test]
async fn pull_lines_span_chunks() {
    let c = client().await;
    let req = PullRequest {
        image: "busybox".into(),
        ..Default::default()
    };
    let lines: Vec<_> = c
        .pull_image(&req)
        .await
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0].layer.as_deref(), Some("abc"));
    assert_eq!(lines[0].total, Some(10));
    assert_eq!(lines[1].status, "error");
    assert_eq!(lines[1].error.as_deref(), Some("manifest unknown"));
}
