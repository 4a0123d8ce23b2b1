//! One conformance suite, run against the hollow runtime and a real Docker Engine, so that the
//! fake cannot drift from the real thing.
//!
//! The Docker half needs a reachable engine (`DOCKER_HOST` or the local socket) and the image
//! `kisara-test/busybox:latest` (`scripts/test-images.sh` builds it). Without either it FAILS:
//! a skipped runtime test would hide a broken test bed.
//!
//! Every test labels what it makes `io.kisara.cluster=test-<random>` and names it
//! `kz-<case>-<random>`, so tests can run in parallel (threads or nextest processes) on one
//! engine; a guard removes everything carrying the label when the test ends, panicking or not.
//! Subnets come from 10.213.0.0/16, each case from its own block of /24s, skipping any already
//! used on the engine.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use ipnet::Ipv4Net;
use kisara_api::agent::{ContainerConfig, InventoryContainer, NetworkConfig};
use kisara_api::{ExecRequest, PortSpec, Protocol};
use kisara_runtime::docker::DockerRuntime;
use kisara_runtime::hollow::HollowRuntime;
use kisara_runtime::{LabelFilter, Runtime, RuntimeError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IMAGE: &str = "kisara-test/busybox:latest";
const CLUSTER_LABEL: &str = "io.kisara.cluster";

/// A runtime under test, with what the test made on it.
struct Env<R: Runtime> {
    rt: R,
    /// The engine's client, to check what the engine really did (Docker only).
    docker: Option<bollard::Docker>,
    run: String,
    _cleanup: Option<DockerCleanup>,
}

fn random_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let h = RandomState::new().hash_one((nanos, std::process::id(), std::thread::current().id()));
    format!("{:012x}", h & 0xffff_ffff_ffff)
}

async fn hollow_env() -> Env<HollowRuntime> {
    Env {
        rt: HollowRuntime::new().with_images(&[IMAGE]),
        docker: None,
        run: random_suffix(),
        _cleanup: None,
    }
}

async fn docker_env() -> Env<DockerRuntime> {
    let rt = DockerRuntime::connect()
        .await
        .expect("a Docker Engine must be reachable for the Docker conformance tests");
    let images = rt.list_images().await.expect("list images");
    assert!(
        images.iter().any(|i| i.tags.iter().any(|t| t == IMAGE)),
        "image {IMAGE} is missing: run scripts/test-images.sh"
    );
    let run = random_suffix();
    Env {
        docker: Some(rt.client().clone()),
        rt,
        _cleanup: Some(DockerCleanup {
            label: (CLUSTER_LABEL.to_string(), format!("test-{run}")),
        }),
        run,
    }
}

/// Removes every container and network carrying the test's label, on a thread and engine
/// connection of its own (the test's runtime may be unwinding from a panic).
struct DockerCleanup {
    label: (String, String),
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let filter: LabelFilter = vec![self.label.clone()];
        let cleaner = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(d) = DockerRuntime::connect().await else {
                    return;
                };
                for c in d.list_containers(&filter).await.unwrap_or_default() {
                    let _ = d.remove(&c.docker_id, true).await;
                }
                for n in d.list_networks(&filter).await.unwrap_or_default() {
                    let _ = d.remove_network(&n.docker_id).await;
                }
            });
        });
        let _ = cleaner.join();
    }
}

impl<R: Runtime> Env<R> {
    fn label(&self) -> (String, String) {
        (CLUSTER_LABEL.to_string(), format!("test-{}", self.run))
    }

    fn filter(&self) -> LabelFilter {
        vec![self.label()]
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([self.label()])
    }

    fn name(&self, what: &str) -> String {
        format!("kz-{what}-{}", self.run)
    }

