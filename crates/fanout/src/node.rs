//! The node: one gateway process's hub and broker, and the only place that joins them.
//!
//! Everything a connection does to topics goes through [`Node`] (the role of
//! centrifuge's `node.go`):
//! - [`Node::subscribe`]: hub add → broker subscribe → undo on failure.
//! - [`Node::unsubscribe`]: hub remove → broker release of the topics now empty.
//! - [`Node::publish`]: validation, then the broker; the returned [`PublishAck`]
//!   counts the outcome when it is known (and carries a stream publication's
//!   position).
//! - [`Node::subscribe_streams`]: the same for streams, with where each starts and
//!   the replay a `since` asks for; [`Node::history`] reads a stream's history.
//!
//! And everything a broker reports comes back through the node's
//! [`BrokerEvents`] handler, which encodes each publication **once** and hands the
//! shared frame to every local subscriber. One place encodes, one place counts.
//! Stream publications pass through the stream's [`StreamState`] first, which drops
//! duplicates and repairs gaps from history (or says `reset`), so local subscribers
//! see every seq once, in order.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use parking_lot::Mutex;

use wsgate_metrics::Metrics;

use crate::broker::{Broker, BrokerError, BrokerEvents, BrokerFuture, MemoryBroker, Origin};
use crate::history::DEFAULT_HISTORY_MEMORY;
use crate::hub::{Hub, Subscriber, SubscriberId};
use crate::presence::{NodeInfo, PresenceEntry, PresenceEvent, Table};
use crate::publication::{unix_nanos, Publication, TagKind};
use crate::stream::{
    Action, History, HistoryEntry, HistoryQuery, Namespaces, Phase, Position, SlowConsumer,
    StreamState,
};
use crate::topic::{validate_topic, TopicError};

mod presence;
pub use presence::{Hooks, PresenceError};

/// Who published, for the `wsgate_messages_received_total{source}` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A WebSocket client's `publish` command.
    Client,
    /// Server side: `POST /api/publish`, or a program embedding the node.
    Http,
    /// The demo ticker (`--demo`): not counted as received traffic.
    Demo,
}

/// Why [`Node::publish`] refused a publication before it reached the broker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The topic breaks the contract's naming rule.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// `data` is larger than the node accepts.
    #[error("data is {size} bytes; the limit is {max}")]
    TooLarge { size: usize, max: usize },
}

/// Why [`Node::history`] has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    /// The topic is not configured as a stream.
    #[error("{0} is not a stream")]
    NotAStream(String),
    /// The topic breaks the contract's naming rule.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// The broker could not read the history.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// Where a session's live delivery of one stream starts, as its `subscribed` reply
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    pub topic: Arc<str>,
    /// Every publication after this is delivered to the session, in seq order.
    pub position: Position,
    /// For a subscribe with a `since` entry: whether what followed it was replayed.
    pub recovered: Option<bool>,
}

/// Shards of the node's stream states (one lock per shard, taken in index order).
const STREAM_SHARDS: usize = 64;

type StreamShard = Mutex<HashMap<Arc<str>, StreamState>>;

/// What the node's broker handler needs: the hub it delivers into, the counters, the
/// stream states. Shared with the broker (as its [`BrokerEvents`]) and with pending
/// acks.
struct Core {
    hub: Hub,
    metrics: Metrics,
    namespaces: Namespaces,
    streams: Box<[StreamShard]>,
    hasher: RandomState,
    /// The broker, for repairs (set once it is built; weak: the broker holds us).
    broker: OnceLock<Weak<dyn Broker>>,
    /// Warns, at most every few seconds, of plain PUBLISHes to a stream's channel.
    plain_on_stream: RateLimitedWarning,
    /// This node's own presence entries, sharded by topic like the streams.
    presence: Box<[Mutex<Table>]>,
    /// What the gateway says about itself (set once, at start).
    hooks: OnceLock<Hooks>,
}

/// A warning logged at most once per [`RateLimitedWarning::EVERY`]; the rest are only
/// counted (in a metric, by the caller).
struct RateLimitedWarning {
    last: Mutex<Option<Instant>>,
}

impl RateLimitedWarning {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    fn warn(&self, topic: &str) {
        let now = Instant::now();
        let mut last = self.last.lock();
        if last.is_some_and(|t| now.duration_since(t) < Self::EVERY) {
            return;
        }
        *last = Some(now);
        tracing::warn!(
            topic,
            "a plain PUBLISH to a stream's channel is not delivered (it has no position): \
             publish to streams with `FCALL wsgate_publish 1 <channel> <payload>` \
             (see docs/publishing.md); counted in wsgate_stream_plain_publishes_total"
        );
    }
}

impl Core {
    fn shard_of(&self, topic: &str) -> usize {
        self.hasher.hash_one(topic) as usize % self.streams.len()
    }

    /// Runs a stream state's actions, the shard lock held: delivery order is the
    /// order the state decided. Returns the repairs to start once the lock is
    /// released ([`Core::repair`]).
    ///
    /// `epoch` is the stream's epoch before the actions (a `Reset` may change it):
    /// the position publications are tagged with for a slow-consumer policy.
    fn run(&self, topic: &Arc<str>, epoch: Arc<str>, actions: Vec<Action>) -> Vec<Action> {
        let mut repairs = Vec::new();
        let (policy, compress) = if actions.is_empty() {
            (SlowConsumer::Disconnect, false)
        } else {
            (
                self.namespaces.slow_consumer(topic),
                self.namespaces.compresses(topic),
            )
        };
        let mut epoch = epoch;
        for action in actions {
            match action {
                Action::Deliver(ref e) => {
                    let p = Publication::encode_seq(topic, &e.data, e.accepted_at, e.seq)
                        .with_policy(policy, topic, Some((e.seq, &epoch)), TagKind::Message)
                        .compressible(compress);
                    self.hub.deliver(topic, &p);
                }
                Action::Reset { seq, epoch: new } => {
                    self.metrics.stream_resets.inc();
                    let p = Publication::reset(topic, seq, &new).with_policy(
                        policy,
                        topic,
                        Some((seq, &new)),
                        TagKind::Reset,
                    );
                    self.hub.deliver(topic, &p);
                    epoch = new;
                }
                Action::Repair { .. } => {
                    self.metrics.stream_gaps.inc();
                    repairs.push(action);
                }
                Action::Restart { .. } => repairs.push(action),
            }
        }
        repairs
    }

