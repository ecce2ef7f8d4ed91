//! The client protocol codec (docs/protocol.md): commands in, replies out.
//!
//! Decoding borrows from the frame: `data` stays a [`RawValue`] slice of the client's
//! own bytes, so a publication is spliced into the outgoing frame without being
//! re-serialized. Replies are small and formatted by hand.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use wsgate_fanout::{validate_topic, Position, PresenceEntry, PresenceStats, StreamStart};

/// Largest integer a client id may be (2^53 − 1, exact in every JSON implementation).
pub const MAX_ID: u64 = (1 << 53) - 1;

/// The stable error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    InvalidTopic,
    Forbidden,
    TooManyTopics,
    RateLimited,
    PayloadTooLarge,
    Unavailable,
    Internal,
    /// The topic does not track presence (`presence`, `presence_stats`).
    NotEnabled,
}

impl ErrorCode {
    /// The code's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyTopics => "too_many_topics",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::NotEnabled => "not_enabled",
        }
    }
}

/// A command that could not be accepted, with the id to echo (if it had a valid one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl CommandError {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        CommandError {
            id,
            code,
            message: message.into(),
        }
    }
}

/// A decoded client command.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        id: Option<u64>,
        topics: Vec<Arc<str>>,
        /// Where the client was in each stream it resumes (`since`).
        since: Since,
    },
    Unsubscribe {
        id: Option<u64>,
        topics: Vec<Arc<str>>,
    },
    Publish {
        id: Option<u64>,
        topic: Arc<str>,
        data: &'a RawValue,
    },
    Ping {
        id: Option<u64>,
    },
    /// A new token for this connection (docs/protocol.md, "Authentication and `refresh`").
    Refresh {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
    /// Who is on a presence topic.
    Presence {
        id: Option<u64>,
        topic: Arc<str>,
    },
    /// How many are on a presence topic.
    PresenceStats {
        id: Option<u64>,
        topic: Arc<str>,
    },
}

impl Command<'_> {
    /// The command's id, if it carried one.
    pub fn id(&self) -> Option<u64> {
        match self {
            Command::Subscribe { id, .. }
            | Command::Unsubscribe { id, .. }
            | Command::Publish { id, .. }
            | Command::Ping { id }
            | Command::Refresh { id, .. }
            | Command::Presence { id, .. }
            | Command::PresenceStats { id, .. } => *id,
        }
    }
}

/// Every field any command may carry; each kept raw so that each can be judged on
/// its own (a JSON `null` `data` is a value, not a missing field).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    op: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topics: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    topic: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
}

/// A `subscribe`'s `since`: topic → the position the client last saw.
pub type Since = HashMap<Arc<str>, Position>;

/// Largest seq a client may name: the largest integer every JSON implementation holds
/// exactly (as for ids).
pub const MAX_SEQ: u64 = MAX_ID;

/// One `since` entry, exactly `{"seq": integer ≥ 0, "epoch": string}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceEntry<'a> {
    seq: u64,
    #[serde(borrow)]
    epoch: Cow<'a, str>,
}

/// Parses `since` (absent or `null`: empty). Entries for topics the command does not
/// name are dropped here (the contract ignores them); the node ignores entries for
/// topics that are not streams.
fn parse_since(
    id: Option<u64>,
    raw: Option<&RawValue>,
    topics: &[Arc<str>],
) -> Result<Since, CommandError> {
    const SHAPE: &str = "`since` must be an object of {\"seq\": integer >= 0, \"epoch\": string}";
    let Some(raw) = raw.filter(|r| r.get() != "null") else {
        return Ok(Since::new());
    };
    let entries: HashMap<Cow<'_, str>, &RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| bad(id, SHAPE))?;
    let mut since = Since::new();
    for (topic, entry) in entries {
        let entry: SinceEntry<'_> = serde_json::from_str(entry.get()).map_err(|_| {
            bad(
                id,
                format!("`since` entry for {}: {SHAPE}", json_string(&topic)),
            )
        })?;
        if entry.seq > MAX_SEQ {
            return Err(bad(
                id,
                format!(
                    "`since` entry for {}: seq must be at most 2^53-1",
                    json_string(&topic)
                ),
            ));
        }
        if let Some(t) = topics.iter().find(|t| ***t == *topic) {
            since.insert(
                t.clone(),
                Position {
                    seq: entry.seq,
                    epoch: Arc::from(entry.epoch.as_ref()),
                },
            );
        }
    }
    Ok(since)
}

