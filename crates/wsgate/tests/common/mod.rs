//! Helpers for the multi-node tests: a real `redis-server` on a free port, real
//! `wsgate` processes, and a WebSocket client nobody here wrote (tungstenite).
//! Every process is killed when its handle drops, so a failing test leaves nothing.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream as TokioTcp;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How many times Redis ran `command`, from the text of `INFO commandstats` (`None`
/// if it never did).
pub fn command_calls(info: &str, command: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
}

/// Every client asks at once to subscribe to its own topic, `topic(i)`; then each
/// confirmation is awaited.
pub async fn subscribe_each_at_once(clients: &mut [Client], topic: impl Fn(usize) -> String) {
    let mut ids = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        ids.push(c.send(json!({"op":"subscribe","topics":[topic(i)]})).await);
    }
    for (c, id) in clients.iter_mut().zip(ids) {
        assert_eq!(c.reply(id).await["op"], "subscribed");
    }
}

pub use wsgate_testkit::free_port;

/// Polls `f` until it is true or `timeout` passes; returns whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A private redis-server, bound to 127.0.0.1, no persistence.
pub struct Redis {
    pub port: u16,
    extra: Vec<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts on a given port.
    pub fn start_on(port: u16) -> Redis {
        let mut r = Redis {
            port,
            extra: Vec::new(),
            child: None,
        };
        r.spawn();
        r
    }

