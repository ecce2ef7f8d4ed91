//! A Server-Sent Events session: a session without a reader (docs/protocol.md,
//! "Server-Sent Events").
//!
//! The session is the WebSocket one — registry, outbox and its slow-consumer
//! policies, presence, server API commands, drain — with two differences:
//! - the reader never yields a frame (the client cannot send any): only server
//!   commands reach the client loop, the first being the subscription the request
//!   asked for;
//! - the write half is an [`SseWrite`]: the writer writes the complete WebSocket
//!   frames it always writes, and `SseWrite` turns each into an SSE event (the frame's
//!   JSON payload as `data`, a ping as a `: ping` comment, the close frame as a final
//!   `close` event) sent as a chunk of the HTTP response body.
//!
//! `SseWrite` also follows, per connection, where every stream topic stands (from
//! `subscribed`'s `streams`, `reset` frames and each stream `message`'s seq), and
//! gives the events that carry a stream position an `id` from which a reconnect
//! resumes every stream ([`encode_id`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;
use tracing::Instrument;

use super::subscribe::By;
use super::{open, Session, Start};
use crate::close::Disconnect;
use crate::gateway::Gateway;
use crate::protocol::{self, Since};

/// The version prefix of a stream id.
const ID_V1: &str = "v1.";
/// Converted bytes held before the writer must wait for the HTTP body to take them.
const HIGH_WATER: usize = 16 * 1024;
/// Chunks queued between the session and hyper.
const CHANNEL: usize = 4;

/// The body of an SSE response: chunks from the session's [`SseWrite`].
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

/// The stream ids' encoding: `v1.` then the base64url (no padding) of the JSON
/// object a `subscribe`'s `since` would carry: `{"<topic>":{"seq":N,"epoch":"…"},…}`.
pub fn encode_id(positions: &BTreeMap<Arc<str>, (Arc<str>, u64)>) -> String {
    let mut json = String::from("{");
    for (i, (topic, (epoch, seq))) in positions.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        // Validated topics need no escaping.
        json.push('"');
        json.push_str(topic);
        json.push_str("\":{\"seq\":");
        json.push_str(&seq.to_string());
        json.push_str(",\"epoch\":");
        json.push_str(&protocol::json_string(epoch));
        json.push('}');
    }
    json.push('}');
    let mut s = String::from(ID_V1);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(json.as_bytes(), &mut s);
    s
}

