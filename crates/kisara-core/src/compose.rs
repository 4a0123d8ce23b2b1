//! docker-compose files → [`ServicePlan`].
//!
//! The file is read as YAML (anchors, aliases and `<<` merge keys expanded by the parser), every
//! string value is interpolated (`${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`,
//! `${VAR:?error}`, `${VAR:+alt}`, `$$`) from the variables the caller passes and nothing else,
//! and then read key by key. A key Kisara cannot honour is an error naming it (with its path),
//! never silently ignored; `x-` extensions are the only keys skipped.
//!
//! Kisara hands out host ports itself: the host part of `ports:` (`8080:80`) is read and
//! checked but the container port is published on a port the node picks, so fifty instances of
//! one file never collide.

use std::collections::BTreeMap;

use kisara_api::agent::HealthCheck;
use kisara_api::{PortSpec, Protocol};
use serde_json::{Map, Value};

use crate::service_plan::{
    self, check_member_name, DependCondition, Dependency, NetworkJoin, PlannedContainer,
    PlannedNetwork, ServicePlan,
};
use crate::{CoreError, Result};

/// The network a service joins when it names none.
pub const DEFAULT_NETWORK: &str = "default";

/// Largest compose file read (the API body limit is the real guard; this keeps a pathological
/// file from costing more than it should).
pub const MAX_COMPOSE_BYTES: usize = 1 << 20;

/// Parses, interpolates and validates a compose file.
pub fn parse(text: &str, vars: &BTreeMap<String, String>) -> Result<ServicePlan> {
    if text.len() > MAX_COMPOSE_BYTES {
        return Err(CoreError::invalid(format!(
            "the compose file is larger than {MAX_COMPOSE_BYTES} bytes"
        )));
    }
    let doc: Value = serde_saphyr::from_str(text)
        .map_err(|e| CoreError::invalid(format!("the compose file is not valid YAML: {e}")))?;
    let doc = interpolate_value(doc, vars, "")?;
    let top = as_map(&doc, "the compose file")?;
    let mut services = None;
    let mut networks = None;
    let mut name = None;
    for (key, value) in top {
        match key.as_str() {
            // Obsolete in the compose specification; accepted and ignored by docker compose too.
            "version" => {}
            "name" => name = Some(string(value, "name")?),
            "services" => services = Some(as_map(value, "services")?),
            "networks" => networks = Some(value),
            "volumes" | "secrets" | "configs" => {
                if !is_empty(value) {
                    return Err(unsupported(
                        key,
                        "top-level volumes, secrets and configs are not supported",
                    ));
                }
            }
            k if k.starts_with("x-") => {}
            k => return Err(CoreError::invalid(format!("unknown top-level key `{k}`"))),
        }
    }
    let services = services
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CoreError::invalid("the compose file has no services"))?;
    let declared = read_networks(networks)?;

    let mut containers = Vec::new();
    for (svc_name, value) in services {
        check_member_name("service", svc_name)?;
        containers.push(read_service(svc_name, value, vars, &declared)?);
    }
    // Only networks some service joins are made.
    let mut used: Vec<PlannedNetwork> = Vec::new();
    for c in &containers {
        for j in &c.networks {
            if used.iter().any(|n| n.name == j.network) {
                continue;
            }
            match declared.iter().find(|n| n.name == j.network) {
                Some(n) => used.push(n.clone()),
                None if j.network == DEFAULT_NETWORK => used.push(PlannedNetwork {
                    name: DEFAULT_NETWORK.into(),
                    internal: false,
                    existing: None,
                    labels: BTreeMap::new(),
                }),
                None => {
                    return Err(CoreError::invalid(format!(
                        "services.{}.networks: network {:?} is not declared under the top-level networks",
                        c.service, j.network
                    )))
                }
            }
        }
    }
    for c in &containers {
        for d in &c.depends_on {
            if d.condition != DependCondition::Healthy {
                continue;
            }
            let Some(dep) = containers.iter().find(|x| x.service == d.service) else {
                continue;
            };
            if dep
                .healthcheck
                .as_ref()
                .is_some_and(|h| h.test.first().map(String::as_str) == Some("NONE"))
            {
                return Err(CoreError::invalid(format!(
                    "services.{}.depends_on: {} has its healthcheck disabled, so condition service_healthy can never be met",
                    c.service, d.service
                )));
            }
        }
    }
    let containers = service_plan::start_order(containers)?;
    Ok(ServicePlan {
        name,
        containers,
        networks: used,
    })
}

fn unsupported(path: &str, why: &str) -> CoreError {
    CoreError::invalid(format!("`{path}` is not supported by Kisara: {why}"))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn as_map<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    v.as_object()
        .ok_or_else(|| CoreError::invalid(format!("`{path}` must be a mapping")))
}

/// A scalar as a string (compose lets numbers and booleans stand for strings).
fn string(v: &Value, path: &str) -> Result<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(CoreError::invalid(format!("`{path}` must be a string"))),
    }
}

