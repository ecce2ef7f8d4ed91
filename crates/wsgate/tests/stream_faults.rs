//! Streams under faults (issue 16): real `wsgate` processes on one real Redis, a
//! publisher at a steady rate, and clients that resume by themselves (reconnecting to
//! another node with `since`). After each fault, what every client received is
//! checked seq by seq: every seq exactly once, in order, or an explicit `reset` /
//! `recovered:false` — never a silent gap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wsgate_testkit::http::blocking;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::{Redis, RedisCluster, SentinelGroup};
use wsgate_testkit::streams::{self, check, Events, ResumingClient, Urls, Verdict};
use wsgate_testkit::wait_until;

const TOPIC: &str = "chat:faults";
const WAIT: Duration = Duration::from_secs(15);

/// The Redis the nodes share.
enum Backend {
    Single(Redis),
    Sentinel(SentinelGroup),
    Cluster(RedisCluster),
}

impl Backend {
    /// The node flags that reach it.
    fn node_args(&self) -> Vec<String> {
        match self {
            Backend::Single(r) => vec!["--redis-url".into(), r.url()],
            Backend::Sentinel(g) => g.node_args(),
            Backend::Cluster(c) => vec![
                "--redis-mode".into(),
                "cluster".into(),
                "--redis-url".into(),
                c.seeds(),
            ],
        }
    }
}

/// Nodes on one Redis, clients resuming across them, a steady publisher.
struct Run {
    backend: Backend,
    config: tempfile::NamedTempFile,
    nodes: Vec<Node>,
    /// WebSocket URLs, one per node slot, for the clients.
    urls: Urls,
    /// Main listeners, one per node slot, for the publisher.
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    /// Ends the clients' loops.
    stop: Arc<AtomicBool>,
    /// Ends the publisher's loop.
    stop_publishing: Arc<AtomicBool>,
    until: Instant,
    clients: Vec<(Events, tokio::task::JoinHandle<()>)>,
    publisher: Option<tokio::task::JoinHandle<()>>,
    published: Arc<AtomicU64>,
}

