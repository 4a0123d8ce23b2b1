//! The agent's end of gateway tunnels.
//!
//! Asked over the control channel (`OpenTunnel`), the agent first connects to the container's
//! private address (it runs on the Docker host, so it reaches container addresses on bridges
//! even where outbound traffic is off), then dials a data connection of its own to the server
//! (`GET /v1/agent/tunnel/{id}`, upgraded to raw bytes; TLS when the server speaks it) and
//! copies both ways. The connection is outward, so a node behind NAT needs no inbound port.
//! A container that refuses is an error answered at once: the gateway closes the visitor's
//! connection instead of accepting it into silence.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kisara_api::agent::{AgentMessage, Reply, Secret};
use kisara_api::{codes, ErrorBody, Protocol, NODE_ID_HEADER};
use kisara_tunnel::relay::Accounting;
use kisara_tunnel::udp::Duplex;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// How long connecting to the container or to the server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP tunnel with no datagram either way for this long is closed (the gateway's own idle
/// timeout normally ends it first).
const UDP_IDLE: Duration = Duration::from_secs(600);

/// How this agent dials the server for data connections.
pub struct Dialer {
    /// `host:port` of the server.
    authority: String,
    /// Host name for TLS, with the client configuration, when the server is `https://`.
    tls: Option<(
        rustls_pki_types::ServerName<'static>,
        Arc<rustls::ClientConfig>,
    )>,
    /// Headers that authenticate the caller (a credential among them: never logged).
    auth: Vec<(&'static str, Secret)>,
}

impl Dialer {
    /// `server_url` is the agent's `http(s)://host:port` (or `ws(s)://`); the agent presents
    /// its node id and credential.
    pub fn new(
        server_url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        node_id: String,
        credential: Option<Secret>,
    ) -> Option<Dialer> {
        let mut auth = vec![(NODE_ID_HEADER, Secret(node_id))];
        if let Some(c) = credential {
            auth.push(("Authorization", Secret(format!("Bearer {}", c.expose()))));
        }
        Self::with_auth(server_url, tls, auth)
    }

    /// A dialer that presents a bearer token (a standalone `kisara gateway`).
    pub fn with_bearer(
        server_url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        token: &Secret,
    ) -> Option<Dialer> {
        let auth = vec![(
            "Authorization",
            Secret(format!("Bearer {}", token.expose())),
        )];
        Self::with_auth(server_url, tls, auth)
    }

    fn with_auth(
        server_url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        auth: Vec<(&'static str, Secret)>,
    ) -> Option<Dialer> {
        let url = server_url.trim_end_matches('/');
        let (secure, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            return None;
        };
        let authority = rest.split('/').next().unwrap_or(rest).to_string();
        // Host without the port (and without brackets for IPv6) names the server for TLS.
        let host = match authority.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority.as_str(),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let authority = if authority.contains(':') && !authority.ends_with(']') {
            authority
        } else if secure {
            format!("{authority}:443")
        } else {
            format!("{authority}:80")
        };
        let tls = if secure {
            let name = rustls_pki_types::ServerName::try_from(host).ok()?;
            let config = tls.unwrap_or_else(|| {
                let roots = rustls::RootCertStore::empty();
                Arc::new(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                )
            });
            Some((name, config))
        } else {
            None
        };
        Some(Dialer {
            authority,
            tls,
            auth,
        })
    }

    /// Opens a data connection: `GET path` upgraded to raw bytes (`/v1/agent/tunnel/{id}` for
    /// an agent, `/v1/gateway/relay/...` for a standalone gateway).
    pub async fn dial(&self, path: &str) -> Result<Box<dyn Duplex>, String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("connecting to the server at {} timed out", self.authority))?
            .map_err(|e| format!("connecting to the server at {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        let headers: Vec<(&str, &str)> = self.auth.iter().map(|(k, v)| (*k, v.expose())).collect();
        let mut stream: Box<dyn Duplex> = match &self.tls {
            Some((name, config)) => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with the server: {e}"))?;
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            kisara_tunnel::upgrade::request(&mut stream, &self.authority, path, &headers),
        )
        .await
        .map_err(|_| "the server did not answer the tunnel".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(stream)
    }
}

/// Serves one `OpenTunnel`: connects to `target`, dials the data connection, answers the
/// request, then copies until either end closes.
pub async fn open(
    dialer: Arc<Dialer>,
    id: u64,
    tunnel_id: String,
    target: String,
    protocol: Protocol,
    tx: mpsc::Sender<AgentMessage>,
) {
    let answer = |result: Result<(), String>| AgentMessage::Reply {
        id,
        result: result
            .map(|_| Reply::Done)
            .map_err(|m| ErrorBody::new(codes::RUNTIME, m)),
    };
    let target: SocketAddr = match target.parse() {
        Ok(t) => t,
        Err(_) => {
            let _ = tx
                .send(answer(Err(format!("{target:?} is not an ip:port"))))
                .await;
            return;
        }
    };
    match protocol {
        Protocol::Tcp => {
            let upstream =
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let _ = tx
                            .send(answer(Err(format!("container at {target}: {e}"))))
                            .await;
                        return;
                    }
                    Err(_) => {
                        let _ = tx
                            .send(answer(Err(format!("container at {target} did not answer"))))
                            .await;
                        return;
                    }
                };
            let _ = upstream.set_nodelay(true);
            let data = match dialer.dial(&format!("/v1/agent/tunnel/{tunnel_id}")).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(answer(Err(e))).await;
                    return;
                }
            };
            let _ = tx.send(answer(Ok(()))).await;
            // Relay with the gateway as the visitor side; bandwidth is counted and capped at
            // the gateway, which sees every byte.
            if let Err(e) = kisara_tunnel::relay(data, upstream, &Accounting::default()).await {
                tracing::debug!(%target, error = %e, "tunnel ended with an error");
            }
        }
        Protocol::Udp => {
            let bind: SocketAddr = if target.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = match kisara_tunnel::udp::bind(bind).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(answer(Err(format!("UDP socket: {e}")))).await;
                    return;
                }
            };
            if let Err(e) = sock.connect(target).await {
                let _ = tx
                    .send(answer(Err(format!("container at {target}: {e}"))))
                    .await;
                return;
            }
            let data = match dialer.dial(&format!("/v1/agent/tunnel/{tunnel_id}")).await {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send(answer(Err(e))).await;
                    return;
                }
            };
            let _ = tx.send(answer(Ok(()))).await;
            if let Err(e) = kisara_tunnel::udp::stream_to_connected(
                data,
                sock,
                UDP_IDLE,
                &Accounting::default(),
            )
            .await
            {
                tracing::debug!(%target, error = %e, "UDP tunnel ended with an error");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialer_reads_urls() {
        let d = Dialer::new("http://127.0.0.1:7474/", None, "n".into(), None).unwrap();
        assert_eq!(d.authority, "127.0.0.1:7474");
        assert!(d.tls.is_none());
        let d = Dialer::new("https://kisara.example:8443", None, "n".into(), None).unwrap();
        assert_eq!(d.authority, "kisara.example:8443");
        assert!(d.tls.is_some());
        let d = Dialer::new("http://server", None, "n".into(), None).unwrap();
        assert_eq!(d.authority, "server:80");
        assert!(Dialer::new("ftp://x", None, "n".into(), None).is_none());
    }
}
