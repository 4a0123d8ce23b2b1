//! Instance lifecycle end to end on the real engine: lifetimes, expiry (also across a
//! restart), renewals, quotas under concurrency, dynamic flags in every injection, flags kept
//! out of logs, and AWD games.

mod common;

use std::time::{Duration, Instant};

use common::{TestCluster, IMAGE};
use futures::StreamExt;
use kisara_api::{
    CreateAwdGameRequest, EventQuery, ExecRequest, FlagInjection, FlagSpec, LaunchRequest,
};
use kisara_client::Client;
use kisara_runtime::Runtime;

fn sleeper(owner: &str, module: &str) -> LaunchRequest {
    LaunchRequest {
        image: IMAGE.into(),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        owner: Some(owner.into()),
        module: Some(module.into()),
        memory_mb: Some(32),
        cpus: Some(0.1),
        ..Default::default()
    }
}

async fn sh(client: &Client, id: &str, script: &str) -> kisara_api::ExecResult {
    client
        .exec(
            id,
            &ExecRequest {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout_secs: Some(10),
                ..Default::default()
            },
        )
        .await
        .expect("exec")
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls until the container is unknown to the server, failing at `deadline` (unix seconds).
async fn wait_removed(client: &Client, id: &str, deadline: i64) {
    loop {
        match client.container(id).await {
            Err(e) if e.status() == Some(404) => return,
            _ => {}
        }
        assert!(
            unix_now() <= deadline,
            "container {id} still exists after its removal deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every `instance.expired` of `id` in the store (replayed from the start), read for a moment.
async fn expired_events(client: &Client, id: &str) -> usize {
    let mut stream = client
        .events(&EventQuery {
            kinds: Some("instance.expired".into()),
            since: Some(0),
            ..Default::default()
        })
        .await
        .expect("events");
    let mut n = 0;
    let end = Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(ev)) = tokio::time::timeout_at(end.into(), stream.next()).await {
        let ev = ev.expect("event");
        if ev.container_id.as_deref() == Some(id) {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn an_expired_instance_is_removed_within_seconds_and_reported_once() {
    let cluster = TestCluster::start_with("[instances]\nmax_ttl_secs = 600").await;
    let client = &cluster.client;
    let mut live = client
        .events(&EventQuery {
            kinds: Some("instance.expired".into()),
            ..Default::default()
        })
        .await
        .expect("events");
    let c = client
        .launch(&LaunchRequest {
            ttl_secs: Some(2),
            ..sleeper("team1", "web")
        })
        .await
        .expect("launch");
    let expires_at = c.expires_at.expect("a lifetime");
    assert!(
        (c.created_at + 1..=c.created_at + 3).contains(&expires_at),
        "{c:?}"
    );
    // Still there before its time.
    assert!(client.container(&c.id).await.is_ok());
    wait_removed(client, &c.id, expires_at + 5).await;
    assert!(
        cluster.runtime.inspect(&c.docker_id).await.is_err(),
        "the engine still has the expired container"
    );
    let ev = tokio::time::timeout(Duration::from_secs(5), live.next())
        .await
        .expect("instance.expired arrives")
        .expect("stream open")
        .expect("event");
    assert_eq!(ev.kind, "instance.expired");
    assert_eq!(ev.container_id.as_deref(), Some(c.id.as_str()));
    assert_eq!(ev.owner.as_deref(), Some("team1"));
    assert_eq!(ev.module.as_deref(), Some("web"));
    assert_eq!(expired_events(client, &c.id).await, 1);
    cluster.assert_clean().await;
    cluster.stop().await;
}

#[tokio::test]
async fn expiry_is_kept_across_a_restart() {
    let cluster = TestCluster::start_with("[instances]\ndefault_ttl_secs = 4").await;
    let c = cluster
        .client
        .launch(&sleeper("team1", "web"))
        .await
        .expect("launch");
    let expires_at = c.expires_at.expect("the default lifetime");
    // Down across the moment of expiry: the store remembers it.
    let cluster = cluster.restart().await;
    wait_removed(&cluster.client, &c.id, expires_at.max(unix_now()) + 5).await;
    assert!(cluster.runtime.inspect(&c.docker_id).await.is_err());
    assert_eq!(expired_events(&cluster.client, &c.id).await, 1);
    cluster.assert_clean().await;
    cluster.stop().await;
}

#[tokio::test]
async fn renewals_extend_until_a_limit_answers_409() {
    let cluster = TestCluster::start_with(
        "[instances]\nrenew_secs = 60\nmax_renewals = 1\nmax_ttl_secs = 3600",
    )
    .await;
    let client = &cluster.client;
    let c = client
        .launch(&LaunchRequest {
            ttl_secs: Some(30),
            ..sleeper("team1", "web")
        })
        .await
        .expect("launch");
    let before = c.expires_at.expect("lifetime");
    let e = client.renew(&c.id, Some(61)).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let r = client.renew(&c.id, None).await.expect("renew");
    assert_eq!(r.expires_at, Some(before + 60));
    assert_eq!(r.renewals, 1);
    assert_eq!(
        client.container(&c.id).await.unwrap().expires_at,
        Some(before + 60)
    );
    let e = client.renew(&c.id, None).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
    assert!(e.to_string().contains("maximum of 1"), "{e}");
    let e = client
        .launch(&LaunchRequest {
            ttl_secs: Some(3601),
            ..sleeper("team1", "other")
        })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    client.stop(&c.id).await.expect("destroy");
    cluster.assert_clean().await;
    cluster.stop().await;
}

#[tokio::test]
async fn quotas_hold_under_concurrent_launches() {
    let cluster = TestCluster::start_with(
        "[instances]\nquota_per_owner = 2\none_per_challenge = true\nglobal_cap = 4",
    )
    .await;
    let client = &cluster.client;
    let launches = (0..6).map(|i| {
        let client = client.clone();
        async move { client.launch(&sleeper("t1", &format!("m{i}"))).await }
    });
    let results = futures::future::join_all(launches).await;
    let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok.len(), 2, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.status(), Some(409), "{e}");
        assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
        assert!(e.to_string().contains("quota per owner is 2"), "{e}");
    }
    // Refused launches left nothing behind.
    let listed = client.list_containers(&Default::default()).await.unwrap();
    assert_eq!(listed.items.len(), 2);

    let first = client.launch(&sleeper("t2", "web")).await.expect("t2 web");
    let e = client.launch(&sleeper("t2", "web")).await.unwrap_err();
    assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
    assert!(e.to_string().contains("one per challenge"), "{e}");
    client.launch(&sleeper("t3", "web")).await.expect("t3 web");
    let e = client.launch(&sleeper("t4", "web")).await.unwrap_err();
    assert!(e.to_string().contains("global cap is 4"), "{e}");
    // Room again once one is gone.
    client.stop(&first.id).await.unwrap();
    client.launch(&sleeper("t4", "web")).await.expect("t4 web");
    cluster.cleanup().await;
    cluster.stop().await;
}

fn flag(template: &str, inject: FlagInjection) -> FlagSpec {
    FlagSpec {
        template: template.into(),
        inject,
    }
}

#[tokio::test]
async fn flags_are_injected_by_env_file_and_exec() {
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let req = LaunchRequest {
        flags: vec![
            flag(
                "flag{[team_hash]}",
                FlagInjection::Env {
                    name: "MY_FLAG".into(),
                },
            ),
            flag(
                "file{[uuid]}",
                FlagInjection::File {
                    path: "/srv/flag".into(),
                    mode: 0o400,
                },
            ),
            flag(
                "exec{[random:16]}",
                FlagInjection::Exec {
                    command: "echo \"$flag\" > /tmp/exec_flag".into(),
                    timeout_secs: 10,
                },
            ),
        ],
        ..sleeper("team1", "web")
    };
    let c = client.launch(&req).await.expect("launch");
    let flags = c.flags.clone().expect("admin callers get the flags");
    assert_eq!(flags.len(), 3);
    assert_eq!(flags[0].target, "env:MY_FLAG");
    assert!(flags[0].value.starts_with("flag{") && flags[0].value.len() == 38);
    assert_eq!(flags[1].target, "file:/srv/flag");
    assert_eq!(flags[2].target, "exec");
    assert_eq!(
        sh(client, &c.id, "printf %s \"$MY_FLAG\"").await.stdout,
        flags[0].value
    );
    assert_eq!(
        sh(client, &c.id, "cat /srv/flag").await.stdout,
        flags[1].value
    );
    assert_eq!(
        sh(client, &c.id, "stat -c %a /srv/flag")
            .await
            .stdout
            .trim(),
        "400"
    );
    assert_eq!(
        sh(client, &c.id, "cat /tmp/exec_flag").await.stdout.trim(),
        flags[2].value
    );
    // Inspect shows them again; a relaunch for the same owner and challenge gets the same
    // team_hash flag, another owner another one.
    assert_eq!(
        client.container(&c.id).await.unwrap().flags,
        Some(flags.clone())
    );
    client.stop(&c.id).await.unwrap();
    let again = client.launch(&req).await.expect("relaunch");
    assert_eq!(again.flags.as_ref().unwrap()[0].value, flags[0].value);
    assert_ne!(again.flags.as_ref().unwrap()[1].value, flags[1].value);
    let other = client
        .launch(&LaunchRequest {
            owner: Some("team2".into()),
            ..req.clone()
        })
        .await
        .expect("team2");
    assert_ne!(other.flags.as_ref().unwrap()[0].value, flags[0].value);
    client.stop(&again.id).await.unwrap();
    client.stop(&other.id).await.unwrap();

    // Kisara's shape: `flag` + `flag_command`.
    let k = client
        .launch(&LaunchRequest {
            flag: Some(kisara_api::agent::Secret("flag{fixed}".into())),
            flag_command: Some("echo \"$flag\" > /flag".into()),
            ..sleeper("team1", "kisara")
        })
        .await
        .expect("kisara shape");
    assert_eq!(
        sh(client, &k.id, "cat /flag").await.stdout.trim(),
        "flag{fixed}"
    );
    client.stop(&k.id).await.unwrap();

    // A failing flag command fails the launch, with the flag masked, and leaves nothing.
    let e = client
        .launch(&LaunchRequest {
            flags: vec![flag(
                "flag{oops-secret}",
                FlagInjection::Exec {
                    command: "echo \"$flag\" >&2; exit 3".into(),
                    timeout_secs: 5,
                },
            )],
            ..sleeper("team1", "broken")
        })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("code 3") && msg.contains("***"), "{msg}");
    assert!(!msg.contains("oops-secret"), "{msg}");
    cluster.assert_clean().await;
    cluster.stop().await;
}

#[tokio::test]
async fn awd_gameboxes_share_a_network_rotate_and_reset() {
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let name = format!("g{}", &cluster.cluster_id[..6]);
    let game = client
        .create_awd_game(&CreateAwdGameRequest {
            name: name.clone(),
            image: IMAGE.into(),
            teams: vec!["t1".into(), "t2".into()],
            flag: flag(
                "flag{[team_hash]}",
                FlagInjection::Exec {
                    command: "echo \"$flag\" > /flag".into(),
                    timeout_secs: 10,
                },
            ),
            ports: vec!["8080/tcp".into()],
            cmd: Some(
                ["nc", "-ll", "-p", "8080", "-e", "cat", "/flag"]
                    .map(String::from)
                    .to_vec(),
            ),
            env: Default::default(),
            node: None,
            memory_mb: Some(32),
            cpus: Some(0.1),
        })
        .await
        .expect("create game");
    assert_eq!(game.gameboxes.len(), 2);
    let flags = game.flags.clone().expect("admin sees flags");
    let boxes: std::collections::BTreeMap<_, _> = game
        .gameboxes
        .iter()
        .map(|b| (b.team.clone(), b.clone()))
        .collect();
    for (team, b) in &boxes {
        assert_eq!(
            sh(client, &b.container_id, "cat /flag").await.stdout.trim(),
            flags[team]
        );
    }
    // Gameboxes reach each other on the game network: t1 reads t2's flag service.
    let t2_ip = boxes["t2"].ip_address.clone().expect("t2 address");
    let probe = format!("nc -w 3 {t2_ip} 8080 </dev/null");
    let r = sh(client, &boxes["t1"].container_id, &probe).await;
    assert_eq!(r.stdout.trim(), flags["t2"], "{r:?}");

    let rotated = client.rotate_awd_flags(&name).await.expect("rotate");
    assert!(rotated.errors.is_empty(), "{:?}", rotated.errors);
    for (team, b) in &boxes {
        let new = &rotated.flags[team];
        assert_ne!(new, &flags[team]);
        assert_eq!(
            sh(client, &b.container_id, "cat /flag").await.stdout.trim(),
            new
        );
    }

    // Reset: a new container with the same name and address, holding the current flag.
    sh(client, &boxes["t2"].container_id, "rm /flag").await;
    let after = client.reset_awd_gamebox(&name, "t2").await.expect("reset");
    let t2 = after.gameboxes.iter().find(|b| b.team == "t2").unwrap();
    assert_ne!(t2.container_id, boxes["t2"].container_id);
    assert_eq!(t2.ip_address.as_deref(), Some(t2_ip.as_str()));
    assert_eq!(t2.name, boxes["t2"].name);
    assert_eq!(
        sh(client, &t2.container_id, "cat /flag")
            .await
            .stdout
            .trim(),
        rotated.flags["t2"]
    );
    assert_eq!(after.flags.unwrap()["t2"], rotated.flags["t2"]);

    client.delete_awd_game(&name).await.expect("delete");
    assert!(client.awd_game(&name).await.is_err());
    cluster.assert_clean().await;
    cluster.stop().await;
}

/// Everything the process logs, at every level, into memory.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn flags_never_appear_in_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    // Everything at trace, but for the body-logging libraries that the binary caps too.
    let mut filter = tracing_subscriber::EnvFilter::new("trace");
    for d in kisara_server::flags::quiet_directives() {
        filter = filter.add_directive(d.parse().unwrap());
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .try_init()
        .expect("this test owns the process's subscriber (nextest runs each test alone)");
    let cluster = TestCluster::start().await;
    let client = &cluster.client;
    let c = client
        .launch(&LaunchRequest {
            ttl_secs: Some(2),
            flags: vec![
                flag(
                    "envflag{[uuid]}",
                    FlagInjection::Env {
                        name: "FLAG".into(),
                    },
                ),
                flag(
                    "fileflag{[uuid]}",
                    FlagInjection::File {
                        path: "/flag".into(),
                        mode: 0o444,
                    },
                ),
                flag(
                    "execflag{[uuid]}",
                    FlagInjection::Exec {
                        command: "echo \"$flag\" > /tmp/f".into(),
                        timeout_secs: 10,
                    },
                ),
            ],
            ..sleeper("team1", "web")
        })
        .await
        .expect("launch");
    let values: Vec<String> = c.flags.unwrap().into_iter().map(|f| f.value).collect();
    // A failing flag command echoes its flag to stderr, which the error then carries.
    let _ = client
        .launch(&LaunchRequest {
            flags: vec![flag(
                "failflag{[uuid]}",
                FlagInjection::Exec {
                    command: "echo \"$flag\" >&2; exit 1".into(),
                    timeout_secs: 5,
                },
            )],
            ..sleeper("team1", "broken")
        })
        .await
        .unwrap_err();
    // Expiry runs through the logging paths too.
    wait_removed(client, &c.id, unix_now() + 10).await;
    cluster.stop().await;
    let logs = capture.text();
    // Positive control: the capture saw the launch and the expiry.
    assert!(logs.contains("container launched"), "nothing captured");
    assert!(logs.contains("instance expired"), "expiry not captured");
    let leaks: Vec<&str> = logs
        .lines()
        .filter(|l| {
            values.iter().any(|v| l.contains(v.as_str()))
                || ["envflag{", "fileflag{", "execflag{", "failflag{"]
                    .iter()
                    .any(|m| l.contains(m))
        })
        .map(|l| &l[..l.len().min(400)])
        .collect();
    assert!(
        leaks.is_empty(),
        "flags leaked into the logs:\n{}",
        leaks.join("\n")
    );
}
