//! Rebalancing (docs/operations.md, "Rebalancing after a scale-out"): a node holding
//! more than its share of the fleet's connections sheds the excess, paced, by closing
//! randomly chosen sessions with 1012 so that their clients reconnect elsewhere (a load
//! balancer sends them to the emptier nodes).
//!
//! - [`plan`]: from the node list, each node's share and what it should shed.
//! - `POST /api/rebalance` ([`crate::server_api::rebalance`]) answers with the plan and,
//!   unless it is a dry run, sends it to every node; each sheds its own part.
//! - [`run_auto`]: with `--rebalance-auto`, the node checks the fleet every sixth of
//!   the presence timeout (when the node list is refreshed) and sheds its own excess.
//!
//! One shedding at a time per node; it stops early once the node is no longer over
//! its share (re-checked as it goes), and never runs while the node drains.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use serde::Serialize;
use tracing::{debug, info};
use wsgate_fanout::NodeInfo;

use crate::close::Disconnect;
use crate::gateway::Gateway;

/// What started a shedding (the `trigger` label of `wsgate_rebalance_runs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `POST /api/rebalance`.
    Api,
    /// The node's own check (`--rebalance-auto`).
    Auto,
}

impl Trigger {
    fn label(self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Auto => "auto",
        }
    }
}

/// One node's line of the plan (and of `POST /api/rebalance`'s answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Planned {
    pub node: String,
    pub connections: u64,
    /// The node's fair share of the fleet's connections (rounded up); 0 for a
    /// draining node, which is leaving.
    pub share: u64,
    /// Connections it will shed: down to its share, when it holds more than its share
    /// plus the margin; else 0.
    pub shed: u64,
}

/// Each node's share and what it should shed, sorted by node. The share is the
/// connections of the live, non-draining nodes shared out among them by capacity
/// (`--max-connections`), or evenly when some node does not say its capacity (an
/// older version). A node over `share × (1 + margin)` sheds down to its share.
pub fn plan(nodes: &[NodeInfo], margin: f64) -> Vec<Planned> {
    let serving: Vec<&NodeInfo> = nodes.iter().filter(|n| !n.draining).collect();
    let total: u64 = serving.iter().map(|n| n.connections).sum();
    let weighted = serving.iter().all(|n| n.capacity > 0);
    let weights: u64 = if weighted {
        serving.iter().map(|n| n.capacity).sum()
    } else {
        serving.len() as u64
    };
    let mut out: Vec<Planned> = nodes
        .iter()
        .map(|n| {
            let (share, shed) = if n.draining || weights == 0 {
                (0, 0)
            } else {
                let weight = if weighted { n.capacity } else { 1 };
                let fair = total as f64 * weight as f64 / weights as f64;
                let share = fair.ceil() as u64;
                let over = n.connections as f64 > fair * (1.0 + margin);
                (
                    share,
                    if over {
                        n.connections.saturating_sub(share)
                    } else {
                        0
                    },
                )
            };
            Planned {
                node: n.node.clone(),
                connections: n.connections,
                share,
                shed,
            }
        })
        .collect();
    out.sort_by(|a, b| a.node.cmp(&b.node));
    out
}

/// A node's rebalancing state: whether it is shedding.
#[derive(Debug, Default)]
pub(crate) struct State {
    shedding: AtomicBool,
}

/// Clears the shedding flag when a shedding ends, however it ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// This node's line of a fresh plan (its share and its excess) and the connections of
/// the serving nodes in all, or `None` when the node list is unavailable or does not
/// list this node.
async fn own_line(gw: &Gateway) -> Option<(Planned, u64)> {
    let nodes = match gw.node.nodes().await {
        Ok(n) => n,
        Err(e) => {
            debug!(error = %e, "rebalance: no node list");
            return None;
        }
    };
    let total = nodes
        .iter()
        .filter(|n| !n.draining)
        .map(|n| n.connections)
        .sum();
    let line = plan(&nodes, gw.config.rebalance_margin)
        .into_iter()
        .find(|p| p.node == gw.node_id)?;
    Some((line, total))
}

/// Starts shedding `count` connections in the background, unless the node is draining
/// or already shedding. Whether it started.
pub(crate) fn start(gw: &Arc<Gateway>, count: u64, trigger: Trigger) -> bool {
    if count == 0 || gw.is_draining() {
        return false;
    }
    if gw.rebalance.shedding.swap(true, Ordering::SeqCst) {
        debug!(trigger = trigger.label(), "rebalance: already shedding");
        return false;
    }
    let gw = gw.clone();
    tokio::spawn(async move {
        let _running = Running(&gw.rebalance.shedding);
        shed(&gw, count, trigger).await;
    });
    true
}

/// How often a shedding checks the node list again.
const RECHECK: Duration = Duration::from_secs(1);

