//! Cluster images end to end, through the `kisara` binary: build → save → load into a second data
//! dir → images into a second engine of the test bed (scripts/testbed.sh) through its agent →
//! `bundle up` as a service → the app answers on that engine → `bundle down`. Damaged archives are
//! refused; push and pull go through Debian's docker-registry on loopback; every example under
//! `examples/bundles/` builds. Needs Docker (and root for the test bed): fails without it.

mod common;
mod testbed;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

const BIN: &str = env!("CARGO_BIN_EXE_kisara");

fn run_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let h = RandomState::new().hash_one((std::process::id(), Instant::now()));
    format!("{:010x}", h & 0xff_ffff_ffff)
}

fn kisara(data_dir: &Path, url: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--data-dir").arg(data_dir);
    if let Some(u) = url {
        cmd.args(["--url", u]);
    }
    cmd.args(args)
        .env_remove("KISARA_TOKEN")
        .env_remove("KISARA_URL")
        .output()
        .expect("run kisara")
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI")
}

/// Removes the images a test tagged, however it ends.
struct Images(Vec<String>);
impl Drop for Images {
    fn drop(&mut self) {
        for r in &self.0 {
            let _ = docker(&["rmi", r]);
        }
    }
}

fn tag_test_image(run: &str, what: &str) -> String {
    let r = format!("kisara-test/bundle-{what}-{run}:v1");
    let out = docker(&["tag", IMAGE, &r]);
    assert!(out.status.success(), "docker tag: {out:?}");
    r
}

fn write_context(dir: &Path, image: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("Kisarafile"),
        "FROM scratch\n\
         ARG WHO=world\n\
         ENV APP_MODE=test\n\
         COPY compose.yaml apps/\n\
         RUN echo \"hello ${WHO}\" > greeting.txt && echo built the greeting\n\
         APP web apps/compose.yaml\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("compose.yaml"),
        format!(
            "x-base: &base\n  image: {image}\nservices:\n  web:\n    <<: *base\n    command: httpd -f -p 80 -h /www\n    ports: [\"8080:80\"]\n"
        ),
    )
    .unwrap();
}

/// A build context with two apps, `web` (a compose file) and `tools` (a Kisara service spec),
/// an `ENV` line, and `tail` (more Kisarafile lines) at the end.
fn write_two_apps(ctx: &Path, env: &str, tail: &str, compose: &str, spec: &str) {
    std::fs::create_dir_all(ctx).unwrap();
    std::fs::write(
        ctx.join("Kisarafile"),
        format!(
            "FROM scratch\n\
             ENV {env}\n\
             COPY compose.yaml apps/\n\
             COPY spec.json apps/\n\
             APP web apps/compose.yaml\n\
             APP tools apps/spec.json\n{tail}"
        ),
    )
    .unwrap();
    std::fs::write(ctx.join("compose.yaml"), compose).unwrap();
    std::fs::write(ctx.join("spec.json"), spec).unwrap();
}

/// An image of the test's own, made on the main engine: busybox plus a page naming the run, so
/// what answers can only have come from the bundle.
fn build_site_image(run: &str, dir: &Path) -> String {
    let r = format!("kisara-test/bundle-site-{run}:v1");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("index.html"), format!("served by bundle {run}\n")).unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {IMAGE}\nCOPY index.html /www/index.html\n"),
    )
    .unwrap();
    let out = docker(&["build", "-q", "-t", &r, dir.to_str().unwrap()]);
    assert!(out.status.success(), "docker build: {out:?}");
    r
}

