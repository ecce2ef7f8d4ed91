//! Live sessions, and their heartbeats from one shared wheel.
//!
//! Every session is in one of `slots` slots (a random one, so connections made
//! together do not ping together). One ticker task visits a slot per tick, so each
//! slot comes round once per heartbeat interval: it closes the sessions silent for
//! the heartbeat timeout (4000) and queues a ping for the others. Compared with a
//! timer per connection this keeps no timer in any session and wakes the node once
//! per tick for a whole slot's pings instead of once per ping; an idle writer waits
//! for its outbox only.
//!
//! The same table is what the drain walks to close every session.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::{Instant, MissedTickBehavior};

use wsgate_fanout::frame::EMPTY_PING;

use super::outbox::{Outbox, PolicyDrops};
use crate::close::Disconnect;
use crate::gateway::Gateway;

/// About how often the ticker runs: each slot is this much of the interval.
const TICK: Duration = Duration::from_secs(1);
/// At most this many slots (very long intervals get longer ticks).
const MAX_SLOTS: u32 = 120;

/// Where a session sits in the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key {
    slot: u32,
    index: u32,
}

/// One live session: its queue, and who it is (for the server API).
pub(crate) struct Entry {
    pub outbox: Arc<Outbox>,
    /// The session id (`welcome`'s `session`, as a number).
    pub session: u64,
    /// The token's `sub`, if it had one.
    pub user: Option<Arc<str>>,
}

#[derive(Default)]
struct Slot {
    entries: Vec<Option<Entry>>,
    /// Indexes of `None` entries, reused first.
    free: Vec<u32>,
}

/// The registry of live sessions, in heartbeat slots.
pub(crate) struct Registry {
    slots: Box<[Mutex<Slot>]>,
    tick: Duration,
    interval: Duration,
    timeout: Duration,
    /// The clock of [`Outbox::heard`]: milliseconds since this instant.
    base: Instant,
    len: AtomicUsize,
}

impl Registry {
    pub(crate) fn new(interval: Duration, timeout: Duration) -> Self {
        let n = (interval.as_millis() / TICK.as_millis()).clamp(1, u128::from(MAX_SLOTS)) as u32;
        Registry {
            slots: (0..n).map(|_| Mutex::new(Slot::default())).collect(),
            tick: interval / n,
            interval,
            timeout,
            base: Instant::now(),
            len: AtomicUsize::new(0),
        }
    }

    /// Now, on the clock of [`Outbox::heard`].
    pub(crate) fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Adds a session; its first ping comes at a random point of the first interval.
    pub(crate) fn insert(&self, outbox: Arc<Outbox>, session: u64, user: Option<Arc<str>>) -> Key {
        outbox.heard(self.now_ms());
        let entry = Entry {
            outbox,
            session,
            user,
        };
        let slot = rand::random_range(0..self.slots.len() as u32);
        let mut s = self.slots[slot as usize].lock();
        let index = match s.free.pop() {
            Some(i) => {
                s.entries[i as usize] = Some(entry);
                i
            }
            None => {
                s.entries.push(Some(entry));
                (s.entries.len() - 1) as u32
            }
        };
        self.len.fetch_add(1, Ordering::Relaxed);
        Key { slot, index }
    }

    pub(crate) fn remove(&self, key: Key) {
        let mut s = self.slots[key.slot as usize].lock();
        if s.entries[key.index as usize].take().is_some() {
            s.free.push(key.index);
            self.len.fetch_sub(1, Ordering::Relaxed);
        }
        // A slot emptied after a peak gives its memory back.
        if s.free.len() == s.entries.len() && s.entries.capacity() > 64 {
            *s = Slot::default();
        }
    }

