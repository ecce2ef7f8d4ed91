//! Per-publisher sequence accounting on one subscriber: delivered, unique, duplicated,
//! reordered. "Lost" is not counted here: it is `expected − unique`, computed once the
//! number of acknowledged publications is known (see `report`).
//!
//! Each (subscriber, publisher) pair keeps the highest sequence seen and a 128-bit
//! window of which of the 128 sequences below it arrived. A sequence below the
//! highest that is not in the window arrived late (reordered); one that is already in
//! it is a duplicate. A message more than 128 behind the newest cannot be checked
//! for duplication and is counted as reordered — documented, and in practice never
//! seen, since the contract promises per-publisher order.

/// Counters of one subscriber (or a sum over many).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqCounts {
    /// Every stamped message received, duplicates included.
    pub delivered: u64,
    /// Distinct (publisher, seq) pairs received.
    pub unique: u64,
    /// Received again after it had already been received.
    pub duplicated: u64,
    /// Received after a later sequence of the same publisher.
    pub reordered: u64,
    /// Carried a publisher index outside the run's range (another run's traffic?).
    pub foreign: u64,
}

impl SeqCounts {
    /// Adds another set of counters to this one.
    pub fn add(&mut self, o: &SeqCounts) {
        self.delivered += o.delivered;
        self.unique += o.unique;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.foreign += o.foreign;
    }
}

/// Window state for one publisher as seen by one subscriber.
#[derive(Debug, Default, Clone, Copy)]
struct PubWindow {
    /// Highest sequence seen plus one; 0 means nothing seen yet.
    next: u64,
    /// Bit i set: sequence `next - 1 - i` was received.
    seen: u128,
}

/// The tracker one subscriber owns (no sharing, no locks: merged at the end).
#[derive(Debug)]
pub struct SeqTracker {
    /// Indexed by global publisher index; sized by the run's publisher count.
    windows: Vec<PubWindow>,
    counts: SeqCounts,
}

impl SeqTracker {
    /// A tracker for a run with `publishers` publishers in all.
    pub fn new(publishers: usize) -> Self {
        SeqTracker {
            windows: vec![PubWindow::default(); publishers],
            counts: SeqCounts::default(),
        }
    }

    /// Accounts one received (publisher, seq).
    pub fn record(&mut self, publisher: u32, seq: u64) {
        self.counts.delivered += 1;
        let Some(w) = self.windows.get_mut(publisher as usize) else {
            self.counts.foreign += 1;
            return;
        };
        if seq >= w.next {
            let shift = seq - w.next + 1;
            w.seen = if shift >= 128 {
                1
            } else {
                (w.seen << shift) | 1
            };
            w.next = seq + 1;
            self.counts.unique += 1;
            return;
        }
        let age = w.next - 1 - seq;
        if age < 128 {
            let bit = 1u128 << age;
            if w.seen & bit != 0 {
                self.counts.duplicated += 1;
                return;
            }
            w.seen |= bit;
        }
        self.counts.reordered += 1;
        self.counts.unique += 1;
    }

    /// The counters so far.
    pub fn counts(&self) -> SeqCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64]) -> SeqCounts {
        let mut t = SeqTracker::new(2);
        for s in seqs {
            t.record(1, *s);
        }
        t.counts()
    }

    #[test]
    fn in_order_is_all_unique() {
        let c = run(&[0, 1, 2, 3, 4]);
        assert_eq!(
            (c.delivered, c.unique, c.duplicated, c.reordered),
            (5, 5, 0, 0)
        );
    }

    #[test]
    fn gaps_are_not_counted_here_but_show_as_fewer_unique() {
        let c = run(&[0, 1, 5, 6]);
        assert_eq!((c.unique, c.duplicated, c.reordered), (4, 0, 0));
    }

    #[test]
    fn late_arrivals_are_reordered_and_repeats_are_duplicates() {
        let c = run(&[0, 2, 1, 1, 2, 3, 0]);
        assert_eq!(c.delivered, 7);
        assert_eq!(c.unique, 4);
        assert_eq!(c.reordered, 1);
        assert_eq!(c.duplicated, 3);
    }

    #[test]
    fn far_behind_counts_as_reordered() {
        let c = run(&[0, 500, 3]);
        assert_eq!((c.unique, c.reordered, c.duplicated), (3, 1, 0));
        let c = run(&[0, 127, 0]);
        assert_eq!((c.unique, c.duplicated), (2, 1));
    }

    #[test]
    fn publishers_are_independent_and_foreign_ones_are_flagged() {
        let mut t = SeqTracker::new(2);
        t.record(0, 0);
        t.record(1, 0);
        t.record(0, 1);
        t.record(9, 0);
        let c = t.counts();
        assert_eq!(
            (c.delivered, c.unique, c.foreign, c.duplicated),
            (4, 3, 1, 0)
        );
    }
}