fn boolean(v: &Value, path: &str) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" => Ok(true),
        Value::String(s) if s == "false" => Ok(false),
        _ => Err(CoreError::invalid(format!(
            "`{path}` must be true or false"
        ))),
    }
}

fn string_list(v: &Value, path: &str) -> Result<Vec<String>> {
    match v {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, x)| string(x, &format!("{path}[{i}]")))
            .collect(),
        Value::Null => Ok(Vec::new()),
        _ => Err(CoreError::invalid(format!("`{path}` must be a list"))),
    }
}

/// `command`/`entrypoint`: a list, or a string split into words like a shell would (no shell).
fn command(v: &Value, path: &str) -> Result<Option<Vec<String>>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => split_words(s)
            .map(Some)
            .map_err(|e| CoreError::invalid(format!("`{path}`: {e}"))),
        Value::Array(_) => Ok(Some(string_list(v, path)?)),
        _ => Err(CoreError::invalid(format!(
            "`{path}` must be a string or a list"
        ))),
    }
}

/// Splits a command line into words: whitespace separates, single quotes keep everything,
/// double quotes keep everything but `\"` and `\\`, a backslash escapes the next character.
pub fn split_words(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => cur.push(c),
                    None => return Err("trailing backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

// ---- interpolation ----

/// Interpolates every string in `v` (mapping keys are left as they are, like docker compose).
fn interpolate_value(v: Value, vars: &BTreeMap<String, String>, path: &str) -> Result<Value> {
    Ok(match v {
        Value::String(s) => Value::String(interpolate(&s, vars).map_err(|e| {
            CoreError::invalid(format!(
                "`{}`: {e}",
                if path.is_empty() { "." } else { path }
            ))
        })?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, x)| interpolate_value(x, vars, &format!("{path}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let x = interpolate_value(x, vars, &p)?;
                out.insert(k, x);
            }
            Value::Object(out)
        }
        other => other,
    })
}

/// Compose interpolation of one string. Unset variables without a default are empty (docker
/// compose warns; Kisara cannot, so it keeps to the same result).
pub fn interpolate(
    s: &str,
    vars: &BTreeMap<String, String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < s.len() {
        let Some(off) = s[i..].find('$') else {
            out.push_str(&s[i..]);
            break;
        };
        out.push_str(&s[i..i + off]);
        i += off;
        match bytes.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let start = i + 2;
                let end =
                    matching_brace(s, start).ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
                out.push_str(&expand(&s[start..end], vars)?);
                i = end + 1;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let start = i + 1;
                let len = s[start..]
                    .bytes()
                    .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                    .count();
                let name = &s[start..start + len];
                out.push_str(vars.get(name).map_or("", String::as_str));
                i = start + len;
            }
            _ => {
                // A lone `$` (end of string, `$ `, `$1`) stays as it is.
                out.push('$');
                i += 1;
            }
        }
    }
    Ok(out)
}

