//! Per-namespace slow-consumer policies (docs/configuration.md, "Namespaces"): a
//! real gateway on 127.0.0.1:0 with a small outbound queue, a client that stops
//! reading beside one that keeps up.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_fanout::{Namespace, Namespaces, Node, Pattern, SlowConsumer, StreamOptions};
use wsgate_gateway::security::Security;
use wsgate_gateway::Gateway;
use wsgate_metrics::Metrics;
use wsgate_testkit::gateway::{start_gateway, TestServer};
use wsgate_testkit::http::http;
use wsgate_testkit::ws::{client_frame, raw_connect, read_frame, Client};

/// Publications per topic: about 500 KB each, far beyond the stalled client's
/// socket buffers plus its 16 KiB queue.
const N: u64 = 2000;
/// Publications per topic and HTTP request: a request's worth stays well within a
/// reading client's queue.
const PER_REQUEST: u64 = 5;

/// `d.*` disconnect, `o.*` drop_oldest, `l.*` latest, `s.*` a drop_oldest stream,
/// `ls.*` a latest stream.
async fn start() -> TestServer {
    let cfg = wsgate_testkit::gateway::config(&[
        "--outbound-queue-bytes",
        "16KiB",
        "--socket-send-buffer",
        "4KiB",
    ]);
    let ns = |name: &str, pattern: &str, policy, stream: bool| Namespace {
        name: name.into(),
        topics: vec![Pattern::parse(pattern).unwrap()],
        slow_consumer: policy,
        stream: stream.then_some(StreamOptions {
            history_size: 10_000,
            history_ttl: Duration::from_secs(600),
        }),
        ..Default::default()
    };
    let namespaces = Namespaces::new(vec![
        ns("d", "d.*", SlowConsumer::Disconnect, false),
        ns("o", "o.*", SlowConsumer::DropOldest, false),
        ns("l", "l.*", SlowConsumer::Latest, false),
        ns("s", "s.*", SlowConsumer::DropOldest, true),
        ns("ls", "ls.*", SlowConsumer::Latest, true),
    ])
    .unwrap();
    let node = Node::in_memory_with(
        Metrics::default(),
        cfg.max_publication_size(),
        namespaces,
        1 << 24,
    );
    let security = Security::from_config(&cfg).unwrap();
    start_gateway(Gateway::new(cfg, node, security)).await
}

/// A raw client subscribed to `topics` that then reads nothing until told.
async fn stalled(server: &TestServer, topics: &[&str]) -> TcpStream {
    let mut raw = raw_connect(server.addr).await;
    read_frame(&mut raw).await; // welcome
    let cmd = json!({"op":"subscribe","id":1,"topics":topics}).to_string();
    raw.write_all(&client_frame(true, 0x1, cmd.as_bytes()))
        .await
        .unwrap();
    let (_, reply) = read_frame(&mut raw).await;
    assert!(String::from_utf8_lossy(&reply).contains("subscribed"));
    raw
}

/// A reading client subscribed to `topics`, collecting `per_topic` publications of
/// each (checked to arrive all, in order) on a task.
async fn fast(server: &TestServer, topics: &[&str], per_topic: u64) -> tokio::task::JoinHandle<()> {
    let mut c: Client = server.connect().await;
    c.subscribe_with_id(1, topics).await;
    let total = per_topic * topics.len() as u64;
    tokio::spawn(async move {
        let mut next: HashMap<String, u64> = HashMap::new();
        for _ in 0..total {
            let v = c.recv().await;
            assert_eq!(v["op"], "message", "{v}");
            let t = v["topic"].as_str().unwrap().to_string();
            let n = next.entry(t).or_insert(1);
            assert_eq!(v["data"]["n"], *n, "every publication, in order: {v}");
            *n += 1;
        }
    })
}

/// Publishes 1..=N to each topic through the HTTP API, [`PER_REQUEST`] per
/// request, topics interleaved.
async fn flood(server: &TestServer, topics: &[&str]) {
    let pad = "p".repeat(200);
    for first in (1..=N).step_by(PER_REQUEST as usize) {
        let items: Vec<Value> = (first..first + PER_REQUEST)
            .flat_map(|n| {
                let pad = &pad;
                topics
                    .iter()
                    .map(move |t| json!({"topic":t,"data":{"n":n,"pad":pad}}))
            })
            .collect();
        let body = serde_json::to_vec(&items).unwrap();
        let (status, text) = http(server.addr, "POST", "/api/publish", &[], &body).await;
        assert_eq!(status, 200, "{text}");
    }
}

/// What a stalled client reads once it resumes: every frame until `done` says so,
/// or the connection closes (`Err(code)`, with what came before).
async fn resume(
    raw: &mut TcpStream,
    mut done: impl FnMut(&Value) -> bool,
) -> Result<Vec<Value>, (u16, Vec<Value>)> {
    let mut got = Vec::new();
    loop {
        let (op, payload) = read_frame(raw).await;
        match op {
            0x1 => {
                let v: Value = serde_json::from_slice(&payload).unwrap();
                let end = done(&v);
                got.push(v);
                if end {
                    return Ok(got);
                }
            }
            0x8 => {
                let code = payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                return Err((code, got));
            }
            _ => {} // pings
        }
    }
}