/// The JSON `since` object of a stream id; `None` if it is not one.
pub fn decode_id(id: &str) -> Option<String> {
    let b64 = id.trim().strip_prefix(ID_V1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .ok()?;
    let json = String::from_utf8(json).ok()?;
    serde_json::from_str::<&serde_json::value::RawValue>(&json).ok()?;
    Some(json)
}

/// What the HTTP side hands to a new SSE session.
pub(crate) struct SseStart {
    pub start: Start,
    pub topics: Vec<Arc<str>>,
    pub since: Since,
}

/// Starts an SSE session; returns the response body and the session's future.
pub(crate) fn run(
    gw: Arc<Gateway>,
    sse: SseStart,
) -> (SseBody, impl std::future::Future<Output = ()> + Send) {
    let (tx, rx) = mpsc::channel(CHANNEL);
    // hyper drops the body when the client closes the connection: the session ends
    // then, not only at its next write (it has no reader to see the end).
    let body_gone = tx.clone();
    let SseStart {
        start,
        topics,
        since,
    } = sse;
    let write = SseWrite {
        tx: PollSender::new(tx),
        inbuf: BytesMut::new(),
        out: BytesMut::new(),
        positions: BTreeMap::new(),
        outbox: None,
        gw: gw.clone(),
    };
    let (mut session, span) = open(gw.clone(), Never, write, start);
    session.write.outbox = Some(session.client.outbox.clone());
    gw.metrics.transport_connections_sse.inc();
    let fut = async move {
        let reason = {
            let Session {
                client,
                frames,
                writer,
                write,
                ..
            } = &mut session;
            let mut writing = std::pin::pin!(writer.run(write));
            let reading = async {
                if !topics.is_empty() {
                    match client.subscribe(None, topics, since, By::Client).await {
                        Ok(Some(text)) => {
                            client
                                .reply(wsgate_fanout::frame::text(text.as_bytes()))
                                .await;
                        }
                        Ok(None) => {}
                        Err(e) => client.reply_error(&e).await,
                    }
                }
                tokio::select! {
                    () = client.run(frames) => {}
                    () = body_gone.closed() => client.outbox.close(Disconnect::ClientGone),
                }
                // Held until here: the body ends when the writer's sender and this one
                // are gone.
                drop(body_gone);
            };
            let ended = tokio::select! {
                biased;
                reason = &mut writing => Some(reason),
                () = reading => None,
            };
            client.outbox.reader_finished();
            client.leave_all();
            match ended {
                Some(reason) => reason,
                None => writing.await,
            }
        };
        session.client.gw.metrics.transport_connections_sse.dec();
        session.close(reason);
    }
    .instrument(span);
    (SseBody { rx }, fut)
}

/// The read half of a connection that sends nothing: never ready.
pub(crate) struct Never;

impl AsyncRead for Never {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

/// The write half of an SSE session: WebSocket frames in, SSE events out.
pub(crate) struct SseWrite {
    tx: PollSender<Bytes>,
    /// WebSocket bytes not yet a whole frame.
    inbuf: BytesMut,
    /// Events not yet handed to the body.
    out: BytesMut,
    /// Each stream topic's (epoch, seq), as the client has been sent them.
    positions: BTreeMap<Arc<str>, (Arc<str>, u64)>,
    outbox: Option<Arc<super::outbox::Outbox>>,
    gw: Arc<Gateway>,
}

#[derive(Deserialize)]
struct StreamEntry {
    seq: u64,
    epoch: Arc<str>,
}

#[derive(Deserialize)]
struct Subscribed {
    #[serde(default)]
    streams: BTreeMap<Arc<str>, StreamEntry>,
}

#[derive(Deserialize)]
struct Unsubscribed {
    topics: Vec<Arc<str>>,
}

#[derive(Deserialize)]
struct Reset {
    topic: Arc<str>,
    seq: u64,
    epoch: Arc<str>,
}

const MESSAGE: &[u8] = b"{\"op\":\"message\",\"topic\":\"";
const SEQ: &[u8] = b",\"seq\":";

/// A stream message's topic and seq, read from the publication frame's fixed shape
/// (`{"op":"message","topic":"<t>","data":…,"seq":N}`) without parsing it.
fn message_position(json: &[u8]) -> Option<(&str, u64)> {
    let rest = json.strip_prefix(MESSAGE)?;
    // Validated topics need no escaping: the first quote ends it.
    let end = rest.iter().position(|&b| b == b'"')?;
    let topic = std::str::from_utf8(&rest[..end]).ok()?;
    let body = json.strip_suffix(b"}")?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let (head, num) = body.split_at(body.len() - digits);
    if !head.ends_with(SEQ) {
        return None;
    }
    let seq = std::str::from_utf8(num).ok()?.parse().ok()?;
    Some((topic, seq))
}

/// `data:` lines for a payload (JSON has no raw line breaks outside whitespace, but
/// a publication's `data` may be pretty-printed: each line gets its own field).
fn push_data(out: &mut BytesMut, payload: &[u8]) {
    for line in payload.split(|&b| b == b'\n' || b == b'\r') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.extend_from_slice(b"\n");
    }
}

impl SseWrite {
    /// Turns every whole frame in `inbuf` into events in `out`.
    fn convert(&mut self) {
        loop {
            let b = &self.inbuf[..];
            if b.len() < 2 {
                return;
            }
            let opcode = b[0] & 0x0f;
            let (len, head) = match b[1] & 0x7f {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                    10,
                ),
                126 | 127 => return,
                n => (n as usize, 2),
            };
            if b.len() < head + len {
                return;
            }
            let frame = self.inbuf.split_to(head + len).freeze();
            self.event(opcode, &frame[head..]);
        }
    }

    fn event(&mut self, opcode: u8, payload: &[u8]) {
        match opcode {
            // A ping: a comment keeps the response (and any proxy) alive. The client
            // cannot answer; that the body took the ping is what counts as hearing it.
            0x9 => {
                self.out.extend_from_slice(b": ping\n\n");
                if let Some(ob) = &self.outbox {
                    ob.heard(self.gw.sessions.now_ms());
                }
                return;
            }
            0x8 => self.close_event(payload),
            0x1 => self.text_event(payload),
            _ => return,
        }
        self.gw.metrics.sse_events.inc();
    }

    fn text_event(&mut self, json: &[u8]) {
        let mut id = None;
        if let Some((topic, seq)) = message_position(json) {
            if let Some(p) = self.positions.get_mut(topic) {
                p.1 = seq;
                id = Some(encode_id(&self.positions));
            }
        } else if json.starts_with(b"{\"op\":\"subscribed\"") {
            if let Ok(s) = serde_json::from_slice::<Subscribed>(json) {
                if !s.streams.is_empty() {
                    for (t, e) in s.streams {
                        self.positions.insert(t, (e.epoch, e.seq));
                    }
                    id = Some(encode_id(&self.positions));
                }
            }
        } else if json.starts_with(b"{\"op\":\"reset\"") {
            if let Ok(r) = serde_json::from_slice::<Reset>(json) {
                self.positions.insert(r.topic, (r.epoch, r.seq));
                id = Some(encode_id(&self.positions));
            }
        } else if json.starts_with(b"{\"op\":\"unsubscribed\"") {
            if let Ok(u) = serde_json::from_slice::<Unsubscribed>(json) {
                for t in &u.topics {
                    self.positions.remove(t);
                }
            }
        }
        if let Some(id) = id {
            self.out.extend_from_slice(b"id: ");
            self.out.extend_from_slice(id.as_bytes());
            self.out.extend_from_slice(b"\n");
        }
        push_data(&mut self.out, json);
        self.out.extend_from_slice(b"\n");
    }

    /// The close frame: a final `close` event `{"op":"close","code":N,"reason":"…"}`,
    /// with `retry:` when the reason carries a reconnect hint (`; retry=<ms>`).
    fn close_event(&mut self, payload: &[u8]) {
        let (code, reason) = if payload.len() >= 2 {
            (
                u16::from_be_bytes([payload[0], payload[1]]),
                String::from_utf8_lossy(&payload[2..]).into_owned(),
            )
        } else {
            (1005, String::new())
        };
        let retry = reason
            .rsplit_once("retry=")
            .and_then(|(_, ms)| ms.trim().parse::<u64>().ok());
        self.out.extend_from_slice(b"event: close\n");
        if let Some(ms) = retry {
            self.out
                .extend_from_slice(format!("retry: {ms}\n").as_bytes());
        }
        let json = format!(
            "{{\"op\":\"close\",\"code\":{code},\"reason\":{}}}",
            protocol::json_string(&reason)
        );
        push_data(&mut self.out, json.as_bytes());
        self.out.extend_from_slice(b"\n");
        // Nothing will answer the close: the writer need not wait for a reply.
        if let Some(ob) = &self.outbox {
            ob.reader_finished();
        }
    }

    /// Hands `out` to the body; ready when it is empty.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            ready!(self.tx.poll_reserve(cx)).map_err(|_| gone())?;
            let chunk = self.out.split().freeze();
            let n = chunk.len() as u64;
            self.tx.send_item(chunk).map_err(|_| gone())?;
            self.gw.metrics.sse_bytes.inc_by(n);
        }
        Poll::Ready(Ok(()))
    }
}

