//! UDP exposure: a listener that keeps one session per visitor address, each with an upstream
//! of its own (a connected socket to the container, or a tunnel stream of framed datagrams),
//! closed after an idle timeout; and the agent's end, which turns a framed stream back into
//! datagrams to the container.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::frame::{read_datagram, write_datagram};
use crate::relay::{Accounting, Direction};

/// Socket buffers of the exposure's UDP sockets: a burst of datagrams queues in the kernel
/// instead of being dropped while the relay task is between reads (the kernel caps the value at
/// `net.core.rmem_max`/`wmem_max`).
const UDP_SOCKET_BUFFER: usize = 4 << 20;

/// Enlarges a UDP socket's receive and send buffers (best effort: a smaller kernel limit is
/// not an error).
pub fn tune(sock: &UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(UDP_SOCKET_BUFFER);
}

/// Binds a UDP socket on `addr` with [`tune`]d buffers.
pub async fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(addr).await?;
    tune(&s);
    Ok(s)
}

/// A byte stream a tunnel runs on.
pub trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// Where a session's datagrams go.
pub enum Upstream {
    /// A socket connected to the container's address.
    Socket(UdpSocket),
    /// A tunnel carrying framed datagrams.
    Stream(Box<dyn Duplex>),
}

/// Limits of a UDP listener.
#[derive(Debug, Clone, Copy)]
pub struct UdpOptions {
    /// A session without a datagram either way for this long is closed.
    pub idle: Duration,
    /// Most visitors at once; datagrams from further ones are dropped.
    pub max_sessions: usize,
    /// Datagrams queued per session while its upstream is being opened or is slow.
    pub queue: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        UdpOptions {
            idle: Duration::from_secs(60),
            max_sessions: 1024,
            queue: 64,
        }
    }
}

