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

use std::borrow::Cow;

use serde_json::value::RawValue;
use wsgate_fanout::publication::payload_to_json;
use wsgate_fanout::{unix_nanos, BrokerEvents, Origin};

/// First bytes of every gateway payload: a non-UTF-8 marker and a version tag.
pub const MAGIC: &[u8; 5] = b"\xFFWSG1";
/// Bytes before the JSON data.
pub const HEADER_LEN: usize = MAGIC.len() + 8;

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
    fn a_forged_envelope_with_bad_json_is_not_spliced() {
        let mut p = encode(b"{}", 1);
        p.truncate(HEADER_LEN);
        p.extend_from_slice(b"{not json");
        let (data, at) = decode(&p);
        assert_eq!(at, None);
        assert!(serde_json::from_slice::<serde_json::Value>(&data).is_ok());
    }
}
