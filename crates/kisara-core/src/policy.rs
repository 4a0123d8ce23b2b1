//! The launch policy: turns a user's [`LaunchRequest`] into the exact [`ContainerConfig`] an
//! agent creates, validating every field and applying the hardening defaults that protect
//! operators (see DESIGN.md, "Defaults that protect operators").
//!
//! The agent does no policy of its own, so everything a team could use against a host or
//! another team is decided here, in one pure function with table tests.

use std::collections::BTreeMap;

use kisara_api::agent::ContainerConfig;
use kisara_api::{labels, LaunchRequest};

use crate::config::{ResourceLimits, ServerSettings, MAX_CPUS, MIN_MEMORY_MB};
use crate::ids::is_valid_name;
use crate::ports::parse_ports;
use crate::{CoreError, Result};

/// Capabilities every instance keeps after `cap_drop: ALL`.
///
/// Docker's default set minus three that CTF and AWD ranges should not hand out:
/// * `NET_RAW` — raw sockets allow ARP/ICMP spoofing and sniffing on a shared AWD game network;
///   a team must not be able to poison its neighbours.
/// * `MKNOD` — device nodes are of no use to a challenge and widen the device attack surface.
/// * `SETFCAP` — file capabilities let an exploited process mint privileged binaries.
///
/// What stays is what ordinary challenge images need: `SETUID`/`SETGID` to drop from root to a
/// `ctf` user (su, xinetd, socat wrappers); `CHOWN`, `DAC_OVERRIDE`, `FOWNER`, `FSETID` for
/// entrypoints that place a flag file and fix its ownership and mode; `KILL` for supervisors;
/// `NET_BIND_SERVICE` for services on ports below 1024 run as non-root; `SYS_CHROOT` for
/// xinetd/chroot-based pwn jails; `AUDIT_WRITE` for sshd, login and su via PAM; `SETPCAP` for
/// entrypoints that shrink their own bounding set (capsh, setpriv).
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
];

/// Every Linux capability name Docker understands (without `CAP_`).
pub const KNOWN_CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

/// Security options of every instance: a setuid binary cannot regain what was dropped.
pub const SECURITY_OPT: &[&str] = &["no-new-privileges:true"];

/// What the server knows about a launch beyond the request: identities it generated and where
/// the scheduler put the container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LaunchContext {
    pub cluster_id: String,
    /// Kisara's id of the container being made.
    pub container_id: String,
    pub node_id: String,
    /// Used when the request names none, e.g. from [`crate::ids::container_name`].
    pub generated_name: String,
    /// Docker network to attach to: the container's own network, or the one the request named,
    /// already resolved by the server.
    pub network: Option<String>,
}

