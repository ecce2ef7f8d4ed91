//! The topic → local subscribers index.
//!
//! A plain data structure, as in centrifuge's hub: sharded by topic hash so that
//! subscribes on different topics do not contend, read-locked for delivery so that
//! concurrent deliveries never wait on each other, and never locked across `.await`.
//! It performs no I/O: delivering means calling [`Subscriber::deliver`], which must
//! not block (a byte-bounded, non-blocking enqueue in the gateway).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use indexmap::IndexMap;
use parking_lot::RwLock;

use crate::publication::Publication;

/// Identifies one local subscriber (a connection) in the hub.
pub type SubscriberId = u64;

/// Something that accepts publications without blocking.
pub trait Subscriber: Send + Sync + 'static {
    /// Hands a publication to the subscriber. Must not block or await: a subscriber
    /// that cannot keep up deals with it itself (the gateway disconnects it).
    fn deliver(&self, publication: &Publication);
}

type Subscribers = IndexMap<SubscriberId, Arc<dyn Subscriber>>;

/// One shard: topics whose hash falls here.
#[derive(Default)]
struct Shard {
    topics: RwLock<HashMap<Arc<str>, Subscribers>>,
}

/// The topic → local subscribers index. Cheap to share behind an `Arc`.
pub struct Hub {
    shards: Box<[Shard]>,
    hasher: RandomState,
    /// Current (topic, subscriber) pairs, for metrics.
    subscriptions: AtomicI64,
    /// Current topics with at least one local subscriber, for metrics.
    topics: AtomicI64,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new(64)
    }
}

impl Hub {
    /// A hub with `shards` shards (rounded up to a power of two).
    pub fn new(shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        Hub {
            shards: (0..n).map(|_| Shard::default()).collect(),
            hasher: RandomState::new(),
            subscriptions: AtomicI64::new(0),
            topics: AtomicI64::new(0),
        }
    }

    fn shard(&self, topic: &str) -> &Shard {
        let h = self.hasher.hash_one(topic) as usize;
        &self.shards[h & (self.shards.len() - 1)]
    }

