//! Redis Cluster mode: sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`, Redis 7+) on the
//! redis crate's cluster client.
//!
//! Classic pub/sub on a Redis Cluster copies every `PUBLISH` to every node, so adding
//! shards adds no capacity. A shard channel lives on the primary that owns its hash
//! slot. The cluster client (RESP3) keeps one connection per node, routes every
//! command by slot, follows `MOVED`/`ASK`, re-reads its slot map after a redirect and
//! delivers shard-channel messages as pushes; TLS, passwords and ACL users come from
//! the same settings as single mode ([`crate::connect::cluster_client`]).
//!
//! What the client does not do, this module does:
//! - keep the node's own view of the slot map ([`topology`]) and probe every shard,
//!   for readiness, for the per-shard metrics, and to notice a failover;
//! - subscribe again what the cluster dropped: a slot that moved (the old owner pushes
//!   `sunsubscribe`), a primary replaced by its replica, a shard that was unreachable
//!   ([`subscribe`]);
//! - keep one publisher's order to one topic across pipelined publishes
//!   ([`publish`]).
//!
//! # Layout
//! - [`ClusterBroker`] (this file): the [`Broker`], the state the tasks share, and
//!   the writer's queue routing jobs by slot (which presence uses too).
//! - [`slot`]: CRC16 key slots and `{hash tag}`s.
//! - [`topology`]: the slot map and shard numbering.
//! - [`publish`]: the writer task: `SPUBLISH` in call order.
//! - [`subscribe`]: the manager task (interest and the control channel, batching per
//!   slot, probes, moving topics) and the reader task (pushes → node).
//!
//! Delivery is Redis pub/sub's, at most once; what a failover or a slot move can
//! lose or reorder is in docs/redis.md.

pub mod publish;
pub mod slot;
pub mod subscribe;
pub mod topology;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use wsgate_fanout::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, History, HistoryQuery, Position, StreamOptions,
};
use wsgate_metrics::Metrics;

use crate::channel::Channels;
use crate::connect::{cluster_client, ConnectError, TlsFiles};
use crate::envelope;
use crate::health::Health;
use crate::job;
use crate::presence::{self, Presence};
use crate::reply::{self, unavailable};
use crate::streams;
use subscribe::{Command, Manager};
use topology::SlotMap;

/// How to reach a Redis Cluster and name channels.
#[derive(Clone)]
pub struct ClusterOptions {
    /// Seed nodes, `redis://[user:password@]host:port` or `rediss://…` each; any one
    /// that answers is enough to learn the rest. The credentials of the first are used
    /// everywhere; all must use the same scheme.
    pub seeds: Vec<String>,
    /// A password that wins over the seed URL's (`--redis-password`, from a Secret).
    pub password: Option<String>,
    /// CA and client certificate for `rediss://`, as in single mode.
    pub tls: TlsFiles,
    /// Prepended to every topic to form its channel name.
    pub prefix: String,
    /// Grace period before giving a topic up in Redis.
    pub unsubscribe_delay: Duration,
    /// With `Some(b'.')`, topic `room42.chat` uses channel `<prefix>{room42}.chat`:
    /// topics with the same first segment share a hash slot, hence a shard.
    pub hash_tag_separator: Option<u8>,
    /// The node's metrics.
    pub metrics: Option<Metrics>,
    /// Install the stream function library on every primary whenever one is seen up
    /// (the node has streams); else only when a stream call finds it missing.
    pub install_functions: bool,
    /// Bound between a node's death and its presence entries leaving every list, as
    /// in single mode ([`crate::RedisOptions::presence_timeout`]).
    pub presence_timeout: Duration,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Seed URLs may hold a password: never print them.
        f.debug_struct("ClusterOptions")
            .field("seeds", &self.seeds.len())
            .field("prefix", &self.prefix)
            .field("unsubscribe_delay", &self.unsubscribe_delay)
            .field("presence_timeout", &self.presence_timeout)
            .finish_non_exhaustive()
    }
}

/// State the broker handle, the manager and the writer share.
pub(crate) struct Shared {
    pub channels: Channels,
    /// The node's view of the slot map; replaced whole by the manager.
    pub map: RwLock<Arc<SlotMap>>,
    pub health: Arc<Health>,
    /// Asks the manager to probe the cluster soon (a failed publish).
    pub probe: mpsc::UnboundedSender<()>,
    pub stop: CancellationToken,
}

impl Shared {
    pub(crate) fn map(&self) -> Arc<SlotMap> {
        self.map.read().expect("map lock").clone()
    }
}