    /// Starts what a stream's state asked for once the locks are released: repairs,
    /// and restarts of a stream that went back.
    fn follow(self: &Arc<Self>, topic: &Arc<str>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Repair { after, upto } => self.repair(topic.clone(), after, upto),
                Action::Restart { epoch, seq } => self.restart(topic.clone(), epoch, seq),
                Action::Deliver(_) | Action::Reset { .. } => {}
            }
        }
    }

    /// Has the broker restart a stream that went back behind what this node delivered
    /// (a failover lost acknowledged publications), then announces the new epoch.
    fn restart(self: &Arc<Self>, topic: Arc<str>, epoch: Arc<str>, seq: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        tracing::warn!(
            %topic,
            seq,
            "stream went back behind what was delivered (a Redis failover lost \
             acknowledged publications): restarting its numbering in a new epoch"
        );
        let core = self.clone();
        rt.spawn(async move {
            let Some(opts) = core.namespaces.stream(&topic).copied() else {
                return;
            };
            let Some(broker) = core.broker.get().and_then(Weak::upgrade) else {
                return;
            };
            let read = broker
                .history(&topic, &opts, HistoryQuery::Restart { epoch, seq })
                .await;
            match read {
                Ok(h) => core.at_position(&topic, &h.position),
                // The next resubscribe or publication looks again.
                Err(e) => tracing::warn!(%topic, error = %e, "stream restart failed"),
            }
        });
    }

    /// Hands a stream's position, as read from the broker, to its state.
    fn at_position(self: &Arc<Self>, topic: &Arc<str>, position: &Position) {
        let repairs = {
            let mut shard = self.streams[self.shard_of(topic)].lock();
            match shard.get_mut(topic) {
                Some(state) => {
                    let epoch = state.position().epoch;
                    let actions = state.on_position(position);
                    self.run(topic, epoch, actions)
                }
                None => Vec::new(),
            }
        };
        self.follow(topic, repairs);
    }

    /// Reads the missing part of a stream and hands it to its state.
    ///
    /// Always on a task of its own, history read included: this runs inside the
    /// broker's report, which may hold the broker's own locks (the in-memory
    /// history does), so even asking the broker here could deadlock.
    fn repair(self: &Arc<Self>, topic: Arc<str>, after: u64, upto: u64) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return self.repaired(topic, None);
        };
        let core = self.clone();
        rt.spawn(async move {
            let mut history = None;
            // A read may fail while the broker reconnects (the gap often comes from
            // that very outage): try again a few times before resetting the gap.
            for attempt in 0..REPAIR_TRIES {
                if attempt > 0 {
                    tokio::time::sleep(REPAIR_BACKOFF * (1 << (attempt - 1))).await;
                }
                let fetch = core
                    .broker
                    .get()
                    .and_then(Weak::upgrade)
                    .zip(core.namespaces.stream(&topic).copied())
                    .map(|(broker, opts)| {
                        let limit = usize::try_from(upto - after).unwrap_or(usize::MAX);
                        broker.history(&topic, &opts, HistoryQuery::After { seq: after, limit })
                    });
                let Some(fetch) = fetch else { break };
                match fetch.await {
                    Ok(h) => {
                        history = Some(h);
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(%topic, error = %e, attempt, "stream repair read failed");
                    }
                }
            }
            core.repaired(topic, history);
        });
    }

    /// Reads where a stream is and repairs what this node missed up to there (after
    /// its broker subscription came back from an outage).
    async fn catch_up(self: &Arc<Self>, topic: Arc<str>) {
        let Some(opts) = self.namespaces.stream(&topic).copied() else {
            return;
        };
        let Some(broker) = self.broker.get().and_then(Weak::upgrade) else {
            return;
        };
        let read = broker.history(&topic, &opts, HistoryQuery::Latest(0)).await;
        let position = match read {
            Ok(h) => h.position,
            Err(e) => {
                // The next publication shows the gap, and repairs it then.
                tracing::debug!(%topic, error = %e, "stream position unreadable after a resubscribe");
                return;
            }
        };
        self.at_position(&topic, &position);
    }

    fn repaired(self: &Arc<Self>, topic: Arc<str>, history: Option<History>) {
        let repairs = {
            let mut shard = self.streams[self.shard_of(&topic)].lock();
            match shard.get_mut(&topic) {
                Some(state) => {
                    let epoch = state.position().epoch;
                    let actions = state.on_repair(history.as_ref());
                    tracing::debug!(%topic, read = history.as_ref().map(|h| h.entries.len()), ?actions, "stream repaired");
                    self.run(&topic, epoch, actions)
                }
                None => Vec::new(),
            }
        };
        self.follow(&topic, repairs);
    }
}

impl BrokerEvents for Arc<Core> {
    fn publication(&self, topic: &str, data: &[u8], accepted_at: u64, origin: Origin) {
        let ns = self.namespaces.namespace(topic);
        if ns.is_some_and(|ns| ns.stream.is_some()) {
            // A plain PUBLISH to a stream's channel: not a publication of the
            // stream (it has no seq), so not delivered.
            self.metrics.stream_plain_publishes.inc();
            self.plain_on_stream.warn(topic);
            return;
        }
        if origin == Origin::Backend {
            // Gateway publications were counted where they were accepted.
            self.metrics.received.redis.inc();
        }
        // Encoded once, here, for every local subscriber.
        let policy = ns.map_or(SlowConsumer::Disconnect, |ns| ns.slow_consumer);
        let compress = self.namespaces.compresses_in(ns);
        let publication = Publication::encode(topic, data, accepted_at)
            .with_policy(policy, topic, None, TagKind::Message)
            .compressible(compress);
        self.hub.deliver(topic, &publication);
    }

    fn stream_publication(
        &self,
        topic: &str,
        epoch: &Arc<str>,
        entry: HistoryEntry,
        origin: Origin,
    ) {
        if origin == Origin::Backend {
            self.metrics.received.redis.inc();
        }
        if self.namespaces.stream(topic).is_none() {
            // Numbered by a node configured otherwise: delivered, position and all.
            let p = Publication::encode_seq(topic, &entry.data, entry.accepted_at, entry.seq)
                .with_policy(
                    self.namespaces.slow_consumer(topic),
                    topic,
                    Some((entry.seq, epoch)),
                    TagKind::Message,
                )
                .compressible(self.namespaces.compresses(topic));
            self.hub.deliver(topic, &p);
            return;
        }
        let mut shard = self.streams[self.shard_of(topic)].lock();
        let Some((topic, _)) = shard.get_key_value(topic) else {
            return; // nobody here follows this stream
        };
        let topic = topic.clone();
        let state = shard.get_mut(&topic).expect("just found");
        let seq = entry.seq;
        let before = state.position();
        let actions = state.on_publication(epoch, entry);
        tracing::trace!(%topic, seq, phase = ?state.phase(), last = before.seq, ?actions, "stream publication");
        if actions.is_empty() && state.phase() == Phase::Live && before.seq >= seq {
            self.metrics.stream_duplicates.inc();
        }
        let repairs = self.run(&topic, before.epoch, actions);
        drop(shard);
        self.follow(&topic, repairs);
    }

    fn resubscribed(&self, topics: &[Arc<str>]) {
        let streams: Vec<Arc<str>> = topics
            .iter()
            .filter(|t| self.namespaces.stream(t).is_some())
            .cloned()
            .collect();
        if streams.is_empty() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // On a task: the broker's report must not wait on reads of its own.
        let core = self.clone();
        rt.spawn(async move {
            for topic in streams {
                core.catch_up(topic).await;
            }
        });
    }

    fn presence_event(&self, topic: &str, event: PresenceEvent) {
        self.on_presence_event(topic, event);
    }

    fn control(&self, command: &[u8]) {
        if let Some(h) = self.hooks.get() {
            (h.control)(command);
        }
    }

    fn presence_snapshot(&self) -> Vec<(Arc<str>, Vec<PresenceEntry>)> {
        self.snapshot()
    }

    fn announces(&self, topic: &str) -> bool {
        self.namespaces
            .presence(topic)
            .is_some_and(|p| p.join_leave)
    }

    fn node_info(&self) -> Option<NodeInfo> {
        self.hooks.get().map(|h| (h.info)())
    }

    fn has_subscribers(&self, topic: &str) -> bool {
        self.hub.has_subscribers(topic)
            || self.streams[self.shard_of(topic)]
                .lock()
                .get(topic)
                .is_some_and(|s| s.joining > 0)
    }

    fn topics(&self) -> Vec<Arc<str>> {
        let mut topics = self.hub.topics();
        for shard in self.streams.iter() {
            for (t, s) in shard.lock().iter() {
                if s.joining > 0 && !self.hub.has_subscribers(t) {
                    topics.push(t.clone());
                }
            }
        }
        topics
    }
}

