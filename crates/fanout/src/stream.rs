//! Streams: topics whose publications are numbered and kept (docs/protocol.md,
//! "Streams").
//!
//! - [`StreamOptions`]: how much history a stream keeps; [`Namespaces`]: which topics
//!   are streams (configured per namespace, longest pattern wins).
//! - [`Position`], [`History`]: what brokers answer about a stream.
//! - [`StreamState`]: what one node has delivered of one stream to its local
//!   subscribers, as pure state. Every arriving publication goes through
//!   [`StreamState::on_publication`], which says what to do: deliver it, drop a
//!   duplicate, announce a `reset`, or repair a gap from history first. The node runs
//!   the actions; this module does no I/O and is unit tested step by step.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::presence::PresenceOptions;
use crate::topic::{validate_topic, TopicError};

/// How much history a stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// At most this many publications (≥ 1).
    pub history_size: usize,
    /// Publications older than this are dropped; a stream with no publication for this
    /// long may be forgotten altogether (its numbering then restarts in a new epoch).
    pub history_ttl: Duration,
}

/// A topic pattern: an exact name, or a prefix followed by `*` (`chat:*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    prefix: bool,
}

impl Pattern {
    /// Parses `chat:*` (every topic starting with `chat:`), `*` (every topic) or an
    /// exact topic name.
    ///
    /// # Errors
    /// A `*` anywhere but at the end, or characters a topic cannot have.
    pub fn parse(s: &str) -> Result<Self, PatternError> {
        let (text, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        if text.contains('*') {
            return Err(PatternError::Star(s.to_owned()));
        }
        if !(prefix && text.is_empty()) {
            validate_topic(text).map_err(|e| PatternError::Topic(s.to_owned(), e))?;
        }
        Ok(Pattern {
            text: text.into(),
            prefix,
        })
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        if self.prefix {
            topic.starts_with(&*self.text)
        } else {
            topic == &*self.text
        }
    }

    /// How specific the pattern is: exact names beat prefixes, longer prefixes beat
    /// shorter ones.
    fn rank(&self) -> (bool, usize) {
        (!self.prefix, self.text.len())
    }

    /// The pattern as written.
    pub fn as_string(&self) -> String {
        if self.prefix {
            format!("{}*", self.text)
        } else {
            self.text.to_string()
        }
    }
}

/// Why a topic pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("topic pattern {0:?}: `*` may only end a pattern (`chat:*`)")]
    Star(String),
    #[error("topic pattern {0:?}: {1}")]
    Topic(String, TopicError),
}

/// One namespace: the topics it covers and what they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace's name (for logs and errors).
    pub name: String,
    /// The topics it covers.
    pub topics: Vec<Pattern>,
    /// `Some` when its topics are streams.
    pub stream: Option<StreamOptions>,
    /// `Some` when its topics track presence.
    pub presence: Option<PresenceOptions>,
    /// Whether clients may publish to its topics (else only the HTTP API and
    /// backends can: `forbidden`).
    pub client_publish: bool,
    /// Whether clients may subscribe to its topics themselves (else only the server
    /// can subscribe them: the server API, or the token's `subs` claim).
    pub client_subscribe: bool,
    /// What a connection's queue does with its topics' publications when the
    /// client reads too slowly.
    pub slow_consumer: SlowConsumer,
    /// Whether its topics' publications are sent compressed to connections that
    /// negotiated permessage-deflate (when the gateway compresses at all: see
    /// [`Namespaces::with_compression`]).
    pub compression: bool,
}

/// What happens to a topic's publications when a client's outbound queue would
/// overflow (docs/configuration.md, "Namespaces"; docs/operations.md, "Slow
/// consumers: which policy when").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SlowConsumer {
    /// The connection is closed with 4008 (slow consumer). Nothing is ever dropped
    /// from a connection that stays open.
    #[default]
    Disconnect,
    /// The oldest queued publications of such topics are dropped to make room; the
    /// connection stays.
    DropOldest,
    /// Conflation: a connection that lags keeps at most one undelivered
    /// publication per topic, the newest.
    Latest,
}