/// `Some` for any present value, `null` included.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

fn bad(id: Option<u64>, msg: impl Into<Cow<'static, str>>) -> CommandError {
    CommandError::new(id, ErrorCode::BadRequest, msg)
}

fn parse_id(raw: Option<&RawValue>) -> Result<Option<u64>, CommandError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.get() == "null" {
        return Ok(None);
    }
    match serde_json::from_str::<u64>(raw.get()) {
        Ok(id) if id <= MAX_ID => Ok(Some(id)),
        _ => Err(bad(None, "`id` must be an integer from 0 to 2^53-1")),
    }
}

fn parse_topic(id: Option<u64>, raw: &RawValue) -> Result<Arc<str>, CommandError> {
    let topic: Cow<'_, str> =
        serde_json::from_str(raw.get()).map_err(|_| bad(id, "a topic must be a string"))?;
    validate_topic(&topic).map_err(|e| {
        CommandError::new(id, ErrorCode::InvalidTopic, format!("invalid topic: {e}"))
    })?;
    Ok(Arc::from(topic.as_ref()))
}

fn parse_topics(id: Option<u64>, raw: Option<&RawValue>) -> Result<Vec<Arc<str>>, CommandError> {
    let raw = raw.ok_or_else(|| bad(id, "`topics` is required"))?;
    let items: Vec<&RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| bad(id, "`topics` must be an array of strings"))?;
    if items.is_empty() {
        return Err(bad(id, "`topics` must not be empty"));
    }
    // Shape first, then names: a list with a non-string is `bad_request` even if an
    // earlier name is invalid.
    let mut names = Vec::with_capacity(items.len());
    for item in &items {
        let name: Cow<'_, str> = serde_json::from_str(item.get())
            .map_err(|_| bad(id, "`topics` must be an array of strings"))?;
        names.push(name);
    }
    names
        .iter()
        .map(|name| {
            validate_topic(name).map_err(|e| {
                CommandError::new(
                    id,
                    ErrorCode::InvalidTopic,
                    format!("invalid topic {}: {e}", json_string(name)),
                )
            })?;
            Ok(Arc::from(name.as_ref()))
        })
        .collect()
}

/// Decodes one text frame into a command.
///
/// # Errors
/// The error reply the contract prescribes, with the command's id when it had a valid
/// one.
pub fn decode(text: &str) -> Result<Command<'_>, CommandError> {
    // serde would also read a struct from a JSON array (`[op, id, …]`): only objects
    // are commands.
    if !text.trim_start().starts_with('{') {
        return Err(bad(None, "a frame must be one JSON object"));
    }
    let env: Envelope<'_> =
        serde_json::from_str(text).map_err(|_| bad(None, "a frame must be one JSON object"))?;
    let id = parse_id(env.id)?;
    let op: Cow<'_, str> = match env.op {
        Some(raw) => {
            serde_json::from_str(raw.get()).map_err(|_| bad(id, "`op` must be a string"))?
        }
        None => return Err(bad(id, "`op` is required")),
    };
    match op.as_ref() {
        "subscribe" => {
            let topics = parse_topics(id, env.topics)?;
            let since = parse_since(id, env.since, &topics)?;
            Ok(Command::Subscribe { id, topics, since })
        }
        "unsubscribe" => Ok(Command::Unsubscribe {
            id,
            topics: parse_topics(id, env.topics)?,
        }),
        "publish" => {
            let topic = env.topic.ok_or_else(|| bad(id, "`topic` is required"))?;
            let data = env.data.ok_or_else(|| bad(id, "`data` is required"))?;
            Ok(Command::Publish {
                id,
                topic: parse_topic(id, topic)?,
                data,
            })
        }
        "ping" => Ok(Command::Ping { id }),
        "presence" | "presence_stats" => {
            let topic = env.topic.ok_or_else(|| bad(id, "`topic` is required"))?;
            let topic = parse_topic(id, topic)?;
            Ok(if op == "presence" {
                Command::Presence { id, topic }
            } else {
                Command::PresenceStats { id, topic }
            })
        }
        "refresh" => {
            let raw = env.token.ok_or_else(|| bad(id, "`token` is required"))?;
            let token: Cow<'_, str> =
                serde_json::from_str(raw.get()).map_err(|_| bad(id, "`token` must be a string"))?;
            Ok(Command::Refresh { id, token })
        }
        other => Err(CommandError::new(
            id,
            ErrorCode::UnknownOp,
            format!("unknown op {}", json_string(other)),
        )),
    }
}