/// The whole road on two engines: build on the main engine → save → load into a second data dir
/// (the site's operator) → `bundle images --node n2` into the second test bed engine only →
/// `bundle up` (a service through the control plane: compose interpolation from the bundle's ENV,
/// a healthcheck waited for, LAUNCH honoured, CMD run) → the app answers on that engine's
/// address → `bundle down` removes that bundle's services and nothing else.
#[test]
fn build_save_load_images_up_down_on_a_second_engine() {
    let run = run_id();
    let tmp = tempfile::tempdir().unwrap();
    let image = build_site_image(&run, &tmp.path().join("image"));
    let _cleanup = Images(vec![image.clone()]);
    let ctx = tmp.path().join("ctx");
    write_two_apps(
        &ctx,
        "HTTP_PORT=8081",
        "LAUNCH web\n\
         CMD [\"sh\", \"-c\", \"echo CMD ran for $KISARA_BUNDLE as $KISARA_OWNER with port $HTTP_PORT in $(ls apps | tr '\\\\n' ' ')\"]\n",
        &format!(
            "services:\n  web:\n    image: {image}\n    command: httpd -f -p ${{HTTP_PORT}} -h /www\n    ports: [\"${{HTTP_PORT}}\"]\n    healthcheck:\n      test: [\"CMD\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:${{HTTP_PORT}}/\"]\n      interval: 1s\n      retries: 30\n"
        ),
        // An app LAUNCH leaves out: carried, never started.
        &format!(r#"{{"name": "tools", "containers": [{{"image": "{image}", "cmd": ["sleep", "600"]}}]}}"#),
    );
    let name = format!("app-{run}:1.0");
    let builder = tmp.path().join("builder");
    ok(
        kisara(
            &builder,
            None,
            &["build", "-t", &name, ctx.to_str().unwrap()],
        ),
        "build",
    );
    let saved = tmp.path().join("app.tar.zst");
    ok(
        kisara(
            &builder,
            None,
            &["save", &name, "-o", saved.to_str().unwrap(), "--zstd"],
        ),
        "save",
    );
    // The operator's data dir at the site: a second store, loaded from the file alone.
    let site = tmp.path().join("site");
    ok(
        kisara(&site, None, &["load", "-i", saved.to_str().unwrap()]),
        "load",
    );

    let cluster = testbed::Cluster::start(2);
    let ids = cluster.node_ids();
    let site_arg = site.to_str().unwrap();
    let at_site = |args: &[&str]| {
        let mut a = vec!["--data-dir", site_arg];
        a.extend_from_slice(args);
        cluster.kisara(&a)
    };
    let has_image = |k: usize| {
        cluster
            .engines
            .docker(k, &["image", "inspect", &image])
            .status
            .success()
    };
    assert!(
        !has_image(0) && !has_image(1),
        "the test bed engines start without {image}"
    );

    // Into the second engine only (the server lacks the bundle: the CLI uploads it first).
    let loaded = ok(
        at_site(&["bundle", "images", &name, "--node", "n2"]),
        "bundle images",
    );
    assert!(loaded.contains(&image), "{loaded}");
    assert!(
        has_image(1),
        "the agent of n2 must have loaded {image} into its engine"
    );
    // The engine already held the busybox layer under the page: it was not sent again.
    let received: u64 = loaded
        .split_once(" bytes received")
        .and_then(|(head, _)| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .expect("bytes received");
    let inspect: serde_json::Value =
        serde_json::from_slice(&at_site(&["bundle", "inspect", &name]).stdout).unwrap();
    let base = inspect["images"][0]["layers"][0]["size"].as_u64().unwrap();
    assert!(
        received < base,
        "{received} bytes received: the {base}-byte base layer the engine holds must be left out"
    );
    assert!(!has_image(0), "n1 was not asked for the images");

    let up = at_site(&["--json", "bundle", "up", &name, "--node", "n2"]);
    let up_out = ok(
        Output {
            status: up.status,
            stdout: up.stdout.clone(),
            stderr: up.stderr.clone(),
        },
        "bundle up",
    );
    let up_err = String::from_utf8_lossy(&up.stderr);
    assert!(
        up_err.contains(&format!(
            "CMD ran for {name} as bundle:{name} with port 8081 in compose.yaml spec.json"
        )),
        "CMD must run in the bundle's work tree with its ENV: {up_err}"
    );
    let up: serde_json::Value = serde_json::from_str(&up_out).expect("bundle up --json");
    let launched = up.as_array().expect("a list");
    assert_eq!(launched.len(), 1, "LAUNCH web: only web starts: {up}");
    assert_eq!(launched[0]["app"], "web");
    let svc: kisara_api::Service = serde_json::from_value(launched[0]["service"].clone()).unwrap();
    assert_eq!(
        svc.owner.as_deref(),
        Some(format!("bundle:{name}").as_str())
    );
    assert_eq!(svc.module.as_deref(), Some("web"));
    assert_eq!(svc.node_id, ids["n2"]);
    assert_eq!(svc.state, kisara_api::ServiceState::Running);
    assert_eq!(svc.containers.len(), 1);
    assert_eq!(
        svc.containers[0].health,
        Some(kisara_api::HealthState::Healthy),
        "up waits for the healthcheck"
    );
    let port = &svc.ports[0];
    assert_eq!(
        port.container_port, 8081,
        "the port came from the bundle's ENV"
    );
    assert_eq!(port.public_host, cluster.engines.address(1));
    let answer = testbed::poll(Duration::from_secs(15), "the app answers", || {
        http_get_sync(&port.public_host, port.public_port)
            .filter(|b| b.contains(&format!("served by bundle {run}")))
    });
    assert!(answer.contains("200 OK"), "{answer}");

    // A second launch of the same bundle is refused; another version is its own.
    let again = at_site(&["bundle", "up", &name, "--node", "n2", "--no-cmd"]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already up"),
        "{again:?}"
    );
    let other = format!("app-{run}:2.0");
    ok(at_site(&["bundle", "tag", &name, &other]), "bundle tag");
    ok(
        at_site(&["bundle", "up", &other, "--node", "n2", "--no-cmd"]),
        "bundle up (2.0)",
    );
    let services = |owner: &str| -> Vec<kisara_api::Service> {
        cluster
            .json::<kisara_api::ListResponse<kisara_api::Service>>(&[
                "service", "ls", "--owner", owner,
            ])
            .items
    };
    assert_eq!(services(&format!("bundle:{other}")).len(), 1);

    let down = ok(at_site(&["bundle", "down", &name]), "bundle down");
    assert!(down.contains(&svc.id), "{down}");
    assert!(services(&format!("bundle:{name}")).is_empty());
    let on_engine: Vec<String> = cluster
        .engines
        .kisara_containers(1)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(
        !on_engine.contains(&svc.containers[0].id),
        "the 1.0 container must be gone from the engine: {on_engine:?}"
    );
    let kept = services(&format!("bundle:{other}"));
    assert_eq!(kept.len(), 1, "down of 1.0 leaves 2.0 alone");
    assert!(
        on_engine.contains(&kept[0].containers[0].id),
        "{on_engine:?}"
    );
    ok(at_site(&["bundle", "down", &other]), "bundle down (2.0)");
    assert!(cluster.engines.kisara_containers(1).is_empty());
}

/// One HTTP request over TCP; the response, or `None` when the port does not answer.
fn http_get_sync(host: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn truncated_and_tampered_bundles_are_refused() {
    let run = run_id();
    let image = tag_test_image(&run, "tamper");
    let _cleanup = Images(vec![image.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let builder_dir = tmp.path().join("builder");
    let ctx = tmp.path().join("ctx");
    write_context(&ctx, &image);
    let name = format!("tamper-{run}");
    ok(
        kisara(
            &builder_dir,
            None,
            &["build", "-t", &name, ctx.to_str().unwrap()],
        ),
        "build",
    );
    let plain = tmp.path().join("b.tar");
    ok(
        kisara(
            &builder_dir,
            None,
            &["save", &name, "-o", plain.to_str().unwrap()],
        ),
        "save",
    );
    let bytes = std::fs::read(&plain).unwrap();

    let target = tmp.path().join("target");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", bytes[..bytes.len() / 2].to_vec()),
        ("tampered", {
            // A byte of the app's compose file, inside the bundle's files blob.
            let pos = bytes
                .windows(5)
                .position(|w| w == b"httpd")
                .expect("compose file in the archive");
            let mut t = bytes.clone();
            t[pos] = b'H';
            t
        }),
    ];
    for (what, data) in cases {
        let f = tmp.path().join(format!("{what}.tar"));
        std::fs::write(&f, data).unwrap();
        let out = kisara(&target, None, &["load", "-i", f.to_str().unwrap()]);
        assert!(!out.status.success(), "a {what} bundle must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("corrupt bundle"), "{what}: {err}");
        let ls = ok(kisara(&target, None, &["bundle", "ls", "--json"]), "ls");
        assert_eq!(
            ls.trim(),
            "[]",
            "nothing may be loaded from a {what} bundle"
        );
        let blobs = std::fs::read_dir(target.join("bundles/blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(blobs, 0, "{what}: no blob may be kept");
    }
    // The intact archive loads.
    ok(
        kisara(&target, None, &["load", "-i", plain.to_str().unwrap()]),
        "load intact",
    );
}

#[test]
fn push_and_pull_through_a_loopback_registry() {
    let reg = start_registry();
    let run = run_id();
    let image = tag_test_image(&run, "push");
    let _cleanup = Images(vec![image.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let ctx = tmp.path().join("ctx");
    write_context(&ctx, &image);
    let name = format!("pushed-{run}:v1");
    ok(
        kisara(&a, None, &["build", "-t", &name, ctx.to_str().unwrap()]),
        "build",
    );
    let reference = format!("{}/kisara-test/pushed-{run}:v1", reg.addr);
    ok(kisara(&a, None, &["push", &name, &reference]), "push");
    // Pushing again finds every blob there already.
    ok(kisara(&a, None, &["push", &name, &reference]), "push again");
    let pulled = ok(kisara(&b, None, &["pull", &reference]), "pull");
    assert!(pulled.contains(&format!("pushed-{run}:v1")), "{pulled}");
    let digest = |dir: &PathBuf, n: &str| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&ok(kisara(dir, None, &["bundle", "inspect", n]), "inspect"))
                .unwrap();
        v["digest"].as_str().unwrap_or_default().to_string()
    };
    assert_eq!(digest(&a, &name), digest(&b, &name));
    let missing = format!("{}/kisara-test/absent-{run}:v1", reg.addr);
    let out = kisara(&b, None, &["pull", &missing]);
    assert!(!out.status.success());
}

#[test]
fn a_build_names_the_image_it_cannot_have() {
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    let run = run_id();
    let missing = format!("kisara-test/never-built-{run}:v1");
    write_context(&ctx, &missing);
    let out = kisara(
        &tmp.path().join("d"),
        None,
        &["build", "-t", "x", ctx.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&missing), "{err}");
}

#[test]
fn every_example_bundle_builds() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/bundles");
    let tmp = tempfile::tempdir().unwrap();
    let mut built = 0;
    for entry in std::fs::read_dir(&dir).expect("examples/bundles exists") {
        let path = entry.unwrap().path();
        if !path.is_dir() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let out = ok(
            kisara(
                tmp.path(),
                None,
                &[
                    "build",
                    "-t",
                    &format!("example-{name}"),
                    path.to_str().unwrap(),
                ],
            ),
            &format!("building examples/bundles/{name}"),
        );
        assert!(out.contains("built"), "{out}");
        built += 1;
    }
    assert!(
        built >= 2,
        "expected the example bundles under {}",
        dir.display()
    );
}

/// `bundle up` on a cluster in the test process: the bundle's `ENV` are a compose app's
/// `${VAR}` interpolation variables (as a compose `.env` file, not the containers' own
/// environment), and go into each container's environment of a Kisara service spec, under the
/// spec's own values. (A spec app used to be refused: the request carried compose-only `env`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_env_reaches_compose_and_spec_apps() {
    let cl = TestCluster::start().await;
    let run = run_id();
    let tmp = tempfile::tempdir().unwrap();
    let ctx = tmp.path().join("ctx");
    write_two_apps(
        &ctx,
        "APP_MODE=bundle SITE=demo",
        "",
        &format!(
            "services:\n  web:\n    image: {IMAGE}\n    command: sleep 600\n    environment:\n      MODE: ${{APP_MODE}}\n"
        ),
        &format!(
            r#"{{"name": "tools", "containers": [{{"image": "{IMAGE}", "cmd": ["sleep", "600"], "env": {{"SITE": "own"}}}}]}}"#
        ),
    );
    let name = format!("env-{run}:1");
    let data = tmp.path().join("d");
    let data = data.to_string_lossy();
    let cl_ref = &cl;
    let cli = |args: &[&str]| {
        let mut a = vec!["--data-dir", &data];
        a.extend_from_slice(args);
        let a: Vec<String> = a.into_iter().map(String::from).collect();
        async move {
            cl_ref
                .cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
                .await
        }
    };
    ok(
        cli(&["build", "-t", &name, ctx.to_str().unwrap()]).await,
        "build",
    );
    let up = ok(
        cli(&["--json", "bundle", "up", &name, "--no-cmd"]).await,
        "bundle up",
    );
    let up: serde_json::Value = serde_json::from_str(&up).expect("bundle up --json");
    let env_of = |app: &str| -> Vec<String> {
        let entry = up
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["app"] == app)
            .unwrap_or_else(|| panic!("app {app} not up: {up}"));
        let docker_id = entry["service"]["containers"][0]["docker_id"]
            .as_str()
            .unwrap();
        docker_inspect(docker_id)["Config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let web = env_of("web");
    assert!(web.contains(&"MODE=bundle".to_string()), "{web:?}");
    assert!(!web.iter().any(|v| v.starts_with("APP_MODE=")), "{web:?}");
    let tools = env_of("tools");
    assert!(tools.contains(&"APP_MODE=bundle".to_string()), "{tools:?}");
    assert!(tools.contains(&"SITE=own".to_string()), "{tools:?}");
    ok(cli(&["bundle", "down", &name]).await, "bundle down");
    cl.assert_clean().await;
    cl.stop().await;
}