fn gone() -> io::Error {
    io::ErrorKind::BrokenPipe.into()
}

impl AsyncWrite for SseWrite {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.out.len() >= HIGH_WATER {
            ready!(self.poll_send(cx))?;
        }
        self.inbuf.extend_from_slice(buf);
        self.convert();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

impl Drop for SseWrite {
    fn drop(&mut self) {
        // Ends the body when the session ends without a shutdown.
        self.tx.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_as_since() {
        let mut p = BTreeMap::new();
        p.insert(Arc::from("chat:1"), (Arc::from("k2v9x0a1"), 41));
        p.insert(Arc::from("b"), (Arc::from("e"), 0));
        let id = encode_id(&p);
        assert!(id.starts_with("v1."));
        assert!(id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.'));
        assert_eq!(
            decode_id(&id).unwrap(),
            r#"{"b":{"seq":0,"epoch":"e"},"chat:1":{"seq":41,"epoch":"k2v9x0a1"}}"#
        );
        assert!(decode_id("v2.abc").is_none());
        assert!(decode_id("v1.!!").is_none());
    }

    #[test]
    fn reads_a_stream_message_position_only_from_its_fixed_shape() {
        let m = br#"{"op":"message","topic":"chat:1","data":{"a":1},"seq":42}"#;
        assert_eq!(message_position(m), Some(("chat:1", 42)));
        let plain = br#"{"op":"message","topic":"t","data":{"x":1,"seq":5}}"#;
        assert_eq!(message_position(plain), None);
        let num = br#"{"op":"message","topic":"t","data":5}"#;
        assert_eq!(message_position(num), None);
    }

    #[test]
    fn every_line_of_a_payload_is_a_data_field() {
        let mut out = BytesMut::new();
        push_data(&mut out, b"{\"a\":\n1}");
        assert_eq!(&out[..], b"data: {\"a\":\ndata: 1}\n");
    }
}
