//! Presence: who is subscribed to a topic, across every node, and the `join`/`leave`
//! events that tell subscribers when that changes (docs/protocol.md, "Presence").
//!
//! - [`PresenceOptions`]: a namespace's presence settings.
//! - [`PresenceEntry`]: one connection listed on a topic; [`PresenceEvent`]: a join or
//!   a leave, as brokers relay it between nodes; [`NodeInfo`]: one live node, as
//!   `GET /api/info` lists it.
//! - [`Table`]: a node's own presence entries (which of its connections are on which
//!   presence topic), the truth its broker's copy is rebuilt from.
//! - [`Budget`]: the per-topic rate rule that keeps a mass reconnect from turning
//!   into a storm of join/leave frames.
//!
//! The node ([`crate::Node`]) keeps the table and asks its broker to list and announce
//! each change; the broker keeps the cluster-wide copy (in memory, or in Redis under
//! a lease that dies with the node) and relays the events to every node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame;
use crate::hub::SubscriberId;

/// The default rate rule: join/leave events pushed per topic per second, per node.
pub const DEFAULT_JOIN_LEAVE_RATE: u32 = 20;

/// A namespace's presence settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceOptions {
    /// Subscribers receive `join`/`leave` events.
    pub join_leave: bool,
    /// At most this many join/leave events are pushed per topic and second on a node;
    /// the rest of that second's are summarised in one `presence_changed`.
    pub join_leave_rate: u32,
}

impl Default for PresenceOptions {
    fn default() -> Self {
        PresenceOptions {
            join_leave: false,
            join_leave_rate: DEFAULT_JOIN_LEAVE_RATE,
        }
    }
}

/// One connection listed in a topic's presence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The connection's session id (its `welcome`'s `session`).
    pub session: Arc<str>,
    /// The token's `sub`; `None` without auth.
    pub user: Option<Arc<str>>,
    /// The id of the node that holds the connection.
    pub node: Arc<str>,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceKind {
    Join,
    Leave,
}

impl PresenceKind {
    /// The event's `op`: `join` or `leave`.
    pub fn op(self) -> &'static str {
        match self {
            PresenceKind::Join => "join",
            PresenceKind::Leave => "leave",
        }
    }
}

/// A join or a leave of one connection, as brokers relay it between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    #[serde(rename = "op")]
    pub kind: PresenceKind,
    pub session: Arc<str>,
    pub user: Option<Arc<str>>,
}

impl PresenceEvent {
    /// The relay form: `{"op":"join","session":"…","user":"…"}`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an event serializes")
    }

    /// Reads the relay form; `None` for anything else (anyone with access to the
    /// broker can write any bytes).
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let e: PresenceEvent = serde_json::from_slice(bytes).ok()?;
        let ok = !e.session.is_empty()
            && e.session.len() <= 128
            && e.user.as_ref().is_none_or(|u| u.len() <= 1024);
        ok.then_some(e)
    }

    /// The client frame: `{"op":"join","topic":"…","session":"…","user":"…"}`.
    pub fn frame(&self, topic: &str) -> Bytes {
        let text = serde_json::json!({
            "op": self.kind.op(),
            "topic": topic,
            "session": &*self.session,
            "user": self.user.as_deref(),
        })
        .to_string();
        frame::text(text.as_bytes())
    }
}

/// The summary of the events a topic's rate rule skipped:
/// `{"op":"presence_changed","topic":"…","skipped":N}`.
pub fn changed_frame(topic: &str, skipped: u64) -> Bytes {
    let text = serde_json::json!({
        "op": "presence_changed",
        "topic": topic,
        "skipped": skipped,
    })
    .to_string();
    frame::text(text.as_bytes())
}

/// One live node, as `GET /api/info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id (its `welcome`'s `node`).
    pub node: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Connection–topic pairs.
    pub subscriptions: u64,
    /// Topics with at least one local subscriber.
    pub topics: u64,
    /// Seconds since the node started.
    pub uptime_s: u64,
    /// The gateway's version.
    pub version: String,
    /// Whether the node is draining.
    pub draining: bool,
    /// The most connections the node takes (`--max-connections`): its weight when the
    /// fleet's connections are shared out (rebalancing). 0: not said (a node of an
    /// older version), and then every node weighs the same.
    #[serde(default)]
    pub capacity: u64,
}

/// A topic's presence as counts only (`presence_stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PresenceStats {
    /// Connections listed.
    pub clients: usize,
    /// Distinct users among them (connections without a user are not counted).
    pub users: usize,
}

impl PresenceStats {
    /// The counts of a list.
    pub fn of(entries: &[PresenceEntry]) -> Self {
        let users: std::collections::HashSet<&str> =
            entries.iter().filter_map(|e| e.user.as_deref()).collect();
        PresenceStats {
            clients: entries.len(),
            users: users.len(),
        }
    }
}

