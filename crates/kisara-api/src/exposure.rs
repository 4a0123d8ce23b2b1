//! Public port exposure: how a container port becomes a `host:port` players can `nc` to.
//!
//! Two modes. `host`: the node's engine publishes the port on a host port leased from the
//! node's range, and players connect to the node. `gateway`: the container publishes nothing;
//! a gateway listens on a port leased from its own range and carries each visitor's connection
//! to the owning node through a tunnel the node's agent opened outward.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Protocol;
use utoipa::ToSchema;

/// How a container's ports are exposed.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    Serialize,
    Deserialize,
    ToSchema,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum ExposeMode {
    /// A host port of the node (leased from its `port_range`), published by its engine.
    #[default]
    Host,
    /// A port of the gateway, tunnelled to the node; the container publishes nothing.
    Gateway,
}

impl ExposeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ExposeMode::Host => "host",
            ExposeMode::Gateway => "gateway",
        }
    }
}

impl fmt::Display for ExposeMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExposeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "host" => Ok(ExposeMode::Host),
            "gateway" => Ok(ExposeMode::Gateway),
            other => Err(format!(
                "unknown exposure mode {other:?} (expected host or gateway)"
            )),
        }
    }
}

/// An inclusive range of ports, written `30000-39999` (or a single `30000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// The default range of host ports and gateway ports.
    pub const DEFAULT: PortRange = PortRange {
        first: 30000,
        last: 39999,
    };

    pub fn len(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let parse = |p: &str| -> Result<u16, String> {
            let p = p.trim();
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("port range {text:?}: {p:?} is not a port number"));
            }
            match p.parse::<u32>() {
                Ok(n @ 1..=65535) => Ok(n as u16),
                _ => Err(format!(
                    "port range {text:?}: ports must be between 1 and 65535"
                )),
            }
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(text)?;
                (p, p)
            }
        };
        if first > last {
            return Err(format!(
                "port range {text:?}: the first port is above the last"
            ));
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Bytes carried for one container by the gateway (visitor → container is `bytes_in`).
/// Counted in gateway mode; host-mode traffic goes through the node's kernel, not Kisara.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Visitor connections (TCP) or sessions (UDP) open now.
    pub connections: u64,
}

/// A public port a standalone gateway (`kisara gateway`) listens on
/// (`GET /v1/gateway/ports`); its visitors are relayed to the server through
/// `GET /v1/gateway/relay/{protocol}/{port}`.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub struct GatewayPort {
    pub protocol: Protocol,
    pub port: u16,
}

/// How a node exposes ports, as its agent announces in its hello.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeExposure {
    /// `None`: the server's default.
    #[serde(default)]
    pub mode: Option<ExposeMode>,
    /// Host ports this node leases in host mode; `None`: the server's range.
    #[serde(default)]
    pub port_range: Option<PortRange>,
    /// Bandwidth caps of the node's exposed traffic, kbit/s (Kisara's `network_in`/`out`).
    #[serde(default)]
    pub network_in_kbps: Option<u64>,
    #[serde(default)]
    pub network_out_kbps: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_print() {
        let r: PortRange = "30000-39999".parse().unwrap();
        assert_eq!((r.first, r.last, r.len()), (30000, 39999, 10000));
        assert_eq!(r.to_string(), "30000-39999");
        let one: PortRange = " 4000 ".parse().unwrap();
        assert_eq!(one.len(), 1);
        for bad in ["", "0-10", "10-5", "a-b", "1-70000", "+1-2", "-"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            "Gateway".parse::<ExposeMode>().unwrap(),
            ExposeMode::Gateway
        );
        assert!("frp".parse::<ExposeMode>().unwrap_err().contains("frp"));
        let m: ExposeMode = serde_json::from_str("\"host\"").unwrap();
        assert_eq!(m, ExposeMode::Host);
    }
}
