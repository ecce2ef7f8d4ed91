//! The broker seam: how a node publishes to, and hears from, the rest of the cluster.
//!
//! A node calls its broker for three things (centrifuge's node/broker split):
//! - [`Broker::publish`] for every accepted publication (client, HTTP API). The
//!   broker delivers it — to the local hub directly (memory) or through a relay
//!   that delivers back to every node, this one included (Redis).
//! - [`Broker::subscribe`] after adding a connection to a topic in the [`Hub`]. It
//!   resolves once the node is guaranteed to receive that topic, which is what makes
//!   the contract's "`subscribed` means ready" true across nodes.
//! - [`Broker::release`] when a topic lost its last local subscriber.
//!
//! Relays deliver incoming messages with [`Hub::deliver`] and use
//! [`Hub::has_subscribers`] / [`Hub::topics`] as the source of truth for interest, so
//! racing subscribes and releases always settle on what the hub says.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::hub::Hub;
use crate::publication::Publication;

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

/// The outcome of a broker operation: ready at once (the in-memory broker) or later
/// (a relay). Ready outcomes need no allocation.
#[must_use = "a broker future does nothing useful unless awaited"]
pub struct BrokerFuture(Inner);

enum Inner {
    Ready(Option<Result<(), BrokerError>>),
    Pending(Pin<Box<dyn Future<Output = Result<(), BrokerError>> + Send + 'static>>),
}

impl BrokerFuture {
    /// An outcome known now.
    pub fn ready(result: Result<(), BrokerError>) -> Self {
        BrokerFuture(Inner::Ready(Some(result)))
    }

    /// An outcome that a future will tell.
    pub fn pending(fut: impl Future<Output = Result<(), BrokerError>> + Send + 'static) -> Self {
        BrokerFuture(Inner::Pending(Box::pin(fut)))
    }

    /// The outcome, if it is already known (lets callers skip a task spawn).
    pub fn now(&mut self) -> Option<Result<(), BrokerError>> {
        match &mut self.0 {
            Inner::Ready(r) => r.take(),
            Inner::Pending(_) => None,
        }
    }
}

impl Future for BrokerFuture {
    type Output = Result<(), BrokerError>;

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

    /// Ensures this node receives `topics`, which the caller has already added to the
    /// hub. Resolves once messages published from now on will reach the hub.
    fn subscribe(&self, topics: Vec<Arc<str>>) -> BrokerFuture;

    /// `topics` have lost their last local subscriber. The broker may stop receiving
    /// them (after re-checking the hub, possibly after a delay).
    fn release(&self, topics: Vec<Arc<str>>);

    /// Whether the broker can fan out right now (for `/readyz`).
    fn is_ready(&self) -> bool;

    /// A short name for logs and metrics: `memory`, `redis`, …
    fn kind(&self) -> &'static str;
}

/// The embedded single-node broker: a publication goes straight to the local hub.
pub struct MemoryBroker {
    hub: Arc<Hub>,
}

impl MemoryBroker {
    /// A broker delivering into `hub`.
    pub fn new(hub: Arc<Hub>) -> Self {
        MemoryBroker { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture {
        // Encoded once, here, for every local subscriber; delivered synchronously, so
        // the caller's sequence is the delivery order.
        let publication = Publication::encode(topic, data, accepted_at);
        self.hub.deliver(topic, &publication);
        BrokerFuture::ready(Ok(()))
    }

    fn subscribe(&self, _topics: Vec<Arc<str>>) -> BrokerFuture {
        // The hub *is* the broker here: the caller's hub entry makes the topic live.
        BrokerFuture::ready(Ok(()))
    }

    fn release(&self, _topics: Vec<Arc<str>>) {}

    fn is_ready(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Subscriber;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<bytes::Bytes>>);
    impl Subscriber for Recorder {
        fn deliver(&self, p: &Publication) {
            self.0.lock().push(p.frame.clone());
        }
    }

    #[tokio::test]
    async fn memory_broker_delivers_in_order_and_shares_frames() {
        let hub = Arc::new(Hub::default());
        let broker = MemoryBroker::new(hub.clone());
        let (a, b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let topic: Arc<str> = Arc::from("chat.1");
        hub.subscribe(&topic, 1, a.clone());
        hub.subscribe(&topic, 2, b.clone());
        broker.subscribe(vec![topic.clone()]).await.unwrap();
        for i in 0..100 {
            let mut f = broker.publish("chat.1", i.to_string().as_bytes(), 0);
            assert!(
                f.now().unwrap().is_ok(),
                "memory publishes complete at once"
            );
        }
        let got_a = a.0.lock().clone();
        assert_eq!(got_a.len(), 100);
        for (i, f) in got_a.iter().enumerate() {
            let text = std::str::from_utf8(&f[2..]).unwrap();
            assert!(text.ends_with(&format!("\"data\":{i}}}")), "{text}");
        }
        // One encoding per publication: both subscribers hold the very same buffer.
        assert_eq!(got_a[0].as_ptr(), b.0.lock()[0].as_ptr());
        assert!(broker.is_ready());
    }
}
