//! Rebalancing after a scale-out (issue 18): real `wsgate` processes on a real Redis,
//! 300 real WebSocket clients behind a small least-connections "load balancer" (what
//! HAProxy's `balance leastconn` does). Three nodes hold every client, two empty
//! nodes join; `POST /api/rebalance` (or each node's own check) makes the old nodes
//! shed down to their share with 1012, paced, and the clients that reconnect land on
//! the new nodes, resuming their stream with `since`. Nobody is lost: every client
//! ends connected and subscribed, and got every seq of its stream, in order, exactly
//! once, though publications went on throughout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::http::http;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::ws::Client;

const KEY: &str = "rebalance-api-key";
const CLIENTS: usize = 300;
const TOPICS: usize = 10;
/// `--rebalance-rate`: 10 % of a node's connections a second, so 100 connections
/// shed at about 10 a second.
const RATE: f64 = 0.1;
const MARGIN: f64 = 0.1;

/// `s:*` topics are streams, keeping more than a test publishes.
fn config() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "[[namespaces]]\nname = \"s\"\ntopics = [\"s:*\"]\nhistory_size = 100000\nhistory_ttl = \"10m\"\n",
    )
    .unwrap();
    file
}

/// Node `i` (`n0`, `n1`, …) on `redis`.
fn node(redis: &Redis, config: &tempfile::NamedTempFile, i: usize, auto: bool) -> Node {
    let id = format!("n{i}");
    let rate = RATE.to_string();
    let margin = MARGIN.to_string();
    Node::start(
        Some(&redis.url()),
        &[
            "--config",
            config.path().to_str().unwrap(),
            "--node-id",
            &id,
            "--api-key",
            KEY,
            "--presence-timeout",
            "3s",
            "--rebalance-rate",
            &rate,
            "--rebalance-margin",
            &margin,
            "--rebalance-auto",
            if auto { "true" } else { "false" },
        ],
    )
}

