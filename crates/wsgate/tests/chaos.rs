//! The chaos suite (issue 20): several `wsgate` processes on one Redis, each node's
//! Redis link through its own fault-injecting proxy, a few hundred clients — stream
//! clients that resume by themselves, plain-topic clients, and clients that stop
//! reading — and a publisher at a steady rate. Then one fault after the other, each
//! with its own assertions:
//!
//! 1. SIGKILL of a node: only its clients lose their connection; stream clients resume
//!    on other nodes.
//! 2. A rolling drain of every node (each replaced): only the drained node's clients
//!    are closed, with 1001.
//! 3. Redis restarted (with persistence): every node turns not ready and back; no
//!    client is disconnected.
//! 4. One node's Redis link made slow (latency and a throttle): it stays ready and its
//!    clients keep up.
//! 5. The same link stalled (a black hole): that node turns not ready, no other; no
//!    client is disconnected; healed, it is ready again and its stream clients get
//!    what they missed.
//! 6. The same link cut (connections reset): as the stall.
//! 7. Clients that stop reading: they are cut as slow consumers (4008); nobody else
//!    notices.
//!
//! Throughout and at the end: no node crashed; every stream client received every
//! seq exactly once, in order, or was told what it lost (`reset`,
//! `recovered:false`; counted and printed); plain topics are at most once, their loss
//! measured and printed per fault; after the clients leave, every node's connections,
//! open files and Redis links return to their baseline.
//!
//! The default is the short form, run in CI (4 nodes, ~250 clients, seconds per
//! fault). `WSGATE_CHAOS=long` selects the long form (6 nodes, ~800 clients, longer
//! phases): docs/benchmarks.md, "Chaos suite".

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::http::{blocking, parse_metrics, try_request, val};
use wsgate_testkit::process::Node;
use wsgate_testkit::proxy::Proxy;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::streams::{
    self, check, last_seq, Close, Closes, Event, Events, ResumingClient, Slots, Urls,
};
use wsgate_testkit::ws::{client_frame, read_frame};

/// The stream every stream client follows.
const STREAM: &str = "chat:chaos";
/// The plain topic every plain client follows.
const PLAIN: &str = "news:chaos";
/// The plain topic of the clients that stop reading, fed big publications.
const BULK: &str = "bulk:chaos";
/// Bounded waits: generous, for a loaded machine.
const WAIT: Duration = Duration::from_secs(30);
/// The outbound queue of the nodes (small, so stalled clients are cut soon).
const QUEUE: &str = "256KiB";
/// One bulk publication's payload.
const BULK_BYTES: usize = 16 * 1024;

/// The size of a run.
#[derive(Debug)]
struct Shape {
    nodes: usize,
    stream_clients: usize,
    plain_clients: usize,
    stallers: usize,
    /// Publications per second, on each of the two topics.
    rate: u32,
    /// How long each fault is held, and the quiet time after it.
    hold: Duration,
    /// The whole run stops by itself after this long.
    limit: Duration,
}

