//! Connection health and the `wsgate_redis_*` metrics, one module for both modes.
//!
//! Single mode has one shard (label `shard="0"`) and two connections: the publish
//! connection and the pub/sub connection. Cluster mode has one entry per primary
//! (shards numbered by the lowest slot they own); a shard is up while its primary
//! answers, and the node is ready when the slot map covers every slot and every
//! shard is up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;

use wsgate_metrics::Metrics;

/// Which connections (single mode) or shards (cluster mode) are up.
#[derive(Default)]
pub(crate) struct Health {
    publish_up: AtomicBool,
    subscribe_up: AtomicBool,
    /// Cluster mode: up per shard index.
    shards: RwLock<Vec<bool>>,
    /// Connections (or shards) that came back after a loss, ever: presence writes its
    /// entries again when this moves.
    reconnects: AtomicU64,
    metrics: Option<Metrics>,
}

impl Health {
    pub(crate) fn new(metrics: Option<Metrics>) -> Self {
        let h = Health {
            metrics,
            ..Health::default()
        };
        h.refresh();
        h
    }

    pub(crate) fn publish_up(&self) -> bool {
        self.publish_up.load(Ordering::Acquire)
    }

    pub(crate) fn subscribe_up(&self) -> bool {
        self.subscribe_up.load(Ordering::Acquire)
    }

    /// Both directions work (the `/readyz` signal).
    pub(crate) fn is_ready(&self) -> bool {
        self.publish_up() && self.subscribe_up()
    }

    pub(crate) fn set_publish_up(&self, up: bool) {
        self.publish_up.store(up, Ordering::Release);
        self.refresh();
    }

    pub(crate) fn set_subscribe_up(&self, up: bool) {
        self.subscribe_up.store(up, Ordering::Release);
        self.refresh();
    }

    fn refresh(&self) {
        if let Some(m) = &self.metrics {
            m.redis_up.set(i64::from(self.is_ready()));
            if self.shards.read().expect("shards lock").is_empty() {
                // One pub/sub connection in single mode (and before a cluster's map): shard 0.
                m.redis_shard_up
                    .with_label_values(&["0"])
                    .set(i64::from(self.subscribe_up()));
            }
        }
    }

    /// Cluster mode: the shards' states after a probe; `complete` when the slot map
    /// covers every slot. The node is ready when the map is complete and all are up.
    pub(crate) fn set_shards(&self, ups: &[bool], complete: bool) {
        let before = {
            let mut s = self.shards.write().expect("shards lock");
            std::mem::replace(&mut *s, ups.to_vec()).len()
        };
        let all = complete && !ups.is_empty() && ups.iter().all(|u| *u);
        self.publish_up.store(all, Ordering::Release);
        self.subscribe_up.store(all, Ordering::Release);
        if let Some(m) = &self.metrics {
            for (i, up) in ups.iter().enumerate() {
                m.redis_shard_up
                    .with_label_values(&[&i.to_string()])
                    .set(i64::from(*up));
            }
            // Shard numbers that no longer exist leave the per-shard gauges.
            for i in ups.len()..before {
                let _ = m.redis_shard_up.remove_label_values(&[&i.to_string()]);
                let _ = m.redis_shard_topics.remove_label_values(&[&i.to_string()]);
            }
            m.redis_cluster_shards.set(ups.len() as i64);
            m.redis_up.set(i64::from(all));
        }
    }

    /// Cluster mode: whether shard `i` is up.
    pub(crate) fn shard_up(&self, i: usize) -> bool {
        self.shards
            .read()
            .expect("shards lock")
            .get(i)
            .copied()
            .unwrap_or(false)
    }

    /// A connection came back after a loss (`shard`: which one, in cluster mode).
    pub(crate) fn reconnected(&self, shard: Option<usize>) {
        self.reconnects.fetch_add(1, Ordering::AcqRel);
        if let Some(m) = &self.metrics {
            m.redis_reconnects.inc();
            if let Some(i) = shard {
                m.redis_shard_reconnects
                    .with_label_values(&[&i.to_string()])
                    .inc();
            }
        }
    }

    /// How many times a connection (or shard) came back after a loss.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Acquire)
    }

    /// `n` topics were subscribed again after a reconnect, failover or slot move.
    pub(crate) fn resubscribed(&self, shard: Option<usize>, n: usize) {
        if let Some(m) = &self.metrics {
            m.redis_resubscribed_topics.inc_by(n as u64);
            if let Some(i) = shard {
                m.redis_shard_resubscribed_topics
                    .with_label_values(&[&i.to_string()])
                    .inc_by(n as u64);
            }
        }
    }

    /// A Redis command (publish, subscribe, unsubscribe, ping, probe) failed.
    pub(crate) fn error(&self) {
        if let Some(m) = &self.metrics {
            m.redis_errors.inc();
        }
    }

    /// Cluster mode: `n` publications accepted by shard `i`.
    pub(crate) fn shard_published(&self, i: usize, n: u64) {
        if let Some(m) = &self.metrics {
            m.redis_shard_publishes
                .with_label_values(&[&i.to_string()])
                .inc_by(n);
        }
    }

    /// Cluster mode: topics held per shard.
    pub(crate) fn shard_topics(&self, counts: &[i64]) {
        if let Some(m) = &self.metrics {
            for (i, n) in counts.iter().enumerate() {
                m.redis_shard_topics
                    .with_label_values(&[&i.to_string()])
                    .set(*n);
            }
        }
    }

    /// Cluster mode: the slot map was read; `changed` when it differs from the last.
    pub(crate) fn slot_map_read(&self, changed: bool) {
        if let Some(m) = &self.metrics {
            m.redis_cluster_slot_map_refreshes.inc();
            if changed {
                m.redis_cluster_slot_map_changes.inc();
            }
        }
    }

    /// Cluster mode: a topology signal (a server-pushed `sunsubscribe`).
    pub(crate) fn redirect(&self) {
        if let Some(m) = &self.metrics {
            m.redis_cluster_redirects.inc();
        }
    }
}
