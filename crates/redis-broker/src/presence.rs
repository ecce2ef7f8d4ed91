//! Presence, join/leave, server commands and the node list in Redis, the same in both
//! modes (docs/redis.md, "Presence, join/leave and the node list").
//!
//! Each broker is one *member* of the cluster, `<node id>/<instance>` (8 random hex
//! digits; a new instance when it finds it was declared dead). Its keys:
//! - per topic, the hash `key_base(channel):presence` (in the channel's slot): field
//!   `<member>|<session>`, value the user (empty for none);
//! - in the `{nodes}` slot: the live members `<prefix>{nodes}` (a sorted set scored
//!   with each member's last heartbeat, Redis `TIME` in ms), the dead ones being
//!   cleaned `<prefix>{nodes}:dead` (scored with the claim), the node info
//!   `<prefix>{nodes}:info` (member → [`NodeInfo`] JSON), and per member the topics it
//!   has entries on, `<prefix>{nodes}:topics:<member>`.
//!
//! Writes go through the mode's ordered writer ([`Writer`]), keyed by what they
//! touch: a topic's entry and its join/leave (on the topic's channel, see
//! [`crate::envelope`]) are queued with the topic's publications, in call order.
//!
//! The membership task ([`Presence::run`]) heartbeats every `timeout / 6` with one
//! script ([`HEARTBEAT`]): it refreshes this member's score and info, moves members
//! silent for longer than the lease (`timeout / 2`) to the dead set and claims them
//! (and dead members whose cleaner did not finish within a lease). The claimer
//! removes a dead member's entries topic by topic with [`SYNC`] (announcing a
//! `leave` for each where join/leave is on), then forgets the member. A member
//! that finds itself new (a Redis restart or flush), dead (it was cut off longer
//! than the lease), or whose writes failed, or whose connection came back, writes
//! its node's entries again from [`BrokerEvents::presence_snapshot`] with the same
//! script (a *resync*).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::Value;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wsgate_fanout::{
    BrokerError, BrokerEvents, BrokerFuture, NodeInfo, PresenceEntry, PresenceEvent, PresenceKind,
};
use wsgate_metrics::Metrics;

use crate::channel::Channels;
use crate::envelope;
use crate::health::Health;
use crate::job::Job;
use crate::reply::unavailable;
use crate::streams::key_base;

/// Default bound between a node's death and its entries leaving every presence list.
pub const DEFAULT_PRESENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Soonest retry of a heartbeat that failed.
const RETRY: Duration = Duration::from_millis(250);

/// How long a broker back from a gap in its heartbeats waits before it declares
/// others dead (when the lease is shorter): the other nodes may come back later, by
/// up to a reconnect backoff (2 s) and a cluster probe (1 s).
const RECOVERY_GRACE: Duration = Duration::from_secs(5);

/// Earlier instances of this broker whose stray entries resyncs purge, at most.
const OLD_INSTANCES: usize = 8;

/// Where presence sends its commands: the mode's ordered writer.
pub(crate) trait Writer: Send + Sync + 'static {
    /// Queues `job` where `key` lives (single mode: the one Redis; cluster mode: the
    /// primary of `key`'s slot), after everything queued there before. Fails at once
    /// when that place is not connected.
    fn queue(&self, key: &[u8], job: Job) -> Result<(), BrokerError>;

    /// `PUBLISH` or `SPUBLISH`.
    fn publish_command(&self) -> &'static str;
}

/// Refreshes this member, claims the dead. Every key in the `{nodes}` slot.
///
/// KEYS: live set, dead set, info hash. ARGV: member, info JSON, lease (ms), prefix
/// of the topic-set keys, `since` of the previous reply (0 at first), grace (ms).
/// Returns `{-1}` when this member is being cleaned as dead; else `{added, live
/// members, {dead member, its topics}…, since}`.
///
/// `since` is when this member's current run of heartbeats began (each within a
/// lease of the previous one), and only a member whose run is `grace` long claims
/// others: after an outage of Redis (or of this member's link to it) every member
/// gets that long to heartbeat again, rather than the first one back declaring
/// the others dead.
const HEARTBEAT: &str = r"
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {-1, {}, {}}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = string.format('%.0f', now)
local lease = tonumber(ARGV[3])
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
local since = tonumber(ARGV[5])
if not previous or tonumber(previous) < now - lease or since == 0 then
  since = now