/// Closes up to `count` randomly chosen sessions with 1012, at most
/// `--rebalance-rate` of the node's connections a second (at least one a second),
/// each pause jittered ±50 %; stops early when the node is no longer over its share,
/// or drains.
async fn shed(gw: &Gateway, count: u64, trigger: Trigger) {
    let mut sessions = gw.sessions.snapshot();
    sessions.shuffle(&mut rand::rng());
    let per_second = (gw.connections() as f64 * gw.config.rebalance_rate).max(1.0);
    let pause = Duration::from_secs_f64(1.0 / per_second);
    gw.metrics
        .rebalance_runs
        .with_label_values(&[trigger.label()])
        .inc();
    info!(
        shed = count,
        connections = gw.connections(),
        per_second = format_args!("{per_second:.1}"),
        trigger = trigger.label(),
        "rebalancing: this node holds more than its share of the fleet's connections; shedding the excess with 1012"
    );
    let started = tokio::time::Instant::now();
    let mut last_check = started;
    let mut done = 0u64;
    let mut why = "done";
    for outbox in sessions {
        if done >= count {
            break;
        }
        if gw.is_draining() {
            why = "draining";
            break;
        }
        if last_check.elapsed() >= RECHECK {
            last_check = tokio::time::Instant::now();
            match own_line(gw).await {
                Some((line, _)) => {
                    let excess = gw.connections() as u64;
                    let excess = excess.saturating_sub(line.share);
                    gw.metrics.rebalance_excess.set(excess as i64);
                    if excess == 0 {
                        why = "within its share";
                        break;
                    }
                }
                None => {
                    why = "no node list";
                    break;
                }
            }
        }
        if outbox.closing().is_some() {
            continue;
        }
        outbox.close(Disconnect::Rebalance);
        gw.metrics.rebalance_shed.inc();
        done += 1;
        let jitter = rand::random_range(0.5..1.5);
        tokio::select! {
            _ = tokio::time::sleep(pause.mul_f64(jitter)) => {}
            _ = gw.drain_started.cancelled() => {}
        }
    }
    info!(
        shed = done,
        planned = count,
        took = ?started.elapsed(),
        stopped = why,
        trigger = trigger.label(),
        "rebalancing finished"
    );
}

/// Sheds per the plan `POST /api/rebalance` sent: this node's part of it, if any.
pub(crate) fn on_command(gw: &Arc<Gateway>, shed: &BTreeMap<String, u64>) {
    match shed.get(&gw.node_id) {
        Some(&n) if n > 0 => {
            if gw.is_draining() {
                info!(shed = n, "rebalance: ignored while draining");
            } else {
                start(gw, n, Trigger::Api);
            }
        }
        _ => debug!("rebalance: nothing to shed here"),
    }
}

/// The automatic check's memory: an excess sheds only once it has been seen on two
/// checks at least one node-list refresh apart, with the fleet's connections steady
/// in between. Each peer's count in the list is as old as its last heartbeat, while
/// this node's own is fresh, so one look can show an excess that is not there: its
/// clients arrived since the peers last reported theirs, or a Redis failover held the
/// reports back. And while the fleet's total moves by more than the margin (a start,
/// a rolling deploy, a connect surge), every node's count is moving and the comparison
/// says nothing. A real excess (a scale-out: new nodes, the same clients) lasts, with
/// a steady total.
#[derive(Debug, Default)]
struct Confirm {
    /// When an excess was first seen, how large it was, and the fleet's total then.
    seen: Option<(tokio::time::Instant, u64, u64)>,
}

impl Confirm {
    /// Records the check at `now` finding `shed` to shed with `total` connections in
    /// the fleet; what to shed now, if the excess is confirmed (the smaller of the two
    /// looks).
    fn observe(
        &mut self,
        now: tokio::time::Instant,
        shed: u64,
        total: u64,
        refresh: Duration,
        margin: f64,
    ) -> Option<u64> {
        if shed == 0 {
            self.seen = None;
            return None;
        }
        match self.seen {
            Some((first, before, then)) if now.duration_since(first) >= refresh => {
                let moved = total.abs_diff(then) as f64;
                if moved > then.max(1) as f64 * margin {
                    // Still moving: look again from here.
                    self.seen = Some((now, shed, total));
                    return None;
                }
                self.seen = None;
                Some(shed.min(before))
            }
            Some(_) => None,
            None => {
                self.seen = Some((now, shed, total));
                None
            }
        }
    }
}

