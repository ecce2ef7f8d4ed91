//! Delivery accounting for the fan-out hot path: counts striped per thread.
//!
//! A publication to a topic with 10 000 local subscribers is written by 10 000
//! writer batches spread over every core. Shared atomics would have every core
//! steal the same cache lines from the others; per-connection accumulators (the
//! design before this one) cost memory on every idle connection and a cold cache
//! line per batch. Here each thread that records owns a *stripe*: a block of plain
//! counters that only it writes (a load and a store, no locked instruction), hot in
//! its cache because every writer on that thread uses it. A scrape sums the stripes.
//! Nothing is folded later, so nothing lags and no timer runs for it.
//!
//! Exported families (names and meanings unchanged, see docs/metrics.md):
//! `wsgate_messages_delivered_total`, `wsgate_bytes_sent_total`,
//! `wsgate_outbound_queue_bytes` and `wsgate_delivery_latency_seconds`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto;

use crate::delivery_names as names;

/// Stripes owned by one thread each; threads beyond these share the last stripe,
/// which is updated with atomic adds.
const STRIPES: usize = 64;

/// Latency bucket upper bounds (inclusive), in ns; [`crate::latency_buckets`] in seconds.
pub(crate) const LATENCY_NS: [u64; 17] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Queue-size bucket upper bounds, in bytes (256 B × 4ⁿ): [`crate::queue_buckets`].
pub(crate) const QUEUE_B: [u64; 8] = [256, 1024, 4096, 16384, 65536, 262_144, 1_048_576, 4_194_304];

/// One thread's counters: a few cache lines, aligned so stripes never share one.
#[repr(align(128))]
struct Stripe {
    delivered: AtomicU64,
    bytes_sent: AtomicU64,
    latency_sum_ns: AtomicU64,
    queue_sum: AtomicU64,
    /// Per bucket (not cumulative), `+Inf` last.
    latency: [AtomicU64; LATENCY_NS.len() + 1],
    queue: [AtomicU64; QUEUE_B.len() + 1],
}