end
local added = redis.call('ZADD', KEYS[1], stamp, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
if now - since < tonumber(ARGV[6]) then
  return {added, redis.call('ZRANGE', KEYS[1], 0, -1), {}, since}
end
local before = '(' .. string.format('%.0f', now - lease)
local claimed = {}
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', before)) do
  redis.call('ZREM', KEYS[1], m)
  table.insert(claimed, m)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', before)) do
  table.insert(claimed, m)
end
local out = {}
for _, m in ipairs(claimed) do
  redis.call('ZADD', KEYS[2], stamp, m)
  table.insert(out, m)
  table.insert(out, redis.call('SMEMBERS', ARGV[4] .. m))
end
return {added, redis.call('ZRANGE', KEYS[1], 0, -1), out, since}
";

/// Takes a member out of the node list at the end of its drain, unless its topic set
/// still names a topic (an entry is left: the lease's end and the cleanup of a dead
/// member take care of it, as for a node that stopped without draining).
///
/// KEYS: the live set, the info hash, the member's topic set. ARGV: member.
/// Returns 1 when the member left, 0 when it stays until its lease ends.
const LEAVE: &str = r"
if redis.call('SCARD', KEYS[3]) > 0 then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";

/// Makes one member's entries in one topic's presence hash exactly the given ones,
/// announcing what changed (a resync; with no entries, the cleanup of a dead member).
///
/// KEYS: the hash. ARGV: member, channel, `PUBLISH`/`SPUBLISH`, `1` to announce, `n`,
/// `n` other members whose entries are dropped silently (this node's earlier
/// instances), then session, user pairs (user empty for none). Returns
/// `{joined, left}`.
const SYNC: &str = r"
local member, channel, publish = ARGV[1], ARGV[2], ARGV[3]
local announce = ARGV[4] == '1'
local n = tonumber(ARGV[5])
local own = member .. '|'
local purge = {}
for i = 6, 5 + n do table.insert(purge, ARGV[i] .. '|') end
local want = {}
for i = 6 + n, #ARGV, 2 do want[own .. ARGV[i]] = true end
local function event(op, field, user)
  if not announce then return end
  local u = cjson.null
  if user ~= '' then u = user end
  local e = cjson.encode({op = op, session = string.sub(field, #own + 1), user = u})
  redis.call(publish, channel, '\255WSE1' .. e)
end
local left = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  if string.sub(f, 1, #own) == own then
    if not want[f] then
      redis.call('HDEL', KEYS[1], f)
      event('leave', f, v)
      left = left + 1
    end
  else
    for _, p in ipairs(purge) do
      if string.sub(f, 1, #p) == p then
        redis.call('HDEL', KEYS[1], f)
        break
      end
    end
  end
end
local joined = 0
for i = 6 + n, #ARGV, 2 do
  local f = own .. ARGV[i]
  if redis.call('HSETNX', KEYS[1], f, ARGV[i + 1]) == 1 then
    event('join', f, ARGV[i + 1])
    joined = joined + 1
  end
end
return {joined, left}
";

/// The `{nodes}` keys.
struct Keys {
    live: Vec<u8>,
    dead: Vec<u8>,
    info: Vec<u8>,
    /// Prefix of each member's topic set.
    topics: Vec<u8>,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let key = |suffix: &str| format!("{prefix}{{nodes}}{suffix}").into_bytes();
        Keys {
            live: key(""),
            dead: key(":dead"),
            info: key(":info"),
            topics: key(":topics:"),
        }
    }

    fn topics_of(&self, member: &str) -> Vec<u8> {
        [&self.topics[..], member.as_bytes()].concat()
    }
}

/// The presence hash of `channel`'s topic (in the channel's slot).
pub fn presence_key(channel: &[u8]) -> Vec<u8> {
    [&key_base(channel)[..], b":presence"].concat()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A new member id for node `node`.
fn new_member(node: &str) -> Arc<str> {
    Arc::from(format!("{node}/{:08x}", rand::random::<u32>()))
}

/// The hash field of `member`'s `session`.
fn field(member: &str, session: &str) -> String {
    format!("{member}|{session}")
}

/// Splits a field into member and session. The member ends in `/` and 8 hex digits,
/// which is what finds the separator whatever the node id holds.
pub(crate) fn split_field(f: &str) -> Option<(&str, &str)> {
    let b = f.as_bytes();
    b.iter().enumerate().find_map(|(i, &c)| {
        let ok = c == b'|'
            && i >= 9
            && b[i - 9] == b'/'
            && b[i - 8..i].iter().all(u8::is_ascii_hexdigit)
            && i + 1 < b.len();
        ok.then(|| (&f[..i], &f[i + 1..]))
    })
}

/// The node id of a member.
fn node_of(member: &str) -> &str {
    member.rsplit_once('/').map_or(member, |(n, _)| n)
}

/// The presence and membership of one broker.
pub(crate) struct Presence {
    writer: Arc<dyn Writer>,
    channels: Channels,
    events: Arc<dyn BrokerEvents>,
    health: Arc<Health>,
    metrics: Option<Metrics>,
    keys: Keys,
    timeout: Duration,
    /// This broker's member id, once the node's id is known.
    member: RwLock<Option<Arc<str>>>,
    /// Its earlier instances (declared dead): their stray entries go at resyncs.
    old: Mutex<Vec<Arc<str>>>,
    /// Whether a heartbeat listed this member (its entries are visible).
    registered: watch::Sender<bool>,
    /// A write failed: the next heartbeat resyncs.
    dirty: AtomicBool,
    /// Topics where a write failed: resynced even when neither the node nor Redis
    /// lists them for this member any more.
    suspects: Mutex<HashSet<Arc<str>>>,
    /// This node's entries per topic, and the `SADD` that put the topic in the
    /// member's topic set. `SADD` and `SREM` are queued under this lock, when a
    /// topic's count leaves or comes back to 0, so their order in Redis is the
    /// order of the counts (two connections joining and leaving one topic at once
    /// never leave the topic out of the set while an entry is there), and a
    /// topic is added once, not at every subscribe.
    listed: Mutex<HashMap<Arc<str>, Listed>>,
    /// Set by [`Presence::leave`]: no heartbeat after it.
    left: AtomicBool,
}

/// One topic in [`Presence::listed`].
struct Listed {
    entries: usize,
    /// The `SADD`'s answer, awaited by every add (at once when it is done).
    added: Shared<BoxFuture<'static, Result<(), BrokerError>>>,
}

type Answer = oneshot::Receiver<Result<Value, BrokerError>>;

impl Presence {
    pub(crate) fn new(
        writer: Arc<dyn Writer>,
        channels: Channels,
        events: Arc<dyn BrokerEvents>,
        health: Arc<Health>,
        metrics: Option<Metrics>,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Presence {
            writer,
            keys: Keys::new(channels.prefix()),
            channels,
            events,
            health,
            metrics,
            timeout,
            member: RwLock::new(None),
            old: Mutex::new(Vec::new()),
            registered: watch::Sender::new(false),
            dirty: AtomicBool::new(false),
            suspects: Mutex::default(),
            listed: Mutex::default(),
            left: AtomicBool::new(false),
        })
    }

    /// This broker's member id (made from `node`, or the node's info, the first time).
    fn member(&self, node: Option<&str>) -> Option<Arc<str>> {
        if let Some(m) = self.member.read().expect("member lock").clone() {
            return Some(m);
        }
        let node = match node {
            Some(n) => n.to_owned(),
            None => self.events.node_info()?.node,
        };
        let mut m = self.member.write().expect("member lock");
        Some(m.get_or_insert_with(|| new_member(&node)).clone())
    }

    /// Queues `cmd` where `key` lives; the receiver of its reply.
    fn call(&self, key: &[u8], cmd: redis::Cmd) -> Result<Answer, BrokerError> {
        let (job, rx) = Job::call(cmd);
        self.writer.queue(key, job)?;
        Ok(rx)
    }

    fn publish_cmd(&self, channel: &[u8], payload: &[u8]) -> redis::Cmd {
        let mut c = redis::cmd(self.writer.publish_command());
        c.arg(channel).arg(payload);
        c
    }

    /// A write of ours on `topic` failed: counted, and the next heartbeat resyncs
    /// (that topic too, whatever the node and Redis list).
    fn failed(&self, topic: Arc<str>) {
        if let Some(m) = &self.metrics {
            m.presence_errors.inc();
        }
        self.suspects.lock().expect("suspects lock").insert(topic);
        self.dirty.store(true, Ordering::Release);
    }

    /// Watches writes on `topic` nobody awaits; a failure makes the broker resync.
    fn watch(self: &Arc<Self>, topic: &str, answers: Vec<Result<Answer, BrokerError>>) {
        let topic: Arc<str> = Arc::from(topic);
        if answers.iter().any(Result::is_err) {
            return self.failed(topic);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if answers.is_empty() {
            return;
        }
        let me = Arc::downgrade(self);
        runtime.spawn(async move {
            let mut ok = true;
            for a in answers {
                ok &= match a {
                    Ok(rx) => matches!(rx.await, Ok(Ok(_))),
                    Err(_) => false,
                };
            }
            if !ok {
                if let Some(me) = me.upgrade() {
                    me.failed(topic);
                }
            }
        });
    }

    /// The `join`/`leave` of `entry` on `channel`, queued after its write.
    fn announce(
        &self,
        channel: &[u8],
        kind: PresenceKind,
        entry: &PresenceEntry,
    ) -> Result<Answer, BrokerError> {
        let event = PresenceEvent {
            kind,
            session: entry.session.clone(),
            user: entry.user.clone(),
        };
        self.call(
            channel,
            self.publish_cmd(channel, &envelope::encode_presence(&event)),
        )
    }

    /// [`wsgate_fanout::Broker::presence_add`]: `SADD` to this member's topics (so
    /// that a cleaner finds the topic), `HSET` and the join in the topic's order;
    /// resolves when both are written and this member is live.
    pub(crate) fn add(
        self: &Arc<Self>,
        topic: &str,
        entry: &PresenceEntry,
        announce: bool,
    ) -> BrokerFuture {
        let member = self.member(Some(&entry.node)).expect("a node id was given");
        let channel = self.channels.channel(topic);
        let listed = match self.listed_add(topic, &member) {
            Ok(l) => l,
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                return BrokerFuture::ready(Err(e));
            }
        };
        let mut hset = redis::cmd("HSET");
        hset.arg(presence_key(&channel))
            .arg(field(&member, &entry.session))
            .arg(entry.user.as_deref().unwrap_or(""));
        let written = match self.call(&channel, hset) {
            Ok(written) => written,
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                return BrokerFuture::ready(Err(e));
            }
        };
        if announce {
            let join = self.announce(&channel, PresenceKind::Join, entry);
            self.watch(topic, vec![join]);
        }
        let me: Weak<Self> = Arc::downgrade(self);
        let mut registered = self.registered.subscribe();
        let timeout = self.timeout;
        BrokerFuture::pending(async move {
            let hset = match written.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BrokerError::Closed),
            };
            for outcome in [listed.await, hset] {
                if outcome.is_err() {
                    if let Some(me) = me.upgrade() {
                        me.dirty.store(true, Ordering::Release);
                    }
                    return outcome;
                }
            }
            // Listed, but other nodes only see the entries of live members.
            match tokio::time::timeout(timeout, registered.wait_for(|r| *r)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(_)) => Err(BrokerError::Closed),
                Err(_) => Err(unavailable("this node is not registered in redis yet")),
            }
        })
    }

    /// [`wsgate_fanout::Broker::presence_remove`]: `HDEL` (and the leave) in the
    /// topic's order; `SREM` from this member's topics when it was the last.
    pub(crate) fn remove(self: &Arc<Self>, topic: &str, entry: &PresenceEntry, announce: bool) {
        let Some(member) = self.member(Some(&entry.node)) else {
            return;
        };
        let channel = self.channels.channel(topic);
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(presence_key(&channel))
            .arg(field(&member, &entry.session));
        let mut answers = vec![self.call(&channel, hdel)];
        if announce {
            answers.push(self.announce(&channel, PresenceKind::Leave, entry));
        }
        // This broker's own count of the member's entries on the topic orders SREM
        // against another connection's SADD (the calls here are not under the
        // node's lock).
        if let Some(srem) = self.listed_remove(topic, &member) {
            answers.push(srem);
        }
        self.watch(topic, answers);
    }

    /// Counts an entry of ours on `topic`; the first one queues the `SADD` to the
    /// member's topic set. The `SADD`'s outcome (shared by every entry of the topic).
    fn listed_add(
        &self,
        topic: &str,
        member: &str,
    ) -> Result<Shared<BoxFuture<'static, Result<(), BrokerError>>>, BrokerError> {
        let mut listed = self.listed.lock().expect("listed lock");
        let entries = match listed.get_mut(topic) {
            // A failed SADD is tried again by the next entry.
            Some(l) if !matches!(l.added.peek(), Some(Err(_))) => {
                l.entries += 1;
                return Ok(l.added.clone());
            }
            Some(l) => l.entries + 1,
            None => 1,
        };
        let mut sadd = redis::cmd("SADD");
        sadd.arg(self.keys.topics_of(member)).arg(topic);
        let rx = self.call(&self.keys.live, sadd)?;
        let added = async move {
            match rx.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(BrokerError::Closed),
            }
        }
        .boxed()
        .shared();
        listed.insert(
            Arc::from(topic),
            Listed {
                entries,
                added: added.clone(),
            },
        );
        Ok(added)
    }

    /// Uncounts an entry of ours on `topic`; the last one queues the `SREM`.
    fn listed_remove(&self, topic: &str, member: &str) -> Option<Result<Answer, BrokerError>> {
        let mut listed = self.listed.lock().expect("listed lock");
        let l = listed.get_mut(topic)?;
        l.entries -= 1;
        if l.entries > 0 {
            return None;
        }
        listed.remove(topic);
        let mut srem = redis::cmd("SREM");
        srem.arg(self.keys.topics_of(member)).arg(topic);
        Some(self.call(&self.keys.live, srem))
    }

    /// The live members, and the reply of `cmd` (queued at `key`), read side by side.
    fn with_live<T: Send + 'static>(
        self: &Arc<Self>,
        key: &[u8],
        cmd: redis::Cmd,
        make: fn(&Presence, HashSet<Arc<str>>, &Value) -> T,
    ) -> BrokerFuture<T> {
        let mut zrange = redis::cmd("ZRANGE");
        zrange.arg(&self.keys.live).arg(0).arg(-1);
        let (read, live) = match (self.call(key, cmd), self.call(&self.keys.live, zrange)) {
            (Ok(r), Ok(l)) => (r, l),
            (Err(e), _) | (_, Err(e)) => return BrokerFuture::ready(Err(e)),
        };
        let me = self.clone();
        BrokerFuture::pending(async move {
            let (read, live) = tokio::join!(read, live);
            let read = read.map_err(|_| BrokerError::Closed)??;
            let live = live.map_err(|_| BrokerError::Closed)??;
            let mut members: HashSet<Arc<str>> =
                strings(&live).into_iter().map(Arc::from).collect();
            members.extend(me.member(None));
            Ok(make(&me, members, &read))
        })
    }

    /// [`wsgate_fanout::Broker::presence`]: the topic's entries of live members
    /// (and this one's), by session.
    pub(crate) fn list(self: &Arc<Self>, topic: &str) -> BrokerFuture<Vec<PresenceEntry>> {
        let channel = self.channels.channel(topic);
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(presence_key(&channel));
        self.with_live(&channel, hgetall, |_, live, hash| {
            let mut list: Vec<PresenceEntry> = pairs(hash)
                .into_iter()
                .filter_map(|(f, user)| {
                    let (member, session) = split_field(&f)?;
                    live.contains(member).then(|| PresenceEntry {
                        session: Arc::from(session),
                        user: (!user.is_empty()).then(|| Arc::from(user.as_str())),
                        node: Arc::from(node_of(member)),
                    })
                })
                .collect();
            list.sort_by(|a, b| a.session.cmp(&b.session).then(a.node.cmp(&b.node)));
            list
        })
    }

    /// [`wsgate_fanout::Broker::nodes`]: the info of every live member (this one's
    /// fresh from the node), by node id.
    pub(crate) fn nodes(self: &Arc<Self>) -> BrokerFuture<Vec<NodeInfo>> {
        let mut hgetall = redis::cmd("HGETALL");
        hgetall.arg(&self.keys.info);
        self.with_live(&self.keys.live.clone(), hgetall, |me, live, info| {
            let own = me.member(None);
            let mut list: Vec<NodeInfo> = pairs(info)
                .into_iter()
                .filter(|(m, _)| live.contains(m.as_str()) && own.as_deref() != Some(m))
                .filter_map(|(_, json)| serde_json::from_str(&json).ok())
                .collect();
            list.extend(me.events.node_info());
            list.sort_by(|a, b| a.node.cmp(&b.node));
            list
        })
    }

    /// [`wsgate_fanout::Broker::control`]: `PUBLISH` on the control channel; how many
    /// subscribers (nodes) got it.
    pub(crate) fn control(&self, command: &[u8]) -> BrokerFuture<Option<usize>> {
        let channel = self.channels.control();
        match self.call(&channel, self.publish_cmd(&channel, command)) {
            Ok(rx) => crate::job::answer_with(rx, |v| match v {
                Value::Int(n) => Ok(usize::try_from(*n).ok()),
                _ => Err(unavailable("redis: unexpected reply to a publish")),
            }),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    /// [`wsgate_fanout::Broker::leave`]: stops the heartbeats, then takes this
    /// member out of the node list, in the same queue as its last topic-set writes
    /// (so that the `SREM`s of connections closed by the drain come first). An error
    /// when an entry of it was still listed: it then leaves when its lease ends.
    pub(crate) fn leave(self: &Arc<Self>) -> BrokerFuture {
        self.left.store(true, Ordering::Release);
        let Some(member) = self.member(None) else {
            // Never registered: nothing to take out.
            return BrokerFuture::ready(Ok(()));
        };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LEAVE)
            .arg(3)
            .arg(&self.keys.live)
            .arg(&self.keys.info)
            .arg(self.keys.topics_of(&member))
            .arg(&*member);
        match self.call(&self.keys.live, cmd) {
            Ok(rx) => crate::job::answer_with(rx, |v| match v {
                Value::Int(1) => Ok(()),
                Value::Int(_) => Err(unavailable(
                    "presence entries of this node are still listed: it leaves when its lease ends",
                )),
                _ => Err(unavailable("redis: unexpected reply to leave")),
            }),
            Err(e) => BrokerFuture::ready(Err(e)),
        }
    }

    // ----- membership -----

    /// The membership task: heartbeats, claims and cleans dead members, resyncs.
    /// Runs until `stop`.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        // The node says who it is shortly after start.
        while self.events.node_info().is_none() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let every = self.timeout / 6;
        let mut seen = Seen {
            reconnects: self.health.reconnects(),
            registered: false,
            since: 0,
        };
        let mut next = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(next) => {}
            }
            if self.left.load(Ordering::Acquire) {
                return;
            }
            let started = Instant::now();
            next = match self.beat(&mut seen).await {
                Ok(()) => started + every,
                Err(e) => {
                    debug!(error = %e, "presence heartbeat failed");
                    Instant::now() + every.min(RETRY)
                }
            };
        }
    }

    /// One heartbeat, and what it calls for.
    async fn beat(self: &Arc<Self>, seen: &mut Seen) -> Result<(), BrokerError> {
        let info = self
            .events
            .node_info()
            .ok_or_else(|| unavailable("no node info"))?;
        let json = serde_json::to_string(&info).expect("node info serializes");
        let reconnects = self.health.reconnects();
        let mut was_dead = false;
        let beat = loop {
            let member = self.member(Some(&info.node)).expect("a node id");
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(HEARTBEAT)
                .arg(3)
                .arg(&self.keys.live)
                .arg(&self.keys.dead)
                .arg(&self.keys.info)
                .arg(&*member)
                .arg(&json)
                .arg(millis(self.timeout / 2))
                .arg(&self.keys.topics)
                .arg(seen.since)
                .arg(millis((self.timeout / 2).max(RECOVERY_GRACE)));
            let reply = self
                .call(&self.keys.live, cmd)?
                .await
                .map_err(|_| BrokerError::Closed)??;
            let beat = Beat::parse(&reply)
                .ok_or_else(|| unavailable("redis: unexpected heartbeat reply"))?;
            if !beat.dead {
                break beat;
            }
            // Declared dead (cut off for longer than the lease) and being cleaned:
            // go on as a new instance, and write every entry again.
            warn!(%member, "this node was declared dead in redis; registering again");
            was_dead = true;
            let fresh = new_member(&info.node);
            {
                let mut old = self.old.lock().expect("old lock");
                old.push(member);
                let extra = old.len().saturating_sub(OLD_INSTANCES);
                old.drain(..extra);
            }
            *self.member.write().expect("member lock") = Some(fresh);
        };
        if let Some(m) = &self.metrics {
            m.cluster_nodes
                .set(i64::try_from(beat.live.len()).unwrap_or(i64::MAX));
        }
        for (dead, topics) in beat.claimed {
            tokio::spawn(self.clone().clean(dead, topics));
        }
        let resync = seen.registered
            && (was_dead
                || beat.added
                || reconnects != seen.reconnects
                || self.dirty.swap(false, Ordering::AcqRel));
        seen.registered = true;
        seen.reconnects = reconnects;
        seen.since = beat.since;
        self.registered.send_replace(true);
        if resync {
            if let Some(m) = &self.metrics {
                m.presence_resyncs.inc();
            }
            if let Err(e) = self.resync().await {
                self.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes this node's entries again: every topic of the node's snapshot, and
    /// every topic Redis lists for this member, made exactly what the node has.
    async fn resync(self: &Arc<Self>) -> Result<(), BrokerError> {
        let member = self
            .member(None)
            .ok_or_else(|| unavailable("no member yet"))?;
        let old: Vec<Arc<str>> = self.old.lock().expect("old lock").clone();
        let mut smembers = redis::cmd("SMEMBERS");
        smembers.arg(self.keys.topics_of(&member));
        let listed = self
            .call(&self.keys.live, smembers)?
            .await
            .map_err(|_| BrokerError::Closed)??;
        // From the snapshot to the last command queued nothing awaits: a join or a
        // leave the node makes after the snapshot is queued after the script that
        // wrote the snapshot's state.
        let snapshot = self.events.presence_snapshot();
        // Forgotten once this resync succeeded.
        let suspects = self.suspects.lock().expect("suspects lock").clone();
        let mut topics: BTreeMap<Arc<str>, Vec<PresenceEntry>> = BTreeMap::new();
        for t in strings(&listed) {
            topics.insert(Arc::from(t), Vec::new());
        }
        for t in &suspects {
            topics.insert(t.clone(), Vec::new());
        }
        let mut srem = redis::cmd("SREM");
        srem.arg(self.keys.topics_of(&member));
        let mut stale = false;
        for (t, entries) in &snapshot {
            topics.insert(t.clone(), entries.clone());
        }
        for (t, entries) in &topics {
            if entries.is_empty() {
                srem.arg(&**t);
                stale = true;
            }
        }
        let mut answers = Vec::new();
        for (t, entries) in &topics {
            answers.push(self.sync(t, &member, entries, &old)?);
        }
        if !snapshot.is_empty() {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(self.keys.topics_of(&member));
            for (t, _) in &snapshot {
                sadd.arg(&**t);
            }
            answers.push(self.call(&self.keys.live, sadd)?);
        }
        if stale {
            answers.push(self.call(&self.keys.live, srem)?);
        }
        if !old.is_empty() {
            let mut del = redis::cmd("DEL");
            for m in &old {
                del.arg(self.keys.topics_of(m));
            }
            answers.push(self.call(&self.keys.live, del)?);
        }
        let mut joined = 0;
        for a in answers {
            let v = a.await.map_err(|_| BrokerError::Closed)??;
            joined += counts(&v).0;
        }
        self.suspects
            .lock()
            .expect("suspects lock")
            .retain(|t| !suspects.contains(t));
        info!(
            topics = topics.len(),
            joined, "presence written again to redis"
        );
        Ok(())
    }

    /// Queues [`SYNC`] of `member`'s entries on `topic`.
    fn sync(
        &self,
        topic: &str,
        member: &str,
        entries: &[PresenceEntry],
        purge: &[Arc<str>],
    ) -> Result<Answer, BrokerError> {
        let channel = self.channels.channel(topic);
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SYNC)
            .arg(1)
            .arg(presence_key(&channel))
            .arg(member)
            .arg(&channel)
            .arg(self.writer.publish_command())
            .arg(if self.events.announces(topic) {
                "1"
            } else {
                "0"
            })
            .arg(purge.len());
        for p in purge {
            cmd.arg(&**p);
        }
        for e in entries {
            cmd.arg(&*e.session).arg(e.user.as_deref().unwrap_or(""));
        }
        self.call(&channel, cmd)
    }

    /// Removes a dead member's entries (with their leaves), then the member.
    async fn clean(self: Arc<Self>, dead: String, topics: Vec<String>) {
        let mut removed = 0;
        let mut answers = Vec::new();
        for t in &topics {
            match self.sync(t, &dead, &[], &[]) {
                Ok(a) => answers.push(a),
                Err(e) => {
                    // Claimed again by someone once the lease is over.
                    debug!(member = %dead, error = %e, "could not clean a dead node's presence");
                    return;
                }
            }
        }
        for a in answers {
            match a.await {
                Ok(Ok(v)) => removed += counts(&v).1,
                _ => return,
            }
        }
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.topics_of(&dead));
        let mut hdel = redis::cmd("HDEL");
        hdel.arg(&self.keys.info).arg(&dead);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(&self.keys.dead).arg(&dead);
        let done = [del, hdel, zrem].map(|c| self.call(&self.keys.live, c));
        for d in done {
            let ok = match d {
                Ok(rx) => matches!(rx.await, Ok(Ok(_))),
                Err(_) => false,
            };
            if !ok {
                return;
            }
        }
        if let Some(m) = &self.metrics {
            m.presence_dead_nodes.inc();
            m.presence_ghosts_removed.inc_by(removed);
        }
        info!(member = %dead, entries = removed, topics = topics.len(), "a dead node's presence was removed");
    }
}

