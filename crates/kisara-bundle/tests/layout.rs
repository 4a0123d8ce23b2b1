//! The bundle layout end to end without Docker: build against the hollow runtime, save, load
//! into another store, and refuse damaged archives.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use kisara_bundle::build::{build, BuildOptions, Quiet};
use kisara_bundle::store::BundleName;
use kisara_bundle::{BundleError, Store};
use kisara_runtime::hollow::HollowRuntime;
use kisara_runtime::Runtime;

const COMPOSE: &str = r#"
x-base: &base
  image: kisara-test/busybox:latest
services:
  web:
    <<: *base
    command: httpd -f -p 80
    ports: ["8080:80"]
  cache:
    image: 127.0.0.1:5000/cache:1
"#;

fn context(dir: &Path, kisarafile: &str) {
    std::fs::write(dir.join("Kisarafile"), kisarafile).unwrap();
    std::fs::write(dir.join("compose.yaml"), COMPOSE).unwrap();
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(dir.join("conf/app.ini"), "x=1\n").unwrap();
}

async fn build_one(
    store: &Store,
    rt: Arc<dyn Runtime>,
    dir: &Path,
    name: &str,
) -> kisara_bundle::build::Built {
    build(
        store,
        rt,
        &BuildOptions {
            kisarafile: dir.join("Kisarafile"),
            context: dir.to_path_buf(),
            name: BundleName::parse(name).unwrap(),
            build_args: [("VERSION".to_string(), "7".to_string())].into(),
        },
        &Quiet,
    )
    .await
    .unwrap_or_else(|e| panic!("build: {e}"))
}

fn hollow() -> Arc<dyn Runtime> {
    Arc::new(HollowRuntime::new().with_images(&["kisara-test/busybox:latest", "extra/tool:2"]))
}

const KISARAFILE: &str = "\
FROM scratch
ARG VERSION=1
ENV MODE=prod V=${VERSION}
LABEL team=ctf
COPY conf /etc-files/
RUN echo made-by-run > generated.txt && ls etc-files/app.ini
APP web compose.yaml
IMAGE extra/tool:2
CMD echo up
";

#[tokio::test]
async fn build_save_load_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    context(tmp.path(), KISARAFILE);
    let store = Store::open(tmp.path().join("store")).unwrap();
    let built = build_one(&store, hollow(), tmp.path(), "demo:1.0").await;
    let m = &built.manifest;
    assert_eq!((m.name.as_str(), m.version.as_str()), ("demo", "1.0"));
    assert_eq!(m.env.get("V").map(String::as_str), Some("7"));
    assert_eq!(m.labels.get("team").map(String::as_str), Some("ctf"));
    let refs: Vec<_> = m.images.iter().map(|i| i.reference.as_str()).collect();
    assert_eq!(
        refs,
        // Compose services in name order, then IMAGE lines.
        [
            "127.0.0.1:5000/cache:1",
            "kisara-test/busybox:latest",
            "extra/tool:2"
        ]
    );
    assert_eq!(m.apps[0].name, "web");
    assert_eq!(
        m.cmd,
        [vec!["sh".to_string(), "-c".into(), "echo up".into()]]
    );

    let b = store.get("demo:1.0").unwrap();
    assert_eq!(b.digest, built.digest);
    assert_eq!(
        store.read_file(&b, "generated.txt").unwrap(),
        b"made-by-run\n"
    );
    assert_eq!(store.read_file(&b, "etc-files/app.ini").unwrap(), b"x=1\n");

    for zstd in [false, true] {
        let mut saved = Vec::new();
        store.save("demo:1.0", &mut saved, zstd, &|_| {}).unwrap();
        assert_eq!(saved.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]), zstd);
        let other = Store::open(tmp.path().join(format!("other-{zstd}"))).unwrap();
        let names = other.load(saved.as_slice()).unwrap();
        assert_eq!(names, [BundleName::parse("demo:1.0").unwrap()]);
        let loaded = other.get("demo:1.0").unwrap();
        assert_eq!(loaded.digest, b.digest);
        assert_eq!(loaded.config, b.config);
    }

    // The plain archive is an OCI layout.
    let mut saved = Vec::new();
    store.save("demo", &mut saved, false, &|_| {}).unwrap_err();
    store.save("demo:1.0", &mut saved, false, &|_| {}).unwrap();
    let mut names = Vec::new();
    let mut archive = tar::Archive::new(saved.as_slice());
    for e in archive.entries().unwrap() {
        names.push(e.unwrap().path().unwrap().to_string_lossy().to_string());
    }
    assert_eq!(names.first().map(String::as_str), Some("oci-layout"));
    assert_eq!(names.last().map(String::as_str), Some("index.json"));
    assert!(names
        .iter()
        .all(|n| n == "oci-layout" || n == "index.json" || n.starts_with("blobs/sha256/")));
}

