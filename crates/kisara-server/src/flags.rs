//! Flags of instances: the server's secret, rendering a launch's flag specs, and injecting
//! them — env and files into the container's config before it is created, exec commands once
//! it runs.
//!
//! A flag is a secret from the moment it is rendered. It travels to the agent inside the
//! container config (whose `Debug` masks env values and file contents) or inside an exec
//! request's environment (the command itself never holds it: `sh -c` expands `$flag` from the
//! environment), and nothing here logs a value. Error messages about a failed flag command
//! have the flag replaced by `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use kisara_api::agent::{ContainerConfig, ContainerFile, Operation, Reply, Secret};
use kisara_api::{ExecRequest, FlagInjection, FlagSpec, InstanceFlag, LaunchRequest};
use kisara_core::config::ServerSettings;
use kisara_core::flags::{self as core_flags, FlagContext};

use crate::error::{ApiError, ApiResult};
use crate::{tokens, AppState};

/// Libraries that log whole request and frame bodies at debug/trace level (the Engine API
/// client, the WebSocket and HTTP stacks). Those bodies carry flags (a container's env, an
/// exec's environment, a file's contents), so a process that logs must cap these targets at
/// `info`, whatever verbosity the operator asks for: `kisara` does (see [`quiet_directives`]).
pub const BODY_LOGGING_TARGETS: &[&str] = &[
    "bollard",
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "h2",
    "reqwest",
    "axum",
    "tower_http",
];

/// `target=info` for each of [`BODY_LOGGING_TARGETS`], as `EnvFilter` directives.
pub fn quiet_directives() -> impl Iterator<Item = String> {
    BODY_LOGGING_TARGETS.iter().map(|t| format!("{t}=info"))
}

/// The generated secret of `[team_hash]` flags, in the data directory (mode 0600).
pub const FLAG_SECRET_FILE: &str = "flag.secret";
/// Name of the environment variable a flag command finds its flag in.
pub const EXEC_FLAG_VAR: &str = "flag";

/// The configured secret, else the one in the data directory (made on first start).
pub fn load_secret(settings: &ServerSettings, data_dir: &Path) -> std::io::Result<Secret> {
    match &settings.flag_secret {
        Some(s) => Ok(s.clone()),
        None => tokens::load_or_create(&data_dir.join(FLAG_SECRET_FILE), "ksf_"),
    }
}

/// A flag command to run once the container is up.
#[derive(Clone)]
pub struct ExecFlag {
    pub command: String,
    pub timeout_secs: u64,
    pub value: Secret,
}

/// A launch's flags, rendered. `Debug` shows targets only.
#[derive(Clone, Default)]
pub struct Rendered {
    pub env: Vec<(String, Secret)>,
    pub files: Vec<ContainerFile>,
    pub execs: Vec<ExecFlag>,
    /// What the caller is told (admin callers only).
    pub flags: Vec<InstanceFlag>,
}

impl fmt::Debug for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rendered")
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// The request's flag specs: `flags`, plus Kisara's `flag` (+ `flag_command`) shape.
pub fn specs(req: &LaunchRequest) -> ApiResult<Vec<FlagSpec>> {
    let mut specs = req.flags.clone();
    match (&req.flag, &req.flag_command) {
        (Some(flag), command) => specs.push(FlagSpec {
            template: flag.expose().to_string(),
            inject: match command {
                Some(command) => FlagInjection::Exec {
                    command: command.clone(),
                    timeout_secs: 10,
                },
                None => FlagInjection::Env {
                    name: "FLAG".into(),
                },
            },
        }),
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "flag_command needs a flag (a value or a template such as flag{[uuid]})",
            ))
        }
        (None, None) => {}
    }
    core_flags::validate_all(&specs)?;
    Ok(specs)
}

/// Renders every spec for `owner`/`module` in `round` (0 at launch).
pub fn render(
    st: &AppState,
    specs: &[FlagSpec],
    owner: Option<&str>,
    module: Option<&str>,
    round: u64,
) -> ApiResult<Rendered> {
    let ctx = FlagContext {
        owner,
        module,
        round,
    };
    let secret = st.flag_secret.expose().as_bytes();
    let mut fill = |b: &mut [u8]| rand::RngCore::fill_bytes(&mut rand::rng(), b);
    let mut out = Rendered::default();
    for spec in specs {
        let value = core_flags::render(spec, secret, &ctx, &mut fill)?;
        out.flags.push(InstanceFlag {
            target: core_flags::target(&spec.inject),
            value: value.clone(),
        });
        match &spec.inject {
            FlagInjection::Env { name } => out.env.push((name.clone(), Secret(value))),
            FlagInjection::File { path, mode } => out.files.push(ContainerFile {
                path: path.clone(),
                mode: *mode,
                contents: Secret(value),
            }),
            FlagInjection::Exec {
                command,
                timeout_secs,
            } => out.execs.push(ExecFlag {
                command: command.clone(),
                timeout_secs: *timeout_secs,
                value: Secret(value),
            }),
        }
    }
    Ok(out)
}

