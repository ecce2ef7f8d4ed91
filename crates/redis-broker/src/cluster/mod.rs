//! Redis Cluster mode: sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7+).
//!
//! Classic pub/sub on a Redis Cluster copies every `PUBLISH` to every node, so adding
//! shards adds no capacity. A shard channel lives on the primary that owns its hash
//! slot; this relay keeps, per primary, one pub/sub connection and one publish
//! pipeline, and routes each topic by its slot.
//!
//! # Layout
//! - [`ClusterBroker`] (this file): the [`Broker`]; channel names (with the optional
//!   hash-tag rule) and the state shared by the tasks below.
//! - [`slot`]: CRC16 key slots and `{hash tag}`s.
//! - [`topology`]: the slot map (`CLUSTER SLOTS`) and shard numbering.
//! - [`publish`]: one writer task per primary; `SPUBLISH` pipelines; `MOVED`/`ASK`
//!   re-routes the publication to the new owner.
//! - [`subscribe`]: the manager task: owns the pub/sub connections, batches
//!   `SSUBSCRIBE` per slot, follows failovers, slot moves (`MOVED`, server-pushed
//!   `sunsubscribe`) and new shards by re-reading the slot map and moving topics.
//! - [`resp`]: the small RESP2 client these connections use.
//!
//! Delivery is Redis pub/sub's, at most once; what a failover or a slot move can
//! lose or reorder is in docs/redis.md.

pub mod publish;
pub mod resp;
pub mod slot;
pub mod subscribe;
pub mod topology;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::IntoConnectionInfo;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wsgate_fanout::{Broker, BrokerEvents, BrokerFuture};
use wsgate_metrics::Metrics;

use crate::envelope;
use crate::reply::{self, unavailable};
use publish::PubHandle;
use resp::Auth;
use subscribe::{Command, Event, Manager};
use topology::{Addr, SlotMap};

/// How to reach a Redis Cluster and name channels.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Seed nodes, `redis://[user:password@]host:port` each; any one that answers is
    /// enough to learn the rest. The credentials of the first are used everywhere.
    pub seeds: Vec<String>,
    /// A password that wins over the seed URL's (`--redis-password`, from a Secret).
    pub password: Option<String>,
    /// Prepended to every topic to form its channel name.
    pub prefix: String,
    /// Grace period before giving a topic up in Redis.
    pub unsubscribe_delay: Duration,
    /// With `Some(b'.')`, topic `room42.chat` uses channel `<prefix>{room42}.chat`:
    /// topics with the same first segment share a hash slot, hence a shard.
    pub hash_tag_separator: Option<u8>,
    /// The node's metrics.
    pub metrics: Option<Metrics>,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Seed URLs may hold a password: never print them.
        f.debug_struct("ClusterOptions")
            .field("seeds", &self.seeds.len())
            .field("prefix", &self.prefix)
            .field("unsubscribe_delay", &self.unsubscribe_delay)
            .finish_non_exhaustive()
    }
}

/// State the broker handle, the manager and the publish writers share.
pub(crate) struct Shared {
    pub prefix: Arc<str>,
    pub hash_tag_separator: Option<u8>,
    pub auth: Auth,
    pub seeds: Vec<Addr>,
    /// The current slot map; replaced whole by the manager (readers clone the Arc).
    pub map: RwLock<Arc<SlotMap>>,
    /// One publish writer per primary that has been routed to.
    pub publishers: Mutex<HashMap<Addr, PubHandle>>,
    /// Set by the manager: the map covers every slot and every primary's pub/sub
    /// connection is up.
    pub subscribe_up: AtomicBool,
    /// To the manager: refresh requests from publish writers, replies from readers.
    pub events: mpsc::UnboundedSender<Event>,
    pub metrics: Option<Metrics>,
    pub stop: CancellationToken,
}

impl Shared {
    pub(crate) fn map(&self) -> Arc<SlotMap> {
        self.map.read().expect("map lock").clone()
    }

    /// The channel of `topic`: `<prefix><topic>`, or with the hash-tag rule
    /// `<prefix>{<first segment>}<rest>` (topics cannot contain braces, so this is
    /// reversible, see [`Shared::topic_of`]).
    pub(crate) fn channel(&self, topic: &str) -> Vec<u8> {
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
    pub(crate) fn topic_of<'a>(&self, channel: &'a [u8]) -> Option<Cow<'a, str>> {
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

