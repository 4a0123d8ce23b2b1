//! Forwarding the engine's container events (`die`) to the server.
//!
//! Exits the server asked for (a stop, a forced remove) are not forwarded: the server reports
//! those as `container.stop`, and `container.die` means the container ended on its own. The
//! agent knows which exits it caused because it is the one that asks the engine for them.
//!
//! The position in the engine's event log outlives a session: after a reconnect the stream is
//! resumed from the last event seen, so a container that dies while the channel is down is
//! still reported (the server recognises a replayed event by its time and ignores it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kisara_api::agent::AgentMessage;
use kisara_runtime::{LabelFilter, Runtime};
use tokio::sync::mpsc;

/// How long an exit the server asked for is remembered.
const EXPECTED_EXIT_TTL: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct EngineEvents {
    /// Docker ids the server asked to stop or remove, and when.
    expected: Mutex<HashMap<String, Instant>>,
    /// Unix nanoseconds of the newest event seen (or of the first subscription); 0 = never.
    position: AtomicI64,
}

fn now_nano() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

impl EngineEvents {
    /// The server asked for this container to stop: its exit is not news.
    pub fn expect_exit(&self, docker_id: &str) {
        let mut m = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, at| at.elapsed() < EXPECTED_EXIT_TTL);
        m.insert(docker_id.to_string(), Instant::now());
    }

    fn is_expected(&self, docker_id: &str) -> bool {
        let m = self.expected.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().any(|(id, at)| {
            at.elapsed() < EXPECTED_EXIT_TTL
                && !id.is_empty()
                && (docker_id.starts_with(id.as_str()) || id.starts_with(docker_id))
        })
    }

    /// Streams the engine's events into the channel until the channel closes; a broken
    /// engine stream is resumed with backoff.
    pub fn spawn_forwarder(
        self: &Arc<Self>,
        rt: Arc<dyn Runtime>,
        filter: LabelFilter,
        tx: mpsc::Sender<AgentMessage>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                let since = match me.position.load(Ordering::Relaxed) {
                    0 => {
                        me.position.fetch_max(now_nano(), Ordering::Relaxed);
                        None
                    }
                    n => Some(n),
                };
                let mut events = rt.events(&filter, since);
                loop {
                    let item = tokio::select! {
                        i = events.next() => i,
                        _ = tx.closed() => return,
                    };
                    match item {
                        Some(Ok(ev)) => {
                            backoff = Duration::from_millis(500);
                            me.position.fetch_max(ev.time_nano, Ordering::Relaxed);
                            if me.is_expected(&ev.docker_id) {
                                continue;
                            }
                            if tx
                                .send(AgentMessage::ContainerEvent { event: ev })
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "engine event stream failed; resuming");
                            break;
                        }
                        None => break,
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tx.closed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_api::agent::{ContainerConfig, ACTION_DIE};
    use kisara_runtime::hollow::HollowRuntime;

    fn config(name: &str, cmd: &[&str]) -> ContainerConfig {
        ContainerConfig {
            name: name.into(),
            image: "img:1".into(),
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
            labels: [("io.kisara.cluster".to_string(), "c1".to_string())].into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn forwards_exits_but_not_the_ones_asked_for() {
        let rt = Arc::new(HollowRuntime::new().with_images(&["img:1"]));
        let ev = Arc::new(EngineEvents::default());
        let (tx, mut rx) = mpsc::channel(16);
        let filter = vec![("io.kisara.cluster".to_string(), "c1".to_string())];
        let task = ev.spawn_forwarder(rt.clone(), filter, tx);
        // Let the forwarder subscribe.
        let deadline = Instant::now() + Duration::from_secs(5);
        while ev.position.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline);
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;

        let stopped = rt
            .launch(&config("stopped", &["sleep", "100"]))
            .await
            .unwrap();
        ev.expect_exit(&stopped.docker_id);
        rt.stop(&stopped.docker_id, Duration::from_secs(1))
            .await
            .unwrap();
        let died = rt
            .launch(&config("exits", &["sh", "-c", "exit 3"]))
            .await
            .unwrap();

        let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event")
            .expect("open");
        let AgentMessage::ContainerEvent { event } = msg else {
            panic!("{msg:?}")
        };
        assert_eq!(event.docker_id, died.docker_id);
        assert_eq!(event.action, ACTION_DIE);
        assert_eq!(event.exit_code, Some(3));
        assert!(rx.try_recv().is_err(), "the requested stop was forwarded");
        task.abort();
    }
}
