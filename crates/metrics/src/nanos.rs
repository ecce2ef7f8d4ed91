//! A histogram of durations in integer nanoseconds, exported in seconds.
//!
//! The delivery latency is observed once per delivered frame — the hottest metric
//! there is. prometheus' own `LocalHistogram` costs a float division and a float
//! bucket search per observation; here an observation is an integer subtraction,
//! a scan of integer bounds (most latencies fall in the first few buckets) and two
//! integer adds, into a writer-private [`LocalNanos`]. Folding it into the shared
//! [`NanosHistogram`] is one relaxed atomic add per non-empty bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto;

struct Inner {
    desc: Desc,
    /// Upper bounds, inclusive, in ns; the `+Inf` bucket is implicit.
    bounds_ns: Box<[u64]>,
    bounds_s: Box<[f64]>,
    /// Per bucket (not cumulative), `+Inf` last.
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// The shared histogram. Cheap to clone; register it like any collector.
#[derive(Clone)]
pub struct NanosHistogram(Arc<Inner>);

impl NanosHistogram {
    /// A histogram `name` with bucket upper bounds `bounds_s` (seconds, ascending).
    ///
    /// # Panics
    /// On an invalid name or help (programming errors).
    pub fn new(name: &str, help: &str, bounds_s: &[f64]) -> Self {
        let desc =
            Desc::new(name.into(), help.into(), vec![], Default::default()).expect("valid metric");
        NanosHistogram(Arc::new(Inner {
            desc,
            bounds_ns: bounds_s.iter().map(|s| (s * 1e9).round() as u64).collect(),
            bounds_s: bounds_s.into(),
            buckets: (0..=bounds_s.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    /// A writer-private accumulator folding into this histogram.
    pub fn local(&self) -> LocalNanos {
        LocalNanos {
            counts: vec![0; self.0.buckets.len()].into(),
            sum_ns: 0,
            pending: false,
            shared: self.clone(),
        }
    }

    /// Observations so far (folded ones).
    pub fn count(&self) -> u64 {
        self.0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Sum of the observations so far, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
    }
}

impl Collector for NanosHistogram {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.0.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let inner = &*self.0;
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(inner.bounds_s.len());
        for (i, bound) in inner.bounds_s.iter().enumerate() {
            cumulative += inner.buckets[i].load(Ordering::Relaxed);
            let mut b = proto::Bucket::default();
            b.set_cumulative_count(cumulative);
            b.set_upper_bound(*bound);
            buckets.push(b);
        }
        cumulative += inner.buckets[inner.bounds_s.len()].load(Ordering::Relaxed);
        h.set_bucket(buckets);
        // The count is the buckets' total, so a fold racing this scrape cannot make
        // the two disagree.
        h.set_sample_count(cumulative);
        h.set_sample_sum(inner.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let mut m = proto::Metric::default();
        m.set_histogram(h);
        let mut mf = proto::MetricFamily::default();
        mf.set_name(inner.desc.fq_name.clone());
        mf.set_help(inner.desc.help.clone());
        mf.set_field_type(proto::MetricType::HISTOGRAM);
        mf.set_metric(vec![m]);
        vec![mf]
    }
}

/// Observations not yet folded into the shared [`NanosHistogram`].
pub struct LocalNanos {
    counts: Box<[u64]>,
    sum_ns: u64,
    pending: bool,
    shared: NanosHistogram,
}

impl LocalNanos {
    /// Records one duration of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&mut self, ns: u64) {
        let bounds = &self.shared.0.bounds_ns;
        let i = bounds.iter().position(|&b| ns <= b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum_ns = self.sum_ns.wrapping_add(ns);
        self.pending = true;
    }

    /// Adds everything recorded to the shared histogram and starts afresh.
    pub fn flush(&mut self) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        let shared = &self.shared.0;
        for (c, b) in self.counts.iter_mut().zip(shared.buckets.iter()) {
            if *c > 0 {
                b.fetch_add(std::mem::take(c), Ordering::Relaxed);
            }
        }
        shared
            .sum_ns
            .fetch_add(std::mem::take(&mut self.sum_ns), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_inclusive_and_exported_in_seconds() {
        let h = NanosHistogram::new("t_seconds", "test", &[0.001, 0.01]);
        let mut l = h.local();
        for ns in [0, 1_000_000, 1_000_001, 10_000_000, 20_000_000] {
            l.observe_ns(ns);
        }
        assert_eq!(h.count(), 0);
        l.flush();
        assert_eq!(h.count(), 5);
        assert!((h.sum_seconds() - 0.032000001).abs() < 1e-12);
        let mf = &h.collect()[0];
        let hist = mf.get_metric()[0].get_histogram();
        let cum: Vec<u64> = hist
            .get_bucket()
            .iter()
            .map(|b| b.cumulative_count())
            .collect();
        assert_eq!(cum, vec![2, 4]);
        assert_eq!(hist.get_sample_count(), 5);
    }
}
