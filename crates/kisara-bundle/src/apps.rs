//! Apps inside a bundle: a compose file or a Kisara service spec, read for what a bundle
//! needs from them: the images (found by parsing, never by guessing from text) and, for
//! `bundle up`, each service's command, environment and ports.
//!
//! Compose: read by the control plane's own parser (`kisara_core::compose`: anchors and merge
//! keys, `${VAR}` interpolation from the bundle's `ENV`, every key honoured or refused by name),
//! so a file the cluster would refuse fails the build, and the images found are the ones run.
//! Kisara service spec (JSON or YAML): `{"name": ..., "containers": [{"name", "image", "cmd",
//! "env", "ports" | "port_protocol"}]}`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{BundleError, Result};

/// What kind of file an app is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppKind {
    Compose,
    KisaraService,
}

/// A port a service exposes (Kisara hands out host ports itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub target: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl ServicePort {
    /// Kisara's port spec, `80/tcp`.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.target, self.protocol)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub environment: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSpec {
    pub kind: AppKind,
    pub services: Vec<Service>,
}

impl AppSpec {
    /// Every image the app uses, in order of first use.
    pub fn images(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.services {
            if !out.contains(&s.image) {
                out.push(s.image.clone());
            }
        }
        out
    }
}

/// Reads an app file. `app` and `path` only name it in errors; JSON is told by its first
/// character, everything else is YAML. A compose file is read by the control plane's compose
/// parser with `vars` (the bundle's `ENV`) for its `${VAR}` interpolation.
pub fn parse_app(
    app: &str,
    path: &str,
    text: &str,
    vars: &BTreeMap<String, String>,
) -> Result<AppSpec> {
    let err = |message: String| BundleError::App {
        app: app.to_string(),
        path: path.to_string(),
        message,
    };
    let doc: RawDoc = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?
    } else {
        serde_saphyr::from_str(text).map_err(|e| err(format!("invalid YAML: {e}")))?
    };
    match (doc.services, doc.containers) {
        (Some(services), None) => {
            if let Some((name, _)) = services
                .iter()
                .find(|(_, s)| s.image.as_ref().is_none_or(|i| i.trim().is_empty()))
            {
                return Err(err(format!(
                    "service {name} names no image (build: is not supported; build the image first and name it)"
                )));
            }
            if services.is_empty() {
                return Err(err("the compose file has no services".into()));
            }
            // The control plane's own reading of the file, with the variables `bundle up` will
            // send: what it would refuse is refused at build time, and the images are the ones
            // it will run.
            let plan = kisara_core::compose::parse(text, vars).map_err(|e| err(e.to_string()))?;
            let out = plan
                .containers
                .into_iter()
                .map(|c| Service {
                    ports: c
                        .ports
                        .iter()
                        .map(|p| ServicePort {
                            target: p.port,
                            protocol: p.protocol.to_string(),
                        })
                        .collect(),
                    name: c.service,
                    image: c.image,
                    command: c.command,
                    entrypoint: c.entrypoint,
                    environment: c.env,
                })
                .collect();
            Ok(AppSpec {
                kind: AppKind::Compose,
                services: out,
            })
        }
        (None, Some(containers)) => {
            let mut out = Vec::new();
            for (i, c) in containers.into_iter().enumerate() {
                let name = c.name.unwrap_or_else(|| format!("c{i}"));
                let image = c
                    .image
                    .filter(|i| !i.trim().is_empty())
                    .ok_or_else(|| err(format!("container {name} names no image")))?;
                let mut specs: Vec<String> = c.ports.iter().map(|p| p.to_string()).collect();
                if let Some(pp) = &c.port_protocol {
                    specs.extend(
                        pp.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty()),
                    );
                }
                let ports = specs
                    .iter()
                    .map(|s| parse_port(s))
                    .collect::<std::result::Result<Vec<_>, String>>()
                    .map_err(|m| err(format!("container {name}: {m}")))?;
                out.push(Service {
                    name,
                    image,
                    command: c
                        .cmd
                        .or(c.command)
                        .map(|c| c.into_argv())
                        .transpose()
                        .map_err(&err)?,
                    entrypoint: c
                        .entrypoint
                        .map(|c| c.into_argv())
                        .transpose()
                        .map_err(&err)?,
                    environment: c.env.into_map(),
                    ports,
                });
            }
            if out.is_empty() {
                return Err(err("the service spec has no containers".into()));
            }
            Ok(AppSpec {
                kind: AppKind::KisaraService,
                services: out,
            })
        }
        (Some(_), Some(_)) => Err(err(
            "has both `services` and `containers`: is it a compose file or a Kisara service spec?"
                .into(),
        )),
        (None, None) => Err(err(
            "neither a compose file (`services:`) nor a Kisara service spec (`containers:`)".into(),
        )),
    }
}

