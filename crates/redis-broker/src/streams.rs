//! Streams in Redis, the same in both modes: the Redis Function library that numbers,
//! keeps and relays a stream's publications in one atomic step, the stream's key
//! names, the relay message on the topic's channel, and the commands and replies the
//! brokers exchange with the functions (docs/redis.md, "Streams").
//!
//! - The library (`streams.lua`, installed with `FUNCTION LOAD REPLACE` by every
//!   gateway on every (re)connect, and again when a call finds no function):
//!   `wsgate_publish` (backends), `wsgate_gateway_publish`,
//!   `wsgate_gateway_publish_many` (several publications queued together: one call)
//!   and `wsgate_history` (gateways). Each takes the topics' channels as its keys.
//! - Keys: [`StreamKeys`], all in the channel's hash slot.
//! - The relay message ([`Relay`]): `0xFF "WSS1"`, the origin (`g` a gateway, `b` a
//!   backend), `<epoch> <seq> <accepted_at>\n`, then the payload. The 0xFF byte never
//!   occurs in UTF-8 and the tag differs from the gateway envelope's
//!   ([`crate::envelope`]), so no plain payload is taken for a relay message.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use redis::Value;
use wsgate_fanout::publication::payload_to_json;
use wsgate_fanout::{
    BrokerError, History, HistoryEntry, HistoryQuery, Origin, Position, StreamOptions,
};

use crate::cluster::slot::hash_tag;
use crate::reply::unavailable;

/// The Function library's name (`FUNCTION LIST LIBRARYNAME wsgate`).
pub const LIBRARY: &str = "wsgate";
/// Publications a backend's `wsgate_publish` keeps when no gateway stored the stream's
/// options and the call names none.
pub const DEFAULT_HISTORY_SIZE: usize = 100;
/// How long a backend's `wsgate_publish` keeps publications when no gateway stored the
/// stream's options and the call names none, in milliseconds.
pub const DEFAULT_HISTORY_TTL_MS: u64 = 300_000;
/// First bytes of every relay message.
pub const RELAY_MAGIC: &[u8; 5] = b"\xFFWSS1";

const SOURCE: &str = include_str!("streams.lua");

/// The library's source for `FUNCTION LOAD`: `sharded` (cluster mode) relays with
/// `SPUBLISH`, else with `PUBLISH`.
pub fn library(sharded: bool) -> String {
    SOURCE
        .replace("__SHARDED__", if sharded { "true" } else { "false" })
        .replace("__DEFAULT_SIZE__", &DEFAULT_HISTORY_SIZE.to_string())
        .replace("__DEFAULT_TTL_MS__", &DEFAULT_HISTORY_TTL_MS.to_string())
}

/// `FUNCTION LOAD REPLACE <library>`.
pub(crate) fn load_cmd(sharded: bool) -> redis::Cmd {
    let mut cmd = redis::cmd("FUNCTION");
    cmd.arg("LOAD").arg("REPLACE").arg(library(sharded));
    cmd
}

/// Whether `v` is Redis saying the function called is not loaded (a flushed or
/// restarted Redis): install the library and call again.
pub(crate) fn function_missing(v: &Value) -> bool {
    match v {
        Value::ServerError(e) => e
            .details()
            .is_some_and(|d| d.contains("Function not found")),
        _ => false,
    }
}

/// The keys of the stream of one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamKeys {
    /// Hash: `epoch`, `seq`.
    pub stream: Vec<u8>,
    /// Redis stream of the kept publications, ids `<seq>-0`.
    pub history: Vec<u8>,
    /// Hash: `size`, `ttl` (ms), the options gateways configured.
    pub options: Vec<u8>,
}

/// Where a channel's stream keys start: the channel itself when it has a `{hash tag}`,
/// else `{<channel>}`, so that every key is in the channel's slot.
pub fn key_base(channel: &[u8]) -> Vec<u8> {
    if hash_tag(channel).len() != channel.len() {
        return channel.to_vec();
    }
    let mut base = Vec::with_capacity(channel.len() + 2);
    base.push(b'{');
    base.extend_from_slice(channel);
    base.push(b'}');
    base
}

impl StreamKeys {
    /// The keys of `channel`'s stream (as the library names them).
    pub fn of(channel: &[u8]) -> Self {
        let base = key_base(channel);
        let key = |suffix: &str| [&base[..], suffix.as_bytes()].concat();
        StreamKeys {
            stream: key(":stream"),
            history: key(":history"),
            options: key(":options"),
        }
    }
}

