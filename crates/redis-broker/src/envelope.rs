//! The relay envelope: what a gateway puts in a Redis `PUBLISH` payload.
//!
//! Backends publish plain payloads (JSON delivered as-is, other UTF-8 as a JSON
//! string: [`payload_to_json`]). A gateway also needs to carry the time its node
//! accepted the publication, so that every node can measure publish → deliver
//! latency across the cluster. Gateway payloads therefore look like
//!
//! ```text
//! 0xFF  b"WSG1"  <accepted_at: u64 big-endian, ns since the UNIX epoch>  <JSON data>
//! ```
//!
//! The byte 0xFF never occurs in UTF-8, so a backend's (UTF-8) payload can never be
//! taken for an envelope. The JSON inside an envelope is validated again on receipt:
//! anyone with access to Redis can write any bytes, and a subscriber must never get a
//! malformed frame.
//!
//! A join or leave travels on the topic's own channel (so it keeps its place among
//! the topic's publications) in an envelope of its own:
//!
//! ```text
//! 0xFF  b"WSE1"  <PresenceEvent::to_json()>
//! ```
//!
//! ([`encode_presence`], [`decode_presence`]). A payload that starts with that marker
//! but does not hold an event is dropped, never delivered as a publication.

use std::borrow::Cow;

use serde_json::value::RawValue;
use wsgate_fanout::publication::payload_to_json;
use wsgate_fanout::{unix_nanos, BrokerEvents, Origin, PresenceEvent};

/// First bytes of every gateway payload: a non-UTF-8 marker and a version tag.
pub const MAGIC: &[u8; 5] = b"\xFFWSG1";
/// Bytes before the JSON data.
pub const HEADER_LEN: usize = MAGIC.len() + 8;

/// First bytes of a relayed join or leave.
pub const PRESENCE_MAGIC: &[u8; 5] = b"\xFFWSE1";

/// The Redis payload relaying `event`.
pub fn encode_presence(event: &PresenceEvent) -> Vec<u8> {
    [&PRESENCE_MAGIC[..], &event.to_json()].concat()
}

/// What a payload on a topic's channel is, as far as presence goes: `None` for
/// anything that is not a presence envelope, `Some(None)` for one that holds no valid
/// event (dropped), `Some(Some(event))` for an event.
pub fn decode_presence(payload: &[u8]) -> Option<Option<PresenceEvent>> {
    let json = payload.strip_prefix(&PRESENCE_MAGIC[..])?;
    Some(PresenceEvent::from_json(json))
}

/// Builds the Redis payload for a gateway publication of `data` (valid JSON).
pub fn encode(data: &[u8], accepted_at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&accepted_at.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a Redis payload into the JSON to deliver and the accept time (`None` for a
/// backend payload, whose accept time is when this node receives it).
pub fn decode(payload: &[u8]) -> (Cow<'_, [u8]>, Option<u64>) {
    if payload.len() > HEADER_LEN && payload.starts_with(MAGIC) {
        let data = &payload[HEADER_LEN..];
        if let Ok(raw) = serde_json::from_slice::<&RawValue>(data) {
            let at = u64::from_be_bytes(
                payload[MAGIC.len()..HEADER_LEN]
                    .try_into()
                    .expect("8 bytes"),
            );
            return (Cow::Borrowed(raw.get().as_bytes()), Some(at));
        }
    }
    (payload_to_json(payload), None)
}

/// Reports a message that arrived on `topic`'s channel to the node: a gateway's
/// envelope with its accept time, anything else as a backend's publication received now.
/// Both modes' readers end here.
pub(crate) fn report(events: &dyn BrokerEvents, topic: &str, payload: &[u8]) {
    match decode(payload) {
        (data, Some(at)) => events.publication(topic, &data, at, Origin::Gateway),
        (data, None) => events.publication(topic, &data, unix_nanos(), Origin::Backend),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_data_and_time() {
        let p = encode(br#"{"a":1}"#, 1_700_000_000_123_456_789);
        let (data, at) = decode(&p);
        assert_eq!(&*data, br#"{"a":1}"#);
        assert_eq!(at, Some(1_700_000_000_123_456_789));
    }

    #[test]
    fn backend_payloads_are_never_envelopes() {
        // Text that spells the magic without the 0xFF byte is plain text.
        let (data, at) = decode(b"WSG1xxxxxxxx{}");
        assert_eq!(&*data, br#""WSG1xxxxxxxx{}""#);
        assert_eq!(at, None);
        let (data, at) = decode(br#"{"x":[1,2]}"#);
        assert_eq!(&*data, br#"{"x":[1,2]}"#);
        assert_eq!(at, None);
        let (data, _) = decode(b"hello");
        assert_eq!(&*data, br#""hello""#);
    }

    #[test]
    fn presence_events_round_trip_and_junk_is_dropped() {
        use wsgate_fanout::PresenceKind;
        for user in [None, Some("alice")] {
            let e = PresenceEvent {
                kind: PresenceKind::Join,
                session: "s1".into(),
                user: user.map(Into::into),
            };
            let p = encode_presence(&e);
            assert_eq!(p[0], 0xFF);
            assert_eq!(decode_presence(&p), Some(Some(e)));
            // Never taken for a publication envelope, and the other way round.
            assert_eq!(decode(&p).1, None);
        }
        assert_eq!(decode_presence(&encode(b"{}", 1)), None);
        assert_eq!(decode_presence(br#"{"op":"join","session":"s"}"#), None);
        assert_eq!(decode_presence(b"WSE1{}"), None);
        assert_eq!(decode_presence(b"\xFFWSE1{not json"), Some(None));
        assert_eq!(
            decode_presence(b"\xFFWSE1{\"op\":\"wave\",\"session\":\"s\",\"user\":null}"),
            Some(None)
        );
        // The form a Lua script writes (cjson: escaped slashes, any key order).
        let lua = b"\xFFWSE1{\"user\":\"a\\/b\",\"session\":\"s\",\"op\":\"leave\"}";
        let e = decode_presence(lua).unwrap().unwrap();
        assert_eq!(e.kind, PresenceKind::Leave);
        assert_eq!(e.user.as_deref(), Some("a/b"));
    }

    #[test]
    fn a_forged_envelope_with_bad_json_is_not_spliced() {
        let mut p = encode(b"{}", 1);
        p.truncate(HEADER_LEN);
        p.extend_from_slice(b"{not json");
        let (data, at) = decode(&p);
        assert_eq!(at, None);
        assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok());
    }
}
