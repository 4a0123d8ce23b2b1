//! Instance lifecycle on the wire: lifetimes and renewals, dynamic flags, and AWD games.
//!
//! An *instance* is what a platform launches for an owner (team or user) and a challenge
//! (`module`): today one container, and a multi-container service once services land. Every
//! instance may carry a lifetime (TTL) that the caller renews, and flags that Kisara renders
//! from templates and injects into it. Flags are secrets: types holding one never print it in
//! `Debug`, and answers carry them only for callers allowed to see them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::ToSchema;

/// A flag to render and inject at launch.
///
/// `template` is a fixed string or holds placeholders: `[uuid]` (a fresh random UUID),
/// `[team_hash]` (an HMAC of owner and challenge with the server's secret, so a relaunch for
/// the same owner and challenge gives the same flag), `[random:N]` (N random hex characters,
/// 1..=64). Example: `flag{[team_hash]}`.
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FlagSpec {
    pub template: String,
    /// How the flag gets into the container (default: env `FLAG`).
    #[serde(default)]
    pub inject: FlagInjection,
}

impl fmt::Debug for FlagSpec {
    /// A fixed template is the flag itself, so it is never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlagSpec")
            .field("template", &"***")
            .field("inject", &self.inject)
            .finish()
    }
}

/// Where a flag goes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FlagInjection {
    /// An environment variable of the container.
    Env {
        #[serde(default = "default_env_name")]
        name: String,
    },
    /// A file written into the container before it starts (works with a read-only root).
    File {
        #[serde(default = "default_flag_path")]
        path: String,
        /// Octal mode as a string, e.g. `"0444"` (the default).
        #[serde(
            default = "default_flag_mode",
            serialize_with = "ser_mode",
            deserialize_with = "de_mode"
        )]
        #[schema(value_type = String)]
        mode: u32,
    },
    /// A shell command run in the container once it is up, with `$flag` (or `${flag}`)
    /// replaced by the flag; a non-zero exit or a timeout fails the launch.
    Exec {
        command: String,
        #[serde(default = "default_exec_timeout", alias = "timeout")]
        timeout_secs: u64,
    },
}

impl Default for FlagInjection {
    fn default() -> Self {
        FlagInjection::Env {
            name: default_env_name(),
        }
    }
}

fn default_env_name() -> String {
    "FLAG".to_string()
}
fn default_flag_path() -> String {
    "/flag".to_string()
}
fn default_flag_mode() -> u32 {
    0o444
}
fn default_exec_timeout() -> u64 {
    10
}

fn ser_mode<S: Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{mode:04o}"))
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    parse_mode(&text).ok_or_else(|| {
        serde::de::Error::custom(format!(
            "file mode {text:?} must be octal digits such as \"0444\" (at most 0777)"
        ))
    })
}

/// `"0444"`, `"444"`, `"0o444"` → 0o444; at most 0o777.
pub fn parse_mode(text: &str) -> Option<u32> {
    let t = text.trim();
    let t = t.strip_prefix("0o").unwrap_or(t);
    if t.is_empty() || t.len() > 4 {
        return None;
    }
    u32::from_str_radix(t, 8).ok().filter(|m| *m <= 0o777)
}

/// A flag as rendered for one instance: where it went and its value. `Debug` masks the value.
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InstanceFlag {
    /// `env:FLAG`, `file:/flag`, `exec`.
    pub target: String,
    pub value: String,
}

impl fmt::Debug for InstanceFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstanceFlag")
            .field("target", &self.target)
            .field("value", &"***")
            .finish()
    }
}

/// `POST /v1/containers/{id}/renew`: extends the lifetime.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// Seconds to extend by (default: the server's `renew_secs`); the new expiry is counted
    /// from now and capped by the maximum lifetime and the hard deadline.
    #[serde(default)]
    pub secs: Option<u64>,
}

/// An AWD game: one shared game network, one long-lived gamebox per team.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateAwdGameRequest {
    /// Game name (also the game network's name, `awd-<name>`).
    pub name: String,
    pub image: String,
    /// Team names; one gamebox each.
    pub teams: Vec<String>,
    /// The flag every gamebox gets; its injection must be `exec` for rotation to work
    /// (env and file flags are set once, at launch).
    pub flag: FlagSpec,
    /// Ports to publish on every gamebox (`80`, `80/tcp`).
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Node to run the game on (all gameboxes share one network, so one node).
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub memory_mb: Option<u64>,
    #[serde(default)]
    pub cpus: Option<f64>,
}