/// An app file as a JSON value (JSON, or YAML read as such), for handing a Kisara service spec
/// on to the control plane with every key it has. `app` and `path` name it in errors.
pub fn document(app: &str, path: &str, text: &str) -> Result<serde_json::Value> {
    let err = |message: String| BundleError::App {
        app: app.to_string(),
        path: path.to_string(),
        message,
    };
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))
    } else {
        serde_saphyr::from_str(text).map_err(|e| err(format!("invalid YAML: {e}")))
    }
}

#[derive(Deserialize)]
struct RawDoc {
    #[serde(default)]
    services: Option<BTreeMap<String, RawComposeService>>,
    #[serde(default)]
    containers: Option<Vec<RawContainer>>,
}

#[derive(Deserialize)]
struct RawComposeService {
    #[serde(default)]
    image: Option<String>,
}

#[derive(Deserialize)]
struct RawContainer {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    cmd: Option<Command>,
    #[serde(default)]
    command: Option<Command>,
    #[serde(default)]
    entrypoint: Option<Command>,
    #[serde(default)]
    env: Environment,
    #[serde(default)]
    ports: Vec<Scalar>,
    #[serde(default)]
    port_protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Command {
    Shell(String),
    Argv(Vec<String>),
}

impl Command {
    fn into_argv(self) -> std::result::Result<Vec<String>, String> {
        match self {
            Command::Argv(v) => Ok(v),
            // Compose splits a string command into words the way a shell would, without a shell.
            Command::Shell(s) => crate::kisarafile::split_words(&s),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Environment {
    #[default]
    None,
    Map(BTreeMap<String, Option<Scalar>>),
    List(Vec<String>),
}

impl Environment {
    fn into_map(self) -> BTreeMap<String, String> {
        match self {
            Environment::None => BTreeMap::new(),
            Environment::Map(m) => m
                .into_iter()
                .map(|(k, v)| (k, v.map(|v| v.to_string()).unwrap_or_default()))
                .collect(),
            Environment::List(l) => l
                .into_iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (kv, String::new()),
                })
                .collect(),
        }
    }
}

/// A YAML scalar that may be a string, a number or a boolean.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum Scalar {
    Int(i64),
    Bool(bool),
    Float(f64),
    Str(String),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Int(n) => write!(f, "{n}"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Str(s) => f.write_str(s),
        }
    }
}