async fn api(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let (status, text) = http(
        addr,
        method,
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Each node's connections as `GET /api/info` lists them, by node id.
async fn connections(addr: SocketAddr) -> Vec<(String, u64)> {
    let (status, body) = api(addr, "GET", "/api/info", "").await;
    assert_eq!(status, 200, "{body}");
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_owned(),
                n["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A series' value in a node's `/metrics` (0 when absent).
async fn metric(node: &Node, series: &str) -> f64 {
    let text = node.scrape().await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// The load balancer: the node with the fewest connections it sent there.
struct Lb {
    nodes: Mutex<Vec<SocketAddr>>,
    open: Vec<AtomicI64>,
}

impl Lb {
    fn pick(&self) -> usize {
        let nodes = self.nodes.lock();
        let least = (0..nodes.len())
            .map(|i| self.open[i].load(Ordering::SeqCst))
            .min()
            .unwrap();
        let ties: Vec<usize> = (0..nodes.len())
            .filter(|&i| self.open[i].load(Ordering::SeqCst) == least)
            .collect();
        let i = ties[rand_index(ties.len())];
        self.open[i].fetch_add(1, Ordering::SeqCst);
        i
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.nodes.lock()[i]
    }
}

fn rand_index(n: usize) -> usize {
    // No rand dependency here: the clock's nanoseconds are random enough for ties.
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize)
        % n
}

/// What the clients report.
struct Fleet {
    /// Clients connected and subscribed now.
    ready: AtomicUsize,
    /// Closes with 1012 the clients got.
    shed: AtomicU64,
    /// Any other end of a connection, a gap, a duplicate or an unrecovered resume
    /// (there must be none).
    unexpected: Mutex<Vec<String>>,
    /// Each client's last seq of its stream.
    seqs: Vec<AtomicU64>,
    stop: AtomicBool,
}

impl Fleet {
    fn new() -> Self {
        Fleet {
            ready: AtomicUsize::new(0),
            shed: AtomicU64::new(0),
            unexpected: Mutex::new(Vec::new()),
            seqs: (0..CLIENTS).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
        }
    }

    fn unexpected(&self, what: String) {
        self.unexpected.lock().push(what);
    }
}

/// Client `i`: connects through the LB and subscribes to its stream; on 1012
/// reconnects (through the LB) and resumes from its last seq, until `stop`. Checks
/// that seqs come in order, each once.
async fn client(i: usize, lb: Arc<Lb>, fleet: Arc<Fleet>) {
    let topic = format!("s:{}", i % TOPICS);
    let mut last: Option<(u64, String)> = None;
    while !fleet.stop.load(Ordering::SeqCst) {
        let n = lb.pick();
        let mut c = match Client::open(lb.addr(n), "/ws", &[]).await {
            Ok(c) => c,
            Err(e) => {
                lb.open[n].fetch_sub(1, Ordering::SeqCst);
                fleet.unexpected(format!("client {i}: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        c.read_welcome().await;
        let since = match &last {
            Some((seq, epoch)) => json!({ topic.as_str(): {"seq": seq, "epoch": epoch} }),
            None => Value::Null,
        };
        c.send_json(&json!({"op":"subscribe","id":1,"topics":[&topic],"since":since}))
            .await;
        let mut subscribed = false;
        let end = loop {
            let next = tokio::time::timeout(Duration::from_millis(200), c.next()).await;
            if fleet.stop.load(Ordering::SeqCst) {
                break None;
            }
            let text = match next {
                Err(_) => continue,
                Ok(Some(Ok(Message::Text(t)))) => t,
                Ok(Some(Ok(Message::Close(f)))) => {
                    break Some(f.map_or(1005, |f| u16::from(f.code)))
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_)) | None) => break Some(1006),
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["op"] == "subscribed" {
                let at = &v["streams"][&topic];
                match &last {
                    None => {
                        let epoch = at["epoch"].as_str().unwrap().to_owned();
                        last = Some((at["seq"].as_u64().unwrap(), epoch));
                    }
                    Some(_) if at["recovered"] != true => {
                        fleet.unexpected(format!("client {i}: not recovered: {v}"));
                    }
                    Some(_) => {}
                }
                subscribed = true;
                fleet.ready.fetch_add(1, Ordering::SeqCst);
            } else if v["op"] == "message" {
                let seq = v["seq"].as_u64().unwrap();
                let (at, _) = last.as_mut().expect("messages after subscribed");
                if seq != *at + 1 {
                    fleet.unexpected(format!("client {i}: seq {seq} after {at}"));
                }
                *at = seq;
                fleet.seqs[i].store(seq, Ordering::SeqCst);
            } else {
                fleet.unexpected(format!("client {i}: {v}"));
            }
        };
        if subscribed {
            fleet.ready.fetch_sub(1, Ordering::SeqCst);
        }
        lb.open[n].fetch_sub(1, Ordering::SeqCst);
        match end {
            None => return,
            Some(1012) => {
                fleet.shed.fetch_add(1, Ordering::SeqCst);
            }
            Some(code) => fleet.unexpected(format!("client {i} on node {n}: closed with {code}")),
        }
    }
}

/// Publishes to every stream in turn, about 100 a second in all, through every node
/// in turn, until `stop`; how many it published to each.
async fn publisher(addrs: Vec<SocketAddr>, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut counts = vec![0u64; TOPICS];
    let mut k = 0;
    while !stop.load(Ordering::SeqCst) {
        let t = k % TOPICS;
        let body = json!({"topic": format!("s:{t}"), "data": k}).to_string();
        let (status, answer) = api(addrs[k % addrs.len()], "POST", "/api/publish", &body).await;
        assert_eq!(status, 200, "{answer}");
        counts[t] += 1;
        k += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counts
}

/// Polls `check` every 200 ms until it holds or `within` is over; whether it held.
async fn until<F: std::future::Future<Output = bool>>(
    within: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Three nodes with 100 clients each, then two empty nodes joined (listed by every
/// node and in the LB).
async fn scaled_out(
    redis: &Redis,
    config: &tempfile::NamedTempFile,
    auto: bool,
) -> (Vec<Node>, Arc<Lb>, Arc<Fleet>) {
    let mut nodes: Vec<Node> = (0..3).map(|i| node(redis, config, i, auto)).collect();
    let lb = Arc::new(Lb {
        nodes: Mutex::new(nodes.iter().map(|n| n.addr).collect()),
        open: (0..5).map(|_| AtomicI64::new(0)).collect(),
    });
    let fleet = Arc::new(Fleet::new());
    for i in 0..CLIENTS {
        tokio::spawn(client(i, lb.clone(), fleet.clone()));
    }
    let first = nodes[0].addr;
    assert!(
        until(Duration::from_secs(30), || async {
            fleet.ready.load(Ordering::SeqCst) == CLIENTS
                && connections(first).await.iter().all(|(_, c)| *c == 100)
        })
        .await,
        "300 clients on 3 nodes: {:?}",
        connections(first).await
    );
    for i in 3..5 {
        nodes.push(node(redis, config, i, auto));
        lb.nodes.lock().push(nodes[i].addr);
    }
    (nodes, lb, fleet)
}

/// Whether every node is within the margin over its share (60 each).
fn balanced(counts: &[(String, u64)]) -> bool {
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    let share = total as f64 / counts.len() as f64;
    counts.len() == 5
        && counts
            .iter()
            .all(|(_, c)| *c as f64 <= share * (1.0 + MARGIN))
}

/// Waits (up to a minute) until every node is within the margin, every client is
/// connected and subscribed, and no client was shed for 2 s (the sheddings ended).
async fn settle(first: SocketAddr, fleet: &Fleet) {
    let mut last = (fleet.shed.load(Ordering::SeqCst), Instant::now());
    let settled = until(Duration::from_secs(60), || {
        let shed = fleet.shed.load(Ordering::SeqCst);
        if shed != last.0 {
            last = (shed, Instant::now());
        }
        let quiet = last.1.elapsed() >= Duration::from_secs(2);
        async move {
            let ok = fleet.ready.load(Ordering::SeqCst) == CLIENTS
                && balanced(&connections(first).await);
            ok && quiet
        }
    })
    .await;
    assert!(settled, "not balanced: {:?}", connections(first).await);
}

/// The end of a test: the publisher stops, every client connected and subscribed
/// got every seq of its stream, and none ended any other way than 1012.
async fn nobody_lost(fleet: &Fleet, stop: Arc<AtomicBool>, publisher: JoinHandle<Vec<u64>>) {
    stop.store(true, Ordering::SeqCst);
    let counts = publisher.await.unwrap();
    assert!(counts.iter().all(|&c| c > 10), "{counts:?}");
    let behind = || {
        (0..CLIENTS)
            .filter(|&i| fleet.seqs[i].load(Ordering::SeqCst) != counts[i % TOPICS])
            .count()
    };
    assert!(
        until(Duration::from_secs(10), || async { behind() == 0 }).await,
        "{} of {CLIENTS} clients did not get every seq of {counts:?}",
        behind()
    );
    assert_eq!(fleet.ready.load(Ordering::SeqCst), CLIENTS);
    assert!(
        fleet.unexpected.lock().is_empty(),
        "{:?}",
        fleet.unexpected.lock()
    );
    fleet.stop.store(true, Ordering::SeqCst);
}

/// Starts publishing to every stream through every node.
fn publishing(nodes: &[Node]) -> (Arc<AtomicBool>, JoinHandle<Vec<u64>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = nodes.iter().map(|n| n.addr).collect();
    (stop.clone(), tokio::spawn(publisher(addrs, stop)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_api_rebalance_sheds_the_old_nodes_down_to_their_share_at_the_pace() {
    let redis = Redis::start();
    let config = config();
    let (nodes, _lb, fleet) = scaled_out(&redis, &config, false).await;
    let first = nodes[0].addr;
    assert!(
        until(Duration::from_secs(10), || async {
            let c = connections(first).await;
            c.len() == 5 && c.iter().map(|(_, n)| n).sum::<u64>() == CLIENTS as u64
        })
        .await,
        "{:?}",
        connections(first).await
    );

    // Unknown fields and a wrong key are refused.
    let (status, body) = api(first, "POST", "/api/rebalance", r#"{"dry":true}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = http(first, "POST", "/api/rebalance", &[], b"").await;
    assert_eq!(status, 401);

    // A dry run says what each node would shed, and changes nothing.
    let (status, plan) = api(first, "POST", "/api/rebalance", r#"{"dry_run":true}"#).await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["dry_run"], true);
    let lines: Vec<(String, u64, u64, u64)> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_owned(),
                n["connections"].as_u64().unwrap(),
                n["share"].as_u64().unwrap(),
                n["shed"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64, u64, u64)> = (0..5)
        .map(|i| {
            let old = i < 3;
            (
                format!("n{i}"),
                if old { 100 } else { 0 },
                60,
                if old { 40 } else { 0 },
            )
        })
        .collect();
    assert_eq!(lines, expected, "{plan}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        fleet.shed.load(Ordering::SeqCst),
        0,
        "a dry run sheds nothing"
    );
    let after: Vec<u64> = connections(first).await.iter().map(|(_, c)| *c).collect();
    assert_eq!(after, [100, 100, 100, 0, 0]);
    for n in &nodes {
        assert_eq!(metric(n, "wsgate_rebalance_shed_total").await, 0.0);
    }

    // The real thing, asked twice at once: a node already shedding does not start a
    // second shedding. Publications go on throughout.
    let (stop, publisher) = publishing(&nodes);
    let started = Instant::now();
    let (status, plan) = api(nodes[3].addr, "POST", "/api/rebalance", "").await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["dry_run"], false);
    let (status, again) = api(nodes[4].addr, "POST", "/api/rebalance", "{}").await;
    assert_eq!(status, 200, "{again}");
    settle(first, &fleet).await;
    // The last client shed was 2 s before the fleet settled.
    let took = started.elapsed() - Duration::from_secs(2);
    // 40 closes at about 10 a second (jittered): about 4 s, never all at once.
    println!(
        "balanced in {took:?}: {:?}, {} clients shed",
        connections(first).await,
        fleet.shed.load(Ordering::SeqCst)
    );
    assert!(
        took >= Duration::from_secs(2),
        "too fast for the pace: {took:?}"
    );
    let shed = fleet.shed.load(Ordering::SeqCst);
    assert!((110..=125).contains(&shed), "shed {shed}, planned 120");
    for (i, n) in nodes.iter().enumerate() {
        let runs = metric(n, "wsgate_rebalance_runs_total{trigger=\"api\"}").await;
        let closed = metric(n, "wsgate_rebalance_shed_total").await;
        let label = metric(n, "wsgate_disconnects_total{reason=\"rebalance\"}").await;
        if i < 3 {
            assert_eq!(runs, 1.0, "n{i} shed once");
            assert!((30.0..=41.0).contains(&closed), "n{i} shed {closed}");
            assert_eq!(label, closed);
        } else {
            assert_eq!((runs, closed), (0.0, 0.0), "n{i} had nothing to shed");
        }
    }
    nobody_lost(&fleet, stop, publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_automatic_rebalancing_the_fleet_evens_out_by_itself() {
    let redis = Redis::start();
    let config = config();
    let started = Instant::now();
    let (nodes, _lb, fleet) = scaled_out(&redis, &config, true).await;
    let (stop, publisher) = publishing(&nodes);
    let first = nodes[0].addr;
    settle(first, &fleet).await;
    println!(
        "balanced {:?} after the start: {:?}, {} clients shed",
        started.elapsed(),
        connections(first).await,
        fleet.shed.load(Ordering::SeqCst)
    );
    let mut auto_runs = 0.0;
    for n in &nodes[..3] {
        auto_runs += metric(n, "wsgate_rebalance_runs_total{trigger=\"auto\"}").await;
    }
    assert!(
        auto_runs >= 3.0,
        "each old node shed on its own: {auto_runs}"
    );
    // It stays balanced: nobody sheds once within the margin (6 more checks).
    let shed = fleet.shed.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(balanced(&connections(first).await));
    assert_eq!(fleet.shed.load(Ordering::SeqCst), shed, "shedding went on");
    nobody_lost(&fleet, stop, publisher).await;
}
