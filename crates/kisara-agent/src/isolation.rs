//! Host isolation: firewall rules that keep instances away from the node itself and, unless
//! their network asked for internet, from everything beyond their own network.
//!
//! Docker already keeps user-defined bridges apart from each other. What it does not do is
//! stop a container from opening connections to its host (every address of the host is one
//! hop away through the bridge gateway: the Kisara API, the agent, the gateway's ports, the
//! operator's own services), nor from forwarding traffic out when IP masquerade is off (a
//! network without NAT can still reach hosts that route back to it). Kisara names its bridges
//! `kn-<id>` (outbound off) and `ki-<id>` (internet asked for), so a handful of rules that
//! match those prefixes cover every Kisara network, present and future:
//!
//! ```text
//! INPUT       -i kn-+ -j KISARA-INPUT          (and -i ki-+)
//! KISARA-INPUT  ctstate RELATED,ESTABLISHED -j RETURN    replies to the host's own connections
//! KISARA-INPUT  -j DROP                                    nothing new reaches the host
//! DOCKER-USER -j KISARA-FORWARD                (FORWARD when Docker made no DOCKER-USER)
//! KISARA-FORWARD -i kn-+ ctstate RELATED,ESTABLISHED -j RETURN   players' published ports
//! KISARA-FORWARD -i kn-+ -o kn-+ -j RETURN                        within a network (AWD)
//! KISARA-FORWARD -i kn-+ -j DROP                                  no way out
//! ```
//!
//! Published ports keep working: players arrive on the host's other interfaces and the
//! replies are `ESTABLISHED`. The rules are installed idempotently at agent start (checked
//! with `-C` before each insert), for IPv4 and, where the host has it, IPv6; nothing of the
//! operator's is touched. `[node] isolation = false` removes Kisara's rules again.

use std::process::Stdio;

use kisara_api::bridge::{OFFLINE_PREFIX, ONLINE_PREFIX};

/// Chain for traffic from Kisara bridges to the host itself.
pub const INPUT_CHAIN: &str = "KISARA-INPUT";
/// Chain for traffic from Kisara bridges through the host.
pub const FORWARD_CHAIN: &str = "KISARA-FORWARD";

/// What went wrong running the firewall tool.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("{tool} {args}: {reason}")]
    Command {
        tool: String,
        args: String,
        reason: String,
    },
}

/// One rule: its chain, its position (`None` appends, `Some(1)` goes first) and its match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub chain: String,
    pub first: bool,
    pub spec: Vec<String>,
}

fn rule(chain: &str, first: bool, spec: &[&str]) -> Rule {
    Rule {
        chain: chain.to_string(),
        first,
        spec: spec.iter().map(|s| s.to_string()).collect(),
    }
}

/// The rules, in the order they are installed. `forward_hook` is `DOCKER-USER` where Docker
/// made it, else `FORWARD`.
pub fn plan(forward_hook: &str) -> Vec<Rule> {
    let offline = format!("{OFFLINE_PREFIX}+");
    let online = format!("{ONLINE_PREFIX}+");
    let established = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"];
    let mut rules = vec![
        rule(
            INPUT_CHAIN,
            false,
            &[&established[..], &["-j", "RETURN"]].concat(),
        ),
        rule(INPUT_CHAIN, false, &["-j", "DROP"]),
        rule(
            FORWARD_CHAIN,
            false,
            &[
                &["-i", offline.as_str()],
                &established[..],
                &["-j", "RETURN"],
            ]
            .concat(),
        ),
        rule(
            FORWARD_CHAIN,
            false,
            &["-i", &offline, "-o", &offline, "-j", "RETURN"],
        ),
        rule(FORWARD_CHAIN, false, &["-i", &offline, "-j", "DROP"]),
    ];
    // The hooks go last, so the chains are complete before traffic enters them.
    for prefix in [&offline, &online] {
        rules.push(rule("INPUT", true, &["-i", prefix, "-j", INPUT_CHAIN]));
    }
    rules.push(rule(forward_hook, true, &["-j", FORWARD_CHAIN]));
    rules
}

/// Runs the firewall tool; answers whether it exited with 0.
async fn run(tool: &str, args: &[String]) -> Result<bool, IsolationError> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| IsolationError::Command {
            tool: tool.to_string(),
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    Ok(out.status.success())
}