/// One gateway node's fan-out: its hub, its broker and the rules between them.
pub struct Node {
    core: Arc<Core>,
    broker: Arc<dyn Broker>,
    /// Largest `data` accepted by [`Node::publish`], in bytes.
    max_publication_size: usize,
    /// Resume reads in flight, by stream and position, shared by every resume that
    /// wants that range: a node's worth of clients reconnecting to one stream at once
    /// reads its history once, not once each.
    reads: Mutex<HashMap<(Arc<str>, u64), SharedRead>>,
}

/// A history read shared by the resumes waiting on it, with the `limit` it asked for.
type SharedRead = (usize, futures_util::future::Shared<BrokerFuture<History>>);

/// How many times a repair reads the history before it gives the gap up as lost
/// (`reset`), and the first pause between tries (doubled each time: 0.1 … 1.6 s).
const REPAIR_TRIES: u32 = 5;
const REPAIR_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a resume waits for this node to deliver up to the position the session
/// already has (see [`Node::reach`]).
const REACH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How many publications past the node's position a resume reads, so that
/// publications arriving during the read need no second one.
const RESUME_SLACK: u64 = 256;

/// How many times a resume reads the history (the first time from its `since`, then
/// the rest after what it read) while the stream moves on faster than it reads
/// (then it answers `recovered:false`).
const RESUME_TRIES: usize = 4;

impl Node {
    /// A node whose broker is built by `broker` from the node's event handler (the
    /// broker reports what arrives there). No topic is a stream.
    ///
    /// # Errors
    /// Whatever `broker` fails with.
    pub fn new<B, E>(
        metrics: Metrics,
        max_publication_size: usize,
        broker: impl FnOnce(Arc<dyn BrokerEvents>) -> Result<B, E>,
    ) -> Result<Self, E>
    where
        B: Broker,
    {
        Self::with_namespaces(metrics, max_publication_size, Namespaces::default(), broker)
    }

    /// A node whose topics are streams as `namespaces` say.
    ///
    /// # Errors
    /// Whatever `broker` fails with.
    pub fn with_namespaces<B, E>(
        metrics: Metrics,
        max_publication_size: usize,
        namespaces: Namespaces,
        broker: impl FnOnce(Arc<dyn BrokerEvents>) -> Result<B, E>,
    ) -> Result<Self, E>
    where
        B: Broker,
    {
        let core = Arc::new(Core {
            hub: Hub::default(),
            metrics,
            namespaces,
            streams: (0..STREAM_SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            broker: OnceLock::new(),
            plain_on_stream: RateLimitedWarning {
                last: Mutex::new(None),
            },
            presence: (0..STREAM_SHARDS).map(|_| Mutex::default()).collect(),
            hooks: OnceLock::new(),
        });
        let events: Arc<dyn BrokerEvents> = Arc::new(core.clone());
        let broker: Arc<dyn Broker> = Arc::new(broker(events)?);
        let _ = core.broker.set(Arc::downgrade(&broker));
        core.metrics.set_broker_kind(broker.kind());
        core.metrics.broker_up.set(i64::from(broker.is_ready()));
        Ok(Node {
            core,
            broker,
            max_publication_size,
            reads: Mutex::new(HashMap::new()),
        })
    }

    /// A node with the in-memory broker (the embedded single-node default).
    pub fn in_memory(metrics: Metrics, max_publication_size: usize) -> Self {
        Self::in_memory_with(
            metrics,
            max_publication_size,
            Namespaces::default(),
            DEFAULT_HISTORY_MEMORY,
        )
    }

    /// A node with the in-memory broker, streams as `namespaces` say, keeping at most
    /// `history_memory` bytes of stream history in total.
    pub fn in_memory_with(
        metrics: Metrics,
        max_publication_size: usize,
        namespaces: Namespaces,
        history_memory: usize,
    ) -> Self {
        let built: Result<_, std::convert::Infallible> =
            Self::with_namespaces(metrics, max_publication_size, namespaces, |events| {
                Ok(MemoryBroker::with_history_memory(events, history_memory))
            });
        match built {
            Ok(node) => node,
            Err(never) => match never {},
        }
    }

    /// The topic → local subscribers index (read-only uses: counts, tests).
    pub fn hub(&self) -> &Hub {
        &self.core.hub
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.core.metrics
    }

    /// Which topics are streams.
    pub fn namespaces(&self) -> &Namespaces {
        &self.core.namespaces
    }

    /// Whether the broker can fan out right now.
    pub fn broker_ready(&self) -> bool {
        self.broker.is_ready()
    }

    /// The broker's short name: `memory`, `redis`, `redis-cluster`.
    pub fn broker_kind(&self) -> &'static str {
        self.broker.kind()
    }

    /// Adds subscriber `id` to `topics` (valid, and new for this subscriber), then
    /// waits until the broker delivers them to this node. On failure every topic is
    /// taken out again, so the subscriber is left as it was. Stream topics start at
    /// their current position (see [`Node::subscribe_streams`]).
    ///
    /// # Errors
    /// The broker could not make the topics live (`unavailable` to the client).
    pub async fn subscribe(
        &self,
        id: SubscriberId,
        subscriber: &Arc<dyn Subscriber>,
        topics: &[Arc<str>],
    ) -> Result<(), BrokerError> {
        self.subscribe_streams(id, subscriber, topics, &[], &HashMap::new(), |_| {})
            .await
    }

