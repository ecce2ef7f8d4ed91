//! Per-second latency histograms and counters shared by many connection tasks.
//!
//! Connection tasks never touch a shared structure per message: each owns a
//! [`LocalRecorder`] that buffers latencies of the current second and flushes them to
//! one of a few mutex-protected shards every 512 samples or when the second changes.
//! A lock per 512 deliveries is noise next to the read syscalls.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Latencies are recorded in microseconds, from 1 µs to 60 s; slower ones saturate.
pub const HIST_MAX_US: u64 = 60_000_000;
const FLUSH_AT: usize = 512;

/// A new, empty latency histogram (µs, 3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("static histogram bounds")
}

/// Nanoseconds since the UNIX epoch: the clock every stamp uses.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What one second of the run accumulated.
#[derive(Debug, Clone)]
pub struct SecondAcc {
    /// Events recorded in this second (deliveries, or completed connects).
    pub events: u64,
    /// Their latencies.
    pub hist: Histogram<u64>,
}

impl SecondAcc {
    fn new() -> Self {
        SecondAcc {
            events: 0,
            hist: new_hist(),
        }
    }
}

/// A shard's seconds, a histogram only for those with events: a histogram is 136 KiB,
/// and a run whose first events come minutes after its start (the scale run's ramp)
/// would otherwise create and zero one per shard for every second before, all at
/// once when the first events arrive (27 processes at once: gigabytes).
#[derive(Default)]
struct Shard {
    seconds: Vec<Option<SecondAcc>>,
}

/// The run's per-second event counts and latency histograms.
pub struct Timeline {
    /// Start of second 0 (ns since epoch). Set once the measured phase begins.
    t0_ns: AtomicU64,
    /// Several shards so that many tasks flushing at once rarely contend.
    shards: Vec<Mutex<Shard>>,
    /// Events flushed so far, for progress display.
    total: AtomicU64,
}

impl Timeline {
    /// A timeline with `shards` shards (a few per worker thread is plenty).
    pub fn new(shards: usize) -> Arc<Self> {
        Arc::new(Timeline {
            t0_ns: AtomicU64::new(now_ns()),
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
            total: AtomicU64::new(0),
        })
    }

    /// Sets second 0 to start at `t0_ns`. Call before events are recorded.
    pub fn set_t0(&self, t0_ns: u64) {
        self.t0_ns.store(t0_ns, Ordering::Relaxed);
    }

    /// Start of second 0 (ns since the UNIX epoch).
    pub fn t0_ns(&self) -> u64 {
        self.t0_ns.load(Ordering::Relaxed)
    }

    /// Index of the second that `at_ns` falls in (events before t0 go to second 0).
    pub fn second_of(&self, at_ns: u64) -> usize {
        (at_ns.saturating_sub(self.t0_ns()) / 1_000_000_000) as usize
    }

    /// Events flushed so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// A recorder for one task; `key` spreads tasks over shards.
    pub fn recorder(self: &Arc<Self>, key: usize) -> LocalRecorder {
        LocalRecorder {
            timeline: Arc::clone(self),
            shard: key % self.shards.len(),
            second: 0,
            buf: Vec::new(),
        }
    }

    /// Merges every shard into one list of seconds (consumes the shards' contents).
    pub fn take_seconds(&self) -> Vec<SecondAcc> {
        let mut out: Vec<SecondAcc> = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().expect("stats shard poisoned");
            for (i, acc) in shard.seconds.drain(..).enumerate() {
                let Some(acc) = acc else { continue };
                if out.len() <= i {
                    out.resize_with(i + 1, SecondAcc::new);
                }
                out[i].events += acc.events;
                out[i].hist.add(&acc.hist).expect("same histogram bounds");
            }
        }
        out
    }

    fn flush(&self, shard: usize, second: usize, lat_us: &[u64]) {
        let mut shard = self.shards[shard].lock().expect("stats shard poisoned");
        if shard.seconds.len() <= second {
            shard.seconds.resize_with(second + 1, || None);
        }
        let acc = shard.seconds[second].get_or_insert_with(SecondAcc::new);
        acc.events += lat_us.len() as u64;
        for l in lat_us {
            acc.hist.saturating_record((*l).max(1));
        }
        self.total.fetch_add(lat_us.len() as u64, Ordering::Relaxed);
    }
}

/// A task's buffer in front of the shared [`Timeline`].
pub struct LocalRecorder {
    timeline: Arc<Timeline>,
    shard: usize,
    second: usize,
    buf: Vec<u64>,
}

impl LocalRecorder {
    /// Records one event completed at `at_ns` that took `latency_us`.
    #[inline]
    pub fn record(&mut self, at_ns: u64, latency_us: u64) {
        let second = self.timeline.second_of(at_ns);
        if second != self.second || self.buf.len() >= FLUSH_AT {
            self.flush();
            self.second = second;
        }
        self.buf.push(latency_us);
    }

    /// Pushes buffered samples to the shared timeline.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.timeline.flush(self.shard, self.second, &self.buf);
            self.buf.clear();
        }
    }
}

impl Drop for LocalRecorder {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorders_fill_the_right_seconds() {
        let tl = Timeline::new(3);
        tl.set_t0(10_000_000_000);
        let mut a = tl.recorder(0);
        let mut b = tl.recorder(1);
        for i in 0..1000u64 {
            a.record(10_000_000_000 + i * 1_000_000, 100); // second 0
            b.record(12_500_000_000, 2000); // second 2
        }
        a.record(5, 7); // before t0: second 0
        drop(a);
        drop(b);
        let secs = tl.take_seconds();
        assert_eq!(secs.len(), 3);
        assert_eq!(secs[0].events, 1001);
        assert_eq!(secs[1].events, 0);
        assert_eq!(secs[2].events, 1000);
        assert_eq!(secs[2].hist.value_at_quantile(0.5), 2000);
        assert_eq!(tl.total(), 2001);
    }
}
