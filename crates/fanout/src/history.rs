//! The embedded broker's stream history: in memory, bounded per stream by count and
//! age, and in total by a byte cap.
//!
//! - Each stream keeps at most its `history_size` newest publications, none older
//!   than its `history_ttl` (trimmed on every append and read).
//! - Over the total cap, the streams published least recently lose their kept
//!   publications first (their numbering stays: a resume from before then answers
//!   `recovered:false`).
//! - A stream with nothing kept and no publication for its `history_ttl` is
//!   forgotten; if it is published to again its numbering restarts in a new epoch.
//! - Epochs are `<boot id><generation>`: the boot id is random per process start,
//!   so a restarted embedded node never reuses an epoch.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::stream::{History, HistoryEntry, HistoryQuery, Position, StreamOptions};

/// Bytes of bookkeeping counted per kept publication, on top of its data.
const ENTRY_OVERHEAD: usize = 64;

/// Default total cap on kept publications: 256 MiB.
pub const DEFAULT_HISTORY_MEMORY: usize = 256 << 20;

struct Kept {
    entry: HistoryEntry,
    at: Instant,
}

struct Log {
    epoch: Arc<str>,
    seq: u64,
    kept: VecDeque<Kept>,
    bytes: usize,
    opts: StreamOptions,
    /// Key in the recency index.
    touch: u64,
    last_publish: Instant,
    /// Taken out of the map: appenders must look again.
    dead: bool,
}

impl Log {
    fn trim(&mut self, now: Instant) -> usize {
        let mut freed = 0;
        while let Some(k) = self.kept.front() {
            let too_many = self.kept.len() > self.opts.history_size;
            let too_old = now.duration_since(k.at) > self.opts.history_ttl;
            if !(too_many || too_old) {
                break;
            }
            let k = self.kept.pop_front().expect("front exists");
            freed += k.entry.data.len() + ENTRY_OVERHEAD;
        }
        self.bytes -= freed;
        freed
    }

    fn clear(&mut self) -> usize {
        let freed = self.bytes;
        self.kept.clear();
        self.bytes = 0;
        freed
    }

    fn first(&self) -> u64 {
        self.kept.front().map_or(self.seq + 1, |k| k.entry.seq)
    }
}

/// Every stream's history on this node.
pub struct MemoryHistory {
    boot: String,
    generation: AtomicU64,
    logs: Mutex<HashMap<Arc<str>, Arc<Mutex<Log>>>>,
    /// Streams by last publication (oldest first): touch counter → topic.
    recency: Mutex<BTreeMap<u64, Arc<str>>>,
    clock: AtomicU64,
    bytes: AtomicUsize,
    cap: usize,
}

impl MemoryHistory {
    /// An empty history capped at `cap` bytes in total.
    pub fn new(cap: usize) -> Self {
        MemoryHistory {
            boot: boot_id(),
            generation: AtomicU64::new(0),
            logs: Mutex::new(HashMap::new()),
            recency: Mutex::new(BTreeMap::new()),
            clock: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            cap,
        }
    }

    /// Bytes kept now (data plus bookkeeping).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Streams known now.
    pub fn streams(&self) -> usize {
        self.logs.lock().len()
    }