    /// Subscribes `id` to `fresh` topics (valid, new for this subscriber) and reports
    /// where its delivery of each stream among them — and of each stream among `held`,
    /// topics it already has — starts.
    ///
    /// Plain topics go into the hub at once, before the broker subscribe (as in
    /// v1). A fresh stream joins the hub only after the broker confirmed it and the
    /// stream's position is known; then, with the stream's lock held, `ready` runs
    /// with every stream's start (the caller queues its reply there), then what `since`
    /// asked to replay is handed to the subscriber, and only then can a later
    /// publication reach it. So the subscriber sees: the reply, the replay, live —
    /// every seq once, in order.
    ///
    /// For a fresh stream with a `since` entry: recovered when the epoch matches, the
    /// seq is not beyond the stream, and the history still has everything after it.
    ///
    /// # Errors
    /// The broker could not make the topics live, or read a stream's position.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped before it resolves, plain topics stay in the hub (the
    /// caller owns them as subscribed; a session's `leave_all` removes them), and a
    /// stream's join count stays up until the node forgets the stream.
    pub async fn subscribe_streams(
        &self,
        id: SubscriberId,
        subscriber: &Arc<dyn Subscriber>,
        fresh: &[Arc<str>],
        held: &[Arc<str>],
        since: &HashMap<Arc<str>, Position>,
        ready: impl FnOnce(&[StreamStart]),
    ) -> Result<(), BrokerError> {
        let core = &self.core;
        let (streams, plain): (Vec<Arc<str>>, Vec<Arc<str>>) = fresh
            .iter()
            .cloned()
            .partition(|t| core.namespaces.stream(t).is_some());
        let held: Vec<Arc<str>> = held
            .iter()
            .filter(|t| core.namespaces.stream(t).is_some())
            .cloned()
            .collect();
        // Plain topics into the hub first, so nothing published once the broker
        // confirms can miss this subscriber.
        for t in &plain {
            core.hub.subscribe(t, id, subscriber.clone());
        }
        for t in &streams {
            core.streams[core.shard_of(t)]
                .lock()
                .entry(t.clone())
                .or_default()
                .joining += 1;
        }
        if !fresh.is_empty() {
            if let Err(e) = self.broker.subscribe(fresh.to_vec()).await {
                self.undo_join(id, &plain, &streams);
                return Err(e);
            }
        }
        if let Err(e) = self.initialize(&streams).await {
            self.undo_join(id, &plain, &streams);
            return Err(e);
        }
        for t in &streams {
            if let Some(from) = since.get(t) {
                self.reach(t, from).await;
            }
        }
        // The replays: read outside the locks, checked (and read again if the stream
        // moved on meanwhile) under them.
        let mut fetched: HashMap<Arc<str>, History> = HashMap::new();
        for attempt in 0..RESUME_TRIES {
            let wanted = self.resume_reads(&streams, since, &fetched);
            if !wanted.is_empty() && attempt + 1 < RESUME_TRIES {
                for (t, after, limit) in wanted {
                    match self.read_after(&t, after, limit).await {
                        Ok(h) => match fetched.get_mut(&t) {
                            // The rest of a range read before: appended to it.
                            Some(before) if h.covers(after, &before.position.epoch) => {
                                before
                                    .entries
                                    .extend(h.entries.into_iter().filter(|e| e.seq > after));
                                before.position = h.position;
                            }
                            _ => {
                                fetched.insert(t, h);
                            }
                        },
                        Err(_) => {
                            // Unreadable: answered as not recovered.
                            fetched.remove(&t);
                        }
                    }
                }
                continue;
            }
            break;
        }
        let mut shards: Vec<usize> = streams
            .iter()
            .chain(&held)
            .map(|t| core.shard_of(t))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut guards: Vec<_> = shards.iter().map(|&i| core.streams[i].lock()).collect();
        let guard_of = |t: &str| {
            shards
                .binary_search(&core.shard_of(t))
                .expect("locked above")
        };
        let mut starts = Vec::with_capacity(streams.len() + held.len());
        let mut replays: Vec<(Arc<str>, Arc<str>, Vec<HistoryEntry>)> = Vec::new();
        for t in &streams {
            let state = guards[guard_of(t)]
                .get_mut(t)
                .expect("joining keeps the state");
            state.joining -= 1;
            let position = state.position();
            let recovered =
                since
                    .get(t)
                    .map(|from| match replay_of(from, &position, fetched.get(t)) {
                        Some(entries) => {
                            if !entries.is_empty() {
                                replays.push((t.clone(), position.epoch.clone(), entries));
                            }
                            core.metrics
                                .stream_resumes
                                .with_label_values(&["recovered"])
                                .inc();
                            true
                        }
                        None => {
                            core.metrics
                                .stream_resumes
                                .with_label_values(&["not_recovered"])
                                .inc();
                            false
                        }
                    });
            core.hub.subscribe(t, id, subscriber.clone());
            starts.push(StreamStart {
                topic: t.clone(),
                position,
                recovered,
            });
        }
        for t in &held {
            if let Some(state) = guards[guard_of(t)].get(t) {
                starts.push(StreamStart {
                    topic: t.clone(),
                    position: state.position(),
                    recovered: None,
                });
            }
        }
        ready(&starts);
        for (t, epoch, entries) in replays {
            let policy = core.namespaces.slow_consumer(&t);
            for e in entries {
                let p = Publication::encode_seq(&t, &e.data, e.accepted_at, e.seq).with_policy(
                    policy,
                    &t,
                    Some((e.seq, &epoch)),
                    TagKind::Message,
                );
                subscriber.deliver(&p);
            }
        }
        drop(guards);
        Ok(())
    }

