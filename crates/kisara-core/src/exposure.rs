//! Exposure settings: the server's default mode and host-port range, and the gateway role.
//!
//! ```toml
//! [server]
//! exposure = "host"              # default mode of nodes that name none
//! port_range = "30000-39999"     # host ports of nodes that name none
//!
//! [node]
//! exposure = "gateway"           # this node's mode (a request's `expose` overrides it)
//! port_range = "31000-31999"     # this node's host ports
//! network_in = 100000            # kbit/s into this node's exposed containers (Kisara's key)
//! network_out = 100000           # kbit/s out of them
//!
//! [gateway]
//! enabled = true                 # on by default in `kisara up`, off in `kisara server`
//! listen_host = "0.0.0.0"
//! port_range = "20000-29999"
//! public_address = "ctf.example.org"
//! udp_idle_secs = 60
//! listen = true                  # false: a separate `kisara gateway` process listens
//! ```

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use kisara_api::{ExposeMode, PortRange};
use serde::Deserialize;

use crate::{CoreError, Result};

/// Default range of the gateway's public ports (apart from the host-port range, so both
/// modes can share one machine).
pub const DEFAULT_GATEWAY_RANGE: PortRange = PortRange {
    first: 20000,
    last: 29999,
};

/// `[gateway]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub enabled: Option<bool>,
    /// Address the public listeners bind (default `0.0.0.0`).
    pub listen_host: Option<String>,
    pub port_range: Option<PortRange>,
    /// Host name or address players are told (default `server.public_address`, else the
    /// listen host, else 127.0.0.1).
    pub public_address: Option<String>,
    /// A UDP visitor silent this long loses its session (default 60).
    pub udp_idle_secs: Option<u64>,
    /// Whether the server itself listens on the gateway's public ports (default true). With
    /// `false` the server still leases them and carries their traffic to the nodes, while
    /// standalone `kisara gateway` processes listen and relay visitors to it.
    pub listen: Option<bool>,
}

/// The gateway role, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    pub enabled: bool,
    pub listen_host: IpAddr,
    pub port_range: PortRange,
    pub public_address: String,
    pub udp_idle: Duration,
    /// The server opens the public listeners itself (else `kisara gateway` does).
    pub listen: bool,
}

/// Exposure as the server runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExposureSettings {
    /// Mode of nodes that announce none.
    pub default_mode: ExposeMode,
    /// Host ports of nodes that announce no range of their own.
    pub host_port_range: PortRange,
    pub gateway: GatewaySettings,
}

impl Default for ExposureSettings {
    fn default() -> Self {
        resolve(None, None, &GatewaySection::default(), None).expect("the defaults are valid")
    }
}

/// Resolves the server's exposure settings from `[server]`'s keys and `[gateway]`.
pub fn resolve(
    mode: Option<ExposeMode>,
    host_range: Option<PortRange>,
    gw: &GatewaySection,
    server_public_address: Option<&str>,
) -> Result<ExposureSettings> {
    let listen_host = match &gw.listen_host {
        Some(h) => h.trim().parse().map_err(|_| {
            CoreError::invalid(format!("gateway.listen_host: {h:?} is not an IP address"))
        })?,
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    };
    let public_address = gw
        .public_address
        .clone()
        .or_else(|| server_public_address.map(str::to_string))
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| {
            if listen_host.is_unspecified() {
                "127.0.0.1".to_string()
            } else {
                listen_host.to_string()
            }
        });
    let udp_idle_secs = gw.udp_idle_secs.unwrap_or(60);
    if !(1..=86_400).contains(&udp_idle_secs) {
        return Err(CoreError::invalid(format!(
            "gateway.udp_idle_secs must be 1..=86400, got {udp_idle_secs}"
        )));
    }
    Ok(ExposureSettings {
        default_mode: mode.unwrap_or_default(),
        host_port_range: host_range.unwrap_or(PortRange::DEFAULT),
        gateway: GatewaySettings {
            enabled: gw.enabled.unwrap_or(false),
            listen_host,
            port_range: gw.port_range.unwrap_or(DEFAULT_GATEWAY_RANGE),
            public_address,
            udp_idle: Duration::from_secs(udp_idle_secs),
            listen: gw.listen.unwrap_or(true),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let s = ExposureSettings::default();
        assert_eq!(s.default_mode, ExposeMode::Host);
        assert_eq!(s.host_port_range, PortRange::DEFAULT);
        assert!(!s.gateway.enabled);
        assert_eq!(s.gateway.public_address, "127.0.0.1");
        assert_eq!(s.gateway.port_range, DEFAULT_GATEWAY_RANGE);
    }

    #[test]
    fn bad_values_are_named() {
        let gw = GatewaySection {
            listen_host: Some("nope".into()),
            ..Default::default()
        };
        let e = resolve(None, None, &gw, None).unwrap_err().to_string();
        assert!(e.contains("gateway.listen_host"), "{e}");
        let gw = GatewaySection {
            udp_idle_secs: Some(0),
            ..Default::default()
        };
        assert!(resolve(None, None, &gw, None).is_err());
    }
}
