//! Port specs as users write them: `80`, `80/tcp`, `53/udp`, and Kisara's comma-separated
//! `port_protocol` (`"80/tcp,22/tcp"`).

use kisara_api::{PortSpec, Protocol};

use crate::{CoreError, Result};

/// Parses one port spec. The protocol is case-insensitive and defaults to TCP; surrounding
/// whitespace is ignored.
pub fn parse_port_spec(text: &str) -> Result<PortSpec> {
    let spec = text.trim();
    if spec.is_empty() {
        return Err(CoreError::invalid("empty port spec"));
    }
    let (port, protocol) = match spec.split_once('/') {
        Some((port, proto)) => (port.trim(), parse_protocol(spec, proto.trim())?),
        None => (spec, Protocol::Tcp),
    };
    // `u16::from_str` accepts a leading `+`; a port is digits and nothing else.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(CoreError::invalid(format!(
            "invalid port spec {spec:?}: the port must be a number"
        )));
    }
    let port = match port.parse::<u32>() {
        Ok(p @ 1..=65535) => p as u16,
        _ => {
            return Err(CoreError::invalid(format!(
                "invalid port spec {spec:?}: the port must be between 1 and 65535"
            )))
        }
    };
    Ok(PortSpec { port, protocol })
}

fn parse_protocol(spec: &str, proto: &str) -> Result<Protocol> {
    if proto.eq_ignore_ascii_case("tcp") {
        Ok(Protocol::Tcp)
    } else if proto.eq_ignore_ascii_case("udp") {
        Ok(Protocol::Udp)
    } else {
        Err(CoreError::invalid(format!(
            "invalid port spec {spec:?}: unknown protocol {proto:?} (expected tcp or udp)"
        )))
    }
}

/// Merges a request's `ports` with Kisara's `port_protocol` string: `ports` first, then the
/// comma-separated items, each port once, in first-seen order (so `host_port` strings line up
/// with what the caller wrote). Empty items of `port_protocol` (`"80/tcp,"`) are skipped, as
/// Kisara's own parser did; an empty item of `ports` is an error.
pub fn parse_ports(ports: &[String], port_protocol: Option<&str>) -> Result<Vec<PortSpec>> {
    let extra = port_protocol
        .unwrap_or("")
        .split(',')
        .filter(|item| !item.trim().is_empty());
    let mut out: Vec<PortSpec> = Vec::new();
    for text in ports.iter().map(String::as_str).chain(extra) {
        let spec = parse_port_spec(text)?;
        // Requests carry a handful of ports; a linear scan beats a set here.
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(port: u16) -> PortSpec {
        PortSpec {
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn udp(port: u16) -> PortSpec {
        PortSpec {
            port,
            protocol: Protocol::Udp,
        }
    }

    #[test]
    fn parses_valid_specs() {
        let cases = [
            ("80", tcp(80)),
            ("80/tcp", tcp(80)),
            ("53/udp", udp(53)),
            ("53/UDP", udp(53)),
            ("  8080/Tcp ", tcp(8080)),
            ("22 / tcp", tcp(22)),
            ("1", tcp(1)),
            ("65535/udp", udp(65535)),
            ("0080", tcp(80)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_port_spec(text), Ok(want), "{text:?}");
        }
    }

    #[test]
    fn rejects_invalid_specs_naming_them() {
        let cases = [
            ("", "empty"),
            ("   ", "empty"),
            ("0", "\"0\""),
            ("65536", "\"65536\""),
            ("99999999999", "\"99999999999\""),
            ("80/sctp", "sctp"),
            ("80/", "unknown protocol"),
            ("/tcp", "\"/tcp\""),
            ("http", "\"http\""),
            ("+80", "\"+80\""),
            ("-1", "\"-1\""),
            ("80/tcp/udp", "tcp/udp"),
            ("8 0", "\"8 0\""),
        ];
        for (text, needle) in cases {
            match parse_port_spec(text) {
                Err(CoreError::Invalid(msg)) => {
                    assert!(msg.contains(needle), "{text:?}: {msg}")
                }
                other => panic!("{text:?}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn merges_ports_and_port_protocol() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: Vec<(Vec<String>, Option<&str>, Vec<PortSpec>)> = vec![
            (s(&[]), None, vec![]),
            (s(&[]), Some(""), vec![]),
            (s(&[]), Some("80/tcp,22/tcp"), vec![tcp(80), tcp(22)]),
            (s(&["80"]), Some("80/tcp,22/tcp"), vec![tcp(80), tcp(22)]),
            (s(&["53/udp", "53"]), Some("53/tcp"), vec![udp(53), tcp(53)]),
            (
                s(&["22", "80"]),
                Some(" 80/tcp , 22 ,"),
                vec![tcp(22), tcp(80)],
            ),
            (
                s(&[]),
                Some("9999,1234/UDP,9999/tcp"),
                vec![tcp(9999), udp(1234)],
            ),
        ];
        for (ports, pp, want) in cases {
            assert_eq!(parse_ports(&ports, pp), Ok(want), "{ports:?} {pp:?}");
        }
    }

    #[test]
    fn merge_reports_the_bad_item() {
        let err = parse_ports(&["80".into()], Some("22/tcp,abc/tcp")).unwrap_err();
        assert!(err.to_string().contains("abc/tcp"), "{err}");
        let err = parse_ports(&["".into()], None).unwrap_err();
        assert!(matches!(err, CoreError::Invalid(_)));
    }
}
