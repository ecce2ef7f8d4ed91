//! The receiving side in cluster mode: the *manager* task owns one pub/sub
//! connection per primary and decides which topic is `SSUBSCRIBE`d where.
//!
//! - Every topic the hub has is placed on the primary that owns its slot. New topics
//!   arriving together are grouped per shard and per slot (one `SSUBSCRIBE` may only
//!   name channels of one slot) and sent as one pipeline per shard; a request
//!   resolves when every one of its topics is confirmed.
//! - Releases become `SUNSUBSCRIBE` after the unsubscribe delay, re-checked against
//!   the hub, as in single mode.
//! - Topology: the slot map is re-read every [`REFRESH_EVERY`] and at once after a
//!   `MOVED`/`ASK` (here or in a publish writer), a lost connection, or a
//!   `sunsubscribe` the server pushes when a slot leaves its node (resharding, a
//!   demoted primary). *Reconciling* then connects to new primaries, drops
//!   connections to nodes that are no longer primaries, and moves every topic whose
//!   owner changed. Clients stay connected throughout; only their topics' messages
//!   published during the move can be missed (docs/redis.md).
//!
//! Each connection has a *reader* task: `smessage`s go straight into the hub
//! (non-blocking, as in single mode); every other reply comes to the manager as an
//! [`Event`], which matches it against the commands it sent on that connection, in
//! order (`expect`): that is how a `sunsubscribe` confirming our `SUNSUBSCRIBE` is
//! told from one the server pushed, and which command a `-MOVED` answers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsgate_fanout::BrokerEvents;

use crate::backoff::Backoff;
use crate::cluster::resp::{self, Reader, Value, Writer};
use crate::cluster::slot::key_slot;
use crate::cluster::topology::{self, Addr};
use crate::cluster::Shared;
use crate::envelope;
use crate::reply::{unavailable, Reply};

/// Periodic slot-map refresh (catches shards added without any redirect).
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// Soonest refresh after the previous one when something asked for it.
const REFRESH_MIN_GAP: Duration = Duration::from_millis(250);
/// How often the manager looks at timers (refresh, keepalive, deadlines).
const TICK: Duration = Duration::from_millis(100);
/// Channels per `SSUBSCRIBE` at most (within one slot).
const CHUNK: usize = 2000;
/// A subscribe request not confirmed within this long fails `unavailable`.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections are checked with `PING` this often…
const KEEPALIVE: Duration = Duration::from_secs(5);
/// …and dropped when nothing at all arrived for this long.
const SILENCE: Duration = Duration::from_secs(15);
/// Writing commands to a connection may take this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) enum Command {
    Subscribe(Vec<Arc<str>>, Reply),
    Release(Vec<Arc<str>>),
}

/// What the readers and publish writers tell the manager.
pub(crate) enum Event {
    /// A reply that is not a message, from connection `conn` to `addr`.
    Reply { addr: Addr, conn: u64, value: Value },
    /// Connection `conn` to `addr` ended.
    Lost { addr: Addr, conn: u64, why: String },
    /// Someone saw a redirect: re-read the slot map.
    Refresh,
}

/// A command sent on a connection, waiting for its replies.
enum Expect {
    Subscribe { topics: Vec<Arc<str>>, left: usize },
    Unsubscribe { topics: Vec<Arc<str>>, left: usize },
    Ping,
}

struct Conn {
    id: u64,
    writer: Writer,
    expect: VecDeque<Expect>,
    /// Ends the reader.
    token: CancellationToken,
    /// Milliseconds since `epoch` when the reader last saw any frame.
    last_seen: Arc<AtomicU64>,
    last_ping: Instant,
}

struct Waiter {
    left: HashSet<Arc<str>>,
    done: Reply,
    deadline: Instant,
}

/// Where a topic is subscribed, and whether the server confirmed it.
#[derive(Clone, PartialEq, Eq)]
struct Placement {
    addr: Addr,
    confirmed: bool,
}

