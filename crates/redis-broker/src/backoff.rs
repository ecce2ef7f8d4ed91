//! Exponential backoff with full jitter for reconnecting to Redis.
//!
//! Jitter spreads the reconnects of many nodes after a Redis restart, so they do not
//! all knock at the same instant.

use std::time::Duration;

/// First retry delay (upper bound of the jittered draw).
pub const INITIAL: Duration = Duration::from_millis(100);
/// Largest retry delay: a returning Redis is found within this long.
pub const MAX: Duration = Duration::from_secs(2);

/// Retry delays: `random(0.5..1.0) * min(MAX, INITIAL * 2^attempt)`.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = INITIAL
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(MAX);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: never zero, never longer than the ceiling.
        ceiling.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }

    /// Back to the first delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_then_caps() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= INITIAL / 2 && first <= INITIAL);
        for _ in 0..40 {
            assert!(b.next_delay() <= MAX);
        }
        assert!(b.next_delay() >= MAX / 2);
        b.reset();
        assert!(b.next_delay() <= INITIAL);
    }
}
