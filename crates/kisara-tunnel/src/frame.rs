//! UDP datagrams over a byte stream: a 2-byte big-endian length, then the payload.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest datagram a frame carries (the length field's range).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// Writes one datagram. Datagrams above [`MAX_DATAGRAM`] cannot be framed: an error.
pub async fn write_datagram<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    let len = u16::try_from(data.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("datagram of {} bytes is too large to frame", data.len()),
        )
    })?;
    // One write for header and payload: a datagram is never split across two small segments.
    let mut buf = Vec::with_capacity(2 + data.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await
}

/// Reads one datagram into `buf` (resized to fit); `Ok(false)` at a clean end of stream
/// between frames. An end of stream inside a frame is an error.
pub async fn read_datagram<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut head = [0u8; 2];
    match r.read_exact(&mut head[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut head[1..]).await?;
    let len = u16::from_be_bytes(head) as usize;
    buf.resize(len, 0);
    r.read_exact(buf).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[tokio::test]
    async fn round_trip_and_clean_end() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        for d in [&b""[..], b"x", &[7u8; 65535][..]] {
            write_datagram(&mut a, d).await.unwrap();
        }
        drop(a);
        let mut buf = Vec::new();
        assert!(read_datagram(&mut b, &mut buf).await.unwrap());
        assert!(buf.is_empty());
        assert!(read_datagram(&mut b, &mut buf).await.unwrap());
        assert_eq!(buf, b"x");
        assert!(read_datagram(&mut b, &mut buf).await.unwrap());
        assert_eq!(buf.len(), 65535);
        assert!(!read_datagram(&mut b, &mut buf).await.unwrap());
    }

    #[tokio::test]
    async fn oversize_and_truncated_are_errors() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        assert!(write_datagram(&mut a, &vec![0; 65536]).await.is_err());
        a.write_all(&[0, 10, 1, 2, 3]).await.unwrap();
        drop(a);
        let mut buf = Vec::new();
        assert!(read_datagram(&mut b, &mut buf).await.is_err());
    }

    proptest! {
        #[test]
        fn any_sequence_survives_any_chunking(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            chunk in 1usize..17,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut wire = Vec::new();
                for d in &datagrams {
                    write_datagram(&mut wire, d).await.unwrap();
                }
                // Deliver the bytes in small pieces: frames must be reassembled whatever
                // the segment boundaries.
                let (mut tx, mut rx) = tokio::io::duplex(64);
                let writer = async move {
                    for piece in wire.chunks(chunk) {
                        tx.write_all(piece).await.unwrap();
                    }
                };
                let reader = async move {
                    let mut got = Vec::new();
                    let mut buf = Vec::new();
                    while read_datagram(&mut rx, &mut buf).await.unwrap() {
                        got.push(buf.clone());
                    }
                    got
                };
                let ((), got) = tokio::join!(writer, reader);
                assert_eq!(got, datagrams);
            });
        }
    }
}
