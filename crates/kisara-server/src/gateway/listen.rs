//! Public listeners: one per gateway lease, TCP or UDP.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kisara_api::{ContainerState, Protocol};
use kisara_store::Lease;
use kisara_tunnel::udp::{Duplex, UdpOptions, Upstream};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::Listener;
use crate::AppState;

/// How long connecting to a container (directly or through its agent) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the lease's public port and serves it until the listener is dropped.
pub async fn open(st: &Arc<AppState>, lease: &Lease) -> io::Result<()> {
    let addr = SocketAddr::new(st.gateway.settings.listen_host, lease.port);
    let route = Arc::new(Route::of(lease));
    let weak = Arc::downgrade(st);
    let task = match lease.protocol {
        Protocol::Tcp => {
            let listener = TcpListener::bind(addr).await?;
            tokio::spawn(accept_tcp(weak, listener, route))
        }
        Protocol::Udp => {
            let socket = Arc::new(kisara_tunnel::udp::bind(addr).await?);
            tokio::spawn(serve_udp(weak, socket, route))
        }
    };
    let old = st
        .gateway
        .listeners
        .lock()
        .ok()
        .and_then(|mut l| l.insert((lease.protocol, lease.port), Listener(task)));
    drop(old);
    Ok(())
}

/// Where a listener's visitors go.
pub(super) struct Route {
    pub container_id: String,
    pub node_id: String,
    pub container_port: u16,
    pub protocol: Protocol,
}

impl Route {
    pub fn of(lease: &Lease) -> Route {
        Route {
            container_id: lease.container_id.clone().unwrap_or_default(),
            node_id: lease.node_id.clone(),
            container_port: lease.container_port,
            protocol: lease.protocol,
        }
    }
}

/// The container's node (id and name) and private `ip:port`, if it can be served now.
pub(super) fn resolve(st: &AppState, route: &Route) -> io::Result<(String, String, SocketAddr)> {
    let c = st
        .store
        .get_container(&route.container_id)
        .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
    if matches!(
        c.state,
        ContainerState::Launching | ContainerState::Gone | ContainerState::Lost
    ) {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            format!("container {} is {:?}", c.id, c.state),
        ));
    }
    let ip: std::net::IpAddr = c
        .ip_address
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "container has no address"))?;
    let node_name = st
        .hub
        .get(&c.node_id)
        .map(|s| s.hello.name.clone())
        .unwrap_or_default();
    Ok((
        c.node_id,
        node_name,
        SocketAddr::new(ip, route.container_port),
    ))
}

async fn accept_tcp(st: std::sync::Weak<AppState>, listener: TcpListener, route: Arc<Route>) {
    loop {
        let (visitor, from) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "gateway accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(st) = st.upgrade() else { return };
        let route = route.clone();
        // The visitor task is not owned by the listener: closing a port (its lease released)
        // stops new visitors, while the container's removal ends the ones connected.
        tokio::spawn(async move {
            let _ = visitor.set_nodelay(true);
            if let Err(e) = serve_tcp(&st, visitor, &route).await {
                tracing::debug!(%from, container = %route.container_id, error = %e,
                    "visitor connection ended with an error");
            }
        });
    }
}

/// Carries one visitor's byte stream (a TCP connection, or a standalone gateway's relayed
/// one) to the container.
pub(super) async fn serve_tcp<V: Duplex + 'static>(
    st: &Arc<AppState>,
    visitor: V,
    route: &Route,
) -> io::Result<()> {
    let (node_id, node_name, target) = resolve(st, route)?;
    let acct = st.gateway.accounting(st, &route.container_id, &node_id);
    let _open: Vec<_> = acct.meters.iter().map(|m| m.open_guard()).collect();
    if st.gateway.is_direct(&node_name) {
        let upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "container did not answer"))??;
        let _ = upstream.set_nodelay(true);
        kisara_tunnel::relay(visitor, upstream, &acct).await?;
    } else {
        let stream = super::tunnel::open(st, &node_id, &target.to_string(), route.protocol).await?;
        kisara_tunnel::relay(visitor, stream, &acct).await?;
    }
    Ok(())
}

async fn serve_udp(st: std::sync::Weak<AppState>, socket: Arc<UdpSocket>, route: Arc<Route>) {
    let Some(strong) = st.upgrade() else { return };
    let opts = UdpOptions {
        idle: strong.gateway.settings.udp_idle,
        ..Default::default()
    };
    // Counting and pacing is per container: resolved once for the listener.
    let acct = strong
        .gateway
        .accounting(&strong, &route.container_id, &route.node_id);
    drop(strong);
    let r = kisara_tunnel::udp::serve(socket, opts, acct, move |_visitor| {
        let st = st.clone();
        let route = route.clone();
        async move {
            let st = st
                .upgrade()
                .ok_or_else(|| io::Error::other("server shutting down"))?;
            let (node_id, node_name, target) = resolve(&st, &route)?;
            if st.gateway.is_direct(&node_name) {
                Ok(Upstream::Socket(connected_udp(target).await?))
            } else {
                let stream =
                    super::tunnel::open(&st, &node_id, &target.to_string(), Protocol::Udp).await?;
                Ok(Upstream::Stream(Box::new(stream)))
            }
        }
    })
    .await;
    if let Err(e) = r {
        tracing::warn!(error = %e, "gateway UDP listener failed");
    }
}

/// A UDP socket of ours, of `target`'s address family, connected to it.
async fn connected_udp(target: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = kisara_tunnel::udp::bind(bind).await?;
    s.connect(target).await?;
    Ok(s)
}

/// One UDP visitor of a standalone gateway: framed datagrams on `stream`, carried to the
/// container (straight from a socket of ours, or through the node's tunnel, which speaks the
/// same framing).
pub(super) async fn serve_udp_stream<V: Duplex + 'static>(
    st: &Arc<AppState>,
    stream: V,
    route: &Route,
) -> io::Result<()> {
    let (node_id, node_name, target) = resolve(st, route)?;
    let acct = st.gateway.accounting(st, &route.container_id, &node_id);
    let _open: Vec<_> = acct.meters.iter().map(|m| m.open_guard()).collect();
    if st.gateway.is_direct(&node_name) {
        let s = connected_udp(target).await?;
        kisara_tunnel::udp::stream_to_connected(stream, s, st.gateway.settings.udp_idle, &acct)
            .await
    } else {
        let tunnel = super::tunnel::open(st, &node_id, &target.to_string(), Protocol::Udp).await?;
        // Frame by frame: the count is the datagrams' payload, not the frames' headers.
        kisara_tunnel::udp::relay_framed(stream, tunnel, &acct).await?;
        Ok(())
    }
}