impl SlowConsumer {
    /// Every policy with its name in the configuration file.
    pub const ALL: [(&'static str, SlowConsumer); 3] = [
        ("disconnect", SlowConsumer::Disconnect),
        ("drop_oldest", SlowConsumer::DropOldest),
        ("latest", SlowConsumer::Latest),
    ];

    /// The policy's name in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            SlowConsumer::Disconnect => "disconnect",
            SlowConsumer::DropOldest => "drop_oldest",
            SlowConsumer::Latest => "latest",
        }
    }

    /// The policy named `s` (as in the configuration file).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == s).map(|&(_, p)| p)
    }
}

impl Default for Namespace {
    /// A namespace of plain topics that clients may publish and subscribe to.
    fn default() -> Self {
        Namespace {
            name: String::new(),
            topics: Vec::new(),
            stream: None,
            presence: None,
            client_publish: true,
            client_subscribe: true,
            slow_consumer: SlowConsumer::Disconnect,
            compression: true,
        }
    }
}

/// Which topics are streams: a list of namespaces; the most specific pattern that
/// matches a topic decides (an exact name over a prefix, a longer prefix over a
/// shorter one). Topics no namespace covers are plain (v1) topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespaces {
    list: Vec<Namespace>,
    /// Whether the gateway negotiates permessage-deflate (off unless
    /// [`Namespaces::with_compression`] says so).
    compression: bool,
}

impl Namespaces {
    /// Namespaces from a list.
    ///
    /// # Errors
    /// Two namespaces claim the same pattern.
    pub fn new(list: Vec<Namespace>) -> Result<Self, String> {
        let mut seen: Vec<(&Pattern, &str)> = Vec::new();
        for ns in &list {
            for p in &ns.topics {
                if let Some((_, other)) = seen.iter().find(|(q, _)| *q == p) {
                    return Err(format!(
                        "namespaces {other:?} and {:?} both claim topics {:?}",
                        ns.name,
                        p.as_string()
                    ));
                }
                seen.push((p, &ns.name));
            }
        }
        Ok(Namespaces {
            list,
            compression: false,
        })
    }

    /// The namespace `topic` belongs to, if any.
    pub fn namespace(&self, topic: &str) -> Option<&Namespace> {
        let mut best: Option<(&Namespace, (bool, usize))> = None;
        for ns in &self.list {
            for p in &ns.topics {
                if p.matches(topic) && best.is_none_or(|(_, r)| p.rank() > r) {
                    best = Some((ns, p.rank()));
                }
            }
        }
        best.map(|(ns, _)| ns)
    }

    /// The stream options of `topic`, if it is a stream.
    pub fn stream(&self, topic: &str) -> Option<&StreamOptions> {
        self.namespace(topic).and_then(|ns| ns.stream.as_ref())
    }

    /// Whether any topic is a stream.
    pub fn has_streams(&self) -> bool {
        self.list.iter().any(|ns| ns.stream.is_some())
    }

    /// The presence options of `topic`, if it tracks presence.
    pub fn presence(&self, topic: &str) -> Option<&PresenceOptions> {
        self.namespace(topic).and_then(|ns| ns.presence.as_ref())
    }

    /// Whether any topic tracks presence.
    pub fn has_presence(&self) -> bool {
        self.list.iter().any(|ns| ns.presence.is_some())
    }

    /// Whether clients may publish to `topic` themselves.
    pub fn client_publish(&self, topic: &str) -> bool {
        self.namespace(topic).is_none_or(|ns| ns.client_publish)
    }

    /// The slow-consumer policy of `topic` (`disconnect` outside any namespace).
    pub fn slow_consumer(&self, topic: &str) -> SlowConsumer {
        self.namespace(topic)
            .map_or(SlowConsumer::Disconnect, |ns| ns.slow_consumer)
    }

