//! Presence, join/leave, server commands and the node list against real Redis
//! servers, in single mode and on a 3-primary Redis Cluster: two brokers ("nodes")
//! see each other's entries once acknowledged, relay joins and leaves in order and
//! server commands to both; a node that dies without a word leaves every list within
//! the presence timeout (its leaves sent by the survivor); a Redis that lost
//! everything gets the live nodes' entries back without a single new add; a frozen
//! Redis or a Sentinel failover declares nobody dead.

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::eventually;
use parking_lot::Mutex;
use wsgate_fanout::{
    Broker, BrokerEvents, HistoryEntry, NodeInfo, Origin, PresenceEntry, PresenceEvent,
    PresenceKind,
};
use wsgate_metrics::Metrics;
use wsgate_redis::{ClusterBroker, ClusterOptions, RedisBroker, RedisOptions, SentinelOptions};
use wsgate_testkit::redis::{Redis, RedisCluster, SentinelGroup, SENTINEL_MASTER};
use wsgate_testkit::wait_until;

const WAIT: Duration = Duration::from_secs(15);
/// The presence timeout of these tests: heartbeats every 250 ms, a 750 ms lease.
const TIMEOUT: Duration = Duration::from_millis(1500);
const TOPIC: &str = "room.1";

/// A node as its broker sees it: its own entries (the snapshot), what it heard.
struct Node {
    id: String,
    entries: Mutex<HashMap<String, Vec<PresenceEntry>>>,
    heard: Mutex<Vec<(String, PresenceEvent)>>,
    commands: Mutex<Vec<Vec<u8>>>,
    metrics: Metrics,
}

impl Node {
    fn new(id: &str) -> Arc<Node> {
        Arc::new(Node {
            id: id.into(),
            entries: Mutex::default(),
            heard: Mutex::default(),
            commands: Mutex::default(),
            metrics: Metrics::default(),
        })
    }

    fn entry(&self, session: &str, user: Option<&str>) -> PresenceEntry {
        PresenceEntry {
            session: session.into(),
            user: user.map(Into::into),
            node: self.id.as_str().into(),
        }
    }

    /// Lists `session` as the node does: in its table, then in the broker.
    async fn join(&self, b: &dyn Broker, session: &str, user: Option<&str>) {
        let e = self.entry(session, user);
        self.entries
            .lock()
            .entry(TOPIC.into())
            .or_default()
            .push(e.clone());
        b.presence_add(TOPIC, &e, true).await.unwrap();
    }

    fn leave(&self, b: &dyn Broker, session: &str) {
        let e = {
            let mut all = self.entries.lock();
            let list = all.get_mut(TOPIC).unwrap();
            let at = list.iter().position(|e| &*e.session == session).unwrap();
            let e = list.remove(at);
            if list.is_empty() {
                all.remove(TOPIC);
            }
            e
        };
        b.presence_remove(TOPIC, &e, true);
    }

    /// The joins and leaves heard about `session`.
    fn heard(&self, session: &str) -> Vec<PresenceKind> {
        self.heard
            .lock()
            .iter()
            .filter(|(t, e)| t == TOPIC && &*e.session == session)
            .map(|(_, e)| e.kind)
            .collect()
    }
}

impl BrokerEvents for Node {
    fn publication(&self, _: &str, _: &[u8], _: u64, _: Origin) {}

    fn stream_publication(&self, _: &str, _: &Arc<str>, _: HistoryEntry, _: Origin) {}

    fn has_subscribers(&self, topic: &str) -> bool {
        topic == TOPIC
    }

    fn topics(&self) -> Vec<Arc<str>> {
        vec![Arc::from(TOPIC)]
    }

    fn presence_event(&self, topic: &str, event: PresenceEvent) {
        self.heard.lock().push((topic.into(), event));
    }

    fn control(&self, command: &[u8]) {
        self.commands.lock().push(command.to_vec());
    }

    fn presence_snapshot(&self) -> Vec<(Arc<str>, Vec<PresenceEntry>)> {
        self.entries
            .lock()
            .iter()
            .map(|(t, e)| (Arc::from(t.as_str()), e.clone()))
            .collect()
    }

    fn announces(&self, topic: &str) -> bool {
        topic == TOPIC
    }

