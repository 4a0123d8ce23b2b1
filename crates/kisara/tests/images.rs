//! Images: pull with streamed progress from a registry the test runs on loopback (Debian's
//! docker-registry; no outside registry is ever contacted), list, remove.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use kisara_api::{PullProgress, PullRequest};

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn pull(k: &TestCluster, image: &str) -> Vec<PullProgress> {
    let mut s = k
        .client
        .pull_image(&PullRequest {
            image: image.into(),
            ..Default::default()
        })
        .await
        .expect("pull starts");
    let mut lines = Vec::new();
    while let Some(p) = tokio::time::timeout(Duration::from_secs(60), s.next())
        .await
        .expect("pull progress stalled")
    {
        lines.push(p.expect("progress line"));
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_remove_through_kisara() {
    let reg = start_registry();
    let k = TestCluster::start().await;
    let image = format!("{}/kisara-test/pulled:{}", reg.addr, &k.cluster_id[..8]);
    docker(&["tag", IMAGE, &image]);
    docker(&["push", &image]);
    docker(&["rmi", &image]);

    let lines = pull(&k, &image).await;
    let last = lines.last().expect("some progress");
    assert_eq!(last.status, "done", "{lines:?}");
    assert!(lines.len() > 1, "no progress before done: {lines:?}");
    assert!(lines.iter().all(|l| !l.node_id.is_empty()));

    let listed = k.client.list_images(None).await.unwrap();
    assert!(listed
        .items
        .iter()
        .any(|i| i.tags.iter().any(|t| t == &image)));

    k.client
        .remove_image(&image, None, false)
        .await
        .expect("rm");
    let listed = k.client.list_images(None).await.unwrap();
    assert!(!listed
        .items
        .iter()
        .any(|i| i.tags.iter().any(|t| t == &image)));
    let e = k
        .client
        .remove_image(&image, None, false)
        .await
        .expect_err("already gone");
    assert_eq!(e.status(), Some(404), "{e}");

    // A tag the registry does not have: the stream ends with an error line naming it.
    let missing = format!("{}/kisara-test/pulled:missing", reg.addr);
    let lines = pull(&k, &missing).await;
    let last = lines.last().expect("an answer");
    assert_eq!(last.status, "error", "{lines:?}");
    assert!(last.error.as_deref().unwrap_or("").contains("missing") || last.error.is_some());

    // A malformed reference is refused before any node is asked.
    let e = k
        .client
        .pull_image(&PullRequest {
            image: "UPPER/Case Bad".into(),
            ..Default::default()
        })
        .await
        .err()
        .expect("refused");
    assert_eq!(e.status(), Some(400));
    k.stop().await;
}