/// The automatic check: every `every` (the node list's refresh), sheds this node's
/// excess once two checks a refresh apart agree on it ([`Confirm`]). Runs until the
/// node drains or stops.
pub async fn run_auto(gw: Arc<Gateway>, every: Duration) {
    info!(
        ?every,
        margin = gw.config.rebalance_margin,
        "automatic rebalancing on"
    );
    let mut confirm = Confirm::default();
    loop {
        let jitter = rand::random_range(0.8..1.2);
        tokio::select! {
            _ = gw.drain_started.cancelled() => return,
            _ = gw.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every.mul_f64(jitter)) => {}
        }
        if gw.rebalance.shedding.load(Ordering::SeqCst) {
            confirm = Confirm::default();
            continue;
        }
        let Some((line, total)) = own_line(&gw).await else {
            continue;
        };
        gw.metrics.rebalance_excess.set(line.shed as i64);
        let now = tokio::time::Instant::now();
        match confirm.observe(now, line.shed, total, every, gw.config.rebalance_margin) {
            Some(shed) => {
                start(&gw, shed, Trigger::Auto);
            }
            None if line.shed > 0 => {
                debug!(
                    excess = line.shed,
                    "rebalance: an excess, to confirm at the next check"
                );
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, connections: u64, capacity: u64, draining: bool) -> NodeInfo {
        NodeInfo {
            node: id.into(),
            connections,
            subscriptions: 0,
            topics: 0,
            uptime_s: 1,
            version: "t".into(),
            draining,
            capacity,
        }
    }

    fn sheds(p: &[Planned]) -> Vec<(u64, u64)> {
        p.iter().map(|l| (l.share, l.shed)).collect()
    }

    #[test]
    fn after_a_scale_out_the_old_nodes_shed_down_to_their_share() {
        // 3 nodes of 100, 2 new empty ones: a share of 60 each.
        let nodes = [
            node("n4", 0, 1000, false),
            node("n0", 100, 1000, false),
            node("n1", 100, 1000, false),
            node("n2", 100, 1000, false),
            node("n3", 0, 1000, false),
        ];
        let p = plan(&nodes, 0.1);
        let ids: Vec<&str> = p.iter().map(|l| l.node.as_str()).collect();
        assert_eq!(ids, ["n0", "n1", "n2", "n3", "n4"]);
        assert_eq!(sheds(&p), [(60, 40), (60, 40), (60, 40), (60, 0), (60, 0)]);
    }

    #[test]
    fn within_the_margin_nothing_is_shed() {
        let nodes = [node("a", 105, 10, false), node("b", 95, 10, false)];
        assert_eq!(sheds(&plan(&nodes, 0.1)), [(100, 0), (100, 0)]);
        // Without a margin, the same fleet is rebalanced.
        assert_eq!(sheds(&plan(&nodes, 0.0)), [(100, 5), (100, 0)]);
        // One node, or none: nothing to do.
        assert_eq!(sheds(&plan(&nodes[..1], 0.0)), [(105, 0)]);
        assert!(plan(&[], 0.1).is_empty());
    }

    #[test]
    fn capacity_weighs_and_draining_nodes_do_not_count() {
        // b is twice as big: 2/3 of 300.
        let nodes = [
            node("a", 150, 100, false),
            node("b", 150, 200, false),
            node("c", 50, 100, true),
        ];
        assert_eq!(sheds(&plan(&nodes, 0.1)), [(100, 50), (200, 0), (0, 0)]);
        // A node that does not say its capacity (an older version): even shares.
        let nodes = [node("a", 150, 0, false), node("b", 50, 200, false)];
        assert_eq!(sheds(&plan(&nodes, 0.1)), [(100, 50), (100, 0)]);
    }

    #[test]
    fn an_excess_sheds_only_when_two_checks_a_refresh_apart_agree() {
        let refresh = Duration::from_secs(5);
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = Confirm::default();
        let mut see = |s: u64, shed: u64, total: u64| c.observe(at(s), shed, total, refresh, 0.1);
        // A stale look, gone at the next check: nothing shed.
        assert_eq!(see(0, 3, 9), None);
        assert_eq!(see(5, 0, 9), None);
        // Seen twice, but too close together: not yet.
        assert_eq!(see(10, 40, 300), None);
        assert_eq!(see(14, 40, 300), None);
        // A refresh after the first look, the total steady: the smaller excess.
        assert_eq!(see(15, 30, 310), Some(30));
        // Confirmed once, it starts over.
        assert_eq!(see(20, 10, 300), None);
        assert_eq!(see(26, 12, 300), Some(10));
    }

    #[test]
    fn a_fleet_whose_total_moves_is_not_rebalanced() {
        let refresh = Duration::from_secs(5);
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut c = Confirm::default();
        let mut see = |s: u64, shed: u64, total: u64| c.observe(at(s), shed, total, refresh, 0.1);
        // A connect surge: this node's fresh count runs ahead of its peers' reports on
        // every look, while the total grows.
        assert_eq!(see(0, 500, 2_000), None);
        assert_eq!(see(5, 800, 5_000), None);
        assert_eq!(see(10, 900, 9_000), None);
        // The surge is over: two steady looks a refresh apart.
        assert_eq!(see(15, 20, 10_000), None);
        assert_eq!(see(20, 15, 10_050), Some(15));
    }
}
