//! The gateway's shared state: configuration, the fan-out [`Node`] (hub and broker),
//! metrics, security, live sessions and the shutdown tree. One `Arc<Gateway>` is
//! shared by every task.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wsgate_fanout::Node;
use wsgate_metrics::Metrics;

use crate::admission::UpgradeLimiter;
use crate::close::Disconnect;
use crate::config::Config;
use crate::security::{Security, SecurityError};
use crate::session::registry::Registry;

/// Shared state of one gateway node.
pub struct Gateway {
    pub config: Config,
    pub node_id: String,
    /// The hub, the broker and the rules between them: every subscribe, unsubscribe
    /// and publish goes through it.
    pub node: Node,
    /// The node's metrics (the same handles as `node.metrics()`).
    pub metrics: Metrics,
    /// Auth, origin policy, per-IP limits, TLS.
    pub security: Security,
    /// The token bucket on upgrades (`--upgrade-rate`; `None`: no limit).
    pub(crate) upgrades: Option<UpgradeLimiter>,
    /// Live sessions: the drain closes them, the heartbeat ticker pings them.
    pub(crate) sessions: Registry,
    /// Cancelled when the drain starts (SIGTERM, SIGINT or `POST /drain`).
    pub drain_started: CancellationToken,
    /// Cancelled when the node must stop serving (end of the drain).
    pub shutdown: CancellationToken,
    /// Every connection task, so the end of `run` can wait for them.
    pub(crate) tracker: TaskTracker,
    /// Whether the node is shedding connections to rebalance the fleet.
    pub(crate) rebalance: crate::rebalance::State,
    draining: AtomicBool,
    connections: AtomicUsize,
    next_session: AtomicU64,
    /// Makes session numbers ([`Gateway::session_of`]) unique across nodes.
    session_salt: u64,
}

impl Gateway {
    /// Assembles a gateway from its parts. `security` is built (and its errors
    /// reported) by the caller, once: [`Security::from_config`].
    pub fn new(config: Config, node: Node, security: Security) -> Arc<Self> {
        let node_id = config.resolved_node_id();
        let sessions = Registry::new(config.heartbeat_interval, config.heartbeat_timeout);
        let metrics = node.metrics().clone();
        metrics.ready.set(1);
        let upgrades = UpgradeLimiter::new(config.upgrade_rate, config.upgrade_burst());
        let gw = Arc::new(Gateway {
            config,
            node_id,
            node,
            metrics,
            security,
            sessions,
            upgrades,
            drain_started: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            rebalance: Default::default(),
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            next_session: AtomicU64::new(1),
            session_salt: rand::random(),
        });
        gw.node.set_hooks(crate::server_api::hooks(&gw));
        gw
    }

    /// A gateway with the in-memory broker (the embedded default).
    ///
    /// # Errors
    /// The security settings cannot be loaded (a key, certificate or JWKS file).
    pub fn in_memory(config: Config, metrics: Metrics) -> Result<Arc<Self>, SecurityError> {
        let security = Security::from_config(&config)?;
        let node = Node::in_memory(metrics, config.max_publication_size());
        Ok(Self::new(config, node, security))
    }

