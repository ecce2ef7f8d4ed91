//! A publication, encoded once.
//!
//! `{"op":"message","topic":"<topic>","data":<data>}` is built directly into the bytes
//! of a complete WebSocket text frame. Topics need no escaping (see
//! [`crate::topic`]) and `data` is already-validated JSON spliced in byte for byte, so
//! no serializer runs on the delivery path and every subscriber shares one buffer.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::value::RawValue;

use crate::stream::SlowConsumer;
use crate::{deflate, frame};

const PREFIX: &[u8] = b"{\"op\":\"message\",\"topic\":\"";
const MIDDLE: &[u8] = b"\",\"data\":";
const SEQ: &[u8] = b",\"seq\":";
const SUFFIX: &[u8] = b"}";

/// A message on its way to local subscribers: the complete frame, its tag and its
/// compressed form, shared. Cloning is one reference-count increment, whatever the
/// publication carries: a connection's queue holds a clone, so a publication of a
/// namespace with a slow-consumer policy costs a queue no more than any other.
/// Its parts are read through [`Encoded`] (`publication.frame`, …).
#[derive(Clone, Debug)]
pub struct Publication(Arc<Encoded>);

/// What a [`Publication`] holds.
#[derive(Clone, Debug)]
pub struct Encoded {
    /// The whole WebSocket frame (header included).
    pub frame: Bytes,
    /// When a node first accepted this publication, in nanoseconds since the UNIX
    /// epoch. With a relay this is the *publishing* node's clock, so the
    /// publish→deliver latency covers the cross-node path. 0 when unknown.
    pub accepted_at: u64,
    /// What a connection's queue needs to apply a slow-consumer policy other than
    /// `disconnect`: `None` for every other publication, and for publications a
    /// queue may never drop.
    pub tag: Option<Tag>,
    /// The frame compressed for connections that negotiated permessage-deflate,
    /// made by the first of them that receives it and then shared
    /// ([`Publication::deflated_frame`]). `None` when the topic's namespace does
    /// not compress or the payload is under [`deflate::MIN_PAYLOAD`].
    pub deflated: Option<OnceLock<Bytes>>,
}

impl std::ops::Deref for Publication {
    type Target = Encoded;

    fn deref(&self) -> &Encoded {
        &self.0
    }
}

/// A publication's topic, policy and stream position, shared by every subscriber
/// with the frame (only in namespaces whose `slow_consumer` is not `disconnect`).
/// The frame alone does not say which namespace it is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// The namespace's policy (never [`SlowConsumer::Disconnect`]).
    pub policy: SlowConsumer,
    /// The topic.
    pub topic: Arc<str>,
    /// On a stream, the frame's position: the message's seq, or the reset's.
    pub position: Option<(u64, Arc<str>)>,
    /// What the frame holds.
    pub kind: TagKind,
}

/// What a tagged frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    /// A `message`.
    Message,
    /// A stream's `reset` (never dropped: it announces a loss).
    Reset,
    /// A `reset` up to this seq (the tag's epoch) and then the `message`, in one
    /// buffer: what a queue that conflated a stream's publication holds in its place.
    ResetThenMessage(u64),
}

impl Tag {
    /// Whether the frame holds a message (that a policy may drop or replace).
    pub fn has_message(&self) -> bool {
        self.kind != TagKind::Reset
    }
}

impl Publication {
    /// Encodes a publication of `data` (must be valid JSON text) to a validated topic.
    pub fn encode(topic: &str, data: &[u8], accepted_at: u64) -> Self {
        Self::envelope(topic, data, accepted_at, None)
    }

    /// Encodes a stream publication: the same envelope with its position,
    /// `{"op":"message","topic":…,"data":…,"seq":42}`.
    pub fn encode_seq(topic: &str, data: &[u8], accepted_at: u64, seq: u64) -> Self {
        Self::envelope(topic, data, accepted_at, Some(seq))
    }