fn ttl_ms(opts: &StreamOptions) -> u64 {
    u64::try_from(opts.history_ttl.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// A gateway's publication into a stream, on its way to Redis: sent alone as
/// `wsgate_gateway_publish`, or with the stream publications queued beside it as one
/// `wsgate_gateway_publish_many` ([`publish_many_cmd`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StreamPublication {
    pub channel: Vec<u8>,
    pub data: Vec<u8>,
    pub accepted_at: u64,
    pub size: usize,
    pub ttl_ms: u64,
}

impl StreamPublication {
    pub(crate) fn new(
        channel: Vec<u8>,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
    ) -> Self {
        StreamPublication {
            channel,
            data: data.to_vec(),
            accepted_at,
            size: opts.history_size.max(1),
            ttl_ms: ttl_ms(opts),
        }
    }

    /// `FCALL wsgate_gateway_publish 1 <channel> <data> <accepted_at> <size> <ttl_ms>`.
    pub(crate) fn cmd(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("wsgate_gateway_publish")
            .arg(1)
            .arg(&self.channel)
            .arg(&self.data)
            .arg(self.accepted_at)
            .arg(self.size)
            .arg(self.ttl_ms);
        cmd
    }
}

/// `FCALL wsgate_gateway_publish_many <nkeys> <channel>… (<size> <ttl_ms>)…
/// (<channel index> <data> <accepted_at>)…`: several publications, in their order, in
/// one call (streams.lua). Its reply is one `[seq, epoch]` per publication, in order.
/// A channel's options are the first of its publications'.
pub(crate) fn publish_many_cmd<'a>(
    pubs: impl IntoIterator<Item = &'a StreamPublication> + Clone,
) -> redis::Cmd {
    let mut channels: Vec<&StreamPublication> = Vec::new();
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    let mut index = Vec::new();
    for p in pubs.clone() {
        let i = *seen.entry(&p.channel).or_insert_with(|| {
            channels.push(p);
            channels.len()
        });
        index.push(i);
    }
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsgate_gateway_publish_many").arg(channels.len());
    for c in &channels {
        cmd.arg(&c.channel);
    }
    for c in &channels {
        cmd.arg(c.size).arg(c.ttl_ms);
    }
    for (p, i) in pubs.into_iter().zip(index) {
        cmd.arg(i).arg(&p.data).arg(p.accepted_at);
    }
    cmd
}

/// `FCALL wsgate_history 1 <channel> <size> <ttl_ms> latest <limit>`,
/// `… after <seq> <limit>` or `… restart <epoch> <seq>`.
pub(crate) fn history_cmd(channel: &[u8], opts: &StreamOptions, query: HistoryQuery) -> redis::Cmd {
    let size = opts.history_size.max(1);
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("wsgate_history")
        .arg(1)
        .arg(channel)
        .arg(size)
        .arg(ttl_ms(opts));
    match query {
        HistoryQuery::Latest(limit) => cmd.arg("latest").arg(limit.min(size)),
        HistoryQuery::After { seq, limit } => cmd.arg("after").arg(seq).arg(limit.min(size)),
        HistoryQuery::Restart { epoch, seq } => cmd.arg("restart").arg(&*epoch).arg(seq),
    };
    cmd
}

fn bad(what: &str) -> BrokerError {
    unavailable(format!("redis: unexpected reply from {what}"))
}

fn error_of(v: &Value, what: &str) -> BrokerError {
    match v {
        Value::ServerError(e) => unavailable(format!("redis: {what}: {e}")),
        _ => bad(what),
    }
}

fn int(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn epoch(v: &Value) -> Option<Arc<str>> {
    let s = match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::SimpleString(s) => s,
        _ => return None,
    };
    valid_epoch(s).then(|| Arc::from(s))
}