/// Validates a launch request and resolves it into what the agent creates.
pub fn container_config(
    req: &LaunchRequest,
    settings: &ServerSettings,
    ctx: &LaunchContext,
) -> Result<ContainerConfig> {
    validate_image_reference(&req.image)?;
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| ctx.generated_name.clone());
    if !is_valid_name(&name) {
        return Err(CoreError::invalid(format!(
            "invalid container name {name:?}: it must match [a-zA-Z0-9][a-zA-Z0-9_.-]* \
             and be at most {} characters",
            crate::ids::MAX_NAME_LEN
        )));
    }
    let ports = parse_ports(&req.ports, req.port_protocol.as_deref())?;
    let env = merge_env(req)?;
    let labels = container_labels(req, ctx)?;

    if req.privileged && !settings.allow_privileged {
        return Err(CoreError::forbidden(
            "privileged containers are not allowed by the server configuration",
        ));
    }
    let cap_add = capabilities(&req.cap_add, &settings.cap_allow)?;
    if !req.binds.is_empty() && !settings.allow_host_binds {
        return Err(CoreError::forbidden(
            "host bind mounts are not allowed by the server configuration",
        ));
    }
    for bind in &req.binds {
        validate_bind(bind)?;
    }

    let memory_mb = req.memory_mb.unwrap_or(settings.defaults.memory_mb);
    check_memory_mb(memory_mb, &settings.limits)?;
    let cpus = req.cpus.unwrap_or(settings.defaults.cpus);
    check_cpus(cpus, &settings.limits)?;
    let pids_limit = req.pids_limit.unwrap_or(settings.defaults.pids_limit);
    check_pids_limit(pids_limit, &settings.limits)?;

    if let Some(user) = &req.user {
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CoreError::invalid(format!("invalid user {user:?}")));
        }
    }
    if let Some(workdir) = &req.workdir {
        if !workdir.starts_with('/') || workdir.chars().any(char::is_control) {
            return Err(CoreError::invalid(format!(
                "invalid workdir {workdir:?}: it must be an absolute path"
            )));
        }
    }

    Ok(ContainerConfig {
        name,
        image: req.image.clone(),
        cmd: req.cmd.clone(),
        entrypoint: req.entrypoint.clone(),
        env,
        labels,
        ports,
        publish_host_ip: settings.publish_host_ip.to_string(),
        network: ctx.network.clone(),
        network_aliases: Vec::new(),
        // Checked above to fit: at most u64 MiB that passed the limit, which is configured in
        // MiB and far below i64::MAX bytes for any real machine; saturate rather than wrap.
        memory_bytes: Some(
            i64::try_from(memory_mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX),
        ),
        nano_cpus: Some((cpus * 1e9).round() as i64),
        pids_limit: Some(pids_limit),
        cap_drop: vec!["ALL".to_string()],
        cap_add,
        security_opt: SECURITY_OPT.iter().map(|s| s.to_string()).collect(),
        init: true,
        privileged: req.privileged,
        binds: req.binds.clone(),
        user: req.user.clone(),
        workdir: req.workdir.clone(),
        read_only: false,
        tmpfs: BTreeMap::new(),
        // Flags' files and fixed addresses are added by the server once it knows them.
        ..Default::default()
    })
}

/// Checks an image reference: `[registry[:port]/]repo/path[:tag][@digest]`, with a lowercase
/// repository (Docker refuses uppercase there) and nothing that could be read as a flag or a
/// second argument by a shell or the Engine API.
pub fn validate_image_reference(reference: &str) -> Result<()> {
    let bad =
        |why: &str| CoreError::invalid(format!("invalid image reference {reference:?}: {why}"));
    if reference.is_empty() {
        return Err(bad("it is empty"));
    }
    if reference.len() > 512 {
        return Err(bad("it is longer than 512 characters"));
    }
    if !reference
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b))
    {
        return Err(bad("only a-z, 0-9 and . _ / : @ - may appear"));
    }
    let (name_tag, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    if let Some(digest) = digest {
        match digest.split_once(':') {
            Some((algo, hex))
                if !algo.is_empty()
                    && algo
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                    && hex.len() >= 32
                    && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {}
            _ => return Err(bad("the digest must look like sha256:<hex>")),
        }
    }
    // A `:` after the last `/` starts the tag; one before it is a registry port.
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (repository, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (
            &name_tag[..last_slash + i],
            Some(&name_tag[last_slash + i + 1..]),
        ),
        None => (name_tag, None),
    };
    if let Some(tag) = tag {
        let first_ok = tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !first_ok || tag.len() > 128 || tag.contains('/') {
            return Err(bad("the tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
    }
    if repository.is_empty() {
        return Err(bad("the repository is empty"));
    }
    if repository.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(bad("the repository must be lowercase"));
    }
    let components: Vec<&str> = repository.split('/').collect();
    for (i, component) in components.iter().enumerate() {
        let is_registry = i == 0 && components.len() > 1;
        let edges_ok = component
            .bytes()
            .next()
            .zip(component.bytes().last())
            .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
        if !edges_ok || (!is_registry && component.contains(':')) {
            return Err(bad(&format!("bad repository component {component:?}")));
        }
    }
    Ok(())
}

/// `env` first, then each `env_mount` map in order, later keys winning (Kisara's behaviour).
/// Messages name keys only: values may be flags.
fn merge_env(req: &LaunchRequest) -> Result<Vec<String>> {
    let mut merged: BTreeMap<&str, &str> = BTreeMap::new();
    for map in std::iter::once(&req.env).chain(req.env_mount.iter()) {
        for (k, v) in map {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(CoreError::invalid(format!(
                    "invalid environment variable name {k:?}"
                )));
            }
            if v.contains('\0') {
                return Err(CoreError::invalid(format!(
                    "environment variable {k} has a NUL byte in its value"
                )));
            }
            merged.insert(k, v);
        }
    }
    Ok(merged
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect())
}

fn container_labels(req: &LaunchRequest, ctx: &LaunchContext) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in &req.labels {
        if k.trim().is_empty() {
            return Err(CoreError::invalid("label keys may not be empty"));
        }
        // Labels are how a node's inventory is rebuilt; a user label could forge ownership.
        if k.to_ascii_lowercase().starts_with(labels::PREFIX) {
            return Err(CoreError::invalid(format!(
                "label {k:?} uses the reserved prefix {:?}",
                labels::PREFIX
            )));
        }
        out.insert(k.clone(), v.clone());
    }
    out.insert(labels::CLUSTER.into(), ctx.cluster_id.clone());
    out.insert(labels::CONTAINER.into(), ctx.container_id.clone());
    out.insert(labels::NODE.into(), ctx.node_id.clone());
    if let Some(owner) = &req.owner {
        out.insert(labels::OWNER.into(), owner.clone());
    }
    if let Some(module) = &req.module {
        out.insert(labels::MODULE.into(), module.clone());
    }
    Ok(out)
}