/// What the membership task remembers between heartbeats.
struct Seen {
    reconnects: u64,
    registered: bool,
    /// When this member's run of heartbeats began (Redis time, ms; 0: none yet).
    since: i64,
}

/// A heartbeat's reply.
struct Beat {
    /// This member is being cleaned as dead.
    dead: bool,
    /// This member was not in the live set (a Redis restart or flush).
    added: bool,
    live: Vec<String>,
    /// Dead members this node claimed, with their topics.
    claimed: Vec<(String, Vec<String>)>,
    /// When this member's run of heartbeats began.
    since: i64,
}

impl Beat {
    fn parse(v: &Value) -> Option<Beat> {
        let all = items(v);
        let status = match all.first()? {
            Value::Int(n) => *n,
            _ => return None,
        };
        if status < 0 {
            return Some(Beat {
                dead: true,
                added: false,
                live: Vec::new(),
                claimed: Vec::new(),
                since: 0,
            });
        }
        let claimed = all
            .get(2)
            .map(|c| {
                items(c)
                    .chunks(2)
                    .filter_map(|p| Some((text(p.first()?)?, strings(p.get(1)?))))
                    .collect()
            })
            .unwrap_or_default();
        Some(Beat {
            dead: false,
            added: status > 0,
            live: strings(all.get(1)?),
            claimed,
            since: match all.get(3) {
                Some(Value::Int(n)) => *n,
                _ => 0,
            },
        })
    }
}

