//! The broker seam: how a node publishes to, and hears from, the rest of the cluster.
//!
//! The [`Node`](crate::Node) calls its broker for three things (centrifuge's
//! node/broker split):
//! - [`Broker::publish`] for every accepted publication (client, HTTP API, demo). The
//!   broker hands it back to the node through [`BrokerEvents::publication`] — at once
//!   (memory) or through a relay that reports it on every node, this one included
//!   (Redis).
//! - [`Broker::subscribe`] after the node added a connection to a topic in its hub.
//!   It resolves once the node is guaranteed to receive that topic, which is what
//!   makes the contract's "`subscribed` means ready" true across nodes.
//! - [`Broker::release`] when a topic lost its last local subscriber.
//!
//! Brokers never see the hub, connections or frames. What arrives is reported through
//! the one [`BrokerEvents`] handler the node gives the broker when it is built; the
//! node encodes, delivers and counts. The same handler answers the broker's questions
//! about interest ([`BrokerEvents::has_subscribers`], [`BrokerEvents::topics`]), so
//! racing subscribes and releases always settle on what the node's hub says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::collections::HashMap;

use indexmap::IndexMap;
use parking_lot::Mutex;

use crate::history::{MemoryHistory, DEFAULT_HISTORY_MEMORY};
use crate::presence::{NodeInfo, PresenceEntry, PresenceEvent, PresenceKind};
use crate::stream::{History, HistoryEntry, HistoryQuery, Position, StreamOptions};

/// Why a broker could not do what was asked. Client-visible as `unavailable`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker (e.g. Redis) is not reachable right now.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker is shutting down.
    #[error("broker closed")]
    Closed,
}

/// Where a publication reported by a broker was first accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// By a gateway node (this one or another): it was counted where it was accepted.
    Gateway,
    /// By a backend writing to the broker directly (e.g. a Redis `PUBLISH`).
    Backend,
}

/// What a broker reports to its node, and the node's interest it may ask about.
///
/// Implemented by the node; brokers hold it as `Arc<dyn BrokerEvents>`.
pub trait BrokerEvents: Send + Sync + 'static {
    /// A publication of `data` (valid JSON text) to `topic` (valid) arrived.
    /// `accepted_at` is when a node first accepted it, in nanoseconds since the UNIX
    /// epoch (the receive time for a backend's publication). Called in topic order;
    /// must not block (it only enqueues).
    fn publication(&self, topic: &str, data: &[u8], accepted_at: u64, origin: Origin);

    /// A publication of a stream arrived, at `seq` of `epoch`. Called in seq order
    /// as far as the broker knows; the node repairs what is missing. Must not block.
    fn stream_publication(
        &self,
        topic: &str,
        epoch: &Arc<str>,
        entry: HistoryEntry,
        origin: Origin,
    );

    /// Whether the node has a local subscriber of `topic` now: the truth a broker
    /// re-checks before it gives a topic up.
    fn has_subscribers(&self, topic: &str) -> bool;

    /// Every topic with local subscribers (what to subscribe again after a broker
    /// reconnect). A snapshot: it may be stale by the time it is used.
    fn topics(&self) -> Vec<Arc<str>>;

    /// The broker subscribed `topics` again after its connection was lost and is
    /// confirmed: anything published meanwhile may have been missed. The node
    /// catches its streams up from history (or says `reset`). Must not block.
    fn resubscribed(&self, topics: &[Arc<str>]) {
        let _ = topics;
    }

    /// A join or leave on `topic` arrived (from any node, this one included). Must
    /// not block.
    fn presence_event(&self, topic: &str, event: PresenceEvent) {
        let _ = (topic, event);
    }

    /// A server command (`POST /api/disconnect`, …) sent to every node through
    /// [`Broker::control`] arrived. Must not block.
    fn control(&self, command: &[u8]) {
        let _ = command;
    }

    /// Every presence entry of this node's connections, by topic: what a broker
    /// writes again when its copy was lost (a Redis restart) or may be wrong (a
    /// failed write).
    fn presence_snapshot(&self) -> Vec<(Arc<str>, Vec<PresenceEntry>)> {
        Vec::new()
    }

    /// Whether `topic`'s subscribers get join/leave events (for a broker announcing
    /// the leaves of a dead node's connections).
    fn announces(&self, topic: &str) -> bool {
        let _ = topic;
        false
    }

    /// What this node is now, for the cluster's node list (`GET /api/info`).
    fn node_info(&self) -> Option<NodeInfo> {
        None
    }
}

