//! The protocol flavours the generator speaks: wsgate's JSON protocol (also spoken by
//! the Node baseline peer) and NATS's text protocol over WebSocket.
//!
//! Incoming JSON frames are classified by their `op` with a byte search, not parsed:
//! the generator reads millions of them per second. NATS frames are a byte stream of
//! protocol lines (`MSG subject sid size\r\n<payload>\r\n`, `PING`, `PONG`, …) that may
//! be cut anywhere, so [`NatsParser`] buffers partial lines across frames.

use bytes::{Buf as _, BytesMut};
use memchr::memmem;

/// Which server the generator talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// wsgate (`/ws`, JSON protocol v1).
    Wsgate,
    /// The Node `ws` + Redis baseline in `loadtest/peers/` (same JSON protocol).
    Peer,
    /// NATS's WebSocket listener (NATS text protocol).
    Nats,
}

impl Target {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Wsgate => "wsgate",
            Target::Peer => "peer",
            Target::Nats => "nats",
        }
    }

    /// Whether the server speaks the JSON protocol.
    pub fn is_json(self) -> bool {
        self != Target::Nats
    }

    /// What to send right after the handshake (NATS wants a CONNECT first).
    pub fn hello(self) -> Option<&'static [u8]> {
        match self {
            Target::Nats => Some(
                b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"protocol\":1,\"name\":\"wsgate-loadtest\"}\r\n",
            ),
            _ => None,
        }
    }

    /// A subscribe command whose reply means "ready": `subscribed` for JSON; for NATS a
    /// `SUB` followed by `PING`, since the server handles a connection's commands in
    /// order and its `PONG` therefore confirms the subscription.
    pub fn subscribe(self, topics: &[String], id: u64) -> Vec<u8> {
        match self {
            Target::Nats => {
                let mut s: String = topics
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!("SUB {t} {}\r\n", id + i as u64))
                    .collect();
                s.push_str("PING\r\n");
                s.into_bytes()
            }
            _ => {
                let list = topics
                    .iter()
                    .map(|t| format!("\"{t}\""))
                    .collect::<Vec<_>>()
                    .join(",");
                format!(r#"{{"op":"subscribe","id":{id},"topics":[{list}]}}"#).into_bytes()
            }
        }
    }

    /// A JSON subscribe that resumes the streams in `since` (topic, seq, epoch):
    /// `{"op":"subscribe","id":…,"topics":[…],"since":{"t":{"seq":N,"epoch":"e"}}}`.
    pub fn subscribe_since(topics: &[String], id: u64, since: &[(String, u64, String)]) -> Vec<u8> {
        let list = topics
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(",");
        let since = since
            .iter()
            .map(|(t, seq, epoch)| format!(r#""{t}":{{"seq":{seq},"epoch":"{epoch}"}}"#))
            .collect::<Vec<_>>()
            .join(",");
        format!(r#"{{"op":"subscribe","id":{id},"topics":[{list}],"since":{{{since}}}}}"#)
            .into_bytes()
    }

    /// Appends one publish command carrying `data` (a JSON object) to `out`.
    pub fn publish(self, out: &mut Vec<u8>, topic: &str, id: u64, data: &[u8]) {
        match self {
            Target::Nats => {
                out.extend_from_slice(format!("PUB {topic} {}\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            _ => {
                out.extend_from_slice(
                    format!(r#"{{"op":"publish","id":{id},"topic":"{topic}","data":"#).as_bytes(),
                );
                out.extend_from_slice(data);
                out.push(b'}');
            }
        }
    }
}

/// A JSON server frame, classified by its `op`.
#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Message,
    Subscribed,
    Published,
    Welcome,
    Pong,
    /// `reset` (streams: the server announces lost seqs or a new epoch).
    Reset,
    /// `error`, with its `code`.
    Error(&'a str),
    Other,
}

/// Classifies a JSON frame from the server without parsing it.
pub fn classify(frame: &[u8]) -> Op<'_> {
    // Servers put `op` first; checking the prefix first skips the search in the
    // common case.
    let op = if let Some(rest) = frame.strip_prefix(br#"{"op":""#) {
        rest
    } else if let Some(i) = memmem::find(frame, br#""op":""#) {
        &frame[i + 6..]
    } else {
        return Op::Other;
    };
    let end = memchr::memchr(b'"', op).unwrap_or(op.len());
    match &op[..end] {
        b"message" => Op::Message,
        b"subscribed" => Op::Subscribed,
        b"published" => Op::Published,
        b"welcome" => Op::Welcome,
        b"pong" => Op::Pong,
        b"reset" => Op::Reset,
        b"error" => Op::Error(string_field(frame, br#""code":""#).unwrap_or("?")),
        _ => Op::Other,
    }
}

fn string_field<'a>(frame: &'a [u8], key: &[u8]) -> Option<&'a str> {
    let at = memmem::find(frame, key)? + key.len();
    let len = memchr::memchr(b'"', &frame[at..])?;
    std::str::from_utf8(&frame[at..at + len]).ok()
}

/// One event of the NATS protocol stream.
#[derive(Debug, PartialEq, Eq)]
pub enum NatsEvent<'a> {
    /// A `MSG`: its payload.
    Msg(&'a [u8]),
    Ping,
    Pong,
    /// `-ERR '…'`.
    Err(&'a str),
    /// `INFO`, `+OK` and anything else.
    Other,
}

/// Reassembles NATS protocol lines from WebSocket frames.
#[derive(Debug, Default)]
pub struct NatsParser {
    buf: BytesMut,
}

impl NatsParser {
    /// Feeds one frame's bytes; calls `on` for every complete event.
    ///
    /// # Errors
    /// A `MSG` line whose size is not a number (the stream cannot be resynchronized).
    pub fn feed(&mut self, data: &[u8], mut on: impl FnMut(NatsEvent<'_>)) -> Result<(), String> {
        self.buf.extend_from_slice(data);
        loop {
            let Some(eol) = memmem::find(&self.buf, b"\r\n") else {
                return Ok(());
            };
            let line = &self.buf[..eol];
            if line.starts_with(b"MSG ") {
                let size = line
                    .rsplit(|b| *b == b' ')
                    .next()
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse::<usize>().ok())
                    .ok_or_else(|| format!("bad MSG line {:?}", String::from_utf8_lossy(line)))?;
                let total = eol + 2 + size + 2;
                if self.buf.len() < total {
                    return Ok(());
                }
                on(NatsEvent::Msg(&self.buf[eol + 2..eol + 2 + size]));
                self.buf.advance(total);
                continue;
            }
            let ev = if line == b"PING" {
                NatsEvent::Ping
            } else if line == b"PONG" {
                NatsEvent::Pong
            } else if let Some(e) = line.strip_prefix(b"-ERR ") {
                NatsEvent::Err(std::str::from_utf8(e).unwrap_or("?"))
            } else {
                NatsEvent::Other
            };
            on(ev);
            self.buf.advance(eol + 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_json_frames() {
        assert_eq!(
            classify(br#"{"op":"message","topic":"a","data":1}"#),
            Op::Message
        );
        assert_eq!(
            classify(br#"{"id":1,"op":"subscribed","topics":["a"]}"#),
            Op::Subscribed
        );
        assert_eq!(classify(br#"{"op":"published","id":3}"#), Op::Published);
        assert_eq!(
            classify(br#"{"op":"error","id":null,"code":"rate_limited","message":"x"}"#),
            Op::Error("rate_limited")
        );
        assert_eq!(
            classify(br#"{"op":"reset","topic":"a","seq":5,"epoch":"e"}"#),
            Op::Reset
        );
        assert_eq!(classify(b"not json"), Op::Other);
    }

    #[test]
    fn builds_commands() {
        let topics = ["lt.0".to_string(), "lt.1".to_string()];
        let s = Target::Wsgate.subscribe(&topics, 1);
        let v: serde_json::Value = serde_json::from_slice(&s).unwrap();
        assert_eq!(v["topics"][1], "lt.1");
        assert_eq!(
            Target::Nats.subscribe(&topics, 1),
            b"SUB lt.0 1\r\nSUB lt.1 2\r\nPING\r\n"
        );
        let s = Target::subscribe_since(&topics[..1], 2, &[("lt.0".into(), 37, "k2v9".into())]);
        let v: serde_json::Value = serde_json::from_slice(&s).unwrap();
        assert_eq!(v["since"]["lt.0"]["seq"], 37);
        assert_eq!(v["since"]["lt.0"]["epoch"], "k2v9");
        assert_eq!(v["topics"][0], "lt.0");
        let mut out = Vec::new();
        Target::Peer.publish(&mut out, "lt.1", 9, br#"{"p":1}"#);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"]["p"], 1);
        assert_eq!(v["id"], 9);
        let mut out = Vec::new();
        Target::Nats.publish(&mut out, "lt.1", 9, b"hello");
        assert_eq!(out, b"PUB lt.1 5\r\nhello\r\n");
    }

    #[test]
    fn nats_stream_split_anywhere() {
        let stream =
            b"INFO {}\r\nMSG lt.0 1 5\r\nhello\r\nPING\r\nMSG lt.0 1 3\r\nabc\r\n-ERR 'x'\r\n";
        for cut in 0..stream.len() {
            let mut p = NatsParser::default();
            let mut seen = Vec::new();
            let mut on = |e: NatsEvent<'_>| seen.push(format!("{e:?}"));
            p.feed(&stream[..cut], &mut on).unwrap();
            p.feed(&stream[cut..], &mut on).unwrap();
            assert_eq!(
                seen,
                [
                    "Other",
                    "Msg([104, 101, 108, 108, 111])",
                    "Ping",
                    "Msg([97, 98, 99])",
                    "Err(\"'x'\")"
                ],
                "cut at {cut}"
            );
        }
    }
}