    /// Reads `limit` publications of stream `t` after `after` for a resume, sharing a
    /// read already in flight for the same range (if it asked for at least as many).
    /// A shared answer may be a little older than a fresh one would be: the resume's
    /// checks read again when it does not reach far enough.
    async fn read_after(
        &self,
        t: &Arc<str>,
        after: u64,
        limit: usize,
    ) -> Result<History, BrokerError> {
        use futures_util::FutureExt as _;
        let key = (t.clone(), after);
        let read = {
            let mut reads = self.reads.lock();
            match reads.get(&key) {
                Some((asked, read)) if *asked >= limit => read.clone(),
                _ => {
                    let opts = *self.core.namespaces.stream(t).expect("a stream");
                    let read = self
                        .broker
                        .history(t, &opts, HistoryQuery::After { seq: after, limit })
                        .shared();
                    reads.insert(key.clone(), (limit, read.clone()));
                    read
                }
            }
        };
        // Done (or given up: a resume whose session went away): the next resume of
        // this range reads afresh, and no entry outlives its read.
        struct Forget<'a> {
            reads: &'a Mutex<HashMap<(Arc<str>, u64), SharedRead>>,
            key: (Arc<str>, u64),
            read: futures_util::future::Shared<BrokerFuture<History>>,
        }
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                let mut reads = self.reads.lock();
                if reads
                    .get(&self.key)
                    .is_some_and(|(_, r)| r.ptr_eq(&self.read))
                {
                    reads.remove(&self.key);
                }
            }
        }
        let forget = Forget {
            reads: &self.reads,
            key,
            read: read.clone(),
        };
        let answer = read.await;
        drop(forget);
        answer
    }

    /// Reads the position of every stream in `topics` that this node has just started
    /// to follow.
    async fn initialize(&self, topics: &[Arc<str>]) -> Result<(), BrokerError> {
        let core = &self.core;
        for t in topics {
            let phase = core.streams[core.shard_of(t)]
                .lock()
                .get(t)
                .map(|s| s.phase());
            if phase != Some(Phase::Init) {
                continue;
            }
            let opts = *core.namespaces.stream(t).expect("a stream");
            let history = self
                .broker
                .history(t, &opts, HistoryQuery::Latest(0))
                .await?;
            if let Some(s) = core.streams[core.shard_of(t)].lock().get_mut(t) {
                s.on_initialized(&history.position);
            }
        }
        Ok(())
    }

    /// Lets this node's delivery of stream `t` reach `target`, a position a resuming
    /// session saw — maybe on another node, which got the relay earlier than this one
    /// (or this one missed it). Waits, bounded by [`REACH_WAIT`], catching up from the
    /// broker if no later publication arrives. A target beyond the stream itself, or
    /// not reached in time, is left to the resume check (`recovered:false`).
    async fn reach(&self, t: &Arc<str>, target: &Position) {
        let core = &self.core;
        let behind = || {
            core.streams[core.shard_of(t)]
                .lock()
                .get(t)
                .is_some_and(|s| {
                    s.position().epoch == target.epoch && s.position().seq < target.seq
                })
        };
        if !behind() {
            return;
        }
        let opts = *core.namespaces.stream(t).expect("a stream");
        let Ok(read) = self.broker.history(t, &opts, HistoryQuery::Latest(0)).await else {
            return;
        };
        if read.position.epoch != target.epoch || read.position.seq < target.seq {
            return; // beyond the stream: never recovered
        }
        core.at_position(t, &read.position);
        let deadline = Instant::now() + REACH_WAIT;
        while behind() && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// The history reads a resume still needs: (topic, after, limit) for each fresh
    /// stream whose `since` could be recovered and whose fetched history does not
    /// reach the stream's current position.
    fn resume_reads(
        &self,
        streams: &[Arc<str>],
        since: &HashMap<Arc<str>, Position>,
        fetched: &HashMap<Arc<str>, History>,
    ) -> Vec<(Arc<str>, u64, usize)> {
        let core = &self.core;
        let mut out = Vec::new();
        for t in streams {
            let Some(from) = since.get(t) else { continue };
            let Some(position) = core.streams[core.shard_of(t)]
                .lock()
                .get(t)
                .map(StreamState::position)
            else {
                continue;
            };
            if from.epoch != position.epoch || from.seq >= position.seq {
                continue; // nothing to read: equal, beyond, or another epoch
            }
            let mut after = from.seq;
            if let Some(h) = fetched.get(t) {
                let reached = h.entries.last().map_or(from.seq, |e| e.seq);
                if reached >= position.seq || !h.covers(from.seq, &from.epoch) {
                    continue; // reaches far enough, or can never recover
                }
                // The stream moved on past what was read (a node lagging behind
                // Redis by more than the slack, under load): read only the rest.
                after = reached;
            }
            // A little beyond where the node is now: it moves on while we read.
            let limit = usize::try_from(position.seq - after + RESUME_SLACK).unwrap_or(usize::MAX);
            out.push((t.clone(), after, limit));
        }
        out
    }

    fn undo_join(&self, id: SubscriberId, plain: &[Arc<str>], streams: &[Arc<str>]) {
        let core = &self.core;
        for t in streams {
            let mut shard = core.streams[core.shard_of(t)].lock();
            if let Some(s) = shard.get_mut(t) {
                s.joining -= 1;
                if s.joining == 0 && !core.hub.has_subscribers(t) {
                    shard.remove(t);
                }
            }
        }
        self.unsubscribe(id, plain.iter().cloned());
        let unused: Vec<Arc<str>> = streams
            .iter()
            .filter(|t| !core.has_subscribers(t))
            .cloned()
            .collect();
        if !unused.is_empty() {
            self.broker.release(unused);
        }
    }

    /// Removes subscriber `id` from `topics` (those it has); the broker releases
    /// every topic that no local subscriber is left on.
    pub fn unsubscribe(&self, id: SubscriberId, topics: impl IntoIterator<Item = Arc<str>>) {
        let core = &self.core;
        let emptied: Vec<Arc<str>> = topics
            .into_iter()
            .filter(|t| {
                if core.namespaces.stream(t).is_none() {
                    return core.hub.unsubscribe(t, id);
                }
                // Under the stream's lock, so a join in progress keeps its state.
                let mut shard = core.streams[core.shard_of(t)].lock();
                if !core.hub.unsubscribe(t, id) {
                    return false;
                }
                if shard.get(&**t).is_some_and(|s| s.joining > 0) {
                    return false;
                }
                shard.remove(&**t);
                true
            })
            .collect();
        if !emptied.is_empty() {
            self.broker.release(emptied);
        }
    }

    /// Checks a publication against the contract and the node's limits, without
    /// publishing it (lets a batch be refused whole before any of it is sent).
    ///
    /// # Errors
    /// The topic is invalid or the data too large.
    pub fn check(&self, topic: &str, data: &[u8]) -> Result<(), PublishError> {
        validate_topic(topic)?;
        if data.len() > self.max_publication_size {
            return Err(PublishError::TooLarge {
                size: data.len(),
                max: self.max_publication_size,
            });
        }
        Ok(())
    }

    /// Publishes `data` (valid JSON text) to `topic`, stamped with the current time.
    /// On a stream the ack carries the publication's position.
    ///
    /// The publication's place in its topic's order is fixed when this returns, so
    /// publications made one after another are delivered in that order even when
    /// their acks are awaited later (pipelining).
    ///
    /// # Errors
    /// [`Node::check`] refused it; nothing was sent.
    pub fn publish(
        &self,
        source: Source,
        topic: &str,
        data: &[u8],
    ) -> Result<PublishAck, PublishError> {
        self.check(topic, data)?;
        let at = unix_nanos();
        let ack = match self.core.namespaces.stream(topic) {
            Some(opts) => Ack::Stream(self.broker.publish_stream(topic, data, at, opts)),
            None => Ack::Plain(self.broker.publish(topic, data, at)),
        };
        Ok(PublishAck {
            ack,
            started: Instant::now(),
            source,
            core: self.core.clone(),
        })
    }

    /// Reads a stream's history (`POST /api/history`).
    ///
    /// # Errors
    /// The topic is invalid or not a stream, or the broker cannot read it.
    pub async fn history(&self, topic: &str, query: HistoryQuery) -> Result<History, HistoryError> {
        validate_topic(topic)?;
        let opts = *self
            .core
            .namespaces
            .stream(topic)
            .ok_or_else(|| HistoryError::NotAStream(topic.to_owned()))?;
        Ok(self.broker.history(topic, &opts, query).await?)
    }

    /// Refreshes the gauges that are cheaper to read than to maintain (at scrape
    /// time): subscriptions, topics, compression totals, broker up, history bytes.
    pub fn refresh_gauges(&self) {
        let m = &self.core.metrics;
        m.subscriptions.set(self.core.hub.subscription_count());
        m.topics.set(self.core.hub.topic_count());
        let z = crate::deflate::stats();
        m.set_compression(z.bytes_in, z.bytes_out, z.nanos);
        m.broker_up.set(i64::from(self.broker.is_ready()));
        if let Some(b) = self.broker.history_bytes() {
            m.history_bytes.set(i64::try_from(b).unwrap_or(i64::MAX));
        }
    }
}

/// What `since` recovers of a stream now at `now`, given the history read for it:
/// the publications after `from` up to `now` (empty when it is at `now`), or `None`
/// when they cannot all be replayed.
fn replay_of(from: &Position, now: &Position, read: Option<&History>) -> Option<Vec<HistoryEntry>> {
    if from.epoch != now.epoch || from.seq > now.seq {
        return None;
    }
    if from.seq == now.seq {
        return Some(Vec::new());
    }
    let h = read?;
    if !h.covers(from.seq, &from.epoch) {
        return None;
    }
    let entries: Vec<HistoryEntry> = h
        .entries
        .iter()
        .filter(|e| e.seq > from.seq && e.seq <= now.seq)
        .cloned()
        .collect();
    let contiguous = entries
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == from.seq + 1 + i as u64);
    (contiguous && entries.len() as u64 == now.seq - from.seq).then_some(entries)
}

enum Ack {
    Plain(BrokerFuture),
    Stream(BrokerFuture<Position>),
}

impl Ack {
    fn now(&mut self) -> Option<Result<Option<Position>, BrokerError>> {
        match self {
            Ack::Plain(f) => f.now().map(|r| r.map(|()| None)),
            Ack::Stream(f) => f.now().map(|r| r.map(Some)),
        }
    }
}

/// The broker's answer to one publication (with its position on a stream); counts
/// it once the answer is known: accepted → `received{source}`, refused →
/// `dropped{reason="broker_unavailable"}`.
#[must_use = "a publication is counted when its ack resolves"]
pub struct PublishAck {
    ack: Ack,
    started: Instant,
    source: Source,
    core: Arc<Core>,
}

impl PublishAck {
    /// The outcome, if the broker knew it at once (the in-memory broker), counted.
    pub fn now(&mut self) -> Option<Result<Option<Position>, BrokerError>> {
        let result = self.ack.now()?;
        self.count(result.is_ok());
        Some(result)
    }

    fn count(&self, ok: bool) {
        let m = &self.core.metrics;
        if self.source == Source::Demo {
            return;
        }
        m.broker_publish_duration
            .observe(self.started.elapsed().as_secs_f64());
        match (ok, self.source) {
            (true, Source::Client) => m.received.client.inc(),
            (true, _) => m.received.http.inc(),
            (false, _) => m.dropped("broker_unavailable", 1),
        }
    }
}