fn n_of(v: &Value) -> u64 {
    v["data"]["n"].as_u64().unwrap()
}

#[tokio::test]
async fn disconnect_cuts_the_stalled_reader_4008() {
    let s = start().await;
    let mut slow = stalled(&s, &["d.x"]).await;
    let reader = fast(&s, &["d.x"], N).await;
    flood(&s, &["d.x"]).await;
    reader.await.unwrap();
    // The close frame is best effort (its socket is full): read to the end.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut rest))
        .await
        .expect("closed")
        .ok();
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"slow_consumer\"}")
            .await,
        1.0
    );
    assert_eq!(
        s.metric("wsgate_messages_dropped_total{reason=\"drop_oldest\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn drop_oldest_keeps_the_stalled_reader_and_delivers_the_newest() {
    let s = start().await;
    let mut slow = stalled(&s, &["o.x"]).await;
    let reader = fast(&s, &["o.x"], N).await;
    flood(&s, &["o.x"]).await;
    reader.await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        resume(&mut slow, |v| v["data"]["n"] == N),
    )
    .await
    .expect("the newest publication in time")
    .expect("still open");
    let ns: Vec<u64> = got.iter().map(n_of).collect();
    assert!(ns.windows(2).all(|w| w[0] < w[1]), "in order: {ns:?}");
    assert!(ns.len() < N as usize, "some were dropped");
    // Its queue kept the newest: what arrived last is a contiguous run to N.
    let tail = ns
        .iter()
        .rev()
        .zip((1..=N).rev())
        .take_while(|(a, b)| *a == b);
    assert!(tail.count() > 10, "{ns:?}");
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"slow_consumer\"}")
            .await,
        0.0
    );
    // Counted when the session ends (or at a heartbeat visit).
    drop(slow);
    let mut dropped = 0.0;
    for _ in 0..100 {
        dropped = s
            .metric("wsgate_messages_dropped_total{reason=\"drop_oldest\"}")
            .await;
        if dropped > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, (N as usize - ns.len()) as f64);
}

#[tokio::test]
async fn latest_delivers_the_final_value_of_every_topic_on_resume() {
    let s = start().await;
    let topics = ["l.a", "l.b", "l.c"];
    let mut slow = stalled(&s, &topics).await;
    let reader = fast(&s, &topics, N).await;
    flood(&s, &topics).await;
    reader.await.unwrap();
    let mut finals = 0;
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        resume(&mut slow, |v| {
            finals += usize::from(v["data"]["n"] == N);
            finals == topics.len()
        }),
    )
    .await
    .expect("every final value in time")
    .expect("still open");
    for t in topics {
        let ns: Vec<u64> = got.iter().filter(|v| v["topic"] == t).map(n_of).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "{t} in order: {ns:?}");
        assert_eq!(ns.last(), Some(&N), "{t}");
    }
    assert!(got.len() < 3 * N as usize, "conflated");
    drop(slow);
    let mut conflated = 0.0;
    for _ in 0..100 {
        conflated = s
            .metric("wsgate_messages_dropped_total{reason=\"conflated\"}")
            .await;
        if conflated > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(conflated, (3 * N as usize - got.len()) as f64);
}

#[tokio::test]
async fn a_stream_under_drop_oldest_announces_exactly_what_was_dropped() {
    stream_drops_are_announced("s.x").await;
}

#[tokio::test]
async fn a_stream_under_latest_announces_exactly_what_was_replaced() {
    stream_drops_are_announced("ls.x").await;
}

/// A stalled reader of stream `topic`, once it resumes, accounts for every seq
/// once, in order: delivered, or covered by a `reset`.
async fn stream_drops_are_announced(topic: &str) {
    let s = start().await;
    let mut slow = stalled(&s, &[topic]).await;
    let reader = fast(&s, &[topic], N).await;
    flood(&s, &[topic]).await;
    reader.await.unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(30),
        resume(&mut slow, |v| v["seq"] == N),
    )
    .await
    .expect("the last publication in time")
    .expect("still open");
    // Messages and resets together account for every seq once, in order.
    let (mut next, mut resets, mut messages) = (1u64, 0, 0);
    for v in &got {
        let seq = v["seq"].as_u64().unwrap();
        match v["op"].as_str().unwrap() {
            "message" => {
                assert_eq!(seq, next, "no gap, no duplicate: {v}");
                assert_eq!(n_of(v), seq);
                messages += 1;
            }
            "reset" => {
                assert!(
                    seq >= next,
                    "a reset covers at least one: {v} (next {next})"
                );
                assert!(v["epoch"].as_str().is_some_and(|e| !e.is_empty()));
                resets += 1;
            }
            op => panic!("unexpected {op}: {v}"),
        }
        next = seq + 1;
    }
    assert_eq!(next, N + 1);
    assert!(
        resets > 0 && messages < N,
        "{resets} resets, {messages} messages"
    );
    // Never two resets in a row: one covers a whole dropped run.
    assert!(
        got.windows(2)
            .all(|w| !(w[0]["op"] == "reset" && w[1]["op"] == "reset")),
        "{got:?}"
    );
}