/// A string as a JSON string literal.
pub fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn open(op: &str, id: Option<u64>) -> String {
    let mut s = String::with_capacity(64);
    s.push_str("{\"op\":\"");
    s.push_str(op);
    s.push('"');
    if let Some(id) = id {
        let _ = write!(s, ",\"id\":{id}");
    }
    s
}

/// `{"op":"subscribed"|"unsubscribed","id":…,"topics":[…]}`.
pub fn topics_reply(op: &str, id: Option<u64>, topics: &[Arc<str>]) -> String {
    let mut s = open(op, id);
    s.push_str(",\"topics\":[");
    for (i, t) in topics.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Validated topics need no escaping.
        s.push('"');
        s.push_str(t);
        s.push('"');
    }
    s.push_str("]}");
    s
}

/// A reply the server sends of its own accord (a server-side subscription): the
/// same frame with `"id":null`.
pub fn unasked(reply: String) -> String {
    match reply.find(",\"topics\"") {
        Some(at) => format!("{},\"id\":null{}", &reply[..at], &reply[at..]),
        None => reply,
    }
}

/// `{"op":"presence","id":…,"topic":"…","clients":[{"session","user","node"}…]}`.
pub fn presence_reply(id: Option<u64>, topic: &str, clients: &[PresenceEntry]) -> String {
    let mut s = open("presence", id);
    // Validated topics need no escaping.
    let _ = write!(s, ",\"topic\":\"{topic}\",\"clients\":");
    s.push_str(&presence_clients(clients));
    s.push('}');
    s
}

/// The `clients` list of a presence answer.
pub fn presence_clients(clients: &[PresenceEntry]) -> String {
    serde_json::to_string(clients).expect("entries serialize")
}

/// `{"op":"presence_stats","id":…,"topic":"…","clients":N,"users":M}`.
pub fn presence_stats_reply(id: Option<u64>, topic: &str, stats: PresenceStats) -> String {
    let mut s = open("presence_stats", id);
    let _ = write!(
        s,
        ",\"topic\":\"{topic}\",\"clients\":{},\"users\":{}}}",
        stats.clients, stats.users
    );
    s
}

/// `{"op":"subscribed","id":…,"topics":[…],"streams":{…}}`: where each stream among
/// the topics starts (`streams` only when there is one).
pub fn subscribed_reply(id: Option<u64>, topics: &[Arc<str>], starts: &[StreamStart]) -> String {
    let mut s = topics_reply("subscribed", id, topics);
    if starts.is_empty() {
        return s;
    }
    s.pop(); // the closing brace
    s.push_str(",\"streams\":{");
    for (i, start) in starts.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        // Validated topics need no escaping.
        let _ = write!(s, "\"{}\":{{", start.topic);
        let mut fields = String::new();
        push_position(&mut fields, &start.position);
        s.push_str(&fields[1..]);
        if let Some(r) = start.recovered {
            let _ = write!(s, ",\"recovered\":{r}");
        }
        s.push('}');
    }
    s.push_str("}}");
    s
}

/// `{"op":"published","id":…}`, with `"seq":…,"epoch":…` for a stream publication.
pub fn published_reply(id: Option<u64>, position: Option<&Position>) -> String {
    let mut s = open("published", id);
    if let Some(p) = position {
        push_position(&mut s, p);
    }
    s.push('}');
    s
}

/// `,"seq":N,"epoch":"…"`: a stream position as fields of an object being written.
pub fn push_position(s: &mut String, p: &Position) {
    let _ = write!(s, ",\"seq\":{},\"epoch\":{}", p.seq, json_string(&p.epoch));
}

/// `{"op":"pong","id":…}`.
pub fn pong_reply(id: Option<u64>) -> String {
    let mut s = open("pong", id);
    s.push('}');
    s
}