/// Puts env and file flags into the config (a flag's env variable wins over the request's).
pub fn apply(config: &mut ContainerConfig, r: &Rendered) {
    for (name, value) in &r.env {
        let prefix = format!("{name}=");
        config.env.retain(|kv| !kv.starts_with(&prefix));
        config.env.push(format!("{name}={}", value.expose()));
    }
    config.files.extend(r.files.iter().cloned());
}

/// Runs every exec flag in the container, in order; the first failure is the error.
pub async fn run_execs(
    st: &AppState,
    node_id: &str,
    docker_id: &str,
    r: &Rendered,
) -> ApiResult<()> {
    for e in &r.execs {
        exec(st, node_id, docker_id, e).await?;
    }
    Ok(())
}

/// Runs one flag command: `sh -c COMMAND` as root with the flag in `$flag`. A non-zero exit
/// or a timeout is an error whose message has the flag masked.
pub async fn exec(st: &AppState, node_id: &str, docker_id: &str, e: &ExecFlag) -> ApiResult<()> {
    let request = ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), e.command.clone()],
        env: BTreeMap::from([(EXEC_FLAG_VAR.to_string(), e.value.expose().to_string())]),
        user: Some("0".into()),
        workdir: None,
        timeout_secs: Some(e.timeout_secs),
    };
    let reply = st
        .hub
        .call(
            node_id,
            Operation::Exec {
                docker_id: docker_id.to_string(),
                request,
            },
            Duration::from_secs(e.timeout_secs + 10),
        )
        .await
        .map_err(|err| ApiError {
            message: format!("flag command: {}", mask(&err.message, e.value.expose())),
            ..err
        })?;
    let result = match reply {
        Reply::Exec(r) => r,
        _ => return Err(ApiError::internal("unexpected reply to a flag command")),
    };
    if result.timed_out {
        return Err(ApiError::bad_request(format!(
            "the flag command did not finish within {} s",
            e.timeout_secs
        )));
    }
    match result.exit_code {
        Some(0) => Ok(()),
        code => {
            let stderr: String = result.stderr.chars().take(500).collect();
            Err(ApiError::bad_request(format!(
                "the flag command exited with code {}: {}",
                code.map_or_else(|| "unknown".to_string(), |c| c.to_string()),
                mask(stderr.trim(), e.value.expose())
            )))
        }
    }
}

/// `text` with every occurrence of `flag` replaced by `***`.
pub fn mask(text: &str, flag: &str) -> String {
    if flag.is_empty() {
        text.to_string()
    } else {
        text.replace(flag, "***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kisara_shape_maps_to_specs() {
        let req: LaunchRequest = serde_json::from_str(
            r#"{"image":"x","flag":"flag{[uuid]}","flag_command":"echo $flag > /flag"}"#,
        )
        .unwrap();
        let s = specs(&req).unwrap();
        assert!(matches!(s[0].inject, FlagInjection::Exec { .. }));
        let req: LaunchRequest =
            serde_json::from_str(r#"{"image":"x","flag_command":"echo $flag"}"#).unwrap();
        assert!(specs(&req).is_err());
    }

    #[test]
    fn env_flags_replace_request_env() {
        let mut c = ContainerConfig {
            env: vec!["FLAG=user".into(), "A=1".into()],
            ..Default::default()
        };
        let r = Rendered {
            env: vec![("FLAG".into(), Secret("flag{x}".into()))],
            ..Default::default()
        };
        apply(&mut c, &r);
        assert_eq!(c.env, vec!["A=1".to_string(), "FLAG=flag{x}".to_string()]);
        assert!(!format!("{r:?}").contains("flag{x}"));
        assert_eq!(
            mask("sh: flag{x}: not found", "flag{x}"),
            "sh: ***: not found"
        );
    }
}
