//! `GET /v1/events`: the cluster's events as Server-Sent Events.
//!
//! The stream opens with an id-only marker (`id: N`, no data), the position it starts from,
//! so a client that reconnects with `Last-Event-ID` misses nothing even if no event came in
//! between. Stored events after that position are replayed, then live ones follow: the handler
//! subscribes to the bus *before* reading the backlog and skips live events it already
//! replayed, so there is no gap and no duplicate. A subscriber that falls behind the live
//! buffer goes back to the store for what it missed (only heartbeats, which are not stored, are
//! lost then). Heartbeats carry no `id:` line, so they never move a client's resume position.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use kisara_api::{ErrorBody, Event, EventFilter, EventQuery};
use tokio::sync::broadcast::{self, error::RecvError};

use super::ApiQuery;
use crate::error::{ApiError, ApiResult};
use crate::{placement, AppState};

/// Stored events read per round of a replay.
const REPLAY_PAGE: usize = 500;
/// A comment line this often keeps proxies and clients from timing the stream out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Parses and checks the filters of a request.
pub fn filter_from(st: &AppState, q: &EventQuery) -> ApiResult<EventFilter> {
    let kinds = q
        .kinds
        .as_deref()
        .map(EventFilter::parse_kinds)
        .unwrap_or_default();
    if let Some(bad) = kinds.iter().find(|k| !EventFilter::valid_pattern(k)) {
        return Err(ApiError::bad_request(format!(
            "invalid event kind {bad:?}: expected a kind such as container.launch, a prefix \
             such as container. or container.*, or *"
        )));
    }
    // A node that was deleted still has its events: take an unknown value as an id.
    let node_id = q
        .node
        .as_ref()
        .map(|n| placement::resolve_node(st, n).unwrap_or_else(|_| n.clone()));
    Ok(EventFilter {
        kinds,
        node_id,
        owner: q.owner.clone(),
    })
}

/// Stream the cluster's events (`text/event-stream`). Each event is `id: <id>`,
/// `event: <kind>`, `data: <Event as JSON>`; resume with the `Last-Event-ID` header (or
/// `since`). `node.heartbeat` is sent only when `kinds` names it, and carries no id.
#[utoipa::path(get, path = "/v1/events", params(EventQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event id")),
    responses((status = 200, content_type = "text/event-stream", body = Event,
               description = "Server-Sent Events; `data` holds an Event"),
              (status = 400, body = ErrorBody)))]
pub async fn stream(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventQuery>,
) -> ApiResult<Response> {
    let filter = filter_from(&st, &q)?;
    let last_event_id = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request("Last-Event-ID must be an event id (a number)")
                })?,
        ),
        None => None,
    };
    // Subscribe first: anything stored after this point is also on the broadcast.
    let rx = st.events.subscribe();
    let since = last_event_id
        .or(q.since)
        .unwrap_or_else(|| st.events.last_id());
    let shutdown = st.shutdown.clone();
    let body = replay_then_live(st, rx, filter, since)
        .take_until(shutdown.cancelled_owned())
        .map(Ok::<_, Infallible>);
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

struct Cursor {
    st: Arc<AppState>,
    rx: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    /// Highest stored id handled (sent or filtered out).
    last: u64,
    replaying: bool,
    queue: VecDeque<Arc<Event>>,
}

fn sse(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_default();
    let ev = SseEvent::default().event(&e.kind).data(data);
    if e.id == 0 {
        ev
    } else {
        ev.id(e.id.to_string())
    }
}

fn replay_then_live(
    st: Arc<AppState>,
    rx: broadcast::Receiver<Arc<Event>>,
    filter: EventFilter,
    since: u64,
) -> impl Stream<Item = SseEvent> + Send {
    let marker = SseEvent::default().id(since.to_string());
    let cursor = Cursor {
        st,
        rx,
        filter,
        last: since,
        replaying: true,
        queue: VecDeque::new(),
    };
    let rest = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            if let Some(e) = c.queue.pop_front() {
                return Some((sse(&e), c));
            }
            if c.replaying {
                let page = c.st.events.backlog(c.last, REPLAY_PAGE);
                c.replaying = page.len() == REPLAY_PAGE;
                for e in page {
                    c.last = c.last.max(e.id);
                    if c.filter.matches(&e) {
                        c.queue.push_back(Arc::new(e));
                    }
                }
                continue;
            }
            match c.rx.recv().await {
                Ok(e) if e.id == 0 => {
                    if c.filter.matches(&e) {
                        return Some((sse(&e), c));
                    }
                }
                Ok(e) => {
                    if e.id <= c.last {
                        continue;
                    }
                    c.last = e.id;
                    if c.filter.matches(&e) {
                        return Some((sse(&e), c));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(
                        skipped = n,
                        "event subscriber lagged; replaying from the store"
                    );
                    c.replaying = true;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    futures::stream::once(async move { marker }).chain(rest)
}