/// Index of the `}` closing the `${` whose body starts at `start` (nested `${...}` allowed).
fn matching_brace(s: &str, start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let bytes = s.as_bytes();
    let mut i = start;
    while i < bytes.len() {
        match bytes[i] {
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
                continue;
            }
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

fn expand(body: &str, vars: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let name_len = body
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let name = &body[..name_len];
    if name.is_empty() || name.as_bytes()[0].is_ascii_digit() {
        return Err(format!("invalid variable name in `${{{body}}}`"));
    }
    let rest = &body[name_len..];
    let value = vars.get(name);
    let set_nonempty = value.is_some_and(|v| !v.is_empty());
    let (op, arg) = if let Some(a) = rest.strip_prefix(":-") {
        (":-", a)
    } else if let Some(a) = rest.strip_prefix(":?") {
        (":?", a)
    } else if let Some(a) = rest.strip_prefix(":+") {
        (":+", a)
    } else if let Some(a) = rest.strip_prefix('-') {
        ("-", a)
    } else if let Some(a) = rest.strip_prefix('?') {
        ("?", a)
    } else if let Some(a) = rest.strip_prefix('+') {
        ("+", a)
    } else if rest.is_empty() {
        ("", "")
    } else {
        return Err(format!("invalid interpolation `${{{body}}}`"));
    };
    let own = || value.cloned().unwrap_or_default();
    Ok(match op {
        "" => own(),
        ":-" if set_nonempty => own(),
        ":-" => interpolate(arg, vars)?,
        "-" if value.is_some() => own(),
        "-" => interpolate(arg, vars)?,
        ":+" if set_nonempty => interpolate(arg, vars)?,
        "+" if value.is_some() => interpolate(arg, vars)?,
        ":+" | "+" => String::new(),
        ":?" if set_nonempty => own(),
        "?" if value.is_some() => own(),
        _ => {
            let msg = interpolate(arg, vars)?;
            return Err(if msg.is_empty() {
                format!("required variable {name} is missing a value")
            } else {
                format!("required variable {name} is missing a value: {msg}")
            });
        }
    })
}

// ---- networks ----

fn read_networks(v: Option<&Value>) -> Result<Vec<PlannedNetwork>> {
    let mut out = Vec::new();
    let Some(v) = v else {
        return Ok(out);
    };
    if v.is_null() {
        return Ok(out);
    }
    for (name, def) in as_map(v, "networks")? {
        let path = format!("networks.{name}");
        check_member_name("network", name)?;
        let mut net = PlannedNetwork {
            name: name.clone(),
            internal: false,
            existing: None,
            labels: BTreeMap::new(),
        };
        let mut external = false;
        let mut external_name = None;
        if !def.is_null() {
            for (key, value) in as_map(def, &path)? {
                let p = format!("{path}.{key}");
                match key.as_str() {
                    "driver" => {
                        let d = string(value, &p)?;
                        if d != "bridge" {
                            return Err(unsupported(&p, "only the bridge driver is supported"));
                        }
                    }
                    "internal" => net.internal = boolean(value, &p)?,
                    "external" => external = boolean(value, &p)?,
                    "name" => external_name = Some(string(value, &p)?),
                    "labels" => net.labels = labels(value, &p)?,
                    k if k.starts_with("x-") => {}
                    "driver_opts" | "ipam" | "attachable" | "enable_ipv6" => {
                        return Err(unsupported(
                            &p,
                            "Kisara allocates each network's subnet from its pool and sets its options itself",
                        ))
                    }
                    k => return Err(CoreError::invalid(format!("unknown key `{k}` in `{path}`"))),
                }
            }
        }
        if external {
            net.existing = Some(external_name.unwrap_or_else(|| name.clone()));
        } else if external_name.is_some() {
            return Err(unsupported(
                &format!("{path}.name"),
                "networks made for a service are named by Kisara (one per instance); use external: true to join an existing network",
            ));
        }
        out.push(net);
    }
    Ok(out)
}

fn labels(v: &Value, path: &str) -> Result<BTreeMap<String, String>> {
    let map = key_values(v, path, &BTreeMap::new())?;
    for k in map.keys() {
        if k.to_ascii_lowercase()
            .starts_with(kisara_api::labels::PREFIX)
        {
            return Err(CoreError::invalid(format!(
                "`{path}`: label {k:?} uses the reserved prefix {}",
                kisara_api::labels::PREFIX
            )));
        }
    }
    Ok(map)
}

/// A map (`K: V`, null values taken from `vars` or dropped) or a list of `K=V` (`K` alone taken
/// from `vars` or dropped) — compose's form for `environment` and `labels`.
fn key_values(
    v: &Value,
    path: &str,
    vars: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    match v {
        Value::Null => {}
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::Null => {
                        if let Some(val) = vars.get(k) {
                            out.insert(k.clone(), val.clone());
                        }
                    }
                    x => {
                        out.insert(k.clone(), string(x, &format!("{path}.{k}"))?);
                    }
                }
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let item = string(x, &format!("{path}[{i}]"))?;
                match item.split_once('=') {
                    Some((k, val)) => {
                        out.insert(k.to_string(), val.to_string());
                    }
                    None => {
                        if let Some(val) = vars.get(&item) {
                            out.insert(item.clone(), val.clone());
                        }
                    }
                }
            }
        }
        _ => {
            return Err(CoreError::invalid(format!(
                "`{path}` must be a mapping or a list of KEY=VALUE"
            )))
        }
    }
    Ok(out)
}

// ---- services ----

/// Keys Kisara reads in a service.
const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "ports",
    "expose",
    "networks",
    "depends_on",
    "healthcheck",
    "cap_add",
    "cap_drop",
    "read_only",
    "tmpfs",
    "mem_limit",
    "cpus",
    "pids_limit",
    "user",
    "working_dir",
    "labels",
    "restart",
    "privileged",
    "init",
];

/// Why well-known keys Kisara does not honour are refused.
fn refusal(key: &str) -> Option<&'static str> {
    Some(match key {
        "build" => "build the image first and name it under `image`",
        "volumes" | "volumes_from" | "devices" => "no host or named volumes: use tmpfs for scratch space",
        "container_name" => "Kisara names containers itself, so that many instances of one file can run; others reach a container by its service name",
        "deploy" | "scale" | "replicas" => "one instance per launch: launch the service again for another",
        "network_mode" | "pid" | "ipc" | "uts" | "userns_mode" | "cgroup_parent" => "every service runs in namespaces and networks of its own",
        "env_file" | "configs" | "secrets" | "extends" | "include" => "the server reads no files beside the compose file; pass variables in the request's env",
        "security_opt" | "sysctls" | "ulimits" | "cgroup" | "oom_score_adj" | "oom_kill_disable" => "the server's hardening policy sets these",
        "memswap_limit" | "mem_reservation" | "cpu_shares" | "cpu_quota" | "cpu_period" | "cpuset" | "cpu_count" | "cpu_percent" | "mem_swappiness" | "shm_size" => "use mem_limit, cpus and pids_limit",
        "profiles" => "every service in the file is launched",
        "hostname" | "domainname" | "mac_address" | "dns" | "dns_search" | "dns_opt" | "extra_hosts" | "links" | "external_links" => "containers reach each other by service name on the service's networks",
        "stop_signal" | "stop_grace_period" => "Kisara stops containers with its own grace period",
        "logging" | "log_driver" | "log_opt" => "logs stay with the engine's default driver (kisara logs reads them)",
        "platform" | "pull_policy" | "runtime" | "isolation" | "storage_opt" | "gpus" => "not configurable per service",
        _ => return None,
    })
}