/// The writer's queue: jobs routed by the slot of the key they touch.
pub(crate) struct Writer {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<publish::Job>,
}

impl crate::presence::Writer for Writer {
    /// Queued before returning: the call order is the order on the shard.
    fn queue(&self, key: &[u8], job: job::Job) -> Result<(), BrokerError> {
        let slot = slot::key_slot(key);
        let Some((shard, _)) = self.shared.map().owner(slot) else {
            return Err(unavailable("no Redis Cluster shard owns the slot"));
        };
        if !self.shared.health.shard_up(shard) {
            return Err(unavailable("the Redis Cluster shard is not connected"));
        }
        self.jobs
            .send(publish::Job { slot, job })
            .map_err(|_| BrokerError::Closed)
    }

    fn publish_command(&self) -> &'static str {
        "SPUBLISH"
    }
}

/// A [`Broker`] relaying through Redis Cluster sharded pub/sub.
pub struct ClusterBroker {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    writer: Arc<Writer>,
    presence: Arc<Presence>,
}

impl ClusterBroker {
    /// Starts the broker's tasks. The cluster need not be up: the manager keeps
    /// asking the seeds; until the slot map covers every slot and every shard
    /// answers, [`Broker::is_ready`] is false.
    ///
    /// # Errors
    /// When the options cannot work (no seed, an invalid URL, TLS files without
    /// `rediss://`, …): see [`cluster_client`].
    pub fn start(
        options: ClusterOptions,
        events: Arc<dyn BrokerEvents>,
    ) -> Result<Self, ConnectError> {
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let (client, target) = cluster_client(
            &options.seeds,
            options.password.as_deref(),
            &options.tls,
            push_tx,
        )?;
        let health = Arc::new(Health::new(options.metrics.clone()));
        let (probe, probe_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            channels: Channels::new(&options.prefix, options.hash_tag_separator),
            map: RwLock::new(Arc::new(SlotMap::default())),
            health,
            probe,
            stop: CancellationToken::new(),
        });
        let (commands, rx) = mpsc::unbounded_channel();
        let (jobs, jobs_rx) = mpsc::unbounded_channel();
        let mut manager = Manager::new(
            shared.clone(),
            events.clone(),
            target,
            options.unsubscribe_delay,
        );
        manager.install_functions = options.install_functions;
        tokio::spawn(manager.run(client, rx, push_rx, probe_rx, jobs_rx));
        let writer = Arc::new(Writer {
            shared: shared.clone(),
            jobs,
        });
        let presence = Presence::new(
            writer.clone(),
            shared.channels.clone(),
            events,
            shared.health.clone(),
            options.metrics,
            options.presence_timeout,
        );
        tokio::spawn(presence.clone().run(shared.stop.clone()));
        Ok(ClusterBroker {
            shared,
            commands,
            writer,
            presence,
        })
    }
}

impl ClusterBroker {
    /// Queues `job` for the primary of `topic`'s slot. Queued before returning: the
    /// call order is the order on the shard.
    fn queue(&self, topic: &str, job: job::Job) -> Result<(), BrokerError> {
        use crate::presence::Writer as _;
        self.writer.queue(&self.shared.channels.channel(topic), job)
    }
}

impl Drop for ClusterBroker {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Broker for ClusterBroker {
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture {
        let channel = self.shared.channels.channel(topic);
        let payload = envelope::encode(data, accepted_at);
        let (ack, done) = oneshot::channel();
        let job = job::Job {
            op: job::Op::Publish { channel, payload },
            ack: job::Ack::Done(ack),
            publication: true,
        };
        match self.queue(topic, job) {
            Ok(()) => reply::answer(done),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    fn publish_stream(
        &self,
        topic: &str,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
    ) -> BrokerFuture<Position> {
        let channel = self.shared.channels.channel(topic);
        let (job, rx) = job::Job::stream(streams::StreamPublication::new(
            channel,
            data,
            accepted_at,
            opts,
        ));
        match self.queue(topic, job) {
            Ok(()) => job::answer_with(rx, streams::parse_position),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    fn history(
        &self,
        topic: &str,
        opts: &StreamOptions,
        query: HistoryQuery,
    ) -> BrokerFuture<History> {
        let channel = self.shared.channels.channel(topic);
        let (job, rx) = job::Job::call(streams::history_cmd(&channel, opts, query));
        match self.queue(topic, job) {
            Ok(()) => job::answer_with(rx, streams::parse_history),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    fn subscribe(&self, topics: Vec<Arc<str>>) -> BrokerFuture {
        if !self.shared.health.subscribe_up() {
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
        self.shared.health.is_ready()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    presence::broker_presence_methods!();
}
