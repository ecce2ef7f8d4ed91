//! Per-connection command rate limiting: a token bucket, plus a second bucket that
//! tells a client briefly over the limit (it gets `rate_limited` errors) from one that
//! keeps hammering (closed with 4029).
//!
//! Owned by the connection's reader task, so no locking.

use tokio::time::Instant;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Bucket {
            capacity,
            per_sec,
            tokens: capacity,
            last: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What the limiter says about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit.
    Allow,
    /// Over the limit: answer `rate_limited`.
    Reject,
    /// Over the limit for too long: close with 4029.
    Abuse,
}

/// Command rate limiter of one connection.
#[derive(Debug)]
pub struct RateLimiter {
    commands: Bucket,
    /// Rejections allowed before the client counts as abusive: `burst` of them,
    /// refilled at a tenth of the command rate. A client slightly over the limit
    /// never drains it; one sending at several times the limit does within seconds.
    strikes: Bucket,
}

impl RateLimiter {
    /// `per_sec` sustained commands per second, bursts of `burst`.
    pub fn new(per_sec: f64, burst: f64, now: Instant) -> Self {
        RateLimiter {
            commands: Bucket::new(burst, per_sec, now),
            strikes: Bucket::new(burst, per_sec / 10.0, now),
        }
    }

    /// Judges one command arriving at `now`.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if self.commands.take(now) {
            Verdict::Allow
        } else if self.strikes.take(now) {
            Verdict::Reject
        } else {
            Verdict::Abuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_reject_then_abuse() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10.0, 5.0, t0);
        for _ in 0..5 {
            assert_eq!(rl.check(t0), Verdict::Allow);
        }
        for _ in 0..5 {
            assert_eq!(rl.check(t0), Verdict::Reject);
        }
        assert_eq!(rl.check(t0), Verdict::Abuse);
    }

    #[test]
    fn refills_over_time() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(10.0, 1.0, t0);
        assert_eq!(rl.check(t0), Verdict::Allow);
        assert_eq!(rl.check(t0), Verdict::Reject);
        assert_eq!(rl.check(t0 + Duration::from_millis(100)), Verdict::Allow);
    }

    #[test]
    fn slightly_over_the_limit_is_never_abuse() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(100.0, 100.0, t0);
        // 105 commands per second for a minute.
        let mut abuse = false;
        for i in 0..(105 * 60) {
            let now = t0 + Duration::from_secs_f64(i as f64 / 105.0);
            abuse |= rl.check(now) == Verdict::Abuse;
        }
        assert!(!abuse);
    }
}