/// The outcome of a broker operation: ready at once (the in-memory broker) or later
/// (a relay). Ready outcomes need no allocation.
#[must_use = "a broker future does nothing useful unless awaited"]
pub struct BrokerFuture<T = ()>(Inner<T>);

enum Inner<T> {
    Ready(Option<Result<T, BrokerError>>),
    Pending(Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'static>>),
}

impl<T> BrokerFuture<T> {
    /// An outcome known now.
    pub fn ready(result: Result<T, BrokerError>) -> Self {
        BrokerFuture(Inner::Ready(Some(result)))
    }

    /// An outcome that a future will tell.
    pub fn pending(fut: impl Future<Output = Result<T, BrokerError>> + Send + 'static) -> Self {
        BrokerFuture(Inner::Pending(Box::pin(fut)))
    }

    /// The outcome, if it is already known (lets callers skip a task spawn).
    pub fn now(&mut self) -> Option<Result<T, BrokerError>> {
        match &mut self.0 {
            Inner::Ready(r) => r.take(),
            Inner::Pending(_) => None,
        }
    }
}

impl<T> Unpin for BrokerFuture<T> {}

impl<T> Future for BrokerFuture<T> {
    type Output = Result<T, BrokerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            Inner::Ready(r) => Poll::Ready(r.take().expect("BrokerFuture polled after completion")),
            Inner::Pending(f) => f.as_mut().poll(cx),
        }
    }
}

/// The seam between a node and the rest of the cluster.
pub trait Broker: Send + Sync + 'static {
    /// Publishes `data` (valid JSON text) to `topic` (valid).
    ///
    /// Ordering: the position of this publication in its topic's stream is fixed when
    /// `publish` *returns*, so calls made one after another by one task are delivered
    /// in that order even if their futures are awaited concurrently (pipelining).
    /// The future resolves when the broker has accepted the publication; an error
    /// means it was not accepted (never a false success).
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture;

    /// Publishes `data` to the stream `topic`: numbers it, keeps it in the stream's
    /// history (bounded by `opts`) and relays it, as one step; resolves with its
    /// position. Ordering as for [`Broker::publish`].
    fn publish_stream(
        &self,
        topic: &str,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
    ) -> BrokerFuture<Position> {
        let _ = (topic, data, accepted_at, opts);
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker keeps no stream history",
            self.kind()
        ))))
    }

    /// Reads the history of the stream `topic`.
    fn history(
        &self,
        topic: &str,
        opts: &StreamOptions,
        query: HistoryQuery,
    ) -> BrokerFuture<History> {
        let _ = (topic, opts, query);
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker keeps no stream history",
            self.kind()
        ))))
    }

    /// Ensures this node receives `topics`, which the node has already added to its
    /// hub. Resolves once messages published from now on will be reported through
    /// [`BrokerEvents::publication`]. Topics that were already live resolve at once,
    /// or when their pending subscription is confirmed.
    fn subscribe(&self, topics: Vec<Arc<str>>) -> BrokerFuture;

    /// `topics` have lost their last local subscriber. The broker may stop receiving
    /// them (after re-checking [`BrokerEvents::has_subscribers`], possibly after a
    /// delay).
    fn release(&self, topics: Vec<Arc<str>>);

    /// Whether the broker can fan out right now (for `/readyz`).
    fn is_ready(&self) -> bool;

    /// A short name for logs and metrics: `memory`, `redis`, …
    fn kind(&self) -> &'static str;

    /// Bytes of stream history this broker keeps in this process, if it keeps any.
    fn history_bytes(&self) -> Option<usize> {
        None
    }

    /// Lists `entry` in `topic`'s presence and, with `announce`, relays its `join`
    /// to every node ([`BrokerEvents::presence_event`]). Resolves once every node's
    /// presence query sees it. Ordering as for [`Broker::publish`]: a later
    /// [`Broker::presence_remove`] of the same entry is relayed after it.
    fn presence_add(&self, topic: &str, entry: &PresenceEntry, announce: bool) -> BrokerFuture {
        let _ = (topic, entry, announce);
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker keeps no presence",
            self.kind()
        ))))
    }

    /// Takes `entry` out of `topic`'s presence and, with `announce`, relays its
    /// `leave`. A failure is the broker's to put right (from
    /// [`BrokerEvents::presence_snapshot`]).
    fn presence_remove(&self, topic: &str, entry: &PresenceEntry, announce: bool) {
        let _ = (topic, entry, announce);
    }

    /// Every connection in `topic`'s presence, on every live node.
    fn presence(&self, topic: &str) -> BrokerFuture<Vec<PresenceEntry>> {
        let _ = topic;
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker keeps no presence",
            self.kind()
        ))))
    }

    /// Sends a server command to every node, this one included
    /// ([`BrokerEvents::control`]); resolves with how many nodes it reached, when
    /// the broker knows.
    fn control(&self, command: &[u8]) -> BrokerFuture<Option<usize>> {
        let _ = command;
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker relays no server commands",
            self.kind()
        ))))
    }

    /// Every live node.
    fn nodes(&self) -> BrokerFuture<Vec<NodeInfo>> {
        BrokerFuture::ready(Err(BrokerError::Unavailable(format!(
            "the {} broker keeps no node list",
            self.kind()
        ))))
    }

    /// Takes this node out of the node list now, at the end of a drain, instead of
    /// when its heartbeats' lease runs out: the other nodes stop counting it (for
    /// rebalancing, `GET /api/info`) at once, and it is not mistaken for a dead
    /// node. Heartbeats stop. A node that still lists presence entries stays until
    /// its lease ends and is cleaned up like a node that stopped without draining.
    fn leave(&self) -> BrokerFuture {
        BrokerFuture::ready(Ok(()))
    }
}