    /// Sets whether the gateway compresses at all (permessage-deflate on `/ws`).
    pub fn with_compression(mut self, on: bool) -> Self {
        self.compression = on;
        self
    }

    /// Whether publications to `topic` are compressed for the connections that
    /// negotiated permessage-deflate: the gateway compresses and the topic's
    /// namespace (if any) does not turn it off.
    pub fn compresses(&self, topic: &str) -> bool {
        self.compresses_in(self.namespace(topic))
    }

    /// [`Namespaces::compresses`] for a topic of namespace `ns` (`None`: of none).
    pub fn compresses_in(&self, ns: Option<&Namespace>) -> bool {
        self.compression && ns.is_none_or(|ns| ns.compression)
    }

    /// Whether clients may subscribe to `topic` themselves.
    pub fn client_subscribe(&self, topic: &str) -> bool {
        self.namespace(topic).is_none_or(|ns| ns.client_subscribe)
    }

    /// Every namespace.
    pub fn iter(&self) -> impl Iterator<Item = &Namespace> {
        self.list.iter()
    }
}

/// Where a stream is: its last publication's seq (0 before the first) in its epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub epoch: Arc<str>,
}

/// One kept publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub seq: u64,
    /// Valid JSON text.
    pub data: Bytes,
    /// When a node accepted it, nanoseconds since the UNIX epoch (0 when unknown).
    pub accepted_at: u64,
}

/// Which part of a stream's history to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryQuery {
    /// The newest `limit` publications (0: only the position).
    Latest(usize),
    /// The first `limit` publications after `seq`.
    After { seq: u64, limit: usize },
    /// Only the position, after restarting the numbering in a new epoch if the stream
    /// is still in `epoch` but behind `seq`: a node delivered publications the stream
    /// no longer has (a Redis failover lost them), and the numbering would hand their
    /// seqs out again. Idempotent: a stream already restarted is only read.
    Restart { epoch: Arc<str>, seq: u64 },
}

/// A broker's answer about a stream's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// The stream's position when read.
    pub position: Position,
    /// The oldest seq still kept (`position.seq + 1` when nothing is kept).
    pub first: u64,
    /// What the query asked for, oldest first.
    pub entries: Vec<HistoryEntry>,
}

impl History {
    /// Whether everything after `seq` in `epoch` is still kept.
    pub fn covers(&self, seq: u64, epoch: &str) -> bool {
        &*self.position.epoch == epoch && seq <= self.position.seq && self.first <= seq + 1
    }
}

/// What the node must do for a stream after an event, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver this publication to the local subscribers.
    Deliver(HistoryEntry),
    /// Tell the local subscribers that what followed the last delivered message, up to
    /// `seq` of `epoch`, is lost.
    Reset { seq: u64, epoch: Arc<str> },
    /// Read the history after `after` (up to `upto`) and hand it to
    /// [`StreamState::on_repair`]; publications arriving meanwhile are held.
    Repair { after: u64, upto: u64 },
    /// The stream went back behind what was delivered (`seq` of `epoch`): have the
    /// broker restart its numbering ([`HistoryQuery::Restart`]) and hand the new
    /// position to [`StreamState::on_position`].
    Restart { epoch: Arc<str>, seq: u64 },
}

/// A publication held while the state is not live.
#[derive(Debug, Clone)]
struct Held {
    epoch: Arc<str>,
    entry: HistoryEntry,
}

/// The phases of a node's view of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The node's broker subscription is new: where the stream is has not been read
    /// yet. Publications are held.
    Init,
    /// Publications are delivered as they come.
    Live,
    /// A gap is being repaired from history. Publications are held.
    Repairing,
}

/// At most this many publications are held per stream while it is not live; beyond
/// it the oldest are dropped (the repair then reports them in a `reset`).
pub const MAX_HELD: usize = 10_000;

