//! The `wsgate` binary as a process ([`Process`]): its environment cleaned, its log
//! kept for the test, killed when its handle drops, so a failing test leaves nothing
//! behind. A [`Node`] is one started on free ports and ready once `/healthz` answers
//! (within [`START_WITHIN`]).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::{blocking, http_json, parse_metrics};
use crate::port::free_port;
use crate::wait::wait_until;
use crate::ws::Client;

/// How long a node may take to answer `/healthz`.
pub const START_WITHIN: Duration = Duration::from_secs(30);

/// The `wsgate` binary cargo built for the running test (cargo builds it for the
/// integration tests of the `wsgate` crate): in the directory above the `deps`
/// directory the test binary runs from.
pub fn wsgate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = dir.join(format!("wsgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not built: run the tests of the `wsgate` crate",
        bin.display()
    );
    bin
}

/// A `wsgate` process started with exactly the arguments given, nothing from the
/// developer's shell in its environment (no `WSGATE_*`, no `OTEL_*`), its stderr
/// collected line by line; killed when its handle drops. It is not waited for: a
/// [`Node`] is one that answers.
pub struct Process {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary with `args`, and `env` added to its environment.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(wsgate_bin());
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("OTEL_") || k.starts_with("WSGATE_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the wsgate binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `HUP`, `STOP`…) to the process.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit on its own, for at most `within`; its status.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut status = None;
        let exited = wait_until(within, || {
            status = self.exited();
            status.is_some()
        });
        assert!(exited, "wsgate still running after {within:?}");
        status.unwrap()
    }

    /// The lines logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Everything logged so far, one line after the other.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Whether a line logged so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }
}

/// A `wsgate` node: a [`Process`] on two free ports that answered `/healthz`.
/// Dereferences to its [`Process`] (log, signals, exit).
pub struct Node {
    /// `/ws` and the publish API.
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/drain`.
    pub admin: SocketAddr,
    process: Process,
}

impl Deref for Node {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Node {
    /// Starts a node with `args` (and `--redis-url`, if given), logging at `error`
    /// (or `$WSGATE_TEST_LOG`).
    pub fn start(redis_url: Option<&str>, args: &[&str]) -> Node {
        let level = std::env::var("WSGATE_TEST_LOG").unwrap_or("error".into());
        Self::launch(&with_redis(redis_url, args), &level, &[])
    }

    /// Like [`Node::start`], logging at `warn` (for tests that read the log).
    pub fn start_logged(redis_url: Option<&str>, args: &[&str]) -> Node {
        let level = std::env::var("WSGATE_TEST_LOG").unwrap_or("warn".into());
        Self::launch(&with_redis(redis_url, args), &level, &[])
    }

    /// Starts a node logging JSON lines at `info` (node id `test-node`), with `env`
    /// added to its environment.
    pub fn start_json(args: &[&str], env: &[(&str, &str)]) -> Node {
        let mut all = vec!["--log-format", "json", "--node-id", "test-node"];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(String::from).collect();
        Self::launch(&all, "info", env)
    }

    fn launch(args: &[String], level: &str, env: &[(&str, &str)]) -> Node {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let (addr_arg, admin_arg) = (addr.to_string(), admin.to_string());
        let mut all = vec![
            "--listen",
            &addr_arg,
            "--admin-listen",
            &admin_arg,
            "--log-level",
            level,
        ];
        all.extend(args.iter().map(String::as_str));
        let mut node = Node {
            addr,
            admin,
            process: Process::spawn(&all, env),
        };
        node.wait_ready();
        node
    }

    /// Waits until `/healthz` answers, or panics (with the log) when the process
    /// exited or [`START_WITHIN`] passed.
    fn wait_ready(&mut self) {
        let mut exited = None;
        let up = wait_until(START_WITHIN, || {
            exited = self.process.exited();
            exited.is_some() || self.get("/healthz").0 == 200
        });
        assert!(
            up && exited.is_none(),
            "wsgate did not start on {} (admin {}): {}\n{}",
            self.addr,
            self.admin,
            exited.map_or(format!("no answer in {START_WITHIN:?}"), |s| format!(
                "it exited, {s}"
            )),
            self.logs()
        );
    }

    /// `GET path` on the admin listener → `(status, body)`; `(0, "")` when it does
    /// not answer.
    pub fn get(&self, path: &str) -> (u16, String) {
        blocking(self.admin, "GET", path, "")
    }

    /// `POST /api/publish` → `(status, body)`, without a runtime.
    pub fn http_publish(&self, topic: &str, data: Value) -> (u16, String) {
        let body = json!({"topic": topic, "data": data}).to_string();
        blocking(self.addr, "POST", "/api/publish", &body)
    }

    /// `POST /api/publish` of one message whose data is the JSON text `data`;
    /// asserts it is accepted.
    pub async fn publish(&self, topic: &str, data: &str) {
        let (status, body) = http_json(
            self.addr,
            "POST",
            "/api/publish",
            &format!(r#"{{"topic":"{topic}","data":{data}}}"#),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    pub fn is_ready(&self) -> bool {
        self.get("/readyz").0 == 200
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A client on `/ws`, past the welcome.
    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// The `/metrics` text (asserting a 200).
    pub async fn scrape(&self) -> String {
        let (status, body) = http_json(self.admin, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        body
    }

    /// Scrapes until `check` passes on the parsed values (the writers fold their
    /// counts in a few times a second), or panics with the last scrape after 10 s.
    pub async fn eventually(&self, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.scrape().await;
            if check(&parse_metrics(&text)) {
                return;
            }
            if Instant::now() > deadline {
                panic!("metrics never showed {what}:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `kill -<sig> <pid>`, asserting it was delivered.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn with_redis(redis_url: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let Some(url) = redis_url {
        all.extend(["--redis-url".to_string(), url.to_string()]);
    }
    all
}

/// Every client asks at once to subscribe to its own topic, `topic(i)`; then each
/// confirmation is awaited.
pub async fn subscribe_each_at_once(clients: &mut [Client], topic: impl Fn(usize) -> String) {
    let mut ids = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        ids.push(
            c.command(json!({"op":"subscribe","topics":[topic(i)]}))
                .await,
        );
    }
    for (c, id) in clients.iter_mut().zip(ids) {
        assert_eq!(c.reply(id).await["op"], "subscribed");
    }
}

/// Publishes `n` numbered messages on topic `seq` from a client of `from` (sent
/// without waiting for replies, which the gateway pipelines to Redis; the replies
/// are collected at the end) and checks that a subscriber on `to` receives every
/// one, in order, each within `wait`.
pub async fn ordered_stream_crosses_nodes(from: &Node, to: &Node, n: u64, wait: Duration) {
    let mut sub = to.connect().await;
    sub.subscribe(&["seq"]).await;
    let mut publisher = from.connect().await;
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
            .command(json!({"op":"publish","topic":"seq","data":{"n":i}}))
            .await;
    }
    let mut published = 0;
    while published < n {
        let f = publisher.next_json(wait).await.expect("publish replies");
        assert_eq!(f["op"], "published", "{f}");
        published += 1;
    }
    assert_eq!(reader.await.unwrap(), n);
}