/// Serves `socket` until it fails or the task is dropped (sessions are dropped with it).
/// `connect` opens the upstream of a new visitor.
pub async fn serve<F, Fut>(
    socket: Arc<UdpSocket>,
    opts: UdpOptions,
    acct: Accounting,
    connect: F,
) -> io::Result<()>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<Upstream>> + Send + 'static,
{
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; crate::frame::MAX_DATAGRAM];
    loop {
        let (n, visitor) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                // ICMP errors of an earlier send surface here on some systems: not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::ConnectionReset => continue,
                Err(e) => return Err(e),
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let datagram = buf[..n].to_vec();
        if let Some(tx) = sessions.get(&visitor) {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                // A slow upstream: drop, as the network would.
                Err(mpsc::error::TrySendError::Full(_)) => continue,
                Err(mpsc::error::TrySendError::Closed(d)) => {
                    sessions.remove(&visitor);
                    start_session(
                        d,
                        &mut sessions,
                        visitor,
                        &opts,
                        &socket,
                        &acct,
                        &connect,
                        &mut tasks,
                    );
                    continue;
                }
            }
        }
        start_session(
            datagram,
            &mut sessions,
            visitor,
            &opts,
            &socket,
            &acct,
            &connect,
            &mut tasks,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn start_session<F, Fut>(
    first: Vec<u8>,
    sessions: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    visitor: SocketAddr,
    opts: &UdpOptions,
    socket: &Arc<UdpSocket>,
    acct: &Accounting,
    connect: &F,
    tasks: &mut tokio::task::JoinSet<()>,
) where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = io::Result<Upstream>> + Send + 'static,
{
    if sessions.len() >= opts.max_sessions {
        sessions.retain(|_, tx| !tx.is_closed());
        if sessions.len() >= opts.max_sessions {
            tracing::debug!(%visitor, "too many UDP sessions; datagram dropped");
            return;
        }
    }
    let (tx, rx) = mpsc::channel(opts.queue.max(1));
    // Cannot fail: the channel is new and has room.
    let _ = tx.try_send(first);
    sessions.insert(visitor, tx);
    let upstream = connect(visitor);
    let socket = socket.clone();
    let acct = acct.clone();
    let idle = opts.idle;
    tasks.spawn(async move {
        if let Err(e) = session(socket, visitor, rx, upstream, idle, acct).await {
            tracing::debug!(%visitor, error = %e, "UDP session ended");
        }
    });
}

/// Milliseconds since `base`, for an activity stamp shared by a session's two directions.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    /// When the session goes idle if nothing happens before.
    fn deadline(&self, idle: Duration) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Waits until `activity` has been quiet for `idle`.
async fn idle_out(activity: &Activity, idle: Duration) {
    loop {
        let deadline = activity.deadline(idle);
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

async fn session(
    socket: Arc<UdpSocket>,
    visitor: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    upstream: impl Future<Output = io::Result<Upstream>>,
    idle: Duration,
    acct: Accounting,
) -> io::Result<()> {
    let upstream = tokio::time::timeout(Duration::from_secs(10), upstream)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream did not open"))??;
    let _open: Vec<_> = acct.meters.iter().map(|m| m.open_guard()).collect();
    let activity = Activity::new();
    match upstream {
        Upstream::Socket(up) => {
            let mut buf = vec![0u8; crate::frame::MAX_DATAGRAM];
            loop {
                tokio::select! {
                    d = rx.recv() => {
                        let Some(d) = d else { return Ok(()) };
                        acct.pass(Direction::In, d.len()).await;
                        // A refused datagram (nothing listening yet) is lost, as UDP is.
                        let _ = up.send(&d).await;
                        activity.touch();
                    }
                    r = up.recv(&mut buf) => {
                        let n = match r {
                            Ok(n) => n,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                            Err(e) => return Err(e),
                        };
                        acct.pass(Direction::Out, n).await;
                        socket.send_to(&buf[..n], visitor).await?;
                        activity.touch();
                    }
                    _ = idle_out(&activity, idle) => return Ok(()),
                }
            }
        }
        Upstream::Stream(stream) => {
            let (mut r, mut w) = tokio::io::split(stream);
            let from_upstream = async {
                let mut buf = Vec::new();
                while read_datagram(&mut r, &mut buf).await? {
                    acct.pass(Direction::Out, buf.len()).await;
                    socket.send_to(&buf, visitor).await?;
                    activity.touch();
                }
                Ok::<(), io::Error>(())
            };
            let to_upstream = async {
                while let Some(d) = rx.recv().await {
                    acct.pass(Direction::In, d.len()).await;
                    write_datagram(&mut w, &d).await?;
                    activity.touch();
                }
                Ok::<(), io::Error>(())
            };
            tokio::select! {
                r = from_upstream => r,
                r = to_upstream => r,
                _ = idle_out(&activity, idle) => Ok(()),
            }
        }
    }
}

/// The agent's end of a UDP tunnel: framed datagrams from `stream` go to `target` from a
/// socket of their own, and its answers go back framed, until either side ends or nothing
/// moves for `idle`.
pub async fn stream_to_socket<S: Duplex>(
    stream: S,
    target: SocketAddr,
    idle: Duration,
    acct: &Accounting,
) -> io::Result<()> {
    let bind: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = self::bind(bind).await?;
    sock.connect(target).await?;
    stream_to_connected(stream, sock, idle, acct).await
}

/// [`stream_to_socket`] with a socket already connected to its target.
pub async fn stream_to_connected<S: Duplex>(
    stream: S,
    sock: UdpSocket,
    idle: Duration,
    acct: &Accounting,
) -> io::Result<()> {
    let activity = Activity::new();
    let (mut r, mut w) = tokio::io::split(stream);
    let inbound = async {
        let mut buf = Vec::new();
        while read_datagram(&mut r, &mut buf).await? {
            acct.pass(Direction::In, buf.len()).await;
            let _ = sock.send(&buf).await;
            activity.touch();
        }
        Ok::<(), io::Error>(())
    };
    let outbound = async {
        let mut buf = vec![0u8; crate::frame::MAX_DATAGRAM];
        loop {
            let n = match sock.recv(&mut buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            };
            acct.pass(Direction::Out, n).await;
            write_datagram(&mut w, &buf[..n]).await?;
            activity.touch();
        }
    };
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
        _ = idle_out(&activity, idle) => Ok(()),
    }
}

/// Carries framed datagrams both ways between two streams (a standalone gateway's relayed
/// visitor and a node's tunnel), frame by frame, counting payload bytes only (the 2-byte
/// length of each frame is the tunnel's, not the visitor's traffic). Each end of stream is
/// passed on as a half-close; ends when both directions have ended or either fails. Returns
/// the payload bytes in and out.
pub async fn relay_framed<V: Duplex, U: Duplex>(
    visitor: V,
    upstream: U,
    acct: &Accounting,
) -> io::Result<(u64, u64)> {
    let (vr, vw) = tokio::io::split(visitor);
    let (ur, uw) = tokio::io::split(upstream);
    crate::relay::both_ways(
        pump_framed(vr, uw, acct, Direction::In),
        pump_framed(ur, vw, acct, Direction::Out),
    )
    .await
}

async fn pump_framed<R, W>(mut r: R, mut w: W, acct: &Accounting, dir: Direction) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut buf = Vec::new();
    let mut total = 0u64;
    while read_datagram(&mut r, &mut buf).await? {
        acct.pass(dir, buf.len()).await;
        write_datagram(&mut w, &buf).await?;
        total += buf.len() as u64;
    }
    // The peer may already be gone; its half-close is best effort.
    let _ = w.shutdown().await;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Meter;

    /// A UDP echo server on loopback; returns its address.
    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    async fn ask(client: &UdpSocket, msg: &[u8]) -> Vec<u8> {
        client.send(msg).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        buf[..n].to_vec()
    }

    #[tokio::test]
    async fn direct_sessions_per_visitor_and_idle_close() {
        let target = echo().await;
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let public = listener.local_addr().unwrap();
        let meter = Arc::new(Meter::default());
        let acct = Accounting {
            meters: vec![meter.clone()],
            ..Default::default()
        };
        let opened = Arc::new(AtomicU64::new(0));
        let o = opened.clone();
        let opts = UdpOptions {
            idle: Duration::from_millis(300),
            ..Default::default()
        };
        let server = tokio::spawn(serve(listener, opts, acct, move |_visitor| {
            o.fetch_add(1, Ordering::Relaxed);
            async move {
                let s = UdpSocket::bind("127.0.0.1:0").await?;
                s.connect(target).await?;
                Ok(Upstream::Socket(s))
            }
        }));
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        a.connect(public).await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        b.connect(public).await.unwrap();
        assert_eq!(ask(&a, b"one").await, b"one");
        assert_eq!(ask(&a, b"two").await, b"two");
        assert_eq!(ask(&b, b"three").await, b"three");
        assert_eq!(opened.load(Ordering::Relaxed), 2, "one session per visitor");
        assert_eq!(meter.bytes_in.load(Ordering::Relaxed), 11);
        assert_eq!(meter.bytes_out.load(Ordering::Relaxed), 11);
        // Idle sessions close (bounded poll), and a visitor coming back gets a new one.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while meter.open.load(Ordering::Relaxed) != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "sessions never idled out"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ask(&a, b"again").await, b"again");
        assert_eq!(opened.load(Ordering::Relaxed), 3);
        server.abort();
    }

    #[tokio::test]
    async fn framed_relay_counts_payload_bytes_only() {
        use tokio::io::AsyncWriteExt;
        let (mut visitor, near) = tokio::io::duplex(1 << 17);
        let (far, mut container) = tokio::io::duplex(1 << 17);
        let meter = Arc::new(Meter::default());
        let acct = Accounting {
            meters: vec![meter.clone()],
            ..Default::default()
        };
        let task = tokio::spawn(async move { relay_framed(near, far, &acct).await });
        let sizes = [0usize, 1, 100, 1200, 65535];
        for n in sizes {
            write_datagram(&mut visitor, &vec![7u8; n]).await.unwrap();
        }
        let mut buf = Vec::new();
        for n in sizes {
            assert!(read_datagram(&mut container, &mut buf).await.unwrap());
            assert_eq!(buf.len(), n);
            write_datagram(&mut container, &buf[..n / 2]).await.unwrap();
        }
        for n in sizes {
            assert!(read_datagram(&mut visitor, &mut buf).await.unwrap());
            assert_eq!(buf.len(), n / 2);
        }
        visitor.shutdown().await.unwrap();
        container.shutdown().await.unwrap();
        let carried = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the relay ends with both streams")
            .unwrap()
            .unwrap();
        let sent: usize = sizes.iter().sum();
        let back: usize = sizes.iter().map(|n| n / 2).sum();
        assert_eq!(carried, (sent as u64, back as u64));
        assert_eq!(meter.bytes_in.load(Ordering::Relaxed), sent as u64);
        assert_eq!(meter.bytes_out.load(Ordering::Relaxed), back as u64);
    }

    #[tokio::test]
    async fn tunnelled_sessions_frame_datagrams() {
        let target = echo().await;
        let listener = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let public = listener.local_addr().unwrap();
        // The "tunnel": a duplex pipe whose far end an agent-side pump serves.
        let server = tokio::spawn(serve(
            listener,
            UdpOptions::default(),
            Accounting::default(),
            move |_| async move {
                let (near, far) = tokio::io::duplex(1 << 17);
                tokio::spawn(async move {
                    let _ = stream_to_socket(
                        far,
                        target,
                        Duration::from_secs(5),
                        &Accounting::default(),
                    )
                    .await;
                });
                Ok(Upstream::Stream(Box::new(near)))
            },
        ));
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(public).await.unwrap();
        for msg in [&b"x"[..], &[9u8; 60000][..], b""] {
            assert_eq!(ask(&c, msg).await, msg);
        }
        server.abort();
    }
}
