//! The receiving side: which channels this node holds in Redis, and the reader that
//! hands what arrives to the hub.
//!
//! One task, the *manager*, owns the pub/sub connection's subscription state; every
//! change goes through it, in order, so racing subscribes and releases of one topic
//! cannot leave the hub and Redis disagreeing:
//! - `Subscribe` requests that arrive together become one `SUBSCRIBE` (batching);
//!   each request resolves when Redis has confirmed its topics (at once if they
//!   already are).
//! - `Release` schedules an `UNSUBSCRIBE` after [`RedisOptions::unsubscribe_delay`];
//!   when it is due the node is asked again and the topic is kept if a subscriber came
//!   back (flapping clients cause no Redis traffic).
//!
//! Those rules are pure state, in [`crate::interest`]; this module does the I/O.
//! - Every connection subscribes the control channel ([`Channels::control`]) before
//!   the topics, so the connection is up only with it.
//! - On a lost connection it reconnects with backoff and resubscribes every topic the
//!   node has, so local clients never notice more than the gap; once confirmed it tells
//!   the node ([`BrokerEvents::resubscribed`]), which repairs its streams' gap from
//!   history.
//!
//! A second task, the *reader*, only decodes and delivers: handing a publication to
//! the node is a non-blocking enqueue into each subscriber's byte-bounded outbox, so the reader
//! never waits on a slow client, the connection is drained as fast as Redis writes,
//! and Redis never sees a growing output buffer (`client-output-buffer-limit pubsub`).
//! One reader per connection delivers in arrival order, so each topic's order holds.
//!
//! [`RedisOptions::unsubscribe_delay`]: crate::RedisOptions::unsubscribe_delay

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsgate_fanout::BrokerEvents;

use crate::backoff::Backoff;
use crate::channel::Channels;
use crate::connect::{explain, Connector};
use crate::events::deliver;
use crate::health::Health;
use crate::interest::{Batch, Interest};
use crate::limits::{CHUNK, CONFIRM_TIMEOUT, KEEPALIVE};
use crate::reply::{unavailable, Reply};

pub(crate) enum Command {
    Subscribe(Vec<Arc<str>>, Reply),
    Release(Vec<Arc<str>>),
}

/// What the manager needs to know, fixed at start.
pub(crate) struct Manager {
    pub connector: Connector,
    pub events: Arc<dyn BrokerEvents>,
    pub channels: Channels,
    pub unsubscribe_delay: Duration,
    /// Up while the pub/sub connection is up and resubscribed.
    pub health: Arc<Health>,
    pub stop: CancellationToken,
}

/// Why serving a connection ended.
enum Lost {
    Stop,
    Connection(String),
}

impl Manager {
    fn channel(&self, topic: &str) -> Vec<u8> {
        self.channels.channel(topic)
    }

