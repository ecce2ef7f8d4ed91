//! The Redis relay for wsgate: several nodes behind a load balancer act as one
//! service. Implements [`wsgate_fanout::Broker`].
//!
//! # Layout
//! - [`RedisBroker`] (this file): the single-Redis broker handle the gateway holds;
//!   wires the two halves below and presence.
//! - [`publisher`]: one connection and one writer task; `PUBLISH`es (and calls) are
//!   queued in call order and sent in pipelines, each acknowledged or failed
//!   `unavailable`.
//! - [`subscriber`]: the manager task owning the pub/sub connection's subscription
//!   state (the control channel, batched `SUBSCRIBE`, delayed `UNSUBSCRIBE`
//!   re-checked against the hub, resubscribe after reconnect) and the reader task
//!   that delivers into the hub without ever blocking.
//! - [`envelope`]: the payload formats of gateway publications (accept time + JSON)
//!   and of join/leave events, which no backend payload can be mistaken for.
//! - [`streams`]: streams (numbered, kept publications) in Redis, for both modes: the
//!   Redis Function library that numbers, keeps and relays in one step, the stream's
//!   keys, the relay message, the calls and their replies.
//! - [`connect`]: opening connections (URL, password, TLS, Sentinel, the cluster
//!   client), used by both modes: with Sentinel each (re)connect asks who the master
//!   is now.
//! - [`config`]: the `--redis-*` settings ([`RedisArgs`], a clap section the binary
//!   flattens), their checks, and the broker they start ([`BrokerSetup`]).
//! - [`cluster`]: Redis Cluster mode, [`ClusterBroker`]: sharded pub/sub
//!   (`SSUBSCRIBE`/`SPUBLISH`) on the redis crate's cluster client, following
//!   failovers and slot moves.
//!
//! Shared by both modes, one module each:
//! - [`channel`]: topic ↔ channel names (prefix, optional hash tag), and the control
//!   channel of server commands.
//! - [`limits`]: timeouts and batch sizes.
//! - `health`: which connections / shards are up, and the `wsgate_redis_*` metrics.
//! - `events`: the shared receive path: what arrives (publications, join/leave,
//!   server commands) is reported to the node ([`wsgate_fanout::BrokerEvents`]),
//!   which is also the truth for interest and presence.
//! - [`backoff`]: reconnect delays, exponential with jitter.
//! - `interest`: which topics are held and when a released one is given up, as pure
//!   state (unit-tested step by step).
//! - `reply`: how broker calls get their answers from the relay tasks.
//! - `job`: what the writers of both modes pipeline (publishes and function calls),
//!   with the reinstall-and-retry of a missing function library.
//! - `presence`: presence entries, join/leave, server commands (the control
//!   channel) and the node list in Redis: the keys, the membership task (heartbeat,
//!   lease, cleanup of dead nodes, resync) and the broker methods both modes
//!   delegate to, through the mode's ordered writer.
//!
//! Delivery is Redis pub/sub's: at most once. See docs/redis.md.

pub mod backoff;
pub mod channel;
pub mod cluster;
pub mod config;
pub mod connect;
pub mod envelope;
mod events;
mod health;
mod interest;
mod job;
pub mod limits;
mod presence;
mod publisher;
mod reply;
pub mod streams;
mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wsgate_fanout::{
    Broker, BrokerEvents, BrokerFuture, History, HistoryQuery, Position, StreamOptions,
};
use wsgate_metrics::Metrics;

pub use crate::channel::{Channels, DEFAULT_PREFIX};
pub use crate::cluster::{ClusterBroker, ClusterOptions};
pub use crate::config::{BrokerSetup, RedisArgs, RedisMode};
use crate::health::Health;
pub use crate::limits::{DEFAULT_STREAM_LINGER, DEFAULT_UNSUBSCRIBE_DELAY};
use crate::presence::Presence;
pub use crate::presence::DEFAULT_PRESENCE_TIMEOUT;

pub use crate::connect::{ConnectError, ConnectOptions, Connector, SentinelOptions, TlsFiles};

use crate::publisher::Publisher;
use crate::subscriber::{Command, Manager};