#[tokio::test]
async fn damaged_archives_are_refused_and_nothing_is_loaded() {
    let tmp = tempfile::tempdir().unwrap();
    context(tmp.path(), KISARAFILE);
    let store = Store::open(tmp.path().join("store")).unwrap();
    build_one(&store, hollow(), tmp.path(), "demo:1").await;
    let mut saved = Vec::new();
    store.save("demo:1", &mut saved, false, &|_| {}).unwrap();

    let target = Store::open(tmp.path().join("target")).unwrap();
    let blob_count = |s: &Store| {
        std::fs::read_dir(s.root().join("blobs/sha256"))
            .unwrap()
            .count()
    };

    // Cut short at several points.
    for cut in [100, saved.len() / 3, saved.len() / 2, saved.len() - 1500] {
        let e = target.load(&saved[..cut]).unwrap_err();
        assert!(matches!(e, BundleError::Corrupt(_)), "cut {cut}: {e}");
    }
    // A changed byte inside a blob (the generated file's content is unique and in plain text).
    let pos = saved
        .windows(11)
        .position(|w| w == b"made-by-run")
        .expect("file content in the archive");
    let mut tampered = saved.clone();
    tampered[pos] ^= 0x20;
    let e = target.load(tampered.as_slice()).unwrap_err();
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    // zstd cut short.
    let mut z = Vec::new();
    store.save("demo:1", &mut z, true, &|_| {}).unwrap();
    assert!(target.load(&z[..z.len() / 2]).is_err());

    assert!(target.list().unwrap().is_empty());
    assert_eq!(
        blob_count(&target),
        0,
        "nothing may be loaded from a damaged archive"
    );
    let staging = std::fs::read_dir(target.root().join("tmp"))
        .unwrap()
        .count();
    assert_eq!(staging, 0, "staging must be cleaned up");
}

#[tokio::test]
async fn from_a_bundle_inherits_and_shared_blobs_are_kept_once() {
    let tmp = tempfile::tempdir().unwrap();
    context(tmp.path(), KISARAFILE);
    let store = Store::open(tmp.path().join("store")).unwrap();
    build_one(&store, hollow(), tmp.path(), "base:1").await;
    std::fs::write(
        tmp.path().join("Kisarafile.child"),
        "FROM base:1\nENV EXTRA=1\nLAUNCH web\n",
    )
    .unwrap();
    let child = build(
        &store,
        hollow(),
        &BuildOptions {
            kisarafile: tmp.path().join("Kisarafile.child"),
            context: tmp.path().to_path_buf(),
            name: BundleName::parse("child").unwrap(),
            build_args: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap();
    let base = store.get("base:1").unwrap();
    assert_eq!(child.manifest.from.as_deref(), Some("base:1"));
    assert_eq!(child.manifest.images, base.config.images);
    assert_eq!(child.manifest.apps, base.config.apps);
    assert_eq!(
        child.manifest.env.get("MODE").map(String::as_str),
        Some("prod")
    );
    assert_eq!(child.manifest.launch, ["web"]);
    let c = store.get("child:latest").unwrap();
    assert_eq!(
        store.read_file(&c, "generated.txt").unwrap(),
        b"made-by-run\n"
    );

    // Tag, then remove: blobs stay while a name uses them and go with the last one.
    store.tag("child", "child:v2").unwrap();
    assert_eq!(store.list().unwrap().len(), 3);
    store.remove("child").unwrap();
    assert!(store.get("child:v2").is_ok());
    store.remove("child:v2").unwrap();
    store.remove("base:1").unwrap();
    assert!(matches!(
        store.remove("base:1"),
        Err(BundleError::NotFound(_))
    ));
    let left = std::fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .count();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn images_tar_is_a_docker_load_archive_with_each_layer_once() {
    let tmp = tempfile::tempdir().unwrap();
    context(tmp.path(), KISARAFILE);
    let store = Store::open(tmp.path().join("store")).unwrap();
    build_one(&store, hollow(), tmp.path(), "demo").await;
    let b = store.get("demo").unwrap();
    let (len, mut s) = store.images_tar(&b, None).unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = s.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes.len() as u64, len);
    let mut archive = tar::Archive::new(bytes.as_slice());
    let mut manifest = None;
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("manifest.json") {
            let mut t = String::new();
            e.read_to_string(&mut t).unwrap();
            manifest = Some(t);
        }
    }
    let manifest: serde_json::Value = serde_json::from_str(&manifest.unwrap()).unwrap();
    assert_eq!(manifest.as_array().unwrap().len(), 3);

    // The hollow engine reads the archive back.
    let rt = HollowRuntime::new();
    let (_, s) = store.images_tar(&b, None).unwrap();
    let loaded = rt
        .load_images(
            s.map(|r| r.map_err(|e| kisara_runtime::RuntimeError::Engine(e.to_string())))
                .boxed(),
        )
        .await
        .unwrap();
    assert_eq!(loaded.len(), 3, "{loaded:?}");
}

#[tokio::test]
async fn a_missing_image_fails_the_build_and_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    context(tmp.path(), "FROM scratch\nIMAGE not-here/at-all:1\n");
    let store = Store::open(tmp.path().join("store")).unwrap();
    let e = build(
        &store,
        hollow(),
        &BuildOptions {
            kisarafile: tmp.path().join("Kisarafile"),
            context: tmp.path().to_path_buf(),
            name: BundleName::parse("x").unwrap(),
            build_args: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("not-here/at-all:1"), "{e}");
    assert!(store.list().unwrap().is_empty());

    // A failing RUN names the file and line.
    context(
        tmp.path(),
        "FROM scratch\n\nRUN echo about to fail; exit 3\n",
    );
    let e = build(
        &store,
        hollow(),
        &BuildOptions {
            kisarafile: tmp.path().join("Kisarafile"),
            context: tmp.path().to_path_buf(),
            name: BundleName::parse("x").unwrap(),
            build_args: Default::default(),
        },
        &Quiet,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("Kisarafile:3") && e.contains("exit code 3"),
        "{e}"
    );
}