/// `NET_ADMIN`, `net_admin` and `CAP_NET_ADMIN` are one capability; `ALL` is accepted as a name.
pub fn normalize_capability(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    (bare == "ALL" || KNOWN_CAPABILITIES.contains(&bare)).then(|| bare.to_string())
}

/// The default allow-list plus the requested extras that the server allows.
fn capabilities(requested: &[String], cap_allow: &[String]) -> Result<Vec<String>> {
    let mut caps: Vec<String> = DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect();
    for cap in requested {
        let normalized = normalize_capability(cap)
            .ok_or_else(|| CoreError::invalid(format!("unknown capability {cap:?}")))?;
        if caps.contains(&normalized) {
            continue;
        }
        let allowed = cap_allow.iter().any(|a| a == "ALL" || *a == normalized);
        if !allowed {
            return Err(CoreError::forbidden(format!(
                "capability {normalized} is not allowed by the server configuration (cap_allow)"
            )));
        }
        caps.push(normalized);
    }
    Ok(caps)
}

/// `HOST:CONTAINER[:ro|rw]`, both absolute, no `..` (which would let a path that looks
/// confined escape it).
fn validate_bind(bind: &str) -> Result<()> {
    let bad = |why: &str| CoreError::invalid(format!("invalid bind mount {bind:?}: {why}"));
    let parts: Vec<&str> = bind.split(':').collect();
    let (host, container) = match parts.as_slice() {
        [h, c] => (*h, *c),
        [h, c, "ro" | "rw"] => (*h, *c),
        [_, _, _] => return Err(bad("the mode must be ro or rw")),
        _ => return Err(bad("expected HOST:CONTAINER[:ro|rw]")),
    };
    for path in [host, container] {
        if !path.starts_with('/') {
            return Err(bad("paths must be absolute"));
        }
        if path.split('/').any(|c| c == "..") || path.chars().any(char::is_control) {
            return Err(bad("paths may not contain .. or control characters"));
        }
    }
    Ok(())
}

pub(crate) fn check_memory_mb(memory_mb: u64, limits: &ResourceLimits) -> Result<()> {
    if (MIN_MEMORY_MB..=limits.max_memory_mb).contains(&memory_mb) {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "memory_mb {memory_mb} is out of range {MIN_MEMORY_MB}..={}",
            limits.max_memory_mb
        )))
    }
}