    /// A container as the server would resolve it: hardened, labelled, published on loopback.
    fn container(&self, what: &str, cmd: &[&str]) -> ContainerConfig {
        ContainerConfig {
            name: self.name(what),
            image: IMAGE.to_string(),
            cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
            labels: self.labels(),
            publish_host_ip: "127.0.0.1".to_string(),
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            pids_limit: Some(64),
            cap_drop: vec!["ALL".to_string()],
            cap_add: vec!["NET_BIND_SERVICE".to_string()],
            security_opt: vec!["no-new-privileges".to_string()],
            init: true,
            ..Default::default()
        }
    }

    async fn launch(&self, config: &ContainerConfig) -> InventoryContainer {
        match self.rt.launch(config).await {
            Ok(c) => c,
            Err(e) => panic!("launch of {} failed: {e}", config.name),
        }
    }

    async fn listed(&self) -> Vec<InventoryContainer> {
        self.rt
            .list_containers(&self.filter())
            .await
            .expect("list containers")
    }

    /// A free /24 in this case's block of 10.213.0.0/16 (16 /24s per block).
    async fn free_subnet(&self, block: u8, skip: usize) -> Ipv4Net {
        let used: Vec<Ipv4Net> = self
            .rt
            .used_subnets()
            .await
            .expect("used subnets")
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        (0..16u8)
            .map(|i| {
                Ipv4Net::new(Ipv4Addr::new(10, 213, block * 16 + i, 0), 24).expect("valid /24")
            })
            .filter(|n| {
                !used
                    .iter()
                    .any(|u| u.contains(&n.network()) || n.contains(&u.network()))
            })
            .nth(skip)
            .unwrap_or_else(|| panic!("no free /24 left in block {block} of 10.213.0.0/16"))
    }

    /// Creates a labelled network on a free subnet of `block`, retrying when another run took
    /// the subnet in between.
    async fn network(&self, what: &str, block: u8) -> (String, Ipv4Net) {
        for attempt in 0..8 {
            let subnet = self.free_subnet(block, attempt).await;
            let config = NetworkConfig {
                name: self.name(what),
                subnet: subnet.to_string(),
                labels: self.labels(),
                ..Default::default()
            };
            match self.rt.create_network(&config).await {
                Ok(id) => return (id, subnet),
                Err(RuntimeError::SubnetOverlap(_)) => continue,
                Err(e) => panic!("create network {}: {e}", config.name),
            }
        }
        panic!("could not create network {what}: every subnet tried overlapped");
    }
}

/// Polls `check` until it yields a value, for at most `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

async fn http_get(port: u16) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await??;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn exec_req(cmd: &[&str], timeout_secs: Option<u64>) -> ExecRequest {
    ExecRequest {
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_secs,
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The cases.

async fn published_port_serves_http<R: Runtime>(env: Env<R>) {
    let config = ContainerConfig {
        ports: vec![PortSpec {
            port: 80,
            protocol: Protocol::Tcp,
        }],
        ..env.container("web", &["httpd", "-f", "-p", "80", "-h", "/www"])
    };
    let c = env.launch(&config).await;
    assert_eq!(c.state, "running", "{c:?}");
    assert_eq!(c.name, config.name);
    assert_eq!(c.image, IMAGE);
    assert_eq!(c.labels, config.labels);
    assert_eq!(c.published.len(), 1, "{c:?}");
    let p = &c.published[0];
    assert_eq!(p.port, config.ports[0]);
    assert_ne!(p.host_port, 0);
    assert_eq!(p.host_ip, "127.0.0.1");
    assert!(c.ip_address.is_some(), "no container address: {c:?}");
    assert_eq!(c.network.as_deref(), Some("bridge"));

    let again = env.rt.inspect(&c.docker_id).await.expect("inspect");
    assert_eq!(again.published, c.published);
    assert_eq!(again.ip_address, c.ip_address);
    let listed = env.listed().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].docker_id, c.docker_id);
    assert_eq!(listed[0].published, c.published);

    if env.docker.is_some() {
        let port = p.host_port;
        let answer = eventually(Duration::from_secs(15), "httpd to answer", || async move {
            http_get(port)
                .await
                .ok()
                .filter(|a| a.starts_with("HTTP/1."))
        })
        .await;
        assert!(answer.contains("kisara-test"), "{answer}");
    }
}