/// Epochs are non-empty letters and digits.
fn valid_epoch(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The position `wsgate_gateway_publish` answered: `[seq, epoch]`.
pub(crate) fn parse_position(v: &Value) -> Result<Position, BrokerError> {
    const WHAT: &str = "wsgate_gateway_publish";
    let Value::Array(items) = v else {
        return Err(error_of(v, WHAT));
    };
    match items.as_slice() {
        [seq, e] => Ok(Position {
            seq: int(seq).ok_or_else(|| bad(WHAT))?,
            epoch: epoch(e).ok_or_else(|| bad(WHAT))?,
        }),
        _ => Err(bad(WHAT)),
    }
}

/// The history `wsgate_history` answered: `[epoch, seq, first, (seq, accepted_at,
/// payload)…]`. Payloads become JSON as a plain publication's would.
pub(crate) fn parse_history(v: &Value) -> Result<History, BrokerError> {
    const WHAT: &str = "wsgate_history";
    let Value::Array(items) = v else {
        return Err(error_of(v, WHAT));
    };
    let (Some(e), Some(seq), Some(first)) = (
        items.first().and_then(epoch),
        items.get(1).and_then(int),
        items.get(2).and_then(int),
    ) else {
        return Err(bad(WHAT));
    };
    let rest = &items[3..];
    if rest.len() % 3 != 0 {
        return Err(bad(WHAT));
    }
    let mut entries = Vec::with_capacity(rest.len() / 3);
    for chunk in rest.chunks(3) {
        let (Some(s), Some(at), Value::BulkString(payload)) =
            (int(&chunk[0]), int(&chunk[1]), &chunk[2])
        else {
            return Err(bad(WHAT));
        };
        entries.push(HistoryEntry {
            seq: s,
            data: json_bytes(payload),
            accepted_at: at,
        });
    }
    Ok(History {
        position: Position { seq, epoch: e },
        first,
        entries,
    })
}

fn json_bytes(payload: &[u8]) -> Bytes {
    match payload_to_json(payload) {
        Cow::Borrowed(b) => Bytes::copy_from_slice(b),
        Cow::Owned(v) => Bytes::from(v),
    }
}

/// A relay message: one stream publication as it arrives on the topic's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay<'a> {
    pub origin: Origin,
    pub epoch: &'a str,
    pub seq: u64,
    /// Nanoseconds since the UNIX epoch: when the gateway accepted it, or when Redis
    /// did (a backend's).
    pub accepted_at: u64,
    /// As published: JSON from a gateway, any bytes from a backend.
    pub payload: &'a [u8],
}

