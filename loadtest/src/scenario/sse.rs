//! Subscribers over Server-Sent Events (`fanout --sse`): `GET /sse?topics=…` on the
//! subscriber's node, then the event stream read as it arrives — each `data:` line is
//! the JSON frame a WebSocket subscriber would get, stamped and counted the same way.
//!
//! HTTP/1.1 with a chunked body; the parser works on the raw bytes (chunk size lines
//! are skipped as lines that are not `data:` fields: a chunk boundary may split a line,
//! so lines are taken from the de-chunked bytes).

use std::pin::pin;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::session::Received;
use crate::net::{Failure, Url};
use crate::payload;
use crate::run::Ctx;
use crate::seq::SeqTracker;
use crate::stats::now_ns;
use crate::stream::{self, StreamTracker};

/// An SSE response past its head and the `subscribed` event.
pub struct SseConn {
    stream: TcpStream,
    /// Raw body bytes not yet de-chunked.
    raw: Vec<u8>,
    /// De-chunked bytes; those before `pos` are parsed already.
    body: Vec<u8>,
    pos: usize,
}

/// The `/sse` path for `url` (a `/ws` URL's path becomes `/sse`).
fn sse_path(url: &Url, topics: &[String]) -> String {
    let base = url.path.split('?').next().unwrap_or("/");
    let base = base
        .strip_suffix("/ws")
        .unwrap_or(base.trim_end_matches('/'));
    format!("{base}/sse?topics={}", topics.join(","))
}

/// Opens the stream and waits for its `subscribed` event.
///
/// # Errors
/// The failure kind, for the report's table.
pub async fn open(ctx: &Ctx, url: &Url, topics: &[String]) -> Result<SseConn, Failure> {
    let attempt = async {
        let mut stream = ctx
            .dialer
            .dial(url.addr, None)
            .await
            .map_err(|e| ctx.fail(Failure::Connect, e))?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            sse_path(url, topics),
            url.authority
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| ctx.fail(Failure::Handshake, e))?;
        let mut raw = Vec::with_capacity(4096);
        let end = loop {
            if let Some(i) = memchr::memmem::find(&raw, b"\r\n\r\n") {
                break i;
            }
            let mut buf = [0u8; 4096];
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| ctx.fail(Failure::Handshake, e))?;
            if n == 0 {
                return Err(ctx.fail(Failure::Handshake, "connection closed before the head"));
            }
            raw.extend_from_slice(&buf[..n]);
        };
        if !raw.starts_with(b"HTTP/1.1 200") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            return Err(ctx.fail(Failure::Handshake, head));
        }
        raw.drain(..end + 4);
        let mut conn = SseConn {
            stream,
            raw,
            body: Vec::new(),
            pos: 0,
        };
        // The head's read may have brought the first events too.
        conn.dechunk();
        loop {
            match conn.next_data() {
                Some(line) if line.starts_with(br#"{"op":"subscribed""#) => return Ok(conn),
                Some(_) => continue,
                None => {}
            }
            if conn
                .fill()
                .await
                .map_err(|e| ctx.fail(Failure::Subscribe, e))?
                == 0
            {
                return Err(ctx.fail(Failure::Subscribe, "stream ended before subscribed"));
            }
        }
    };
    match tokio::time::timeout(ctx.common.connect_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ctx.fail(Failure::Timeout, "no subscribed event in time")),
    }
}

impl SseConn {
    /// Reads more of the body; 0 at its end.
    async fn fill(&mut self) -> std::io::Result<usize> {
        let mut buf = [0u8; 16384];
        let n = self.stream.read(&mut buf).await?;
        self.raw.extend_from_slice(&buf[..n]);
        self.dechunk();
        Ok(n)
    }

    /// Moves whole chunks from `raw` to `body`.
    fn dechunk(&mut self) {
        // Forget what was parsed (once per read, not per line).
        self.body.drain(..self.pos);
        self.pos = 0;
        let mut at = 0;
        loop {
            let rest = &self.raw[at..];
            let Some(eol) = memchr::memmem::find(rest, b"\r\n") else {
                break;
            };
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .unwrap_or(0);
            if rest.len() < eol + 2 + size + 2 {
                break;
            }
            self.body.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            at += eol + 2 + size + 2;
            if size == 0 {
                break;
            }
        }
        self.raw.drain(..at);
    }

    /// The next complete `data:` field in the body, if any.
    fn next_data(&mut self) -> Option<&[u8]> {
        loop {
            let rest = &self.body[self.pos..];
            let eol = memchr::memchr(b'\n', rest)?;
            let start = self.pos;
            self.pos += eol + 1;
            if rest.starts_with(b"data: ") {
                return Some(&self.body[start + 6..start + eol]);
            }
        }
    }
}

/// Receives stamped messages until `ctx.cancel` or the end of the stream, as
/// [`super::session::receive`] does for WebSocket subscribers.
pub async fn receive(ctx: &Ctx, s: &mut SseConn, key: usize, publishers: usize) -> Received {
    let mut rec = ctx.timeline.recorder(key);
    let mut seq = SeqTracker::new(publishers);
    let mut streams = StreamTracker::new();
    let mut out = Received::default();
    let mut cancelled = pin!(ctx.cancel.cancelled());
    let mut now = now_ns();
    'outer: loop {
        while let Some(f) = s.next_data() {
            if let Some(st) = payload::scan_message(f).or_else(|| payload::scan(f)) {
                seq.record(st.publisher, st.seq);
                rec.record(now, now.saturating_sub(st.sent_ns) / 1000);
                if let (Some(at), Some(topic)) = (stream::tail_seq(f), stream::topic_of(f)) {
                    streams.record(topic, at);
                }
            } else if f.starts_with(br#"{"op":"close""#) {
                out.closed_by_server = Some(String::from_utf8_lossy(f).into_owned());
                break 'outer;
            }
        }
        let filled = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = s.fill() => r,
        };
        match filled {
            Ok(0) | Err(_) => {
                out.closed_by_server = Some("eof".into());
                break;
            }
            Ok(_) => {}
        }
        now = now_ns();
    }
    out.counts = seq.counts();
    out.streams = streams.counts();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sse_path_replaces_ws() {
        let url = Url {
            authority: "127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            path: "/ws".into(),
        };
        assert_eq!(sse_path(&url, &["a".into(), "b".into()]), "/sse?topics=a,b");
    }
}