impl Run {
    /// `nodes` nodes on `backend`, `clients` resuming clients spread over them and a
    /// publisher at `rate`/s; everything stops by itself after `limit`.
    fn start(
        backend: impl Into<Backend>,
        nodes: usize,
        clients: usize,
        rate: u32,
        limit: Duration,
    ) -> Run {
        let backend = backend.into();
        let config = wsgate_testkit::streams::chat_streams_config();
        let nodes: Vec<Node> = (0..nodes).map(|_| start_node(&backend, &config)).collect();
        assert!(
            wait_until(WAIT, || nodes.iter().all(Node::is_ready)),
            "nodes ready"
        );
        let urls: Urls = Arc::new(Mutex::new(nodes.iter().map(Node::ws_url).collect()));
        let addrs = Arc::new(Mutex::new(nodes.iter().map(|n| n.addr).collect()));
        let mut run = Run {
            backend,
            config,
            nodes,
            urls,
            addrs,
            stop: Arc::new(AtomicBool::new(false)),
            stop_publishing: Arc::new(AtomicBool::new(false)),
            until: Instant::now() + limit,
            clients: Vec::new(),
            publisher: None,
            published: Arc::new(AtomicU64::new(0)),
        };
        for i in 0..clients {
            let events = Arc::new(Mutex::new(Vec::new()));
            let task = tokio::spawn(
                ResumingClient {
                    urls: run.urls.clone(),
                    first: i,
                    topic: TOPIC.into(),
                    events: events.clone(),
                    closes: Default::default(),
                    stop: run.stop.clone(),
                    until: run.until,
                }
                .run(),
            );
            run.clients.push((events, task));
        }
        let (addrs, stop, until, published) = (
            run.addrs.clone(),
            run.stop_publishing.clone(),
            run.until,
            run.published.clone(),
        );
        run.publisher = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut node = 0usize;
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                tick.tick().await;
                let addr = {
                    let a = addrs.lock();
                    a[node % a.len()]
                };
                k += 1;
                let body = format!(r#"{{"topic":"{TOPIC}","data":{{"k":{k}}}}}"#);
                let (status, _) = tokio::task::spawn_blocking(move || {
                    blocking(addr, "POST", "/api/publish", &body)
                })
                .await
                .unwrap();
                if status == 200 {
                    published.fetch_add(1, Ordering::Relaxed);
                } else {
                    node += 1; // down or draining: the next one
                }
            }
        }));
        run
    }

    /// Publications acknowledged so far.
    fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more publications were acknowledged.
    async fn wait_published(&self, n: u64) {
        let target = self.published() + n;
        let deadline = Instant::now() + WAIT;
        while self.published() < target {
            assert!(
                Instant::now() < deadline,
                "the publisher is stuck at {}",
                self.published()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Drains node `i` (SIGTERM: its clients get 1001), waits for it to exit, and
    /// puts a new node in its slot.
    async fn drain_and_replace(&mut self, i: usize) {
        self.nodes[i].signal("TERM");
        let status = self.nodes[i].wait_exit(WAIT);
        assert!(status.success(), "a drain exits 0: {status}");
        self.replace(i);
    }

    /// Kills node `i` (SIGKILL) and puts a new node in its slot.
    async fn kill_and_replace(&mut self, i: usize) {
        self.nodes[i].signal("KILL");
        self.nodes[i].wait_exit(WAIT);
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.replace(i);
    }

    fn replace(&mut self, i: usize) {
        let node = start_node(&self.backend, &self.config);
        assert!(
            wait_until(WAIT, || node.is_ready()),
            "the new node is ready"
        );
        self.urls.lock()[i] = node.ws_url();
        self.addrs.lock()[i] = node.addr;
        self.nodes[i] = node;
    }

    /// Stops publishing, waits (bounded) until every client has reached the stream's
    /// final position, stops the clients, and checks each one seq by seq against the
    /// history. Returns the verdicts.
    async fn finish(mut self) -> Vec<Verdict> {
        self.stop_publisher().await;
        let end = self.position();
        let settled = {
            let deadline = Instant::now() + WAIT;
            loop {
                let done = self.clients.iter().all(|(events, _)| {
                    check(&events.lock()).is_ok_and(|v| v.end.as_ref() == Some(&end))
                });
                if done || Instant::now() > deadline {
                    break done;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        self.stop.store(true, Ordering::Relaxed);
        if !settled {
            for (i, n) in self.nodes.iter().enumerate() {
                let logs = n.logs();
                if let Ok(dir) = std::env::var("WSGATE_TEST_LOG_DIR") {
                    let _ = std::fs::write(format!("{dir}/node-{i}.log"), &logs);
                }
                let tail: Vec<&str> = logs.lines().rev().take(40).collect();
                eprintln!("node {i} log (newest first):\n{}", tail.join("\n"));
            }
        }
        let history = streams::history(self.nodes[0].addr, TOPIC, &end);
        let mut all = Vec::new();
        for (events, task) in self.clients.drain(..) {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("the client stops")
                .unwrap();
            all.push(events.lock().clone());
        }
        eprintln!("settled: {settled}");
        streams::check_all(&all, &end, &history)
    }

    async fn stop_publisher(&mut self) {
        self.stop_publishing.store(true, Ordering::Relaxed);
        if let Some(p) = self.publisher.take() {
            tokio::time::timeout(WAIT, p)
                .await
                .expect("the publisher stops")
                .unwrap();
        }
    }

    /// The stream's position, asked of a ready node.
    fn position(&self) -> (u64, String) {
        let addrs: Vec<SocketAddr> = self.nodes.iter().map(|n| n.addr).collect();
        streams::position(&addrs, TOPIC)
    }
}

fn start_node(backend: &Backend, config: &tempfile::NamedTempFile) -> Node {
    let mut args = backend.node_args();
    args.extend(streams::fault_node_args(config));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Node::start_logged(None, &args)
}

impl From<Redis> for Backend {
    fn from(r: Redis) -> Backend {
        Backend::Single(r)
    }
}

impl Run {
    /// The single Redis (the tests that restart or poke it use one).
    fn redis(&mut self) -> &mut Redis {
        match &mut self.backend {
            Backend::Single(r) => r,
            _ => panic!("not a single Redis"),
        }
    }
}

fn assert_nothing_lost(verdicts: &[Verdict]) {
    for (i, v) in verdicts.iter().enumerate() {
        assert_eq!(
            (v.announced_lost, v.resets, v.not_recovered),
            (0, 0, 0),
            "client {i} lost publications the history held: {v:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_drain_of_every_node_loses_nothing() {
    let mut run = Run::start(Redis::start(), 3, 12, 100, Duration::from_secs(90));
    run.wait_published(100).await;
    for i in 0..3 {
        run.drain_and_replace(i).await;
        run.wait_published(50).await;
    }
    let verdicts = run.finish().await;
    assert_nothing_lost(&verdicts);
    let drained: usize = verdicts
        .iter()
        .map(|v| v.close_codes.iter().filter(|c| **c == Some(1001)).count())
        .sum();
    assert!(
        drained >= 12,
        "every client was drained at least once: {drained}"
    );
    assert!(verdicts.iter().all(|v| v.recovered >= 1), "each resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_loses_nothing_for_its_clients() {
    let mut run = Run::start(Redis::start(), 3, 12, 100, Duration::from_secs(60));
    run.wait_published(100).await;
    run.kill_and_replace(1).await;
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    assert_nothing_lost(&verdicts);
    let resumed = verdicts.iter().filter(|v| v.recovered >= 1).count();
    assert!(
        resumed >= 4,
        "the killed node's clients resumed elsewhere: {resumed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_are_repaired_from_history() {
    let mut run = Run::start(Redis::start(), 3, 9, 100, Duration::from_secs(60));
    run.wait_published(100).await;
    for _ in 0..3 {
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut run.redis().conn())
            .unwrap();
        assert!(killed >= 3, "each node's pub/sub connection: {killed}");
        run.wait_published(60).await;
    }
    let verdicts = run.finish().await;
    assert_nothing_lost(&verdicts);
    assert!(
        verdicts.iter().all(|v| v.reconnects == 0),
        "clients stay connected through their node's Redis blips"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_persistence_keeps_the_epoch_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    let mut run = Run::start(redis, 3, 9, 100, Duration::from_secs(60));
    run.wait_published(100).await;
    let before = run.position();
    run.redis().restart();
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    assert_nothing_lost(&verdicts);
    assert_eq!(verdicts[0].end.as_ref().unwrap().1, before.1, "same epoch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_without_persistence_is_announced_never_silent() {
    let mut run = Run::start(Redis::start(), 3, 9, 100, Duration::from_secs(60));
    run.wait_published(100).await;
    let before = run.position();
    run.redis().restart();
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    let end = verdicts[0].end.clone().unwrap();
    assert_ne!(end.1, before.1, "a new epoch");
    for (i, v) in verdicts.iter().enumerate() {
        assert!(
            v.resets + v.not_recovered >= 1,
            "client {i} was told its stream restarted: {v:?}"
        );
    }
}

/// What an asynchronous-replication failover does to a stream: the new master lacks
/// the last acknowledged publications, so the stream's seq is behind what nodes
/// delivered. Simulated on one Redis by moving the seq back, then cutting the nodes'
/// pub/sub connections (as a failover does): the nodes find the stream behind them and
/// have it restarted in a new epoch, announced — never re-used seqs delivered as
/// duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_went_back_is_restarted_and_announced() {
    let mut run = Run::start(Redis::start(), 3, 9, 100, Duration::from_secs(60));
    run.wait_published(150).await;
    let before = run.position();
    let mut conn = run.redis().conn();
    let _: () = redis::cmd("HSET")
        .arg(format!("{{wsgate:{TOPIC}}}:stream"))
        .arg("seq")
        .arg(before.0.saturating_sub(100))
        .query(&mut conn)
        .unwrap();
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    let end = verdicts[0].end.clone().unwrap();
    assert_ne!(end.1, before.1, "the numbering restarted in a new epoch");
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.resets >= 1, "client {i} was told: {v:?}");
    }
}

/// Waits (bounded) until every node answers ready, or panics with their logs.
fn all_ready(run: &Run, within: Duration, what: &str) {
    assert!(
        wait_until(within, || run.nodes.iter().all(Node::is_ready)),
        "{what}: {}",
        run.nodes
            .iter()
            .map(|n| n.logs())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_loses_nothing_silently() {
    let group = SentinelGroup::start();
    let mut run = Run::start(Backend::Sentinel(group), 3, 9, 100, Duration::from_secs(90));
    run.wait_published(100).await;
    let Backend::Sentinel(g) = &mut run.backend else {
        unreachable!()
    };
    let promoted = g.replica.port;
    g.master.kill();
    assert!(
        wait_until(Duration::from_secs(30), || g.sentinels[0].master_port()
            == Some(promoted)),
        "the sentinels promoted the replica"
    );
    all_ready(&run, Duration::from_secs(30), "nodes follow the new master");
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    // Asynchronous replication may have lost the last publications before the kill:
    // then the stream restarted in a new epoch, announced. Never a silent gap (the
    // checker in `finish` walked every client seq by seq).
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.delivered >= 200, "client {i} kept receiving: {v:?}");
        assert_eq!(v.reconnects, 0, "client {i} was not disconnected: {v:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_loses_nothing_silently() {
    let cluster = RedisCluster::start(3, 1);
    let victim = cluster.owner(&format!("wsgate:{TOPIC}"));
    let mut run = Run::start(
        Backend::Cluster(cluster),
        3,
        9,
        100,
        Duration::from_secs(90),
    );
    run.wait_published(100).await;
    let Backend::Cluster(c) = &mut run.backend else {
        unreachable!()
    };
    c.kill(victim);
    assert!(
        wait_until(Duration::from_secs(30), || c
            .owner(&format!("wsgate:{TOPIC}"))
            != victim),
        "a replica took the stream's slot over"
    );
    all_ready(&run, Duration::from_secs(30), "nodes follow the promotion");
    run.wait_published(100).await;
    let verdicts = run.finish().await;
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.delivered >= 200, "client {i} kept receiving: {v:?}");
        assert_eq!(v.reconnects, 0, "client {i} was not disconnected: {v:?}");
    }
}