async fn must(tool: &str, args: Vec<String>) -> Result<(), IsolationError> {
    let out = tokio::process::Command::new(tool)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| IsolationError::Command {
            tool: tool.to_string(),
            args: args.join(" "),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IsolationError::Command {
            tool: tool.to_string(),
            args: args.join(" "),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn args(op: &str, chain: &str, extra: &[String]) -> Vec<String> {
    let mut v = vec!["-w".to_string(), op.to_string(), chain.to_string()];
    v.extend(extra.iter().cloned());
    v
}

/// Agents (and tests) on one host serialise their check-then-insert through this lock, so
/// two of them starting together cannot both insert a rule.
const LOCK_FILE: &str = "/run/kisara-isolation.lock";

/// Holds the host-wide isolation lock until dropped (best effort: without `/run`, unlocked).
async fn host_lock() -> Option<std::fs::File> {
    tokio::task::spawn_blocking(|| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)
            .ok()?;
        f.lock().ok()?;
        Some(f)
    })
    .await
    .ok()
    .flatten()
}

/// Installs the rules with `tool` (`iptables` or `ip6tables`); running it again changes
/// nothing.
pub async fn install_with(tool: &str) -> Result<(), IsolationError> {
    let _lock = host_lock().await;
    for chain in [INPUT_CHAIN, FORWARD_CHAIN] {
        // Fails when the chain exists, which is fine.
        let _ = run(tool, &args("-N", chain, &[])).await?;
    }
    let hook = if run(tool, &args("-S", "DOCKER-USER", &[])).await? {
        "DOCKER-USER"
    } else {
        "FORWARD"
    };
    for r in plan(hook) {
        if run(tool, &args("-C", &r.chain, &r.spec)).await? {
            continue;
        }
        let mut spec = Vec::new();
        let op = if r.first {
            spec.push("1".to_string());
            "-I"
        } else {
            "-A"
        };
        spec.extend(r.spec.iter().cloned());
        must(tool, args(op, &r.chain, &spec)).await?;
    }
    Ok(())
}

/// Removes Kisara's rules and chains (and nothing else).
pub async fn uninstall_with(tool: &str) -> Result<(), IsolationError> {
    let _lock = host_lock().await;
    for hook in ["DOCKER-USER", "FORWARD"] {
        for r in plan(hook).into_iter().filter(|r| r.first) {
            // A rule inserted twice by racing agents goes too; bounded all the same.
            for _ in 0..8 {
                if !run(tool, &args("-D", &r.chain, &r.spec)).await? {
                    break;
                }
            }
        }
    }
    for chain in [INPUT_CHAIN, FORWARD_CHAIN] {
        let _ = run(tool, &args("-F", chain, &[])).await?;
        let _ = run(tool, &args("-X", chain, &[])).await?;
    }
    Ok(())
}

/// Installs (or, with `enabled` false, removes) the rules for IPv4 and, where the host has
/// `ip6tables`, IPv6. IPv4 failing is an error; IPv6 failing is logged.
pub async fn apply(enabled: bool) -> Result<(), IsolationError> {
    let v4 = if enabled {
        install_with("iptables").await
    } else {
        uninstall_with("iptables").await
    };
    let v6 = if enabled {
        install_with("ip6tables").await
    } else {
        uninstall_with("ip6tables").await
    };
    if let Err(e) = v6 {
        tracing::debug!(error = %e, "IPv6 isolation rules not applied");
    }
    v4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_fills_chains_before_hooking_them() {
        let p = plan("DOCKER-USER");
        let first_hook = p.iter().position(|r| r.first).unwrap();
        assert!(p[..first_hook].iter().all(|r| !r.first));
        assert!(p[first_hook..].iter().all(|r| r.first));
        // Replies pass before anything is dropped, in both chains.
        for chain in [INPUT_CHAIN, FORWARD_CHAIN] {
            let rules: Vec<_> = p.iter().filter(|r| r.chain == chain).collect();
            assert!(rules[0].spec.contains(&"RELATED,ESTABLISHED".to_string()));
            assert_eq!(rules.last().unwrap().spec.last().unwrap(), "DROP");
        }
        // Only Kisara's bridges are matched.
        for r in &p {
            if let Some(i) = r.spec.iter().position(|s| s == "-i" || s == "-o") {
                let iface = &r.spec[i + 1];
                assert!(iface == "kn-+" || iface == "ki-+", "{r:?}");
            }
        }
        assert_eq!(p.last().unwrap().chain, "DOCKER-USER");
        assert_eq!(plan("FORWARD").last().unwrap().chain, "FORWARD");
    }
}