    /// Adds `subscriber` to `topic`. Returns `true` when it is the topic's first local
    /// subscriber (the node now needs the topic from its broker). Adding an id that is
    /// already there replaces the handle and returns `false`.
    pub fn subscribe(
        &self,
        topic: &Arc<str>,
        id: SubscriberId,
        subscriber: Arc<dyn Subscriber>,
    ) -> bool {
        let mut topics = self.shard(topic).topics.write();
        match topics.get_mut(&**topic) {
            Some(subs) => {
                if subs.insert(id, subscriber).is_none() {
                    self.subscriptions.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            None => {
                let mut subs = IndexMap::with_capacity(1);
                subs.insert(id, subscriber);
                topics.insert(topic.clone(), subs);
                self.subscriptions.fetch_add(1, Ordering::Relaxed);
                self.topics.fetch_add(1, Ordering::Relaxed);
                true
            }
        }
    }

    /// Removes subscriber `id` from `topic`. Returns `true` when the topic has no
    /// local subscriber left (the node may give the topic up at its broker).
    /// Removing an id that is not there returns `false`.
    pub fn unsubscribe(&self, topic: &str, id: SubscriberId) -> bool {
        let mut topics = self.shard(topic).topics.write();
        let Some(subs) = topics.get_mut(topic) else {
            return false;
        };
        if subs.swap_remove(&id).is_none() {
            return false;
        }
        self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        if subs.is_empty() {
            topics.remove(topic);
            self.topics.fetch_sub(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Hands `publication` to every local subscriber of `topic`; returns how many.
    ///
    /// Holds the shard's read lock while enqueueing, which is short (no I/O) and
    /// lets deliveries to the same shard proceed in parallel.
    pub fn deliver(&self, topic: &str, publication: &Publication) -> usize {
        let topics = self.shard(topic).topics.read();
        match topics.get(topic) {
            Some(subs) => {
                for sub in subs.values() {
                    sub.deliver(publication);
                }
                subs.len()
            }
            None => 0,
        }
    }

    /// Hands `publication` to every local subscriber of `topic` but `except`;
    /// returns how many got it.
    pub fn deliver_except(
        &self,
        topic: &str,
        publication: &Publication,
        except: Option<SubscriberId>,
    ) -> usize {
        let topics = self.shard(topic).topics.read();
        let Some(subs) = topics.get(topic) else {
            return 0;
        };
        let mut n = 0;
        for (id, sub) in subs {
            if Some(*id) != except {
                sub.deliver(publication);
                n += 1;
            }
        }
        n
    }

    /// Whether `topic` has at least one local subscriber.
    pub fn has_subscribers(&self, topic: &str) -> bool {
        self.shard(topic).topics.read().contains_key(topic)
    }

    /// Number of local subscribers of `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.shard(topic)
            .topics
            .read()
            .get(topic)
            .map_or(0, |s| s.len())
    }

    /// Every topic with local subscribers (e.g. to resubscribe after a broker
    /// reconnect). A snapshot: it may be stale by the time it is used.
    pub fn topics(&self) -> Vec<Arc<str>> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.topics.read().keys().cloned());
        }
        out
    }

    /// Current number of (topic, subscriber) pairs.
    pub fn subscription_count(&self) -> i64 {
        self.subscriptions.load(Ordering::Relaxed)
    }

    /// Current number of topics with at least one local subscriber.
    pub fn topic_count(&self) -> i64 {
        self.topics.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Vec<u8>>>);
    impl Subscriber for Recorder {
        fn deliver(&self, p: &Publication) {
            self.0.lock().push(p.frame.to_vec());
        }
    }

    fn t(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let hub = Hub::new(4);
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        assert!(hub.subscribe(&t("news"), 1, a.clone()));
        assert!(!hub.subscribe(&t("news"), 2, b.clone()));
        assert!(
            !hub.subscribe(&t("news"), 2, b.clone()),
            "re-adding is not first"
        );
        assert_eq!(hub.subscription_count(), 2);
        assert_eq!(hub.topic_count(), 1);
        assert!(!hub.unsubscribe("news", 1));
        assert!(!hub.unsubscribe("news", 1), "removing twice is a no-op");
        assert!(
            hub.unsubscribe("news", 2),
            "last one leaving empties the topic"
        );
        assert!(!hub.has_subscribers("news"));
        assert!(!hub.unsubscribe("news", 2));
        assert_eq!(hub.subscription_count(), 0);
        assert_eq!(hub.topic_count(), 0);
    }

    #[test]
    fn delivers_only_to_the_topic_and_shares_the_bytes() {
        let hub = Hub::new(2);
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        hub.subscribe(&t("x"), 1, a.clone());
        hub.subscribe(&t("y"), 2, b.clone());
        hub.subscribe(&t("x"), 2, b.clone());
        let p = Publication::encode("x", b"1", 0);
        assert_eq!(hub.deliver("x", &p), 2);
        assert_eq!(hub.deliver("nobody", &p), 0);
        assert_eq!(a.0.lock().len(), 1);
        assert_eq!(b.0.lock().len(), 1);
        let mut topics = hub.topics();
        topics.sort();
        assert_eq!(topics, vec![t("x"), t("y")]);
    }

    #[test]
    fn concurrent_subscribe_unsubscribe_keeps_counts_exact() {
        let hub = Arc::new(Hub::new(8));
        let threads: Vec<_> = (0..4u64)
            .map(|w| {
                let hub = hub.clone();
                std::thread::spawn(move || {
                    let r: Arc<dyn Subscriber> = Arc::new(Recorder::default());
                    for i in 0..2000u64 {
                        let topic = t(&format!("t{}", i % 17));
                        let id = w * 1_000_000 + i;
                        hub.subscribe(&topic, id, r.clone());
                        if i % 3 != 0 {
                            hub.unsubscribe(&topic, id);
                        }
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        let expected: i64 = 4 * (0..2000).filter(|i| i % 3 == 0).count() as i64;
        assert_eq!(hub.subscription_count(), expected);
        let total: usize = hub.topics().iter().map(|t| hub.subscriber_count(t)).sum();
        assert_eq!(total as i64, expected);
        assert_eq!(hub.topic_count(), hub.topics().len() as i64);
    }
}