fn read_service(
    name: &str,
    value: &Value,
    vars: &BTreeMap<String, String>,
    declared: &[PlannedNetwork],
) -> Result<PlannedContainer> {
    let path = format!("services.{name}");
    let map = as_map(value, &path)?;
    let mut c = PlannedContainer {
        service: name.to_string(),
        ..Default::default()
    };
    let mut networks_given = false;
    for (key, v) in map {
        let p = format!("{path}.{key}");
        if key.starts_with("x-") {
            continue;
        }
        if !SERVICE_KEYS.contains(&key.as_str()) {
            return Err(match refusal(key) {
                Some(why) => unsupported(&p, why),
                None => CoreError::invalid(format!(
                    "unknown key `{key}` in `{path}` (Kisara refuses keys it cannot honour)"
                )),
            });
        }
        match key.as_str() {
            "image" => c.image = string(v, &p)?,
            "command" => c.command = command(v, &p)?,
            "entrypoint" => c.entrypoint = command(v, &p)?,
            "environment" => c.env = key_values(v, &p, vars)?,
            "ports" => {
                for (i, x) in array(v, &p)?.iter().enumerate() {
                    c.ports.push(port(x, &format!("{p}[{i}]"))?);
                }
            }
            "expose" => {
                for (i, x) in array(v, &p)?.iter().enumerate() {
                    c.expose
                        .push(port_spec(&string(x, &format!("{p}[{i}]"))?, &p)?);
                }
            }
            "networks" => {
                networks_given = true;
                c.networks = service_networks(v, &p, declared)?;
            }
            "depends_on" => c.depends_on = depends_on(v, &p)?,
            "healthcheck" => c.healthcheck = healthcheck(v, &p)?,
            "cap_add" => c.cap_add = string_list(v, &p)?,
            "cap_drop" => c.cap_drop = string_list(v, &p)?,
            "read_only" => c.read_only = boolean(v, &p)?,
            "tmpfs" => {
                let items = match v {
                    Value::String(_) => vec![string(v, &p)?],
                    _ => string_list(v, &p)?,
                };
                for item in items {
                    let (dir, opts) = tmpfs(&item, &p)?;
                    c.tmpfs.insert(dir, opts);
                }
            }
            "mem_limit" => c.memory_mb = Some(memory_mb(v, &p)?),
            "cpus" => {
                let s = string(v, &p)?;
                c.cpus = Some(s.trim().parse::<f64>().map_err(|_| {
                    CoreError::invalid(format!("`{p}` must be a number of CPUs, e.g. 0.5"))
                })?);
            }
            "pids_limit" => {
                let s = string(v, &p)?;
                c.pids_limit =
                    Some(s.trim().parse::<i64>().map_err(|_| {
                        CoreError::invalid(format!("`{p}` must be a whole number"))
                    })?);
            }
            "user" => c.user = Some(string(v, &p)?),
            "working_dir" => c.workdir = Some(string(v, &p)?),
            "labels" => c.labels = labels(v, &p)?,
            "restart" => c.restart = Some(restart(&string(v, &p)?, &p)?),
            "privileged" => c.privileged = boolean(v, &p)?,
            "init" if !boolean(v, &p)? => {
                return Err(unsupported(
                    &p,
                    "every Kisara container runs with an init process (init: false cannot be honoured)",
                ));
            }
            _ => {}
        }
    }
    if c.image.trim().is_empty() {
        return Err(CoreError::invalid(format!(
            "`{path}` names no image (build the image first and name it under `image`)"
        )));
    }
    if !networks_given {
        c.networks = vec![NetworkJoin {
            network: DEFAULT_NETWORK.into(),
            aliases: Vec::new(),
        }];
    }
    if c.networks.is_empty() {
        return Err(CoreError::invalid(format!("`{path}.networks` is empty")));
    }
    Ok(c)
}

fn array<'a>(v: &'a Value, path: &str) -> Result<&'a [Value]> {
    match v {
        Value::Array(a) => Ok(a),
        Value::Null => Ok(&[]),
        _ => Err(CoreError::invalid(format!("`{path}` must be a list"))),
    }
}

