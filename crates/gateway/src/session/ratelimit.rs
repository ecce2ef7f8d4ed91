//! Per-connection command rate limiting: a token bucket, plus a second bucket that
//! tells a client briefly over the limit (it gets `rate_limited` errors) from one that
//! keeps hammering (closed with 4029).
//!
//! Owned by the connection's reader task, so no locking.

use tokio::time::Instant;

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

/// Command rate limiter of one connection: two token buckets that share one clock.
///
/// The rates are the gateway's (`--rate-limit`, `--rate-burst`), passed to each
/// [`RateLimiter::check`] rather than stored here: every idle connection carries
/// one of these, so it holds just the two token counts and the time of the last
/// refill (32 bytes).
#[derive(Debug)]
pub struct RateLimiter {
    /// Commands allowed: `burst` of them, refilled at `per_sec`.
    commands: f64,
    /// Rejections allowed before the client counts as abusive: `burst` of them,
    /// refilled at a tenth of the command rate. A client slightly over the limit
    /// never drains it; one sending at several times the limit does within seconds.
    strikes: f64,
    /// When both buckets were last refilled.
    last: Instant,
}

impl RateLimiter {
    /// Both buckets full (`burst` tokens).
    pub fn new(burst: f64, now: Instant) -> Self {
        RateLimiter {
            commands: burst,
            strikes: burst,
            last: now,
        }
    }

    /// Judges one command arriving at `now`, for `per_sec` sustained commands per
    /// second in bursts of `burst`.
    pub fn check(&mut self, now: Instant, per_sec: f64, burst: f64) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.commands = (self.commands + elapsed * per_sec).min(burst);
        self.strikes = (self.strikes + elapsed * per_sec / 10.0).min(burst);
        if self.commands >= 1.0 {
            self.commands -= 1.0;
            Verdict::Allow
        } else if self.strikes >= 1.0 {
            self.strikes -= 1.0;
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
        let mut rl = RateLimiter::new(5.0, t0);
        let mut check = |now| rl.check(now, 10.0, 5.0);
        for _ in 0..5 {
            assert_eq!(check(t0), Verdict::Allow);
        }
        for _ in 0..5 {
            assert_eq!(check(t0), Verdict::Reject);
        }
        assert_eq!(check(t0), Verdict::Abuse);
    }

    #[test]
    fn refills_over_time() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(1.0, t0);
        let mut check = |now| rl.check(now, 10.0, 1.0);
        assert_eq!(check(t0), Verdict::Allow);
        assert_eq!(check(t0), Verdict::Reject);
        assert_eq!(check(t0 + Duration::from_millis(100)), Verdict::Allow);
    }

    #[test]
    fn strikes_refill_while_commands_pass() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(2.0, t0);
        let mut check = |now| rl.check(now, 10.0, 2.0);
        // Drain both buckets: 2 allowed, 2 rejected, then abuse.
        assert_eq!(check(t0), Verdict::Allow);
        assert_eq!(check(t0), Verdict::Allow);
        assert_eq!(check(t0), Verdict::Reject);
        assert_eq!(check(t0), Verdict::Reject);
        assert_eq!(check(t0), Verdict::Abuse);
        // 0.1 s later a command passes but no strike (1/s) has come back yet; by
        // 1.05 s one has.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(check(t1), Verdict::Allow);
        assert_eq!(check(t1), Verdict::Abuse);
        let t2 = t0 + Duration::from_millis(1050);
        assert_eq!(check(t2), Verdict::Allow);
        assert_eq!(check(t2), Verdict::Allow);
        assert_eq!(check(t2), Verdict::Reject);
        assert_eq!(check(t2), Verdict::Abuse);
    }

    #[test]
    fn slightly_over_the_limit_is_never_abuse() {
        let t0 = Instant::now();
        let mut rl = RateLimiter::new(100.0, t0);
        let mut check = |now| rl.check(now, 100.0, 100.0);
        // 105 commands per second for a minute.
        let mut abuse = false;
        for i in 0..(105 * 60) {
            let now = t0 + Duration::from_secs_f64(i as f64 / 105.0);
            abuse |= check(now) == Verdict::Abuse;
        }
        assert!(!abuse);
    }
}