fn items(v: &Value) -> &[Value] {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => &[],
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    items(v).iter().filter_map(text).collect()
}

/// A hash's fields and values (a RESP3 map or a RESP2 flat array).
fn pairs(v: &Value) -> Vec<(String, String)> {
    match v {
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, text(v)?)))
            .collect(),
        _ => items(v)
            .chunks(2)
            .filter_map(|p| Some((text(p.first()?)?, text(p.get(1)?)?)))
            .collect(),
    }
}

/// `{joined, left}` of a [`SYNC`] reply (zeros for anything else).
fn counts(v: &Value) -> (u64, u64) {
    let n = |i: usize| match items(v).get(i) {
        Some(Value::Int(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    (n(0), n(1))
}

/// The [`wsgate_fanout::Broker`] presence methods of a broker with a `presence:
/// Arc<Presence>` field, the same in both modes.
macro_rules! broker_presence_methods {
    () => {
        fn presence_add(
            &self,
            topic: &str,
            entry: &wsgate_fanout::PresenceEntry,
            announce: bool,
        ) -> wsgate_fanout::BrokerFuture {
            self.presence.add(topic, entry, announce)
        }

        fn presence_remove(
            &self,
            topic: &str,
            entry: &wsgate_fanout::PresenceEntry,
            announce: bool,
        ) {
            self.presence.remove(topic, entry, announce);
        }

        fn presence(
            &self,
            topic: &str,
        ) -> wsgate_fanout::BrokerFuture<Vec<wsgate_fanout::PresenceEntry>> {
            self.presence.list(topic)
        }

        fn control(&self, command: &[u8]) -> wsgate_fanout::BrokerFuture<Option<usize>> {
            self.presence.control(command)
        }

        fn nodes(&self) -> wsgate_fanout::BrokerFuture<Vec<wsgate_fanout::NodeInfo>> {
            self.presence.nodes()
        }

        fn leave(&self) -> wsgate_fanout::BrokerFuture {
            self.presence.leave()
        }
    };
}
pub(crate) use broker_presence_methods;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_at_the_member_whatever_the_ids_hold() {
        let m = new_member("node|a/b");
        let f = field(&m, "sess|1");
        assert_eq!(split_field(&f), Some((&*m, "sess|1")));
        assert_eq!(node_of(&m), "node|a/b");
        assert_eq!(split_field("n/0123abcd|s"), Some(("n/0123abcd", "s")));
        assert_eq!(split_field("n/0123abcd|"), None);
        assert_eq!(split_field("n/0123abcg|s"), None);
        assert_eq!(split_field("junk"), None);
    }

    #[test]
    fn every_nodes_key_is_in_one_slot_and_presence_in_the_channels() {
        use crate::cluster::slot::key_slot;
        let k = Keys::new("wsgate:");
        let slot = key_slot(&k.live);
        for key in [&k.dead, &k.info, &k.topics_of("n/0123abcd")] {
            assert_eq!(key_slot(key), slot);
        }
        assert_eq!(k.live, b"wsgate:{nodes}");
        let c = Channels::new("wsgate:", Some(b'.'));
        for t in ["room1.chat", "news"] {
            let ch = c.channel(t);
            assert_eq!(key_slot(&presence_key(&ch)), key_slot(&ch), "{t}");
        }
        assert_eq!(presence_key(b"wsgate:news"), b"{wsgate:news}:presence");
    }

    #[test]
    fn heartbeat_replies_parse() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let v = Value::Array(vec![
            Value::Int(1),
            Value::Array(vec![bulk("a/00000000"), bulk("b/00000001")]),
            Value::Array(vec![bulk("c/00000002"), Value::Array(vec![bulk("t1")])]),
            Value::Int(1_700_000_000_123),
        ]);
        let b = Beat::parse(&v).unwrap();
        assert!(b.added && !b.dead);
        assert_eq!(b.live.len(), 2);
        assert_eq!(b.since, 1_700_000_000_123);
        assert_eq!(
            b.claimed,
            vec![("c/00000002".to_string(), vec!["t1".to_string()])]
        );
        let d = Beat::parse(&Value::Array(vec![Value::Int(-1)])).unwrap();
        assert!(d.dead);
        assert!(Beat::parse(&Value::Nil).is_none());
    }
}
