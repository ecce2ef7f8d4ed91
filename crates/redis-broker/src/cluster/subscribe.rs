//! The receiving side in cluster mode.
//!
//! The *manager* task owns the node's shard-channel subscriptions (which topics it
//! holds, on which primary) and the node's view of the cluster:
//! - Subscribe requests that arrive together are grouped per slot (one `SSUBSCRIBE`
//!   may only name channels of one slot) and sent at once; the client routes each to
//!   the slot's primary, and a request resolves when every one of its topics is
//!   confirmed (at once for topics already held).
//! - Releases become `SUNSUBSCRIBE` after the unsubscribe delay, re-checked against
//!   the node (a subscriber that came back keeps the topic), as in single mode.
//! - Every [`PROBE_EVERY`] (sooner after a lost connection or a server-pushed
//!   `sunsubscribe`) it reads the slot map and probes every shard with a `SPUBLISH`
//!   to a channel of the shard's first slot (no topic can have that name, and only
//!   the slot's owner accepts it): a shard is up while its primary accepts. Then it
//!   subscribes again, on the slot's owner, every topic the node has that
//!   * the server dropped (a `sunsubscribe` nobody asked for: the slot moved),
//!   * was held on another primary than the one now owning its slot (failover,
//!     resharding),
//!   * belongs to a shard that was down and is back (a restart, a long outage),
//!   * or any topic at all after a lost connection, once every shard is up: the client
//!     re-establishes a connection by itself but does not subscribe its shard
//!     channels again (seen with `CLIENT KILL`).
//!
//!   The commands are idempotent. Topics subscribed again are reported to the node
//!   ([`BrokerEvents::resubscribed`]), which catches their streams up from history.
//!
//! The control channel ([`Channels::control`]) is held like a topic the node always
//! has (the pseudo-topic [`CONTROL`]): placed at the first probe that finds its
//! shard up, and placed again by the rules above, so every node hears server
//! commands through restarts, failovers and slot moves. It is never released and
//! never reported as `resubscribed`.
//!
//! The *reader* task takes the pushes the client forwards: `smessage`s go straight to
//! the node ([`deliver`]: non-blocking, so Redis is drained as fast as it writes);
//! confirmations, `sunsubscribe`s and lost connections go to the manager.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use wsgate_fanout::BrokerEvents;

use crate::backoff::Backoff;
use crate::channel::CONTROL;
use crate::cluster::publish::{self, install_all, spublish};
use crate::cluster::slot::key_slot;
use crate::cluster::topology::SlotMap;
use crate::cluster::Shared;
use crate::events::deliver;
use crate::interest::Releases;
use crate::limits::{CHUNK, CONFIRM_TIMEOUT, PROBE_EVERY, PROBE_MIN_GAP, PROBE_TIMEOUT};
use crate::reply::{unavailable, Reply};

/// How often the manager looks at its timers.
const TICK: Duration = Duration::from_millis(50);

pub(crate) enum Command {
    Subscribe(Vec<Arc<str>>, Reply),
    Release(Vec<Arc<str>>),
}

/// What the reader tells the manager.
enum Signal {
    /// The server confirmed (`subscribed`) or dropped a shard channel.
    Channel { subscribed: bool, channel: Vec<u8> },
    /// A connection to some node was lost.
    Disconnected,
}

/// A topic the node holds, where it was confirmed.
struct Held {
    slot: u16,
    /// Node id of the primary that owned the slot then.
    owner: Arc<str>,
}

