//! Three real `wsgate` nodes sharing one real Redis act as one service (issue 3):
//! every publish path reaches every node, payload rules hold, order holds, and each
//! node holds in Redis exactly the channels its own clients want.

use std::time::Duration;

use serde_json::json;
use wsgate_testkit::process::{subscribe_each_at_once, Node};
use wsgate_testkit::redis::{command_calls, Redis};
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(10);

/// Nodes tuned for tests: no rate limit in the way of a 10,000-message stream, and a
/// short unsubscribe delay so interest changes show quickly.
fn node(redis: &Redis) -> Node {
    Node::start(
        Some(&redis.url()),
        &[
            "--rate-limit",
            "1000000",
            "--rate-burst",
            "1000000",
            "--redis-unsubscribe-delay",
            "200ms",
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_path_reaches_every_node() {
    let redis = Redis::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    for n in &nodes {
        assert!(wait_until(WAIT, || n.is_ready()), "node ready with redis");
    }
    let mut subs = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(n.addr).await;
        c.subscribe(&["news"]).await;
        subs.push(c);
    }

    // 1. A WebSocket client on node 0.
    let mut publisher = Client::connect(nodes[0].addr).await;
    let r = publisher
        .call(json!({"op":"publish","topic":"news","data":{"from":"ws"}}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    // 2. The HTTP API on node 1.
    let (status, body) = nodes[1].http_publish("news", json!({"from":"http"}));
    assert_eq!(status, 200, "{body}");
    // 3. A backend with the stock redis-cli: JSON as-is, other text as a string.
    redis.cli_publish("wsgate:news", r#"{"from":"redis-cli","n":[1,2]}"#);
    redis.cli_publish("wsgate:news", "plain text, not JSON");

    for (i, c) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        for _ in 0..4 {
            let m = c.next_message(WAIT).await.unwrap_or_else(|| {
                panic!("node {i}: only {got:?}");
            });
            assert_eq!(m["topic"], "news");
            got.push(m["data"].clone());
        }
        assert_eq!(
            got,
            vec![
                json!({"from":"ws"}),
                json!({"from":"http"}),
                json!({"from":"redis-cli","n":[1,2]}),
                json!("plain text, not JSON"),
            ],
            "node {i}"
        );
    }
    // Backend publications are counted per node that received them.
    for n in &nodes {
        let (_, metrics) = n.get("/metrics");
        assert!(
            metrics.contains(r#"wsgate_messages_received_total{source="redis"} 2"#),
            "{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_the_url() {
    let redis = Redis::start_with(&["--requirepass", "s3cret"]);
    let good = format!("redis://:s3cret@127.0.0.1:{}/", redis.port);
    let n = Node::start(Some(&good), &[]);
    assert!(wait_until(WAIT, || n.is_ready()));
    let mut c = Client::connect(n.addr).await;
    c.subscribe(&["auth"]).await;
    let r = c
        .call(json!({"op":"publish","topic":"auth","data":"ok"}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    assert_eq!(c.next_message(WAIT).await.expect("delivered")["data"], "ok");
    // A wrong password never becomes ready, and says so.
    let bad = format!("redis://:wrong@127.0.0.1:{}/", redis.port);
    let n = Node::start(Some(&bad), &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(n.get("/readyz").0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_cross_nodes_complete_and_in_order() {
    const N: u64 = 10_000;
    let redis = Redis::start();
    let (a, c) = (node(&redis), node(&redis));
    assert!(wait_until(WAIT, || a.is_ready() && c.is_ready()));
    wsgate_testkit::process::ordered_stream_crosses_nodes(&a, &c, N, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_exactly_the_topics_with_local_subscribers() {
    let redis = Redis::start();
    let (a, b) = (node(&redis), node(&redis));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    let channels = || redis.channels("wsgate:*");
    assert!(channels().is_empty());

    let mut c1 = Client::connect(a.addr).await;
    let mut c2 = Client::connect(a.addr).await;
    let mut c3 = Client::connect(b.addr).await;
    c1.subscribe(&["alpha", "beta"]).await;
    c2.subscribe(&["beta"]).await;
    c3.subscribe(&["gamma"]).await;
    // `subscribed` means Redis already confirmed: no waiting needed here.
    assert_eq!(channels(), ["wsgate:alpha", "wsgate:beta", "wsgate:gamma"]);
    let numsub: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("wsgate:beta")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(
        numsub[0].1, 1,
        "one Redis subscription per node, not per client"
    );

    c1.unsubscribe(&["alpha"]).await;
    assert!(
        wait_until(WAIT, || channels() == ["wsgate:beta", "wsgate:gamma"]),
        "{:?}",
        channels()
    );
    // beta still has c2 after c1 leaves it.
    c1.unsubscribe(&["beta"]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(channels(), ["wsgate:beta", "wsgate:gamma"]);
    drop(c2);
    drop(c3);
    assert!(
        wait_until(WAIT, || channels().is_empty()),
        "{:?}",
        channels()
    );

    // Flapping: the last state wins, in the hub and in Redis.
    for _ in 0..20 {
        c1.subscribe(&["flap"]).await;
        c1.unsubscribe(&["flap"]).await;
    }
    c1.subscribe(&["flap"]).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(channels(), ["wsgate:flap"]);
    redis.cli_publish("wsgate:flap", "still here");
    let m = c1
        .next_message(WAIT)
        .await
        .expect("delivered after flapping");
    assert_eq!(m["data"], "still here");
    c1.unsubscribe(&["flap"]).await;
    assert!(
        wait_until(WAIT, || channels().is_empty()),
        "{:?}",
        channels()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribes_are_batched_into_few_subscribe_commands() {
    const CLIENTS: usize = 100;
    let redis = Redis::start();
    let n = node(&redis);
    assert!(wait_until(WAIT, || n.is_ready()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::connect(n.addr).await);
    }
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .exec(&mut redis.conn())
        .unwrap();
    // Every client asks at once, each for its own topic.
    subscribe_each_at_once(&mut clients, |i| format!("batch{i}")).await;
    assert_eq!(redis.channels("wsgate:batch*").len(), CLIENTS);
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut redis.conn())
        .unwrap();
    let calls = command_calls(&info, "subscribe").expect("cmdstat_subscribe") as usize;
    println!("{CLIENTS} concurrent subscribes took {calls} SUBSCRIBE commands");
    assert!(
        calls < CLIENTS,
        "{calls} SUBSCRIBE commands for {CLIENTS} topics"
    );
}