impl Relay<'_> {
    /// The message bytes (what the library publishes).
    pub fn encode(&self) -> Vec<u8> {
        let origin = match self.origin {
            Origin::Gateway => b'g',
            Origin::Backend => b'b',
        };
        let mut out = Vec::with_capacity(RELAY_MAGIC.len() + 48 + self.payload.len());
        out.extend_from_slice(RELAY_MAGIC);
        out.push(origin);
        out.extend_from_slice(
            format!("{} {} {}\n", self.epoch, self.seq, self.accepted_at).as_bytes(),
        );
        out.extend_from_slice(self.payload);
        out
    }

    /// Parses a message from a channel; `None` when it is not a relay message (then it
    /// is a plain publication).
    pub fn decode(msg: &[u8]) -> Option<Relay<'_>> {
        let rest = msg.strip_prefix(RELAY_MAGIC)?;
        let (&kind, rest) = rest.split_first()?;
        let origin = match kind {
            b'g' => Origin::Gateway,
            b'b' => Origin::Backend,
            _ => return None,
        };
        // The header is short: look for its end in the first bytes only.
        let nl = rest.iter().take(96).position(|&b| b == b'\n')?;
        let header = std::str::from_utf8(&rest[..nl]).ok()?;
        let mut fields = header.split(' ');
        let (Some(epoch), Some(seq), Some(at), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return None;
        };
        if !valid_epoch(epoch) {
            return None;
        }
        Some(Relay {
            origin,
            epoch,
            seq: seq.parse().ok().filter(|s| *s > 0)?,
            accepted_at: at.parse().ok()?,
            payload: &rest[nl + 1..],
        })
    }

    /// The entry to report: the payload as JSON (as for a plain publication).
    pub fn entry(&self) -> HistoryEntry {
        HistoryEntry {
            seq: self.seq,
            data: json_bytes(self.payload),
            accepted_at: self.accepted_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::slot::key_slot;

    #[test]
    fn relay_messages_round_trip() {
        for (origin, payload) in [
            (Origin::Gateway, &br#"{"a":[1,2]}"#[..]),
            (Origin::Backend, b"plain text\nwith a newline"),
            (Origin::Backend, b""),
        ] {
            let r = Relay {
                origin,
                epoch: "65f1a2b30c1d2",
                seq: 42,
                accepted_at: 1_700_000_000_123_456_789,
                payload,
            };
            let bytes = r.encode();
            assert!(bytes.starts_with(RELAY_MAGIC));
            assert_eq!(Relay::decode(&bytes), Some(r));
        }
        let r = Relay {
            origin: Origin::Backend,
            epoch: "e1",
            seq: 7,
            accepted_at: 5,
            payload: b"hello",
        };
        let e = r.entry();
        assert_eq!(
            &e.data[..],
            br#""hello""#,
            "non-JSON text becomes a JSON string"
        );
        assert_eq!((e.seq, e.accepted_at), (7, 5));
    }

    #[test]
    fn plain_payloads_and_broken_headers_are_not_relay_messages() {
        for msg in [
            &br#"{"a":1}"#[..],
            b"WSS1g e 1 2\n{}",              // the tag without the 0xFF byte
            b"\xFFWSG1\0\0\0\0\0\0\0\x01{}", // the gateway envelope
            b"\xFFWSS1x e 1 2\n{}",          // unknown origin
            b"\xFFWSS1g e 1 2 {}",           // no end of header
            b"\xFFWSS1g e-1 1 2\n{}",        // epoch not alphanumeric
            b"\xFFWSS1g  1 2\n{}",           // empty epoch
            b"\xFFWSS1g e 0 2\n{}",          // seq 0 is never published
            b"\xFFWSS1g e 1\n{}",            // missing field
            b"\xFFWSS1g e 1 2 3\n{}",        // extra field
            b"\xFFWSS1g e x 2\n{}",          // seq not a number
        ] {
            assert_eq!(
                Relay::decode(msg),
                None,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn keys_live_in_the_channel_slot() {
        let k = StreamKeys::of(b"wsgate:news");
        assert_eq!(k.stream, b"{wsgate:news}:stream");
        assert_eq!(k.history, b"{wsgate:news}:history");
        assert_eq!(k.options, b"{wsgate:news}:options");
        let k = StreamKeys::of(b"wsgate:{room42}.chat");
        assert_eq!(k.stream, b"wsgate:{room42}.chat:stream");
        for channel in [&b"wsgate:news"[..], b"wsgate:{room42}.chat", b"p:a.b.c"] {
            let k = StreamKeys::of(channel);
            for key in [&k.stream, &k.history, &k.options] {
                assert_eq!(key_slot(key), key_slot(channel));
            }
        }
    }

    #[test]
    fn the_library_is_one_source_for_both_modes() {
        let single = library(false);
        let cluster = library(true);
        assert!(single.starts_with("#!lua name=wsgate\n"));
        assert!(single.contains("local SHARDED = false"));
        assert!(cluster.contains("local SHARDED = true"));
        assert!(!single.contains("__"), "every placeholder is filled");
        assert!(single.contains(&format!("DEFAULT_SIZE = {DEFAULT_HISTORY_SIZE}")));
    }

    #[test]
    fn replies_are_parsed_and_checked() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let p = parse_position(&Value::Array(vec![Value::Int(3), bulk("ab12")])).unwrap();
        assert_eq!((p.seq, &*p.epoch), (3, "ab12"));
        assert!(parse_position(&Value::Array(vec![Value::Int(3), bulk("a-b")])).is_err());
        assert!(parse_position(&Value::Nil).is_err());
        let h = parse_history(&Value::Array(vec![
            bulk("ep"),
            Value::Int(9),
            Value::Int(8),
            Value::Int(8),
            bulk("11"),
            bulk(r#"{"x":1}"#),
            Value::Int(9),
            bulk("12"),
            bulk("text"),
        ]))
        .unwrap();
        assert_eq!(h.position.seq, 9);
        assert_eq!(h.first, 8);
        assert_eq!(h.entries.len(), 2);
        assert_eq!(&h.entries[1].data[..], br#""text""#);
        assert_eq!(h.entries[0].accepted_at, 11);
        assert!(parse_history(&Value::Array(vec![bulk("ep"), Value::Int(1)])).is_err());
        let opts = StreamOptions {
            history_size: 10,
            history_ttl: Duration::from_secs(60),
        };
        let cmd = history_cmd(b"c", &opts, HistoryQuery::Latest(1000));
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let want: Vec<&[u8]> = vec![
            b"FCALL",
            b"wsgate_history",
            b"1",
            b"c",
            b"10",
            b"60000",
            b"latest",
            b"10",
        ];
        assert_eq!(args, want, "the limit is capped at the history size");
    }
}
