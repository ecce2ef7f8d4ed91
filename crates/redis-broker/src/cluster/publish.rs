//! Publishing to a cluster: one writer task per primary, `SPUBLISH` pipelines.
//!
//! Like the single-Redis publisher: a publication is queued on its shard's ordered
//! channel before [`Broker::publish`] returns, the writer sends everything queued as
//! one pipeline and reads one reply per publication, in order. What is new is that
//! each reply is looked at alone: `MOVED`/`ASK` (the slot has moved: resharding or a
//! failover) hands that publication to the writer of the node the reply names, and
//! asks the manager to re-read the slot map. A publication is redirected at most
//! [`MAX_REDIRECTS`] times, then fails `unavailable`; any other error reply, or a lost
//! connection, fails it `unavailable` too — never a false success.
//!
//! [`Broker::publish`]: wsgate_fanout::Broker::publish

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use wsgate_fanout::BrokerError;

use crate::backoff::Backoff;
use crate::cluster::resp::{self, Value};
use crate::cluster::topology::Addr;
use crate::cluster::Shared;
use crate::reply::{unavailable, Reply};

/// Most publications in one pipeline.
const MAX_BATCH: usize = 1024;
/// A pipeline whose replies do not all arrive within this long: connection lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirections one publication may follow (a slot moves once; a few allow for a
/// move racing a failover).
pub const MAX_REDIRECTS: u8 = 3;

/// One publication on its way.
pub(crate) struct Job {
    pub channel: Vec<u8>,
    pub payload: Vec<u8>,
    pub ack: Reply,
    pub redirects: u8,
}

/// A primary's writer, as the router sees it.
#[derive(Clone)]
pub(crate) struct PubHandle {
    tx: mpsc::UnboundedSender<Job>,
    up: Arc<AtomicBool>,
}

impl PubHandle {
    pub(crate) fn start(addr: Addr, shared: Arc<Shared>) -> PubHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(false));
        tokio::spawn(writer(addr, rx, up.clone(), shared));
        PubHandle { tx, up }
    }

    /// Whether the writer holds a working connection.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Queues a job (in call order); a writer that has ended answers `unavailable`.
    pub(crate) fn send(&self, job: Job) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            let _ = job
                .ack
                .send(Err(unavailable("the shard's writer has stopped")));
        }
    }
}

fn fail_queued(rx: &mut mpsc::UnboundedReceiver<Job>, err: &BrokerError) {
    while let Ok(job) = rx.try_recv() {
        let _ = job.ack.send(Err(err.clone()));
    }
}

/// `MOVED <slot> <host:port>` / `ASK <slot> <host:port>` → the node to try.
fn redirect_target(error: &str) -> Option<Addr> {
    let mut parts = error.split_whitespace();
    match parts.next()? {
        "MOVED" | "ASK" => {
            parts.next()?;
            Addr::parse(parts.next()?)
        }
        _ => None,
    }
}

fn shard_label(shared: &Shared, addr: &Addr) -> Option<String> {
    shared.map().shard_of(addr).map(|i| i.to_string())
}

async fn writer(
    addr: Addr,
    mut rx: mpsc::UnboundedReceiver<Job>,
    up: Arc<AtomicBool>,
    shared: Arc<Shared>,
) {
    let mut backoff = Backoff::default();
    let stop = shared.stop.clone();
    loop {
        let (mut reader, mut w) = tokio::select! {
            _ = stop.cancelled() => return,
            r = resp::open(&addr.host, addr.port, &shared.auth) => match r {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    debug!(%addr, error = %e, retry_in = ?delay, "cluster publish connection failed");
                    fail_queued(&mut rx, &unavailable(format!("redis {addr}: {e}")));
                    if rx.is_closed() {
                        // No longer a primary anyone routes to.
                        return;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            },
        };
        backoff.reset();
        up.store(true, Ordering::Release);
        shared.refresh_up_metric();
        info!(%addr, "cluster publish connection up");
        let mut batch: Vec<Job> = Vec::new();
        let mut bytes = Vec::new();
        let lost = loop {
            // Everything queued so far, up to MAX_BATCH, in one go (cancel safe).
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                n = rx.recv_many(&mut batch, MAX_BATCH) => n,
            };
            if received == 0 {
                return; // every sender is gone
            }
            bytes.clear();
            for job in &batch {
                resp::encode(
                    &mut bytes,
                    &[b"SPUBLISH".as_slice(), &job.channel, &job.payload],
                );
            }
            let exchange = async {
                w.send(&bytes).await?;
                let mut replies = Vec::with_capacity(batch.len());
                for _ in 0..batch.len() {
                    replies.push(reader.next().await?);
                }
                Ok::<_, std::io::Error>(replies)
            };
            let replies = match tokio::time::timeout(RESPONSE_TIMEOUT, exchange).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => break e.to_string(),
                Err(_) => break "no reply in time".to_string(),
            };
            let mut accepted = 0u64;
            for (job, reply) in batch.drain(..).zip(replies) {
                match reply {
                    Value::Error(e) => {
                        let target = redirect_target(&e);
                        if target.is_some() {
                            if let Some(m) = &shared.metrics {
                                m.redis_cluster_redirects.inc();
                            }
                            shared.request_refresh();
                        }
                        match target {
                            Some(to) if job.redirects < MAX_REDIRECTS => {
                                // Queued at the new owner behind nothing of this
                                // topic's: later publications of this pipeline to the
                                // same slot got the same reply and follow in order.
                                let job = Job {
                                    redirects: job.redirects + 1,
                                    ..job
                                };
                                shared.publisher(&to).send(job);
                            }
                            _ => {
                                if let Some(m) = &shared.metrics {
                                    m.redis_errors.inc();
                                }
                                let _ = job.ack.send(Err(unavailable(format!("redis: {e}"))));
                            }
                        }
                    }
                    _ => {
                        accepted += 1;
                        let _ = job.ack.send(Ok(()));
                    }
                }
            }
            if accepted > 0 {
                if let (Some(m), Some(shard)) = (&shared.metrics, shard_label(&shared, &addr)) {
                    m.redis_shard_publishes
                        .with_label_values(&[&shard])
                        .inc_by(accepted);
                }
            }
        };
        // Some of the batch may have reached Redis: failing all of it can only be a
        // false failure, never a false success.
        up.store(false, Ordering::Release);
        shared.refresh_up_metric();
        if let Some(m) = &shared.metrics {
            m.redis_errors.inc();
        }
        warn!(%addr, error = %lost, "cluster publish connection lost; reconnecting");
        let err = unavailable(format!("redis {addr}: {lost}"));
        for job in batch.drain(..) {
            let _ = job.ack.send(Err(err.clone()));
        }
        fail_queued(&mut rx, &err);
        shared.request_refresh();
        if rx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_redirect_targets() {
        assert_eq!(
            redirect_target("MOVED 3999 127.0.0.1:6381").map(|a| a.to_string()),
            Some("127.0.0.1:6381".into())
        );
        assert_eq!(
            redirect_target("ASK 1 10.0.0.2:7000").map(|a| a.port),
            Some(7000)
        );
        assert!(redirect_target("TRYAGAIN Multiple keys").is_none());
        assert!(redirect_target("CLUSTERDOWN The cluster is down").is_none());
    }
}