/// What one node has delivered of one stream: the last seq and its epoch, and what
/// is held while the position is read or a gap repaired.
#[derive(Debug, Clone)]
pub struct StreamState {
    phase: Phase,
    epoch: Arc<str>,
    last: u64,
    held: BTreeMap<u64, Held>,
    /// While repairing: the seq the stream was known to have reached (at least) when
    /// the repair started; everything up to it must be delivered or reset.
    target: u64,
    /// Sessions between their broker subscribe and their entry in the hub.
    pub joining: usize,
}

impl Default for StreamState {
    fn default() -> Self {
        StreamState {
            phase: Phase::Init,
            epoch: Arc::from(""),
            last: 0,
            held: BTreeMap::new(),
            target: 0,
            joining: 0,
        }
    }
}

impl StreamState {
    /// The phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Where live delivery stands: every seq up to here has been delivered (or reset).
    /// Meaningful once live.
    pub fn position(&self) -> Position {
        Position {
            seq: self.last,
            epoch: self.epoch.clone(),
        }
    }

    fn hold(&mut self, epoch: &Arc<str>, entry: HistoryEntry) {
        self.held.insert(
            entry.seq,
            Held {
                epoch: epoch.clone(),
                entry,
            },
        );
        while self.held.len() > MAX_HELD {
            self.held.pop_first();
        }
    }

    /// The stream's position was read (after the node's broker subscription was
    /// confirmed): live delivery starts after it. What was held and is newer only
    /// moves the start (nobody local is subscribed yet).
    pub fn on_initialized(&mut self, at: &Position) {
        if self.phase != Phase::Init {
            return;
        }
        self.epoch = at.epoch.clone();
        self.last = at.seq;
        for h in std::mem::take(&mut self.held).into_values() {
            if h.epoch == self.epoch {
                self.last = self.last.max(h.entry.seq);
            } else {
                // The epoch moved on after the read: start from the newest.
                self.epoch = h.epoch;
                self.last = h.entry.seq;
            }
        }
        self.phase = Phase::Live;
    }

    /// The stream was read at `at` (after the node's broker subscription came back
    /// from an outage): publications up to it may have been missed, and are repaired
    /// like a gap. A new epoch is announced.
    pub fn on_position(&mut self, at: &Position) -> Vec<Action> {
        if self.phase != Phase::Live {
            // Starting (it reads the position anyway) or repairing (the repair
            // delivers up to what it holds; later publications show any further gap).
            return Vec::new();
        }
        let mut out = Vec::new();
        if at.epoch == self.epoch && at.seq < self.last {
            // Publications delivered here are gone from the stream, and their seqs
            // would be handed out again: never deliver those as duplicates.
            return vec![Action::Restart {
                epoch: self.epoch.clone(),
                seq: self.last,
            }];
        }
        if at.epoch != self.epoch {
            self.epoch = at.epoch.clone();
            self.last = 0;
            out.push(Action::Reset {
                seq: 0,
                epoch: at.epoch.clone(),
            });
        }
        if at.seq > self.last {
            self.phase = Phase::Repairing;
            self.target = at.seq;
            out.push(Action::Repair {
                after: self.last,
                upto: at.seq,
            });
        }
        out
    }

    /// A publication arrived from the broker.
    pub fn on_publication(&mut self, epoch: &Arc<str>, entry: HistoryEntry) -> Vec<Action> {
        match self.phase {
            Phase::Init | Phase::Repairing => {
                self.hold(epoch, entry);
                Vec::new()
            }
            Phase::Live => self.live(epoch, entry),
        }
    }