pub(crate) struct Manager {
    shared: Arc<Shared>,
    events: Arc<dyn BrokerEvents>,
    unsubscribe_delay: Duration,
    epoch: Instant,
    conns: HashMap<Addr, Conn>,
    /// Earliest next connection attempt per primary, after a failure.
    retry: HashMap<Addr, (Instant, Backoff)>,
    /// Primaries this node had a connection to and lost (reconnects are counted).
    lost_before: HashSet<Addr>,
    placed: HashMap<Arc<str>, Placement>,
    waiters: Vec<Waiter>,
    due: VecDeque<(Instant, Arc<str>)>,
    /// Some topic is not where the slot map says, or a shard is not connected.
    dirty: bool,
    refresh_wanted: bool,
    last_refresh: Option<Instant>,
    next_conn: u64,
}

impl Manager {
    pub(crate) fn new(
        shared: Arc<Shared>,
        events: Arc<dyn BrokerEvents>,
        unsubscribe_delay: Duration,
    ) -> Self {
        Manager {
            shared,
            events,
            unsubscribe_delay,
            epoch: Instant::now(),
            conns: HashMap::new(),
            retry: HashMap::new(),
            lost_before: HashSet::new(),
            placed: HashMap::new(),
            waiters: Vec::new(),
            due: VecDeque::new(),
            dirty: true,
            refresh_wanted: true,
            last_refresh: None,
            next_conn: 0,
        }
    }

    fn shard_label(&self, addr: &Addr) -> Option<String> {
        self.shared.map().shard_of(addr).map(|i| i.to_string())
    }