/// `{"op":"refreshed","id":…}`.
pub fn refreshed_reply(id: Option<u64>) -> String {
    let mut s = open("refreshed", id);
    s.push('}');
    s
}

/// `{"op":"error","id":<id or null>,"code":"…","message":"…"}`.
pub fn error_reply(err: &CommandError) -> String {
    let mut s = String::with_capacity(96 + err.message.len());
    s.push_str("{\"op\":\"error\",\"id\":");
    match err.id {
        Some(id) => {
            let _ = write!(s, "{id}");
        }
        None => s.push_str("null"),
    }
    let _ = write!(
        s,
        ",\"code\":\"{}\",\"message\":{}}}",
        err.code.as_str(),
        json_string(&err.message)
    );
    s
}

/// The first frame of every session. `reconnect_ms` (with `--upgrade-rate`) is the
/// base delay the client should use before reconnecting after losing the connection
/// without a hint from the server (docs/protocol.md, "Reconnecting").
pub fn welcome(session: &str, node: &str, heartbeat_ms: u64, reconnect_ms: Option<u64>) -> String {
    let mut s = format!(
        "{{\"op\":\"welcome\",\"session\":{},\"node\":{},\"heartbeat_ms\":{heartbeat_ms}",
        json_string(session),
        json_string(node)
    );
    if let Some(ms) = reconnect_ms {
        let _ = write!(s, ",\"reconnect_ms\":{ms}");
    }
    s.push('}');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn err(text: &str) -> CommandError {
        decode(text).unwrap_err()
    }

    #[test]
    fn decodes_every_op() {
        match decode(r#"{"op":"subscribe","id":1,"topics":["news","prices.AAPL"]}"#).unwrap() {
            Command::Subscribe { id, topics, since } => {
                assert!(since.is_empty());
                assert_eq!(id, Some(1));
                assert_eq!(topics, vec![Arc::from("news"), Arc::from("prices.AAPL")]);
            }
            c => panic!("{c:?}"),
        }
        assert!(matches!(
            decode(r#"{"op":"unsubscribe","topics":["a"]}"#).unwrap(),
            Command::Unsubscribe { id: None, .. }
        ));
        match decode(r#"{"data": {"x": [1, 2]}, "op":"publish","id":3,"topic":"chat.1"}"#).unwrap()
        {
            Command::Publish { id, topic, data } => {
                assert_eq!((id, &*topic), (Some(3), "chat.1"));
                assert_eq!(data.get(), r#"{"x": [1, 2]}"#, "data kept byte for byte");
            }
            c => panic!("{c:?}"),
        }
        assert!(matches!(
            decode(r#"{"op":"ping","id":4}"#).unwrap(),
            Command::Ping { id: Some(4) }
        ));
        // null data is a value; unknown fields are ignored; escaped op works.
        assert!(matches!(
            decode(r#"{"op":"publish","topic":"t","data":null,"extra":1}"#).unwrap(),
            Command::Publish { .. }
        ));
        assert!(matches!(
            decode(r#"{"op":"p\u0069ng"}"#).unwrap(),
            Command::Ping { id: None }
        ));
        match decode(r#"{"op":"presence","id":7,"topic":"room.1"}"#).unwrap() {
            Command::Presence { id, topic } => assert_eq!((id, &*topic), (Some(7), "room.1")),
            c => panic!("{c:?}"),
        }
        assert!(matches!(
            decode(r#"{"op":"presence_stats","topic":"room.1"}"#).unwrap(),
            Command::PresenceStats { id: None, .. }
        ));
        assert_eq!(
            err(r#"{"op":"presence","id":2}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"presence","id":2,"topic":"a b"}"#).code,
            ErrorCode::InvalidTopic
        );
    }

    #[test]
    fn presence_replies_and_unasked_replies() {
        let list = [PresenceEntry {
            session: "s1".into(),
            user: None,
            node: "n\"1".into(),
        }];
        let v: Value = serde_json::from_str(&presence_reply(Some(7), "room.1", &list)).unwrap();
        assert_eq!(
            v,
            json!({"op":"presence","id":7,"topic":"room.1",
                   "clients":[{"session":"s1","user":null,"node":"n\"1"}]})
        );
        let stats = PresenceStats {
            clients: 3,
            users: 2,
        };
        let v: Value = serde_json::from_str(&presence_stats_reply(None, "r", stats)).unwrap();
        assert_eq!(
            v,
            json!({"op":"presence_stats","topic":"r","clients":3,"users":2})
        );
        let t = [Arc::from("a"), Arc::from("b")];
        assert_eq!(
            unasked(topics_reply("unsubscribed", None, &t)),
            r#"{"op":"unsubscribed","id":null,"topics":["a","b"]}"#
        );
    }

    #[test]
    fn errors_follow_the_contract() {
        let e = err("not json");
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, None));
        assert_eq!(err("[1,2]"), bad(None, "a frame must be one JSON object"));
        assert_eq!(err(r#"["ping", 3]"#).id, None);
        assert_eq!(err(r#"{"id":5}"#), bad(Some(5), "`op` is required"));
        assert_eq!(err(r#"{"op":7,"id":5}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"op":7,"id":5}"#).id, Some(5));
        let e = err(r#"{"op":"fly","id":6}"#);
        assert_eq!((e.code, e.id), (ErrorCode::UnknownOp, Some(6)));
        // Invalid ids are bad requests with a null id.
        for id in ["-1", "1.5", "\"7\"", "9007199254740992", "true"] {
            let e = err(&format!(r#"{{"op":"ping","id":{id}}}"#));
            assert_eq!((e.code, e.id), (ErrorCode::BadRequest, None), "id {id}");
        }
        assert!(matches!(
            decode(r#"{"op":"ping","id":9007199254740991}"#).unwrap(),
            Command::Ping { id: Some(MAX_ID) }
        ));
    }

    #[test]
    fn topic_rules() {
        let e = err(r#"{"op":"subscribe","id":1,"topics":[]}"#);
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(1)));
        let e = err(r#"{"op":"subscribe","id":1,"topics":["ok","bad topic"]}"#);
        assert_eq!((e.code, e.id), (ErrorCode::InvalidTopic, Some(1)));
        assert_eq!(
            err(r#"{"op":"subscribe","topics":["ok",3]}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"subscribe","topics":"news"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(err(r#"{"op":"subscribe"}"#).code, ErrorCode::BadRequest);
        assert_eq!(
            err(r#"{"op":"publish","topic":"a b","data":1}"#).code,
            ErrorCode::InvalidTopic
        );
        assert_eq!(
            err(r#"{"op":"publish","topic":"ab"}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"publish","data":1}"#).code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            err(r#"{"op":"publish","topic":5,"data":1}"#).code,
            ErrorCode::BadRequest
        );
    }

    fn since_of(text: &str) -> Since {
        match decode(text).unwrap() {
            Command::Subscribe { since, .. } => since,
            c => panic!("{c:?}"),
        }
    }

    #[test]
    fn since_positions_and_their_refusals() {
        let since = since_of(
            r#"{"op":"subscribe","topics":["news","chat"],"since":{"news":{"seq":37,"epoch":"x7f"},"other":{"seq":1,"epoch":"e"}}}"#,
        );
        assert_eq!(
            since.len(),
            1,
            "an entry for a topic not subscribed is ignored"
        );
        assert_eq!(since[&Arc::from("news")].seq, 37);
        assert_eq!(&*since[&Arc::from("news")].epoch, "x7f");
        assert!(since_of(r#"{"op":"subscribe","topics":["a"],"since":null}"#).is_empty());
        assert!(since_of(r#"{"op":"subscribe","topics":["a"],"since":{}}"#).is_empty());
        let max = format!(
            r#"{{"op":"subscribe","topics":["a"],"since":{{"a":{{"seq":{MAX_SEQ},"epoch":""}}}}}}"#
        );
        assert_eq!(since_of(&max)[&Arc::from("a")].seq, MAX_SEQ);
        for bad_since in [
            r#"[]"#,
            r#""a""#,
            r#"{"a":1}"#,
            r#"{"a":{"seq":-1,"epoch":"e"}}"#,
            r#"{"a":{"seq":1.5,"epoch":"e"}}"#,
            r#"{"a":{"seq":"1","epoch":"e"}}"#,
            r#"{"a":{"seq":9007199254740992,"epoch":"e"}}"#,
            r#"{"a":{"seq":99999999999999999999999,"epoch":"e"}}"#,
            r#"{"a":{"seq":1,"epoch":5}}"#,
            r#"{"a":{"seq":1}}"#,
            r#"{"a":{"epoch":"e"}}"#,
            r#"{"a":{"seq":1,"epoch":"e","x":1}}"#,
            r#"{"zzz":{"seq":1}}"#,
        ] {
            let e = err(&format!(
                r#"{{"op":"subscribe","id":9,"topics":["a"],"since":{bad_since}}}"#
            ));
            assert_eq!(
                (e.code, e.id),
                (ErrorCode::BadRequest, Some(9)),
                "{bad_since}"
            );
        }
    }

    #[test]
    fn subscribed_replies_report_stream_positions() {
        let topics = [Arc::from("news"), Arc::from("chat")];
        assert_eq!(
            subscribed_reply(Some(1), &topics, &[]),
            r#"{"op":"subscribed","id":1,"topics":["news","chat"]}"#
        );
        let start = |seq, recovered| StreamStart {
            topic: Arc::from("news"),
            position: Position {
                seq,
                epoch: Arc::from("x7f"),
            },
            recovered,
        };
        let reply = subscribed_reply(None, &topics, &[start(41, Some(true))]);
        assert_eq!(
            reply,
            r#"{"op":"subscribed","topics":["news","chat"],"streams":{"news":{"seq":41,"epoch":"x7f","recovered":true}}}"#
        );
        let v: Value = serde_json::from_str(&subscribed_reply(
            Some(2),
            &topics,
            &[start(0, None), start(3, Some(false))],
        ))
        .unwrap();
        assert_eq!(v["streams"]["news"]["recovered"], json!(false));
        assert_eq!(
            published_reply(
                Some(3),
                Some(&Position {
                    seq: 42,
                    epoch: Arc::from("x7f")
                })
            ),
            r#"{"op":"published","id":3,"seq":42,"epoch":"x7f"}"#
        );
    }

    #[test]
    fn refresh() {
        match decode(r#"{"op":"refresh","id":9,"token":"a.b.c"}"#).unwrap() {
            Command::Refresh { id, token } => assert_eq!((id, &*token), (Some(9), "a.b.c")),
            c => panic!("{c:?}"),
        }
        let e = err(r#"{"op":"refresh","id":9}"#);
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(9)));
        assert_eq!(
            err(r#"{"op":"refresh","token":5}"#).code,
            ErrorCode::BadRequest
        );
        let v: Value = serde_json::from_str(&refreshed_reply(Some(9))).unwrap();
        assert_eq!(v, json!({"op":"refreshed","id":9}));
    }

    #[test]
    fn replies_are_valid_json() {
        let topics = [Arc::from("a"), Arc::from("b.c")];
        let v: Value = serde_json::from_str(&topics_reply("subscribed", Some(1), &topics)).unwrap();
        assert_eq!(v, json!({"op":"subscribed","id":1,"topics":["a","b.c"]}));
        let v: Value = serde_json::from_str(&published_reply(None, None)).unwrap();
        assert_eq!(v, json!({"op":"published"}));
        let v: Value = serde_json::from_str(&pong_reply(Some(4))).unwrap();
        assert_eq!(v, json!({"op":"pong","id":4}));
        let e = CommandError::new(None, ErrorCode::RateLimited, "slow \"down\"");
        let v: Value = serde_json::from_str(&error_reply(&e)).unwrap();
        assert_eq!(
            v,
            json!({"op":"error","id":null,"code":"rate_limited","message":"slow \"down\""})
        );
        let v: Value = serde_json::from_str(&welcome("s1", "node \"a\"", 25000, None)).unwrap();
        assert_eq!(
            v,
            json!({"op":"welcome","session":"s1","node":"node \"a\"","heartbeat_ms":25000})
        );
        let v: Value = serde_json::from_str(&welcome("s1", "n", 25000, Some(1500))).unwrap();
        assert_eq!(
            v,
            json!({"op":"welcome","session":"s1","node":"n","heartbeat_ms":25000,"reconnect_ms":1500})
        );
    }
}
