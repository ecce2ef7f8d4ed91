//! The broker against a real redis-server, driven through the node: racing subscribes
//! and unsubscribes of the same topics must leave Redis holding exactly the hub's
//! topics, and every `subscribe` that resolved must already be live in Redis
//! (`subscribed` means ready).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wsgate_fanout::{Node, Publication, Subscriber};
use wsgate_metrics::Metrics;
use wsgate_redis::{RedisBroker, RedisOptions};
use wsgate_testkit::redis::is_control;

struct RedisProc(Child, u16);

impl Drop for RedisProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> RedisProc {
    let port = wsgate_testkit::free_port();
    let child = Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server is installed");
    let r = RedisProc(child, port);
    let end = Instant::now() + Duration::from_secs(10);
    while conn(port).is_err() {
        assert!(Instant::now() < end, "redis did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    r
}

fn conn(port: u16) -> redis::RedisResult<redis::Connection> {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?.get_connection()?;
    redis::cmd("PING").query::<String>(&mut c)?;
    Ok(c)
}

struct Sink;
impl Subscriber for Sink {
    fn deliver(&self, _: &Publication) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_subscribes_and_unsubscribes_settle_on_the_hub() {
    let redis = start_redis();
    let mut options = RedisOptions::new(format!("redis://127.0.0.1:{}/", redis.1));
    options.unsubscribe_delay = Duration::from_millis(0);
    let node = Arc::new(
        Node::new(Metrics::default(), 1 << 16, |events| {
            RedisBroker::start(options, events)
        })
        .unwrap(),
    );
    let end = Instant::now() + Duration::from_secs(10);
    while !node.broker_ready() {
        assert!(Instant::now() < end, "broker ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // 8 workers flap 4 shared topics; after each confirmed subscribe, a PUBLISH must
    // already find this node subscribed (a receiver count of at least 1).
    let topics: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("race{i}"))).collect();
    let port = redis.1;
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (node, topics) = (node.clone(), topics.clone());
        workers.push(tokio::spawn(async move {
            let mut check = conn(port).unwrap();
            let sink: Arc<dyn Subscriber> = Arc::new(Sink);
            for i in 0..150u64 {
                let t = &topics[((w + i) % 4) as usize];
                node.subscribe(w, &sink, std::slice::from_ref(t))
                    .await
                    .unwrap();
                let receivers: u64 = redis::cmd("PUBLISH")
                    .arg(format!("wsgate:{t}"))
                    .arg("1")
                    .query(&mut check)
                    .unwrap();
                assert!(receivers >= 1, "subscribe resolved before Redis had {t}");
                if i % 3 != 0 {
                    tokio::time::sleep(Duration::from_micros(200 * (i % 5))).await;
                }
                node.unsubscribe(w, [t.clone()]);
            }
            // Each worker ends subscribed to one topic (workers 0 and 4 share race0…).
            let t = &topics[(w % 4) as usize];
            node.subscribe(w, &sink, std::slice::from_ref(t))
                .await
                .unwrap();
            // …and then workers 4..8 leave again.
            if w >= 4 {
                node.unsubscribe(w, [t.clone()]);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    // Workers 0..4 stay on race0..race3: Redis must hold exactly those, and keep them.
    let mut check = conn(port).unwrap();
    let mut want: Vec<String> = node
        .hub()
        .topics()
        .iter()
        .map(|t| format!("wsgate:{t}"))
        .collect();
    want.sort();
    assert_eq!(want.len(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got: Vec<String> = redis::cmd("PUBSUB")
        .arg("CHANNELS")
        .arg("wsgate:*")
        .query(&mut check)
        .unwrap();
    got.retain(|c| !is_control(c));
    got.sort();
    assert_eq!(got, want);

    // Everyone leaves: Redis ends with nothing.
    for w in 0..4u64 {
        let t = &topics[w as usize];
        node.unsubscribe(w, [t.clone()]);
    }
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let mut got: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("wsgate:*")
            .query(&mut check)
            .unwrap();
        got.retain(|c| !is_control(c));
        if got.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "left over in Redis: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
