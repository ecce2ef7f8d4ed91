//! The publishing side: one connection, one writer task, pipelined `PUBLISH`es,
//! stream function calls and presence commands (it is presence's [`Writer`]).
//!
//! [`Publisher::publish`] (and [`Publisher::call`]) puts the command on an ordered
//! channel *before returning*,
//! which fixes the publication's place in the stream (the [`Broker::publish`]
//! contract); the writer task takes everything queued, sends it as one pipeline (one
//! round trip for the whole batch) and acknowledges each publication. While Redis is
//! unreachable, publishes fail at once with `unavailable` — never a false success.
//!
//! Stream publications cost Redis a function call each, so when they come in closer
//! together than the stream linger (`--redis-stream-linger`), a pipeline holding one
//! waits up to that long for more to join it: consecutive ones then share one
//! `wsgate_gateway_publish_many` call ([`job::run`]). Below that rate nothing waits.
//!
//! [`Broker::publish`]: wsgate_fanout::Broker::publish

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsgate_fanout::{BrokerError, BrokerFuture};

use crate::backoff::Backoff;
use crate::connect::{explain, Connector};
use crate::health::Health;
use crate::job::{self, Job, Op, Target};
use crate::limits::{MAX_BATCH, RESPONSE_TIMEOUT};
use crate::presence::Writer;
use crate::reply::{self, unavailable};
use crate::streams;

/// Handle used by the broker; the writer task owns the connection.
pub(crate) struct Publisher {
    tx: mpsc::UnboundedSender<Job>,
    /// Whether the writer holds a working connection (checked before queueing, so an
    /// outage answers `unavailable` without waiting).
    health: Arc<Health>,
}

impl Publisher {
    /// Starts the writer task.
    pub(crate) fn start(
        connector: Connector,
        health: Arc<Health>,
        install: bool,
        linger: Duration,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(connector, rx, health.clone(), install, linger, stop));
        Publisher { tx, health }
    }

    /// Queues `PUBLISH channel payload`; the order of calls is the order in Redis.
    pub(crate) fn publish(&self, channel: Vec<u8>, payload: Vec<u8>) -> BrokerFuture {
        if !self.health.publish_up() {
            return BrokerFuture::ready(Err(unavailable("redis is not connected")));
        }
        reply::ask(&self.tx, |ack| Job {
            op: Op::Publish { channel, payload },
            ack: job::Ack::Done(ack),
            publication: true,
        })
    }

    /// Queues a call (in order with the publishes); its reply.
    pub(crate) fn call(
        &self,
        cmd: redis::Cmd,
    ) -> Result<oneshot::Receiver<Result<redis::Value, BrokerError>>, BrokerError> {
        let (job, rx) = Job::call(cmd);
        self.queue(&[], job)?;
        Ok(rx)
    }
}

impl Writer for Publisher {
    /// One Redis holds every key: `key` does not matter.
    fn queue(&self, _key: &[u8], job: Job) -> Result<(), BrokerError> {
        if !self.health.publish_up() {
            return Err(unavailable("redis is not connected"));
        }
        self.tx.send(job).map_err(|_| BrokerError::Closed)
    }

    fn publish_command(&self) -> &'static str {
        "PUBLISH"
    }
}

/// The publish connection, as a [`Target`] of pipelines.
struct Single<'a>(&'a mut redis::aio::MultiplexedConnection);

impl Target for Single<'_> {
    fn send(
        &mut self,
        pipe: redis::Pipeline,
        n: usize,
    ) -> impl std::future::Future<Output = redis::RedisResult<Vec<redis::Value>>> + Send + '_ {
        use redis::aio::ConnectionLike;
        async move { self.0.req_packed_commands(&pipe, 0, n).await }
    }

    #[allow(clippy::manual_async_fn)] // the trait names the future's bounds
    fn install(&mut self) -> impl std::future::Future<Output = redis::RedisResult<()>> + Send + '_ {
        async move { streams::load_cmd(false).exec_async(self.0).await }
    }
}