impl Future for PublishAck {
    type Output = Result<Option<Position>, BrokerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match &mut self.ack {
            Ack::Plain(f) => std::task::ready!(Pin::new(f).poll(cx)).map(|()| None),
            Ack::Stream(f) => std::task::ready!(Pin::new(f).poll(cx)).map(Some),
        };
        self.count(result.is_ok());
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<bytes::Bytes>>);
    impl Subscriber for Recorder {
        fn deliver(&self, p: &Publication) {
            self.0.lock().push(p.frame.clone());
        }
    }

    /// A broker whose subscribes fail while `down`, recording what it is asked.
    #[derive(Default)]
    struct Flaky {
        down: std::sync::atomic::AtomicBool,
        released: Mutex<Vec<Arc<str>>>,
    }
    struct FlakyBroker(Arc<Flaky>, Arc<dyn BrokerEvents>);
    impl Broker for FlakyBroker {
        fn publish(&self, topic: &str, data: &[u8], at: u64) -> BrokerFuture {
            if self.0.down.load(std::sync::atomic::Ordering::Relaxed) {
                return BrokerFuture::pending(async { Err(BrokerError::Closed) });
            }
            self.1.publication(topic, data, at, Origin::Gateway);
            BrokerFuture::ready(Ok(()))
        }
        fn subscribe(&self, _topics: Vec<Arc<str>>) -> BrokerFuture {
            if self.0.down.load(std::sync::atomic::Ordering::Relaxed) {
                BrokerFuture::ready(Err(BrokerError::Unavailable("down".into())))
            } else {
                BrokerFuture::ready(Ok(()))
            }
        }
        fn release(&self, topics: Vec<Arc<str>>) {
            self.0.released.lock().extend(topics);
        }
        fn is_ready(&self) -> bool {
            true
        }
        fn kind(&self) -> &'static str {
            "flaky"
        }
    }

    fn flaky_node() -> (Node, Arc<Flaky>) {
        let flaky = Arc::new(Flaky::default());
        let f = flaky.clone();
        let node = Node::new(Metrics::default(), 1024, |events| {
            Ok::<_, ()>(FlakyBroker(f, events))
        })
        .unwrap();
        (node, flaky)
    }

    fn t(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[tokio::test]
    async fn one_encoding_per_publication_shared_by_every_subscriber() {
        let node = Node::in_memory(Metrics::default(), 1024);
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let (sa, sb): (Arc<dyn Subscriber>, Arc<dyn Subscriber>) = (a.clone(), b.clone());
        node.subscribe(1, &sa, &[t("chat.1")]).await.unwrap();
        node.subscribe(2, &sb, &[t("chat.1")]).await.unwrap();
        for i in 0..10 {
            let mut ack = node
                .publish(Source::Client, "chat.1", i.to_string().as_bytes())
                .unwrap();
            assert!(ack.now().unwrap().is_ok());
        }
        let got = a.0.lock().clone();
        assert_eq!(got.len(), 10);
        for (i, f) in got.iter().enumerate() {
            let text = std::str::from_utf8(&f[2..]).unwrap();
            assert!(text.ends_with(&format!("\"data\":{i}}}")), "{text}");
        }
        assert_eq!(got[0].as_ptr(), b.0.lock()[0].as_ptr(), "the same buffer");
        assert_eq!(node.metrics().received.client.get(), 10);
        assert_eq!(node.metrics().received.http.get(), 0);
    }

    #[tokio::test]
    async fn a_failed_subscribe_leaves_the_hub_as_it_was() {
        let (node, flaky) = flaky_node();
        let sub: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        node.subscribe(1, &sub, &[t("kept")]).await.unwrap();
        flaky.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = node.subscribe(1, &sub, &[t("new"), t("other")]).await;
        assert!(matches!(err, Err(BrokerError::Unavailable(_))));
        assert!(!node.hub().has_subscribers("new"));
        assert!(!node.hub().has_subscribers("other"));
        assert!(
            node.hub().has_subscribers("kept"),
            "earlier topics untouched"
        );
        assert_eq!(node.hub().subscription_count(), 1);
        let mut released = flaky.released.lock().clone();
        released.sort();
        assert_eq!(released, vec![t("new"), t("other")]);
    }

    #[tokio::test]
    async fn unsubscribe_releases_only_emptied_topics() {
        let (node, flaky) = flaky_node();
        let sub: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        node.subscribe(1, &sub, &[t("a"), t("b")]).await.unwrap();
        node.subscribe(2, &sub, &[t("a")]).await.unwrap();
        node.unsubscribe(1, [t("a"), t("b"), t("never")]);
        assert_eq!(*flaky.released.lock(), vec![t("b")]);
        node.unsubscribe(2, [t("a")]);
        assert_eq!(*flaky.released.lock(), vec![t("b"), t("a")]);
        assert_eq!(node.hub().subscription_count(), 0);
    }

    #[tokio::test]
    async fn publish_checks_then_counts_each_outcome_once() {
        let (node, flaky) = flaky_node();
        assert!(matches!(
            node.publish(Source::Http, "bad topic", b"1"),
            Err(PublishError::InvalidTopic(TopicError::BadChar))
        ));
        assert_eq!(
            node.publish(Source::Http, "t", &[b'1'; 1025]).err(),
            Some(PublishError::TooLarge {
                size: 1025,
                max: 1024
            })
        );
        node.publish(Source::Http, "t", b"1")
            .unwrap()
            .await
            .unwrap();
        flaky.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let ack = node.publish(Source::Http, "t", b"2").unwrap();
        assert!(ack.await.is_err());
        node.publish(Source::Demo, "t", b"3").unwrap().await.ok();
        let m = node.metrics();
        assert_eq!(m.received.http.get(), 1);
        assert_eq!(
            m.messages_dropped
                .with_label_values(&["broker_unavailable"])
                .get(),
            1,
            "demo publications are not counted"
        );
        assert_eq!(m.broker_publish_duration.get_sample_count(), 2);
    }

    #[test]
    fn backend_publications_are_counted_and_delivered() {
        let node = Node::in_memory(Metrics::default(), 1024);
        let rec = Arc::new(Recorder::default());
        node.hub().subscribe(&t("x"), 1, rec.clone());
        BrokerEvents::publication(&node.core, "x", b"{}", 5, Origin::Backend);
        BrokerEvents::publication(&node.core, "x", b"{}", 5, Origin::Gateway);
        assert_eq!(rec.0.lock().len(), 2);
        assert_eq!(node.metrics().received.redis.get(), 1);
    }

    fn chat_streams(size: usize) -> Namespaces {
        Namespaces::new(vec![crate::stream::Namespace {
            name: "chat".into(),
            topics: vec![crate::stream::Pattern::parse("chat:*").unwrap()],
            stream: Some(crate::stream::StreamOptions {
                history_size: size,
                history_ttl: std::time::Duration::from_secs(600),
            }),
            ..Default::default()
        }])
        .unwrap()
    }

    fn texts(r: &Recorder) -> Vec<String> {
        r.0.lock()
            .iter()
            .map(|f| String::from_utf8(f[2..].to_vec()).unwrap())
            .collect()
    }

    fn publish_now(node: &Node, topic: &str, data: &str) -> Option<Position> {
        node.publish(Source::Http, topic, data.as_bytes())
            .unwrap()
            .now()
            .unwrap()
            .unwrap()
    }

    async fn join(
        node: &Node,
        id: u64,
        sub: &Arc<dyn Subscriber>,
        topics: &[Arc<str>],
        since: &[(&str, u64, &str)],
    ) -> Vec<StreamStart> {
        let since: HashMap<Arc<str>, Position> = since
            .iter()
            .map(|(t, seq, ep)| {
                (
                    t_(t),
                    Position {
                        seq: *seq,
                        epoch: Arc::from(*ep),
                    },
                )
            })
            .collect();
        let mut out = Vec::new();
        node.subscribe_streams(id, sub, topics, &[], &since, |s| out = s.to_vec())
            .await
            .unwrap();
        out
    }

    fn t_(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[tokio::test]
    async fn streams_are_numbered_and_plain_topics_are_not() {
        let node = Node::in_memory_with(Metrics::default(), 1024, chat_streams(100), 1 << 20);
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        let starts = join(&node, 1, &sub, &[t("chat:1"), t("news")], &[]).await;
        assert_eq!(starts.len(), 1, "only the stream has a start");
        assert_eq!(starts[0].position.seq, 0);
        assert_eq!(starts[0].recovered, None);
        let p1 = publish_now(&node, "chat:1", "\"a\"").unwrap();
        let p2 = publish_now(&node, "chat:1", "\"b\"").unwrap();
        assert_eq!((p1.seq, p2.seq), (1, 2));
        assert_eq!(p1.epoch, starts[0].position.epoch);
        assert_eq!(publish_now(&node, "news", "1"), None);
        assert_eq!(
            texts(&rec),
            vec![
                r#"{"op":"message","topic":"chat:1","data":"a","seq":1}"#,
                r#"{"op":"message","topic":"chat:1","data":"b","seq":2}"#,
                r#"{"op":"message","topic":"news","data":1}"#,
            ]
        );
        let err = node.history("news", HistoryQuery::Latest(1)).await;
        assert!(matches!(err, Err(HistoryError::NotAStream(_))));
        let h = node
            .history("chat:1", HistoryQuery::Latest(10))
            .await
            .unwrap();
        assert_eq!(h.entries.len(), 2);
    }

    #[tokio::test]
    async fn resume_replays_exactly_what_was_missed_after_the_reply() {
        let node = Node::in_memory_with(Metrics::default(), 1024, chat_streams(5), 1 << 20);
        let first: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        let start = join(&node, 1, &first, &[t("chat:1")], &[]).await;
        let epoch = start[0].position.epoch.to_string();
        for i in 1..=8 {
            publish_now(&node, "chat:1", &i.to_string());
        }
        // Recovered: 5..8 follow the reply (history keeps 4..8).
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        let mut order = Vec::new();
        let since: HashMap<Arc<str>, Position> = [(
            t("chat:1"),
            Position {
                seq: 4,
                epoch: Arc::from(epoch.as_str()),
            },
        )]
        .into();
        node.subscribe_streams(2, &sub, &[t("chat:1")], &[], &since, |s| {
            order.push(format!("reply at {}", s[0].position.seq));
            assert_eq!(rec.0.lock().len(), 0, "the reply comes before the replay");
            assert_eq!(s[0].recovered, Some(true));
        })
        .await
        .unwrap();
        assert_eq!(order, vec!["reply at 8"]);
        publish_now(&node, "chat:1", "9");
        let seqs: Vec<String> = texts(&rec)
            .iter()
            .map(|t| {
                t.rsplit(':')
                    .next()
                    .unwrap()
                    .trim_end_matches('}')
                    .to_owned()
            })
            .collect();
        assert_eq!(seqs, vec!["5", "6", "7", "8", "9"]);
        // Trimmed (3 is gone), another epoch, beyond the stream: not recovered.
        for (i, since) in [(3u64, epoch.as_str()), (4, "other"), (99, epoch.as_str())]
            .into_iter()
            .enumerate()
        {
            let rec = Arc::new(Recorder::default());
            let sub: Arc<dyn Subscriber> = rec.clone();
            let s = join(
                &node,
                10 + i as u64,
                &sub,
                &[t("chat:1")],
                &[("chat:1", since.0, since.1)],
            )
            .await;
            assert_eq!(s[0].recovered, Some(false), "{since:?}");
            assert_eq!(s[0].position.seq, 9);
            assert!(rec.0.lock().is_empty(), "nothing replayed");
        }
        // At the current position: recovered, nothing to replay.
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        let s = join(&node, 20, &sub, &[t("chat:1")], &[("chat:1", 9, &epoch)]).await;
        assert_eq!(s[0].recovered, Some(true));
        assert!(rec.0.lock().is_empty());
        let m = node.metrics();
        assert_eq!(m.stream_resumes.with_label_values(&["recovered"]).get(), 2);
        assert_eq!(
            m.stream_resumes.with_label_values(&["not_recovered"]).get(),
            3
        );
        // A held topic reports where it is, replays nothing.
        let mut held = Vec::new();
        node.subscribe_streams(20, &sub, &[], &[t("chat:1")], &HashMap::new(), |s| {
            held = s.to_vec()
        })
        .await
        .unwrap();
        assert_eq!(held[0].position.seq, 9);
        assert!(rec.0.lock().is_empty());
    }

    /// A broker over the in-memory history that loses the relay of chosen seqs
    /// (`lose`), and, when `busy`, has one more publication made before each `After`
    /// read (as on a busy stream, racing the reader).
    struct TestBroker {
        history: crate::history::MemoryHistory,
        events: Arc<dyn BrokerEvents>,
        lose: Mutex<Vec<u64>>,
        busy: bool,
        /// `After` reads answered, each after a few milliseconds (so reads overlap).
        slow_reads: Option<Arc<std::sync::atomic::AtomicUsize>>,
    }
    impl TestBroker {
        fn with(
            lose: &[u64],
            busy: bool,
        ) -> impl FnOnce(Arc<dyn BrokerEvents>) -> Result<Self, ()> {
            let lose = lose.to_vec();
            move |events| {
                Ok(TestBroker {
                    history: crate::history::MemoryHistory::new(1 << 20),
                    events,
                    lose: Mutex::new(lose),
                    busy,
                    slow_reads: None,
                })
            }
        }
    }
    impl Broker for TestBroker {
        fn publish(&self, _: &str, _: &[u8], _: u64) -> BrokerFuture {
            BrokerFuture::ready(Ok(()))
        }
        fn publish_stream(
            &self,
            topic: &str,
            data: &[u8],
            at: u64,
            opts: &crate::stream::StreamOptions,
        ) -> BrokerFuture<Position> {
            let (p, ()) = self.history.append(topic, data, at, opts, |p, e| {
                if !self.lose.lock().contains(&e.seq) {
                    self.events
                        .stream_publication(topic, &p.epoch, e.clone(), Origin::Gateway);
                }
            });
            BrokerFuture::ready(Ok(p))
        }
        fn history(
            &self,
            topic: &str,
            opts: &crate::stream::StreamOptions,
            q: HistoryQuery,
        ) -> BrokerFuture<History> {
            let after = matches!(q, HistoryQuery::After { .. });
            if self.busy && after {
                // Appended (and relayed) at once: the future only carries the answer.
                drop(self.publish_stream(topic, b"0", 0, opts));
            }
            let h = self.history.read(topic, opts, q);
            match &self.slow_reads {
                Some(count) if after => {
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    BrokerFuture::pending(async move {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(h)
                    })
                }
                _ => BrokerFuture::ready(Ok(h)),
            }
        }
        fn subscribe(&self, _: Vec<Arc<str>>) -> BrokerFuture {
            BrokerFuture::ready(Ok(()))
        }
        fn release(&self, _: Vec<Arc<str>>) {}
        fn is_ready(&self) -> bool {
            true
        }
        fn kind(&self) -> &'static str {
            "test"
        }
    }

    #[tokio::test]
    async fn lost_relays_are_repaired_from_history_or_reset() {
        let node = Node::with_namespaces(
            Metrics::default(),
            1024,
            chat_streams(3),
            TestBroker::with(&[2, 3, 6, 7, 8, 9], false),
        )
        .unwrap();
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        join(&node, 1, &sub, &[t("chat:1")], &[]).await;
        for i in 1..=10 {
            publish_now(&node, "chat:1", &i.to_string());
            // Each repair runs on a task of its own: let it finish.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        let got = texts(&rec);
        // 2, 3 repaired before 4; 6..9: history keeps only 8..10 when 10 arrives,
        // so 6, 7 are reset, 8, 9 repaired.
        let want: Vec<String> = [1, 2, 3, 4, 5]
            .iter()
            .map(|i| format!(r#"{{"op":"message","topic":"chat:1","data":{i},"seq":{i}}}"#))
            .collect();
        assert_eq!(got[..5], want[..]);
        assert!(
            got[5].starts_with(r#"{"op":"reset","topic":"chat:1","seq":7,"#),
            "{}",
            got[5]
        );
        assert!(got[6].ends_with(r#""seq":8}"#), "{}", got[6]);
        assert!(got[7].ends_with(r#""seq":9}"#));
        assert!(got[8].ends_with(r#""seq":10}"#));
        assert_eq!(got.len(), 9);
        let m = node.metrics();
        assert_eq!(m.stream_gaps.get(), 2);
        assert_eq!(m.stream_resets.get(), 1);
    }

    #[tokio::test]
    async fn a_resubscribe_catches_streams_up_and_plain_publishes_on_streams_are_refused() {
        let node = Node::with_namespaces(
            Metrics::default(),
            1024,
            chat_streams(100),
            TestBroker::with(&[3, 4], false),
        )
        .unwrap();
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        join(&node, 1, &sub, &[t("chat:1"), t("news")], &[]).await;
        for i in 1..=4 {
            publish_now(&node, "chat:1", &i.to_string());
        }
        assert_eq!(texts(&rec).len(), 2, "3 and 4 were lost in the relay");
        node.core.resubscribed(&[t("chat:1"), t("news")]);
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        let got = texts(&rec);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[2].ends_with(r#""data":3,"seq":3}"#), "{}", got[2]);
        assert!(got[3].ends_with(r#""data":4,"seq":4}"#), "{}", got[3]);
        // A plain relay message on a stream topic: counted, not delivered.
        BrokerEvents::publication(&node.core, "chat:1", b"5", 1, Origin::Backend);
        assert_eq!(texts(&rec).len(), 4);
        assert_eq!(node.metrics().stream_plain_publishes.get(), 1);
        // A numbered one on a plain topic (a node configured otherwise): delivered.
        let entry = HistoryEntry {
            seq: 7,
            data: bytes::Bytes::from_static(b"1"),
            accepted_at: 1,
        };
        node.core
            .stream_publication("news", &Arc::from("e"), entry, Origin::Gateway);
        assert_eq!(
            texts(&rec)[4],
            r#"{"op":"message","topic":"news","data":1,"seq":7}"#
        );
    }

    #[tokio::test]
    async fn a_resume_racing_publications_still_recovers_every_one() {
        let node = Node::with_namespaces(
            Metrics::default(),
            1024,
            chat_streams(1000),
            TestBroker::with(&[], true),
        )
        .unwrap();
        let first: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        let start = join(&node, 1, &first, &[t("chat:1")], &[]).await;
        let epoch = start[0].position.epoch.to_string();
        for i in 1..=10 {
            publish_now(&node, "chat:1", &i.to_string());
        }
        let rec = Arc::new(Recorder::default());
        let sub: Arc<dyn Subscriber> = rec.clone();
        let s = join(&node, 2, &sub, &[t("chat:1")], &[("chat:1", 3, &epoch)]).await;
        assert_eq!(s[0].recovered, Some(true), "{s:?}");
        let end = s[0].position.seq;
        assert!(end > 10, "the stream moved on during the resume: {end}");
        let got = texts(&rec);
        assert_eq!(got.len() as u64, end - 3, "{got:?}");
        for (i, text) in got.iter().enumerate() {
            assert!(text.ends_with(&format!(r#""seq":{}}}"#, 4 + i)), "{text}");
        }
    }

    /// A node whose broker answers `After` reads slowly (counted), with one subscriber
    /// on stream `chat:1` and `published` publications made: (node, reads, epoch).
    async fn slow_stream(published: u64) -> (Node, Arc<std::sync::atomic::AtomicUsize>, String) {
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = reads.clone();
        let node = Node::with_namespaces(
            Metrics::default(),
            1024,
            chat_streams(1000),
            move |events| {
                TestBroker::with(&[], false)(events).map(|mut b| {
                    b.slow_reads = Some(counted);
                    b
                })
            },
        )
        .unwrap();
        let first: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        let start = join(&node, 1, &first, &[t("chat:1")], &[]).await;
        for i in 1..=published {
            publish_now(&node, "chat:1", &i.to_string());
        }
        let epoch = start[0].position.epoch.to_string();
        (node, reads, epoch)
    }

    #[tokio::test]
    async fn a_storm_of_resumes_reads_the_history_once() {
        let (node, reads, epoch) = slow_stream(100).await;
        let recorders: Vec<Arc<Recorder>> =
            (0..50).map(|_| Arc::new(Recorder::default())).collect();
        let resumes = recorders.iter().enumerate().map(|(i, r)| {
            let sub: Arc<dyn Subscriber> = r.clone();
            let node = &node;
            let epoch = epoch.clone();
            async move {
                join(
                    node,
                    10 + i as u64,
                    &sub,
                    &[t("chat:1")],
                    &[("chat:1", 40, &epoch)],
                )
                .await
            }
        });
        let starts = futures_util::future::join_all(resumes).await;
        assert!(starts.iter().all(|s| s[0].recovered == Some(true)));
        for r in &recorders {
            assert_eq!(texts(r).len(), 60, "41..100 replayed to each");
        }
        let n = reads.load(std::sync::atomic::Ordering::Relaxed);
        assert!(n <= 2, "50 resumes of one range read the history {n} times");
    }

    #[tokio::test]
    async fn a_resume_given_up_leaves_no_shared_read_behind() {
        let (node, reads, epoch) = slow_stream(5).await;
        let sub: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        let (topics, since) = ([t("chat:1")], [("chat:1", 1, epoch.as_str())]);
        let resume = join(&node, 2, &sub, &topics, &since);
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(5), resume).await;
        assert!(gave_up.is_err(), "the slow read was still going");
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(node.reads.lock().is_empty(), "the shared read went with it");
    }

    #[tokio::test]
    async fn the_last_subscriber_leaving_forgets_the_stream() {
        let node = Node::in_memory_with(Metrics::default(), 1024, chat_streams(10), 1 << 20);
        let sub: Arc<dyn Subscriber> = Arc::new(Recorder::default());
        join(&node, 1, &sub, &[t("chat:1")], &[]).await;
        publish_now(&node, "chat:1", "1");
        node.unsubscribe(1, [t("chat:1")]);
        assert!(!node.core.has_subscribers("chat:1"));
        assert!(node.core.streams.iter().all(|s| s.lock().is_empty()));
        // Rejoining starts from the broker's position again.
        let s = join(&node, 2, &sub, &[t("chat:1")], &[]).await;
        assert_eq!(s[0].position.seq, 1);
    }
}