    pub(crate) async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let stop = self.shared.stop.clone();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = self.due.front().map(|(at, _)| *at);
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                ev = events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => break,
                },
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_commands(cmd, &mut rx).await,
                    None => break,
                },
                _ = tick.tick() => self.on_tick().await,
                _ = sleep_until_opt(next_due), if next_due.is_some() => self.on_due().await,
            }
        }
        for (_, c) in self.conns.drain() {
            c.token.cancel();
        }
    }

    // ----- requests from the broker -----

    async fn on_commands(&mut self, first: Command, rx: &mut mpsc::UnboundedReceiver<Command>) {
        let map = self.shared.map();
        // Everything already waiting joins this batch.
        let mut want: HashMap<Addr, BTreeMap<u16, Vec<Arc<str>>>> = HashMap::new();
        // Topics still held on a node that no longer owns their slot.
        let mut stale: HashMap<Addr, Vec<Arc<str>>> = HashMap::new();
        let mut cmd = Some(first);
        let mut taken = 0usize;
        let mut yields = 0;
        loop {
            while let Some(c) = cmd.take().or_else(|| rx.try_recv().ok()) {
                match c {
                    Command::Subscribe(topics, done) => {
                        let mut left = HashSet::new();
                        let mut failed = None;
                        for t in topics {
                            let slot = key_slot(&self.shared.channel(&t));
                            let Some((_, owner)) = map.owner(slot) else {
                                failed = Some("no Redis Cluster shard owns the topic's slot");
                                break;
                            };
                            match self.placed.get(&t) {
                                Some(p) if p.addr == *owner && p.confirmed => {}
                                Some(p) if p.addr == *owner => {
                                    left.insert(t);
                                }
                                _ if !self.conns.contains_key(owner) => {
                                    failed =
                                        Some("the topic's Redis Cluster shard is not connected");
                                    break;
                                }
                                _ => {
                                    let old = self.placed.insert(
                                        t.clone(),
                                        Placement {
                                            addr: owner.clone(),
                                            confirmed: false,
                                        },
                                    );
                                    if let Some(old) = old {
                                        stale.entry(old.addr).or_default().push(t.clone());
                                    }
                                    want.entry(owner.clone())
                                        .or_default()
                                        .entry(slot)
                                        .or_default()
                                        .push(t.clone());
                                    taken += 1;
                                    left.insert(t);
                                }
                            }
                        }
                        match failed {
                            Some(why) => {
                                let _ = done.send(Err(unavailable(why)));
                            }
                            None if left.is_empty() => {
                                let _ = done.send(Ok(()));
                            }
                            None => self.waiters.push(Waiter {
                                left,
                                done,
                                deadline: Instant::now() + CONFIRM_TIMEOUT,
                            }),
                        }
                    }
                    Command::Release(topics) => {
                        let at = Instant::now() + self.unsubscribe_delay;
                        self.due.extend(topics.into_iter().map(|t| (at, t)));
                    }
                }
                if taken >= CHUNK {
                    break;
                }
            }
            // Subscribes of sessions running right now join this batch: one yield lets
            // them be queued (no timer, so an idle node adds no latency).
            if taken >= CHUNK || yields == 2 {
                break;
            }
            tokio::task::yield_now().await;
            yields += 1;
            if rx.is_empty() {
                break;
            }
        }
        for (addr, topics) in stale {
            self.send_unsubscribes(&addr, topics).await;
        }
        for (addr, slots) in want {
            self.send_subscribes(&addr, slots).await;
        }
    }

    /// Pipelines one `SSUBSCRIBE` per slot (and per [`CHUNK`]) on `addr`.
    async fn send_subscribes(&mut self, addr: &Addr, slots: BTreeMap<u16, Vec<Arc<str>>>) {
        self.send_per_slot(addr, b"SSUBSCRIBE", slots, |topics, left| {
            Expect::Subscribe { topics, left }
        })
        .await;
    }

    /// Pipelines one `SUNSUBSCRIBE` per slot on `addr`.
    async fn send_unsubscribes(&mut self, addr: &Addr, topics: Vec<Arc<str>>) {
        let mut per_slot: BTreeMap<u16, Vec<Arc<str>>> = BTreeMap::new();
        for t in topics {
            per_slot
                .entry(key_slot(&self.shared.channel(&t)))
                .or_default()
                .push(t);
        }
        self.send_per_slot(addr, b"SUNSUBSCRIBE", per_slot, |topics, left| {
            Expect::Unsubscribe { topics, left }
        })
        .await;
    }

    /// Pipelines `command` once per slot (and per [`CHUNK`] of its topics) on `addr`,
    /// expecting one confirmation per topic (`expect(topics, count)`).
    async fn send_per_slot(
        &mut self,
        addr: &Addr,
        command: &[u8],
        slots: BTreeMap<u16, Vec<Arc<str>>>,
        expect: fn(Vec<Arc<str>>, usize) -> Expect,
    ) {
        let Some(conn) = self.conns.get_mut(addr) else {
            return;
        };
        let mut bytes = Vec::new();
        for topics in slots.into_values() {
            for chunk in topics.chunks(CHUNK) {
                let mut args: Vec<Vec<u8>> = vec![command.to_vec()];
                args.extend(chunk.iter().map(|t| self.shared.channel(t)));
                resp::encode(&mut bytes, &args);
                conn.expect.push_back(expect(chunk.to_vec(), chunk.len()));
            }
        }
        self.write(addr, bytes).await;
    }

    async fn write(&mut self, addr: &Addr, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let Some(conn) = self.conns.get_mut(addr) else {
            return;
        };
        let r = tokio::time::timeout(WRITE_TIMEOUT, conn.writer.send(&bytes)).await;
        let why = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "write timed out".to_string(),
        };
        self.lose(addr, &why);
    }

    async fn on_due(&mut self) {
        let now = Instant::now();
        let mut gone: HashMap<Addr, Vec<Arc<str>>> = HashMap::new();
        while self.due.front().is_some_and(|(at, _)| *at <= now) {
            let (_, t) = self.due.pop_front().expect("checked");
            // The hub is the truth: a subscriber that came back keeps it.
            if self.events.has_subscribers(&t) {
                continue;
            }
            if let Some(p) = self.placed.remove(&t) {
                gone.entry(p.addr).or_default().push(t);
            }
        }
        for (addr, topics) in gone {
            debug!(%addr, count = topics.len(), "sunsubscribe");
            self.send_unsubscribes(&addr, topics).await;
        }
        self.update_topic_gauges();
    }

    // ----- replies and losses -----

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Refresh => self.refresh_wanted = true,
            Event::Lost { addr, conn, why } => {
                if self.conns.get(&addr).is_some_and(|c| c.id == conn) {
                    self.lose(&addr, &why);
                }
            }
            Event::Reply { addr, conn, value } => {
                if self.conns.get(&addr).is_some_and(|c| c.id == conn) {
                    self.on_reply(&addr, value);
                }
            }
        }
    }

    fn on_reply(&mut self, addr: &Addr, value: Value) {
        let (kind, channel) = match &value {
            Value::Array(items) => (
                items.first().and_then(Value::bytes).unwrap_or_default(),
                items.get(1).and_then(Value::bytes),
            ),
            Value::Simple(s) => (s.as_bytes(), None),
            Value::Error(e) => {
                self.on_error_reply(addr, e.clone());
                return;
            }
            _ => (&[][..], None),
        };
        let kind = kind.to_ascii_lowercase();
        let topic: Option<Arc<str>> = channel
            .and_then(|c| self.shared.topic_of(c))
            .map(|t| Arc::from(&*t));
        let conn = self.conns.get_mut(addr).expect("checked by caller");
        match (kind.as_slice(), topic) {
            (b"ssubscribe", Some(t)) => {
                if let Some(Expect::Subscribe { left, .. }) = conn.expect.front_mut() {
                    *left -= 1;
                    if *left == 0 {
                        conn.expect.pop_front();
                    }
                }
                if let Some(p) = self.placed.get_mut(&t) {
                    if p.addr == *addr {
                        p.confirmed = true;
                        self.confirmed(&t);
                    }
                }
            }
            (b"sunsubscribe", Some(t)) => {
                let ours = match conn.expect.front_mut() {
                    Some(Expect::Unsubscribe { topics, left }) if topics.contains(&t) => {
                        *left -= 1;
                        if *left == 0 {
                            conn.expect.pop_front();
                        }
                        true
                    }
                    _ => false,
                };
                if !ours {
                    // Pushed by the server: the slot left this node (resharding, or
                    // the node stopped being a primary). Find the new owner.
                    if let Some(m) = &self.shared.metrics {
                        m.redis_cluster_redirects.inc();
                    }
                    info!(%addr, topic = %t, "server dropped a shard channel; re-reading the slot map");
                    if self.placed.get(&t).is_some_and(|p| p.addr == *addr) {
                        self.placed.remove(&t);
                    }
                    self.dirty = true;
                    self.refresh_wanted = true;
                }
            }
            (b"pong", _) => {
                if matches!(conn.expect.front(), Some(Expect::Ping)) {
                    conn.expect.pop_front();
                }
            }
            _ => debug!(%addr, ?value, "unexpected reply on a pub/sub connection"),
        }
    }

    /// An error answers the oldest command on the connection, whole.
    fn on_error_reply(&mut self, addr: &Addr, error: String) {
        let conn = self.conns.get_mut(addr).expect("checked by caller");
        let redirect = ["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"]
            .iter()
            .any(|p| error.starts_with(p));
        if let Some(m) = &self.shared.metrics {
            if redirect {
                m.redis_cluster_redirects.inc();
            } else {
                m.redis_errors.inc();
            }
        }
        match conn.expect.pop_front() {
            Some(Expect::Subscribe { topics, .. }) => {
                debug!(%addr, %error, count = topics.len(), "SSUBSCRIBE refused; will place again");
                for t in topics {
                    if self
                        .placed
                        .get(&t)
                        .is_some_and(|p| p.addr == *addr && !p.confirmed)
                    {
                        self.placed.remove(&t);
                    }
                }
                // Waiters keep waiting: reconciling places the topics on their owner.
                self.dirty = true;
                self.refresh_wanted = true;
            }
            Some(_) | None => debug!(%addr, %error, "error reply"),
        }
    }

    /// `t` is confirmed: resolve the requests that waited only for it.
    fn confirmed(&mut self, t: &Arc<str>) {
        let mut i = 0;
        while i < self.waiters.len() {
            let w = &mut self.waiters[i];
            w.left.remove(t);
            if w.left.is_empty() {
                let w = self.waiters.swap_remove(i);
                let _ = w.done.send(Ok(()));
            } else {
                i += 1;
            }
        }
    }

    /// Drops the connection to `addr`; its topics are placed again once a primary
    /// for their slots is reachable.
    fn lose(&mut self, addr: &Addr, why: &str) {
        let Some(conn) = self.conns.remove(addr) else {
            return;
        };
        conn.token.cancel();
        warn!(%addr, error = %why, "cluster pub/sub connection lost");
        if let Some(m) = &self.shared.metrics {
            m.redis_errors.inc();
        }
        self.placed.retain(|_, p| p.addr != *addr);
        self.lost_before.insert(addr.clone());
        let (_, backoff) = self
            .retry
            .entry(addr.clone())
            .or_insert_with(|| (Instant::now(), Backoff::default()));
        let delay = backoff.next_delay();
        self.retry.get_mut(addr).expect("inserted").0 = Instant::now() + delay;
        self.dirty = true;
        self.refresh_wanted = true;
        self.update_health();
    }

    // ----- timers -----

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let since = self.last_refresh.map(|t| now - t);
        let refresh = match since {
            None => true,
            Some(s) => {
                s >= REFRESH_EVERY || ((self.refresh_wanted || self.dirty) && s >= REFRESH_MIN_GAP)
            }
        };
        if refresh {
            self.refresh().await;
        }
        if self.dirty {
            self.reconcile().await;
        }
        self.keepalive().await;
        // Requests whose topics could not be confirmed in time.
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].deadline <= now {
                let w = self.waiters.swap_remove(i);
                let _ = w.done.send(Err(unavailable(
                    "the Redis Cluster did not confirm the subscription in time",
                )));
            } else {
                i += 1;
            }
        }
    }

    async fn refresh(&mut self) {
        self.last_refresh = Some(Instant::now());
        self.refresh_wanted = false;
        let current = self.shared.map();
        // Known primaries first (they know the newest map), then the seeds.
        let mut candidates: Vec<Addr> = current.primaries().to_vec();
        for s in &self.shared.seeds {
            if !candidates.contains(s) {
                candidates.push(s.clone());
            }
        }
        let found = topology::discover(&candidates, &self.shared.auth).await;
        if let Some(m) = &self.shared.metrics {
            m.redis_cluster_slot_map_refreshes.inc();
        }
        let map = match found {
            Ok(map) => map,
            Err(e) => {
                warn!(error = %e, "could not read the Redis Cluster slot map");
                return;
            }
        };
        if map == *current {
            return;
        }
        info!(
            shards = map.primaries().len(),
            complete = map.covers_all(),
            "Redis Cluster slot map changed"
        );
        if let Some(m) = &self.shared.metrics {
            m.redis_cluster_slot_map_changes.inc();
            m.redis_cluster_shards.set(map.primaries().len() as i64);
            // Shard numbers that no longer exist leave the per-shard gauges.
            for i in map.primaries().len()..current.primaries().len() {
                let _ = m.redis_shard_up.remove_label_values(&[&i.to_string()]);
                let _ = m.redis_shard_topics.remove_label_values(&[&i.to_string()]);
            }
        }
        let map = Arc::new(map);
        *self.shared.map.write().expect("map lock") = map.clone();
        {
            // Writers for nodes that are no longer primaries finish what they hold
            // (their replies redirect it) and stop.
            let mut pubs = self.shared.publishers.lock().expect("publishers lock");
            pubs.retain(|a, _| map.primaries().contains(a));
        }
        for a in map.primaries() {
            self.shared.publisher(a);
        }
        self.dirty = true;
    }

    /// Brings connections and placements in line with the slot map.
    async fn reconcile(&mut self) {
        let map = self.shared.map();
        // Connections: to every primary, and only to primaries.
        let stale: Vec<Addr> = self
            .conns
            .keys()
            .filter(|a| !map.primaries().contains(a))
            .cloned()
            .collect();
        for a in stale {
            if let Some(c) = self.conns.remove(&a) {
                c.token.cancel();
            }
            self.placed.retain(|_, p| p.addr != a);
        }
        for a in map.primaries().to_vec() {
            if self.conns.contains_key(&a) {
                continue;
            }
            if self
                .retry
                .get(&a)
                .is_some_and(|(at, _)| *at > Instant::now())
            {
                continue;
            }
            self.connect(&a).await;
        }
        // Topics: each on its slot's owner.
        let mut moved_from: HashMap<Addr, Vec<Arc<str>>> = HashMap::new();
        let mut want: HashMap<Addr, BTreeMap<u16, Vec<Arc<str>>>> = HashMap::new();
        let mut unplaced = false;
        for t in self.events.topics() {
            let slot = key_slot(&self.shared.channel(&t));
            let Some((_, owner)) = map.owner(slot) else {
                unplaced = true;
                continue;
            };
            if let Some(p) = self.placed.get(&t) {
                if p.addr == *owner {
                    continue;
                }
                moved_from
                    .entry(p.addr.clone())
                    .or_default()
                    .push(t.clone());
                self.placed.remove(&t);
            }
            if !self.conns.contains_key(owner) {
                unplaced = true;
                continue;
            }
            self.placed.insert(
                t.clone(),
                Placement {
                    addr: owner.clone(),
                    confirmed: false,
                },
            );
            want.entry(owner.clone())
                .or_default()
                .entry(slot)
                .or_default()
                .push(t);
        }
        for (addr, topics) in moved_from {
            // Usually the old owner has already dropped them; this is for a slot
            // that moved while its channels stayed subscribed there.
            self.send_unsubscribes(&addr, topics).await;
        }
        for (addr, slots) in want {
            let n: usize = slots.values().map(Vec::len).sum();
            if self.lost_before.contains(&addr) || n > 0 {
                if let (Some(m), Some(shard)) = (&self.shared.metrics, self.shard_label(&addr)) {
                    m.redis_shard_resubscribed_topics
                        .with_label_values(&[&shard])
                        .inc_by(n as u64);
                    m.redis_resubscribed_topics.inc_by(n as u64);
                }
            }
            info!(%addr, topics = n, "placing topics on their shard");
            self.send_subscribes(&addr, slots).await;
        }
        self.dirty = unplaced
            || !map.covers_all()
            || map.primaries().iter().any(|a| !self.conns.contains_key(a));
        self.update_health();
        self.update_topic_gauges();
    }

    async fn connect(&mut self, addr: &Addr) {
        match resp::open(&addr.host, addr.port, &self.shared.auth).await {
            Ok((reader, writer)) => {
                self.next_conn += 1;
                let id = self.next_conn;
                let token = self.shared.stop.child_token();
                let last_seen = Arc::new(AtomicU64::new(self.millis()));
                tokio::spawn(read(
                    reader,
                    addr.clone(),
                    id,
                    self.shared.clone(),
                    self.events.clone(),
                    token.clone(),
                    last_seen.clone(),
                    self.epoch,
                ));
                self.conns.insert(
                    addr.clone(),
                    Conn {
                        id,
                        writer,
                        expect: VecDeque::new(),
                        token,
                        last_seen,
                        last_ping: Instant::now(),
                    },
                );
                self.retry.remove(addr);
                if self.lost_before.contains(addr) {
                    if let Some(m) = &self.shared.metrics {
                        m.redis_reconnects.inc();
                        if let Some(shard) = self.shard_label(addr) {
                            m.redis_shard_reconnects.with_label_values(&[&shard]).inc();
                        }
                    }
                }
                info!(%addr, "cluster pub/sub connection up");
            }
            Err(e) => {
                let (at, backoff) = self
                    .retry
                    .entry(addr.clone())
                    .or_insert_with(|| (Instant::now(), Backoff::default()));
                let delay = backoff.next_delay();
                *at = Instant::now() + delay;
                debug!(%addr, error = %e, retry_in = ?delay, "cluster pub/sub connect failed");
            }
        }
    }

    fn millis(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn keepalive(&mut self) {
        let now = Instant::now();
        let now_ms = self.millis();
        let mut silent = Vec::new();
        let mut ping = Vec::new();
        for (a, c) in &self.conns {
            let quiet = now_ms.saturating_sub(c.last_seen.load(Ordering::Relaxed));
            if quiet > SILENCE.as_millis() as u64 {
                silent.push(a.clone());
            } else if now - c.last_ping >= KEEPALIVE {
                ping.push(a.clone());
            }
        }
        for a in silent {
            self.lose(&a, "no reply to keepalive");
        }
        let mut cmd = Vec::new();
        resp::encode(&mut cmd, &["PING"]);
        for a in ping {
            if let Some(c) = self.conns.get_mut(&a) {
                c.last_ping = now;
                c.expect.push_back(Expect::Ping);
            }
            self.write(&a, cmd.clone()).await;
        }
    }

    fn update_health(&self) {
        let map = self.shared.map();
        let up = map.covers_all() && map.primaries().iter().all(|a| self.conns.contains_key(a));
        self.shared.subscribe_up.store(up, Ordering::Release);
        if let Some(m) = &self.shared.metrics {
            for (i, a) in map.primaries().iter().enumerate() {
                m.redis_shard_up
                    .with_label_values(&[&i.to_string()])
                    .set(i64::from(self.conns.contains_key(a)));
            }
        }
        self.shared.refresh_up_metric();
    }

    fn update_topic_gauges(&self) {
        let Some(m) = &self.shared.metrics else {
            return;
        };
        let map = self.shared.map();
        let mut counts = vec![0i64; map.primaries().len()];
        for p in self.placed.values() {
            if let Some(i) = map.shard_of(&p.addr) {
                counts[i] += 1;
            }
        }
        for (i, n) in counts.into_iter().enumerate() {
            m.redis_shard_topics
                .with_label_values(&[&i.to_string()])
                .set(n);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The reader of one pub/sub connection: messages to the hub, everything else to
/// the manager. Never awaits anything but the next frame.
#[allow(clippy::too_many_arguments)]
async fn read(
    mut reader: Reader,
    addr: Addr,
    conn: u64,
    shared: Arc<Shared>,
    events: Arc<dyn BrokerEvents>,
    token: CancellationToken,
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
) {
    let why = loop {
        let value = tokio::select! {
            biased;
            _ = token.cancelled() => return,
            v = reader.next() => match v {
                Ok(v) => v,
                Err(e) => break e.to_string(),
            },
        };
        last_seen.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Value::Array(items) = &value {
            if items.len() == 3 && items[0].bytes() == Some(b"smessage") {
                if let (Some(channel), Some(payload)) = (items[1].bytes(), items[2].bytes()) {
                    deliver(&shared, &*events, channel, payload);
                }
                continue;
            }
        }
        let _ = shared.events.send(Event::Reply {
            addr: addr.clone(),
            conn,
            value,
        });
    };
    let _ = shared.events.send(Event::Lost { addr, conn, why });
}

fn deliver(shared: &Shared, events: &dyn BrokerEvents, channel: &[u8], payload: &[u8]) {
    let Some(topic) = shared.topic_of(channel) else {
        return;
    };
    envelope::report(events, &topic, payload);
}
