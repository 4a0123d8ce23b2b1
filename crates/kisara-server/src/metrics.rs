//! Prometheus metrics at `/metrics` (text exposition format, bearer token like every route).
//!
//! Counters and the latency histogram are updated as things happen; node and container gauges
//! are computed from the live state at scrape time, so they can never drift.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::AppState;

type Labels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The server's metrics, registered once per server.
pub struct Metrics {
    registry: Registry,
    pub placements: Counter,
    pub placement_failures: Family<Labels, Counter>,
    pub http_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    nodes: Family<Labels, Gauge>,
    containers: Family<Labels, Gauge>,
    /// Bytes the gateway carried, by container and direction (`in`: visitor → container).
    exposure_bytes: Family<Labels, Counter>,
    /// Visitor connections (TCP) and sessions (UDP) open now, by container.
    exposure_connections: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kisara");
        let placements = Counter::default();
        let placement_failures = Family::<Labels, Counter>::default();
        let http_seconds =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let nodes = Family::<Labels, Gauge>::default();
        let containers = Family::<Labels, Gauge>::default();
        registry.register(
            "placements",
            "Containers placed onto a node",
            placements.clone(),
        );
        registry.register(
            "placement_failures",
            "Launches no node could take, by error code",
            placement_failures.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "API latency by method, route and status",
            http_seconds.clone(),
        );
        registry.register("nodes", "Nodes by state", nodes.clone());
        registry.register(
            "containers",
            "Containers Kisara manages, by node and state",
            containers.clone(),
        );
        let exposure_bytes = Family::<Labels, Counter>::default();
        let exposure_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "exposure_bytes",
            "Bytes carried by the gateway, by container and direction",
            exposure_bytes.clone(),
        );
        registry.register(
            "exposure_connections",
            "Visitor connections and UDP sessions open through the gateway, by container",
            exposure_connections.clone(),
        );
        Metrics {
            exposure_bytes,
            exposure_connections,
            registry,
            placements,
            placement_failures,
            http_seconds,
            nodes,
            containers,
        }
    }
}

impl Metrics {
    /// Records a placement failure under its error code.
    pub fn placement_failed(&self, code: &str) {
        self.placement_failures
            .get_or_create(&vec![("code".to_string(), code.to_string())])
            .inc();
    }
}

/// Brings the exposure counters up to the gateway's meters.
fn refresh_exposure(st: &AppState) {
    let m = &st.metrics;
    m.exposure_connections.clear();
    for (container, t) in st.gateway.all_traffic() {
        for (dir, total) in [("in", t.bytes_in), ("out", t.bytes_out)] {
            let c = m.exposure_bytes.get_or_create(&vec![
                ("container".into(), container.clone()),
                ("direction".into(), dir.into()),
            ]);
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
        m.exposure_connections
            .get_or_create(&vec![("container".into(), container)])
            .set(t.connections as i64);
    }
}

fn refresh_gauges(st: &AppState) {
    refresh_exposure(st);
    let m = &st.metrics;
    m.nodes.clear();
    for state in ["ready", "unreachable", "down"] {
        m.nodes
            .get_or_create(&vec![("state".into(), state.into())])
            .set(0);
    }
    if let Ok(nodes) = crate::placement::nodes(st) {
        for n in nodes {
            let state = serde_json::to_value(n.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            m.nodes.get_or_create(&vec![("state".into(), state)]).inc();
        }
    }
    m.containers.clear();
    if let Ok(cs) = st.store.list_containers(None, None, None, true) {
        for c in cs {
            let state = serde_json::to_value(c.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            m.containers
                .get_or_create(&vec![("node".into(), c.node_id), ("state".into(), state)])
                .inc();
        }
    }
}

/// `GET /metrics`.
pub async fn serve(State(st): State<Arc<AppState>>) -> Response {
    refresh_gauges(&st);
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &st.metrics.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Middleware timing every API request by its route template (not the raw path, which would
/// make one series per container id).
pub async fn track(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    st.metrics
        .http_seconds
        .get_or_create(&vec![
            ("method".into(), method),
            ("route".into(), route),
            ("status".into(), resp.status().as_u16().to_string()),
        ])
        .observe(start.elapsed().as_secs_f64());
    resp
}
