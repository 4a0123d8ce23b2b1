//! Cluster images end to end, through the `kisara` binary and a whole Kisara in the test
//! process: build → save → load into a second data dir → images into the engine through the
//! agent (after `docker rmi` of the app's image: one engine stands in for a second one until the
//! multi-engine test bed exists) → `bundle up` → the app answers → `bundle down`. Damaged
//! archives are refused; push and pull go through Debian's docker-registry on loopback; every
//! example under `examples/bundles/` builds. Needs Docker: fails without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

fn image_exists(r: &str) -> bool {
    docker(&["image", "inspect", r]).status.success()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_save_load_images_up_down() {
    let run = run_id();
    let image = tag_test_image(&run, "web");
    let _cleanup = Images(vec![image.clone()]);
    let tmp = tempfile::tempdir().unwrap();
    let builder_dir = tmp.path().join("builder");
    let ctx = tmp.path().join("ctx");
    write_context(&ctx, &image);
    let name = format!("app-{run}:1.0");

    let built = ok(
        kisara(
            &builder_dir,
            None,
            &[
                "build",
                "-t",
                &name,
                "--build-arg",
                "WHO=kisara",
                ctx.to_str().unwrap(),
            ],
        ),
        "build",
    );
    assert!(built.contains(&format!("built {name}")), "{built}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(
        kisara(&builder_dir, None, &["bundle", "inspect", &name]),
        "inspect",
    ))
    .unwrap();
    assert_eq!(inspect["images"][0]["reference"], image.as_str());
    assert_eq!(inspect["apps"][0]["name"], "web");
    assert!(inspect["images"][0]["layers"]
        .as_array()
        .is_some_and(|l| !l.is_empty()));

    let saved = tmp.path().join("app.tar.zst");
    ok(
        kisara(
            &builder_dir,
            None,
            &["save", &name, "-o", saved.to_str().unwrap(), "--zstd"],
        ),
        "save",
    );

    // The "site": a fresh Kisara whose data dir receives the bundle.
    let k = TestCluster::start().await;
    let url = k.url.clone();
    let site = k.data_dir.clone();
    ok(
        kisara(&site, None, &["load", "-i", saved.to_str().unwrap()]),
        "load",
    );
    let ls = ok(kisara(&site, None, &["bundle", "ls", "--json"]), "ls");
    assert!(ls.contains(&name), "{ls}");

    // As if on a second engine: the image is gone until the bundle brings it.
    assert!(docker(&["rmi", &image]).status.success());
    assert!(!image_exists(&image));
    let loaded = ok(
        kisara(&site, Some(&url), &["bundle", "images", &name, "--all"]),
        "bundle images",
    );
    assert!(loaded.contains(&image), "{loaded}");
    assert!(image_exists(&image), "the agent must have loaded {image}");

    let up = ok(
        kisara(&site, Some(&url), &["bundle", "up", &name, "--json"]),
        "bundle up",
    );
    let up: serde_json::Value = serde_json::from_str(&up).unwrap();
    let c = &up[0]["container"];
    assert_eq!(c["owner"], format!("bundle:{name}"));
    assert_eq!(c["module"], "web");
    let port = c["ports"][0]["public_port"]
        .as_u64()
        .expect("a published port") as u16;
    let answer = http_get("127.0.0.1", port).await;
    assert!(
        answer.contains("kisara-test"),
        "the app must answer: {answer:?}"
    );

    let down = ok(
        kisara(&site, Some(&url), &["bundle", "down", &name]),
        "bundle down",
    );
    assert!(down.contains("stopped"), "{down}");
    let left = k
        .client
        .list_containers(&kisara_client::ContainerFilter {
            owner: Some(format!("bundle:{name}")),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(left.items.is_empty(), "{:?}", left.items);
    k.stop().await;
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

struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's docker-registry on a free loopback port (scripts/test.sh installs it).
fn start_registry() -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry must be installed (scripts/test.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry {
        child,
        _dir: dir,
        addr,
    }
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
