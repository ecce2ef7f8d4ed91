//! Free ports for the processes tests start.
//!
//! Tests start real processes (`wsgate`, `redis-server`, Prometheus, peers) on ports
//! they pick first and hand over on the command line. The usual trick — bind port 0,
//! read the port, release it — picks from the kernel's *ephemeral* range, the same
//! range every outgoing connection takes its source port from. With tests running in
//! parallel, each opening hundreds of client connections, a released port is sometimes
//! taken as a source port before the process it was meant for binds it, and that
//! process then fails with "address in use".
//!
//! [`free_port`] picks below the ephemeral range instead, where the kernel never
//! assigns ports on its own, and never returns the same port twice in one process.

use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};

/// Lowest port [`free_port`] hands out (above the usual well-known and registered
/// services that a test machine might run).
const FLOOR: u16 = 10_000;

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`); Linux's default
/// if it cannot be read.
pub fn ephemeral_range() -> Range<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some(it.next()??..it.next()??.saturating_add(1))
        })
        .unwrap_or(32_768..61_000)
}

/// The ports [`free_port`] picks from: `FLOOR` up to the start of the ephemeral range.
/// Empty when that range starts too low to leave room.
pub fn quiet_range() -> Range<u16> {
    FLOOR..ephemeral_range().start.max(FLOOR)
}

/// A loopback TCP port that nothing listens on now, outside the ephemeral range, and
/// not returned before by this process. Falls back to a kernel-chosen port when the
/// ephemeral range leaves no room below it.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let range = quiet_range();
    if range.len() >= 1_000 {
        // Each test binary starts at its own place (by pid), so binaries run one after
        // the other, or at once, rarely meet.
        let start = std::process::id().wrapping_mul(7_919);
        if let Some(port) = pick(range, start, &NEXT) {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// Walks `range` from `start` with a stride prime to its length, so each port comes up
/// once per lap, and returns the first one that can be bound; `next` counts the steps
/// taken, so later calls go on from there.
fn pick(range: Range<u16>, start: u32, next: &AtomicU32) -> Option<u16> {
    let span = u32::from(range.end - range.start);
    let stride = (1..span.min(4_099))
        .rev()
        .find(|s| gcd(*s, span) == 1)
        .unwrap_or(1);
    (0..span).find_map(|_| {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let port = range.start + (start.wrapping_add(n.wrapping_mul(stride)) % span) as u16;
        TcpListener::bind(("127.0.0.1", port))
            .is_ok()
            .then_some(port)
    })
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_distinct_and_outside_the_ephemeral_range() {
        let eph = ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port came back twice");
        if quiet_range().len() >= 1_000 {
            assert!(
                ports.iter().all(|p| !eph.contains(p)),
                "{ports:?} vs {eph:?}"
            );
        }
        // Each is really bindable.
        for p in ports {
            TcpListener::bind(("127.0.0.1", p)).expect("free");
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let held = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let p = held.local_addr().unwrap().port();
        // A walk that would start on the held port goes on to the next free one.
        let next = AtomicU32::new(0);
        let got = pick(p..p.saturating_add(8), 0, &next).expect("a free port nearby");
        assert_ne!(got, p);
        TcpListener::bind(("127.0.0.1", got)).expect("free");
        // Every port of a walk comes up once per lap.
        let lap: Vec<u16> = (0..7).map(|_| pick(p..p + 7, 0, &next).unwrap()).collect();
        let mut unique = lap.clone();
        unique.sort_unstable();
        unique.dedup();
        assert!(!lap.contains(&p), "{lap:?}");
        assert!(unique.len() >= 5, "{lap:?}");
    }
}