    fn log(&self, topic: &str, opts: &StreamOptions) -> Arc<Mutex<Log>> {
        let mut logs = self.logs.lock();
        if let Some(l) = logs.get(topic) {
            return l.clone();
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let touch = self.clock.fetch_add(1, Ordering::Relaxed);
        let log = Arc::new(Mutex::new(Log {
            epoch: Arc::from(format!("{}{generation:x}", self.boot)),
            seq: 0,
            kept: VecDeque::new(),
            bytes: 0,
            opts: *opts,
            touch,
            last_publish: Instant::now(),
            dead: false,
        }));
        let topic: Arc<str> = Arc::from(topic);
        self.recency.lock().insert(touch, topic.clone());
        logs.insert(topic, log.clone());
        log
    }

    /// Numbers and keeps a publication; `then` runs with its position while the
    /// stream is still locked, so that publications of one stream are handed on in
    /// seq order.
    pub fn append<R>(
        &self,
        topic: &str,
        data: &[u8],
        accepted_at: u64,
        opts: &StreamOptions,
        then: impl FnOnce(&Position, &HistoryEntry) -> R,
    ) -> (Position, R) {
        let now = Instant::now();
        let out = loop {
            let log = self.log(topic, opts);
            let mut l = log.lock();
            if l.dead {
                continue;
            }
            l.opts = *opts;
            l.seq += 1;
            let entry = HistoryEntry {
                seq: l.seq,
                data: Bytes::copy_from_slice(data),
                accepted_at,
            };
            let size = entry.data.len() + ENTRY_OVERHEAD;
            l.kept.push_back(Kept {
                entry: entry.clone(),
                at: now,
            });
            l.bytes += size;
            self.bytes.fetch_add(size, Ordering::Relaxed);
            let freed = l.trim(now);
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            l.last_publish = now;
            let touch = self.clock.fetch_add(1, Ordering::Relaxed);
            {
                let mut r = self.recency.lock();
                r.remove(&l.touch);
                r.insert(touch, Arc::from(topic));
            }
            l.touch = touch;
            let position = Position {
                seq: l.seq,
                epoch: l.epoch.clone(),
            };
            let r = then(&position, &entry);
            break (position, r);
        };
        self.sweep(now, topic);
        out
    }

    /// Reads a stream's history (an unknown stream is at seq 0 of a fresh epoch).
    pub fn read(&self, topic: &str, opts: &StreamOptions, query: HistoryQuery) -> History {
        let log = self.log(topic, opts);
        let mut l = log.lock();
        let freed = l.trim(Instant::now());
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
        let entries: Vec<HistoryEntry> = match query {
            // No failover here: a stream never goes back; only its position is read.
            HistoryQuery::Restart { .. } => Vec::new(),
            HistoryQuery::Latest(limit) => {
                let skip = l.kept.len().saturating_sub(limit);
                l.kept.iter().skip(skip).map(|k| k.entry.clone()).collect()
            }
            HistoryQuery::After { seq, limit } => l
                .kept
                .iter()
                .filter(|k| k.entry.seq > seq)
                .take(limit)
                .map(|k| k.entry.clone())
                .collect(),
        };
        History {
            position: Position {
                seq: l.seq,
                epoch: l.epoch.clone(),
            },
            first: l.first(),
            entries,
        }
    }

    /// Keeps the total under the cap (the least recently published streams lose their
    /// history first) and forgets a couple of idle, empty streams.
    fn sweep(&self, now: Instant, current: &str) {
        let mut checked = 0;
        loop {
            let over = self.bytes.load(Ordering::Relaxed) > self.cap;
            if !over && checked >= 2 {
                return;
            }
            let oldest = {
                let r = self.recency.lock();
                r.iter().nth(checked).map(|(k, t)| (*k, t.clone()))
            };
            let Some((touch, topic)) = oldest else { return };
            checked += 1;
            let Some(log) = self.logs.lock().get(&topic).cloned() else {
                continue;
            };
            let mut l = log.lock();
            if l.touch != touch {
                continue;
            }
            if over && &*topic != current {
                let freed = l.clear();
                self.bytes.fetch_sub(freed, Ordering::Relaxed);
            } else if over {
                // Only the current stream is left: trim it to its newest publication.
                while l.kept.len() > 1 && self.bytes.load(Ordering::Relaxed) > self.cap {
                    let k = l.kept.pop_front().expect("non-empty");
                    let size = k.entry.data.len() + ENTRY_OVERHEAD;
                    l.bytes -= size;
                    self.bytes.fetch_sub(size, Ordering::Relaxed);
                }
                return;
            }
            let freed = l.trim(now);
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
            if l.kept.is_empty() && now.duration_since(l.last_publish) > l.opts.history_ttl {
                l.dead = true;
                self.logs.lock().remove(&topic);
                self.recency.lock().remove(&touch);
                checked -= 1;
            }
        }
    }
}

/// A random id for this process start: 8 letters and digits.
fn boot_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn opts(size: usize, ttl_ms: u64) -> StreamOptions {
        StreamOptions {
            history_size: size,
            history_ttl: Duration::from_millis(ttl_ms),
        }
    }