async fn hardening_is_applied<R: Runtime>(env: Env<R>) {
    let mut config = env.container("hard", &["sleep", "300"]);
    config.read_only = true;
    config.tmpfs = BTreeMap::from([("/tmp".to_string(), "rw,size=16m".to_string())]);
    let c = env.launch(&config).await;
    assert_eq!(c.state, "running");
    let Some(docker) = &env.docker else {
        return;
    };
    let inspect = docker
        .inspect_container(&c.docker_id, None)
        .await
        .expect("inspect via bollard");
    let hc = inspect.host_config.expect("host config");
    let cap_drop = hc.cap_drop.unwrap_or_default();
    assert!(cap_drop.iter().any(|c| c == "ALL"), "{cap_drop:?}");
    let cap_add = hc.cap_add.unwrap_or_default();
    assert!(
        cap_add.iter().any(|c| c.contains("NET_BIND_SERVICE")),
        "{cap_add:?}"
    );
    let sec = hc.security_opt.unwrap_or_default();
    assert!(sec.iter().any(|s| s == "no-new-privileges"), "{sec:?}");
    assert_eq!(hc.pids_limit, Some(64));
    assert_eq!(hc.memory, Some(64 << 20));
    assert_eq!(hc.memory, hc.memory_swap, "memory+swap must equal memory");
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.init, Some(true));
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(hc.readonly_rootfs, Some(true));
    assert!(hc.tmpfs.unwrap_or_default().contains_key("/tmp"));
    // The read-only root is real; the tmpfs is writable (a positive control for the failure).
    let ok = env
        .rt
        .exec(&c.docker_id, &exec_req(&["touch", "/tmp/x"], None))
        .await
        .expect("exec");
    assert_eq!(ok.exit_code, Some(0), "{ok:?}");
    let denied = env
        .rt
        .exec(&c.docker_id, &exec_req(&["touch", "/x"], None))
        .await
        .expect("exec");
    assert_ne!(denied.exit_code, Some(0), "{denied:?}");
}

async fn exec_collects_output_and_code<R: Runtime>(env: Env<R>) {
    let c = env.launch(&env.container("exec", &["sleep", "300"])).await;
    let r = env
        .rt
        .exec(
            &c.docker_id,
            &exec_req(&["sh", "-c", "echo out; echo err >&2; exit 3"], None),
        )
        .await
        .expect("exec");
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    assert_eq!(r.exit_code, Some(3));
    assert!(!r.timed_out);
    let r = env
        .rt
        .exec(&c.docker_id, &exec_req(&["echo", "a", "b"], Some(5)))
        .await
        .expect("exec");
    assert_eq!((r.stdout.as_str(), r.exit_code), ("a b\n", Some(0)));
    let missing = env
        .rt
        .exec(&env.name("nope"), &exec_req(&["true"], None))
        .await;
    assert!(
        matches!(missing, Err(RuntimeError::NotFound(_))),
        "{missing:?}"
    );
}