/// Answers every queued job with `err` (the connection they were waiting for is gone).
fn fail_queued(rx: &mut mpsc::UnboundedReceiver<Job>, err: &BrokerError) {
    while let Ok(job) = rx.try_recv() {
        job.fail(err.clone());
    }
}

/// Most stream publications a lingering pipeline waits for (one full call).
const LINGER_UNTIL: usize = 256;

/// After a linger that gathered nothing, this many busy pipelines go without one (a
/// lone publisher awaiting each publication gains nothing from waiting).
const LINGER_BACKOFF: u32 = 15;

/// When the last stream publications were taken; whether the next ones linger.
struct Linger {
    wait: Duration,
    last: Option<Instant>,
    skip: u32,
}

impl Linger {
    /// Adds to `batch` what comes within the linger, if `batch` holds a stream
    /// publication and the previous ones came less than the linger before it: a busy
    /// node, whose stream publications then share calls (unless the last linger
    /// gathered nothing: then the next [`LINGER_BACKOFF`] go at once). `false`: stop
    /// now.
    async fn collect(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Job>,
        batch: &mut Vec<Job>,
        stop: &CancellationToken,
    ) -> bool {
        if self.wait.is_zero() || !batch.iter().any(|j| matches!(j.op, Op::Stream(_))) {
            return true;
        }
        let now = Instant::now();
        let busy = self.last.is_some_and(|t| now.duration_since(t) < self.wait);
        if busy && self.skip > 0 {
            self.skip -= 1;
        } else if busy {
            let before = batch.len();
            let until = tokio::time::sleep_until(now + self.wait);
            tokio::pin!(until);
            while batch.len() < LINGER_UNTIL {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = &mut until => break,
                    n = rx.recv_many(batch, MAX_BATCH - batch.len()) => if n == 0 { break },
                }
            }
            if batch.len() == before {
                self.skip = LINGER_BACKOFF;
            }
        }
        self.last = Some(Instant::now());
        true
    }
}

async fn writer(
    connector: Connector,
    mut rx: mpsc::UnboundedReceiver<Job>,
    health: Arc<Health>,
    install: bool,
    linger: Duration,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut lost_before = false;
    let mut linger = Linger {
        wait: linger,
        last: None,
        skip: 0,
    };
    loop {
        let mut conn = tokio::select! {
            _ = stop.cancelled() => return,
            r = connector.multiplexed(RESPONSE_TIMEOUT) => match r {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    let target = connector.target();
                    warn!(error = %explain(&e), redis = target, retry_in = ?delay, "redis publish connection failed");
                    fail_queued(&mut rx, &unavailable(format!("redis: {e}")));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff.reset();
        // A Redis restarted without persistence, or flushed, has lost its functions:
        // (re)install them on every connect. Plain pub/sub works without them.
        if install {
            if let Err(e) = Single(&mut conn).install().await {
                warn!(error = %e, "could not install the stream functions (FUNCTION LOAD); streams will not work");
            }
        }
        health.set_publish_up(true);
        if lost_before {
            health.reconnected(None);
        }
        info!(redis = connector.target(), "redis publish connection up");
        let mut batch = Vec::new();
        loop {
            // Everything queued so far, up to MAX_BATCH, in one go (cancel safe).
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            };
            if received == 0 {
                return; // every sender is gone
            }
            if !linger.collect(&mut rx, &mut batch, &stop).await {
                return;
            }
            let outcome = job::run(
                &mut Single(&mut conn),
                std::mem::take(&mut batch),
                "PUBLISH",
            )
            .await;
            if outcome.refused > 0 {
                health.error();
            }
            if let Some(e) = outcome.failed {
                health.set_publish_up(false);
                health.error();
                lost_before = true;
                warn!(error = %e, "redis publish failed; reconnecting");
                fail_queued(&mut rx, &unavailable(format!("redis: {e}")));
                break;
            }
        }
        debug!("redis publish connection lost");
    }
}
