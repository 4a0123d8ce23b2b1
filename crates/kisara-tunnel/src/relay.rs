//! Copies bytes both ways between a visitor and an upstream (the container, or a tunnel to
//! it), counting them and pacing them through token buckets.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Bucket;

/// Buffers start at this size: an idle or interactive connection stays small...
const SMALL_BUF: usize = 8 * 1024;
/// ...and grow to this once a read fills the buffer (a bulk transfer).
const LARGE_BUF: usize = 64 * 1024;

/// Bytes and connections of one instance (or of anything else worth counting).
#[derive(Debug, Default)]
pub struct Meter {
    /// Visitor → container.
    pub bytes_in: AtomicU64,
    /// Container → visitor.
    pub bytes_out: AtomicU64,
    /// Open connections (TCP) or sessions (UDP).
    pub open: AtomicU64,
}

impl Meter {
    pub fn add(&self, dir: Direction, n: u64) {
        match dir {
            Direction::In => self.bytes_in.fetch_add(n, Ordering::Relaxed),
            Direction::Out => self.bytes_out.fetch_add(n, Ordering::Relaxed),
        };
    }

    /// Counts an open connection until the guard is dropped.
    pub fn open_guard(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }
}

/// Decrements [`Meter::open`] on drop.
pub struct OpenGuard(Arc<Meter>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Visitor → container.
    In,
    /// Container → visitor.
    Out,
}

/// What a relay counts into and paces by.
#[derive(Debug, Clone, Default)]
pub struct Accounting {
    pub meters: Vec<Arc<Meter>>,
    /// Buckets visitor → container bytes must pass (e.g. the instance's cap, the node's).
    pub limit_in: Vec<Arc<Bucket>>,
    /// Buckets container → visitor bytes must pass.
    pub limit_out: Vec<Arc<Bucket>>,
}

impl Accounting {
    /// Counts `n` bytes going `dir` and waits as long as the buckets require.
    pub async fn pass(&self, dir: Direction, n: usize) {
        for m in &self.meters {
            m.add(dir, n as u64);
        }
        let buckets = match dir {
            Direction::In => &self.limit_in,
            Direction::Out => &self.limit_out,
        };
        for b in buckets {
            b.take(n).await;
        }
    }
}

/// Copies `visitor` ⇄ `upstream` until both directions have ended (each end of stream is
/// passed on as a half-close) or either fails. Returns bytes in and out.
pub async fn relay<V, U>(visitor: V, upstream: U, acct: &Accounting) -> io::Result<(u64, u64)>
where
    V: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (vr, vw) = tokio::io::split(visitor);
    let (ur, uw) = tokio::io::split(upstream);
    both_ways(
        pump(vr, uw, acct, Direction::In),
        pump(ur, vw, acct, Direction::Out),
    )
    .await
}

/// Runs the two directions of a relay until both have ended, or either fails; returns what
/// each carried.
pub(crate) async fn both_ways(
    inbound: impl std::future::Future<Output = io::Result<u64>>,
    outbound: impl std::future::Future<Output = io::Result<u64>>,
) -> io::Result<(u64, u64)> {
    tokio::pin!(inbound, outbound);
    let (mut done_in, mut done_out) = (None, None);
    while done_in.is_none() || done_out.is_none() {
        tokio::select! {
            r = &mut inbound, if done_in.is_none() => done_in = Some(r?),
            r = &mut outbound, if done_out.is_none() => done_out = Some(r?),
        }
    }
    Ok((done_in.unwrap_or(0), done_out.unwrap_or(0)))
}

/// One direction: read, account, write; at end of stream shut the writer down.
async fn pump<R, W>(mut r: R, mut w: W, acct: &Accounting, dir: Direction) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; SMALL_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            // The peer may already be gone; its half-close is best effort.
            let _ = w.shutdown().await;
            return Ok(total);
        }
        acct.pass(dir, n).await;
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        if n == buf.len() && buf.len() < LARGE_BUF {
            buf.resize(LARGE_BUF, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        // client ⇄ [relay: visitor side | upstream side] ⇄ server
        let (mut client, visitor) = pair().await;
        let (upstream, mut server) = pair().await;
        let meter = Arc::new(Meter::default());
        let acct = Accounting {
            meters: vec![meter.clone()],
            ..Default::default()
        };
        let task = tokio::spawn(async move { relay(visitor, upstream, &acct).await });
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        client.write_all(&payload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, payload);
        // After the client's half-close the server can still answer.
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye");
        let (i, o) = task.await.unwrap().unwrap();
        assert_eq!((i, o), (300_000, 3));
        assert_eq!(meter.bytes_in.load(Ordering::Relaxed), 300_000);
        assert_eq!(meter.bytes_out.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_reset_upstream_ends_the_relay() {
        let (mut client, visitor) = pair().await;
        let (upstream, server) = pair().await;
        let task =
            tokio::spawn(async move { relay(visitor, upstream, &Accounting::default()).await });
        drop(server);
        // The client sees the end instead of hanging.
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the client is told")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(client);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("relay ends")
            .unwrap()
            .ok();
    }

    #[tokio::test]
    async fn buckets_pace_the_stream() {
        let (mut client, visitor) = pair().await;
        let (upstream, mut server) = pair().await;
        let acct = Accounting {
            meters: vec![],
            // 400 KB/s: 300 KB take at least ~0.6 s after the 100 KB burst.
            limit_in: vec![Arc::new(Bucket::new(400_000))],
            limit_out: vec![],
        };
        tokio::spawn(async move { relay(visitor, upstream, &acct).await });
        let start = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            client.write_all(&vec![1u8; 300_000]).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        let took = start.elapsed();
        let _client = writer.await.unwrap();
        assert_eq!(got.len(), 300_000);
        assert!(took >= Duration::from_millis(450), "took {took:?}");
        assert!(took <= Duration::from_secs(3), "took {took:?}");
    }
}
