//! Upgrade admission: a token bucket on WebSocket upgrades per node
//! (`--upgrade-rate`, `--upgrade-burst`), so that a reconnect storm is admitted at a
//! bounded rate instead of taking the node down.
//!
//! The bucket is a GCRA (generic cell rate algorithm): one atomic "theoretical
//! arrival time" instead of a token count and a clock behind a lock, so an admission
//! that is not limited costs one clock read and one compare-and-swap.
//!
//! A refused request gets a hint of when to come back. Every refused request takes
//! the next free slot of a virtual queue behind the bucket (one slot per token), so
//! that 10,000 clients refused at once are told to come back spread over the time
//! the bucket needs to admit them all, not all at the same millisecond; a little
//! jitter on top keeps the slots from lining up exactly. The queue is only a hint:
//! nothing is reserved, and whoever finds a token first gets in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The longest hint given (a client may still choose to wait longer).
pub const MAX_RETRY: Duration = Duration::from_secs(60);

/// Admission of WebSocket upgrades at a bounded rate.
#[derive(Debug)]
pub struct UpgradeLimiter {
    /// Time between two tokens, in nanoseconds.
    interval: u64,
    /// How far the theoretical arrival time may run ahead of now (burst × interval).
    tolerance: u64,
    /// When the bucket's clock started (times below are nanoseconds since then).
    epoch: Instant,
    /// The theoretical arrival time of the next admitted upgrade.
    tat: AtomicU64,
    /// The end of the virtual queue of refused requests (see the module docs).
    queue_end: AtomicU64,
}

impl UpgradeLimiter {
    /// A bucket refilling `rate` tokens a second and holding `burst` (at least 1).
    /// `None` when `rate` is 0 (no limit).
    pub fn new(rate: f64, burst: f64) -> Option<Self> {
        if rate <= 0.0 {
            return None;
        }
        let interval = (1e9 / rate).max(1.0) as u64;
        let burst = burst.max(1.0);
        Some(UpgradeLimiter {
            interval,
            tolerance: (interval as f64 * burst) as u64,
            epoch: Instant::now(),
            tat: AtomicU64::new(0),
            queue_end: AtomicU64::new(0),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Takes a token: `Ok` when the upgrade may go ahead, else how long the client
    /// should wait before trying again (without jitter: see [`with_jitter`]).
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let now = self.now();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            if next - now > self.tolerance {
                return Err(self.queue(now, next - self.tolerance));
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(t) => tat = t,
            }
        }
    }

    /// Places a refused request in the virtual queue: its slot is one interval after
    /// the queue's end, and no earlier than `free` (when the bucket has a token again).
    fn queue(&self, now: u64, free: u64) -> Duration {
        let mut end = self.queue_end.load(Ordering::Relaxed);
        loop {
            let slot = (end + self.interval).max(free).max(now);
            let slot = slot.min(now + MAX_RETRY.as_nanos() as u64);
            match self.queue_end.compare_exchange_weak(
                end,
                slot,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Duration::from_nanos(slot - now),
                Err(e) => end = e,
            }
        }
    }

    /// Time for an empty bucket to fill up again.
    pub fn refill_time(&self) -> Duration {
        Duration::from_nanos(self.tolerance)
    }
}

/// `wait` plus a random jitter of up to a quarter of it and at least up to 50 ms, in
/// whole milliseconds (at least 1), capped at [`MAX_RETRY`].
pub fn with_jitter(wait: Duration) -> u64 {
    let ms = wait.as_millis() as u64;
    let spread = (ms / 4).max(50);
    (ms + rand::random_range(0..=spread)).clamp(1, MAX_RETRY.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rate_is_no_limit() {
        assert!(UpgradeLimiter::new(0.0, 100.0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_the_rate() {
        let b = UpgradeLimiter::new(100.0, 10.0).unwrap();
        for i in 0..10 {
            assert!(b.try_acquire().is_ok(), "burst token {i}");
        }
        let wait = b.try_acquire().unwrap_err();
        // The next token comes 10 ms later; the first refused request is the first
        // in the virtual queue.
        assert!(wait <= Duration::from_millis(20), "{wait:?}");
        // One second later: 100 more tokens, but the bucket holds 10.
        tokio::time::advance(Duration::from_secs(1)).await;
        let admitted = (0..50).filter(|_| b.try_acquire().is_ok()).count();
        assert_eq!(admitted, 10);
        // Over 10 s at the rate: 100 tokens a second, one every 10 ms.
        let mut admitted = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            admitted += (0..3).filter(|_| b.try_acquire().is_ok()).count();
        }
        assert_eq!(admitted, 1000);
        assert_eq!(b.refill_time(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_requests_are_spread_over_the_time_to_admit_them() {
        let b = UpgradeLimiter::new(1000.0, 100.0).unwrap();
        let mut waits = Vec::new();
        for _ in 0..2100 {
            if let Err(w) = b.try_acquire() {
                waits.push(w);
            }
        }
        assert_eq!(waits.len(), 2000);
        // Each refused request gets the next 1 ms slot: the last one comes back when
        // the bucket will have admitted the 2,000 before it.
        assert!(waits.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(waits[0], Duration::from_millis(1));
        assert_eq!(waits[1999], Duration::from_millis(2000));
        // Clients that come back at their slot get in.
        let mut admitted = 0;
        for w in &waits {
            let at = tokio::time::Instant::now();
            let due = b.epoch + *w;
            if due > at {
                tokio::time::advance(due - at).await;
            }
            admitted += usize::from(b.try_acquire().is_ok());
        }
        assert_eq!(admitted, 2000);
    }

    #[tokio::test(start_paused = true)]
    async fn hints_are_capped() {
        let b = UpgradeLimiter::new(1.0, 1.0).unwrap();
        assert!(b.try_acquire().is_ok());
        let mut last = Duration::ZERO;
        for _ in 0..100 {
            last = b.try_acquire().unwrap_err();
        }
        assert_eq!(last, MAX_RETRY);
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let ms = with_jitter(Duration::from_millis(400));
            assert!((400..=500).contains(&ms), "{ms}");
            let ms = with_jitter(Duration::ZERO);
            assert!((1..=50).contains(&ms), "{ms}");
        }
        assert_eq!(with_jitter(Duration::from_secs(600)), 60_000);
    }
}