/// `80`, `80/udp` (no ranges).
fn port_spec(s: &str, path: &str) -> Result<PortSpec> {
    let (num, proto) = match s.trim().rsplit_once('/') {
        Some((n, p)) => (n, p),
        None => (s.trim(), "tcp"),
    };
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => {
            return Err(CoreError::invalid(format!(
                "`{path}`: protocol {proto:?} must be tcp or udp"
            )))
        }
    };
    if num.contains('-') {
        return Err(unsupported(
            path,
            "port ranges are not supported; list each port",
        ));
    }
    let port: u16 =
        num.parse().ok().filter(|p| *p > 0).ok_or_else(|| {
            CoreError::invalid(format!("`{path}`: {num:?} is not a port (1-65535)"))
        })?;
    Ok(PortSpec { port, protocol })
}

/// A `ports:` entry: short (`[HOST_IP:][HOST:]CONTAINER[/PROTO]`) or long form. The host side
/// is checked but Kisara picks the host port (see the module docs).
fn port(v: &Value, path: &str) -> Result<PortSpec> {
    match v {
        Value::Object(m) => {
            let mut target = None;
            let mut protocol = "tcp".to_string();
            for (key, x) in m {
                let p = format!("{path}.{key}");
                match key.as_str() {
                    "target" => target = Some(string(x, &p)?),
                    "protocol" => protocol = string(x, &p)?,
                    "published" => {
                        let s = string(x, &p)?;
                        port_spec(&s, &p)?;
                    }
                    "host_ip" | "name" | "app_protocol" => {
                        string(x, &p)?;
                    }
                    "mode" => {
                        let m = string(x, &p)?;
                        if m != "host" && m != "ingress" {
                            return Err(CoreError::invalid(format!(
                                "`{p}` must be host or ingress"
                            )));
                        }
                    }
                    k if k.starts_with("x-") => {}
                    k => return Err(CoreError::invalid(format!("unknown key `{k}` in `{path}`"))),
                }
            }
            let target =
                target.ok_or_else(|| CoreError::invalid(format!("`{path}` has no target port")))?;
            port_spec(&format!("{target}/{protocol}"), path)
        }
        _ => {
            let s = string(v, path)?;
            let (addr, proto) = match s.rsplit_once('/') {
                Some((a, p)) => (a, Some(p)),
                None => (s.as_str(), None),
            };
            // The container port is after the last `:` (host IPs may be `[::1]`).
            let (host, container) = match addr.rsplit_once(':') {
                Some((h, c)) => (Some(h), c),
                None => (None, addr),
            };
            if let Some(host) = host {
                let host_port = host.rsplit_once(':').map_or(host, |(_, p)| p);
                if !host_port.is_empty() && !host_port.ends_with(']') {
                    port_spec(host_port, path)?;
                }
            }
            let spec = match proto {
                Some(p) => format!("{container}/{p}"),
                None => container.to_string(),
            };
            port_spec(&spec, path)
        }
    }
}

fn service_networks(
    v: &Value,
    path: &str,
    declared: &[PlannedNetwork],
) -> Result<Vec<NetworkJoin>> {
    let known = |n: &str| n == DEFAULT_NETWORK || declared.iter().any(|d| d.name == n);
    let mut out = Vec::new();
    match v {
        Value::Array(_) => {
            for n in string_list(v, path)? {
                out.push(NetworkJoin {
                    network: n,
                    aliases: Vec::new(),
                });
            }
        }
        Value::Object(m) => {
            for (n, def) in m {
                let p = format!("{path}.{n}");
                let mut join = NetworkJoin {
                    network: n.clone(),
                    aliases: Vec::new(),
                };
                if !def.is_null() {
                    for (key, x) in as_map(def, &p)? {
                        let kp = format!("{p}.{key}");
                        match key.as_str() {
                            "aliases" => {
                                for a in string_list(x, &kp)? {
                                    check_member_name("alias", &a)?;
                                    join.aliases.push(a);
                                }
                            }
                            k if k.starts_with("x-") => {}
                            "ipv4_address" | "ipv6_address" | "link_local_ips" | "mac_address"
                            | "priority" | "driver_opts" | "gw_priority" => {
                                return Err(unsupported(
                                    &kp,
                                    "addresses on a service's networks are assigned by the engine",
                                ))
                            }
                            k => {
                                return Err(CoreError::invalid(format!(
                                    "unknown key `{k}` in `{p}`"
                                )))
                            }
                        }
                    }
                }
                out.push(join);
            }
        }
        _ => {
            return Err(CoreError::invalid(format!(
                "`{path}` must be a list or a mapping"
            )))
        }
    }
    for j in &out {
        if !known(&j.network) {
            return Err(CoreError::invalid(format!(
                "`{path}`: network {:?} is not declared under the top-level networks",
                j.network
            )));
        }
    }
    Ok(out)
}

