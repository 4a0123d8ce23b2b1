//! Newline-delimited JSON over a chunked body.
//!
//! HTTP chunks have nothing to do with lines: one chunk may hold several lines, and one line may
//! be split across several chunks (even inside a multi-byte UTF-8 character), so bytes are
//! buffered until a newline arrives and only whole lines are parsed.

use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt};
use serde::de::DeserializeOwned;

use crate::Error;

/// Splits a byte stream into lines. Empty and whitespace-only lines are skipped; a trailing
/// `\r` is removed; a last line without a final newline is returned by [`LineSplitter::finish`].
#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    buf: BytesMut,
    /// Bytes of `buf` already known to hold no newline, so a long line is scanned once.
    scanned: usize,
}

impl LineSplitter {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line, if the buffer holds one.
    pub(crate) fn next_line(&mut self) -> Option<Bytes> {
        loop {
            let pos = self.buf[self.scanned..].iter().position(|&b| b == b'\n');
            let Some(pos) = pos else {
                self.scanned = self.buf.len();
                return None;
            };
            let mut line = self.buf.split_to(self.scanned + pos + 1);
            self.scanned = 0;
            line.truncate(line.len() - 1);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if !is_blank(&line) {
                return Some(line.freeze());
            }
        }
    }

    /// What is left once the body has ended: a last line that had no newline.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        self.scanned = 0;
        let rest = std::mem::take(&mut self.buf);
        if is_blank(&rest) {
            None
        } else {
            let mut rest = rest.freeze();
            if rest.ends_with(b"\r") {
                rest.truncate(rest.len() - 1);
            }
            Some(rest)
        }
    }
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

struct State<T> {
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    lines: LineSplitter,
    ended: bool,
    _item: std::marker::PhantomData<fn() -> T>,
}

/// Turns a body of newline-delimited JSON into a stream of `T`. A line that does not parse
/// yields an [`Error::Decode`] and the stream goes on; a transport error ends it.
pub(crate) fn decode_stream<T>(
    body: BoxStream<'static, reqwest::Result<Bytes>>,
) -> BoxStream<'static, Result<T, Error>>
where
    T: DeserializeOwned + Send + 'static,
{
    let state = State::<T> {
        body,
        lines: LineSplitter::default(),
        ended: false,
        _item: std::marker::PhantomData,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(line) = st.lines.next_line() {
                return Some((parse(&line), st));
            }
            if st.ended {
                return st.lines.finish().map(|line| (parse(&line), st));
            }
            match st.body.next().await {
                Some(Ok(chunk)) => st.lines.push(&chunk),
                Some(Err(e)) => {
                    st.ended = true;
                    st.lines = LineSplitter::default();
                    return Some((Err(Error::from_reqwest(e)), st));
                }
                None => st.ended = true,
            }
        }
    })
    .boxed()
}

fn parse<T: DeserializeOwned>(line: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(line).map_err(Error::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c);
            while let Some(l) = s.next_line() {
                out.push(String::from_utf8(l.to_vec()).unwrap());
            }
        }
        out.extend(s.finish().map(|l| String::from_utf8(l.to_vec()).unwrap()));
        out
    }

    #[test]
    fn several_lines_in_one_chunk() {
        assert_eq!(
            split_all(&[b"{\"a\":1}\n{\"b\":2}\n"]),
            ["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn line_split_across_chunks() {
        assert_eq!(
            split_all(&[b"{\"a\"", b":1", b"}\n{\"b", b"\":2}\n"]),
            ["{\"a\":1}", "{\"b\":2}"]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_lines() {
        let body = "{\"s\":\"Downloading ✓\"}\r\n\n{\"s\":\"done\"}\n{\"s\":\"tail\"}";
        let want = [
            "{\"s\":\"Downloading ✓\"}",
            "{\"s\":\"done\"}",
            "{\"s\":\"tail\"}",
        ];
        let bytes = body.as_bytes();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let got = split_all(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
                assert_eq!(got, want, "split at {i},{j}");
            }
        }
        // One byte at a time.
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(split_all(&chunks), want);
    }

    #[test]
    fn blank_lines_and_crlf_are_skipped() {
        assert_eq!(split_all(&[b"\n\r\n  \nx\r\n\n"]), ["x"]);
        assert_eq!(split_all(&[b"  \r"]), Vec::<String>::new());
    }

    #[test]
    fn last_line_without_newline_comes_at_finish() {
        let mut s = LineSplitter::default();
        s.push(b"one\ntwo");
        assert_eq!(s.next_line().as_deref(), Some(&b"one"[..]));
        assert_eq!(s.next_line(), None);
        s.push(b"-more");
        assert_eq!(s.next_line(), None);
        assert_eq!(s.finish().as_deref(), Some(&b"two-more"[..]));
        assert_eq!(s.finish(), None);
    }

    #[tokio::test]
    async fn stream_decodes_items_and_reports_bad_lines() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Item {
            n: u32,
        }
        let chunks: Vec<reqwest::Result<Bytes>> = vec![
            Ok(Bytes::from_static(b"{\"n\":1}\n{\"n\"")),
            Ok(Bytes::from_static(b":2}\nnot json\n")),
            Ok(Bytes::from_static(b"{\"n\":3}")),
        ];
        let items: Vec<Result<Item, Error>> = decode_stream(futures::stream::iter(chunks).boxed())
            .collect()
            .await;
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().unwrap(), &Item { n: 1 });
        assert_eq!(items[1].as_ref().unwrap(), &Item { n: 2 });
        assert!(matches!(items[2], Err(Error::Decode(_))));
        assert_eq!(items[3].as_ref().unwrap(), &Item { n: 3 });
    }
}
