//! The publishing side: one connection, one writer task, pipelined `PUBLISH`es.
//!
//! [`Publisher::publish`] puts the command on an ordered channel *before returning*,
//! which fixes the publication's place in the stream (the [`Broker::publish`]
//! contract); the writer task takes everything queued, sends it as one pipeline (one
//! round trip for the whole batch) and acknowledges each publication. While Redis is
//! unreachable, publishes fail at once with `unavailable` — never a false success.
//!
//! [`Broker::publish`]: wsgate_fanout::Broker::publish

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsgate_fanout::{BrokerError, BrokerFuture};

use crate::backoff::Backoff;
use crate::connect::{explain, Connector};
use crate::health::Health;
use crate::limits::{MAX_BATCH, RESPONSE_TIMEOUT};
use crate::reply::{self, unavailable, Reply};

struct Job {
    channel: Vec<u8>,
    payload: Vec<u8>,
    ack: Reply,
}

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
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(connector, rx, health.clone(), stop));
        Publisher { tx, health }
    }

    /// Queues `PUBLISH channel payload`; the order of calls is the order in Redis.
    pub(crate) fn publish(&self, channel: Vec<u8>, payload: Vec<u8>) -> BrokerFuture {
        if !self.health.publish_up() {
            return BrokerFuture::ready(Err(unavailable("redis is not connected")));
        }
        reply::ask(&self.tx, |ack| Job {
            channel,
            payload,
            ack,
        })
    }
}

/// Answers every queued job with `err` (the connection they were waiting for is gone).
fn fail_queued(rx: &mut mpsc::UnboundedReceiver<Job>, err: &BrokerError) {
    while let Ok(job) = rx.try_recv() {
        let _ = job.ack.send(Err(err.clone()));
    }
}

async fn writer(
    connector: Connector,
    mut rx: mpsc::UnboundedReceiver<Job>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut lost_before = false;
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
            let mut pipe = redis::pipe();
            for job in &batch {
                pipe.cmd("PUBLISH")
                    .arg(&job.channel)
                    .arg(&job.payload)
                    .ignore();
            }
            let result = pipe.exec_async(&mut conn).await;
            match result {
                Ok(()) => {
                    for job in batch.drain(..) {
                        let _ = job.ack.send(Ok(()));
                    }
                }
                Err(e) => {
                    // Some of the batch may have reached Redis; answering all of it
                    // `unavailable` can only be a false failure, never a false success.
                    health.set_publish_up(false);
                    health.error();
                    lost_before = true;
                    warn!(error = %e, "redis publish failed; reconnecting");
                    let err = unavailable(format!("redis: {e}"));
                    for job in batch.drain(..) {
                        let _ = job.ack.send(Err(err.clone()));
                    }
                    fail_queued(&mut rx, &err);
                    break;
                }
            }
        }
        debug!("redis publish connection lost");
    }
}