fn depends_on(v: &Value, path: &str) -> Result<Vec<Dependency>> {
    let mut out = Vec::new();
    match v {
        Value::Array(_) => {
            for s in string_list(v, path)? {
                out.push(Dependency {
                    service: s,
                    condition: DependCondition::Started,
                });
            }
        }
        Value::Object(m) => {
            for (s, def) in m {
                let p = format!("{path}.{s}");
                let mut condition = DependCondition::Started;
                if !def.is_null() {
                    for (key, x) in as_map(def, &p)? {
                        let kp = format!("{p}.{key}");
                        match key.as_str() {
                            "condition" => {
                                condition = match string(x, &kp)?.as_str() {
                                    "service_started" => DependCondition::Started,
                                    "service_healthy" => DependCondition::Healthy,
                                    "service_completed_successfully" => {
                                        return Err(unsupported(
                                            &kp,
                                            "condition service_completed_successfully (one-shot containers) is not supported",
                                        ))
                                    }
                                    other => {
                                        return Err(CoreError::invalid(format!(
                                            "`{kp}`: unknown condition {other:?} (service_started or service_healthy)"
                                        )))
                                    }
                                }
                            }
                            "required" => {
                                if !boolean(x, &kp)? {
                                    return Err(unsupported(
                                        &kp,
                                        "every dependency is required (all services are launched)",
                                    ));
                                }
                            }
                            "restart" => {
                                boolean(x, &kp)?;
                                return Err(unsupported(
                                    &kp,
                                    "Kisara does not restart dependents when a dependency restarts",
                                ));
                            }
                            k if k.starts_with("x-") => {}
                            k => {
                                return Err(CoreError::invalid(format!(
                                    "unknown key `{k}` in `{p}`"
                                )))
                            }
                        }
                    }
                }
                out.push(Dependency {
                    service: s.clone(),
                    condition,
                });
            }
        }
        _ => {
            return Err(CoreError::invalid(format!(
                "`{path}` must be a list or a mapping"
            )))
        }
    }
    Ok(out)
}

fn healthcheck(v: &Value, path: &str) -> Result<Option<HealthCheck>> {
    let m = as_map(v, path)?;
    let mut h = HealthCheck::default();
    let mut disabled = false;
    for (key, x) in m {
        let p = format!("{path}.{key}");
        match key.as_str() {
            "test" => {
                h.test = match x {
                    Value::String(s) => vec!["CMD-SHELL".to_string(), s.clone()],
                    _ => string_list(x, &p)?,
                };
                match h.test.first().map(String::as_str) {
                    Some("NONE") => disabled = true,
                    Some("CMD") if h.test.len() >= 2 => {}
                    Some("CMD-SHELL") if h.test.len() == 2 => {}
                    _ => {
                        return Err(CoreError::invalid(format!(
                            "`{p}` must be a string, [\"CMD\", prog, args...], [\"CMD-SHELL\", command] or [\"NONE\"]"
                        )))
                    }
                }
            }
            "interval" => h.interval_ms = Some(duration_ms(x, &p)?),
            "timeout" => h.timeout_ms = Some(duration_ms(x, &p)?),
            "start_period" => h.start_period_ms = Some(duration_ms(x, &p)?),
            "retries" => {
                let s = string(x, &p)?;
                h.retries =
                    Some(s.trim().parse().map_err(|_| {
                        CoreError::invalid(format!("`{p}` must be a whole number"))
                    })?);
            }
            "disable" => disabled = boolean(x, &p)?,
            "start_interval" => {
                return Err(unsupported(
                    &p,
                    "start_interval needs Docker API 1.44; use start_period and interval",
                ))
            }
            k if k.starts_with("x-") => {}
            k => return Err(CoreError::invalid(format!("unknown key `{k}` in `{path}`"))),
        }
    }
    if disabled {
        return Ok(Some(HealthCheck {
            test: vec!["NONE".into()],
            ..Default::default()
        }));
    }
    if h.test.is_empty() {
        return Err(CoreError::invalid(format!("`{path}` has no test")));
    }
    Ok(Some(h))
}

/// Compose durations: `1m30s`, `10s`, `500ms`, `1.5s`, `2h`; a bare number is seconds.
fn duration_ms(v: &Value, path: &str) -> Result<u64> {
    let s = string(v, path)?;
    parse_duration_ms(s.trim()).ok_or_else(|| {
        CoreError::invalid(format!(
            "`{path}`: {s:?} is not a duration like 10s or 1m30s"
        ))
    })
}

pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then_some((secs * 1000.0) as u64);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .count();
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.bytes().take_while(|b| b.is_ascii_alphabetic()).count();
        let factor = match &rest[..unit_len] {
            "us" => 0.001,
            "ms" => 1.0,
            "s" => 1000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_len..];
    }
    (total.is_finite() && total <= u64::MAX as f64 / 2.0).then_some(total as u64)
}

