//! `/metrics` of a real gateway process moves with real traffic: connects, refusals,
//! subscriptions, publishes from clients and HTTP, deliveries and their latency,
//! bytes, and every kind of disconnect we can provoke from outside.

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::http::*;
use wsgate_testkit::process::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_follow_real_traffic() {
    let gw = Node::start_json(&["--max-message-size", "1KiB"], &[]);

    // Before anything happened every known series exists at zero.
    let m = parse_metrics(&gw.scrape().await);
    assert_eq!(val(&m, "wsgate_connections"), 0.0);
    assert_eq!(
        val(&m, r#"wsgate_disconnects_total{reason="slow_consumer"}"#),
        0.0
    );
    assert!(m.contains_key(r#"wsgate_disconnects_total{reason="heartbeat_timeout"}"#));
    assert_eq!(val(&m, r#"wsgate_broker_info{kind="memory"}"#), 1.0);
    assert_eq!(val(&m, "wsgate_ready"), 1.0);
    assert_eq!(val(&m, "wsgate_redis_up"), 0.0);

    // A plain GET on /ws is refused.
    let (status, _) = http_json(gw.addr, "GET", "/ws", "").await;
    assert_eq!(status, 426);

    let mut sub = gw.connect().await;
    let mut publisher = gw.connect().await;
    sub.subscribe_with_id(1, &["news"]).await;
    for i in 0..5 {
        publisher
            .send_text(&format!(
                r#"{{"op":"publish","id":{i},"topic":"news","data":{i}}}"#
            ))
            .await;
        assert_eq!(publisher.recv().await["op"], "published");
    }
    for i in 0..3 {
        gw.publish("news", &format!(r#"{{"n":{i}}}"#)).await;
    }
    for _ in 0..8 {
        assert_eq!(sub.recv().await["op"], "message");
    }
    gw.eventually("8 deliveries and the publishes", |m| {
        val(m, "wsgate_connections") == 2.0
            && val(m, "wsgate_connections_accepted_total") == 2.0
            && val(
                m,
                r#"wsgate_connections_refused_total{reason="not_websocket"}"#,
            ) == 1.0
            && val(m, "wsgate_subscriptions") == 1.0
            && val(m, "wsgate_topics") == 1.0
            && val(m, r#"wsgate_messages_received_total{source="client"}"#) == 5.0
            && val(m, r#"wsgate_messages_received_total{source="http"}"#) == 3.0
            && val(m, "wsgate_messages_delivered_total") == 8.0
            && val(m, "wsgate_delivery_latency_seconds_count") == 8.0
            && val(m, "wsgate_broker_publish_duration_seconds_count") == 8.0
            && val(m, "wsgate_bytes_received_total") > 0.0
            && val(m, "wsgate_bytes_sent_total") > 0.0
            && val(m, "wsgate_outbound_queue_bytes_count") > 0.0
    })
    .await;

    // Ending connections: a clean close, and a message over the size limit.
    sub.close(None).await.unwrap();
    publisher
        .send_text(&format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000)))
        .await;
    gw.eventually("client_close and too_big", |m| {
        val(m, r#"wsgate_disconnects_total{reason="client_close"}"#) == 1.0
            && val(m, r#"wsgate_disconnects_total{reason="too_big"}"#) == 1.0
            && val(m, "wsgate_connections") == 0.0
            && val(m, "wsgate_subscriptions") == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_rate_limit_and_drain_are_counted() {
    let gw = Node::start_json(
        &[
            "--outbound-queue-bytes",
            "4KiB",
            "--rate-limit",
            "1",
            "--rate-burst",
            "2",
            "--drain-timeout",
            "6s",
        ],
        &[],
    );
    // A subscriber that never reads: the socket buffers fill, then its queue.
    let mut slow = gw.connect().await;
    slow.subscribe_with_id(1, &["firehose"]).await;
    let big = format!("\"{}\"", "y".repeat(30_000));
    let batch: Vec<String> = (0..20)
        .map(|_| format!(r#"{{"topic":"firehose","data":{big}}}"#))
        .collect();
    let body = format!("[{}]", batch.join(","));
    for _ in 0..100 {
        let (status, _) = http_json(gw.addr, "POST", "/api/publish", &body).await;
        assert_eq!(status, 200);
        let m = parse_metrics(&gw.scrape().await);
        if val(&m, r#"wsgate_disconnects_total{reason="slow_consumer"}"#) == 1.0 {
            break;
        }
    }
    gw.eventually("a slow consumer and its dropped messages", |m| {
        val(m, r#"wsgate_disconnects_total{reason="slow_consumer"}"#) == 1.0
            && val(
                m,
                r#"wsgate_messages_dropped_total{reason="slow_consumer"}"#,
            ) >= 1.0
    })
    .await;
    drop(slow);

    // Commands far over the rate limit: rate_limited replies, then 4029.
    let mut spammer = gw.connect().await;
    for _ in 0..20 {
        if spammer
            .send(Message::text(r#"{"op":"ping"}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    gw.eventually("a rate-limit disconnect", |m| {
        val(m, r#"wsgate_disconnects_total{reason="rate_limit"}"#) == 1.0
    })
    .await;

    // Drain: not ready, draining, remaining clients closed with the drain reason,
    // spread over the window (the second one 3 s in, so the node is still up to be
    // scraped after the first).
    let _first = gw.connect().await;
    let _second = gw.connect().await;
    let (status, _) = http_json(gw.admin, "POST", "/drain", "").await;
    assert_eq!(status, 202);
    let m = parse_metrics(&gw.scrape().await);
    assert_eq!(val(&m, "wsgate_draining"), 1.0);
    assert_eq!(val(&m, "wsgate_ready"), 0.0);
    gw.eventually("a drain disconnect", |m| {
        val(m, r#"wsgate_disconnects_total{reason="drain"}"#) == 1.0
    })
    .await;
}

/// `wsgate_runtime_tasks` counts the node's live tokio tasks: it rises with held
/// connections and comes back down when they are gone (what the soak watches).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_gauge_follows_connections() {
    const N: usize = 40;
    let gw = Node::start_json(&[], &[]);
    let before = val(&parse_metrics(&gw.scrape().await), "wsgate_runtime_tasks");
    assert!(before > 0.0, "a running node has tasks");

    let mut clients = Vec::new();
    for _ in 0..N {
        clients.push(gw.connect().await);
    }
    subscribe_each_at_once(&mut clients, |i| format!("tasks.{}", i % 4)).await;
    let held = val(&parse_metrics(&gw.scrape().await), "wsgate_runtime_tasks");
    assert!(
        held >= before + N as f64,
        "{N} connections held: {held} tasks, {before} before"
    );

    drop(clients);
    gw.eventually("the tasks of closed connections gone", |m| {
        val(m, "wsgate_connections") == 0.0 && val(m, "wsgate_runtime_tasks") <= before
    })
    .await;
}