    /// Runs until `stop`: connect, resubscribe, serve; again after a loss.
    pub(crate) async fn run(self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = Backoff::default();
        let mut lost_before = false;
        let mut interest = Interest::new(self.unsubscribe_delay);
        loop {
            // Ends this connection's reader, whichever side notices the loss first:
            // an old reader must never deliver next to a new one.
            let connection = CancellationToken::new();
            let attempt = tokio::select! {
                _ = self.stop.cancelled() => return,
                r = self.connect_and_resubscribe(&connection) => r,
            };
            let lost = match attempt {
                Ok((sink, confirmed)) => {
                    backoff.reset();
                    self.health.set_subscribe_up(true);
                    if lost_before {
                        self.health.reconnected(None);
                        self.health.resubscribed(None, confirmed.len());
                    }
                    info!(
                        topics = confirmed.len(),
                        redis = self.connector.target(),
                        "redis subscriptions up"
                    );
                    // Confirmed again after a loss: what was published meanwhile was
                    // missed, and the node catches its streams up from history.
                    let again: Vec<Arc<str>> = if lost_before {
                        confirmed.iter().cloned().collect()
                    } else {
                        Vec::new()
                    };
                    interest.reconnected(confirmed);
                    if !again.is_empty() {
                        self.events.resubscribed(&again);
                    }
                    let lost = self.serve(&mut rx, sink, &mut interest, &connection).await;
                    self.health.set_subscribe_up(false);
                    lost
                }
                Err(e) => Lost::Connection(e),
            };
            if matches!(lost, Lost::Connection(_)) {
                self.health.error();
                lost_before = true;
            }
            connection.cancel();
            let Lost::Connection(why) = lost else { return };
            // Until the next connection, subscribes cannot be made active.
            let delay = backoff.next_delay();
            warn!(error = %why, redis = self.connector.target(), retry_in = ?delay, "redis subscriptions down");
            let until = Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep_until(until) => break,
                    cmd = rx.recv() => match cmd {
                        None => return,
                        Some(Command::Subscribe(_, done)) => {
                            let _ = done.send(Err(unavailable("redis is not connected")));
                        }
                        // The hub already forgot them; the next resubscribe follows it.
                        Some(Command::Release(_)) => {}
                    },
                }
            }
        }
    }

    /// Opens the pub/sub connection, starts its reader and subscribes every topic the
    /// hub has. Topics added to the hub meanwhile come as `Subscribe` commands, which
    /// wait in the channel and are served next.
    async fn connect_and_resubscribe(
        &self,
        connection: &CancellationToken,
    ) -> Result<(redis::aio::PubSubSink, HashSet<Arc<str>>), String> {
        let pubsub = self.connector.pubsub().await.map_err(|e| explain(&e))?;
        let (mut sink, stream) = pubsub.split();
        tokio::spawn(read(
            stream,
            self.events.clone(),
            self.channels.clone(),
            connection.clone(),
            self.stop.clone(),
        ));
        // The control channel first: every node hears server commands whenever its
        // subscriptions are up (it is never released).
        confirm(sink.subscribe(self.channels.control())).await?;
        let topics = self.events.topics();
        let mut confirmed = HashSet::with_capacity(topics.len());
        for chunk in topics.chunks(CHUNK) {
            let channels: Vec<Vec<u8>> = chunk.iter().map(|t| self.channel(t)).collect();
            confirm(sink.subscribe(&channels)).await?;
            confirmed.extend(chunk.iter().cloned());
        }
        Ok((sink, confirmed))
    }

    /// Serves commands and due unsubscribes on one connection until it is lost.
    async fn serve(
        &self,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        mut sink: redis::aio::PubSubSink,
        interest: &mut Interest,
        connection: &CancellationToken,
    ) -> Lost {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keepalive.reset();
        loop {
            let next = interest.releases.next_at();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Lost::Stop,
                _ = connection.cancelled() => {
                    return Lost::Connection("pub/sub connection closed".into());
                }
                cmd = rx.recv() => {
                    let Some(first) = cmd else { return Lost::Stop };
                    // Everything already waiting joins this batch: one SUBSCRIBE.
                    let mut batch = Batch::default();
                    let mut waiters = Vec::new();
                    let mut cmd = Some(first);
                    while let Some(c) = cmd.take().or_else(|| rx.try_recv().ok()) {
                        match c {
                            Command::Subscribe(topics, done) => {
                                interest.want(topics, &mut batch);
                                waiters.push(done);
                            }
                            Command::Release(topics) => {
                                interest.releases.schedule(topics, Instant::now());
                            }
                        }
                        if batch.topics.len() >= CHUNK {
                            break;
                        }
                    }
                    if !batch.topics.is_empty() {
                        let channels: Vec<Vec<u8>> =
                            batch.topics.iter().map(|t| self.channel(t)).collect();
                        if let Err(e) = confirm(sink.subscribe(&channels)).await {
                            for w in waiters {
                                let _ = w.send(Err(unavailable(format!("redis: {e}"))));
                            }
                            return Lost::Connection(e);
                        }
                        debug!(count = batch.topics.len(), "subscribed");
                        interest.confirmed(batch.topics);
                    }
                    for w in waiters {
                        let _ = w.send(Ok(()));
                    }
                }
                _ = keepalive.tick() => {
                    // In subscribed mode the reply is `["pong", ""]`, not `PONG`: any reply will do.
                    let ping = async { sink.ping::<redis::Value>().await.map(|_| ()) };
                    if let Err(e) = confirm(ping).await {
                        return Lost::Connection(format!("keepalive: {e}"));
                    }
                }
                _ = sleep_until_opt(next), if next.is_some() => {
                    // The node is the truth: a subscriber that came back keeps it.
                    let gone = interest.due(Instant::now(), |t| self.events.has_subscribers(t));
                    for chunk in gone.chunks(CHUNK) {
                        let channels: Vec<Vec<u8>> = chunk.iter().map(|t| self.channel(t)).collect();
                        if let Err(e) = confirm(sink.unsubscribe(&channels)).await {
                            return Lost::Connection(e);
                        }
                        interest.unsubscribed(chunk);
                        debug!(count = chunk.len(), "unsubscribed");
                    }
                }
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Awaits a Redis confirmation, bounded in time.
async fn confirm(
    fut: impl std::future::Future<Output = redis::RedisResult<()>>,
) -> Result<(), String> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("redis did not confirm in time".into()),
    }
}

/// The reader: decode, deliver. Never awaits anything but the next message.
async fn read(
    mut stream: redis::aio::PubSubStream,
    events: Arc<dyn BrokerEvents>,
    channels: Channels,
    connection: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = connection.cancelled() => break,
            m = stream.next() => match m { Some(m) => m, None => break },
        };
        deliver(
            &*events,
            &channels,
            msg.get_channel_name().as_bytes(),
            msg.get_payload_bytes(),
        );
    }
    connection.cancel();
}
