//! Redis failures seen from real `wsgate` nodes (issue 3): Redis down at start,
//! Redis killed and restarted during a stream, and slow clients that must not get
//! the node dropped by Redis's pub/sub output-buffer limit.

use std::time::{Duration, Instant};

use serde_json::json;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::ws::Client;
use wsgate_testkit::{free_port, wait_until};

const WAIT: Duration = Duration::from_secs(10);

fn node(url: &str) -> Node {
    Node::start(
        Some(url),
        &["--rate-limit", "1000000", "--rate-burst", "1000000"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_then_up() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let n = node(&url);
    // The node serves (health, WebSocket) but is not ready for fan-out.
    assert_eq!(n.get("/healthz").0, 200);
    let (status, body) = n.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""broker_ready":false"#), "{body}");
    let mut c = Client::connect(n.addr).await;
    assert!(c.alive().await);
    let r = c.call(json!({"op":"subscribe","topics":["t"]})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let r = c.call(json!({"op":"publish","topic":"t","data":1})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert_eq!(n.http_publish("t", json!(1)).0, 503);

    // Redis appears on that port: the node finds it by itself (backoff ≤ 2 s).
    let redis = Redis::start_on(port);
    assert!(wait_until(WAIT, || n.is_ready()), "ready once redis is up");
    c.subscribe(&["t"]).await;
    redis.cli_publish("wsgate:t", "42");
    assert_eq!(c.next_message(WAIT).await.expect("delivered")["data"], 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_during_a_stream() {
    let mut redis = Redis::start();
    let (a, b) = (node(&redis.url()), node(&redis.url()));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    let mut sub = Client::connect(b.addr).await;
    sub.subscribe(&["stream", "other"]).await;
    let mut publisher = Client::connect(a.addr).await;

    // A stream before the outage.
    for n in 0..50 {
        let r = publisher
            .call(json!({"op":"publish","topic":"stream","data":n}))
            .await;
        assert_eq!(r["op"], "published");
    }
    for n in 0..50 {
        assert_eq!(sub.next_message(WAIT).await.expect("before")["data"], n);
    }

    redis.kill();
    // Publishes during the outage are refused, never falsely acknowledged.
    assert!(
        wait_until(WAIT, || !a.is_ready()),
        "readyz reports the outage"
    );
    let r = publisher
        .call(json!({"op":"publish","topic":"stream","data":"lost"}))
        .await;
    assert_eq!(r["op"], "error", "{r}");
    assert_eq!(r["code"], "unavailable", "{r}");
    let (status, body) = a.http_publish("stream", json!("lost"));
    assert_eq!(status, 503, "{body}");
    // Nobody is disconnected.
    assert!(sub.alive().await, "subscriber still connected");
    assert!(publisher.alive().await, "publisher still connected");

    redis.restart();
    let back = Instant::now();
    // Delivery resumes: keep publishing until one arrives on the other node.
    let mut delivered = None;
    let mut n = 1000;
    while back.elapsed() < WAIT && delivered.is_none() {
        let r = publisher
            .call(json!({"op":"publish","topic":"stream","data":n}))
            .await;
        if r["op"] == "published" {
            delivered = sub.next_message(Duration::from_millis(200)).await;
        }
        n += 1;
    }
    let m = delivered.expect("delivery resumed after redis returned");
    assert!(m["data"].as_i64().unwrap() >= 1000, "{m}");
    println!(
        "delivery resumed {:?} after redis restarted",
        back.elapsed()
    );
    // Every topic with local subscribers was subscribed again.
    assert!(wait_until(WAIT, || redis.channels("wsgate:*")
        == ["wsgate:other", "wsgate:stream"]));
    assert!(sub.alive().await && publisher.alive().await);
    // Node a has no subscriptions: its pub/sub connection may still be in its backoff.
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    let (_, metrics) = b.get("/metrics");
    assert!(metrics.contains("wsgate_redis_up 1"), "{metrics}");
    let reconnects: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wsgate_redis_reconnects_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("wsgate_redis_reconnects_total");
    assert!(reconnects >= 1, "{metrics}");
    assert!(
        metrics.contains("wsgate_redis_resubscribed_topics_total 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_get_the_node_dropped_by_redis() {
    // A tight pub/sub output-buffer limit: a node whose reader stalled behind its
    // slow clients would be disconnected by Redis within seconds.
    let redis = Redis::start_with(&["--client-output-buffer-limit", "pubsub 2mb 1mb 2"]);
    let n = Node::start(Some(&redis.url()), &[]);
    assert!(wait_until(WAIT, || n.is_ready()));
    // One client that never reads, one that does.
    let mut stalled = Client::connect(n.addr).await;
    stalled.subscribe(&["flood"]).await;
    let mut healthy = Client::connect(n.addr).await;
    healthy.subscribe(&["flood"]).await;

    // 16 MB through Redis, paced at roughly 10 MB/s (a rate the node sustains with
    // fast clients), far more than the stalled client's 1 MiB queue plus its socket
    // buffers can absorb.
    const COUNT: usize = 4000;
    const BATCH: usize = 50;
    let payload = format!("\"{}\"", "x".repeat(4096));
    let counter = tokio::spawn(async move {
        let mut got = 0;
        while got < COUNT {
            if healthy.next_message(WAIT).await.is_none() {
                break;
            }
            got += 1;
        }
        (got, healthy)
    });
    let mut conn = redis.conn();
    let mut max_omem = 0u64;
    for _ in 0..(COUNT / BATCH) {
        let mut pipe = redis::pipe();
        for _ in 0..BATCH {
            pipe.cmd("PUBLISH")
                .arg("wsgate:flood")
                .arg(&payload)
                .ignore();
        }
        pipe.exec(&mut conn).unwrap();
        max_omem = max_omem.max(subscriber_omem(&mut conn));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (got, mut healthy) = counter.await.unwrap();
    println!("max omem of the node's pub/sub connection: {max_omem} bytes");
    assert_eq!(got, COUNT, "the reading client got everything");
    assert!(
        max_omem < 1024 * 1024,
        "the node's output buffer grew to {max_omem} bytes"
    );
    // The node is still subscribed, and still delivers.
    assert_eq!(redis.channels("wsgate:*"), ["wsgate:flood"]);
    redis.cli_publish("wsgate:flood", "after");
    assert_eq!(
        healthy.next_message(WAIT).await.expect("after")["data"],
        "after"
    );
    // The stalled client was cut off as a slow consumer, not the node.
    let mut closed = false;
    for _ in 0..COUNT + 10 {
        if stalled.next_message(Duration::from_secs(5)).await.is_none() {
            closed = true;
            break;
        }
    }
    assert!(closed, "the stalled client was disconnected (4008)");
}

/// Largest `omem` among clients in `subscribe` state.
fn subscriber_omem(conn: &mut redis::Connection) -> u64 {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .arg("TYPE")
        .arg("pubsub")
        .query(conn)
        .unwrap();
    list.lines()
        .filter_map(|l| {
            l.split(' ')
                .find_map(|kv| kv.strip_prefix("omem="))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_noticed_and_survived() {
    let redis = Redis::start();
    let n = node(&redis.url());
    assert!(wait_until(WAIT, || n.is_ready()));
    let mut c = Client::connect(n.addr).await;
    c.subscribe(&["frozen"]).await;
    // No error, no FIN: only silence. The keepalive PING (every 5 s, 5 s to answer)
    // must notice it.
    redis.signal("STOP");
    let frozen = Instant::now();
    let noticed = wait_until(Duration::from_secs(20), || !n.is_ready());
    redis.signal("CONT");
    assert!(noticed, "a frozen redis was not noticed");
    println!("frozen redis noticed after {:?}", frozen.elapsed());
    assert!(c.alive().await, "the client stayed connected");
    assert!(wait_until(WAIT, || n.is_ready()), "ready again after CONT");
    c.subscribe(&["after"]).await;
    redis.cli_publish("wsgate:after", "back");
    assert_eq!(
        c.next_message(WAIT).await.expect("delivered")["data"],
        "back"
    );
}