async fn exec_times_out<R: Runtime>(env: Env<R>) {
    let c = env.launch(&env.container("slow", &["sleep", "300"])).await;
    let started = Instant::now();
    let r = env
        .rt
        .exec(&c.docker_id, &exec_req(&["sleep", "10"], Some(1)))
        .await
        .expect("exec");
    assert!(r.timed_out, "{r:?}");
    assert_eq!(r.exit_code, None);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

async fn missing_image_leaves_nothing<R: Runtime>(env: Env<R>) {
    let mut config = env.container("noimg", &["true"]);
    config.image = format!("kisara-test/does-not-exist-{}:latest", env.run);
    match env.rt.launch(&config).await {
        Err(RuntimeError::NotFound(msg)) => assert!(msg.contains(&config.image), "{msg}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(env.listed().await.is_empty());

    if env.docker.is_some() {
        // Created, then failing to start: the container must be removed again. (Without the
        // init process, which would start fine and only then fail to exec the binary.)
        let mut config = env.container("nostart", &["/no/such/binary"]);
        config.init = false;
        let err = env.rt.launch(&config).await;
        assert!(err.is_err(), "{err:?}");
        assert!(
            env.listed().await.is_empty(),
            "a failed launch left a container"
        );
    }
}

async fn name_conflict<R: Runtime>(env: Env<R>) {
    let config = env.container("twice", &["sleep", "300"]);
    env.launch(&config).await;
    let second = env.rt.launch(&config).await;
    assert!(
        matches!(second, Err(RuntimeError::Conflict(_))),
        "{second:?}"
    );
    assert_eq!(env.listed().await.len(), 1);
}

async fn network_lifecycle<R: Runtime>(env: Env<R>) {
    let (id, subnet) = env.network("net", 1).await;
    let listed = env
        .rt
        .list_networks(&env.filter())
        .await
        .expect("list networks");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].docker_id, id);
    assert_eq!(listed[0].name, env.name("net"));
    assert_eq!(listed[0].subnets, vec![subnet.to_string()]);
    assert_eq!(listed[0].labels, env.labels());
    assert!(!listed[0].internal);
    let used = env.rt.used_subnets().await.expect("used subnets");
    assert!(used.contains(&subnet.to_string()), "{used:?}");

    // Same name again: a conflict, whatever the subnet.
    let dup = env
        .rt
        .create_network(&NetworkConfig {
            name: env.name("net"),
            subnet: env.free_subnet(1, 0).await.to_string(),
            labels: env.labels(),
            ..Default::default()
        })
        .await;
    assert!(matches!(dup, Err(RuntimeError::Conflict(_))), "{dup:?}");

    // A container on it gets an address from the subnet.
    let mut config = env.container("onnet", &["sleep", "300"]);
    config.network = Some(env.name("net"));
    config.network_aliases = vec!["web".to_string()];
    let c = env.launch(&config).await;
    assert_eq!(c.network.as_deref(), Some(env.name("net").as_str()));
    let ip: Ipv4Addr = c
        .ip_address
        .as_deref()
        .expect("container address")
        .parse()
        .expect("an IPv4 address");
    assert!(subnet.contains(&ip), "{ip} not in {subnet}");

    // Busy network: refused while the container runs.
    let busy = env.rt.remove_network(&id).await;
    assert!(matches!(busy, Err(RuntimeError::Conflict(_))), "{busy:?}");
    env.rt.remove(&c.docker_id, true).await.expect("remove");
    env.rt.remove_network(&id).await.expect("remove network");
    assert!(env
        .rt
        .list_networks(&env.filter())
        .await
        .expect("list")
        .is_empty());
    let gone = env.rt.remove_network(&id).await;
    assert!(matches!(gone, Err(RuntimeError::NotFound(_))), "{gone:?}");
    let used = env.rt.used_subnets().await.expect("used subnets");
    assert!(!used.contains(&subnet.to_string()));
}

async fn overlapping_subnet_is_refused<R: Runtime>(env: Env<R>) {
    let (_id, subnet) = env.network("first", 2).await;
    let inner =
        Ipv4Net::new(Ipv4Addr::from(u32::from(subnet.network()) + 128), 25).expect("valid /25");
    let second = env
        .rt
        .create_network(&NetworkConfig {
            name: env.name("second"),
            subnet: inner.to_string(),
            labels: env.labels(),
            ..Default::default()
        })
        .await;
    match second {
        Err(RuntimeError::SubnetOverlap(s)) => assert_eq!(s, inner.to_string()),
        other => panic!("expected SubnetOverlap, got {other:?}"),
    }
    let listed = env.rt.list_networks(&env.filter()).await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
}

async fn stop_then_remove<R: Runtime>(env: Env<R>) {
    let c = env.launch(&env.container("stop", &["sleep", "300"])).await;
    let running = env.rt.remove(&c.docker_id, false).await;
    assert!(
        matches!(running, Err(RuntimeError::Conflict(_))),
        "{running:?}"
    );
    env.rt
        .stop(&c.docker_id, Duration::from_secs(2))
        .await
        .expect("stop");
    let stopped = env.rt.inspect(&c.docker_id).await.expect("inspect");
    assert_eq!(stopped.state, "exited", "{stopped:?}");
    assert!(stopped.published.is_empty());
    let r = env.rt.exec(&c.docker_id, &exec_req(&["true"], None)).await;
    assert!(matches!(r, Err(RuntimeError::Conflict(_))), "{r:?}");
    // Stopping again is fine.
    env.rt
        .stop(&c.docker_id, Duration::from_secs(2))
        .await
        .expect("second stop");
    let st = env.rt.status(&env.filter()).await.expect("status");
    assert_eq!((st.containers, st.containers_running), (1, 0));
    env.rt.remove(&c.docker_id, false).await.expect("remove");
    let gone = env.rt.inspect(&c.docker_id).await;
    assert!(matches!(gone, Err(RuntimeError::NotFound(_))), "{gone:?}");
    assert!(env.listed().await.is_empty());
}

async fn missing_objects_are_not_found<R: Runtime>(env: Env<R>) {
    let name = env.name("missing");
    let r = env.rt.remove(&name, true).await;
    assert!(matches!(r, Err(RuntimeError::NotFound(_))), "{r:?}");
    let r = env.rt.inspect(&name).await;
    assert!(matches!(r, Err(RuntimeError::NotFound(_))), "{r:?}");
    let r = env.rt.stop(&name, Duration::from_secs(1)).await;
    assert!(matches!(r, Err(RuntimeError::NotFound(_))), "{r:?}");
    let r = env.rt.remove_network(&name).await;
    assert!(matches!(r, Err(RuntimeError::NotFound(_))), "{r:?}");
    let r = env.rt.remove_image(&format!("{name}:latest"), false).await;
    assert!(matches!(r, Err(RuntimeError::NotFound(_))), "{r:?}");
    let logs: Vec<_> = env.rt.logs(&name, None, false).collect().await;
    assert!(
        matches!(logs.as_slice(), [Err(RuntimeError::NotFound(_))]),
        "{logs:?}"
    );
}

async fn logs_return_output<R: Runtime>(env: Env<R>) {
    let c = env
        .launch(&env.container("logs", &["sh", "-c", "echo hello; echo oops >&2"]))
        .await;
    let rt = &env.rt;
    let id = c.docker_id.clone();
    eventually(Duration::from_secs(10), "the container to exit", || {
        let id = id.clone();
        async move {
            let c = rt.inspect(&id).await.ok()?;
            (c.state == "exited").then_some(())
        }
    })
    .await;
    let chunks: Vec<_> = env
        .rt
        .logs(&c.docker_id, None, false)
        .map(|c| c.expect("log chunk"))
        .collect()
        .await;
    let text = |stream: &str| -> String {
        chunks
            .iter()
            .filter(|c| c.stream == stream)
            .map(|c| c.data.as_str())
            .collect()
    };
    assert_eq!(text("stdout"), "hello\n", "{chunks:?}");
    assert_eq!(text("stderr"), "oops\n", "{chunks:?}");
    // Following an exited container ends by itself.
    let followed = tokio::time::timeout(
        Duration::from_secs(10),
        env.rt.logs(&c.docker_id, Some(1), true).collect::<Vec<_>>(),
    )
    .await
    .expect("follow of an exited container must end");
    assert!(!followed.is_empty());
}

async fn followed_logs_end_on_stop<R: Runtime>(env: Env<R>) {
    let c = env
        .launch(&env.container("follow", &["sh", "-c", "echo ready; sleep 300"]))
        .await;
    let mut logs = env.rt.logs(&c.docker_id, None, true);
    let first = tokio::time::timeout(Duration::from_secs(10), logs.next())
        .await
        .expect("the first line in time")
        .expect("a chunk")
        .expect("not an error");
    assert_eq!(
        (first.stream.as_str(), first.data.as_str()),
        ("stdout", "ready\n")
    );
    env.rt
        .stop(&c.docker_id, Duration::from_secs(1))
        .await
        .expect("stop");
    let rest = tokio::time::timeout(Duration::from_secs(10), logs.collect::<Vec<_>>())
        .await
        .expect("a followed stream must end when its container stops");
    assert!(rest.iter().all(|r| r.is_ok()), "{rest:?}");
}

async fn images_and_status<R: Runtime>(env: Env<R>) {
    let images = env.rt.list_images().await.expect("images");
    let img = images
        .iter()
        .find(|i| i.tags.iter().any(|t| t == IMAGE))
        .expect("test image listed");
    assert!(img.id.starts_with("sha256:"));
    assert!(img.node_id.is_empty());

    let info = env.rt.info().await.expect("info");
    assert!(info.cpus > 0 && info.memory_total > 0, "{info:?}");
    assert!(!info.engine_version.is_empty());

    env.launch(&env.container("status", &["sleep", "300"]))
        .await;
    let st = env.rt.status(&env.filter()).await.expect("status");
    assert_eq!((st.containers, st.containers_running), (1, 1));
    assert_eq!(st.cpus, info.cpus);
    assert_eq!(st.memory_total, info.memory_total);
    assert!(st.memory_used <= st.memory_total);

    // A pull either succeeds (hollow) or, from a registry that is not there, ends on an error
    // item. The registry is a closed loopback port: tests never reach outside this machine.
    let reference = format!("127.0.0.1:9/kisara-test/pull-{}:v1", env.run);
    let items: Vec<_> = tokio::time::timeout(
        Duration::from_secs(60),
        env.rt.pull_image(&reference).collect::<Vec<_>>(),
    )
    .await
    .expect("a pull must end");
    if env.docker.is_some() {
        assert!(
            matches!(items.last(), Some(Err(_))),
            "a pull without a registry must end on an error: {items:?}"
        );
    } else {
        assert!(items.iter().all(|i| i.is_ok()), "{items:?}");
        let images = env.rt.list_images().await.expect("images");
        assert!(images.iter().any(|i| i.tags.contains(&reference)));
        env.rt
            .remove_image(&reference, false)
            .await
            .expect("remove pulled image");
    }
}

async fn export_and_load_images<R: Runtime>(env: Env<R>) {
    // Export the test image and load it back: idempotent, so parallel tests are not disturbed.
    let chunks: Vec<_> = tokio::time::timeout(
        Duration::from_secs(120),
        env.rt
            .export_images(&[IMAGE.to_string()])
            .collect::<Vec<_>>(),
    )
    .await
    .expect("an export must end");
    let chunks: Vec<bytes::Bytes> = chunks
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("export");
    assert!(chunks.iter().map(|c| c.len()).sum::<usize>() > 0);
    let loaded = env
        .rt
        .load_images(futures::stream::iter(chunks.into_iter().map(Ok)).boxed())
        .await
        .expect("load");
    assert!(loaded.iter().any(|r| r == IMAGE), "{loaded:?}");

    let missing = format!("kisara-test/missing-{}:v1", env.run);
    let items: Vec<_> = env.rt.export_images(&[missing]).collect().await;
    assert!(
        items.iter().any(|i| i.is_err()),
        "exporting a missing image must fail"
    );
    let junk = futures::stream::iter([Ok(bytes::Bytes::from_static(b"not a tar archive"))]).boxed();
    assert!(env.rt.load_images(junk).await.is_err());
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod hollow {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::hollow_env().await).await
                }
            )*
        }
        mod docker {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::docker_env().await).await
                }
            )*
        }
    };
}

conformance!(
    published_port_serves_http,
    hardening_is_applied,
    exec_collects_output_and_code,
    exec_times_out,
    missing_image_leaves_nothing,
    name_conflict,
    network_lifecycle,
    overlapping_subnet_is_refused,
    stop_then_remove,
    missing_objects_are_not_found,
    logs_return_output,
    followed_logs_end_on_stop,
    images_and_status,
    export_and_load_images,
);