impl Shape {
    fn from_env() -> Shape {
        match std::env::var("WSGATE_CHAOS").as_deref() {
            Err(_) | Ok("") | Ok("short") => Shape {
                nodes: 4,
                stream_clients: 120,
                plain_clients: 120,
                stallers: 4,
                rate: 50,
                hold: Duration::from_millis(1500),
                limit: Duration::from_secs(300),
            },
            Ok("long") => Shape {
                nodes: 6,
                stream_clients: 400,
                plain_clients: 400,
                stallers: 12,
                rate: 50,
                hold: Duration::from_secs(8),
                limit: Duration::from_secs(900),
            },
            Ok(other) => panic!("WSGATE_CHAOS={other:?}: expected \"short\" or \"long\""),
        }
    }
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One node's place: the node (replaced after a kill or drain), its own proxy to
/// Redis (kept), and the baseline taken when the node started.
struct Slot {
    node: Node,
    proxy: Proxy,
    fds: usize,
    redis_links: usize,
}

/// What the publisher thread shares.
#[derive(Default)]
struct Publisher {
    /// The nodes it publishes through (a node under a fault is taken out).
    targets: Mutex<Vec<SocketAddr>>,
    /// The next publication number (`{"k":…}` on both topics).
    next_k: AtomicU64,
    /// Stream publications acknowledged.
    stream_acked: AtomicU64,
    /// Plain publications acknowledged, by number.
    plain_acked: Mutex<Vec<u64>>,
    stop: AtomicBool,
}

impl Publisher {
    /// Publishes `data` on `topic` through the first target that accepts it,
    /// starting at the `turn`-th.
    fn publish(&self, turn: usize, topic: &str, data: &str) -> bool {
        let targets = self.targets.lock().clone();
        let body = format!(r#"{{"topic":"{topic}","data":{data}}}"#);
        (0..targets.len()).any(|i| {
            let addr = targets[(turn + i) % targets.len()];
            blocking(addr, "POST", "/api/publish", &body).0 == 200
        })
    }

    /// The loop of the publisher's thread: `rate` ticks a second, one publication on
    /// each topic per tick.
    fn run(&self, rate: u32) {
        let period = Duration::from_secs(1) / rate;
        let mut next = Instant::now();
        let mut turn = 0usize;
        while !self.stop.load(Ordering::Relaxed) {
            let k = self.next_k.fetch_add(1, Ordering::Relaxed);
            let data = format!(r#"{{"k":{k}}}"#);
            if self.publish(turn, STREAM, &data) {
                self.stream_acked.fetch_add(1, Ordering::Relaxed);
            }
            if self.publish(turn + 1, PLAIN, &data) {
                self.plain_acked.lock().push(k);
            }
            turn += 1;
            next += period;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else {
                next = now; // behind (a fault): no burst to catch up
            }
        }
    }
}

/// What a plain client received, and the connections it lost.
#[derive(Default)]
struct PlainLog {
    /// The `k` of every message, in arrival order.
    got: Mutex<Vec<u64>>,
    closes: Closes,
}

/// A plain-topic client: subscribes on a node, and when its connection ends moves
/// to the next node and subscribes again (no resume: plain topics are at most once).
async fn plain_client(urls: Urls, first: usize, log: Arc<PlainLog>, stop: Arc<AtomicBool>) {
    let mut next = Slots::new(first);
    while !stop.load(Ordering::Relaxed) {
        let Some((slot, mut ws)) = next.connect(&urls).await else {
            continue;
        };
        let cmd = json!({"op":"subscribe","id":1,"topics":[PLAIN]});
        if ws.send(Message::text(cmd.to_string())).await.is_err() {
            continue;
        }
        let mut code = None;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let v = match wsgate_testkit::streams::next_json(&mut ws).await {
                None => continue,
                Some(Err(close)) => {
                    code = close;
                    break;
                }
                Some(Ok(v)) => v,
            };
            match v["op"].as_str() {
                Some("message") => log.got.lock().push(v["data"]["k"].as_u64().unwrap()),
                Some("error") => break, // e.g. `unavailable`: try elsewhere
                _ => {}
            }
        }
        log.closes.lock().push(Close {
            slot,
            code,
            at: Instant::now(),
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that subscribes to [`BULK`] and then never reads again, with a small
/// receive buffer.
async fn staller(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .expect("a handshake response in time")
            .unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let sub = json!({"op":"subscribe","id":1,"topics":[BULK]}).to_string();
    s.write_all(&client_frame(true, 1, sub.as_bytes()))
        .await
        .unwrap();
    // The welcome, then the reply: subscribed from here on.
    loop {
        let (_, payload) = read_frame(&mut s).await;
        let v: Value = serde_json::from_slice(&payload).unwrap_or(Value::Null);
        if v["op"] == "subscribed" {
            return s;
        }
        assert_ne!(v["op"], "error", "{v}");
    }
}

/// Whether the peer ended the connection (EOF or reset) within [`WAIT`], reading
/// (and dropping) whatever was still buffered.
async fn ended(s: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// `GET /readyz` is 200.
async fn ready(admin: SocketAddr) -> bool {
    matches!(
        try_request(admin, "GET", "/readyz", &[], b"").await,
        Ok((200, _))
    )
}

/// Polls `f` every 50 ms until it is true; how long that took, or `None` after
/// `within`.
async fn until<F, Fut>(within: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One fault's line in the report.
struct Row {
    fault: String,
    saw: String,
    recovered: String,
    /// Publication numbers published during the fault and its recovery.
    ks: std::ops::Range<u64>,
}

/// The whole run.
struct Chaos {
    shape: Shape,
    redis: Redis,
    _redis_dir: tempfile::TempDir,
    config: tempfile::NamedTempFile,
    slots: Vec<Slot>,
    urls: Urls,
    publisher: Arc<Publisher>,
    publisher_thread: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stream: Vec<(Events, Closes, tokio::task::JoinHandle<()>)>,
    plain: Vec<(Arc<PlainLog>, tokio::task::JoinHandle<()>)>,
    rows: Vec<Row>,
}

impl Chaos {
    fn start_node(config: &tempfile::NamedTempFile, proxy: &Proxy) -> Node {
        let redis_url = format!("redis://{}/", proxy.addr);
        let mut args = streams::fault_node_args(config);
        args.extend(
            [
                "--outbound-queue-bytes",
                QUEUE,
                "--socket-send-buffer",
                "64KiB",
                // Connections move between nodes on purpose here: no rebalancing (1012).
                "--rebalance-auto",
                "false",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tokio::task::block_in_place(|| Node::start_logged(Some(&redis_url), &args))
    }

    /// A new node behind `proxy`, ready, with its baseline.
    async fn new_node(config: &tempfile::NamedTempFile, proxy: &Proxy) -> (Node, usize, usize) {
        let node = Self::start_node(config, proxy);
        let admin = node.admin;
        assert!(
            until(WAIT, || ready(admin)).await.is_some(),
            "a new node is ready: {}",
            node.logs()
        );
        let fds = open_fds(node.pid());
        (node, fds, proxy.open_connections())
    }

    async fn start(shape: Shape) -> Chaos {
        let dir = tempfile::tempdir().unwrap();
        let redis = Redis::start_with(&[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir.path().to_str().unwrap(),
        ]);
        let target: SocketAddr = format!("127.0.0.1:{}", redis.port).parse().unwrap();
        let config = wsgate_testkit::streams::chat_streams_config();
        let mut slots = Vec::new();
        for _ in 0..shape.nodes {
            let proxy = Proxy::start(target);
            let (node, fds, redis_links) = Self::new_node(&config, &proxy).await;
            slots.push(Slot {
                node,
                proxy,
                fds,
                redis_links,
            });
        }
        let urls: Urls = Arc::new(Mutex::new(slots.iter().map(|s| s.node.ws_url()).collect()));
        let publisher = Arc::new(Publisher::default());
        *publisher.targets.lock() = slots.iter().map(|s| s.node.addr).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + shape.limit;
        let stream = (0..shape.stream_clients)
            .map(|i| {
                let (events, closes) = (Events::default(), Closes::default());
                let task = tokio::spawn(
                    ResumingClient {
                        urls: urls.clone(),
                        first: i,
                        topic: STREAM.into(),
                        events: events.clone(),
                        closes: closes.clone(),
                        stop: stop.clone(),
                        until: deadline,
                    }
                    .run(),
                );
                (events, closes, task)
            })
            .collect();
        let plain = (0..shape.plain_clients)
            .map(|i| {
                let log = Arc::new(PlainLog::default());
                let task = tokio::spawn(plain_client(urls.clone(), i, log.clone(), stop.clone()));
                (log, task)
            })
            .collect();
        let mut chaos = Chaos {
            shape,
            redis,
            _redis_dir: dir,
            config,
            slots,
            urls,
            publisher,
            publisher_thread: None,
            stop,
            stream,
            plain,
            rows: Vec::new(),
        };
        // Everyone subscribed before the first publication: then every plain client
        // should get every plain publication, barring faults.
        let c = &chaos;
        assert!(
            until(WAIT, || async {
                c.stream.iter().all(|(e, _, _)| !e.lock().is_empty())
                    && c.slots_metric_sum("wsgate_subscriptions") as usize
                        == c.shape.stream_clients + c.shape.plain_clients
            })
            .await
            .is_some(),
            "every client subscribed"
        );
        let p = chaos.publisher.clone();
        let rate = chaos.shape.rate;
        chaos.publisher_thread = Some(std::thread::spawn(move || p.run(rate)));
        chaos.caught_up().await;
        chaos
    }

    /// The sum of a series over every node (blocking scrapes).
    fn slots_metric_sum(&self, series: &str) -> f64 {
        self.slots
            .iter()
            .map(|s| {
                let (_, body) = blocking(s.node.admin, "GET", "/metrics", "");
                val(&parse_metrics(&body), series)
            })
            .sum()
    }

    fn k(&self) -> u64 {
        self.publisher.next_k.load(Ordering::Relaxed)
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.slots.iter().map(|s| s.node.addr).collect()
    }

    /// The stream's position now (asked of a node that answers).
    fn position(&self) -> (u64, String) {
        let addrs = self.addrs();
        tokio::task::block_in_place(|| streams::position(&addrs, STREAM))
    }

    /// Waits until every stream client reached the stream's position as of now;
    /// how long that took.
    async fn caught_up(&self) -> Duration {
        let (seq, _) = self.position();
        let took = until(WAIT, || async {
            self.stream
                .iter()
                .all(|(e, _, _)| last_seq(&e.lock()).is_some_and(|s| s >= seq))
        })
        .await;
        took.unwrap_or_else(|| {
            let behind: Vec<(usize, Option<u64>)> = self
                .stream
                .iter()
                .enumerate()
                .map(|(i, (e, _, _))| (i, last_seq(&e.lock())))
                .filter(|(_, s)| s.is_none_or(|s| s < seq))
                .take(10)
                .collect();
            panic!("stream clients did not reach seq {seq}: {behind:?}")
        })
    }

    /// Every connection stream and plain clients lost since `t`: `(slot, code)`.
    fn closes_since(&self, t: Instant) -> Vec<(usize, Option<u16>)> {
        let stream = self.stream.iter().map(|(_, c, _)| c);
        let plain = self.plain.iter().map(|(l, _)| &l.closes);
        stream
            .chain(plain)
            .flat_map(|c| {
                c.lock()
                    .iter()
                    .filter(|c| c.at >= t)
                    .map(|c| (c.slot, c.code))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// No client lost its connection since `t`, except clients of `slot` (with
    /// `code`, when given); returns how many did.
    fn only_closed(&self, t: Instant, slot: Option<usize>, code: Option<u16>, what: &str) -> usize {
        let closes = self.closes_since(t);
        let wrong: Vec<_> = closes
            .iter()
            .filter(|(s, c)| Some(*s) != slot || code.is_some_and(|code| *c != Some(code)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{what}: clients of other nodes lost their connection (slot, close code): {wrong:?}"
        );
        closes.len()
    }

    /// Every node process is alive.
    fn all_alive(&mut self, what: &str) {
        for (i, s) in self.slots.iter_mut().enumerate() {
            let exited = s.node.exited();
            assert!(
                exited.is_none(),
                "{what}: node {i} exited ({exited:?}):\n{}",
                s.node.logs()
            );
        }
    }

    async fn all_ready(&self) -> Option<Duration> {
        let admins: Vec<SocketAddr> = self.slots.iter().map(|s| s.node.admin).collect();
        until(WAIT, || {
            let admins = admins.clone();
            async move {
                for a in admins {
                    if !ready(a).await {
                        return false;
                    }
                }
                true
            }
        })
        .await
    }

    fn set_targets(&self, except: Option<usize>) {
        *self.publisher.targets.lock() = self
            .slots
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != except)
            .map(|(_, s)| s.node.addr)
            .collect();
    }

    /// Puts a new node in slot `i` (the old one is gone), on the same proxy.
    async fn replace(&mut self, i: usize) {
        let (node, fds, redis_links) = Self::new_node(&self.config, &self.slots[i].proxy).await;
        self.urls.lock()[i] = node.ws_url();
        let slot = &mut self.slots[i];
        (slot.node, slot.fds, slot.redis_links) = (node, fds, redis_links);
    }

    async fn pause(&self) {
        tokio::time::sleep(self.shape.hold).await;
    }

    fn row(&mut self, fault: &str, saw: String, recovered: String, k0: u64) {
        eprintln!("chaos: {fault}: {saw}; {recovered}");
        let ks = k0..self.k();
        self.rows.push(Row {
            fault: fault.into(),
            saw,
            recovered,
            ks,
        });
    }

    /// 1. SIGKILL of node 0.
    async fn kill(&mut self) {
        let (t, k0) = (Instant::now(), self.k());
        self.set_targets(Some(0));
        self.slots[0].node.signal("KILL");
        tokio::task::block_in_place(|| self.slots[0].node.wait_exit(WAIT));
        let took = self.caught_up().await;
        let closed = self.only_closed(t, Some(0), None, "SIGKILL of node 0");
        assert!(
            closed >= 1,
            "the killed node's clients lost their connection"
        );
        self.replace(0).await;
        self.set_targets(None);
        self.all_alive("after the SIGKILL");
        self.pause().await;
        self.row(
            "SIGKILL of a node",
            format!("{closed} clients of that node lost their connection (no close frame); stream clients resumed on other nodes; no other client disconnected"),
            format!("stream clients caught up {:.1} s after the kill", took.as_secs_f64()),
            k0,
        );
    }

    /// 2. Every node drained (SIGTERM) and replaced, one after the other.
    async fn rolling_drain(&mut self) {
        let (k0, mut closed, mut worst) = (self.k(), 0, Duration::ZERO);
        for i in 0..self.slots.len() {
            let t = Instant::now();
            self.set_targets(Some(i));
            self.slots[i].node.signal("TERM");
            let status = tokio::task::block_in_place(|| self.slots[i].node.wait_exit(WAIT));
            assert!(status.success(), "a drain exits 0: {status}");
            self.replace(i).await;
            self.set_targets(None);
            worst = worst.max(t.elapsed() + self.caught_up().await);
            closed += self.only_closed(t, Some(i), Some(1001), "rolling drain");
            self.all_alive("during the rolling drain");
        }
        self.pause().await;
        self.row(
            "rolling drain of every node (each replaced)",
            format!("{closed} connections closed with 1001, each by its own node's drain; stream clients resumed (`recovered:true`)"),
            format!("≤ {:.1} s per node from SIGTERM to every stream client caught up", worst.as_secs_f64()),
            k0,
        );
    }

    /// 3. Redis killed, then started again (it persists: the streams keep their epoch).
    async fn redis_restart(&mut self) {
        let (t, k0) = (Instant::now(), self.k());
        let before = self.position();
        self.redis.kill();
        let admins: Vec<SocketAddr> = self.slots.iter().map(|s| s.node.admin).collect();
        let unready = until(WAIT, || {
            let admins = admins.clone();
            async move {
                for a in admins {
                    if ready(a).await {
                        return false;
                    }
                }
                true
            }
        })
        .await
        .expect("every node turns not ready while Redis is down");
        self.pause().await;
        self.all_alive("Redis down");
        let back = Instant::now();
        tokio::task::block_in_place(|| self.redis.restart());
        let readiness = self
            .all_ready()
            .await
            .expect("every node is ready again once Redis is back");
        let took = back.elapsed() + self.caught_up().await;
        assert_eq!(self.position().1, before.1, "the stream kept its epoch");
        self.only_closed(t, None, None, "Redis restart");
        self.pause().await;
        self.row(
            "Redis restarted (with persistence)",
            format!("no disconnect; every node not ready within {:.1} s of the kill, publishes 503 meanwhile", unready.as_secs_f64()),
            format!("all ready {:.1} s after Redis was back; stream clients caught up after {:.1} s", readiness.as_secs_f64(), took.as_secs_f64()),
            k0,
        );
    }

    /// The slot whose node has the most clients (asserting it has a fair share).
    fn busiest(&self) -> (usize, usize) {
        let conns: Vec<f64> = self
            .slots
            .iter()
            .map(|s| {
                let (_, body) = blocking(s.node.admin, "GET", "/metrics", "");
                val(&parse_metrics(&body), "wsgate_connections")
            })
            .collect();
        let (i, most) = conns
            .iter()
            .enumerate()
            .fold((0, 0.0), |m, (i, c)| if *c > m.1 { (i, *c) } else { m });
        let all = (self.shape.stream_clients + self.shape.plain_clients) as f64;
        assert!(
            most >= all / self.slots.len() as f64 / 2.0,
            "clients spread over the nodes: {conns:?}"
        );
        (i, most as usize)
    }

    /// 4–6. Node `i`'s Redis link slow, then stalled, then cut, healed after each.
    async fn link_faults(&mut self, i: usize, clients: usize) {
        self.set_targets(Some(i));
        let admin = self.slots[i].node.admin;
        let others: Vec<SocketAddr> = (0..self.slots.len())
            .filter(|j| *j != i)
            .map(|j| self.slots[j].node.admin)
            .collect();

        // Slow: latency on every chunk, and a throttle.
        let reconnects = || {
            let (_, body) = blocking(admin, "GET", "/metrics", "");
            val(&parse_metrics(&body), "wsgate_redis_reconnects_total")
        };
        let (t, k0, r0) = (Instant::now(), self.k(), reconnects());
        eprintln!("chaos: Redis link faults on node {i}, {clients} clients");
        self.slots[i].proxy.latency(Duration::from_millis(100));
        self.slots[i].proxy.throttle(256 * 1024);
        self.pause().await;
        let lag = self.caught_up().await;
        assert!(ready(admin).await, "a slow Redis link keeps the node ready");
        self.only_closed(t, None, None, "slow Redis link");
        self.slots[i].proxy.heal();
        self.all_alive("slow Redis link");
        self.row(
            "one node's Redis link slow (100 ms per chunk, 256 KiB/s)",
            format!(
                "no disconnect (the node's {clients} clients stay); the node stays ready ({} Redis reconnects)",
                reconnects() - r0
            ),
            format!("its stream clients kept up (caught up {:.1} s after the hold)", lag.as_secs_f64()),
            k0,
        );

        // Stalled and cut: the node notices, turns not ready (no other node does),
        // keeps its clients; healed, it is ready and repairs its streams.
        for (name, stall) in [
            ("stalled (black hole)", true),
            ("cut (connections reset)", false),
        ] {
            let (t, k0) = (Instant::now(), self.k());
            if stall {
                self.slots[i].proxy.stall();
            } else {
                self.slots[i].proxy.cut();
            }
            let noticed = until(
                Duration::from_secs(60),
                || async move { !ready(admin).await },
            )
            .await
            .unwrap_or_else(|| panic!("the node turns not ready when its Redis link is {name}"));
            for a in &others {
                assert!(ready(*a).await, "the other nodes stay ready");
            }
            self.pause().await;
            self.all_alive(name);
            let healed = Instant::now();
            self.slots[i].proxy.heal();
            let back = until(WAIT, || ready(admin))
                .await
                .unwrap_or_else(|| panic!("the node is ready again after its link was {name}"));
            let took = healed.elapsed() + self.caught_up().await;
            self.only_closed(t, None, None, name);
            self.pause().await;
            self.row(
                &format!("one node's Redis link {name}"),
                format!("no disconnect; that node not ready after {:.1} s, the others ready throughout", noticed.as_secs_f64()),
                format!("ready {:.1} s after the heal; its stream clients got what they missed after {:.1} s", back.as_secs_f64(), took.as_secs_f64()),
                k0,
            );
        }
        self.set_targets(None);
    }

    /// 7. Clients that stop reading, fed more than their queue holds.
    async fn stalled_clients(&mut self) {
        let (t, k0) = (Instant::now(), self.k());
        let cut_before =
            self.slots_metric_sum("wsgate_disconnects_total{reason=\"slow_consumer\"}");
        let mut stallers = Vec::new();
        for j in 0..self.shape.stallers {
            stallers.push(staller(self.slots[j % self.slots.len()].node.addr).await);
        }
        // Each staller can hold its queue, the kernel's buffers, then no more.
        let payload = format!("\"{}\"", "x".repeat(BULK_BYTES));
        let n = 3 * 1024 * 1024 / BULK_BYTES;
        let addrs = self.addrs();
        tokio::task::block_in_place(|| {
            let body = format!(r#"{{"topic":"{BULK}","data":{payload}}}"#);
            for j in 0..n {
                let (status, text) =
                    blocking(addrs[j % addrs.len()], "POST", "/api/publish", &body);
                assert_eq!(status, 200, "{text}");
            }
        });
        let slow = self.shape.stallers as f64;
        let c = &*self;
        let cut = until(WAIT, || async {
            c.slots_metric_sum("wsgate_disconnects_total{reason=\"slow_consumer\"}") - cut_before
                >= slow
        })
        .await
        .expect("every staller was cut as a slow consumer");
        for (j, s) in stallers.iter_mut().enumerate() {
            assert!(ended(s).await, "staller {j}: its connection ended");
        }
        let took = self.caught_up().await;
        self.only_closed(t, None, None, "clients stalling");
        self.all_alive("clients stalling");
        self.pause().await;
        self.row(
            "clients stop reading",
            format!("those {} were closed 4008 (slow consumer) within {:.1} s of the burst; no other client disconnected", self.shape.stallers, cut.as_secs_f64()),
            format!("the other clients kept up ({:.1} s)", took.as_secs_f64()),
            k0,
        );
    }

    /// Stops publishing, waits for every stream client to reach the end, stops the
    /// clients, checks everything, and waits for every node back at its baseline.
    async fn finish(mut self) {
        self.publisher.stop.store(true, Ordering::Relaxed);
        let thread = self.publisher_thread.take().unwrap();
        tokio::task::block_in_place(|| thread.join().unwrap());
        let end = self.position();
        self.caught_up().await;
        self.stop.store(true, Ordering::Relaxed);
        let history =
            tokio::task::block_in_place(|| streams::history(self.slots[0].node.addr, STREAM, &end));
        let mut all = Vec::new();
        for (events, _, task) in self.stream.drain(..) {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("a stream client stops")
                .unwrap();
            all.push(events.lock().clone());
        }
        // Every seq once, in order, or announced (`reset`, `recovered:false`): never a
        // silent gap or a duplicate.
        let verdicts = streams::check_all(&all, &end, &history);
        let announced: Vec<(usize, &Vec<String>)> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| v.announced_lost + v.resets + v.not_recovered > 0)
            .map(|(i, v)| (i, &v.notes))
            .collect();
        eprintln!(
            "chaos: stream clients told of a loss: {} ({:?})",
            announced.len(),
            announced.iter().take(5).collect::<Vec<_>>()
        );
        let announced_lost: u64 = verdicts.iter().map(|v| v.announced_lost).sum();
        let resumed: u64 = verdicts.iter().map(|v| v.recovered).sum();
        let acked = self.publisher.stream_acked.load(Ordering::Relaxed);
        let mut plain = Vec::new();
        for (log, task) in self.plain.drain(..) {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("a plain client stops")
                .unwrap();
            plain.push(log);
        }
        // Plain topics: in order, never twice; loss measured per fault.
        for (i, log) in plain.iter().enumerate() {
            let got = log.got.lock();
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "plain client {i}: out of order or twice: {got:?}"
            );
        }
        let acked_plain = self.publisher.plain_acked.lock().clone();
        // Both sorted: what a client got of the acknowledged publications in `ks`.
        let in_range = |v: &[u64], ks: &std::ops::Range<u64>| {
            let from = v.partition_point(|k| *k < ks.start);
            let to = v.partition_point(|k| *k < ks.end);
            from..to
        };
        let lost_in = |ks: &std::ops::Range<u64>| -> (u64, u64) {
            let expected = in_range(&acked_plain, ks).len() as u64 * plain.len() as u64;
            let got: u64 = plain
                .iter()
                .map(|l| {
                    let got = l.got.lock();
                    got[in_range(&got, ks)]
                        .iter()
                        .filter(|k| acked_plain.binary_search(k).is_ok())
                        .count() as u64
                })
                .sum();
            (expected - got.min(expected), expected)
        };
        eprintln!(
            "chaos: {} stream publications acknowledged, {} stream clients each received every one of seq 1..={} once, in order, or were told ({announced_lost} announced lost in all; {resumed} resumes); {} plain publications",
            acked,
            verdicts.len(),
            end.0,
            acked_plain.len()
        );
        eprintln!(
            "| fault | what clients saw | recovery | streams: silently lost | plain: lost deliveries |"
        );
        eprintln!("|---|---|---|---|---|");
        for r in &self.rows {
            let (lost, expected) = lost_in(&r.ks);
            eprintln!(
                "| {} | {} | {} | 0 | {lost} of {expected} ({:.2}%) |",
                r.fault,
                r.saw,
                r.recovered,
                100.0 * lost as f64 / expected.max(1) as f64
            );
        }
        let (lost, expected) = lost_in(&(0..u64::MAX));
        eprintln!("chaos: plain loss over the whole run: {lost} of {expected} deliveries");

        // No leak: connections, open files and Redis links back at the baseline.
        for (i, s) in self.slots.iter().enumerate() {
            let pid = s.node.pid();
            let settled = until(WAIT, || async {
                let (_, body) =
                    wsgate_testkit::http::http(s.node.admin, "GET", "/metrics", &[], b"").await;
                val(&parse_metrics(&body), "wsgate_connections") == 0.0
                    && open_fds(pid) <= s.fds + 8
                    && s.proxy.open_connections() <= s.redis_links
            })
            .await;
            assert!(
                settled.is_some(),
                "node {i} back at its baseline: {} open files (baseline {}), {} Redis links through its proxy (baseline {})",
                open_fds(pid),
                s.fds,
                s.proxy.open_connections(),
                s.redis_links
            );
        }
        self.all_alive("at the end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_one_after_another_lose_nothing_silently() {
    let shape = Shape::from_env();
    eprintln!("chaos: {shape:?}");
    let started = Instant::now();
    let mut chaos = Chaos::start(shape).await;
    chaos.kill().await;
    chaos.rolling_drain().await;
    chaos.redis_restart().await;
    let (link, clients) = chaos.busiest();
    chaos.link_faults(link, clients).await;
    chaos.stalled_clients().await;
    chaos.finish().await;
    eprintln!(
        "chaos: the run took {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

/// The stream checker catches what it must (it is shared with stream_faults.rs).
#[test]
fn the_checker_refuses_a_silent_gap() {
    let events = [
        Event::Subscribed {
            seq: 0,
            epoch: "e".into(),
            recovered: None,
        },
        Event::Message(1, "a".into()),
        Event::Message(3, "c".into()),
    ];
    assert!(check(&events).unwrap_err().contains("silent gap"));
}
