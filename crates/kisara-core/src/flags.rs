//! Dynamic flags: templates rendered per instance, pure.
//!
//! A template is a fixed string or holds placeholders:
//!
//! | placeholder | becomes |
//! |---|---|
//! | `[uuid]` | a fresh random UUID (v4) |
//! | `[team_hash]` | 32 hex characters of HMAC-SHA256(server secret, owner, challenge[, round]) |
//! | `[random:N]` | N random hex characters, 1..=64 |
//!
//! `[team_hash]` makes a relaunch for the same owner and challenge give the same flag (the
//! scoreboard can recompute it), while another owner's flag tells nothing about it. AWD
//! rotation passes its round, so every round has fresh flags that are still reproducible.
//! Randomness comes in as a function, so rendering is deterministic under test.
//!
//! Messages never contain a rendered flag or a template (a fixed template is the flag).

use hmac::{Hmac, Mac};
use kisara_api::{FlagInjection, FlagSpec};
use serde::Deserialize;
use sha2::Sha256;

use crate::{CoreError, Result};

/// Longest template accepted (the rendered flag may be longer only by what `[uuid]` adds).
pub const MAX_TEMPLATE_LEN: usize = 512;
/// Most flags one instance may carry.
pub const MAX_FLAGS: usize = 16;
/// Longest exec injection timeout.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 300;

/// `[flags]` of the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagsSection {
    /// The key of `[team_hash]`. When absent the server generates one into its data directory
    /// (`flag.secret`, mode 0600) on first start and keeps it.
    pub secret: Option<kisara_api::agent::Secret>,
}

/// Who and what a flag is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlagContext<'a> {
    pub owner: Option<&'a str>,
    pub module: Option<&'a str>,
    /// 0 for a launch; an AWD round number for rotations.
    pub round: u64,
}