    /// Starts with extra `--name value` arguments.
    pub fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let url = match self.extra.iter().position(|a| a == "--requirepass") {
            Some(i) => format!("redis://:{}@127.0.0.1:{}/", self.extra[i + 1], self.port),
            None => self.url(),
        };
        assert!(
            wait_until(Duration::from_secs(10), || {
                redis::Client::open(url.as_str())
                    .and_then(|c| c.get_connection())
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            }),
            "redis-server did not start on {}",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A fresh synchronous connection, for inspecting Redis from the test.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills the server (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends a signal (e.g. `STOP`, `CONT`) to the server process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Sorted channel names matching `pattern` (`PUBSUB CHANNELS`).
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query(&mut self.conn())
            .unwrap();
        v.sort();
        v
    }

    /// `redis-cli PUBLISH channel payload`: a backend using the stock client.
    pub fn cli_publish(&self, channel: &str, payload: &str) {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["PUBLISH", channel, payload])
            .output()
            .expect("redis-cli is installed");
        assert!(out.status.success(), "redis-cli failed: {out:?}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `wsgate` process.
pub struct Node {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    child: Child,
    /// Where stderr goes when started with [`Node::start_logged`].
    log: Option<tempfile::NamedTempFile>,
}

impl Node {
    /// Starts a node on free ports with `args` added; waits until `/healthz` answers.
    pub fn start(redis_url: Option<&str>, args: &[&str]) -> Node {
        Self::start_inner(redis_url, args, None)
    }

    /// Like [`Node::start`], logging at `warn` into a file read by [`Node::logs`].
    pub fn start_logged(redis_url: Option<&str>, args: &[&str]) -> Node {
        Self::start_inner(
            redis_url,
            args,
            Some(tempfile::NamedTempFile::new().unwrap()),
        )
    }

    /// Everything the node logged so far (empty unless started with `start_logged`).
    pub fn logs(&self) -> String {
        self.log
            .as_ref()
            .map(|f| std::fs::read_to_string(f.path()).unwrap_or_default())
            .unwrap_or_default()
    }

    fn start_inner(
        redis_url: Option<&str>,
        args: &[&str],
        log: Option<tempfile::NamedTempFile>,
    ) -> Node {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args([
            "--listen",
            &addr.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args([
            "--log-level",
            &std::env::var("WSGATE_TEST_LOG")
                .unwrap_or(if log.is_some() { "warn" } else { "error" }.into()),
        ])
        .args(args)
        .env_remove("WSGATE_REDIS_URL")
        .stdout(Stdio::null())
        .stderr(match &log {
            Some(f) => Stdio::from(f.reopen().unwrap()),
            None => Stdio::inherit(),
        });
        if let Some(url) = redis_url {
            cmd.args(["--redis-url", url]);
        }
        let child = cmd.spawn().expect("wsgate binary");
        let mut node = Node {
            addr,
            admin,
            child,
            log,
        };
        let mut exited = None;
        let up = wait_until(Duration::from_secs(10), || {
            exited = node.child.try_wait().ok().flatten();
            exited.is_some() || node.get("/healthz").0 == 200
        });
        assert!(
            up && exited.is_none(),
            "wsgate did not start on {addr} (admin {admin}): {}\n{}",
            exited.map_or("no answer in 10 s".into(), |s| format!("it exited, {s}")),
            node.logs()
        );
        node
    }

    /// `GET path` on the admin listener → (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path, "")
    }

    /// `POST /api/publish` → (status, body).
    pub fn http_publish(&self, topic: &str, data: Value) -> (u16, String) {
        let body = json!({"topic": topic, "data": data}).to_string();
        http(self.addr, "POST", "/api/publish", &body)
    }

    pub fn is_ready(&self) -> bool {
        self.get("/readyz").0 == 200
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (e.g. `TERM` to drain, `KILL`) to the process.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    /// Waits (bounded) for the process to exit; its exit status, if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(within, || {
            status = self.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny HTTP/1.1 client (one request per connection), enough for our endpoints.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A WebSocket client speaking the wsgate protocol.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TokioTcp>>,
    next_id: u64,
    /// Messages read while waiting for a reply, handed out by `next_message`.
    backlog: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn connect(node: &Node) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(node.ws_url())
            .await
            .expect("upgrade");
        let mut c = Client {
            ws,
            next_id: 1,
            backlog: Default::default(),
        };
        let welcome = c.read().await.expect("welcome");
        assert_eq!(welcome["op"], "welcome");
        c
    }

    /// The next JSON frame, or `None` when the connection ended.
    async fn read(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    pub async fn send(&mut self, mut cmd: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.ws
            .send(Message::Text(cmd.to_string().into()))
            .await
            .unwrap();
        id
    }

    /// Sends a command and waits (10 s at most) for the reply with its id; messages
    /// that arrive meanwhile are kept for `next_message`.
    pub async fn call(&mut self, cmd: Value) -> Value {
        let id = self.send(cmd).await;
        self.reply(id).await
    }

    pub async fn reply(&mut self, id: u64) -> Value {
        let fut = async {
            loop {
                let v = self
                    .read()
                    .await
                    .expect("connection ended before the reply");
                if v["id"] == json!(id) {
                    return v;
                }
                if v["op"] == "message" {
                    self.backlog.push_back(v);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .expect("reply in time")
    }

    pub async fn subscribe(&mut self, topics: &[&str]) {
        let r = self.call(json!({"op":"subscribe","topics":topics})).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }

    pub async fn unsubscribe(&mut self, topics: &[&str]) {
        let r = self.call(json!({"op":"unsubscribe","topics":topics})).await;
        assert_eq!(r["op"], "unsubscribed", "{r}");
    }

    /// The next `message` frame within `within`, skipping replies.
    pub async fn next_message(&mut self, within: Duration) -> Option<Value> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(v);
        }
        let fut = async {
            loop {
                let v = self.read().await?;
                if v["op"] == "message" {
                    return Some(v);
                }
            }
        };
        tokio::time::timeout(within, fut).await.ok().flatten()
    }

    /// Next frame of any kind (replies included), within `within`.
    pub async fn next_frame(&mut self, within: Duration) -> Option<Value> {
        tokio::time::timeout(within, self.read())
            .await
            .ok()
            .flatten()
    }

    /// Whether the connection still answers a ping with a pong.
    pub async fn alive(&mut self) -> bool {
        let id = self.send(json!({"op":"ping"})).await;
        let fut = async {
            loop {
                match self.read().await {
                    None => return false,
                    Some(v) if v["id"] == json!(id) => return v["op"] == "pong",
                    Some(_) => continue,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or(false)
    }
}

/// Publishes `n` numbered messages on topic `seq` from a client of `from` (sent
/// without waiting for replies, which the gateway pipelines to Redis; the replies
/// are collected at the end) and checks that a subscriber on `to` receives every
/// one, in order, each within `wait`.
pub async fn ordered_stream_crosses_nodes(from: &Node, to: &Node, n: u64, wait: Duration) {
    let mut sub = Client::connect(to).await;
    sub.subscribe(&["seq"]).await;
    let mut publisher = Client::connect(from).await;
    let reader = tokio::spawn(async move {
        let mut expect = 0u64;
        while expect < n {
            let m = sub
                .next_message(wait)
                .await
                .unwrap_or_else(|| panic!("stream stopped after {expect} messages"));
            assert_eq!(m["data"]["n"], json!(expect), "out of order or lost");
            expect += 1;
        }
        expect
    });
    for i in 0..n {
        publisher
            .send(json!({"op":"publish","topic":"seq","data":{"n":i}}))
            .await;
    }
    let mut published = 0;
    while published < n {
        let f = publisher.next_frame(wait).await.expect("publish replies");
        assert_eq!(f["op"], "published", "{f}");
        published += 1;
    }
    assert_eq!(reader.await.unwrap(), n);
}
