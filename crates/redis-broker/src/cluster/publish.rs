//! Publishing to a cluster: one writer task, `SPUBLISH` (and stream function call)
//! pipelines through the cluster client, one in flight per slot.
//!
//! [`Broker::publish`] puts the publication on an ordered channel before returning.
//! The writer sorts what is queued by slot and sends each slot's publications as one
//! pipeline routed to the slot's primary, with at most one pipeline per slot in
//! flight: the next one for that slot leaves when the previous one is answered.
//! Pipelines of different slots run side by side.
//!
//! Why one per slot: the cluster client does not keep the order of commands issued
//! concurrently (its request set re-queues a request that yields, so a burst of a few
//! dozen can come out permuted; measured: message 28 of a stream overtaking 1–27).
//! Within one pipeline the order is kept, and a pipeline that gets `MOVED` (the slot
//! has moved) is re-sent whole to the new owner by the client, so one publisher's
//! messages to one topic (one slot) stay in order even through a move, while later
//! publications to that slot wait for it.
//!
//! Each publication is acknowledged when its primary accepted it; any failure (no
//! answer in time, a lost connection, an error reply after the client's retries)
//! answers `unavailable` — never a false success.
//!
//! [`Broker::publish`]: wsgate_fanout::Broker::publish

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use tokio::sync::mpsc;
use tracing::debug;

use redis::Value;

use crate::cluster::Shared;
use crate::job::{self, Target};
use crate::limits::MAX_BATCH;
use crate::streams;

/// One publication (or stream function call) on its way to its slot.
pub(crate) struct Job {
    pub slot: u16,
    pub job: job::Job,
}

/// One slot's primary, as a [`Target`] of pipelines.
struct Slot {
    conn: ClusterConnection,
    slot: u16,
}

impl Target for Slot {
    fn send(
        &mut self,
        pipe: redis::Pipeline,
        n: usize,
    ) -> impl std::future::Future<Output = redis::RedisResult<Vec<Value>>> + Send + '_ {
        self.conn.route_pipeline(pipe, 0, n, route(self.slot))
    }

    fn install(&mut self) -> impl std::future::Future<Output = redis::RedisResult<()>> + Send + '_ {
        install_on(&mut self.conn, self.slot)
    }
}

/// `FUNCTION LOAD REPLACE` of the stream library on every primary.
pub(crate) async fn install_all(conn: &mut ClusterConnection) -> redis::RedisResult<()> {
    let all = RoutingInfo::MultiNode((
        MultipleNodeRoutingInfo::AllMasters,
        Some(ResponsePolicy::AllSucceeded),
    ));
    conn.route_command(streams::load_cmd(true), all)
        .await
        .map(|_| ())
}

/// `FUNCTION LOAD REPLACE` of the stream library on the primary of `slot`.
pub(crate) async fn install_on(conn: &mut ClusterConnection, slot: u16) -> redis::RedisResult<()> {
    conn.route_command(
        streams::load_cmd(true),
        RoutingInfo::SingleNode(route(slot)),
    )
    .await
    .map(|_| ())
}

fn route(slot: u16) -> SingleNodeRoutingInfo {
    SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master))
}

/// `SPUBLISH channel payload` to the primary of `slot`.
pub(crate) fn spublish(slot: u16, channel: &[u8], payload: &[u8]) -> (redis::Cmd, RoutingInfo) {
    let mut cmd = redis::cmd("SPUBLISH");
    cmd.arg(channel).arg(payload);
    (cmd, RoutingInfo::SingleNode(route(slot)))
}

/// Runs until `stop` or until every sender is gone.
pub(crate) async fn writer(
    conn: ClusterConnection,
    mut rx: mpsc::UnboundedReceiver<Job>,
    shared: Arc<Shared>,
) {
    // Per slot, publications waiting for the slot's pipeline in flight.
    let mut queued: HashMap<u16, VecDeque<Job>> = HashMap::new();
    let mut busy: HashSet<u16> = HashSet::new();
    let mut in_flight = FuturesUnordered::new();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut ready: Vec<u16> = Vec::new();
    let stop = shared.stop.clone();
    loop {
        // Start a pipeline for every slot that has publications and none in flight.
        for slot in ready.drain(..) {
            if busy.contains(&slot) {
                continue;
            }
            let Some(q) = queued.get_mut(&slot) else {
                continue;
            };
            let jobs: Vec<Job> = q.drain(..q.len().min(MAX_BATCH)).collect();
            if q.is_empty() {
                queued.remove(&slot);
            }
            if jobs.is_empty() {
                continue;
            }
            busy.insert(slot);
            let mut target = Slot {
                conn: conn.clone(),
                slot,
            };
            in_flight.push(async move {
                let jobs: Vec<job::Job> = jobs.into_iter().map(|j| j.job).collect();
                let outcome = job::run(&mut target, jobs, "SPUBLISH").await;
                (slot, outcome)
            });
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            Some((slot, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                busy.remove(&slot);
                if queued.contains_key(&slot) {
                    ready.push(slot);
                }
                count(&shared, slot, &outcome);
            }
            n = rx.recv_many(&mut batch, MAX_BATCH) => {
                if n == 0 {
                    return; // every sender is gone
                }
                for job in batch.drain(..) {
                    let slot = job.slot;
                    queued.entry(slot).or_default().push_back(job);
                    if !busy.contains(&slot) {
                        ready.push(slot);
                    }
                }
            }
        }
    }
}

/// Counts what one pipeline did (every command was answered by [`job::run`]).
fn count(shared: &Shared, slot: u16, outcome: &job::Outcome) {
    if outcome.refused > 0 {
        shared.health.error();
    }
    if let Some(e) = &outcome.failed {
        debug!(slot, error = %e, "SPUBLISH pipeline failed");
        shared.health.error();
        let _ = shared.probe.send(());
    }
    if outcome.published > 0 {
        if let Some((i, _)) = shared.map().owner(slot) {
            shared.health.shard_published(i, outcome.published);
        }
    }
}