/// One topic's presence in the embedded broker, by session.
type TopicPresence = IndexMap<Arc<str>, PresenceEntry>;

/// The embedded single-node broker: a publication is reported back at once; stream
/// history and presence are kept in memory ([`MemoryHistory`]).
pub struct MemoryBroker {
    events: Arc<dyn BrokerEvents>,
    history: MemoryHistory,
    /// Presence by topic, then session, in the order connections joined.
    presence: Mutex<HashMap<Arc<str>, TopicPresence>>,
}

impl MemoryBroker {
    /// A broker reporting to `events` (the node), keeping at most
    /// [`DEFAULT_HISTORY_MEMORY`] bytes of stream history.
    pub fn new(events: Arc<dyn BrokerEvents>) -> Self {
        Self::with_history_memory(events, DEFAULT_HISTORY_MEMORY)
    }

    /// A broker keeping at most `cap` bytes of stream history in total.
    pub fn with_history_memory(events: Arc<dyn BrokerEvents>, cap: usize) -> Self {
        MemoryBroker {
            events,
            history: MemoryHistory::new(cap),
            presence: Mutex::default(),
        }
    }

    /// The stream history (for metrics and tests).
    pub fn history_store(&self) -> &MemoryHistory {
        &self.history
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture {
        // Delivered synchronously, so the caller's sequence is the delivery order.
        self.events
            .publication(topic, data, accepted_at, Origin::Gateway);
        BrokerFuture::ready(Ok(()))
    }

    fn publish_stream(
        &self,
        topic: &str,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
    ) -> BrokerFuture<Position> {
        // Reported while the stream is locked: the node sees its seqs in order.
        let (position, ()) = self
            .history
            .append(topic, data, accepted_at, opts, |pos, entry| {
                self.events
                    .stream_publication(topic, &pos.epoch, entry.clone(), Origin::Gateway);
            });
        BrokerFuture::ready(Ok(position))
    }

    fn history(
        &self,
        topic: &str,
        opts: &StreamOptions,
        query: HistoryQuery,
    ) -> BrokerFuture<History> {
        BrokerFuture::ready(Ok(self.history.read(topic, opts, query)))
    }

    fn history_bytes(&self) -> Option<usize> {
        Some(self.history.bytes())
    }

    fn subscribe(&self, _topics: Vec<Arc<str>>) -> BrokerFuture {
        // The node's hub is the whole cluster here: its entry makes the topic live.
        BrokerFuture::ready(Ok(()))
    }

    fn release(&self, _topics: Vec<Arc<str>>) {}

    fn is_ready(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn presence_add(&self, topic: &str, entry: &PresenceEntry, announce: bool) -> BrokerFuture {
        let fresh = self
            .presence
            .lock()
            .entry(Arc::from(topic))
            .or_default()
            .insert(entry.session.clone(), entry.clone())
            .is_none();
        if fresh && announce {
            self.events
                .presence_event(topic, event(PresenceKind::Join, entry));
        }
        BrokerFuture::ready(Ok(()))
    }

    fn presence_remove(&self, topic: &str, entry: &PresenceEntry, announce: bool) {
        let removed = {
            let mut all = self.presence.lock();
            let removed = all
                .get_mut(topic)
                .and_then(|t| t.shift_remove(&entry.session))
                .is_some();
            if all.get(topic).is_some_and(IndexMap::is_empty) {
                all.remove(topic);
            }
            removed
        };
        if removed && announce {
            self.events
                .presence_event(topic, event(PresenceKind::Leave, entry));
        }
    }

    fn presence(&self, topic: &str) -> BrokerFuture<Vec<PresenceEntry>> {
        let list = self
            .presence
            .lock()
            .get(topic)
            .map(|t| t.values().cloned().collect())
            .unwrap_or_default();
        BrokerFuture::ready(Ok(list))
    }

    fn control(&self, command: &[u8]) -> BrokerFuture<Option<usize>> {
        self.events.control(command);
        BrokerFuture::ready(Ok(Some(1)))
    }

    fn nodes(&self) -> BrokerFuture<Vec<NodeInfo>> {
        BrokerFuture::ready(Ok(self.events.node_info().into_iter().collect()))
    }
}

/// The event of `entry` joining or leaving.
pub fn event(kind: PresenceKind, entry: &PresenceEntry) -> PresenceEvent {
    PresenceEvent {
        kind,
        session: entry.session.clone(),
        user: entry.user.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// One reported publication: topic, data, accept time, origin.
    type Reported = (String, Vec<u8>, u64, Origin);

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Reported>>);
    impl BrokerEvents for Recorder {
        fn publication(&self, topic: &str, data: &[u8], at: u64, origin: Origin) {
            self.0.lock().push((topic.into(), data.into(), at, origin));
        }
        fn stream_publication(&self, topic: &str, _: &Arc<str>, e: HistoryEntry, o: Origin) {
            self.0
                .lock()
                .push((topic.into(), e.data.to_vec(), e.seq, o));
        }
        fn has_subscribers(&self, _topic: &str) -> bool {
            true
        }
        fn topics(&self) -> Vec<Arc<str>> {
            Vec::new()
        }
    }

    #[tokio::test]
    async fn memory_broker_reports_every_publication_at_once_in_order() {
        let events = Arc::new(Recorder::default());
        let broker = MemoryBroker::new(events.clone());
        broker.subscribe(vec![Arc::from("chat.1")]).await.unwrap();
        for i in 0..100u64 {
            let mut f = broker.publish("chat.1", i.to_string().as_bytes(), i);
            assert!(
                f.now().unwrap().is_ok(),
                "memory publishes complete at once"
            );
        }
        let got = events.0.lock();
        assert_eq!(got.len(), 100);
        for (i, (topic, data, at, origin)) in got.iter().enumerate() {
            assert_eq!(topic, "chat.1");
            assert_eq!(data, i.to_string().as_bytes());
            assert_eq!(*at, i as u64);
            assert_eq!(*origin, Origin::Gateway);
        }
        assert!(broker.is_ready());
    }
}
