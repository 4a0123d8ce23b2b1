//! Tables, JSON and the small formatters the verbs share.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use comfy_table::{presets, Table};
use kisara_client::{ContainerState, NodeError, NodeState, PortBinding};
use serde::Serialize;

/// How a verb prints its answer.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Pretty JSON on stdout.
    pub fn print_json<T: Serialize + ?Sized>(&self, value: &T) -> anyhow::Result<()> {
        line(&serde_json::to_string_pretty(value)?)?;
        Ok(())
    }
}

/// Prints an SDK error the way every verb does: `error: <message> (<code>)`.
pub fn print_error(e: &kisara_client::Error) {
    match e.code() {
        Some(code) => eprintln!("error: {} ({code})", error_message(e)),
        None => eprintln!("error: {}", error_message(e)),
    }
}

/// The server's message for an API error; the error and its causes for any other.
pub fn error_message(e: &kisara_client::Error) -> String {
    match e {
        kisara_client::Error::Api { message, .. } => message.clone(),
        other => error_chain(other),
    }
}

/// An error and its sources on one line (`cannot reach ...: connection refused`).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// Warns, on stderr, about nodes that did not answer a list: the list is partial.
pub fn warn_node_errors(errors: &[NodeError]) {
    for e in errors {
        eprintln!(
            "warning: node {} did not answer: {} ({})",
            e.node_id, e.error.message, e.error.code
        );
    }
}

/// A table in the style of `docker ps`: no borders, columns two spaces apart.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING).set_header(header.to_vec());
    for col in t.column_iter_mut() {
        col.set_padding((0, 2));
    }
    t
}

/// Prints a table, or a lone header when it has no rows.
pub fn print_table(t: &Table) -> std::io::Result<()> {
    line(&t.trim_fmt())
}

/// One line on stdout. Unlike `println!` it returns an error rather than panicking when
/// stdout is closed (`kisara ps | head`); `run` takes a broken pipe as the reader being done.
pub fn line(s: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{s}")?;
    stdout.flush()
}

/// The first 12 characters of an id, without a `sha256:` prefix.
pub fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    match id.char_indices().nth(12) {
        Some((i, _)) => &id[..i],
        None => id,
    }
}

/// `10.0.0.1:30001->80/tcp, 10.0.0.1:30002->53/udp`.
pub fn format_ports(ports: &[PortBinding]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                "{}:{}->{}/{}",
                p.public_host, p.public_port, p.container_port, p.protocol
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn container_state(s: ContainerState) -> &'static str {
    match s {
        ContainerState::Created => "created",
        ContainerState::Running => "running",
        ContainerState::Paused => "paused",
        ContainerState::Restarting => "restarting",
        ContainerState::Exited => "exited",
        ContainerState::Dead => "dead",
        ContainerState::Gone => "gone",
        ContainerState::Unknown => "unknown",
        ContainerState::Launching => "launching",
        ContainerState::Lost => "lost",
    }
}

pub fn node_state(s: NodeState) -> &'static str {
    match s {
        NodeState::Ready => "ready",
        NodeState::Unreachable => "unreachable",
        NodeState::Down => "down",
    }
}

/// `-` for an absent value, so table columns never look shifted.
pub fn or_dash(s: Option<&str>) -> &str {
    match s {
        Some(s) if !s.is_empty() => s,
        _ => "-",
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `7.8 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long ago a Unix time was: `just now`, `5 minutes ago`, `3 days ago`.
pub fn ago(then: i64, now: i64) -> String {
    let secs = now.saturating_sub(then);
    if secs < 0 || then <= 0 {
        return "-".into();
    }
    let (n, unit) = match secs {
        0..60 => return "just now".into(),
        60..3600 => (secs / 60, "minute"),
        3600..86_400 => (secs / 3600, "hour"),
        86_400..2_592_000 => (secs / 86_400, "day"),
        2_592_000..31_536_000 => (secs / 2_592_000, "month"),
        _ => (secs / 31_536_000, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kisara_client::Protocol;

    #[test]
    fn ports_read_like_docker() {
        let ports = [
            PortBinding {
                container_port: 80,
                protocol: Protocol::Tcp,
                public_host: "10.0.0.1".into(),
                public_port: 30001,
            },
            PortBinding {
                container_port: 53,
                protocol: Protocol::Udp,
                public_host: "10.0.0.1".into(),
                public_port: 30002,
            },
        ];
        assert_eq!(
            format_ports(&ports),
            "10.0.0.1:30001->80/tcp, 10.0.0.1:30002->53/udp"
        );
        assert_eq!(format_ports(&[]), "");
    }

    #[test]
    fn short_ids() {
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        assert_eq!(short_id("c-42"), "c-42");
        assert_eq!(short_id("ééééééééééééééé"), "éééééééééééé");
    }

    #[test]
    fn bytes_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(8 * 1024 * 1024 * 1024), "8.0 GiB");
    }

    #[test]
    fn ages() {
        assert_eq!(ago(1000, 1030), "just now");
        assert_eq!(ago(1000, 1060), "1 minute ago");
        assert_eq!(ago(1000, 1000 + 7200), "2 hours ago");
        assert_eq!(ago(1000, 1000 + 3 * 86_400), "3 days ago");
        assert_eq!(ago(0, 1000), "-");
        assert_eq!(ago(2000, 1000), "-");
    }

    #[test]
    fn tables_have_no_borders() {
        let mut t = table(&["ID", "NAME"]);
        t.add_row(vec!["abc", "web"]);
        let s = t.trim_fmt();
        assert!(s.starts_with("ID"), "{s:?}");
        assert!(!s.contains('|') && !s.contains('+'), "{s:?}");
    }
}
