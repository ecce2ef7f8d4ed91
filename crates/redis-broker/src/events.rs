//! The receive path both modes share: a Redis message on one of our channels is
//! reported to the node ([`BrokerEvents`]) without ever blocking. The node's
//! `has_subscribers` / `topics` are the truth for interest in both modes.

use std::sync::Arc;

use wsgate_fanout::BrokerEvents;

use crate::channel::Channels;
use crate::envelope;
use crate::streams::Relay;

/// A message on `channel` arrived from Redis: decode it (a server command on the
/// control channel, a join or leave, a stream's relay message, a gateway's envelope
/// or a backend's payload) and report it. Channels that are not ours are ignored. A
/// plain message on a stream's channel is reported as plain: the node decides what it
/// means.
pub(crate) fn deliver(
    events: &dyn BrokerEvents,
    channels: &Channels,
    channel: &[u8],
    payload: &[u8],
) {
    if channels.is_control(channel) {
        events.control(payload);
        return;
    }
    let Some(topic) = channels.topic_of(channel) else {
        return;
    };
    match envelope::decode_presence(payload) {
        Some(Some(event)) => return events.presence_event(&topic, event),
        Some(None) => return, // marked as an event but none: junk
        None => {}
    }
    match Relay::decode(payload) {
        Some(r) => {
            let epoch: Arc<str> = Arc::from(r.epoch);
            events.stream_publication(&topic, &epoch, r.entry(), r.origin);
        }
        None => envelope::report(events, &topic, payload),
    }
}
