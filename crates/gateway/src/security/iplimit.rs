//! Per-IP connection limit: one address cannot take the whole node.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;

/// Counts open WebSocket connections per client address.
#[derive(Debug, Default)]
pub struct PerIpLimit {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One reserved connection of an address; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    limit: Option<Arc<PerIpLimit>>,
    ip: IpAddr,
}

impl PerIpLimit {
    /// At most `max` connections per address (0: unlimited).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerIpLimit {
            max,
            open: Mutex::default(),
        })
    }

    /// Reserves a connection for `ip`, unless it is at its limit.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot { limit: None, ip });
        }
        let mut open = self.open.lock();
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            limit: Some(self.clone()),
            ip,
        })
    }

    /// Open connections of `ip` (tests, debugging).
    pub fn open(&self, ip: IpAddr) -> usize {
        self.open.lock().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Some(limit) = &self.limit {
            let mut open = limit.open.lock();
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    // Keep the map as small as the set of connected addresses.
                    open.remove(&self.ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_releases() {
        let l = PerIpLimit::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire(other).is_some());
        drop(a);
        assert_eq!(l.open(ip), 1);
        assert!(l.try_acquire(ip).is_some());
        let unlimited = PerIpLimit::new(0);
        let slots: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(ip).unwrap())
            .collect();
        assert_eq!(slots.len(), 100);
    }
}