/// How to reach Redis and name channels.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Overrides the URL's password.
    pub password: Option<String>,
    /// CA and client certificate for `rediss://`.
    pub tls: TlsFiles,
    /// Find the master through Sentinel (see [`connect`]).
    pub sentinel: Option<SentinelOptions>,
    /// Prepended to every topic to form its channel name.
    pub prefix: String,
    /// Grace period before giving a topic up in Redis (see [`subscriber`]).
    pub unsubscribe_delay: Duration,
    /// The node's metrics, to feed `wsgate_redis_*`.
    pub metrics: Option<Metrics>,
    /// Install the stream function library on every (re)connect (the node has
    /// streams). Without it the library is installed when a stream call finds it
    /// missing, and a node without streams never loads it.
    pub install_functions: bool,
    /// Bound between a node's death and its presence entries leaving every list
    /// (docs/redis.md): heartbeats every sixth of it, a lease of half of it.
    pub presence_timeout: Duration,
    /// How long a pipeline with stream publications waits for more to share their
    /// function call, while they come in faster than this apart (zero: never).
    pub stream_linger: Duration,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("RedisOptions")
            .field("prefix", &self.prefix)
            .field("unsubscribe_delay", &self.unsubscribe_delay)
            .field("sentinel", &self.sentinel)
            .field("presence_timeout", &self.presence_timeout)
            .field("stream_linger", &self.stream_linger)
            .finish_non_exhaustive()
    }
}

impl RedisOptions {
    /// Options with the defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions {
            url: url.into(),
            password: None,
            tls: TlsFiles::default(),
            sentinel: None,
            prefix: DEFAULT_PREFIX.into(),
            unsubscribe_delay: DEFAULT_UNSUBSCRIBE_DELAY,
            metrics: None,
            install_functions: false,
            presence_timeout: DEFAULT_PRESENCE_TIMEOUT,
            stream_linger: DEFAULT_STREAM_LINGER,
        }
    }

    /// The connection part of these options.
    pub fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            url: self.url.clone(),
            password: self.password.clone(),
            tls: self.tls.clone(),
            sentinel: self.sentinel.clone(),
        }
    }
}

/// A [`Broker`] relaying through Redis pub/sub.
pub struct RedisBroker {
    channels: Channels,
    publisher: Arc<Publisher>,
    commands: mpsc::UnboundedSender<Command>,
    health: Arc<Health>,
    presence: Arc<Presence>,
    stop: CancellationToken,
}

impl RedisBroker {
    /// Starts the broker's tasks (on the current tokio runtime). Redis need not be up:
    /// the tasks connect in the background and keep retrying; until then
    /// [`Broker::is_ready`] is false and publishes and subscribes fail `unavailable`.
    ///
    /// # Errors
    /// When the connection options cannot work (see [`Connector::new`]).
    pub fn start(
        options: RedisOptions,
        events: Arc<dyn BrokerEvents>,
    ) -> Result<Self, ConnectError> {
        let connector = Connector::new(&options.connect_options())?;
        let stop = CancellationToken::new();
        let channels = Channels::new(&options.prefix, None);
        let health = Arc::new(Health::new(options.metrics.clone()));
        let publisher = Arc::new(Publisher::start(
            connector.clone(),
            health.clone(),
            options.install_functions,
            options.stream_linger,
            stop.clone(),
        ));
        let presence = Presence::new(
            publisher.clone(),
            channels.clone(),
            events.clone(),
            health.clone(),
            options.metrics,
            options.presence_timeout,
        );
        tokio::spawn(presence.clone().run(stop.clone()));
        let (commands, rx) = mpsc::unbounded_channel();
        let manager = Manager {
            connector,
            events,
            channels: channels.clone(),
            unsubscribe_delay: options.unsubscribe_delay,
            health: health.clone(),
            stop: stop.clone(),
        };
        tokio::spawn(manager.run(rx));
        Ok(RedisBroker {
            channels,
            publisher,
            commands,
            health,
            presence,
            stop,
        })
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Broker for RedisBroker {
    fn publish(&self, topic: &str, data: &[u8], accepted_at: u64) -> BrokerFuture {
        self.publisher.publish(
            self.channels.channel(topic),
            envelope::encode(data, accepted_at),
        )
    }

    fn publish_stream(
        &self,
        topic: &str,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
    ) -> BrokerFuture<Position> {
        let publication =
            streams::StreamPublication::new(self.channels.channel(topic), data, accepted_at, opts);
        let (job, rx) = job::Job::stream(publication);
        match presence::Writer::queue(&*self.publisher, &[], job) {
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
        let cmd = streams::history_cmd(&self.channels.channel(topic), opts, query);
        match self.publisher.call(cmd) {
            Ok(rx) => job::answer_with(rx, streams::parse_history),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    fn subscribe(&self, topics: Vec<Arc<str>>) -> BrokerFuture {
        if !self.health.subscribe_up() {
            return BrokerFuture::ready(Err(reply::unavailable("redis is not connected")));
        }
        reply::ask(&self.commands, |done| Command::Subscribe(topics, done))
    }

    fn release(&self, topics: Vec<Arc<str>>) {
        let _ = self.commands.send(Command::Release(topics));
    }

    fn is_ready(&self) -> bool {
        self.health.is_ready()
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    presence::broker_presence_methods!();
}