/// One team's gamebox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AwdGamebox {
    pub team: String,
    pub container_id: String,
    pub name: String,
    pub ip_address: Option<String>,
    pub host_port: String,
}

/// An AWD game.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AwdGame {
    pub id: String,
    pub name: String,
    pub image: String,
    pub node_id: String,
    /// The shared game network (outbound traffic off; gameboxes reach each other).
    pub network: String,
    pub subnet: String,
    pub gameboxes: Vec<AwdGamebox>,
    /// Current flag per team: only in answers to admin callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<BTreeMap<String, String>>,
    pub created_at: i64,
}

/// `POST /v1/awd/games/{id}/rotate`: a fresh flag in every gamebox.
#[derive(Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AwdRotateResponse {
    /// Team → the flag now in its gamebox.
    pub flags: BTreeMap<String, String>,
    /// Team → why its rotation failed (its old flag stays valid).
    #[serde(default)]
    pub errors: BTreeMap<String, String>,
}

impl fmt::Debug for AwdRotateResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwdRotateResponse")
            .field("teams", &self.flags.keys().collect::<Vec<_>>())
            .field("errors", &self.errors)
            .finish()
    }
}

/// `POST /v1/awd/games/{id}/reset`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwdResetRequest {
    pub team: String,
}

/// Names of the Linux bridges of Kisara's networks. The node's isolation rules match them by
/// prefix, so a network's bridge name says whether it may reach the outside.
pub mod bridge {
    /// Bridges of networks with outbound traffic off.
    pub const OFFLINE_PREFIX: &str = "kn-";
    /// Bridges of networks that asked for internet.
    pub const ONLINE_PREFIX: &str = "ki-";

    /// `kn-<id>` / `ki-<id>`, at most 15 characters (the kernel's limit on interface names).
    pub fn name(network_id: &str, internet: bool) -> String {
        let prefix = if internet {
            ONLINE_PREFIX
        } else {
            OFFLINE_PREFIX
        };
        let id: String = network_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(15 - prefix.len())
            .collect();
        format!("{prefix}{id}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_specs_parse_with_defaults() {
        let f: FlagSpec = serde_json::from_str(r#"{"template":"flag{[uuid]}"}"#).unwrap();
        assert_eq!(
            f.inject,
            FlagInjection::Env {
                name: "FLAG".into()
            }
        );
        let f: FlagSpec =
            serde_json::from_str(r#"{"template":"x","inject":{"file":{"mode":"0400"}}}"#).unwrap();
        assert_eq!(
            f.inject,
            FlagInjection::File {
                path: "/flag".into(),
                mode: 0o400
            }
        );
        let s = serde_json::to_string(&f).unwrap();
        assert!(s.contains(r#""mode":"0400""#), "{s}");
        let f: FlagSpec = serde_json::from_str(
            r#"{"template":"x","inject":{"exec":{"command":"echo $flag > /f","timeout":3}}}"#,
        )
        .unwrap();
        assert_eq!(
            f.inject,
            FlagInjection::Exec {
                command: "echo $flag > /f".into(),
                timeout_secs: 3
            }
        );
        let e = serde_json::from_str::<FlagSpec>(
            r#"{"template":"x","inject":{"file":{"mode":"999"}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("octal"), "{e}");
    }

    #[test]
    fn flags_are_masked_in_debug() {
        let f = FlagSpec {
            template: "flag{fixed}".into(),
            inject: FlagInjection::default(),
        };
        assert!(!format!("{f:?}").contains("fixed"));
        let i = InstanceFlag {
            target: "env:FLAG".into(),
            value: "flag{v}".into(),
        };
        assert!(!format!("{i:?}").contains("flag{v}"));
        let r = AwdRotateResponse {
            flags: [("t1".to_string(), "flag{r}".to_string())].into(),
            errors: BTreeMap::new(),
        };
        assert!(!format!("{r:?}").contains("flag{r}"));
    }

    #[test]
    fn bridge_names_fit_the_kernel() {
        assert_eq!(bridge::name("0123456789ab", false), "kn-0123456789ab");
        assert_eq!(bridge::name("0123456789abcdef", true), "ki-0123456789ab");
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0444"), Some(0o444));
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0o755"), Some(0o755));
        assert_eq!(parse_mode("8"), None);
        assert_eq!(parse_mode("01777"), None);
        assert_eq!(parse_mode(""), None);
    }
}