/// One local connection on a presence topic.
#[derive(Debug, Clone)]
pub struct Local {
    pub id: SubscriberId,
    pub user: Option<Arc<str>>,
}

/// A node's presence entries on one topic, and the topic's rate rule.
#[derive(Debug, Default)]
pub struct TopicTable {
    /// By session id.
    pub members: HashMap<Arc<str>, Local>,
    pub budget: Budget,
}

/// A node's own presence entries, by topic: the truth its broker's copy is made of.
pub type Table = HashMap<Arc<str>, TopicTable>;

/// What the rate rule says of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Push it.
    Push,
    /// Skip it; this is the first skip of the window: schedule the summary for the
    /// window's end.
    SkipFirst(Instant),
    /// Skip it (the summary is already scheduled).
    Skip,
}

/// The per-topic rate rule: at most `rate` events per one-second window are pushed;
/// the rest are counted and summarised once the window ends.
#[derive(Debug, Default)]
pub struct Budget {
    window: Option<Instant>,
    used: u32,
    skipped: u64,
}

/// The window of the rate rule.
pub const WINDOW: Duration = Duration::from_secs(1);

impl Budget {
    /// Whether an event arriving `now` is pushed.
    pub fn admit(&mut self, now: Instant, rate: u32) -> Verdict {
        let fresh = self.window.is_none_or(|w| now.duration_since(w) >= WINDOW);
        if fresh && self.skipped == 0 {
            self.window = Some(now);
            self.used = 0;
        }
        let start = self.window.expect("set");
        if self.used < rate && self.skipped == 0 {
            self.used += 1;
            return Verdict::Push;
        }
        self.skipped += 1;
        if self.skipped == 1 {
            Verdict::SkipFirst(start + WINDOW)
        } else {
            Verdict::Skip
        }
    }

    /// The summary is due: how many events were skipped (then a new window starts).
    pub fn take_skipped(&mut self, now: Instant) -> u64 {
        let n = std::mem::take(&mut self.skipped);
        self.window = Some(now);
        self.used = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_junk_is_refused() {
        let e = PresenceEvent {
            kind: PresenceKind::Leave,
            session: "abc".into(),
            user: Some("alice".into()),
        };
        let back = PresenceEvent::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
        assert_eq!(
            PresenceEvent::from_json(br#"{"op":"join","session":"s","user":null}"#)
                .unwrap()
                .user,
            None
        );
        for junk in [
            &b"{}"[..],
            br#"{"op":"wave","session":"s","user":null}"#,
            br#"{"op":"join","session":"","user":null}"#,
            b"\xff\xfe",
        ] {
            assert!(PresenceEvent::from_json(junk).is_none());
        }
        let f = e.frame("room.1");
        let text = std::str::from_utf8(&f[2..]).unwrap();
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op":"leave","topic":"room.1","session":"abc","user":"alice"})
        );
    }

    #[test]
    fn the_budget_pushes_rate_per_window_then_summarises() {
        let mut b = Budget::default();
        let t0 = Instant::now();
        assert_eq!(b.admit(t0, 2), Verdict::Push);
        assert_eq!(b.admit(t0, 2), Verdict::Push);
        assert_eq!(b.admit(t0, 2), Verdict::SkipFirst(t0 + WINDOW));
        assert_eq!(b.admit(t0 + Duration::from_millis(10), 2), Verdict::Skip);
        // Until the summary is taken, later events are skipped too: a summary never
        // overtakes an event pushed after it.
        assert_eq!(b.admit(t0 + Duration::from_secs(2), 2), Verdict::Skip);
        assert_eq!(b.take_skipped(t0 + WINDOW), 3);
        assert_eq!(b.admit(t0 + WINDOW, 2), Verdict::Push);
        assert_eq!(b.admit(t0 + WINDOW, 2), Verdict::Push);
        assert_eq!(
            b.admit(t0 + WINDOW, 2),
            Verdict::SkipFirst(t0 + WINDOW + WINDOW)
        );
        // A quiet topic starts a fresh window.
        assert_eq!(b.take_skipped(t0 + WINDOW * 2), 1);
        assert_eq!(b.admit(t0 + WINDOW * 5, 2), Verdict::Push);
    }

    #[test]
    fn stats_count_connections_and_distinct_users() {
        let e = |s: &str, u: Option<&str>| PresenceEntry {
            session: s.into(),
            user: u.map(Into::into),
            node: "n".into(),
        };
        let list = [
            e("a", Some("alice")),
            e("b", Some("alice")),
            e("c", Some("bob")),
            e("d", None),
        ];
        assert_eq!(
            PresenceStats::of(&list),
            PresenceStats {
                clients: 4,
                users: 2
            }
        );
    }
}
