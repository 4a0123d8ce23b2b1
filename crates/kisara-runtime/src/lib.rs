//! The container runtime behind every Kisara node.
//!
//! The agent talks to its engine only through [`Runtime`]. [`docker::DockerRuntime`] drives a
//! real Docker Engine over its HTTP API (bollard); [`hollow::HollowRuntime`] keeps containers in
//! memory so that a thousand simulated nodes can load the control plane in a benchmark. One
//! conformance suite (`tests/conformance.rs`) runs against both so the fake cannot drift.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use kisara_api::agent::{
    ContainerConfig, InventoryContainer, InventoryNetwork, LogChunk, NetworkConfig,
};
use kisara_api::{EngineInfo, ExecRequest, ExecResult, ImageSummary, NodeStatus, PullProgress};

pub mod docker;
pub mod hollow;

/// Docker's chain ids of a stack of layers given by their diff ids (`sha256:…`, bottom first):
/// the first is the first diff id, each next one `sha256("<previous chain id> <diff id>")`. The
/// engine knows a layer by the chain id of the stack it tops.
pub fn chain_ids<S: AsRef<str>>(diff_ids: &[S]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.as_ref().to_string(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {}", d.as_ref())))
            ),
        };
        out.push(next);
    }
    out
}

/// What can go wrong in a runtime call. The variants map onto API error codes at the edge.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A network's subnet overlaps one already on the engine.
    #[error("subnet {0} overlaps a network already on the engine")]
    SubnetOverlap(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("engine error: {0}")]
    Engine(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// Label filter: only objects carrying `key=value` labels are listed.
pub type LabelFilter = Vec<(String, String)>;

/// A container runtime on one node.
#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Static facts about the engine.
    async fn info(&self) -> Result<EngineInfo>;
    /// Measured status (cpu, memory, disk, counts of containers matching `filter`).
    async fn status(&self, filter: &LabelFilter) -> Result<NodeStatus>;

    /// Create and start a container; on any failure remove whatever was made.
    async fn launch(&self, config: &ContainerConfig) -> Result<InventoryContainer>;
    async fn inspect(&self, docker_id: &str) -> Result<InventoryContainer>;
    /// Stop (SIGTERM, then SIGKILL after `timeout`). Stopping a stopped container is not an error.
    async fn stop(&self, docker_id: &str, timeout: Duration) -> Result<()>;
    /// Remove (with its anonymous volumes). Removing a missing container is `NotFound`.
    async fn remove(&self, docker_id: &str, force: bool) -> Result<()>;
    async fn list_containers(&self, filter: &LabelFilter) -> Result<Vec<InventoryContainer>>;
    /// Run a command, collect stdout, stderr and the exit code; give up after the request's
    /// timeout (then `timed_out` is set and `exit_code` is `None`).
    async fn exec(&self, docker_id: &str, request: &ExecRequest) -> Result<ExecResult>;
    /// Output of a container; with `follow` the stream goes on until the container stops.
    fn logs(
        &self,
        docker_id: &str,
        tail: Option<u64>,
        follow: bool,
    ) -> BoxStream<'static, Result<LogChunk>>;

    async fn list_images(&self) -> Result<Vec<ImageSummary>>;
    /// Pull an image; the stream ends with an error item when the pull fails.
    fn pull_image(&self, reference: &str) -> BoxStream<'static, Result<PullProgress>>;
    async fn remove_image(&self, reference: &str, force: bool) -> Result<()>;

    /// Create a bridge network; `SubnetOverlap` when the engine already uses the subnet.
    async fn create_network(&self, config: &NetworkConfig) -> Result<String>;
    async fn remove_network(&self, docker_id: &str) -> Result<()>;
    async fn list_networks(&self, filter: &LabelFilter) -> Result<Vec<InventoryNetwork>>;
    /// Every IPv4 subnet used by any network on the engine, Kisara's or not.
    async fn used_subnets(&self) -> Result<Vec<String>>;

    /// Load images from a `docker save`-format tar (`docker load`), read as it streams in;
    /// answers the references (or ids) the engine reports loaded.
    async fn load_images(&self, tar: BoxStream<'static, Result<Bytes>>) -> Result<Vec<String>>;
    /// The named images as one `docker save`-format tar, streamed as the engine writes it.
    fn export_images(&self, refs: &[String]) -> BoxStream<'static, Result<Bytes>>;
    /// Chain ids (see [`chain_ids`]) of every layer stack the engine's images are made of. An
    /// archive for [`Runtime::load_images`] may leave out the file of a layer whose chain is
    /// here: the engine reuses the layer it has and never opens the file. Empty where unknown.
    async fn layer_chains(&self) -> Result<std::collections::HashSet<String>> {
        Ok(std::collections::HashSet::new())
    }

    /// Engine events of the containers matching `filter`: today `die` (a container's main
    /// process ended, for any reason, a requested stop included). Runs until dropped; with
    /// `since_nano` (unix nanoseconds) the engine first replays what it still remembers from
    /// then on. Each event carries the container's `io.kisara.*` labels.
    fn events(
        &self,
        filter: &LabelFilter,
        since_nano: Option<i64>,
    ) -> BoxStream<'static, Result<RuntimeEvent>>;
}

/// A container event as the runtime reports it (the agent forwards it as is).
pub use kisara_api::agent::ContainerEvent as RuntimeEvent;

#[cfg(test)]
mod chain_tests {
    #[test]
    fn a_chain_starts_at_the_first_diff_id_and_hashes_each_next_onto_it() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = super::chain_ids(&[&a, &b]);
        assert_eq!(c[0], a);
        use sha2::Digest;
        let want = hex::encode(sha2::Sha256::digest(format!("{a} {b}")));
        assert_eq!(c[1], format!("sha256:{want}"));
        assert!(super::chain_ids::<&str>(&[]).is_empty());
    }
}