    /// Recomputes `wsgate_redis_up` (publishers and subscriptions all up).
    pub(crate) fn refresh_up_metric(&self) {
        if let Some(m) = &self.metrics {
            m.redis_up.set(i64::from(self.is_ready()));
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        if !self.subscribe_up.load(Ordering::Acquire) {
            return false;
        }
        let map = self.map();
        let pubs = self.publishers.lock().expect("publishers lock");
        map.primaries()
            .iter()
            .all(|a| pubs.get(a).is_some_and(PubHandle::is_up))
    }

    /// The publish writer for `addr`, started if there is none.
    pub(crate) fn publisher(self: &Arc<Self>, addr: &Addr) -> PubHandle {
        let mut pubs = self.publishers.lock().expect("publishers lock");
        pubs.entry(addr.clone())
            .or_insert_with(|| PubHandle::start(addr.clone(), self.clone()))
            .clone()
    }

    /// Asks the manager to re-read the slot map soon.
    pub(crate) fn request_refresh(&self) {
        let _ = self.events.send(Event::Refresh);
    }
}

/// A [`Broker`] relaying through Redis Cluster sharded pub/sub.
pub struct ClusterBroker {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
}

impl ClusterBroker {
    /// Starts the broker's tasks. The cluster need not be up: the manager keeps
    /// asking the seeds; until the slot map covers every slot and every shard is
    /// connected, [`Broker::is_ready`] is false.
    ///
    /// # Errors
    /// When there is no seed or a seed is not a valid `redis://host:port` URL.
    pub fn start(options: ClusterOptions, node: Arc<dyn BrokerEvents>) -> Result<Self, String> {
        if options.seeds.is_empty() {
            return Err("Redis Cluster mode needs at least one seed address".into());
        }
        let mut seeds = Vec::new();
        let mut auth = Auth::default();
        for (i, url) in options.seeds.iter().enumerate() {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| format!("seed {}: {e}", i + 1))?;
            let redis::ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
                return Err(format!(
                    "seed {}: only redis://host:port is supported in cluster mode",
                    i + 1
                ));
            };
            if i == 0 {
                auth = Auth {
                    username: info.redis_settings().username().map(String::from),
                    password: info.redis_settings().password().map(String::from),
                };
            }
            seeds.push(Addr {
                host: Arc::from(host),
                port,
            });
        }
        if let Some(password) = &options.password {
            auth.password = Some(password.clone());
        }
        let (events, events_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            prefix: Arc::from(options.prefix.as_str()),
            hash_tag_separator: options.hash_tag_separator,
            auth,
            seeds,
            map: RwLock::new(Arc::new(SlotMap::default())),
            publishers: Mutex::new(HashMap::new()),
            subscribe_up: AtomicBool::new(false),
            events,
            metrics: options.metrics,
            stop: CancellationToken::new(),
        });
        shared.refresh_up_metric();
        let (commands, rx) = mpsc::unbounded_channel();
        let manager = Manager::new(shared.clone(), node, options.unsubscribe_delay);
        tokio::spawn(manager.run(rx, events_rx));
        Ok(ClusterBroker { shared, commands })
    }
}

impl Drop for ClusterBroker {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Broker for ClusterBroker {
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture {
        let channel = self.shared.channel(topic);
        let slot = slot::key_slot(&channel);
        let map = self.shared.map();
        let Some((_, addr)) = map.owner(slot) else {
            return BrokerFuture::ready(Err(unavailable("no Redis Cluster shard owns the slot")));
        };
        let publisher = self.shared.publisher(addr);
        if !publisher.is_up() {
            return BrokerFuture::ready(Err(unavailable(
                "the Redis Cluster shard is not connected",
            )));
        }
        // Queued before returning: the call order is the order on the shard.
        let (ack, done) = oneshot::channel();
        publisher.send(publish::Job {
            channel,
            payload: envelope::encode(data, accepted_at),
            ack,
            redirects: 0,
        });
        reply::answer(done)
    }

    fn subscribe(&self, topics: Vec<Arc<str>>) -> BrokerFuture {
        if !self.shared.subscribe_up.load(Ordering::Acquire) {
            return BrokerFuture::ready(Err(unavailable(
                "the Redis Cluster is not fully connected",
            )));
        }
        reply::ask(&self.commands, |done| Command::Subscribe(topics, done))
    }

    fn release(&self, topics: Vec<Arc<str>>) {
        let _ = self.commands.send(Command::Release(topics));
    }

    fn is_ready(&self) -> bool {
        self.shared.is_ready()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(sep: Option<u8>) -> Shared {
        Shared {
            prefix: Arc::from("wsgate:"),
            hash_tag_separator: sep,
            auth: Auth::default(),
            seeds: Vec::new(),
            map: RwLock::new(Arc::new(SlotMap::default())),
            publishers: Mutex::new(HashMap::new()),
            subscribe_up: AtomicBool::new(false),
            events: mpsc::unbounded_channel().0,
            metrics: None,
            stop: CancellationToken::new(),
        }
    }

    #[test]
    fn channels_without_the_hash_tag_rule_are_as_in_single_mode() {
        let s = shared(None);
        assert_eq!(s.channel("room42.chat"), b"wsgate:room42.chat");
        assert_eq!(s.topic_of(b"wsgate:room42.chat").unwrap(), "room42.chat");
        assert_eq!(s.topic_of(b"other:x"), None);
    }

    #[test]
    fn the_hash_tag_rule_colocates_and_reverses() {
        let s = shared(Some(b'.'));
        let chat = s.channel("room42.chat");
        let typing = s.channel("room42.typing");
        assert_eq!(chat, b"wsgate:{room42}.chat");
        assert_eq!(slot::key_slot(&chat), slot::key_slot(&typing));
        assert_eq!(s.topic_of(&chat).unwrap(), "room42.chat");
        // No separator, or nothing before it: no tag.
        assert_eq!(s.channel("news"), b"wsgate:news");
        assert_eq!(s.channel(".x"), b"wsgate:.x");
        assert_eq!(s.topic_of(b"wsgate:news").unwrap(), "news");
        assert_eq!(s.topic_of(b"wsgate:{unclosed"), None);
    }
}