/// Checks a flag spec without rendering it: template shape, injection target.
pub fn validate(spec: &FlagSpec) -> Result<()> {
    let t = &spec.template;
    if t.is_empty() {
        return Err(CoreError::invalid("a flag template may not be empty"));
    }
    if t.len() > MAX_TEMPLATE_LEN {
        return Err(CoreError::invalid(format!(
            "a flag template may be at most {MAX_TEMPLATE_LEN} characters"
        )));
    }
    if t.chars().any(char::is_control) {
        return Err(CoreError::invalid(
            "a flag template may not contain control characters",
        ));
    }
    // Placeholders are checked by rendering with a fixed key and no randomness.
    render(spec, &[0; 32], &FlagContext::default(), &mut |b| b.fill(0))?;
    match &spec.inject {
        FlagInjection::Env { name } => {
            let ok = !name.is_empty()
                && name.len() <= 128
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(CoreError::invalid(format!(
                    "flag env name {name:?} must be letters, digits and '_', not starting with a digit"
                )));
            }
        }
        FlagInjection::File { path, mode } => {
            let ok = path.starts_with('/')
                && path.len() > 1
                && !path.ends_with('/')
                && path.len() <= 1024
                && !path.split('/').any(|c| c == ".." || c == ".")
                && !path.chars().any(char::is_control);
            if !ok {
                return Err(CoreError::invalid(format!(
                    "flag file path {path:?} must be an absolute file path without . or .."
                )));
            }
            if *mode > 0o777 {
                return Err(CoreError::invalid("flag file mode must be at most 0777"));
            }
        }
        FlagInjection::Exec {
            command,
            timeout_secs,
        } => {
            if command.trim().is_empty() {
                return Err(CoreError::invalid("a flag exec command may not be empty"));
            }
            if command.contains('\0') {
                return Err(CoreError::invalid(
                    "a flag exec command may not contain NUL bytes",
                ));
            }
            if !(1..=MAX_EXEC_TIMEOUT_SECS).contains(timeout_secs) {
                return Err(CoreError::invalid(format!(
                    "flag exec timeout must be 1..={MAX_EXEC_TIMEOUT_SECS} seconds"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a list of flag specs: each valid, at most [`MAX_FLAGS`], no two into one env name
/// or file path.
pub fn validate_all(specs: &[FlagSpec]) -> Result<()> {
    if specs.len() > MAX_FLAGS {
        return Err(CoreError::invalid(format!(
            "at most {MAX_FLAGS} flags per instance"
        )));
    }
    let mut targets = std::collections::BTreeSet::new();
    for spec in specs {
        validate(spec)?;
        let t = target(&spec.inject);
        if t != "exec" && !targets.insert(t.clone()) {
            return Err(CoreError::invalid(format!("two flags go to {t}")));
        }
    }
    Ok(())
}

/// Where a flag goes, as shown to callers: `env:FLAG`, `file:/flag`, `exec`.
pub fn target(inject: &FlagInjection) -> String {
    match inject {
        FlagInjection::Env { name } => format!("env:{name}"),
        FlagInjection::File { path, .. } => format!("file:{path}"),
        FlagInjection::Exec { .. } => "exec".to_string(),
    }
}

/// Renders a template. `fill` supplies random bytes.
pub fn render(
    spec: &FlagSpec,
    secret: &[u8],
    ctx: &FlagContext<'_>,
    fill: &mut dyn FnMut(&mut [u8]),
) -> Result<String> {
    let t = &spec.template;
    let mut out = String::with_capacity(t.len() + 36);
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open..];
        let Some(close) = after.find(']') else {
            out.push_str(after);
            rest = "";
            break;
        };
        let token = &after[1..close];
        match placeholder(token, secret, ctx, fill)? {
            Some(value) => out.push_str(&value),
            // Not a placeholder: brackets are ordinary characters of a flag.
            None => out.push_str(&after[..=close]),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn placeholder(
    token: &str,
    secret: &[u8],
    ctx: &FlagContext<'_>,
    fill: &mut dyn FnMut(&mut [u8]),
) -> Result<Option<String>> {
    Ok(Some(match token {
        "uuid" => {
            let mut b = [0u8; 16];
            fill(&mut b);
            uuid_v4(b)
        }
        "team_hash" => team_hash(secret, ctx),
        _ => match token.strip_prefix("random:") {
            Some(n) => {
                let n: usize =
                    n.parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or_else(|| {
                            CoreError::invalid(
                                "[random:N] needs N between 1 and 64 in a flag template",
                            )
                        })?;
                let mut b = vec![0u8; n.div_ceil(2)];
                fill(&mut b);
                let mut s = hex::encode(b);
                s.truncate(n);
                s
            }
            None => return Ok(None),
        },
    }))
}

/// 32 hex characters of HMAC-SHA256(secret, owner NUL module [NUL round]).
pub fn team_hash(secret: &[u8], ctx: &FlagContext<'_>) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(ctx.owner.unwrap_or("").as_bytes());
    mac.update(&[0]);
    mac.update(ctx.module.unwrap_or("").as_bytes());
    if ctx.round > 0 {
        mac.update(&[0]);
        mac.update(ctx.round.to_string().as_bytes());
    }
    let mut s = hex::encode(mac.finalize().into_bytes());
    s.truncate(32);
    s
}

fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: &str) -> FlagSpec {
        FlagSpec {
            template: t.into(),
            inject: FlagInjection::default(),
        }
    }

    fn counter() -> impl FnMut(&mut [u8]) {
        let mut n = 0u8;
        move |b: &mut [u8]| {
            for x in b {
                n = n.wrapping_add(1);
                *x = n;
            }
        }
    }

    #[test]
    fn templates_render() {
        let ctx = FlagContext {
            owner: Some("team1"),
            module: Some("web"),
            round: 0,
        };
        let key = b"k";
        let r = |t: &str| render(&spec(t), key, &ctx, &mut counter()).unwrap();
        assert_eq!(r("flag{fixed}"), "flag{fixed}");
        let u = r("flag{[uuid]}");
        assert_eq!(u, "flag{01020304-0506-4708-890a-0b0c0d0e0f10}");
        let h = r("flag{[team_hash]}");
        assert_eq!(h.len(), "flag{}".len() + 32);
        assert_eq!(r("[random:5]"), "01020");
        // Not placeholders: kept as written.
        assert_eq!(r("a[b]c[d"), "a[b]c[d");
        assert!(render(&spec("[random:0]"), key, &ctx, &mut counter()).is_err());
        assert!(render(&spec("[random:x]"), key, &ctx, &mut counter()).is_err());
    }

    #[test]
    fn team_hash_is_stable_per_owner_challenge_and_round() {
        let c = |owner, module, round| FlagContext {
            owner: Some(owner),
            module: Some(module),
            round,
        };
        let a = team_hash(b"secret", &c("t1", "web", 0));
        assert_eq!(a, team_hash(b"secret", &c("t1", "web", 0)));
        assert_ne!(a, team_hash(b"secret", &c("t2", "web", 0)));
        assert_ne!(a, team_hash(b"secret", &c("t1", "pwn", 0)));
        assert_ne!(a, team_hash(b"other", &c("t1", "web", 0)));
        assert_ne!(a, team_hash(b"secret", &c("t1", "web", 1)));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(
            team_hash(b"s", &c("ab", "c", 0)),
            team_hash(b"s", &c("a", "bc", 0))
        );
    }

    #[test]
    fn validation() {
        assert!(validate(&spec("flag{[uuid]}")).is_ok());
        assert!(validate(&spec("")).is_err());
        assert!(validate(&spec("a\nb")).is_err());
        let with = |inject| FlagSpec {
            template: "x".into(),
            inject,
        };
        assert!(validate(&with(FlagInjection::Env { name: "1X".into() })).is_err());
        assert!(validate(&with(FlagInjection::Env { name: "A=B".into() })).is_err());
        for bad in ["flag", "/", "/a/../b", "/dir/"] {
            let f = with(FlagInjection::File {
                path: bad.into(),
                mode: 0o444,
            });
            assert!(validate(&f).is_err(), "{bad}");
        }
        assert!(validate(&with(FlagInjection::Exec {
            command: " ".into(),
            timeout_secs: 5
        }))
        .is_err());
        assert!(validate(&with(FlagInjection::Exec {
            command: "echo $flag".into(),
            timeout_secs: 0
        }))
        .is_err());
        let two = vec![spec("a"), spec("b")];
        let e = validate_all(&two).unwrap_err().to_string();
        assert!(e.contains("env:FLAG"), "{e}");
    }

    #[test]
    fn errors_never_show_the_template() {
        let e = validate(&spec("flag{secret}\n")).unwrap_err().to_string();
        assert!(!e.contains("secret"), "{e}");
    }
}