    fn live(&mut self, epoch: &Arc<str>, entry: HistoryEntry) -> Vec<Action> {
        if *epoch != self.epoch {
            // The numbering restarted: what we had not delivered of the old epoch is
            // gone, and so is this epoch's beginning unless the history has it.
            self.epoch = epoch.clone();
            self.last = 0;
            if entry.seq == 1 {
                self.last = 1;
                return vec![
                    Action::Reset {
                        seq: 0,
                        epoch: epoch.clone(),
                    },
                    Action::Deliver(entry),
                ];
            }
            let upto = entry.seq - 1;
            self.hold(epoch, entry);
            self.phase = Phase::Repairing;
            self.target = upto;
            return vec![
                Action::Reset {
                    seq: 0,
                    epoch: epoch.clone(),
                },
                Action::Repair { after: 0, upto },
            ];
        }
        if entry.seq <= self.last {
            return Vec::new(); // a duplicate (already delivered, or repaired)
        }
        if entry.seq == self.last + 1 {
            self.last = entry.seq;
            return vec![Action::Deliver(entry)];
        }
        let (after, upto) = (self.last, entry.seq - 1);
        self.hold(epoch, entry);
        self.phase = Phase::Repairing;
        self.target = upto;
        vec![Action::Repair { after, upto }]
    }

