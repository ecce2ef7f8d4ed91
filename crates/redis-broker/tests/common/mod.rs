//! What the broker tests share: a real `redis-server` on a free port, and a
//! [`BrokerEvents`] that records what the broker reports.

#![allow(dead_code)] // each test file uses a different subset

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wsgate_fanout::{BrokerEvents, HistoryEntry, Origin};

/// A `redis-server` this test started, killed on drop.
pub struct RedisProc {
    child: Option<Child>,
    pub port: u16,
}

impl RedisProc {
    /// A new server on a free port (no persistence).
    pub fn start() -> RedisProc {
        Self::start_on(wsgate_testkit::free_port())
    }

    /// A new server on `port` (again: a restart without persistence).
    pub fn start_on(port: u16) -> RedisProc {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let r = RedisProc {
            child: Some(child),
            port,
        };
        let end = Instant::now() + Duration::from_secs(10);
        while conn(port).is_err() {
            assert!(Instant::now() < end, "redis did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        conn(self.port).expect("redis is up")
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn conn(port: u16) -> redis::RedisResult<redis::Connection> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()?;
    redis::cmd("PING").query::<String>(&mut c)?;
    Ok(c)
}

/// `redis-cli -p <port> <args>`: what a backend's shell would run.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Blocking [`eventually`], for helpers that run outside the runtime.
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

/// One report from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Plain {
        topic: String,
        data: String,
        origin: Origin,
    },
    Stream {
        topic: String,
        epoch: String,
        seq: u64,
        data: String,
        accepted_at: u64,
        origin: Origin,
    },
    Resubscribed(Vec<String>),
}

/// Records every report; has subscribers for `topics`.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Event>>,
    pub topics: Mutex<Vec<Arc<str>>>,
}

impl Recorder {
    pub fn with_topics(topics: &[&str]) -> Arc<Recorder> {
        let r = Recorder::default();
        *r.topics.lock() = topics.iter().map(|t| Arc::from(*t)).collect();
        Arc::new(r)
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().clone()
    }

    /// The stream publications of `topic`: (epoch, seq, data, origin).
    pub fn stream(&self, topic: &str) -> Vec<(String, u64, String, Origin)> {
        self.events
            .lock()
            .iter()
            .filter_map(|e| match e {
                Event::Stream {
                    topic: t,
                    epoch,
                    seq,
                    data,
                    origin,
                    ..
                } if t == topic => Some((epoch.clone(), *seq, data.clone(), *origin)),
                _ => None,
            })
            .collect()
    }

    pub fn resubscribed(&self) -> Vec<Vec<String>> {
        self.events
            .lock()
            .iter()
            .filter_map(|e| match e {
                Event::Resubscribed(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }
}

impl BrokerEvents for Recorder {
    fn publication(&self, topic: &str, data: &[u8], _accepted_at: u64, origin: Origin) {
        self.events.lock().push(Event::Plain {
            topic: topic.into(),
            data: String::from_utf8(data.to_vec()).unwrap(),
            origin,
        });
    }

    fn stream_publication(&self, topic: &str, epoch: &Arc<str>, e: HistoryEntry, origin: Origin) {
        self.events.lock().push(Event::Stream {
            topic: topic.into(),
            epoch: epoch.to_string(),
            seq: e.seq,
            data: String::from_utf8(e.data.to_vec()).unwrap(),
            accepted_at: e.accepted_at,
            origin,
        });
    }

    fn has_subscribers(&self, topic: &str) -> bool {
        self.topics.lock().iter().any(|t| &**t == topic)
    }

    fn topics(&self) -> Vec<Arc<str>> {
        self.topics.lock().clone()
    }

    fn resubscribed(&self, topics: &[Arc<str>]) {
        let mut t: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        t.sort();
        self.events.lock().push(Event::Resubscribed(t));
    }
}