    fn envelope(topic: &str, data: &[u8], accepted_at: u64, seq: Option<u64>) -> Self {
        let digits = seq.map(|s| s.to_string());
        let seq = digits.as_deref().map(str::as_bytes);
        let payload_len = PREFIX.len()
            + topic.len()
            + MIDDLE.len()
            + data.len()
            + seq.map_or(0, |s| SEQ.len() + s.len())
            + SUFFIX.len();
        let mut buf = BytesMut::with_capacity(frame::header_len(payload_len) + payload_len);
        frame::put_header(&mut buf, frame::op::TEXT, payload_len);
        buf.put_slice(PREFIX);
        buf.put_slice(topic.as_bytes());
        buf.put_slice(MIDDLE);
        buf.put_slice(data);
        if let Some(seq) = seq {
            buf.put_slice(SEQ);
            buf.put_slice(seq);
        }
        buf.put_slice(SUFFIX);
        Self::from_frame(buf.freeze(), accepted_at)
    }

    /// A publication of a complete frame (a server event of its own: presence,
    /// `reset`), untagged and not compressible.
    pub fn from_frame(frame: Bytes, accepted_at: u64) -> Self {
        Publication(Arc::new(Encoded {
            frame,
            accepted_at,
            tag: None,
            deflated: None,
        }))
    }

    /// The parts, to change before the publication is shared (copied if it is).
    fn parts(&mut self) -> &mut Encoded {
        Arc::make_mut(&mut self.0)
    }

    /// Tags the publication with its topic's slow-consumer policy and, on a stream,
    /// its position (see [`Tag`]). A no-op for [`SlowConsumer::Disconnect`].
    pub fn with_policy(
        self,
        policy: SlowConsumer,
        topic: &str,
        position: Option<(u64, &Arc<str>)>,
        kind: TagKind,
    ) -> Self {
        if policy == SlowConsumer::Disconnect {
            return self;
        }
        self.with_tag(Tag {
            policy,
            topic: Arc::from(topic),
            position: position.map(|(s, e)| (s, e.clone())),
            kind,
        })
    }

    /// Tags the publication with `tag` (see [`Publication::with_policy`]); a no-op
    /// when its policy is [`SlowConsumer::Disconnect`].
    pub fn with_tag(mut self, tag: Tag) -> Self {
        if tag.policy != SlowConsumer::Disconnect {
            self.parts().tag = Some(tag);
        }
        self
    }

    /// A stream's `reset`: what followed the last delivered message, up to `seq` of
    /// `epoch` (letters and digits), is lost,
    /// `{"op":"reset","topic":…,"seq":N,"epoch":"…"}`.
    pub fn reset(topic: &str, seq: u64, epoch: &str) -> Self {
        let mut text = String::with_capacity(48 + topic.len() + epoch.len());
        text.push_str("{\"op\":\"reset\",\"topic\":\"");
        text.push_str(topic);
        text.push_str("\",\"seq\":");
        text.push_str(&seq.to_string());
        text.push_str(",\"epoch\":");
        text.push_str(&serde_json::to_string(epoch).expect("a string serializes"));
        text.push('}');
        Self::from_frame(frame::text(text.as_bytes()), 0)
    }

    /// Lets connections that negotiated permessage-deflate receive this publication
    /// compressed, when `on` (the topic's namespace compresses) and the payload is
    /// at least [`deflate::MIN_PAYLOAD`] bytes.
    pub fn compressible(mut self, on: bool) -> Self {
        if on && deflate::split(&self.frame).1.len() >= deflate::MIN_PAYLOAD {
            self.parts().deflated = Some(OnceLock::new());
        }
        self
    }

    /// The frame for a connection that negotiated permessage-deflate: compressed
    /// (RSV1 set) by the first such connection and shared by the others; the plain
    /// frame when the publication is not [`compressible`](Self::compressible) or
    /// would not shrink.
    pub fn deflated_frame(&self) -> &Bytes {
        match &self.deflated {
            Some(slot) => slot.get_or_init(|| deflate::deflate_frame(&self.frame)),
            None => &self.frame,
        }
    }

    /// Size of the frame on the wire.
    pub fn len(&self) -> usize {
        self.frame.len()
    }

    /// Never true: a frame always has a header.
    pub fn is_empty(&self) -> bool {
        self.frame.is_empty()
    }
}