pub(crate) struct Manager {
    shared: Arc<Shared>,
    events: Arc<dyn BrokerEvents>,
    target: String,
    held: HashMap<Arc<str>, Held>,
    releases: Releases,
    /// Channels this node unsubscribed, until their confirmations are in (so they are
    /// not taken for server pushes).
    own_unsubscribes: HashMap<Vec<u8>, Instant>,
    /// Topics the server dropped: placed again after the next slot map.
    dropped: HashSet<Arc<str>>,
    /// Per primary (node id): whether its last probe succeeded.
    seen: HashMap<Arc<str>, bool>,
    probe_wanted: bool,
    last_probe: Option<Instant>,
    /// Probe channel per slot (`<prefix>{tag}` with the tag hashing to the slot).
    probe_channels: HashMap<u16, Vec<u8>>,
    /// Install the function library on primaries seen up (the node has streams).
    pub(crate) install_functions: bool,
    /// A connection was lost: every held topic is subscribed again at the next probe
    /// that finds every shard up.
    resync: bool,
}

impl Manager {
    pub(crate) fn new(
        shared: Arc<Shared>,
        events: Arc<dyn BrokerEvents>,
        target: String,
        unsubscribe_delay: Duration,
    ) -> Self {
        Manager {
            shared,
            events,
            target,
            held: HashMap::new(),
            releases: Releases::new(unsubscribe_delay),
            own_unsubscribes: HashMap::new(),
            dropped: HashSet::new(),
            seen: HashMap::new(),
            probe_wanted: true,
            last_probe: None,
            probe_channels: HashMap::new(),
            install_functions: false,
            resync: false,
        }
    }

    fn channel(&self, topic: &str) -> Vec<u8> {
        self.shared.channels.channel(topic)
    }

    /// Every topic to hold: the node's, and the control channel.
    fn topics(&self) -> Vec<Arc<str>> {
        let mut all = self.events.topics();
        all.push(Arc::from(CONTROL));
        all
    }

    /// Whether `topic` is wanted here (the control channel always is).
    fn wanted(&self, topic: &str) -> bool {
        topic == CONTROL || self.events.has_subscribers(topic)
    }

