//! Connection health shared by the publisher and the subscription manager, and the
//! Redis metrics they feed (`wsgate_redis_*`, when the node passes its metrics).

use std::sync::atomic::{AtomicBool, Ordering};

use wsgate_metrics::Metrics;

/// Which of the broker's two connections are up.
#[derive(Default)]
pub(crate) struct Health {
    publish_up: AtomicBool,
    subscribe_up: AtomicBool,
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
            let (p, s) = (self.publish_up(), self.subscribe_up());
            m.redis_up.set(i64::from(p && s));
            // One pub/sub connection in single mode: shard 0.
            m.redis_shard_up.with_label_values(&["0"]).set(i64::from(s));
        }
    }

    /// A connection came back after a loss.
    pub(crate) fn reconnected(&self) {
        if let Some(m) = &self.metrics {
            m.redis_reconnects.inc();
        }
    }

    /// `n` topics were subscribed again from the hub after a reconnect.
    pub(crate) fn resubscribed(&self, n: usize) {
        if let Some(m) = &self.metrics {
            m.redis_resubscribed_topics.inc_by(n as u64);
        }
    }

    /// A Redis command (publish pipeline, subscribe, unsubscribe, ping) failed.
    pub(crate) fn error(&self) {
        if let Some(m) = &self.metrics {
            m.redis_errors.inc();
        }
    }
}