    fn node_info(&self) -> Option<NodeInfo> {
        Some(NodeInfo {
            node: self.id.clone(),
            connections: 1,
            subscriptions: 2,
            topics: 1,
            uptime_s: 3,
            version: "test".into(),
            draining: false,
            capacity: 10,
        })
    }
}

/// Polls `check` until it holds or `within` is over; whether it held.
async fn until<F: Future<Output = bool>>(within: Duration, mut check: impl FnMut() -> F) -> bool {
    let end = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn sessions(b: &dyn Broker) -> Vec<(String, Option<String>, String)> {
    match b.presence(TOPIC).await {
        Ok(list) => list
            .into_iter()
            .map(|e| {
                (
                    e.session.to_string(),
                    e.user.map(|u| u.to_string()),
                    e.node.to_string(),
                )
            })
            .collect(),
        Err(_) => vec![("<unavailable>".into(), None, String::new())],
    }
}

async fn nodes(b: &dyn Broker) -> Vec<String> {
    match b.nodes().await {
        Ok(list) => list.into_iter().map(|n| n.node).collect(),
        Err(_) => vec!["<unavailable>".into()],
    }
}

fn s(session: &str, user: Option<&str>, node: &str) -> (String, Option<String>, String) {
    (session.into(), user.map(Into::into), node.into())
}

/// The live members of node `id` (`<id>/<instance>`).
fn members(redis: &impl Fn(&[&str]) -> String, id: &str) -> Vec<String> {
    redis(&["ZRANGE", "wsgate:{nodes}", "0", "-1"])
        .lines()
        .filter(|m| m.starts_with(&format!("{id}/")))
        .map(String::from)
        .collect()
}

/// The whole story, for either mode: `start` starts a broker for a node, `redis`
/// runs a command on the `{nodes}` keys' Redis, `lose` makes Redis forget
/// everything.
async fn story<B: Broker + 'static>(
    start: impl Fn(&Arc<Node>) -> B,
    redis: impl Fn(&[&str]) -> String,
    lose: impl FnOnce(),
) {
    let (na, nb) = (Node::new("node-a"), Node::new("node-b"));
    let (a, b) = (start(&na), start(&nb));
    for x in [&a, &b] {
        assert!(eventually(WAIT, || x.is_ready()).await, "broker ready");
        x.subscribe(vec![Arc::from(TOPIC)]).await.unwrap();
    }

    // Both nodes are listed once they heartbeat (each lists itself at once).
    assert!(
        until(WAIT, || async {
            nodes(&a).await == ["node-a", "node-b"] && nodes(&b).await == ["node-a", "node-b"]
        })
        .await,
        "{:?}",
        nodes(&a).await
    );
    let info = b.nodes().await.unwrap();
    assert_eq!(info[0], na.node_info().unwrap(), "another node's info");

    // A server command reaches every node, this one included.
    let reached = a.control(br#"{"cmd":"disconnect"}"#).await.unwrap();
    assert_eq!(reached, Some(2));
    for n in [&na, &nb] {
        assert!(eventually(WAIT, || n.commands.lock().len() == 1).await);
        assert_eq!(n.commands.lock()[0], br#"{"cmd":"disconnect"}"#);
    }

    // Acknowledged means listed for every node.
    na.join(&a, "s1", Some("alice")).await;
    assert_eq!(sessions(&b).await, [s("s1", Some("alice"), "node-a")]);
    assert!(eventually(WAIT, || nb.heard("s1") == [PresenceKind::Join]).await);
    na.leave(&a, "s1");
    assert!(
        eventually(WAIT, || nb.heard("s1")
            == [PresenceKind::Join, PresenceKind::Leave])
        .await,
        "{:?}",
        nb.heard("s1")
    );
    assert!(until(WAIT, || async { sessions(&b).await.is_empty() }).await);
    assert_eq!(na.heard("s1"), [PresenceKind::Join, PresenceKind::Leave]);

    // A node declared dead while alive (cut off for longer than the lease: here its
    // member is moved to the dead set as by a cleaner that died) goes on as a new
    // instance and lists its entries again.
    na.join(&a, "s2", None).await;
    let before = members(&redis, "node-a");
    assert_eq!(before.len(), 1, "{before:?}");
    redis(&["ZREM", "wsgate:{nodes}", &before[0]]);
    redis(&["ZADD", "wsgate:{nodes}:dead", "0", &before[0]]);
    assert!(
        until(WAIT, || async {
            let now = members(&redis, "node-a");
            now.len() == 1 && now != before && sessions(&b).await == [s("s2", None, "node-a")]
        })
        .await,
        "{:?} {:?}",
        members(&redis, "node-a"),
        sessions(&b).await
    );
    assert!(
        until(WAIT, || async {
            redis(&["ZCARD", "wsgate:{nodes}:dead"]).trim() == "0"
        })
        .await,
        "the old instance is cleaned"
    );
    // Whether the old instance's leave came before the resync's join or not, the
    // last word is a join.
    assert_eq!(nb.heard("s2").last(), Some(&PresenceKind::Join));
    assert_eq!(sessions(&b).await, [s("s2", None, "node-a")]);
    assert_eq!(nodes(&b).await, ["node-a", "node-b"]);
    assert_eq!(na.metrics.presence_resyncs.get(), 1);
    assert_eq!(na.metrics.cluster_nodes.get(), 2);
    let cleaned = na.metrics.presence_dead_nodes.get() + nb.metrics.presence_dead_nodes.get();
    assert_eq!(cleaned, 1, "the old instance, by one of them");
    let heard_s2 = nb.heard("s2").len();

    // A node dies without a word: within the timeout its entries are gone from every
    // list, the survivor sent their leaves, and the node list forgets it.
    na.join(&a, "s3", Some("carol")).await;
    nb.join(&b, "s4", Some("dave")).await;
    assert_eq!(
        sessions(&b).await,
        [
            s("s2", None, "node-a"),
            s("s3", Some("carol"), "node-a"),
            s("s4", Some("dave"), "node-b")
        ]
    );
    // The survivor claims the dead once its own heartbeats have run for the
    // recovery grace (5 s; the lease when longer).
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(a);
    let died = Instant::now();
    assert!(
        until(WAIT, || async {
            nb.heard("s2").len() == heard_s2 + 1 && nb.heard("s3").len() == 2
        })
        .await,
        "leaves of the dead node's entries"
    );
    let took = died.elapsed();
    eprintln!("the dead node's leaves arrived after {took:?}");
    assert_eq!(nb.heard("s3"), [PresenceKind::Join, PresenceKind::Leave]);
    assert_eq!(nb.heard("s2").last(), Some(&PresenceKind::Leave));
    assert_eq!(sessions(&b).await, [s("s4", Some("dave"), "node-b")]);
    assert_eq!(nodes(&b).await, ["node-b"]);
    // The bound, with some room for a loaded test machine.
    assert!(took <= TIMEOUT + Duration::from_millis(500), "{took:?}");
    let m = &nb.metrics;
    assert!(
        eventually(WAIT, || m.presence_dead_nodes.get() >= 1
            && m.cluster_nodes.get() == 1)
        .await
    );
    assert!(m.presence_ghosts_removed.get() >= 2);
    assert_eq!(m.presence_errors.get(), 0);
    let resyncs = m.presence_resyncs.get();

    // Redis loses everything: the live node writes its entries again by itself.
    lose();
    assert!(
        until(WAIT, || async {
            sessions(&b).await == [s("s4", Some("dave"), "node-b")]
        })
        .await,
        "{:?}",
        sessions(&b).await
    );
    assert!(until(WAIT, || async { nodes(&b).await == ["node-b"] }).await);
    assert!(m.presence_resyncs.get() > resyncs);
    assert!(
        until(WAIT, || async {
            b.control(b"again").await.ok() == Some(Some(1))
        })
        .await,
        "the control channel is subscribed again"
    );
    assert!(eventually(WAIT, || nb.commands.lock().len() >= 2).await);
    let c = start(&Node::new("node-c"));
    assert!(eventually(WAIT, || c.is_ready()).await);
    assert!(
        until(WAIT, || async {
            sessions(&c).await == [s("s4", Some("dave"), "node-b")]
        })
        .await,
        "another node sees them"
    );
    assert!(until(WAIT, || async { nodes(&c).await == ["node-b", "node-c"] }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_one_redis() {
    let mut redis = Redis::start();
    let (url, port) = (redis.url(), redis.port);
    let start = |n: &Arc<Node>| {
        let mut o = RedisOptions::new(url.clone());
        o.unsubscribe_delay = Duration::ZERO;
        o.presence_timeout = TIMEOUT;
        o.metrics = Some(n.metrics.clone());
        RedisBroker::start(o, n.clone()).unwrap()
    };
    story(start, |args| common::cli(port, args), || redis.restart()).await;
}

/// A cluster broker for the test node `n` (topics `room.*` share the `{room}` slot).
fn cluster_broker(seeds: &[String], n: &Arc<Node>) -> ClusterBroker {
    let o = ClusterOptions {
        seeds: seeds.to_vec(),
        password: None,
        tls: Default::default(),
        prefix: "wsgate:".into(),
        unsubscribe_delay: Duration::ZERO,
        hash_tag_separator: Some(b'.'),
        metrics: Some(n.metrics.clone()),
        install_functions: false,
        presence_timeout: TIMEOUT,
    };
    ClusterBroker::start(o, n.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_a_redis_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let seeds: Vec<String> = cluster.seeds().split(',').map(String::from).collect();
    let start = |n: &Arc<Node>| cluster_broker(&seeds, n);
    // The `{nodes}` keys and the topic's presence are on different shards.
    assert_ne!(
        cluster.owner("wsgate:{nodes}"),
        cluster.owner("wsgate:{room}.1")
    );
    let nodes_port = cluster.owner("wsgate:{nodes}");
    story(
        start,
        |args| cluster.cli_on(nodes_port, args),
        || {
            for port in cluster.primaries() {
                cluster.cli_on(port, &["FLUSHALL"]);
            }
        },
    )
    .await;
}

/// Redis frozen for longer than the lease: when it answers again every node
/// heartbeats first, and nobody is declared dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_declares_nobody_dead() {
    let redis = Redis::start();
    let start = |n: &Arc<Node>| {
        let mut o = RedisOptions::new(redis.url());
        o.presence_timeout = TIMEOUT;
        o.metrics = Some(n.metrics.clone());
        RedisBroker::start(o, n.clone()).unwrap()
    };
    let (na, nb) = (Node::new("node-a"), Node::new("node-b"));
    let (a, b) = (start(&na), start(&nb));
    for x in [&a, &b] {
        assert!(eventually(WAIT, || x.is_ready()).await, "broker ready");
        x.subscribe(vec![Arc::from(TOPIC)]).await.unwrap();
    }
    na.join(&a, "s1", None).await;
    nb.join(&b, "s2", None).await;
    assert!(
        until(WAIT, || async {
            nodes(&a).await.len() == 2 && nodes(&b).await.len() == 2
        })
        .await
    );
    redis.signal("STOP");
    tokio::time::sleep(TIMEOUT).await; // twice the lease
    redis.signal("CONT");
    // Two timeouts later, both are still listed and nobody heard a leave.
    tokio::time::sleep(2 * TIMEOUT).await;
    let both = [s("s1", None, "node-a"), s("s2", None, "node-b")];
    assert_eq!(sessions(&a).await, both);
    assert_eq!(sessions(&b).await, both);
    assert_eq!(nodes(&a).await, ["node-a", "node-b"]);
    for n in [&na, &nb] {
        assert_eq!(n.heard("s1"), [PresenceKind::Join]);
        assert_eq!(n.heard("s2"), [PresenceKind::Join]);
        assert_eq!(n.metrics.presence_dead_nodes.get(), 0);
    }
}

/// Sentinel fails the master over to its replica: nobody is declared dead, the
/// entries are still listed on the new master, server commands reach both nodes
/// and new entries work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_through_a_sentinel_failover() {
    let mut g = SentinelGroup::start();
    let sentinels: Vec<String> = g
        .sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let start = |n: &Arc<Node>| {
        let mut o = RedisOptions::new("redis://127.0.0.1/");
        o.sentinel = Some(SentinelOptions {
            nodes: sentinels.clone(),
            master: SENTINEL_MASTER.into(),
            password: None,
        });
        o.presence_timeout = TIMEOUT;
        o.metrics = Some(n.metrics.clone());
        RedisBroker::start(o, n.clone()).unwrap()
    };
    let (na, nb) = (Node::new("node-a"), Node::new("node-b"));
    let (a, b) = (start(&na), start(&nb));
    for x in [&a, &b] {
        assert!(eventually(WAIT, || x.is_ready()).await, "broker ready");
        x.subscribe(vec![Arc::from(TOPIC)]).await.unwrap();
    }
    na.join(&a, "s1", Some("alice")).await;
    nb.join(&b, "s2", None).await;
    let both = [s("s1", Some("alice"), "node-a"), s("s2", None, "node-b")];
    assert_eq!(sessions(&a).await, both);

    let old = g.master.port;
    g.master.kill();
    assert!(
        wait_until(Duration::from_secs(30), || g
            .sentinels
            .iter()
            .all(|s| s.master_port().is_some_and(|p| p != old))),
        "the sentinels promoted the replica"
    );
    assert!(
        until(WAIT, || async {
            a.is_ready()
                && b.is_ready()
                && sessions(&a).await == both
                && sessions(&b).await == both
                && nodes(&b).await == ["node-a", "node-b"]
        })
        .await,
        "{:?}",
        sessions(&b).await
    );
    assert!(
        until(WAIT, || async {
            a.control(b"after").await.ok() == Some(Some(2))
        })
        .await,
        "both nodes subscribed the control channel on the new master"
    );
    nb.join(&b, "s3", None).await;
    assert!(eventually(WAIT, || na.heard("s3") == [PresenceKind::Join]).await);
    // Nobody was declared dead: no leave, no cleanup.
    for n in [&na, &nb] {
        assert_eq!(n.heard("s1"), [PresenceKind::Join], "{}", n.id);
        assert_eq!(n.heard("s2"), [PresenceKind::Join], "{}", n.id);
        assert_eq!(n.metrics.presence_dead_nodes.get(), 0);
    }
}

/// The primary holding the `{nodes}` keys is killed and its replica promoted: while
/// it is gone nobody can heartbeat, and afterwards nobody is declared dead; the
/// entries, the node list, server commands and new entries work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_through_a_cluster_failover() {
    let mut cluster = RedisCluster::start(3, 1);
    let seeds: Vec<String> = cluster.seeds().split(',').map(String::from).collect();
    let start = |n: &Arc<Node>| cluster_broker(&seeds, n);
    let (na, nb) = (Node::new("node-a"), Node::new("node-b"));
    let (a, b) = (start(&na), start(&nb));
    for x in [&a, &b] {
        assert!(eventually(WAIT, || x.is_ready()).await, "broker ready");
        x.subscribe(vec![Arc::from(TOPIC)]).await.unwrap();
    }
    na.join(&a, "s1", Some("alice")).await;
    nb.join(&b, "s2", None).await;
    let both = [s("s1", Some("alice"), "node-a"), s("s2", None, "node-b")];
    assert!(until(WAIT, || async { nodes(&a).await == ["node-a", "node-b"] }).await);

    let victim = cluster.owner("wsgate:{nodes}");
    cluster.kill(victim);
    assert!(
        until(Duration::from_secs(30), || async {
            cluster.owner("wsgate:{nodes}") != victim
                && a.is_ready()
                && b.is_ready()
                && sessions(&a).await == both
                && sessions(&b).await == both
                && nodes(&b).await == ["node-a", "node-b"]
        })
        .await,
        "{:?} {:?}",
        sessions(&b).await,
        nodes(&b).await
    );
    assert!(
        until(WAIT, || async {
            a.control(b"after").await.ok() == Some(Some(2))
        })
        .await,
        "both nodes hold the control channel"
    );
    nb.join(&b, "s3", None).await;
    assert!(eventually(WAIT, || na.heard("s3") == [PresenceKind::Join]).await);
    // Two timeouts later still nobody was declared dead.
    tokio::time::sleep(2 * TIMEOUT).await;
    assert_eq!(sessions(&a).await.len(), 3);
    for n in [&na, &nb] {
        assert_eq!(n.heard("s1"), [PresenceKind::Join], "{}", n.id);
        assert_eq!(n.heard("s2"), [PresenceKind::Join], "{}", n.id);
        assert_eq!(n.metrics.presence_dead_nodes.get(), 0);
    }
}
