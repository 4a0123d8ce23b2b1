//! Multi-container services end to end against the real Docker Engine: a three-container
//! compose file comes up healthy in dependency order, its containers reach each other by
//! service name (and only where their networks say), only the declared port is published,
//! stop removes everything; bad input and a failure mid-launch leave nothing behind.

mod common;

use std::collections::BTreeMap;

use common::*;
use kisara_api::{
    ContainerFilter, ContainerState, ExecRequest, FlagInjection, HealthState, NetworkFilter,
    ServiceConfig, ServiceFilter, ServiceFlagSpec, ServiceRequest, ServiceState,
};

/// db answers `db-ok`; api answers `api-ok` and relays db (by name, over the internal `back`
/// network); web serves HTTP and is the only one with a published port. Each has a
/// healthcheck, and each waits for the one below it to be healthy.
const THREE: &str = r#"
name: chal
x-base: &base
  image: kisara-test/busybox:latest
  read_only: true
  tmpfs: ["/tmp:size=4m"]
services:
  web:
    <<: *base
    command: ["httpd", "-f", "-p", "80", "-h", "/www"]
    ports: ["8080:80"]
    environment:
      GREETING: ${GREETING:-hello}
      TEAM: ${TEAM}
    depends_on:
      api: {condition: service_healthy}
    healthcheck:
      test: ["CMD-SHELL", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 80 | grep -q HTTP"]
      interval: 1s
      timeout: 2s
      retries: 30
  api:
    <<: *base
    command: ["nc", "-ll", "-p", "8080", "-e", "sh", "-c", "echo api-ok; nc -w 2 db 5432"]
    expose: ["8080"]
    networks: [default, back]
    depends_on:
      db: {condition: service_healthy}
    healthcheck:
      test: nc -w 2 127.0.0.1 8080 </dev/null | grep -q api-ok
      interval: 1s
      retries: 30
  db:
    <<: *base
    command: ["nc", "-ll", "-p", "5432", "-e", "echo", "db-ok"]
    networks:
      back:
        aliases: [database]
    healthcheck:
      test: ["CMD-SHELL", "nc -w 2 127.0.0.1 5432 </dev/null | grep -q db-ok"]
      interval: 1s
      retries: 30
    mem_limit: 64m
    pids_limit: 32
networks:
  back:
    internal: true
"#;

fn compose(text: &str, owner: &str) -> ServiceRequest {
    ServiceRequest {
        compose: Some(text.to_string()),
        owner: Some(owner.to_string()),
        module: Some("svc".to_string()),
        env: BTreeMap::from([("TEAM".to_string(), "t42".to_string())]),
        ..Default::default()
    }
}

async fn sh(k: &TestCluster, container_id: &str, script: &str) -> (Option<i64>, String) {
    let r = k
        .client
        .exec(
            container_id,
            &ExecRequest {
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout_secs: Some(20),
                ..Default::default()
            },
        )
        .await
        .expect("exec");
    (r.exit_code, format!("{}{}", r.stdout, r.stderr))
}

/// Nothing of the cluster's left: engine objects, service rows, container rows, networks and
/// subnets (beyond the warm pool's spares).
async fn assert_nothing_left(k: &TestCluster, subnets_before: usize) {
    k.assert_clean().await;
    let services = k
        .client
        .list_services(&ServiceFilter::default())
        .await
        .unwrap();
    assert!(
        services.items.is_empty(),
        "services left: {:?}",
        services.items
    );
    let containers = k
        .client
        .list_containers(&ContainerFilter {
            all: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        containers.items.is_empty(),
        "container rows left: {:?}",
        containers.items
    );
    let networks = k
        .client
        .list_networks_filtered(&NetworkFilter::default())
        .await
        .unwrap();
    assert!(
        networks.items.is_empty(),
        "networks left: {:?}",
        networks.items
    );
    let subnets = subnet_count(k);
    assert!(
        subnets <= subnets_before,
        "subnets still allocated: {subnets} > {subnets_before}"
    );
}

/// A second connection to the server's store (SQLite in WAL mode allows it).
fn store(k: &TestCluster) -> kisara_store::Store {
    kisara_store::Store::open(&k.data_dir.join(kisara_server::STORE_FILE)).expect("store")
}

/// Allocated subnets but the warm pool's (spares come and go in the background).
fn subnet_count(k: &TestCluster) -> usize {
    let store = store(k);
    let spares: std::collections::HashSet<String> = store
        .list_networks(None)
        .unwrap()
        .into_iter()
        .filter(|n| n.owned_by.is_none())
        .map(|n| n.subnet)
        .collect();
    store
        .subnet_allocations()
        .unwrap()
        .into_iter()
        .filter(|a| a.holder != kisara_store::EXTERNAL_HOLDER)
        .filter(|a| !spares.contains(&a.subnet.to_string()))
        .count()
}

fn events_of(k: &TestCluster, kind: &str, service_id: &str) -> usize {
    store(k)
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == kind && e.data["service_id"] == service_id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_container_compose_comes_up_healthy_reaches_by_name_and_goes_away() {
    let k = TestCluster::start().await;
    let before = subnet_count(&k);
    let s = k
        .client
        .launch_service(&compose(THREE, "team7"))
        .await
        .expect("service up");
    assert_eq!(s.name, "chal");
    assert_eq!(s.state, ServiceState::Running, "{s:#?}");
    let order: Vec<&str> = s.containers.iter().map(|c| c.service.as_str()).collect();
    assert_eq!(order, ["db", "api", "web"], "start order");
    for c in &s.containers {
        assert_eq!(c.state, ContainerState::Running, "{c:?}");
        assert_eq!(c.health, Some(HealthState::Healthy), "{c:?}");
    }
    let by = |name: &str| s.containers.iter().find(|c| c.service == name).unwrap();
    let (web, api, db) = (by("web"), by("api"), by("db"));

    // Only the declared port is published, on a port Kisara chose (not the file's 8080).
    assert!(api.ports.is_empty() && db.ports.is_empty(), "{s:#?}");
    assert_eq!(web.ports.len(), 1);
    let p = &web.ports[0];
    assert_eq!(p.container_port, 80);
    assert_eq!(s.host_port, format!("{}:{}", p.public_host, p.public_port));
    let answer = http_get(&p.public_host, p.public_port).await;
    assert!(answer.contains("HTTP"), "web does not answer: {answer:?}");
    for c in [api, db] {
        let bindings = &docker_inspect(&c.docker_id)["HostConfig"]["PortBindings"];
        assert!(
            bindings.is_null() || bindings.as_object().is_some_and(|m| m.is_empty()),
            "{} publishes {bindings}",
            c.service
        );
    }

    // By service name: web → api → db (api relays db over `back`).
    let (code, out) = sh(&k, &web.id, "nc -w 3 api 8080 </dev/null").await;
    assert!(
        out.contains("api-ok") && out.contains("db-ok"),
        "web → api → db: {code:?} {out:?}"
    );
    // The alias works on its network; web is not on `back`, so db is out of its reach (the
    // positive control is api reaching it above and here).
    let (_, out) = sh(&k, &api.id, "nc -w 3 database 5432 </dev/null").await;
    assert!(out.contains("db-ok"), "api → database alias: {out:?}");
    let (code, out) = sh(&k, &web.id, "nc -w 2 db 5432 </dev/null").await;
    assert!(
        !out.contains("db-ok") && code != Some(0),
        "web reached db: {code:?} {out:?}"
    );

    // Interpolation and merge keys reached the containers.
    let (_, out) = sh(&k, &web.id, "echo $GREETING-$TEAM").await;
    assert_eq!(out.trim(), "hello-t42");
    let inspect = docker_inspect(&web.docker_id);
    assert_eq!(
        inspect["HostConfig"]["ReadonlyRootfs"], true,
        "read_only from the anchor"
    );
    assert_eq!(
        inspect["Config"]["Labels"]["io.kisara.service"],
        s.id.as_str()
    );
    assert_eq!(
        docker_inspect(&db.docker_id)["HostConfig"]["Memory"],
        64 << 20
    );
    assert!(
        s.networks.len() == 2 && s.networks.iter().all(|n| n.owned),
        "{:?}",
        s.networks
    );

    // List and inspect show state and health; filters apply.
    let list = k
        .client
        .list_services(&ServiceFilter {
            owner: Some("team7".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].state, ServiceState::Running);
    let none = k
        .client
        .list_services(&ServiceFilter {
            owner: Some("nobody".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(none.items.is_empty());
    let again = k.client.service(&s.id).await.unwrap();
    assert!(again
        .containers
        .iter()
        .all(|c| c.health == Some(HealthState::Healthy)));
    // Its containers are ordinary Kisara containers too.
    let cs = k
        .client
        .list_containers(&ContainerFilter {
            owner: Some("team7".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cs.items.len(), 3);
    assert_eq!(events_of(&k, "service.start", &s.id), 1);

    // A container removed behind Kisara's back shows.
    std::process::Command::new("docker")
        .args(["rm", "-f", &db.docker_id])
        .output()
        .expect("docker rm");
    let degraded = k.client.service(&s.id).await.unwrap();
    assert_eq!(degraded.state, ServiceState::Degraded);
    assert_eq!(
        degraded
            .containers
            .iter()
            .find(|c| c.service == "db")
            .unwrap()
            .state,
        ContainerState::Gone
    );

    // Down removes all of it, once.
    k.client.remove_service(&s.id).await.expect("down");
    assert_nothing_left(&k, before).await;
    assert_eq!(events_of(&k, "service.stop", &s.id), 1);
    let err = k.client.remove_service(&s.id).await.unwrap_err();
    assert_eq!(err.status(), Some(404));
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_by_name_and_makes_nothing() {
    let k = TestCluster::start().await;
    let before = subnet_count(&k);
    let refused = |text: &str| compose(text, "team1");
    for (text, needle) in [
        ("services:\n  web:\n    image: kisara-test/busybox\n    privileged_mode: true\n", "privileged_mode"),
        ("services:\n  web:\n    image: kisara-test/busybox\n    deploy: {replicas: 3}\n", "deploy"),
        ("services:\n  a:\n    image: kisara-test/busybox\n    depends_on: [b]\n  b:\n    image: kisara-test/busybox\n    depends_on: [a]\n", "cycle"),
        ("services:\n  web:\n    image: ${IMAGE:?set IMAGE}\n", "set IMAGE"),
        ("services:\n  web:\n    image: kisara-test/busybox\n    volumes: [\"/:/host\"]\n", "volumes"),
    ] {
        let e = k.client.launch_service(&refused(text)).await.unwrap_err();
        assert_eq!(e.status(), Some(400), "{text}: {e}");
        assert!(e.to_string().contains(needle), "{text}: {e}");
    }
    // Kisara's ServiceConfig: a bad total names its check.
    let config: ServiceConfig = serde_json::from_value(serde_json::json!({
        "containers": [{"image": "kisara-test/busybox", "cmd": ["sleep", "60"],
                        "flags": [{"flag_command": "true", "flag_score": 100, "flag_uuid": "f1"}]}],
        "total_score": 150, "network_count": 0, "container_count": 1
    }))
    .unwrap();
    let e = k
        .client
        .launch_service(&ServiceRequest {
            config: Some(config),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("total_score"), "{e}");
    assert_nothing_left(&k, before).await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_mid_launch_removes_everything_it_made() {
    let k = TestCluster::start().await;
    let before = subnet_count(&k);
    // db comes up (and is healthy) before web fails: its image is not on the node.
    let text = r#"
services:
  db:
    image: kisara-test/busybox:latest
    command: ["nc", "-ll", "-p", "5432", "-e", "echo", "db-ok"]
    networks: [back, default]
  web:
    image: kisara-test/no-such-image:latest
    depends_on: [db]
networks:
  back: {}
"#;
    let e = k
        .client
        .launch_service(&compose(text, "team2"))
        .await
        .unwrap_err();
    assert!(matches!(e.status(), Some(404) | Some(409)), "{e}");
    assert!(
        e.to_string().contains("web"),
        "the error names the service: {e}"
    );
    assert_nothing_left(&k, before).await;

    // A dependency that never turns healthy fails the launch within its health timeout.
    let text = r#"
services:
  db:
    image: kisara-test/busybox:latest
    command: ["sleep", "600"]
    healthcheck: {test: "exit 1", interval: 500ms, retries: 1}
  web:
    image: kisara-test/busybox:latest
    command: ["sleep", "600"]
    depends_on: {db: {condition: service_healthy}}
"#;
    let mut req = compose(text, "team2");
    req.health_timeout_secs = Some(20);
    let e = k.client.launch_service(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("unhealthy"), "{e}");
    assert_nothing_left(&k, before).await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kisara_service_config_launches_with_its_flags() {
    let k = TestCluster::start().await;
    let before = subnet_count(&k);
    let config: ServiceConfig = serde_json::from_value(serde_json::json!({
        "containers": [
            {"name": "web", "image": "kisara-test/busybox:latest",
             "cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
             "ports": [{"port": 80, "protocol": "tcp"}],
             "networks": [{"network": "A", "random_cidr": true}],
             "flags": [{"flag_command": "echo flag{svc-test} > /tmp/flag", "flag_score": 100, "flag_uuid": "f1"}],
             "env": {"ROLE": "web"}},
            {"name": "db", "image": "kisara-test/busybox:latest",
             "cmd": ["nc", "-ll", "-p", "5432", "-e", "echo", "db-ok"],
             "networks": [{"network": "A", "random_cidr": true}]}
        ],
        "total_score": 100, "network_count": 1, "container_count": 2
    }))
    .unwrap();
    let s = k
        .client
        .launch_service(&ServiceRequest {
            config: Some(config),
            owner: Some("9".into()),
            module: Some("pwn".into()),
            ..Default::default()
        })
        .await
        .expect("service up");
    assert_eq!(s.state, ServiceState::Running, "{s:#?}");
    let web = s.containers.iter().find(|c| c.service == "web").unwrap();
    assert_eq!(web.ports.len(), 1);
    let (_, out) = sh(
        &k,
        &web.id,
        "cat /tmp/flag; echo $ROLE; nc -w 3 db 5432 </dev/null",
    )
    .await;
    assert!(
        out.contains("flag{svc-test}") && out.contains("web") && out.contains("db-ok"),
        "{out:?}"
    );
    k.client.remove_service(&s.id).await.expect("down");
    assert_nothing_left(&k, before).await;
    k.stop().await;
}

/// Events of `kind` that name `id` as their service or their instance.
fn events_naming(k: &TestCluster, kind: &str, id: &str) -> usize {
    store(k)
        .events_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == kind && (e.data["service_id"] == id || e.data["instance"] == id))
        .count()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Polls until the service is unknown to the server, failing after `deadline` (unix seconds).
async fn wait_service_gone(k: &TestCluster, id: &str, deadline: i64) {
    loop {
        match k.client.service(id).await {
            Err(e) if e.status() == Some(404) => return,
            _ => {}
        }
        assert!(
            unix_now() <= deadline,
            "service {id} still exists after its removal deadline"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn service_flag(container: &str, template: &str, inject: FlagInjection) -> ServiceFlagSpec {
    ServiceFlagSpec {
        container: Some(container.into()),
        template: template.into(),
        inject,
    }
}

/// web has a read-only root; db a writable one.
const PAIR: &str = r#"
services:
  web:
    image: kisara-test/busybox:latest
    command: ["sleep", "600"]
    read_only: true
  db:
    image: kisara-test/busybox:latest
    command: ["sleep", "600"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_take_flags_lifetimes_renewals_and_quotas() {
    let k = TestCluster::start_with(
        "[instances]\nmax_ttl_secs = 600\nrenew_secs = 60\nmax_renewals = 1\none_per_challenge = true",
    )
    .await;
    let before = subnet_count(&k);
    let req = ServiceRequest {
        ttl_secs: Some(30),
        flags: vec![
            // A file flag under a read-only root: written before the start.
            service_flag(
                "web",
                "flag{[team_hash]}",
                FlagInjection::File {
                    path: "/flag".into(),
                    mode: 0o444,
                },
            ),
            service_flag(
                "db",
                "env{[uuid]}",
                FlagInjection::Env {
                    name: "DB_FLAG".into(),
                },
            ),
            service_flag(
                "db",
                "exec{[random:16]}",
                FlagInjection::Exec {
                    command: "echo \"$flag\" > /tmp/exec_flag".into(),
                    timeout_secs: 10,
                },
            ),
        ],
        ..compose(PAIR, "team1")
    };
    let s = k.client.launch_service(&req).await.expect("service up");
    let flags = s.flags.clone().expect("admin callers get the flags");
    let value = |target: &str| {
        flags
            .iter()
            .find(|f| f.target == target)
            .unwrap_or_else(|| panic!("no flag {target} in {flags:?}"))
            .value
            .clone()
    };
    assert_eq!(flags.len(), 3, "{flags:?}");
    let web = s.containers.iter().find(|c| c.service == "web").unwrap();
    let db = s.containers.iter().find(|c| c.service == "db").unwrap();
    let (code, out) = sh(&k, &web.id, "cat /flag; echo; stat -c %a /flag").await;
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out, format!("{}\n444\n", value("web/file:/flag")));
    // The root stays read-only.
    assert_eq!(
        docker_inspect(&web.docker_id)["HostConfig"]["ReadonlyRootfs"],
        true
    );
    let (code, _) = sh(&k, &web.id, "touch /x").await;
    assert_ne!(code, Some(0), "the read-only root took a write");
    let files_image = docker_inspect(&web.docker_id)["Config"]["Labels"]["io.kisara.files-image"]
        .as_str()
        .expect("the flag-file image is labelled")
        .to_string();
    let (_, out) = sh(&k, &db.id, "printf %s \"$DB_FLAG\"; cat /tmp/exec_flag").await;
    assert_eq!(
        out,
        format!("{}{}\n", value("db/env:DB_FLAG"), value("db/exec"))
    );

    // Lifetime, shown by inspect with the flags.
    let expires_at = s.expires_at.expect("a lifetime");
    assert!(
        (s.created_at + 29..=s.created_at + 31).contains(&expires_at),
        "{s:?}"
    );
    let got = k.client.service(&s.id).await.unwrap();
    assert_eq!(got.expires_at, Some(expires_at));
    assert_eq!(got.flags, Some(flags.clone()));

    // One per (owner, challenge): refused whole, nothing made.
    let e = k.client.launch_service(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(e.code(), Some("quota_exceeded"), "{e}");
    assert!(e.to_string().contains("one per challenge"), "{e}");
    let listed = k.client.list_services(&ServiceFilter::default()).await;
    assert_eq!(listed.unwrap().items.len(), 1);
    assert_eq!(
        k.client
            .list_containers(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        2
    );

    // A flag for a container the service does not have is a 400 naming it.
    let mut bad = compose(PAIR, "team2");
    bad.flags = vec![service_flag("cache", "x", FlagInjection::default())];
    let e = k.client.launch_service(&bad).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("\"cache\""), "{e}");

    // Renewals: one allowed, the next refused with the limit named.
    let r = k.client.renew_service(&s.id, None).await.expect("renew");
    assert_eq!(r.renewals, 1);
    assert!(r.expires_at.unwrap() > expires_at, "{r:?}");
    let e = k.client.renew_service(&s.id, None).await.unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert_eq!(e.code(), Some("quota_exceeded"), "{e}");

    // Destroy: everything goes, the flag-file image too; service.start and .stop once each.
    k.client.remove_service(&s.id).await.expect("down");
    let e = k.client.remove_service(&s.id).await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert_eq!(events_naming(&k, "service.start", &s.id), 1);
    assert_eq!(events_naming(&k, "service.stop", &s.id), 1);
    let image_left = std::process::Command::new("docker")
        .args(["image", "inspect", &files_image])
        .output()
        .expect("docker CLI");
    assert!(
        !image_left.status.success(),
        "the flag-file image outlived its container"
    );
    assert_nothing_left(&k, before).await;
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_service_is_removed_whole_and_reported_once_also_across_a_restart() {
    let k = TestCluster::start_with("[instances]\nmax_ttl_secs = 600").await;
    let before = subnet_count(&k);
    let s = k
        .client
        .launch_service(&ServiceRequest {
            ttl_secs: Some(2),
            ..compose(PAIR, "team1")
        })
        .await
        .expect("service up");
    let expires_at = s.expires_at.expect("a lifetime");
    wait_service_gone(&k, &s.id, expires_at + 5).await;
    assert_nothing_left(&k, before).await;
    assert_eq!(events_naming(&k, "instance.expired", &s.id), 1);
    assert_eq!(events_naming(&k, "service.start", &s.id), 1);
    assert_eq!(events_naming(&k, "service.stop", &s.id), 1);

    // Down across the moment of expiry: the store remembers it.
    let s = k
        .client
        .launch_service(&ServiceRequest {
            ttl_secs: Some(3),
            ..compose(PAIR, "team1")
        })
        .await
        .expect("service up");
    let expires_at = s.expires_at.expect("a lifetime");
    let k = k.restart().await;
    wait_service_gone(&k, &s.id, expires_at.max(unix_now()) + 5).await;
    assert_nothing_left(&k, before).await;
    assert_eq!(events_naming(&k, "instance.expired", &s.id), 1);
    assert_eq!(events_naming(&k, "service.stop", &s.id), 1);
    k.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_launch_fires_no_service_events_and_masks_its_flag() {
    let k = TestCluster::start().await;
    let before = subnet_count(&k);
    let mut req = compose(PAIR, "team1");
    req.flags = vec![service_flag(
        "db",
        "flag{svc-oops-secret}",
        FlagInjection::Exec {
            command: "echo \"$flag\" >&2; exit 3".into(),
            timeout_secs: 5,
        },
    )];
    let e = k.client.launch_service(&req).await.unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("db") && msg.contains("code 3") && msg.contains("***"),
        "{msg}"
    );
    assert!(!msg.contains("svc-oops-secret"), "{msg}");
    assert_nothing_left(&k, before).await;
    let all = store(&k).events_after(0, 100_000).unwrap();
    assert!(
        !all.iter()
            .any(|e| e.kind == "service.start" || e.kind == "service.stop"),
        "a failed launch fired service events: {:?}",
        all.iter().map(|e| &e.kind).collect::<Vec<_>>()
    );
    k.stop().await;
}
