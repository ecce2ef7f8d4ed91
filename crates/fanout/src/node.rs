//! The node: one gateway process's hub and broker, and the only place that joins them.
//!
//! Everything a connection does to topics goes through [`Node`] (the role of
//! centrifuge's `node.go`):
//! - [`Node::subscribe`]: hub add → broker subscribe → undo on failure.
//! - [`Node::unsubscribe`]: hub remove → broker release of the topics now empty.
//! - [`Node::publish`]: validation, then the broker; the returned [`PublishAck`]
//!   counts the outcome when it is known.
//!
//! And everything a broker reports comes back through the node's
//! [`BrokerEvents`] handler, which encodes each publication **once** and hands the
//! shared frame to every local subscriber. One place encodes, one place counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use wsgate_metrics::Metrics;

use crate::broker::{Broker, BrokerError, BrokerEvents, BrokerFuture, MemoryBroker, Origin};
use crate::hub::{Hub, Subscriber, SubscriberId};
use crate::publication::{unix_nanos, Publication};
use crate::topic::{validate_topic, TopicError};

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

/// What the node's broker handler needs: the hub it delivers into and the counters.
/// Shared with the broker (as its [`BrokerEvents`]) and with pending acks.
struct Core {
    hub: Hub,
    metrics: Metrics,
}

impl BrokerEvents for Core {
    fn publication(&self, topic: &str, data: &[u8], accepted_at: u64, origin: Origin) {
        if origin == Origin::Backend {
            // Gateway publications were counted where they were accepted.
            self.metrics.received.redis.inc();
        }
        // Encoded once, here, for every local subscriber.
        let publication = Publication::encode(topic, data, accepted_at);
        self.hub.deliver(topic, &publication);
    }

    fn has_subscribers(&self, topic: &str) -> bool {
        self.hub.has_subscribers(topic)
    }

    fn topics(&self) -> Vec<Arc<str>> {
        self.hub.topics()
    }
}

/// One gateway node's fan-out: its hub, its broker and the rules between them.
pub struct Node {
    core: Arc<Core>,
    broker: Arc<dyn Broker>,
    /// Largest `data` accepted by [`Node::publish`], in bytes.
    max_publication_size: usize,
}

impl Node {
    /// A node whose broker is built by `broker` from the node's event handler (the
    /// broker reports what arrives there).
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
        let core = Arc::new(Core {
            hub: Hub::default(),
            metrics,
        });
        let broker: Arc<dyn Broker> = Arc::new(broker(core.clone())?);
        core.metrics.set_broker_kind(broker.kind());
        core.metrics.broker_up.set(i64::from(broker.is_ready()));
        Ok(Node {
            core,
            broker,
            max_publication_size,
        })
    }

    /// A node with the in-memory broker (the embedded single-node default).
    pub fn in_memory(metrics: Metrics, max_publication_size: usize) -> Self {
        let built: Result<_, std::convert::Infallible> =
            Self::new(metrics, max_publication_size, |events| {
                Ok(MemoryBroker::new(events))
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
    /// taken out again, so the subscriber is left as it was.
    ///
    /// Every topic goes to the broker, not only those this node had no subscriber of:
    /// a topic whose first subscriber's broker subscription is still in flight is
    /// not ready yet, and the broker knows which.
    ///
    /// # Errors
    /// The broker could not make the topics live (`unavailable` to the client).
    ///
    /// # Cancel safety
    /// Not cancel safe: dropped before it resolves, the topics stay in the hub; the
    /// caller then owns them as subscribed (a session's `leave_all` removes them).
    pub async fn subscribe(
        &self,
        id: SubscriberId,
        subscriber: &Arc<dyn Subscriber>,
        topics: &[Arc<str>],
    ) -> Result<(), BrokerError> {
        if topics.is_empty() {
            return Ok(());
        }
        // Into the hub first, so nothing published once the broker confirms can miss
        // this subscriber.
        for t in topics {
            self.core.hub.subscribe(t, id, subscriber.clone());
        }
        let result = self.broker.subscribe(topics.to_vec()).await;
        if result.is_err() {
            self.unsubscribe(id, topics.iter().cloned());
        }
        result
    }

    /// Removes subscriber `id` from `topics` (those it has); the broker releases
    /// every topic that no local subscriber is left on.
    pub fn unsubscribe(&self, id: SubscriberId, topics: impl IntoIterator<Item = Arc<str>>) {
        let emptied: Vec<Arc<str>> = topics
            .into_iter()
            .filter(|t| self.core.hub.unsubscribe(t, id))
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
        Ok(PublishAck {
            ack: self.broker.publish(topic, data, unix_nanos()),
            started: Instant::now(),
            source,
            core: self.core.clone(),
        })
    }

    /// Refreshes the gauges that are cheaper to read than to maintain (at scrape
    /// time): subscriptions, topics, broker up.
    pub fn refresh_gauges(&self) {
        let m = &self.core.metrics;
        m.subscriptions.set(self.core.hub.subscription_count());
        m.topics.set(self.core.hub.topic_count());
        m.broker_up.set(i64::from(self.broker.is_ready()));
    }
}

/// The broker's answer to one publication; counts it once the answer is known:
/// accepted → `received{source}`, refused → `dropped{reason="broker_unavailable"}`.
#[must_use = "a publication is counted when its ack resolves"]
pub struct PublishAck {
    ack: BrokerFuture,
    started: Instant,
    source: Source,
    core: Arc<Core>,
}

impl PublishAck {
    /// The outcome, if the broker knew it at once (the in-memory broker), counted.
    pub fn now(&mut self) -> Option<Result<(), BrokerError>> {
        let result = self.ack.now()?;
        self.count(&result);
        Some(result)
    }

    fn count(&self, result: &Result<(), BrokerError>) {
        let m = &self.core.metrics;
        if self.source == Source::Demo {
            return;
        }
        m.broker_publish_duration
            .observe(self.started.elapsed().as_secs_f64());
        match (result, self.source) {
            (Ok(()), Source::Client) => m.received.client.inc(),
            (Ok(()), _) => m.received.http.inc(),
            (Err(_), _) => m.dropped("broker_unavailable", 1),
        }
    }
}

impl Future for PublishAck {
    type Output = Result<(), BrokerError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = std::task::ready!(Pin::new(&mut self.ack).poll(cx));
        self.count(&result);
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
        node.core.publication("x", b"{}", 5, Origin::Backend);
        node.core.publication("x", b"{}", 5, Origin::Gateway);
        assert_eq!(rec.0.lock().len(), 2);
        assert_eq!(node.metrics().received.redis.get(), 1);
    }
}