    /// Live sessions.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub(crate) fn snapshot(&self) -> Vec<Arc<Outbox>> {
        self.find(|_| true)
    }

    /// The queues of the sessions `matches` picks (a walk of the whole table: for
    /// the server API's rare commands, so live sessions need no index of their own).
    pub(crate) fn find(&self, matches: impl Fn(&Entry) -> bool) -> Vec<Arc<Outbox>> {
        let mut found = Vec::new();
        for slot in self.slots.iter() {
            found.extend(
                slot.lock()
                    .entries
                    .iter()
                    .flatten()
                    .filter(|e| matches(e))
                    .map(|e| e.outbox.clone()),
            );
        }
        found
    }

    /// Pings every session of slot `i`, or closes it if it has been silent too long.
    /// Returns what the slow-consumer policies dropped since the last visit.
    fn visit(&self, i: usize) -> PolicyDrops {
        let now = self.now_ms();
        let timeout = self.timeout.as_millis() as u64;
        let slot = self.slots[i].lock();
        let mut drops = PolicyDrops::default();
        for Entry { outbox, .. } in slot.entries.iter().flatten() {
            if now.saturating_sub(outbox.last_heard()) >= timeout {
                outbox.close(Disconnect::HeartbeatTimeout);
            } else {
                drops.add(outbox.trim());
                outbox.push_control(Bytes::from_static(&EMPTY_PING));
            }
        }
        drops
    }
}

/// The ticker: runs until the node shuts down.
pub(crate) async fn run(gw: Arc<Gateway>) {
    let sessions = &gw.sessions;
    let mut ticks = tokio::time::interval_at(Instant::now() + sessions.tick, sessions.tick);
    // After a stall, keep the spacing rather than pinging several slots at once.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut i = 0;
    loop {
        tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let drops = sessions.visit(i);
        gw.metrics.dropped("drop_oldest", drops.oldest);
        gw.metrics.dropped("conflated", drops.conflated);
        i = (i + 1) % sessions.slots.len();
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("slots", &self.slots.len())
            .field("interval", &self.interval)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::Batch;

    fn taken(ob: &Outbox) -> (usize, Option<Disconnect>) {
        let mut b = Batch::default();
        let close = ob.take(&mut b);
        (b.control.len(), close.map(|c| c.0))
    }

    #[tokio::test(start_paused = true)]
    async fn each_session_is_pinged_once_per_interval_and_closed_when_silent() {
        let s = Registry::new(Duration::from_secs(10), Duration::from_secs(25));
        assert_eq!(s.slots.len(), 10);
        let obs: Vec<Arc<Outbox>> = (0..50).map(|_| Arc::new(Outbox::new(1000))).collect();
        let keys: Vec<Key> = obs
            .iter()
            .enumerate()
            .map(|(i, o)| s.insert(o.clone(), i as u64, None))
            .collect();
        assert_eq!(s.len(), 50);
        // One interval: every slot visited once, every session pinged once.
        for i in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            s.visit(i);
        }
        assert!(obs.iter().all(|o| taken(o) == (1, None)));
        // obs[0] keeps talking; the others are silent past the timeout.
        for round in 0..3 {
            for i in 0..10 {
                tokio::time::advance(Duration::from_secs(1)).await;
                obs[0].heard(s.now_ms());
                s.visit(i);
            }
            if round < 1 {
                assert!(obs.iter().all(|o| taken(o) == (1, None)));
            }
        }
        assert_eq!(taken(&obs[0]).1, None);
        assert!(obs[1..]
            .iter()
            .all(|o| o.closing() == Some(Disconnect::HeartbeatTimeout)));
        for k in keys {
            s.remove(k);
        }
        assert_eq!(s.len(), 0);
        assert!(s.snapshot().is_empty());
    }

    #[test]
    fn slots_are_reused_and_short_intervals_get_one_slot() {
        let s = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        assert_eq!((s.slots.len(), s.tick), (1, Duration::from_millis(100)));
        let a = s.insert(Arc::new(Outbox::new(10)), 1, None);
        s.remove(a);
        let b = s.insert(Arc::new(Outbox::new(10)), 2, Some("alice".into()));
        assert_eq!((a.slot, a.index), (b.slot, b.index));
        assert_eq!(s.snapshot().len(), 1);
        assert_eq!(s.find(|e| e.user.as_deref() == Some("alice")).len(), 1);
        assert_eq!(s.find(|e| e.session == 1).len(), 0);
    }
}
