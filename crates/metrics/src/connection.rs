//! Per-connection accounting for the fan-out hot path.
//!
//! A publication to a topic with 10 000 local subscribers is written by 10 000
//! writer tasks spread over every core. If each of them added to the shared
//! `wsgate_messages_delivered_total` atomic (and the latency histogram's buckets),
//! every core would keep stealing the same cache lines from the others. Instead each
//! writer owns a [`ConnectionStats`]: plain integers and local histograms, folded into the shared metrics at most every [`FLUSH_EVERY`]
//! (and when the connection ends). A scrape therefore lags by at most that much.

use std::time::Duration;

use prometheus::local::LocalHistogram;
use prometheus::IntCounter;

use crate::nanos::LocalNanos;
use crate::Metrics;

/// How long a writer may keep counts to itself before folding them in.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// A writer's private counters. Folded into the shared metrics by
/// [`ConnectionStats::flush_if_due`], [`ConnectionStats::flush`] and on drop.
pub struct ConnectionStats {
    delivered: u64,
    bytes_sent: u64,
    latency: LocalNanos,
    queue: LocalHistogram,
    shared_delivered: IntCounter,
    shared_bytes_sent: IntCounter,
    /// When the counts were last folded in (unix ns, the clock the writer reads
    /// anyway for the latency, so timing the folds costs no extra clock read).
    last_flush_ns: u64,
    /// Whether anything is counted that the shared metrics do not have yet.
    pending: bool,
}

impl ConnectionStats {
    /// Empty stats that fold into `metrics`.
    pub fn new(metrics: &Metrics) -> Self {
        ConnectionStats {
            delivered: 0,
            bytes_sent: 0,
            latency: metrics.delivery_latency.local(),
            queue: metrics.outbound_queue_bytes.local(),
            shared_delivered: metrics.messages_delivered.clone(),
            shared_bytes_sent: metrics.bytes_sent.clone(),
            last_flush_ns: 0,
            pending: false,
        }
    }

    /// Records a batch that the writer took when `queued_bytes` were waiting.
    pub fn record_queue(&mut self, queued_bytes: usize) {
        self.queue.observe(queued_bytes as f64);
        self.pending = true;
    }

    /// Records a batch written to the socket: `bytes` in all, and one delivered
    /// publication for each entry of `accepted_at` (unix ns when a node accepted it),
    /// written at `now_ns` (unix ns). Folds the counts in when they are due.
    pub fn record_written(&mut self, bytes: u64, accepted_at: &[u64], now_ns: u64) {
        self.bytes_sent += bytes;
        self.delivered += accepted_at.len() as u64;
        for &born in accepted_at {
            // Clocks of two nodes may disagree slightly: a negative latency counts as 0.
            self.latency.observe_ns(now_ns.saturating_sub(born));
        }
        self.pending = true;
        self.flush_if_due(now_ns);
    }

    /// Folds the counts in if [`FLUSH_EVERY`] has passed since the last time (`now_ns`
    /// in unix ns). Returns how long until the next fold is due, if something is
    /// waiting to be folded (an idle writer sleeps that long at most).
    pub fn flush_if_due(&mut self, now_ns: u64) -> Option<Duration> {
        if !self.pending {
            return None;
        }
        let due = self.last_flush_ns + FLUSH_EVERY.as_nanos() as u64;
        if now_ns < due {
            return Some(Duration::from_nanos(due - now_ns));
        }
        self.flush_at(now_ns);
        None
    }

    /// Folds everything counted into the shared metrics now.
    pub fn flush(&mut self) {
        self.flush_at(self.last_flush_ns);
    }

    fn flush_at(&mut self, now_ns: u64) {
        self.last_flush_ns = now_ns;
        if !self.pending {
            return;
        }
        self.pending = false;
        self.shared_delivered
            .inc_by(std::mem::take(&mut self.delivered));
        self.shared_bytes_sent
            .inc_by(std::mem::take(&mut self.bytes_sent));
        self.latency.flush();
        self.queue.flush();
    }
}

impl Drop for ConnectionStats {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_in_when_due_and_on_drop() {
        let m = Metrics::default();
        let mut s = ConnectionStats::new(&m);
        let sec = 1_000_000_000u64;
        // The first batch is due at once (nothing folded yet since the epoch).
        s.record_queue(100);
        s.record_written(100, &[sec, 3 * sec / 2], 2 * sec);
        assert_eq!(m.messages_delivered.get(), 2);
        assert_eq!(m.bytes_sent.get(), 100);
        assert_eq!(m.delivery_latency.count(), 2);
        assert!((m.delivery_latency.sum_seconds() - 1.5).abs() < 1e-9);
        assert_eq!(m.outbound_queue_bytes.get_sample_count(), 1);

        // The next one waits for FLUSH_EVERY.
        let t = 2 * sec + 1000;
        s.record_written(10, &[t], t);
        assert_eq!(m.messages_delivered.get(), 2, "not folded in yet");
        let wait = s.flush_if_due(t).expect("something pending");
        assert!(wait <= FLUSH_EVERY && wait > Duration::ZERO);
        assert_eq!(s.flush_if_due(t + wait.as_nanos() as u64), None);
        assert_eq!(m.messages_delivered.get(), 3);
        assert_eq!(s.flush_if_due(t + sec), None, "nothing pending");

        s.record_written(7, &[], t + sec + 1);
        drop(s);
        assert_eq!(m.bytes_sent.get(), 117, "drop folds the rest in");
    }
}
