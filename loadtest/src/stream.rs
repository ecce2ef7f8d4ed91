//! Stream accounting: on a stream topic every message carries the topic's position
//! (`"seq":N` at the end of the envelope), and a subscriber must see the seqs of each
//! topic contiguously: no gap, no duplicate, no step back. `reset` frames announce
//! what the server knows was lost.
//!
//! Reading the position costs a few byte comparisons at the end of the frame (the
//! server writes `…,"seq":N}` last), not a JSON parse. [`StreamTracker`] keeps the
//! last seq per topic of one subscriber: subscribers hold one topic (or a handful),
//! so a short list searched linearly is the cheapest map.

use memchr::memmem;
use serde::{Deserialize, Serialize};

/// Stream counters of one subscriber (or a sum over many).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCounts {
    /// Messages that carried a `seq`.
    pub messages: u64,
    /// `stream_gaps`: times a seq arrived more than one past the previous one of its
    /// topic (per subscriber and topic).
    pub gaps: u64,
    /// Seqs skipped over by those gaps.
    pub missing: u64,
    /// `stream_dups`: seqs at or below one already delivered on the topic
    /// (duplicates or a step back).
    pub dups: u64,
    /// `reset` frames received (the server announced a loss or a new epoch).
    pub resets: u64,
}

impl StreamCounts {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &StreamCounts) {
        self.messages += o.messages;
        self.gaps += o.gaps;
        self.missing += o.missing;
        self.dups += o.dups;
        self.resets += o.resets;
    }

    /// Whether every seq arrived exactly once, in order, without a reset.
    pub fn exact(&self) -> bool {
        self.gaps == 0 && self.dups == 0 && self.resets == 0
    }
}

/// What one message's seq was, relative to the topic's previous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The next seq (or the first one seen, when no position was known).
    Next,
    /// This many seqs were skipped.
    Gap(u64),
    /// Not beyond the last one delivered.
    Dup,
}

#[derive(Debug)]
struct TopicPos {
    topic: Box<[u8]>,
    /// Last seq delivered (or the position reported by `subscribed`); `None` until
    /// one is known.
    last: Option<u64>,
}

/// Per-topic positions of one subscriber.
#[derive(Debug, Default)]
pub struct StreamTracker {
    topics: Vec<TopicPos>,
    counts: StreamCounts,
}

impl StreamTracker {
    pub fn new() -> Self {
        StreamTracker::default()
    }

    fn slot(&mut self, topic: &[u8]) -> &mut Option<u64> {
        let i = match self.topics.iter().position(|t| &*t.topic == topic) {
            Some(i) => i,
            None => {
                self.topics.push(TopicPos {
                    topic: topic.into(),
                    last: None,
                });
                self.topics.len() - 1
            }
        };
        &mut self.topics[i].last
    }

    /// The position `subscribed` reported: live delivery continues after `seq`.
    pub fn start(&mut self, topic: &[u8], seq: u64) {
        *self.slot(topic) = Some(seq);
    }

    /// Accounts one message of `topic` carrying `seq`.
    pub fn record(&mut self, topic: &[u8], seq: u64) -> Step {
        self.counts.messages += 1;
        let last = self.slot(topic);
        let step = match *last {
            None => Step::Next,
            Some(l) if seq == l + 1 => Step::Next,
            Some(l) if seq > l => Step::Gap(seq - l - 1),
            Some(_) => Step::Dup,
        };
        match step {
            Step::Next => *last = Some(seq),
            Step::Gap(n) => {
                *last = Some(seq);
                self.counts.gaps += 1;
                self.counts.missing += n;
            }
            Step::Dup => self.counts.dups += 1,
        }
        step
    }

    /// Accounts a `reset` of `topic` at `seq`: delivery continues with `seq + 1`
    /// (a new epoch is announced at seq 0).
    pub fn reset(&mut self, topic: &[u8], seq: u64) {
        self.counts.resets += 1;
        *self.slot(topic) = Some(seq);
    }