    pub(crate) async fn run(
        mut self,
        client: ClusterClient,
        mut rx: mpsc::UnboundedReceiver<Command>,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        mut probe_rx: mpsc::UnboundedReceiver<()>,
        jobs: mpsc::UnboundedReceiver<publish::Job>,
    ) {
        let stop = self.shared.stop.clone();
        let (signals_tx, mut signals) = mpsc::unbounded_channel();
        tokio::spawn(read(
            pushes,
            self.events.clone(),
            self.shared.clone(),
            signals_tx,
        ));
        // First connection (the client then repairs connections by itself).
        let mut backoff = Backoff::default();
        let mut conn = loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => return,
                r = client.get_async_connection() => r,
            };
            match attempt {
                Ok(c) => break c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %crate::connect::explain(&e), redis = %self.target, retry_in = ?delay, "redis cluster connection failed");
                    let until = Instant::now() + delay;
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep_until(until) => break,
                            cmd = rx.recv() => match cmd {
                                None => return,
                                Some(Command::Subscribe(_, done)) => {
                                    let _ = done.send(Err(unavailable("the Redis Cluster is not connected")));
                                }
                                Some(Command::Release(_)) => {}
                            },
                        }
                    }
                }
            }
        };
        info!(redis = %self.target, "redis cluster connection up");
        tokio::spawn(publish::writer(conn.clone(), jobs, self.shared.clone()));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = self.releases.next_at();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                s = signals.recv() => match s {
                    Some(s) => self.on_signal(s, &mut conn).await,
                    None => break,
                },
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.on_commands(cmd, &mut rx, &mut conn).await,
                    None => break,
                },
                Some(()) = probe_rx.recv() => self.probe_wanted = true,
                _ = tick.tick() => self.on_tick(&mut conn).await,
                _ = sleep_until_opt(next_due), if next_due.is_some() => self.on_due(&mut conn).await,
            }
        }
    }

    // ----- requests from the broker -----

    async fn on_commands(
        &mut self,
        first: Command,
        rx: &mut mpsc::UnboundedReceiver<Command>,
        conn: &mut ClusterConnection,
    ) {
        let map = self.shared.map();
        let mut want: BTreeMap<u16, Vec<Arc<str>>> = BTreeMap::new();
        let mut wanted: HashSet<Arc<str>> = HashSet::new();
        let mut waiters: Vec<(Vec<Arc<str>>, Reply)> = Vec::new();
        let mut cmd = Some(first);
        let mut yields = 0;
        loop {
            while let Some(c) = cmd.take().or_else(|| rx.try_recv().ok()) {
                match c {
                    Command::Subscribe(topics, done) => {
                        let mut failed = None;
                        let mut waiting = Vec::new();
                        for t in topics {
                            let slot = key_slot(&self.channel(&t));
                            let Some((shard, _)) = map.owner(slot) else {
                                failed = Some("no Redis Cluster shard owns the topic's slot");
                                break;
                            };
                            if !self.shared.health.shard_up(shard) {
                                failed = Some("the topic's Redis Cluster shard is not connected");
                                break;
                            }
                            if self.held.contains_key(&t) {
                                continue;
                            }
                            if wanted.insert(t.clone()) {
                                want.entry(slot).or_default().push(t.clone());
                            }
                            waiting.push(t);
                        }
                        match failed {
                            Some(why) => {
                                let _ = done.send(Err(unavailable(why)));
                            }
                            None if waiting.is_empty() => {
                                let _ = done.send(Ok(()));
                            }
                            None => waiters.push((waiting, done)),
                        }
                    }
                    Command::Release(topics) => {
                        self.releases.schedule(topics, Instant::now());
                    }
                }
                if wanted.len() >= CHUNK {
                    break;
                }
            }
            // Subscribes of sessions running right now join this batch: a yield lets
            // them be queued (no timer, so an idle node adds no latency).
            if wanted.len() >= CHUNK || yields == 2 {
                break;
            }
            tokio::task::yield_now().await;
            yields += 1;
            if rx.is_empty() {
                break;
            }
        }
        if !want.is_empty() {
            self.subscribe(conn, &map, want).await;
        }
        for (topics, done) in waiters {
            let ok = topics.iter().all(|t| self.held.contains_key(t));
            let _ = done.send(if ok {
                Ok(())
            } else {
                Err(unavailable(
                    "the Redis Cluster did not confirm the subscription",
                ))
            });
        }
        self.update_topic_gauges();
    }

    /// `SSUBSCRIBE`s every group (one slot each), all at once; the topics confirmed are
    /// held. Returns the topics confirmed.
    async fn subscribe(
        &mut self,
        conn: &ClusterConnection,
        map: &SlotMap,
        groups: BTreeMap<u16, Vec<Arc<str>>>,
    ) -> Vec<Arc<str>> {
        let mut sends = Vec::new();
        for (slot, topics) in groups {
            for chunk in topics.chunks(CHUNK) {
                let channels: Vec<Vec<u8>> = chunk.iter().map(|t| self.channel(t)).collect();
                let topics = chunk.to_vec();
                let mut conn = conn.clone();
                sends.push(async move {
                    let r = tokio::time::timeout(CONFIRM_TIMEOUT, conn.ssubscribe(channels)).await;
                    (slot, topics, r)
                });
            }
        }
        let mut confirmed = Vec::new();
        for (slot, topics, result) in join_all(sends).await {
            let why = match result {
                Ok(Ok(())) => {
                    let Some((_, owner)) = map.owner(slot) else {
                        continue;
                    };
                    debug!(slot, count = topics.len(), "ssubscribed");
                    for t in topics {
                        self.dropped.remove(&t);
                        confirmed.push(t.clone());
                        self.held.insert(
                            t,
                            Held {
                                slot,
                                owner: owner.id.clone(),
                            },
                        );
                    }
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "not confirmed in time".to_string(),
            };
            warn!(slot, error = %why, "SSUBSCRIBE failed");
            self.shared.health.error();
            self.probe_wanted = true;
        }
        confirmed
    }

    /// `SUNSUBSCRIBE`s `topics` (no longer held), grouped per slot.
    async fn unsubscribe(&mut self, conn: &ClusterConnection, topics: Vec<Arc<str>>) {
        let mut groups: BTreeMap<u16, Vec<Vec<u8>>> = BTreeMap::new();
        let now = Instant::now();
        for t in topics {
            let c = self.channel(&t);
            self.own_unsubscribes.insert(c.clone(), now);
            groups.entry(key_slot(&c)).or_default().push(c);
        }
        let mut sends = Vec::new();
        for channels in groups.into_values() {
            for chunk in channels.chunks(CHUNK) {
                let mut conn = conn.clone();
                let chunk = chunk.to_vec();
                sends.push(async move {
                    tokio::time::timeout(CONFIRM_TIMEOUT, conn.sunsubscribe(chunk)).await
                });
            }
        }
        for r in join_all(sends).await {
            if !matches!(r, Ok(Ok(()))) {
                // Left subscribed at worst: the messages reach no local subscriber.
                self.shared.health.error();
            }
        }
    }

    async fn on_due(&mut self, conn: &mut ClusterConnection) {
        // The node is the truth: a subscriber that came back keeps it.
        let (held, events) = (&mut self.held, &self.events);
        let gone = self.releases.take_due(Instant::now(), |t| {
            !events.has_subscribers(t) && held.remove(t).is_some()
        });
        if !gone.is_empty() {
            debug!(count = gone.len(), "sunsubscribe");
            self.unsubscribe(conn, gone).await;
            self.update_topic_gauges();
        }
    }

    // ----- what the reader saw -----

    async fn on_signal(&mut self, signal: Signal, conn: &mut ClusterConnection) {
        match signal {
            Signal::Disconnected => {
                // The client reconnects by itself but does not subscribe that
                // connection's shard channels again, and what was published meanwhile
                // is lost: subscribe everything again once every shard answers, and
                // tell the node, which catches its streams up.
                self.probe_wanted = true;
                self.resync = true;
            }
            Signal::Channel {
                subscribed: true,
                channel,
            } => {
                // A confirmation: ours, or the client's own resubscription. One for a
                // topic nobody here wants any more (a release raced it) is undone.
                let Some(topic) = self.shared.channels.topic_of(&channel) else {
                    return;
                };
                let topic: Arc<str> = Arc::from(&*topic);
                if !self.held.contains_key(&topic) && !self.wanted(&topic) {
                    debug!(%topic, "undoing a subscription nobody wants");
                    self.unsubscribe(conn, vec![topic]).await;
                }
            }
            Signal::Channel {
                subscribed: false,
                channel,
            } => {
                if self.own_unsubscribes.remove(&channel).is_some() {
                    return;
                }
                let Some(topic) = self.shared.channels.topic_of(&channel) else {
                    return;
                };
                // Pushed by the server: the slot left that node (resharding, or the
                // node stopped being a primary). Place it again where it lives now.
                let topic: Arc<str> = Arc::from(&*topic);
                self.shared.health.redirect();
                info!(%topic, "server dropped a shard channel; placing it again");
                self.held.remove(&topic);
                if self.wanted(&topic) {
                    self.dropped.insert(topic);
                }
                self.probe_wanted = true;
            }
        }
    }

    // ----- timers -----

    async fn on_tick(&mut self, conn: &mut ClusterConnection) {
        let now = Instant::now();
        let due = match self.last_probe {
            None => true,
            Some(at) => {
                let since = now - at;
                since >= PROBE_EVERY || (self.probe_wanted && since >= PROBE_MIN_GAP)
            }
        };
        if due {
            self.probe(conn).await;
        }
        self.own_unsubscribes
            .retain(|_, at| now.duration_since(*at) < 2 * CONFIRM_TIMEOUT);
    }

    fn probe_channel(&mut self, slot: u16) -> Vec<u8> {
        let prefix = self.shared.channels.prefix().to_string();
        self.probe_channels
            .entry(slot)
            .or_insert_with(|| {
                // `{tag}` hashes only the tag; topics never contain braces, so no topic
                // has this channel.
                let tag = (0u32..)
                    .map(|i| i.to_string())
                    .find(|t| key_slot(t.as_bytes()) == slot)
                    .expect("every slot has a decimal tag");
                format!("{prefix}{{{tag}}}").into_bytes()
            })
            .clone()
    }

    /// Reads the slot map, probes every shard, updates health, and places every topic
    /// that is not where the map says (see the module docs).
    async fn probe(&mut self, conn: &mut ClusterConnection) {
        self.last_probe = Some(Instant::now());
        self.probe_wanted = false;
        let current = self.shared.map();
        let read = async {
            conn.route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
        };
        let map = match tokio::time::timeout(2 * PROBE_TIMEOUT, read).await {
            Ok(Ok(v)) => SlotMap::from_cluster_slots(&v),
            Ok(Err(e)) => Err(crate::connect::explain(&e)),
            Err(_) => Err("no answer in time".into()),
        };
        let map = match map {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, redis = %self.target, "could not read the Redis Cluster slot map");
                self.shared.health.error();
                for up in self.seen.values_mut() {
                    *up = false;
                }
                let downs = vec![false; current.primaries().len()];
                self.shared.health.set_shards(&downs, false);
                return;
            }
        };
        let changed = map != *current;
        self.shared.health.slot_map_read(changed);
        if changed {
            info!(
                shards = map.primaries().len(),
                complete = map.covers_all(),
                "Redis Cluster slot map changed"
            );
        }
        let map = Arc::new(map);
        *self.shared.map.write().expect("map lock") = map.clone();
        // Every shard: does its first slot's owner accept a SPUBLISH?
        let mut probes = Vec::new();
        for i in 0..map.primaries().len() {
            let slot = map.first_slot(i);
            let channel = self.probe_channel(slot);
            let mut conn = conn.clone();
            probes.push(async move {
                let (cmd, route) = spublish(slot, &channel, b"");
                matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, conn.route_command(cmd, route)).await,
                    Ok(Ok(Value::Int(_)))
                )
            });
        }
        let ups = join_all(probes).await;
        let first = self.seen.is_empty();
        let mut back: HashSet<usize> = HashSet::new();
        let mut install = Vec::new();
        for (i, (primary, up)) in map.primaries().iter().zip(&ups).enumerate() {
            let was = self.seen.insert(primary.id.clone(), *up);
            if *up && was != Some(true) {
                install.push(map.first_slot(i));
            }
            if !*up {
                if was != Some(false) {
                    warn!(shard = i, primary = %primary.addr, "Redis Cluster shard down");
                    self.shared.health.error();
                }
            } else if was != Some(true) && !first {
                info!(shard = i, primary = %primary.addr, "Redis Cluster shard up");
                self.shared.health.reconnected(Some(i));
                back.insert(i);
            }
        }
        self.seen
            .retain(|id, _| map.primaries().iter().any(|p| p.id == *id));
        self.shared.health.set_shards(&ups, map.covers_all());
        // A primary seen up for the first time, or again, may have lost its functions
        // (a restart without persistence, a new node): install them on every primary,
        // on a task of its own (the probes go on; a call that comes first and finds no
        // function installs them itself).
        if self.install_functions && !install.is_empty() {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                let why = match tokio::time::timeout(CONFIRM_TIMEOUT, install_all(&mut conn)).await
                {
                    Ok(Ok(())) => return,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer in time".to_string(),
                };
                warn!(error = %why, "could not install the stream functions (FUNCTION LOAD); streams will not work");
            });
        }

        // Topics to place: on a shard that came back, held elsewhere than their
        // slot's owner, dropped by the server, or all held ones after a lost
        // connection (once the whole cluster answers: not while a primary is gone).
        let whole = map.covers_all() && ups.iter().all(|u| *u);
        let resync = self.resync && whole;
        if resync {
            self.resync = false;
        }
        let mut place: BTreeMap<u16, Vec<Arc<str>>> = BTreeMap::new();
        let mut placing: HashSet<Arc<str>> = HashSet::new();
        // Placed because they were not (or no longer) where the map says: counted in
        // the resubscribe metrics. A resync alone is not.
        let mut counted: HashSet<Arc<str>> = HashSet::new();
        let no_control = !self.held.contains_key(CONTROL);
        let topics =
            if back.is_empty() && self.dropped.is_empty() && !changed && !resync && !no_control {
                Vec::new()
            } else {
                self.topics()
            };
        for t in topics {
            let slot = key_slot(&self.channel(&t));
            let Some((shard, owner)) = map.owner(slot) else {
                continue;
            };
            if !ups[shard] {
                continue;
            }
            let moved = self.held.get(&t).is_some_and(|h| h.owner != owner.id);
            let missing = !self.held.contains_key(&t)
                && (self.dropped.contains(&t) || (no_control && &*t == CONTROL));
            let lost = resync && self.held.contains_key(&t);
            if (back.contains(&shard) || moved || missing) && &*t != CONTROL {
                counted.insert(t.clone());
            }
            if (back.contains(&shard) || moved || missing || lost) && placing.insert(t.clone()) {
                place.entry(slot).or_default().push(t);
            }
        }
        if !place.is_empty() {
            let n: usize = place.values().map(Vec::len).sum();
            info!(topics = n, "placing topics on their shard");
            let mut confirmed = self.subscribe(conn, &map, place).await;
            confirmed.retain(|t| &**t != CONTROL);
            let mut per_shard: BTreeMap<usize, usize> = BTreeMap::new();
            for t in confirmed.iter().filter(|t| counted.contains(*t)) {
                if let Some((shard, _)) = map.owner(key_slot(&self.channel(t))) {
                    *per_shard.entry(shard).or_default() += 1;
                }
            }
            for (shard, n) in per_shard {
                self.shared.health.resubscribed(Some(shard), n);
            }
            // What was published while they were not held is lost: the node catches
            // its streams up.
            if !confirmed.is_empty() {
                self.events.resubscribed(&confirmed);
            }
        }
        // Topics the node holds that no slot owner serves now stay held: they are
        // placed once their shard is back.
        self.update_topic_gauges();
    }

    fn update_topic_gauges(&self) {
        let map = self.shared.map();
        let mut counts = vec![0i64; map.primaries().len()];
        for (_, h) in self.held.iter().filter(|(t, _)| &***t != CONTROL) {
            if let Some((i, _)) = map.owner(h.slot) {
                counts[i] += 1;
            }
        }
        self.shared.health.shard_topics(&counts);
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn bulk(v: Option<&Value>) -> Option<&[u8]> {
    match v {
        Some(Value::BulkString(b)) => Some(b),
        _ => None,
    }
}

/// The reader: shard-channel messages to the node, everything else to the manager.
/// Never awaits anything but the next push.
async fn read(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    events: Arc<dyn BrokerEvents>,
    shared: Arc<Shared>,
    signals: mpsc::UnboundedSender<Signal>,
) {
    loop {
        let push = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            p = pushes.recv() => match p { Some(p) => p, None => return },
        };
        let signal = match push.kind {
            PushKind::SMessage => {
                if let (Some(channel), Some(payload)) =
                    (bulk(push.data.first()), bulk(push.data.get(1)))
                {
                    deliver(&*events, &shared.channels, channel, payload);
                }
                continue;
            }
            PushKind::SSubscribe | PushKind::SUnsubscribe => {
                let Some(channel) = bulk(push.data.first()) else {
                    continue;
                };
                Signal::Channel {
                    subscribed: push.kind == PushKind::SSubscribe,
                    channel: channel.to_vec(),
                }
            }
            PushKind::Disconnection => Signal::Disconnected,
            _ => continue,
        };
        if signals.send(signal).is_err() {
            return;
        }
    }
}