/// Applies the contract's payload rule for messages that arrive from outside (a
/// backend's Redis `PUBLISH`): a payload that is valid JSON is delivered as-is, any
/// other text is delivered as a JSON string. Bytes that are not UTF-8 are decoded
/// lossily (U+FFFD) rather than dropped, so a subscriber sees that something came.
pub fn payload_to_json(payload: &[u8]) -> Cow<'_, [u8]> {
    if let Ok(raw) = serde_json::from_slice::<&RawValue>(payload) {
        // `get` is the value's own text, without surrounding whitespace.
        return Cow::Borrowed(raw.get().as_bytes());
    }
    let text = String::from_utf8_lossy(payload);
    Cow::Owned(serde_json::to_vec(&text).expect("a string always serializes"))
}

/// Nanoseconds since the UNIX epoch, for [`Publication::accepted_at`].
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(p: &Publication) -> &str {
        let hl = frame::header_len(p.frame.len() - 2);
        let hl = if p.frame[1] as usize == p.frame.len() - 2 {
            2
        } else {
            hl
        };
        std::str::from_utf8(&p.frame[hl..]).unwrap()
    }

    #[test]
    fn encodes_the_message_envelope() {
        let p = Publication::encode("news", br#"{"a":[1,2]}"#, 7);
        assert_eq!(p.frame[0], 0x81);
        assert_eq!(
            payload(&p),
            r#"{"op":"message","topic":"news","data":{"a":[1,2]}}"#
        );
        let v: serde_json::Value = serde_json::from_str(payload(&p)).unwrap();
        assert_eq!(v["data"]["a"][1], 2);
        assert_eq!(p.accepted_at, 7);
    }

    #[test]
    fn stream_messages_and_resets() {
        let p = Publication::encode_seq("news", br#"{"a":1}"#, 7, 42);
        assert_eq!(
            payload(&p),
            r#"{"op":"message","topic":"news","data":{"a":1},"seq":42}"#
        );
        let r = Publication::reset("news", 9, "x7f");
        assert_eq!(
            payload(&r),
            r#"{"op":"reset","topic":"news","seq":9,"epoch":"x7f"}"#
        );
    }

    #[test]
    fn large_payload_uses_extended_length() {
        let data = format!("\"{}\"", "x".repeat(1000));
        let p = Publication::encode("t", data.as_bytes(), 0);
        assert_eq!(p.frame[1], 126);
        let len = u16::from_be_bytes([p.frame[2], p.frame[3]]) as usize;
        assert_eq!(len, p.frame.len() - 4);
    }

    #[test]
    fn compressed_once_and_only_when_asked() {
        let data = format!("\"{}\"", "abc".repeat(200));
        let p = Publication::encode("t", data.as_bytes(), 0);
        assert!(p.deflated.is_none());
        assert_eq!(
            p.deflated_frame(),
            &p.frame,
            "not compressible: the plain frame"
        );
        let small = Publication::encode("t", b"1", 0).compressible(true);
        assert!(small.deflated.is_none(), "under the threshold");
        let p = p.compressible(true);
        let first = p.deflated_frame().clone();
        assert_eq!(first[0], 0x80 | deflate::RSV1 | frame::op::TEXT);
        assert!(first.len() < p.frame.len() / 4);
        // Every later subscriber shares the same buffer.
        assert_eq!(p.deflated_frame().as_ptr(), first.as_ptr());
        assert_eq!(p.clone().deflated_frame().as_ptr(), first.as_ptr());
    }

    #[test]
    fn payload_rules() {
        assert_eq!(&*payload_to_json(br#"{"x":1}"#), br#"{"x":1}"#);
        assert_eq!(&*payload_to_json(b" 42 "), b"42");
        assert_eq!(&*payload_to_json(b"hello world"), br#""hello world""#);
        assert_eq!(&*payload_to_json(b"say \"hi\""), br#""say \"hi\"""#);
        assert_eq!(&*payload_to_json(b"{broken"), br#""{broken""#);
        assert_eq!(&*payload_to_json(b""), br#""""#);
        assert_eq!(&*payload_to_json(&[0xff, b'a']), "\"\u{fffd}a\"".as_bytes());
    }
}
