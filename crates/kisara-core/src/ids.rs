//! Identifiers and generated names. Randomness comes from the caller, so these stay pure.

/// Hex of the first six bytes: a 12-character id like Docker's short ids. Fewer than six
/// bytes give a shorter id, so callers should pass at least six random bytes.
pub fn short_id(bytes: &[u8]) -> String {
    bytes.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Whether `name` is a valid container or network name: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, at most
/// [`MAX_NAME_LEN`] characters (Docker's own rule, minus its leading `/`).
pub fn is_valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    name.len() <= MAX_NAME_LEN && bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Longest name Kisara accepts. Docker has no limit of its own, but names end up in hostnames,
/// labels and log lines, so an unbounded name is only a liability.
pub const MAX_NAME_LEN: usize = 128;

/// Reduces free text (a module or owner name) to name characters: anything else becomes `-`,
/// runs of `-` collapse, and the result is cut to `max` characters.
pub fn sanitize_name_part(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
        if out.len() >= max {
            break;
        }
    }
    out.trim_end_matches('-').to_string()
}

/// Generated container name: `kisara-<module>-<owner>-<id>`, leaving out the parts that are
/// absent, so `docker ps` on a node tells an operator whose instance is whose.
pub fn container_name(module: Option<&str>, owner: Option<&str>, id: &str) -> String {
    let mut name = String::from("kisara");
    for part in [module, owner].into_iter().flatten() {
        let part = sanitize_name_part(part, 32);
        if !part.is_empty() {
            name.push('-');
            name.push_str(&part);
        }
    }
    name.push('-');
    name.push_str(id);
    name
}

/// Name of the network made for one container (or instance) with Kisara id `id`.
pub fn network_name(id: &str) -> String {
    format!("kisara-net-{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_ids() {
        assert_eq!(
            short_id(&[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3]),
            "deadbeef0001"
        );
        assert_eq!(short_id(&[0xab]), "ab");
        assert_eq!(short_id(&[0; 32]).len(), 12);
    }

    #[test]
    fn names() {
        for ok in ["a", "web", "Web-1", "a.b_c-d", "0abc"] {
            assert!(is_valid_name(ok), "{ok}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        for bad in ["", "-a", "_a", ".a", "a b", "a/b", "é", long.as_str()] {
            assert!(!is_valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn generated_names_are_valid() {
        let cases = [
            (Some("pwn 1"), Some("42"), "kisara-pwn-1-42-abc"),
            (None, Some("team/7"), "kisara-team-7-abc"),
            (Some("!!!"), None, "kisara-abc"),
            (None, None, "kisara-abc"),
            (Some("Web.Chal"), Some("--x--"), "kisara-Web.Chal-x-abc"),
        ];
        for (module, owner, want) in cases {
            let name = container_name(module, owner, "abc");
            assert_eq!(name, want);
            assert!(is_valid_name(&name));
        }
        assert!(container_name(Some(&"m".repeat(500)), None, "abc").len() < 64);
        assert!(is_valid_name(&network_name("0123456789ab")));
    }
}
