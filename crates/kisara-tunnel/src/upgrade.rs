//! The agent's side of a data connection: an HTTP/1.1 request that the server upgrades to a
//! raw byte stream (`101 Switching Protocols`, `Upgrade: kisara-tunnel`).
//!
//! Written by hand rather than through an HTTP client: the request is one fixed string, and
//! the answer is read a byte at a time up to its blank line, so not one byte of the tunnel that
//! follows is swallowed by a read-ahead buffer (the container may speak first).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::TunnelError;

/// The `Upgrade` protocol name of a data connection.
pub const PROTOCOL: &str = "kisara-tunnel";
/// Longest response head accepted.
const MAX_HEAD: usize = 8 * 1024;

/// Sends the upgrade request for `path` on `stream` and waits for the `101`. `headers` are
/// sent as given (credentials among them: never logged here).
pub async fn request<S>(
    stream: &mut S,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(), TunnelError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: {PROTOCOL}\r\n"
    );
    for (k, v) in headers {
        if [k, v].iter().any(|s| s.contains(['\r', '\n'])) {
            return Err(TunnelError::Protocol("header with a line break".into()));
        }
        req.push_str(k);
        req.push_str(": ");
        req.push_str(v);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let head = read_head(stream).await?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status == "101" {
        Ok(())
    } else {
        Err(TunnelError::Refused(status_line.trim().to_string()))
    }
}

/// Reads up to and including the blank line that ends a response head.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<String, TunnelError> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(TunnelError::Protocol("response head too long".into()));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(TunnelError::Protocol(
                "connection closed before the answer".into(),
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_once(
        answer: &'static [u8],
    ) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<Vec<u8>>) {
        let (client, mut server) = tokio::io::duplex(4096);
        let task = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                server.read_exact(&mut b).await.unwrap();
                got.push(b[0]);
            }
            server.write_all(answer).await.unwrap();
            // Keep the server end open a moment for the client to read.
            let mut rest = Vec::new();
            let _ = server.read_to_end(&mut rest).await;
            got
        });
        (client, task)
    }

    #[tokio::test]
    async fn upgrade_keeps_the_bytes_that_follow() {
        let (mut c, task) =
            serve_once(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: kisara-tunnel\r\n\r\nbanner")
                .await;
        request(
            &mut c,
            "srv:7474",
            "/v1/agent/tunnel/abc",
            &[("Authorization", "Bearer x")],
        )
        .await
        .unwrap();
        let mut banner = [0u8; 6];
        c.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"banner");
        drop(c);
        let req = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(
            req.starts_with("GET /v1/agent/tunnel/abc HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains("Upgrade: kisara-tunnel\r\n"), "{req}");
    }

    #[tokio::test]
    async fn refusals_are_errors() {
        let (mut c, _t) = serve_once(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
        let e = request(&mut c, "h", "/x", &[]).await.unwrap_err();
        assert!(e.to_string().contains("404"), "{e}");
        let (mut c, _t) = serve_once(b"HTTP/1.1 101 ok\r\n").await;
        drop(_t);
        assert!(request(&mut c, "h", "/x", &[("a", "b\r\nc")])
            .await
            .is_err());
    }
}
