//! The receive path both modes share: a Redis message on one of our channels is
//! reported to the node ([`BrokerEvents`]) without ever blocking. The node's
//! `has_subscribers` / `topics` are the truth for interest in both modes.

use wsgate_fanout::BrokerEvents;

use crate::channel::Channels;
use crate::envelope;

/// A message on `channel` arrived from Redis: decode it (envelope or backend payload)
/// and report it. Channels that are not ours are ignored.
pub(crate) fn deliver(
    events: &dyn BrokerEvents,
    channels: &Channels,
    channel: &[u8],
    payload: &[u8],
) {
    if let Some(topic) = channels.topic_of(channel) {
        envelope::report(events, &topic, payload);
    }
}