pub(crate) fn check_cpus(cpus: f64, limits: &ResourceLimits) -> Result<()> {
    let max = limits.max_cpus.min(MAX_CPUS);
    // Docker's floor is 0.01 CPU; below it NanoCPUs is refused by the engine anyway.
    if cpus.is_finite() && (0.01..=max).contains(&cpus) {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "cpus {cpus} is out of range 0.01..={max}"
        )))
    }
}

pub(crate) fn check_pids_limit(pids_limit: i64, limits: &ResourceLimits) -> Result<()> {
    if (1..=limits.max_pids_limit).contains(&pids_limit) {
        Ok(())
    } else {
        Err(CoreError::invalid(format!(
            "pids_limit {pids_limit} is out of range 1..={}",
            limits.max_pids_limit
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_api::{PortSpec, Protocol};

    fn ctx() -> LaunchContext {
        LaunchContext {
            cluster_id: "c1".into(),
            container_id: "0123456789ab".into(),
            node_id: "n1".into(),
            generated_name: "kisara-0123456789ab".into(),
            network: Some("kisara-net-0123456789ab".into()),
        }
    }

    fn req(image: &str) -> LaunchRequest {
        LaunchRequest {
            image: image.into(),
            ..Default::default()
        }
    }

    fn launch(r: &LaunchRequest) -> Result<ContainerConfig> {
        container_config(r, &ServerSettings::default(), &ctx())
    }

    #[test]
    fn hardened_defaults() {
        let c = launch(&req("busybox:latest")).unwrap();
        assert_eq!(c.name, "kisara-0123456789ab");
        assert_eq!(c.image, "busybox:latest");
        assert_eq!(c.cap_drop, vec!["ALL"]);
        assert_eq!(c.cap_add, DEFAULT_CAPABILITIES);
        assert!(!c.cap_add.iter().any(|c| c == "NET_RAW" || c == "MKNOD"));
        assert_eq!(c.security_opt, vec!["no-new-privileges:true"]);
        assert_eq!(c.pids_limit, Some(256));
        assert_eq!(c.memory_bytes, Some(512 * 1024 * 1024));
        assert_eq!(c.nano_cpus, Some(1_000_000_000));
        assert!(c.init && !c.privileged && c.binds.is_empty());
        assert_eq!(c.publish_host_ip, "0.0.0.0");
        assert_eq!(c.network.as_deref(), Some("kisara-net-0123456789ab"));
        assert_eq!(c.labels[labels::CLUSTER], "c1");
        assert_eq!(c.labels[labels::CONTAINER], "0123456789ab");
        assert_eq!(c.labels[labels::NODE], "n1");
        assert!(!c.labels.contains_key(labels::OWNER));
    }

    #[test]
    fn resolves_a_full_request() {
        let mut r = req("registry.local:5000/ctf/web:V1.2");
        r.name = Some("web-1".into());
        r.owner = Some("42".into());
        r.module = Some("web".into());
        r.ports = vec!["80".into()];
        r.port_protocol = Some("80/tcp,53/udp".into());
        r.env = BTreeMap::from([("A".into(), "1".into()), ("FLAG".into(), "old".into())]);
        r.env_mount = vec![BTreeMap::from([("FLAG".into(), "flag{x}".into())])];
        r.labels = BTreeMap::from([("team".into(), "red".into())]);
        r.memory_mb = Some(128);
        r.cpus = Some(0.5);
        r.pids_limit = Some(64);
        r.cap_add = vec!["cap_chown".into()];
        r.user = Some("1000:1000".into());
        r.workdir = Some("/srv".into());
        let c = launch(&r).unwrap();
        assert_eq!(c.name, "web-1");
        assert_eq!(
            c.ports,
            vec![
                PortSpec {
                    port: 80,
                    protocol: Protocol::Tcp
                },
                PortSpec {
                    port: 53,
                    protocol: Protocol::Udp
                }
            ]
        );
        assert_eq!(c.env, vec!["A=1", "FLAG=flag{x}"]);
        assert_eq!(c.labels["team"], "red");
        assert_eq!(c.labels[labels::OWNER], "42");
        assert_eq!(c.labels[labels::MODULE], "web");
        assert_eq!(c.memory_bytes, Some(128 << 20));
        assert_eq!(c.nano_cpus, Some(500_000_000));
        assert_eq!(c.pids_limit, Some(64));
        assert_eq!(c.cap_add, DEFAULT_CAPABILITIES, "CHOWN is already there");
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
    }

    #[test]
    fn image_references() {
        let ok = [
            "busybox",
            "busybox:latest",
            "library/busybox:1.36",
            "ghcr.io/org/app:v1",
            "localhost:5000/app",
            "localhost:5000/app:Tag_1",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "app:1@sha256:0123456789abcdef0123456789abcdef",
        ];
        for image in ok {
            assert_eq!(validate_image_reference(image), Ok(()), "{image}");
        }
        let bad = [
            "",
            "Busybox",
            "busy box",
            "busybox\n",
            "-rm",
            "busybox:",
            "busybox:-x",
            "a//b",
            "/a",
            "a/",
            "app@sha256:xyz",
            "app@",
            "ctf/Web:1",
            "a;rm",
            "a/b:c/d",
        ];
        for image in bad {
            match validate_image_reference(image) {
                Err(CoreError::Invalid(msg)) => {
                    assert!(msg.contains(&format!("{image:?}")), "{msg}")
                }
                other => panic!("{image:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejections() {
        type Tweak = fn(&mut LaunchRequest);
        type Class = fn(&CoreError) -> bool;
        let cases: Vec<(&str, Tweak, Class, &str)> = vec![
            (
                "bad image",
                |r| r.image = "UPPER".into(),
                is_invalid,
                "UPPER",
            ),
            (
                "bad name",
                |r| r.name = Some("-x".into()),
                is_invalid,
                "\"-x\"",
            ),
            (
                "bad port",
                |r| r.ports = vec!["0".into()],
                is_invalid,
                "\"0\"",
            ),
            (
                "bad port_protocol",
                |r| r.port_protocol = Some("80/icmp".into()),
                is_invalid,
                "icmp",
            ),
            (
                "env key",
                |r| {
                    r.env.insert("A=B".into(), "v".into());
                },
                is_invalid,
                "A=B",
            ),
            (
                "reserved label",
                |r| {
                    r.labels.insert("io.kisara.owner".into(), "x".into());
                },
                is_invalid,
                "io.kisara.owner",
            ),
            (
                "reserved label case",
                |r| {
                    r.labels.insert("IO.Kisara.node".into(), "x".into());
                },
                is_invalid,
                "IO.Kisara.node",
            ),
            (
                "privileged",
                |r| r.privileged = true,
                is_forbidden,
                "privileged containers are not allowed by the server configuration",
            ),
            (
                "cap not allowed",
                |r| r.cap_add = vec!["NET_ADMIN".into()],
                is_forbidden,
                "NET_ADMIN",
            ),
            (
                "NET_RAW not default",
                |r| r.cap_add = vec!["net_raw".into()],
                is_forbidden,
                "NET_RAW",
            ),
            (
                "unknown cap",
                |r| r.cap_add = vec!["FLY".into()],
                is_invalid,
                "FLY",
            ),
            (
                "binds",
                |r| r.binds = vec!["/etc:/x".into()],
                is_forbidden,
                "bind",
            ),
            (
                "memory low",
                |r| r.memory_mb = Some(1),
                is_invalid,
                "memory_mb 1",
            ),
            (
                "memory high",
                |r| r.memory_mb = Some(1 << 40),
                is_invalid,
                "memory_mb",
            ),
            ("cpus zero", |r| r.cpus = Some(0.0), is_invalid, "cpus 0"),
            (
                "cpus negative",
                |r| r.cpus = Some(-1.0),
                is_invalid,
                "cpus -1",
            ),
            (
                "cpus nan",
                |r| r.cpus = Some(f64::NAN),
                is_invalid,
                "cpus NaN",
            ),
            ("cpus high", |r| r.cpus = Some(65.0), is_invalid, "cpus 65"),
            (
                "pids zero",
                |r| r.pids_limit = Some(0),
                is_invalid,
                "pids_limit 0",
            ),
            (
                "pids negative",
                |r| r.pids_limit = Some(-1),
                is_invalid,
                "pids_limit -1",
            ),
            (
                "pids high",
                |r| r.pids_limit = Some(1_000_000),
                is_invalid,
                "pids_limit 1000000",
            ),
            (
                "user",
                |r| r.user = Some("a b".into()),
                is_invalid,
                "\"a b\"",
            ),
            (
                "workdir",
                |r| r.workdir = Some("srv".into()),
                is_invalid,
                "\"srv\"",
            ),
        ];
        for (what, tweak, class, needle) in cases {
            let mut r = req("busybox");
            tweak(&mut r);
            let err = launch(&r).expect_err(what);
            assert!(class(&err), "{what}: wrong class {err:?}");
            assert!(err.to_string().contains(needle), "{what}: {err}");
        }
    }

    fn is_invalid(e: &CoreError) -> bool {
        matches!(e, CoreError::Invalid(_))
    }

    fn is_forbidden(e: &CoreError) -> bool {
        matches!(e, CoreError::Forbidden(_))
    }

    #[test]
    fn env_errors_never_show_values() {
        let mut r = req("busybox");
        r.env.insert("FLAG".into(), "flag{secret}\0".into());
        let err = launch(&r).unwrap_err().to_string();
        assert!(err.contains("FLAG") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn what_the_server_configuration_allows() {
        let settings = ServerSettings {
            allow_privileged: true,
            allow_host_binds: true,
            cap_allow: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        let mut r = req("busybox");
        r.privileged = true;
        r.binds = vec!["/srv/data:/data:ro".into(), "/srv/x:/x".into()];
        r.cap_add = vec!["CAP_NET_ADMIN".into(), "net_admin".into()];
        let c = container_config(&r, &settings, &ctx()).unwrap();
        assert!(c.privileged);
        assert_eq!(c.binds.len(), 2);
        assert_eq!(c.cap_add.iter().filter(|c| *c == "NET_ADMIN").count(), 1);

        let all = ServerSettings {
            cap_allow: vec!["ALL".into()],
            ..Default::default()
        };
        r.privileged = false;
        r.binds.clear();
        r.cap_add = vec!["SYS_PTRACE".into()];
        assert!(container_config(&r, &all, &ctx()).is_ok());

        for bind in [
            "data:/data",
            "/srv:data",
            "/srv:/data:rx",
            "/srv/../etc:/x",
            "/srv",
            "/a:/b:ro:extra",
        ] {
            let r = LaunchRequest {
                binds: vec![bind.into()],
                ..req("busybox")
            };
            let err = container_config(&r, &settings, &ctx()).unwrap_err();
            assert!(
                matches!(&err, CoreError::Invalid(m) if m.contains(bind)),
                "{bind}: {err:?}"
            );
        }
    }

    #[test]
    fn limits_follow_settings() {
        let mut settings = ServerSettings::default();
        settings.limits.max_cpus = 2.0;
        settings.limits.max_pids_limit = 300;
        let mut r = req("busybox");
        r.cpus = Some(2.5);
        assert!(container_config(&r, &settings, &ctx()).is_err());
        r.cpus = Some(2.0);
        r.pids_limit = Some(300);
        let c = container_config(&r, &settings, &ctx()).unwrap();
        assert_eq!(c.nano_cpus, Some(2_000_000_000));
        assert_eq!(c.pids_limit, Some(300));
    }
}