    /// The history read for a repair arrived (`None`: it could not be read). Delivers
    /// what it has of the gap, resets what it lacks, then what was held, in order.
    pub fn on_repair(&mut self, history: Option<&History>) -> Vec<Action> {
        if self.phase != Phase::Repairing {
            return Vec::new();
        }
        self.phase = Phase::Live;
        // What the history has of this epoch and what was held meanwhile, in seq
        // order; publications of another epoch (held after a restart) come last.
        let mut run: BTreeMap<u64, HistoryEntry> = BTreeMap::new();
        let mut other_epochs = Vec::new();
        if let Some(h) = history.filter(|h| h.position.epoch == self.epoch) {
            for e in &h.entries {
                run.insert(e.seq, e.clone());
            }
        }
        for h in std::mem::take(&mut self.held).into_values() {
            if h.epoch == self.epoch {
                run.insert(h.entry.seq, h.entry);
            } else {
                other_epochs.push(h);
            }
        }
        let mut out = Vec::new();
        for (seq, entry) in run {
            if seq <= self.last {
                continue;
            }
            if seq > self.last + 1 {
                // Gone from the history (trimmed, or it could not be read): say so.
                out.push(Action::Reset {
                    seq: seq - 1,
                    epoch: self.epoch.clone(),
                });
            }
            self.last = seq;
            out.push(Action::Deliver(entry));
        }
        if self.last < self.target {
            // The stream was known to be further on than anything found.
            out.push(Action::Reset {
                seq: self.target,
                epoch: self.epoch.clone(),
            });
            self.last = self.target;
        }
        for h in other_epochs {
            // Held again if a new epoch's start must be repaired first.
            out.extend(self.on_publication(&h.epoch, h.entry));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64) -> HistoryEntry {
        HistoryEntry {
            seq,
            data: Bytes::from(seq.to_string()),
            accepted_at: 0,
        }
    }

    fn pos(seq: u64, epoch: &str) -> Position {
        Position {
            seq,
            epoch: Arc::from(epoch),
        }
    }

    fn delivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver(e) => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    fn live_at(seq: u64, epoch: &str) -> StreamState {
        let mut s = StreamState::default();
        s.on_initialized(&pos(seq, epoch));
        s
    }

    #[test]
    fn patterns_and_the_most_specific_namespace() {
        let ns = |name: &str, pats: &[&str], size| Namespace {
            name: name.into(),
            topics: pats.iter().map(|p| Pattern::parse(p).unwrap()).collect(),
            stream: (size > 0).then_some(StreamOptions {
                history_size: size,
                history_ttl: Duration::from_secs(60),
            }),
            ..Default::default()
        };
        let all = Namespaces::new(vec![
            ns("chat", &["chat:*"], 100),
            ns("vip", &["chat:vip:*"], 5),
            ns("lobby", &["chat:lobby"], 0),
            ns("all", &["*"], 0),
        ])
        .unwrap();
        assert_eq!(all.stream("chat:1").unwrap().history_size, 100);
        assert_eq!(all.stream("chat:vip:1").unwrap().history_size, 5);
        assert!(all.stream("chat:lobby").is_none(), "exact beats prefix");
        assert_eq!(all.namespace("news").unwrap().name, "all");
        assert!(all.stream("news").is_none());
        assert!(all.has_streams());
        assert!(Pattern::parse("a*b").is_err());
        assert!(Pattern::parse("bad topic*").is_err());
        assert!(Pattern::parse("").is_err());
        assert!(Namespaces::new(vec![ns("a", &["x:*"], 1), ns("b", &["x:*"], 1)]).is_err());
        assert!(!Namespaces::default().has_streams());
    }

    #[test]
    fn init_holds_then_starts_after_the_newest() {
        let mut s = StreamState::default();
        let ep = Arc::from("e1");
        assert!(s.on_publication(&ep, e(11)).is_empty(), "held while init");
        assert!(s.on_publication(&ep, e(12)).is_empty());
        s.on_initialized(&pos(10, "e1"));
        assert_eq!(s.phase(), Phase::Live);
        assert_eq!(s.position(), pos(12, "e1"));
        assert_eq!(delivered(&s.on_publication(&ep, e(13))), vec![13]);
    }

    #[test]
    fn in_order_duplicates_and_gaps() {
        let mut s = live_at(5, "e");
        let ep = Arc::from("e");
        assert_eq!(delivered(&s.on_publication(&ep, e(6))), vec![6]);
        assert!(s.on_publication(&ep, e(6)).is_empty(), "duplicate dropped");
        assert!(s.on_publication(&ep, e(3)).is_empty(), "old dropped");
        assert_eq!(
            s.on_publication(&ep, e(9)),
            vec![Action::Repair { after: 6, upto: 8 }]
        );
        assert!(
            s.on_publication(&ep, e(10)).is_empty(),
            "held while repairing"
        );
        let history = History {
            position: pos(10, "e"),
            first: 1,
            entries: vec![e(7), e(8)],
        };
        assert_eq!(delivered(&s.on_repair(Some(&history))), vec![7, 8, 9, 10]);
        assert_eq!(s.position(), pos(10, "e"));
        assert_eq!(delivered(&s.on_publication(&ep, e(11))), vec![11]);
    }

    #[test]
    fn what_history_lost_is_reset_never_skipped_silently() {
        let mut s = live_at(5, "e");
        let ep = Arc::from("e");
        s.on_publication(&ep, e(20));
        let history = History {
            position: pos(20, "e"),
            first: 15,
            entries: vec![e(15), e(16), e(17), e(18), e(19)],
        };
        let actions = s.on_repair(Some(&history));
        // 6..14 are gone: reset up to 14, then what the history still holds, then 20.
        let mut want = vec![Action::Reset {
            seq: 14,
            epoch: Arc::from("e"),
        }];
        want.extend((15..=20).map(|i| Action::Deliver(e(i))));
        assert_eq!(actions, want);
        // A failed read resets too.
        s.on_publication(&ep, e(23));
        let actions = s.on_repair(None);
        assert_eq!(actions[0], Action::Reset { seq: 22, epoch: ep });
        assert_eq!(delivered(&actions), vec![23]);
    }

    #[test]
    fn a_new_epoch_is_announced_and_its_start_repaired() {
        let mut s = live_at(5, "old");
        let new: Arc<str> = Arc::from("new");
        let actions = s.on_publication(&new, e(3));
        assert_eq!(
            actions,
            vec![
                Action::Reset {
                    seq: 0,
                    epoch: new.clone()
                },
                Action::Repair { after: 0, upto: 2 }
            ]
        );
        let history = History {
            position: pos(3, "new"),
            first: 1,
            entries: vec![e(1), e(2)],
        };
        assert_eq!(delivered(&s.on_repair(Some(&history))), vec![1, 2, 3]);
        assert_eq!(s.position(), pos(3, "new"));
        let mut s = live_at(5, "old");
        let actions = s.on_publication(&new, e(1));
        assert_eq!(delivered(&actions), vec![1]);
        assert!(matches!(actions[0], Action::Reset { seq: 0, .. }));
    }

    #[test]
    fn a_position_read_after_an_outage_repairs_what_was_missed() {
        let ep: Arc<str> = Arc::from("e");
        let mut s = live_at(5, "e");
        assert!(s.on_position(&pos(5, "e")).is_empty(), "nothing missed");
        assert_eq!(
            s.on_position(&pos(9, "e")),
            vec![Action::Repair { after: 5, upto: 9 }]
        );
        // A publication in flight is held; the history has 6..9 (and 10).
        assert!(s.on_publication(&ep, e(10)).is_empty());
        let h = History {
            position: pos(10, "e"),
            first: 1,
            entries: vec![e(6), e(7), e(8), e(9), e(10)],
        };
        assert_eq!(delivered(&s.on_repair(Some(&h))), vec![6, 7, 8, 9, 10]);
        assert_eq!(s.position(), pos(10, "e"));
        // Unreadable history: everything up to the known position is reset, once.
        s.on_position(&pos(14, "e"));
        assert!(s.on_publication(&ep, e(12)).is_empty());
        let actions = s.on_repair(None);
        assert_eq!(
            actions,
            vec![
                Action::Reset {
                    seq: 11,
                    epoch: ep.clone()
                },
                Action::Deliver(e(12)),
                Action::Reset {
                    seq: 14,
                    epoch: ep.clone()
                },
            ]
        );
        assert_eq!(delivered(&s.on_publication(&ep, e(15))), vec![15]);
        // A new epoch (Redis lost its data): announced, its start repaired.
        let actions = s.on_position(&pos(2, "f"));
        assert_eq!(
            actions,
            vec![
                Action::Reset {
                    seq: 0,
                    epoch: Arc::from("f")
                },
                Action::Repair { after: 0, upto: 2 }
            ]
        );
        let h = History {
            position: pos(2, "f"),
            first: 1,
            entries: vec![e(1), e(2)],
        };
        assert_eq!(delivered(&s.on_repair(Some(&h))), vec![1, 2]);
        // A fresh epoch with nothing in it: only the reset.
        assert_eq!(s.on_position(&pos(0, "g")).len(), 1);
        assert_eq!(s.position(), pos(0, "g"));
    }

    #[test]
    fn a_stream_gone_back_is_restarted_never_trusted() {
        let mut s = live_at(10, "e");
        assert_eq!(
            s.on_position(&pos(7, "e")),
            vec![Action::Restart {
                epoch: Arc::from("e"),
                seq: 10
            }]
        );
        assert_eq!(s.position(), pos(10, "e"), "nothing moves until restarted");
        // The broker restarted it: a new epoch, announced.
        let actions = s.on_position(&pos(0, "f"));
        assert_eq!(
            actions,
            vec![Action::Reset {
                seq: 0,
                epoch: Arc::from("f")
            }]
        );
        assert_eq!(delivered(&s.on_publication(&Arc::from("f"), e(1))), vec![1]);
    }

    #[test]
    fn held_publications_are_bounded() {
        let mut s = StreamState::default();
        let ep = Arc::from("e");
        for i in 1..=(MAX_HELD as u64 + 5) {
            s.on_publication(&ep, e(i));
        }
        assert_eq!(s.held.len(), MAX_HELD);
        assert_eq!(*s.held.first_key_value().unwrap().0, 6);
    }

    #[test]
    fn history_covers() {
        let h = History {
            position: pos(41, "x"),
            first: 38,
            entries: vec![],
        };
        assert!(h.covers(37, "x"));
        assert!(h.covers(41, "x"));
        assert!(!h.covers(36, "x"), "38 is the oldest kept: 37 is gone");
        assert!(!h.covers(42, "x"), "beyond the stream");
        assert!(!h.covers(37, "y"), "another epoch");
    }
}