/// A service spec's port, `[ip:][published:]target[/protocol]` (the published part is checked
/// and dropped: Kisara hands out host ports itself).
fn parse_port(s: &str) -> std::result::Result<ServicePort, String> {
    let port = |s: &str| -> std::result::Result<u16, String> {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port {s:?} (port ranges are not supported)"))
    };
    let (addr, protocol) = match s.rsplit_once('/') {
        Some((a, p)) => match p.to_ascii_lowercase().as_str() {
            "tcp" => (a, "tcp".to_string()),
            "udp" => (a, "udp".to_string()),
            other => return Err(format!("unsupported protocol {other:?}")),
        },
        None => (s, "tcp".to_string()),
    };
    // An IPv6 host address is bracketed.
    let parts: Vec<&str> = match addr.rsplit_once("]:") {
        Some((_, rest)) => rest.split(':').collect(),
        None => addr.split(':').collect(),
    };
    let (published, target) = match parts.as_slice() {
        [t] => (None, *t),
        [p, t] | [_, p, t] => (Some(*p).filter(|p| !p.is_empty()), *t),
        _ => return Err(format!("invalid port mapping {s:?}")),
    };
    if let Some(p) = published {
        port(p)?;
    }
    Ok(ServicePort {
        target: port(target)?,
        protocol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_service_spec_reads_as_the_same_document_as_json() {
        let yaml = "name: pwn\ncontainers:\n  - image: a:1\n    ports: [{port: 80}]\n";
        let json = r#"{"name": "pwn", "containers": [{"image": "a:1", "ports": [{"port": 80}]}]}"#;
        assert_eq!(
            document("pwn", "s.yaml", yaml).unwrap(),
            document("pwn", "s.json", json).unwrap()
        );
        let e = document("pwn", "s.json", "{nope").unwrap_err().to_string();
        assert!(e.contains("s.json") && e.contains("invalid JSON"), "{e}");
    }

    #[test]
    fn compose_with_anchors_and_merge_keys() {
        let text = r#"
x-common: &common
  image: 127.0.0.1:5000/base:1
  environment:
    MODE: prod
    WORKERS: 4
services:
  web:
    <<: *common
    image: kisara-test/busybox:latest
    command: httpd -f -p 80 -h /www
    ports: ["8080:80", "127.0.0.1:5353:53/udp", 9000]
  worker:
    <<: *common
    entrypoint: ["sh", "-c"]
    command: ["sleep 1000"]
    environment: ["A=1", "B"]
    ports:
      - target: 22
        published: "2222"
"#;
        let app = parse_app("web", "compose.yaml", text, &BTreeMap::new()).unwrap();
        assert_eq!(app.kind, AppKind::Compose);
        assert_eq!(
            app.images(),
            ["kisara-test/busybox:latest", "127.0.0.1:5000/base:1"]
        );
        let web = &app.services[0];
        assert_eq!(web.name, "web");
        assert_eq!(
            web.command.as_deref().unwrap(),
            ["httpd", "-f", "-p", "80", "-h", "/www"]
        );
        assert_eq!(
            web.environment.get("WORKERS").map(String::as_str),
            Some("4")
        );
        let specs: Vec<_> = web.ports.iter().map(|p| p.spec()).collect();
        assert_eq!(specs, ["80/tcp", "53/udp", "9000/tcp"]);
        let worker = &app.services[1];
        assert_eq!(worker.image, "127.0.0.1:5000/base:1");
        assert_eq!(worker.entrypoint.as_deref().unwrap(), ["sh", "-c"]);
        assert_eq!(worker.environment.get("A").map(String::as_str), Some("1"));
        assert_eq!(worker.ports[0].spec(), "22/tcp");
        // Interpolation from the variables given (the bundle's ENV), as `bundle up` sends them.
        let text = "services:\n  web:\n    image: ${REPO}/web:${TAG:-1}\n    ports: [\"${P}\"]\n";
        let vars = BTreeMap::from([
            ("REPO".to_string(), "r.local".to_string()),
            ("P".to_string(), "81".to_string()),
        ]);
        let app = parse_app("web", "c.yaml", text, &vars).unwrap();
        assert_eq!(app.images(), ["r.local/web:1"]);
        assert_eq!(app.services[0].ports[0].spec(), "81/tcp");
    }

    #[test]
    fn kisara_service_spec_json_and_yaml() {
        let json = r#"{"name":"pwn","containers":[
            {"name":"app","image":"kisara-test/busybox:latest","cmd":["nc","-ll","-p","9999"],
             "env":{"FLAG":"flag{x}"},"port_protocol":"9999/tcp,53/udp"},
            {"image":"127.0.0.1:5000/db:2"}]}"#;
        let app = parse_app("pwn", "svc.json", json, &BTreeMap::new()).unwrap();
        assert_eq!(app.kind, AppKind::KisaraService);
        assert_eq!(
            app.images(),
            ["kisara-test/busybox:latest", "127.0.0.1:5000/db:2"]
        );
        assert_eq!(app.services[0].ports.len(), 2);
        assert_eq!(app.services[1].name, "c1");
        let yaml = "containers:\n  - image: a/b:1\n    ports: [80]\n";
        let app = parse_app("y", "svc.yaml", yaml, &BTreeMap::new()).unwrap();
        assert_eq!(app.services[0].ports[0].spec(), "80/tcp");
    }

    #[test]
    fn bad_apps_are_named() {
        let cases = [
            (
                "services:\n  web:\n    build: .\n",
                "service web names no image",
            ),
            ("services: {}\n", "no services"),
            ("foo: 1\n", "neither a compose file"),
            (
                "services:\n  w:\n    image: x\n    ports: [\"1-5:1-5\"]\n",
                "port ranges",
            ),
            ("services: [\n", "invalid YAML"),
            ("{\"containers\": [{}]}", "names no image"),
        ];
        for (text, needle) in cases {
            let e = parse_app("myapp", "dir/app.yaml", text, &BTreeMap::new())
                .unwrap_err()
                .to_string();
            assert!(e.contains("myapp") && e.contains("dir/app.yaml"), "{e}");
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