impl Default for Stripe {
    fn default() -> Self {
        Stripe {
            delivered: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            latency_sum_ns: AtomicU64::new(0),
            queue_sum: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            queue: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Adds `v` to a counter: a plain load and store when this thread owns the stripe,
/// an atomic add on the shared one.
#[inline(always)]
fn add(a: &AtomicU64, v: u64, owned: bool) {
    if owned {
        a.store(a.load(Relaxed).wrapping_add(v), Relaxed);
    } else {
        a.fetch_add(v, Relaxed);
    }
}

/// Which stripe the current thread owns (`None`: none free, use the shared one).
/// Process-wide, so a thread has the same index in every [`DeliveryStats`].
struct StripeIndex(Option<usize>);

/// Next never-used index, and indexes given back by threads that ended.
static FREE: Mutex<(usize, Vec<usize>)> = Mutex::new((0, Vec::new()));

impl StripeIndex {
    fn acquire() -> Self {
        let mut free = FREE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = free.1.pop() {
            return StripeIndex(Some(i));
        }
        if free.0 < STRIPES {
            free.0 += 1;
            return StripeIndex(Some(free.0 - 1));
        }
        StripeIndex(None)
    }
}

impl Drop for StripeIndex {
    fn drop(&mut self) {
        // The next owner continues from the counts left (the lock orders the two).
        if let Some(i) = self.0 {
            FREE.lock().unwrap_or_else(|e| e.into_inner()).1.push(i);
        }
    }
}

thread_local! {
    static STRIPE: StripeIndex = StripeIndex::acquire();
}

struct Inner {
    stripes: Box<[Stripe]>,
    delivered: Desc,
    bytes_sent: Desc,
    queue: Desc,
    latency: Desc,
}

/// Delivery counters and histograms. Cheap to clone; register it like any collector.
#[derive(Clone)]
pub struct DeliveryStats(Arc<Inner>);

fn desc(name: &str, help: &str) -> Desc {
    Desc::new(name.into(), help.into(), vec![], Default::default()).expect("valid metric")
}

/// Totals over every stripe.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryTotals {
    pub delivered: u64,
    pub bytes_sent: u64,
    pub latency: Vec<u64>,
    pub latency_sum_ns: u64,
    pub queue: Vec<u64>,
    pub queue_sum: u64,
}

impl DeliveryTotals {
    /// Latency observations (delivered frames with an acceptance time).
    pub fn latency_count(&self) -> u64 {
        self.latency.iter().sum()
    }

    /// Queue-size observations (batches taken).
    pub fn queue_count(&self) -> u64 {
        self.queue.iter().sum()
    }
}

impl Default for DeliveryStats {
    fn default() -> Self {
        Self::new()
    }
}

impl DeliveryStats {
    pub fn new() -> Self {
        DeliveryStats(Arc::new(Inner {
            stripes: (0..=STRIPES).map(|_| Stripe::default()).collect(),
            delivered: desc(
                names::MESSAGES_DELIVERED,
                "Message frames written to subscribers' sockets.",
            ),
            bytes_sent: desc(
                names::BYTES_SENT,
                "Bytes written to WebSocket clients, frame headers included.",
            ),
            queue: desc(
                names::OUTBOUND_QUEUE_BYTES,
                "Bytes queued for a connection when its writer takes a batch.",
            ),
            latency: desc(
                names::DELIVERY_LATENCY,
                "From a node accepting a publication to its frame being written to a subscriber.",
            ),
        }))
    }

    /// Records one batch written to a socket: `queued` bytes were waiting when the
    /// writer took it, `bytes` were written, and one publication was delivered for
    /// each entry of `accepted_at` (unix ns when a node accepted it), written at
    /// `now_ns` (unix ns).
    #[inline]
    pub fn record_batch(
        &self,
        queued: usize,
        bytes: u64,
        accepted_at: impl IntoIterator<Item = u64>,
        now_ns: u64,
    ) {
        let (i, owned) = match STRIPE.try_with(|s| s.0) {
            Ok(Some(i)) => (i, true),
            _ => (STRIPES, false),
        };
        let s = &self.0.stripes[i];
        let q = queued as u64;
        let qi = QUEUE_B
            .iter()
            .position(|&b| q <= b)
            .unwrap_or(QUEUE_B.len());
        add(&s.queue[qi], 1, owned);
        add(&s.queue_sum, q, owned);
        add(&s.bytes_sent, bytes, owned);
        // Frames of one batch mostly share a bucket: count runs, add once per run.
        let (mut n, mut sum) = (0u64, 0u64);
        let (mut run_bucket, mut run) = (usize::MAX, 0u64);
        for born in accepted_at {
            // Clocks of two nodes may disagree slightly: a negative latency counts as 0.
            let ns = now_ns.saturating_sub(born);
            let b = LATENCY_NS
                .iter()
                .position(|&bound| ns <= bound)
                .unwrap_or(LATENCY_NS.len());
            if b != run_bucket {
                if run > 0 {
                    add(&s.latency[run_bucket], run, owned);
                }
                (run_bucket, run) = (b, 0);
            }
            run += 1;
            n += 1;
            sum = sum.wrapping_add(ns);
        }
        if run > 0 {
            add(&s.latency[run_bucket], run, owned);
        }
        if n > 0 {
            add(&s.delivered, n, owned);
            add(&s.latency_sum_ns, sum, owned);
        }
    }

    /// Sums every stripe.
    pub fn totals(&self) -> DeliveryTotals {
        let mut t = DeliveryTotals {
            latency: vec![0; LATENCY_NS.len() + 1],
            queue: vec![0; QUEUE_B.len() + 1],
            ..Default::default()
        };
        for s in self.0.stripes.iter() {
            t.delivered += s.delivered.load(Relaxed);
            t.bytes_sent += s.bytes_sent.load(Relaxed);
            t.latency_sum_ns = t
                .latency_sum_ns
                .wrapping_add(s.latency_sum_ns.load(Relaxed));
            t.queue_sum += s.queue_sum.load(Relaxed);
            for (a, b) in t.latency.iter_mut().zip(s.latency.iter()) {
                *a += b.load(Relaxed);
            }
            for (a, b) in t.queue.iter_mut().zip(s.queue.iter()) {
                *a += b.load(Relaxed);
            }
        }
        t
    }
}

fn family(desc: &Desc, kind: proto::MetricType, m: proto::Metric) -> proto::MetricFamily {
    let mut mf = proto::MetricFamily::default();
    mf.set_name(desc.fq_name.clone());
    mf.set_help(desc.help.clone());
    mf.set_field_type(kind);
    mf.set_metric(vec![m]);
    mf
}

fn counter(desc: &Desc, v: u64) -> proto::MetricFamily {
    let mut c = proto::Counter::default();
    c.set_value(v as f64);
    let mut m = proto::Metric::default();
    m.set_counter(c);
    family(desc, proto::MetricType::COUNTER, m)
}

/// A histogram family from per-bucket counts (`+Inf` last) and bounds in `unit`s.
fn histogram(
    desc: &Desc,
    bounds: &[u64],
    counts: &[u64],
    sum: f64,
    unit: f64,
) -> proto::MetricFamily {
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(bounds.len());
    for (bound, count) in bounds.iter().zip(counts) {
        cumulative += count;
        let mut b = proto::Bucket::default();
        b.set_cumulative_count(cumulative);
        b.set_upper_bound(*bound as f64 * unit);
        buckets.push(b);
    }
    cumulative += counts[bounds.len()];
    h.set_bucket(buckets);
    // The count is the buckets' total, so a batch recorded during the scrape cannot
    // make the two disagree.
    h.set_sample_count(cumulative);
    h.set_sample_sum(sum);
    let mut m = proto::Metric::default();
    m.set_histogram(h);
    family(desc, proto::MetricType::HISTOGRAM, m)
}

impl Collector for DeliveryStats {
    fn desc(&self) -> Vec<&Desc> {
        let i = &*self.0;
        vec![&i.delivered, &i.bytes_sent, &i.queue, &i.latency]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let i = &*self.0;
        let t = self.totals();
        vec![
            counter(&i.delivered, t.delivered),
            counter(&i.bytes_sent, t.bytes_sent),
            histogram(&i.queue, &QUEUE_B, &t.queue, t.queue_sum as f64, 1.0),
            histogram(
                &i.latency,
                &LATENCY_NS,
                &t.latency,
                t.latency_sum_ns as f64 / 1e9,
                1e-9,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_match_the_exported_buckets() {
        let lat: Vec<f64> = LATENCY_NS.iter().map(|&n| n as f64 / 1e9).collect();
        assert_eq!(lat, crate::latency_buckets());
        let q: Vec<f64> = QUEUE_B.iter().map(|&n| n as f64).collect();
        assert_eq!(q, crate::queue_buckets());
    }

    #[test]
    fn batches_add_up_across_threads() {
        let d = DeliveryStats::new();
        let sec = 1_000_000_000u64;
        d.record_batch(100, 100, [sec, 3 * sec / 2], 2 * sec);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        d.record_batch(5000, 10, [2 * sec - 1000], 2 * sec);
                    }
                });
            }
        });
        d.record_batch(0, 7, [], 2 * sec);
        let t = d.totals();
        assert_eq!(t.delivered, 4002);
        assert_eq!(t.bytes_sent, 100 + 40_000 + 7);
        assert_eq!(t.latency_count(), 4002);
        assert_eq!(t.latency_sum_ns, sec + sec / 2 + 4000 * 1000);
        // 1 µs → first bucket; 0.5 s and 1 s → inclusive upper bounds.
        assert_eq!(t.latency[0], 4000);
        assert_eq!(t.latency[12], 1);
        assert_eq!(t.latency[13], 1);
        assert_eq!(t.queue_count(), 4002);
        assert_eq!(
            (t.queue[0], t.queue[3]),
            (2, 4000),
            "100 and 0 B; 5000 B (≤ 16 KiB)"
        );
        assert_eq!(t.queue_sum, 100 + 4000 * 5000);
    }

    #[test]
    fn exposition_has_the_four_families() {
        let r = prometheus::Registry::new();
        let d = DeliveryStats::new();
        r.register(Box::new(d.clone())).unwrap();
        d.record_batch(300, 50, [1_000_000_000], 1_000_020_000);
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            "wsgate_messages_delivered_total 1",
            "wsgate_bytes_sent_total 50",
            "wsgate_outbound_queue_bytes_bucket{le=\"1024\"} 1",
            "wsgate_outbound_queue_bytes_count 1",
            "wsgate_delivery_latency_seconds_bucket{le=\"0.00005\"} 1",
            "wsgate_delivery_latency_seconds_sum 0.00002",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