    /// The last seq delivered on `topic` (or its starting position).
    pub fn last(&self, topic: &[u8]) -> Option<u64> {
        self.topics
            .iter()
            .find(|t| &*t.topic == topic)
            .and_then(|t| t.last)
    }

    /// The counters so far.
    pub fn counts(&self) -> StreamCounts {
        self.counts
    }
}

/// The `seq` of a stream message: the server ends the envelope with `,"seq":N}`.
/// `None` for a message without one (a plain topic).
pub fn tail_seq(frame: &[u8]) -> Option<u64> {
    let body = frame.strip_suffix(b"}")?;
    let digits = body.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let (head, num) = body.split_at(body.len() - digits);
    if !head.ends_with(br#","seq":"#) {
        return None;
    }
    num.iter().try_fold(0u64, |n, b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The topic of a `message` or `reset` frame (`"topic":"…"`, usually right after
/// `op`). Topics contain no quote or backslash, so the next quote ends the name.
pub fn topic_of(frame: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = br#""topic":""#;
    // wsgate writes `{"op":"message","topic":"…` and `{"op":"reset","topic":"…`.
    let at = if frame.get(15..15 + KEY.len()) == Some(KEY) {
        15 + KEY.len()
    } else if frame.get(13..13 + KEY.len()) == Some(KEY) {
        13 + KEY.len()
    } else {
        memmem::find(frame, KEY)? + KEY.len()
    };
    let len = memchr::memchr(b'"', &frame[at..])?;
    Some(&frame[at..at + len])
}

/// A `reset` frame's topic and seq (rare: parsed properly).
pub fn parse_reset(frame: &[u8]) -> Option<(String, u64)> {
    #[derive(Deserialize)]
    struct Reset {
        topic: String,
        seq: u64,
    }
    let r: Reset = serde_json::from_slice(frame).ok()?;
    Some((r.topic, r.seq))
}

/// One topic's entry in a `subscribed` reply's `streams`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
    /// Present in the answer to a subscribe with `since`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// The `streams` of a `subscribed` reply (empty for plain topics or a v1 server).
/// Parsed with serde: one reply per subscribe, not per message.
pub fn positions(frame: &[u8]) -> Vec<(String, Position)> {
    #[derive(Deserialize)]
    struct Subscribed {
        #[serde(default)]
        streams: std::collections::BTreeMap<String, Position>,
    }
    if memmem::find(frame, br#""streams""#).is_none() {
        return Vec::new();
    }
    serde_json::from_slice::<Subscribed>(frame)
        .map(|s| s.streams.into_iter().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: Option<u64>, seqs: &[u64]) -> (StreamCounts, Vec<Step>) {
        let mut t = StreamTracker::new();
        if let Some(s) = start {
            t.start(b"a", s);
        }
        let steps = seqs.iter().map(|s| t.record(b"a", *s)).collect();
        (t.counts(), steps)
    }

    #[test]
    fn contiguous_from_the_reported_position_is_exact() {
        let (c, steps) = run(Some(41), &[42, 43, 44]);
        assert!(c.exact());
        assert_eq!(c.messages, 3);
        assert!(steps.iter().all(|s| *s == Step::Next));
        // Without a reported position the first seq seen starts the run.
        let (c, _) = run(None, &[7, 8, 9]);
        assert!(c.exact());
    }

    #[test]
    fn gaps_count_events_and_missing_seqs() {
        let (c, steps) = run(Some(0), &[1, 2, 5, 6, 10]);
        assert_eq!((c.gaps, c.missing, c.dups), (2, 5, 0));
        assert_eq!(steps[2], Step::Gap(2));
        assert_eq!(steps[4], Step::Gap(3));
        // The first message after the position already counts.
        let (c, _) = run(Some(41), &[43]);
        assert_eq!((c.gaps, c.missing), (1, 1));
    }

    #[test]
    fn repeats_and_steps_back_are_dups_and_do_not_move_the_position() {
        let (c, steps) = run(Some(0), &[1, 2, 2, 1, 3]);
        assert_eq!((c.dups, c.gaps), (1 + 1, 0));
        assert_eq!(
            steps,
            [Step::Next, Step::Next, Step::Dup, Step::Dup, Step::Next]
        );
        // A replayed seq at or below the subscribe position is a dup too.
        let (c, _) = run(Some(41), &[41, 42]);
        assert_eq!((c.dups, c.gaps), (1, 0));
    }

    #[test]
    fn resets_move_the_position_and_are_counted() {
        let mut t = StreamTracker::new();
        t.start(b"a", 10);
        t.record(b"a", 11);
        t.reset(b"a", 57);
        assert_eq!(t.record(b"a", 58), Step::Next);
        // A new epoch: reset at 0, then 1, 2, ….
        t.reset(b"a", 0);
        assert_eq!(t.record(b"a", 1), Step::Next);
        let c = t.counts();
        assert_eq!((c.resets, c.gaps, c.dups), (2, 0, 0));
        assert!(!c.exact());
        assert_eq!(t.last(b"a"), Some(1));
    }

    #[test]
    fn topics_are_independent() {
        let mut t = StreamTracker::new();
        t.start(b"a", 5);
        t.start(b"b", 100);
        assert_eq!(t.record(b"a", 6), Step::Next);
        assert_eq!(t.record(b"b", 101), Step::Next);
        assert_eq!(t.record(b"a", 7), Step::Next);
        assert_eq!(t.record(b"b", 103), Step::Gap(1));
        assert_eq!(t.last(b"a"), Some(7));
        assert_eq!(t.last(b"c"), None);
        let mut sum = t.counts();
        sum.add(&t.counts());
        assert_eq!((sum.messages, sum.gaps, sum.missing), (8, 2, 2));
    }

    #[test]
    fn reads_the_seq_at_the_end_of_the_envelope() {
        let f =
            br#"{"op":"message","topic":"chat:1","data":{"p":1,"s":2,"t":3,"pad":"x"},"seq":42}"#;
        assert_eq!(tail_seq(f), Some(42));
        assert_eq!(topic_of(f), Some(&b"chat:1"[..]));
        // Plain topics: no seq. A `seq` inside the data is not the position.
        assert_eq!(
            tail_seq(br#"{"op":"message","topic":"a","data":{"seq":5}}"#),
            None
        );
        assert_eq!(tail_seq(br#"{"op":"message","topic":"a","data":5}"#), None);
        assert_eq!(tail_seq(br#"{"x":1,"seq":}"#), None);
        assert_eq!(tail_seq(br#"{"seq":99999999999999999999}"#), None);
        // Other key orders still find the topic.
        assert_eq!(
            topic_of(br#"{"topic":"b","op":"message"}"#),
            Some(&b"b"[..])
        );
        let r = br#"{"op":"reset","topic":"chat:1","seq":57,"epoch":"k2v9"}"#;
        assert_eq!(topic_of(r), Some(&b"chat:1"[..]));
        assert_eq!(parse_reset(r), Some(("chat:1".into(), 57)));
    }

    #[test]
    fn the_payload_scan_is_not_fooled_by_the_seq_field() {
        use crate::payload::{encode, scan, scan_message, Stamp};
        let st = Stamp {
            publisher: 3,
            seq: 9,
            sent_ns: 1_700_000_000_000_000_000,
        };
        let mut f = br#"{"op":"message","topic":"chat:1","data":"#.to_vec();
        encode(&mut f, &st, 100);
        f.extend_from_slice(br#","seq":12345}"#);
        assert_eq!(scan_message(&f), Some(st));
        assert_eq!(scan(&f), Some(st));
        assert_eq!(tail_seq(&f), Some(12345));
    }

    #[test]
    fn reads_positions_from_subscribed() {
        let f = br#"{"op":"subscribed","id":1,"topics":["chat:1","news"],"streams":{"chat:1":{"seq":41,"epoch":"k2v9","recovered":true}}}"#;
        let p = positions(f);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "chat:1");
        assert_eq!(
            p[0].1,
            Position {
                seq: 41,
                epoch: "k2v9".into(),
                recovered: Some(true)
            }
        );
        assert!(positions(br#"{"op":"subscribed","id":1,"topics":["a"]}"#).is_empty());
    }
}