    /// Starts the graceful drain. Idempotent.
    pub fn start_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            self.metrics.draining.set(1);
            self.metrics.ready.set(0);
            self.drain_started.cancel();
        }
    }

    /// Whether the node is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the node should get new connections (`/readyz`): not draining, and
    /// its broker can fan out (a Redis node that lost Redis would accept clients it
    /// cannot serve; existing clients stay connected meanwhile).
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.node.broker_ready()
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Reserves a connection slot, unless the node is full.
    pub(crate) fn try_reserve_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.config.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.connections.inc();
        Some(ConnectionSlot { gw: self.clone() })
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The session id clients see (`welcome`'s `session`) of the session numbered
    /// `id` on this node: a bijection salted per process, so ids are unique across
    /// nodes (but for a 2⁻⁶⁴ chance) and a session keeps no copy of its own.
    pub(crate) fn session_of(&self, id: u64) -> u64 {
        (id ^ self.session_salt).wrapping_mul(SESSION_MIX)
    }

    /// Closes every live session with 1001, spread evenly over the drain window.
    ///
    /// With `--upgrade-rate`, each close carries a reconnect hint
    /// ([`drain_retry_hint`]) so that the node's clients arrive elsewhere at no more
    /// than that rate, even when the window is too short to spread them.
    pub(crate) async fn drain_sessions(&self) {
        let sessions = self.sessions.snapshot();
        let window = self.config.drain_timeout;
        let start = tokio::time::Instant::now();
        let n = sessions.len().max(1) as u32;
        tracing::info!(sessions = sessions.len(), ?window, "draining");
        for (i, outbox) in sessions.into_iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            let hint = drain_retry_hint(i as u32, n, window, self.config.upgrade_rate);
            match hint {
                Some(ms) => {
                    let reason = crate::close::with_retry_hint(Disconnect::Drain.reason(), ms);
                    let frame = wsgate_fanout::frame::close(Disconnect::Drain.code(), &reason);
                    outbox.close_with(Disconnect::Drain, Some(frame));
                }
                None => outbox.close(Disconnect::Drain),
            }
        }
    }

    /// `welcome`'s `reconnect_ms`: with `--upgrade-rate`, the time the node's upgrade
    /// rate needs to take back every client it has (at least one refill of its
    /// burst), so that clients that lose this node all at once and each wait a random
    /// delay up to it arrive at about that rate. Capped at 30 s. `None` without a rate.
    pub(crate) fn reconnect_hint_ms(&self) -> Option<u64> {
        let bucket = self.upgrades.as_ref()?;
        let spread = self.connections() as f64 * 1000.0 / self.config.upgrade_rate;
        let floor = bucket.refill_time().as_secs_f64() * 1000.0;
        Some((spread.max(floor).ceil() as u64).clamp(1, 30_000))
    }

    /// Refreshes gauges that are cheaper to read than to maintain (at scrape time).
    pub fn refresh_gauges(&self) {
        self.node.refresh_gauges();
        self.metrics.ready.set(i64::from(self.is_ready()));
    }
}

/// The reconnect hint of the `i`th of `n` sessions closed by a drain spread over
/// `window`, for clients reconnecting to nodes that admit `rate` upgrades a second:
/// the `i`th should arrive no sooner than `i / rate` after the drain began, and is
/// closed at `i × window / n`; the hint is the difference. `None` when there is no
/// rate, or when the window alone spreads the closes enough.
pub(crate) fn drain_retry_hint(i: u32, n: u32, window: Duration, rate: f64) -> Option<u64> {
    if rate <= 0.0 {
        return None;
    }
    let arrive = f64::from(i) / rate;
    let closed = (window * i / n.max(1)).as_secs_f64();
    let ms = ((arrive - closed) * 1000.0).floor();
    (ms >= 1.0).then_some(ms as u64)
}

/// An odd multiplier (the 64-bit golden ratio): multiplying by it permutes `u64`.
const SESSION_MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// A reserved connection slot; released on drop.
pub(crate) struct ConnectionSlot {
    gw: Arc<Gateway>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gw.connections.fetch_sub(1, Ordering::AcqRel);
        self.gw.metrics.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_hints_spread_clients_at_the_upgrade_rate() {
        let none = drain_retry_hint(500, 1000, Duration::ZERO, 0.0);
        assert_eq!(none, None);
        // 1,000 sessions closed at once, 100 upgrades/s: the last one waits ~10 s.
        assert_eq!(drain_retry_hint(0, 1000, Duration::ZERO, 100.0), None);
        assert_eq!(drain_retry_hint(1, 1000, Duration::ZERO, 100.0), Some(10));
        assert_eq!(
            drain_retry_hint(999, 1000, Duration::ZERO, 100.0),
            Some(9990)
        );
        // A window of 10 s spreads 1,000 closes at 100/s already: no hint.
        for i in 0..1000 {
            assert_eq!(
                drain_retry_hint(i, 1000, Duration::from_secs(10), 100.0),
                None
            );
        }
        // A window of 5 s: half of the spreading is left to the hint.
        assert_eq!(
            drain_retry_hint(999, 1000, Duration::from_secs(5), 100.0),
            Some(4995)
        );
    }
}
