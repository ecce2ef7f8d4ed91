//! What the broker tests share beyond the testkit (whose `Redis` they run): a
//! [`BrokerEvents`] that records what the broker reports, and small helpers.

#![allow(dead_code)] // each test file uses a different subset

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use wsgate_fanout::{BrokerEvents, HistoryEntry, Origin};

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
