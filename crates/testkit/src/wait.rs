//! Bounded polling.

use std::time::{Duration, Instant};

/// Polls `f` every 25 ms until it is true or `timeout` passes; returns whether it
/// became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_when_true_or_when_time_is_up() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        assert_eq!(n, 3);
        let start = Instant::now();
        assert!(!wait_until(Duration::from_millis(100), || false));
        assert!(start.elapsed() >= Duration::from_millis(100));
    }
}