    fn seqs(h: &History) -> Vec<u64> {
        h.entries.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn numbers_from_one_and_keeps_the_newest() {
        let h = MemoryHistory::new(1 << 20);
        let o = opts(3, 60_000);
        let empty = h.read("s", &o, HistoryQuery::Latest(10));
        assert_eq!(empty.position.seq, 0);
        assert_eq!(empty.first, 1);
        for i in 1..=5u64 {
            let (p, ()) = h.append("s", i.to_string().as_bytes(), 0, &o, |_, _| ());
            assert_eq!(p.seq, i);
            assert_eq!(p.epoch, empty.position.epoch, "one epoch");
        }
        let all = h.read("s", &o, HistoryQuery::Latest(10));
        assert_eq!(seqs(&all), vec![3, 4, 5]);
        assert_eq!(all.first, 3);
        assert_eq!(seqs(&h.read("s", &o, HistoryQuery::Latest(2))), vec![4, 5]);
        let after = h.read("s", &o, HistoryQuery::After { seq: 3, limit: 1 });
        assert_eq!(seqs(&after), vec![4]);
        assert!(after.covers(2, &after.position.epoch));
        assert!(!after.covers(1, &after.position.epoch));
        assert_eq!(h.read("other", &o, HistoryQuery::Latest(1)).position.seq, 0);
    }

    #[test]
    fn old_publications_age_out_and_idle_streams_restart_in_a_new_epoch() {
        let h = MemoryHistory::new(1 << 20);
        let o = opts(100, 30);
        let (p1, ()) = h.append("s", b"1", 0, &o, |_, _| ());
        std::thread::sleep(Duration::from_millis(60));
        let r = h.read("s", &o, HistoryQuery::Latest(10));
        assert!(r.entries.is_empty(), "aged out");
        assert_eq!(r.position.seq, 1, "numbering kept while known");
        assert_eq!(h.bytes(), 0);
        // Appends elsewhere sweep the idle, empty stream away.
        h.append("t", b"1", 0, &o, |_, _| ());
        h.append("t", b"2", 0, &o, |_, _| ());
        let (p2, ()) = h.append("s", b"1", 0, &o, |_, _| ());
        assert_eq!(p2.seq, 1);
        assert_ne!(p2.epoch, p1.epoch, "a restarted numbering has a new epoch");
    }

    #[test]
    fn over_the_cap_the_least_recently_published_lose_history_first() {
        let o = opts(1000, 60_000);
        let h = MemoryHistory::new(10 * (100 + ENTRY_OVERHEAD));
        let data = [b'1'; 100];
        for _ in 0..4 {
            h.append("old", &data, 0, &o, |_, _| ());
        }
        for _ in 0..4 {
            h.append("new", &data, 0, &o, |_, _| ());
        }
        assert_eq!(h.bytes(), 8 * (100 + ENTRY_OVERHEAD));
        for _ in 0..4 {
            h.append("newest", &data, 0, &o, |_, _| ());
        }
        assert!(h.bytes() <= 10 * (100 + ENTRY_OVERHEAD));
        let old = h.read("old", &o, HistoryQuery::Latest(100));
        assert!(old.entries.is_empty(), "oldest stream evicted");
        assert_eq!(old.position.seq, 4, "its numbering stays");
        assert_eq!(
            h.read("new", &o, HistoryQuery::Latest(100)).entries.len(),
            4
        );
        assert_eq!(
            h.read("newest", &o, HistoryQuery::Latest(100))
                .entries
                .len(),
            4
        );
        // One stream alone over the cap keeps its newest.
        let tiny = MemoryHistory::new(1);
        tiny.append("x", b"1", 0, &o, |_, _| ());
        tiny.append("x", b"2", 0, &o, |_, _| ());
        assert_eq!(seqs(&tiny.read("x", &o, HistoryQuery::Latest(10))), vec![2]);
    }

    #[test]
    fn every_process_start_has_its_own_epochs() {
        let o = opts(10, 60_000);
        let a = MemoryHistory::new(1 << 20).read("s", &o, HistoryQuery::Latest(0));
        let b = MemoryHistory::new(1 << 20).read("s", &o, HistoryQuery::Latest(0));
        assert_ne!(a.position.epoch, b.position.epoch);
        assert!(a.position.epoch.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