/// `64m`, `1g`, `512k`, `1073741824` (bytes) → MiB, rounded up.
fn memory_mb(v: &Value, path: &str) -> Result<u64> {
    let s = string(v, path)?.trim().to_ascii_lowercase();
    let bad = || CoreError::invalid(format!("`{path}`: {s:?} is not a size like 64m or 1g"));
    let digits = s
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let n: f64 = s[..digits].parse().map_err(|_| bad())?;
    let factor: f64 = match s[digits..].trim() {
        "" | "b" => 1.0,
        "k" | "kb" => 1024.0,
        "m" | "mb" => 1024.0 * 1024.0,
        "g" | "gb" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = n * factor;
    if !bytes.is_finite() || bytes <= 0.0 || bytes > 1e15 {
        return Err(bad());
    }
    Ok((bytes / (1024.0 * 1024.0)).ceil() as u64)
}

/// `/run` or `/run:size=64m,mode=1777`: an absolute path and options from a short allow-list.
fn tmpfs(item: &str, path: &str) -> Result<(String, String)> {
    let (dir, opts) = item.split_once(':').unwrap_or((item, ""));
    if !dir.starts_with('/')
        || dir.split('/').any(|c| c == "..")
        || dir.chars().any(char::is_control)
    {
        return Err(CoreError::invalid(format!(
            "`{path}`: {dir:?} must be an absolute path without .."
        )));
    }
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        let key = opt.split_once('=').map_or(opt, |(k, _)| k);
        if !matches!(
            key,
            "size" | "mode" | "uid" | "gid" | "ro" | "rw" | "noexec" | "exec" | "nosuid" | "nodev"
        ) {
            return Err(CoreError::invalid(format!(
                "`{path}`: tmpfs option {key:?} is not allowed (size, mode, uid, gid, ro, rw, noexec, exec, nosuid, nodev)"
            )));
        }
    }
    Ok((dir.to_string(), opts.to_string()))
}

