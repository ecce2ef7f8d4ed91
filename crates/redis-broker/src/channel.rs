//! Channel naming, the same in both modes: topic `t` is channel `<prefix>t`; in cluster
//! mode the optional hash-tag rule makes it `<prefix>{<first segment>}<rest>` so that
//! related topics share a slot. Topics cannot contain braces (the wire contract's
//! alphabet), so the mapping is reversible: [`Channels::topic_of`].
//!
//! One more channel is the nodes' own: `<prefix>#control`, where server commands go
//! to every node ([`Channels::control`]). `#` is not in a topic's alphabet, so no
//! topic has that channel; to the subscriber managers it is the pseudo-topic
//! [`CONTROL`], held at all times.

use std::borrow::Cow;
use std::sync::Arc;

/// Default prefix of Redis channel names.
pub const DEFAULT_PREFIX: &str = "wsgate:";

/// The pseudo-topic of the control channel: `channel(CONTROL)` is
/// [`Channels::control`] (no topic can be named so).
pub const CONTROL: &str = "#control";

/// How topics become channel names and back.
#[derive(Debug, Clone)]
pub struct Channels {
    prefix: Arc<str>,
    /// With `Some(b'.')`, topic `room42.chat` uses channel `<prefix>{room42}.chat`.
    hash_tag_separator: Option<u8>,
}

impl Channels {
    /// Channels `<prefix><topic>`, tagged by the part before `hash_tag_separator`.
    pub fn new(prefix: &str, hash_tag_separator: Option<u8>) -> Self {
        Channels {
            prefix: Arc::from(prefix),
            hash_tag_separator,
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The control channel, `<prefix>#control`.
    pub fn control(&self) -> Vec<u8> {
        [self.prefix.as_bytes(), CONTROL.as_bytes()].concat()
    }

    /// Whether `channel` is the control channel.
    pub fn is_control(&self, channel: &[u8]) -> bool {
        channel
            .strip_prefix(self.prefix.as_bytes())
            .is_some_and(|rest| rest == CONTROL.as_bytes())
    }

    /// The channel of `topic`.
    pub fn channel(&self, topic: &str) -> Vec<u8> {
        let mut c = Vec::with_capacity(self.prefix.len() + topic.len() + 2);
        c.extend_from_slice(self.prefix.as_bytes());
        match self
            .hash_tag_separator
            .and_then(|sep| topic.bytes().position(|b| b == sep))
        {
            Some(at) if at > 0 => {
                c.push(b'{');
                c.extend_from_slice(&topic.as_bytes()[..at]);
                c.push(b'}');
                c.extend_from_slice(&topic.as_bytes()[at..]);
            }
            _ => c.extend_from_slice(topic.as_bytes()),
        }
        c
    }

    /// The topic of a channel, `None` for channels that are not ours.
    pub fn topic_of<'a>(&self, channel: &'a [u8]) -> Option<Cow<'a, str>> {
        let rest = channel.strip_prefix(self.prefix.as_bytes())?;
        let rest = std::str::from_utf8(rest).ok()?;
        if self.hash_tag_separator.is_some() {
            if let Some(tagged) = rest.strip_prefix('{') {
                let (tag, tail) = tagged.split_once('}')?;
                return Some(Cow::Owned(format!("{tag}{tail}")));
            }
        }
        Some(Cow::Borrowed(rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::slot::key_slot;

    #[test]
    fn channels_without_the_hash_tag_rule() {
        let s = Channels::new("wsgate:", None);
        assert_eq!(s.channel("room42.chat"), b"wsgate:room42.chat");
        assert_eq!(s.topic_of(b"wsgate:room42.chat").unwrap(), "room42.chat");
        assert_eq!(s.topic_of(b"other:x"), None);
    }

    #[test]
    fn the_hash_tag_rule_colocates_and_reverses() {
        let s = Channels::new("wsgate:", Some(b'.'));
        let chat = s.channel("room42.chat");
        let typing = s.channel("room42.typing");
        assert_eq!(chat, b"wsgate:{room42}.chat");
        assert_eq!(key_slot(&chat), key_slot(&typing));
        assert_eq!(s.topic_of(&chat).unwrap(), "room42.chat");
        // No separator, or nothing before it: no tag.
        assert_eq!(s.channel("news"), b"wsgate:news");
        assert_eq!(s.channel(".x"), b"wsgate:.x");
        assert_eq!(s.topic_of(b"wsgate:news").unwrap(), "news");
        assert_eq!(s.topic_of(b"wsgate:{unclosed"), None);
    }

    #[test]
    fn the_control_channel_is_the_control_pseudo_topic() {
        for sep in [
            None,
            Some(b'.'),
            Some(b'_'),
            Some(b'-'),
            Some(b':'),
            Some(b'/'),
        ] {
            let s = Channels::new("wsgate:", sep);
            assert_eq!(s.control(), b"wsgate:#control");
            assert_eq!(s.channel(CONTROL), s.control());
            assert!(s.is_control(&s.control()));
            assert!(!s.is_control(b"wsgate:control"));
            assert!(!s.is_control(b"other:#control"));
        }
    }
}