fn restart(s: &str, path: &str) -> Result<String> {
    let ok = match s.split_once(':') {
        Some(("on-failure", n)) => n.parse::<u32>().is_ok(),
        Some(_) => false,
        None => matches!(s, "no" | "always" | "unless-stopped" | "on-failure"),
    };
    if ok {
        Ok(s.to_string())
    } else {
        Err(CoreError::invalid(format!(
            "`{path}`: {s:?} must be no, always, unless-stopped or on-failure[:N]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const THREE: &str = r#"
name: chal
x-common: &common
  image: kisara-test/busybox:latest
  read_only: true
  tmpfs: ["/tmp:size=8m"]
services:
  web:
    <<: *common
    command: ["httpd", "-f", "-p", "80"]
    ports: ["8080:80", "127.0.0.1::81/tcp", {target: 82, published: 8082, protocol: udp}]
    depends_on:
      api: {condition: service_healthy}
    environment:
      GREETING: ${GREETING:-hello}
      TEAM: $TEAM
      PRICE: "$$5"
  api:
    <<: *common
    command: sh -c 'nc -ll -p 8080 -e echo api'
    expose: ["8080"]
    networks:
      back: {aliases: [backend]}
      default:
    depends_on: [db]
    healthcheck:
      test: nc -z localhost 8080
      interval: 1s
      timeout: 1500ms
      retries: 30
    mem_limit: 64m
    cpus: 0.5
    pids_limit: 64
    cap_drop: [ALL]
    cap_add: [NET_BIND_SERVICE]
    x-anything: ignored
  db:
    image: kisara-test/busybox:latest
    networks: [back]
    user: "1000"
    working_dir: /tmp
    restart: on-failure:3
networks:
  back:
    internal: true
"#;

    #[test]
    fn reads_a_three_service_file() {
        let plan = parse(THREE, &vars(&[("TEAM", "t7")])).unwrap();
        assert_eq!(plan.name.as_deref(), Some("chal"));
        let order: Vec<&str> = plan.containers.iter().map(|c| c.service.as_str()).collect();
        assert_eq!(order, ["db", "api", "web"]);
        let web = &plan.containers[2];
        assert_eq!(web.image, "kisara-test/busybox:latest");
        assert!(web.read_only, "merge key");
        assert_eq!(web.tmpfs["/tmp"], "size=8m");
        assert_eq!(web.env["GREETING"], "hello");
        assert_eq!(web.env["TEAM"], "t7");
        assert_eq!(web.env["PRICE"], "$5");
        let ports: Vec<String> = web.ports.iter().map(|p| p.to_string()).collect();
        assert_eq!(ports, ["80/tcp", "81/tcp", "82/udp"]);
        assert_eq!(web.depends_on[0].condition, DependCondition::Healthy);
        assert_eq!(web.networks[0].network, "default");
        let api = &plan.containers[1];
        assert_eq!(
            api.command.as_deref().unwrap(),
            ["sh", "-c", "nc -ll -p 8080 -e echo api"]
        );
        assert_eq!(api.expose[0].port, 8080);
        assert!(api.ports.is_empty());
        let hc = api.healthcheck.as_ref().unwrap();
        assert_eq!(hc.test, ["CMD-SHELL", "nc -z localhost 8080"]);
        assert_eq!(
            (hc.interval_ms, hc.timeout_ms, hc.retries),
            (Some(1000), Some(1500), Some(30))
        );
        assert_eq!(api.memory_mb, Some(64));
        assert_eq!(api.cpus, Some(0.5));
        assert_eq!(api.networks.len(), 2);
        assert_eq!(
            api.networks
                .iter()
                .find(|n| n.network == "back")
                .unwrap()
                .aliases,
            ["backend"]
        );
        let db = &plan.containers[0];
        assert_eq!(db.restart.as_deref(), Some("on-failure:3"));
        assert_eq!(db.user.as_deref(), Some("1000"));
        let nets: Vec<&str> = plan.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(nets, ["back", "default"]);
        assert!(plan.networks[0].internal);
        service_plan::validate(&plan, &crate::config::ServerSettings::default()).unwrap();
    }

    #[test]
    fn interpolation_forms() {
        let v = vars(&[("A", "a"), ("E", "")]);
        let i = |s: &str| interpolate(s, &v);
        assert_eq!(
            i("${A}-$A-${B:-b}-${E:-e}-${E-e}-${B-x}").unwrap(),
            "a-a-b-e--x"
        );
        assert_eq!(i("${A:+yes}${B:+no}${E+set}").unwrap(), "yesset");
        assert_eq!(i("${B:-${A}}").unwrap(), "a");
        assert_eq!(i("$$A $ $1 end$").unwrap(), "$A $ $1 end$");
        assert!(i("${B:?need B}").unwrap_err().contains("need B"));
        assert!(i("${A").unwrap_err().contains("unclosed"));
        assert!(i("${1A}").is_err());
    }

    #[test]
    fn unknown_and_unsupported_keys_are_named() {
        let e = |yaml: &str| parse(yaml, &BTreeMap::new()).unwrap_err().to_string();
        let msg = e("services:\n  web:\n    image: x\n    privileged_mode: true\n");
        assert!(
            msg.contains("privileged_mode") && msg.contains("services.web"),
            "{msg}"
        );
        let msg = e("services:\n  web:\n    image: x\n    deploy: {replicas: 2}\n");
        assert!(msg.contains("services.web.deploy"), "{msg}");
        let msg = e("services:\n  web:\n    image: x\n    volumes: [\"/:/host\"]\n");
        assert!(msg.contains("volumes"), "{msg}");
        let msg = e("services:\n  web:\n    build: .\n");
        assert!(msg.contains("build"), "{msg}");
        let msg = e("servics:\n  web:\n    image: x\n");
        assert!(msg.contains("servics"), "{msg}");
        let msg = e("services:\n  web:\n    image: x\n    networks: [ghost]\n");
        assert!(msg.contains("ghost"), "{msg}");
        let msg =
            e("services:\n  web:\n    image: x\n    healthcheck: {test: true, intervl: 1s}\n");
        assert!(msg.contains("intervl") || msg.contains("test"), "{msg}");
        let msg = e("services:\n  a:\n    image: x\n    depends_on: [b]\n  b:\n    image: x\n    depends_on: [a]\n");
        assert!(
            msg.contains("cycle") && msg.contains("a -> b -> a"),
            "{msg}"
        );
        let msg = e("services:\n  web:\n    image: x\n    ports: [\"8000-8010:80\"]\n");
        assert!(msg.contains("range"), "{msg}");
        let msg = e("services:\n  web:\n    image: x\n    tmpfs: [\"/t:exec,suid\"]\n");
        assert!(msg.contains("suid"), "{msg}");
        let msg = e("services:\n  web:\n    image: x\n    labels: {io.kisara.owner: me}\n");
        assert!(msg.contains("reserved"), "{msg}");
        let msg = e("services:\n  web:\n    image: ${IMG:?set IMG}\n");
        assert!(
            msg.contains("set IMG") && msg.contains("services.web.image"),
            "{msg}"
        );
        let msg = e("services: [\n");
        assert!(msg.contains("YAML"), "{msg}");
    }

    #[test]
    fn odd_input_never_panics() {
        for yaml in [
            "",
            "~",
            "[]",
            "services: ~",
            "services: {a: ~}",
            "services: {a: []}",
            "services: {a: {image: x, ports: [{}]}}",
            "services: {a: {image: x, ports: [\":\"]}}",
            "services: {a: {image: x, ports: [\"::\"]}}",
            "services: {a: {image: x, mem_limit: \"\"}}",
            "services: {a: {image: x, healthcheck: {test: []}}}",
            "services: {a: {image: x, environment: 5}}",
            "services: {\"\": {image: x}}",
            "services: {a: {image: x, command: \"'\"}}",
            "services: {a: {image: x, cpus: nan}}",
            "services: {a: {image: x, mem_limit: 1e400}}",
        ] {
            let _ = parse(yaml, &BTreeMap::new());
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration_ms("1m30s"), Some(90_000));
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500));
        assert_eq!(parse_duration_ms("5"), Some(5000));
        assert_eq!(parse_duration_ms("5x"), None);
        assert_eq!(memory_mb(&Value::String("1g".into()), "m").unwrap(), 1024);
        assert_eq!(memory_mb(&Value::from(1_048_577), "m").unwrap(), 2);
        assert!(memory_mb(&Value::String("lots".into()), "m").is_err());
    }
}
