//! Streams in the embedded broker (docs/protocol.md, "Streams"): positions, resume,
//! history, and what is refused — a real gateway on 127.0.0.1:0, real clients.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate_fanout::{Namespace, Namespaces, Node, Pattern, StreamOptions};
use wsgate_gateway::security::Security;
use wsgate_gateway::Gateway;
use wsgate_metrics::Metrics;
use wsgate_testkit::gateway::{start_gateway, TestServer};
use wsgate_testkit::http::http;
use wsgate_testkit::ws::Client as Ws;

async fn connect(server: &TestServer) -> (Ws, ()) {
    (server.connect().await, ())
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send_json(&v).await;
}

async fn recv(ws: &mut Ws) -> Value {
    ws.recv().await
}

async fn subscribe(ws: &mut Ws, id: u64, topics: &[&str]) {
    ws.subscribe_with_id(id, topics).await;
}

/// A gateway whose `chat:*` topics are streams keeping `size` publications.
async fn start_streams(size: usize, args: &[&str]) -> TestServer {
    let cfg = wsgate_testkit::gateway::config(args);
    let namespaces = Namespaces::new(vec![Namespace {
        name: "chat".into(),
        topics: vec![Pattern::parse("chat:*").unwrap()],
        stream: Some(StreamOptions {
            history_size: size,
            history_ttl: Duration::from_secs(600),
        }),
        ..Default::default()
    }])
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

async fn call(ws: &mut Ws, v: Value) -> Value {
    send(ws, v).await;
    recv(ws).await
}

async fn publish(ws: &mut Ws, id: u64, topic: &str, data: Value) -> Value {
    let r = call(
        ws,
        json!({"op":"publish","id":id,"topic":topic,"data":data}),
    )
    .await;
    assert_eq!(r["op"], "published", "{r}");
    r
}

/// Publishes to a topic the client is subscribed to: (the reply, its own message),
/// which may arrive in either order.
async fn publish_own(ws: &mut Ws, id: u64, topic: &str, data: Value) -> (Value, Value) {
    send(
        ws,
        json!({"op":"publish","id":id,"topic":topic,"data":data}),
    )
    .await;
    let (a, b) = (recv(ws).await, recv(ws).await);
    let (reply, message) = if a["op"] == "published" {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(reply["op"], "published", "{reply}");
    assert_eq!(message["op"], "message", "{message}");
    (reply, message)
}

/// Publishes over HTTP; the answer's body as JSON.
async fn http_publish(server: &TestServer, body: Value) -> Value {
    let (status, text) = http(
        server.addr,
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn history(server: &TestServer, body: &str) -> (u16, Value) {
    let (status, text) = http(server.addr, "POST", "/api/history", &[], body.as_bytes()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The seqs of the next `n` messages of `topic` (other frames are a failure).
async fn seqs(ws: &mut Ws, topic: &str, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = recv(ws).await;
        assert_eq!(m["op"], "message", "{m}");
        assert_eq!(m["topic"], topic, "{m}");
        assert_eq!(m["data"]["n"], m["seq"], "data and seq agree: {m}");
        out.push(m["seq"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn stream_messages_are_numbered_and_plain_topics_are_not() {
    let server = start_streams(100, &[]).await;
    let (mut ws, _) = connect(&server).await;
    let r = call(
        &mut ws,
        json!({"op":"subscribe","id":1,"topics":["chat:1","news"]}),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["topics"], json!(["chat:1", "news"]));
    let start = &r["streams"]["chat:1"];
    assert_eq!(start["seq"], 0, "a new stream is at 0: {r}");
    let epoch = start["epoch"].as_str().unwrap().to_owned();
    assert!(!epoch.is_empty());
    assert!(start.get("recovered").is_none(), "no since, no recovered");
    assert!(r["streams"].get("news").is_none(), "news is not a stream");

    for n in 1..=3u64 {
        let (p, m) = publish_own(&mut ws, 10 + n, "chat:1", json!({ "n": n })).await;
        assert_eq!(
            (p["seq"].as_u64(), p["epoch"].as_str()),
            (Some(n), Some(&*epoch))
        );
        assert_eq!(
            m,
            json!({"op":"message","topic":"chat:1","data":{"n":n},"seq":n})
        );
    }
    // A plain topic: v1 frames, no position anywhere.
    let (p, m) = publish_own(&mut ws, 20, "news", json!(1)).await;
    assert_eq!(p, json!({"op":"published","id":20}));
    assert_eq!(m, json!({"op":"message","topic":"news","data":1}));

    // HTTP: one item carries its position; a batch has results in order.
    let one = http_publish(&server, json!({"topic":"chat:1","data":{"n":4}})).await;
    assert_eq!(one, json!({"ok":true,"published":1,"seq":4,"epoch":epoch}));
    let batch = http_publish(
        &server,
        json!([{"topic":"chat:1","data":{"n":5}},{"topic":"news","data":2},{"topic":"chat:1","data":{"n":6}}]),
    )
    .await;
    assert_eq!(
        batch,
        json!({"ok":true,"published":3,"results":[{"seq":5,"epoch":epoch},{},{"seq":6,"epoch":epoch}]})
    );
    assert_eq!(seqs(&mut ws, "chat:1", 1).await, vec![4]);
    assert_eq!(seqs(&mut ws, "chat:1", 1).await, vec![5]);
    assert_eq!(recv(&mut ws).await["topic"], "news");
    assert_eq!(seqs(&mut ws, "chat:1", 1).await, vec![6]);
    let plain = http_publish(&server, json!({"topic":"news","data":3})).await;
    assert_eq!(
        plain,
        json!({"ok":true,"published":1}),
        "v1 answer unchanged"
    );

    // Subscribing again to a held stream replays nothing and reports where it is.
    let earlier = call(
        &mut ws,
        json!({"op":"subscribe","id":2,"topics":["chat:1"],"since":{"chat:1":{"seq":0,"epoch":epoch}}}),
    )
    .await;
    assert_eq!(earlier["topic"], "news", "the plain publication came first");
    let again = recv(&mut ws).await;
    assert_eq!(again["op"], "subscribed", "{again}");
    assert_eq!(again["streams"]["chat:1"]["seq"], 6);
    assert!(again["streams"]["chat:1"].get("recovered").is_none());
    let (p, m) = publish_own(&mut ws, 21, "chat:1", json!({"n": 7})).await;
    assert_eq!(p["seq"], 7);
    assert_eq!(m["seq"], 7, "nothing replayed");
}

#[tokio::test]
async fn a_client_resumes_with_exactly_what_it_missed_then_live() {
    let server = start_streams(50, &[]).await;
    let (mut publisher, _) = connect(&server).await;
    let (mut a, _) = connect(&server).await;
    let r = call(&mut a, json!({"op":"subscribe","id":1,"topics":["chat:r"]})).await;
    let epoch = r["streams"]["chat:r"]["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5u64 {
        publish(&mut publisher, n, "chat:r", json!({ "n": n })).await;
    }
    assert_eq!(seqs(&mut a, "chat:r", 5).await, vec![1, 2, 3, 4, 5]);
    drop(a); // the client blinks
    for n in 6..=12u64 {
        publish(&mut publisher, n, "chat:r", json!({ "n": n })).await;
    }
    let (mut b, _) = connect(&server).await;
    let r = call(
        &mut b,
        json!({"op":"subscribe","id":2,"topics":["chat:r","news"],"since":{"chat:r":{"seq":5,"epoch":epoch}}}),
    )
    .await;
    assert_eq!(
        r["op"], "subscribed",
        "the reply comes before the replay: {r}"
    );
    assert_eq!(
        r["streams"]["chat:r"],
        json!({"seq":12,"epoch":epoch,"recovered":true})
    );
    assert_eq!(
        seqs(&mut b, "chat:r", 7).await,
        (6..=12).collect::<Vec<_>>()
    );
    publish(&mut publisher, 13, "chat:r", json!({"n": 13})).await;
    assert_eq!(seqs(&mut b, "chat:r", 1).await, vec![13], "then live");

    // Not recoverable: another epoch, trimmed history, beyond the stream.
    for n in 14..=70u64 {
        publish(&mut publisher, n, "chat:r", json!({ "n": n })).await;
    }
    for (i, since) in [
        json!({"seq":5,"epoch":"not-this-one"}),
        json!({"seq":5,"epoch":epoch}),
        json!({"seq":99,"epoch":epoch}),
    ]
    .into_iter()
    .enumerate()
    {
        let (mut c, _) = connect(&server).await;
        let r = call(
            &mut c,
            json!({"op":"subscribe","id":i,"topics":["chat:r"],"since":{"chat:r":since}}),
        )
        .await;
        assert_eq!(
            r["streams"]["chat:r"],
            json!({"seq":70 + i as u64,"epoch":epoch,"recovered":false}),
            "{since}"
        );
        publish(
            &mut publisher,
            71 + i as u64,
            "chat:r",
            json!({"n": 71 + i as u64}),
        )
        .await;
        assert_eq!(
            seqs(&mut c, "chat:r", 1).await,
            vec![71 + i as u64],
            "nothing replayed, live continues"
        );
    }
    // Within what history keeps (50 of 73): recovered.
    let (mut d, _) = connect(&server).await;
    let r = call(
        &mut d,
        json!({"op":"subscribe","id":9,"topics":["chat:r"],"since":{"chat:r":{"seq":30,"epoch":epoch}}}),
    )
    .await;
    assert_eq!(r["streams"]["chat:r"]["recovered"], true, "{r}");
    assert_eq!(
        seqs(&mut d, "chat:r", 43).await,
        (31..=73).collect::<Vec<_>>()
    );
    assert_eq!(
        server
            .metric("wsgate_stream_resumes_total{result=\"recovered\"}")
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric("wsgate_stream_resumes_total{result=\"not_recovered\"}")
            .await,
        3.0
    );
}

/// Publications racing the subscribe: whatever the timing, a resuming client sees
/// one contiguous run from its position on.
#[tokio::test]
async fn resume_races_a_steady_publisher_without_gap_or_duplicate() {
    let server = start_streams(10_000, &[]).await;
    let (mut first, _) = connect(&server).await;
    let r = call(
        &mut first,
        json!({"op":"subscribe","id":1,"topics":["chat:race"]}),
    )
    .await;
    let epoch = r["streams"]["chat:race"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(first);
    const TOTAL: u64 = 3000;
    let addr = server.addr;
    // The last seq published: a client resumes from a position the stream has
    // reached (one ahead of it is not a position of this epoch).
    let published = Arc::new(AtomicU64::new(0));
    let progress = published.clone();
    let publisher = tokio::spawn(async move {
        for n in 1..=TOTAL {
            let (status, body) = http(
                addr,
                "POST",
                "/api/publish",
                &[],
                json!({"topic":"chat:race","data":{"n":n}})
                    .to_string()
                    .as_bytes(),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            progress.store(n, Ordering::Release);
            if n % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
    });
    // Clients join at different points of the run, each from an earlier position.
    let mut joined = Vec::new();
    for k in 0..8u64 {
        tokio::time::sleep(Duration::from_millis(40)).await;
        let since = k * 17;
        let reached = tokio::time::timeout(Duration::from_secs(60), async {
            while published.load(Ordering::Acquire) < since {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(reached.is_ok(), "the publisher never reached seq {since}");
        let (mut c, _) = connect(&server).await;
        let r = call(
            &mut c,
            json!({"op":"subscribe","id":k,"topics":["chat:race"],"since":{"chat:race":{"seq":since,"epoch":epoch}}}),
        )
        .await;
        assert_eq!(r["streams"]["chat:race"]["recovered"], true, "{r}");
        joined.push((c, since));
    }
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("publisher finished")
        .unwrap();
    for (mut c, since) in joined {
        let got = seqs(&mut c, "chat:race", (TOTAL - since) as usize).await;
        let want: Vec<u64> = (since + 1..=TOTAL).collect();
        assert_eq!(got, want, "client from {since}");
    }
}

#[tokio::test]
async fn a_malformed_since_subscribes_nothing() {
    let server = start_streams(10, &[]).await;
    let (mut ws, _) = connect(&server).await;
    for since in [
        json!([]),
        json!({"chat:1":{"seq":-1,"epoch":"e"}}),
        json!({"chat:1":{"seq":1.5,"epoch":"e"}}),
        json!({"chat:1":{"seq":"1","epoch":"e"}}),
        json!({"chat:1":{"seq":1e30,"epoch":"e"}}),
        json!({"chat:1":{"seq":1}}),
        json!({"unknown":{"epoch":"e"}}),
    ] {
        let r = call(
            &mut ws,
            json!({"op":"subscribe","id":3,"topics":["chat:1","news"],"since":since}),
        )
        .await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()),
            (Some("error"), Some("bad_request"), Some(3)),
            "{since}: {r}"
        );
    }
    // Nothing was subscribed: a publication to either topic does not arrive; the
    // connection still works.
    publish(&mut ws, 4, "news", json!(1)).await;
    publish(&mut ws, 5, "chat:1", json!({"n":1})).await;
    let r = call(&mut ws, json!({"op":"ping","id":6})).await;
    assert_eq!(r, json!({"op":"pong","id":6}));
    // A well-formed entry for a topic not subscribed, or not a stream, is ignored.
    let r = call(
        &mut ws,
        json!({"op":"subscribe","id":7,"topics":["chat:1","news"],"since":{"news":{"seq":1,"epoch":"e"},"chat:9":{"seq":1,"epoch":"e"}}}),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert!(r["streams"]["chat:1"].get("recovered").is_none(), "{r}");
    assert!(r["streams"].get("news").is_none());
}

#[tokio::test]
async fn history_over_http() {
    let server = start_streams(5, &["--api-key", "k"]).await;
    let auth = [("Authorization", "Bearer k")];
    for n in 1..=8u64 {
        let (status, body) = http(
            server.addr,
            "POST",
            "/api/publish",
            &auth,
            json!({"topic":"chat:h","data":{"n":n}})
                .to_string()
                .as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let h = |body: Value| {
        let addr = server.addr;
        async move {
            let (status, text) = http(
                addr,
                "POST",
                "/api/history",
                &[("Authorization", "Bearer k")],
                body.to_string().as_bytes(),
            )
            .await;
            (status, serde_json::from_str::<Value>(&text).unwrap())
        }
    };
    let seqs_of = |v: &Value| -> Vec<u64> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["data"]["n"], m["seq"]);
                m["seq"].as_u64().unwrap()
            })
            .collect()
    };
    let (status, all) = h(json!({"topic":"chat:h"})).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["topic"], "chat:h");
    assert_eq!(all["seq"], 8);
    let epoch = all["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        seqs_of(&all),
        vec![4, 5, 6, 7, 8],
        "the newest, oldest first"
    );
    assert!(all.get("recovered").is_none());
    let (_, two) = h(json!({"topic":"chat:h","limit":2})).await;
    assert_eq!(seqs_of(&two), vec![7, 8]);
    let (_, page) = h(json!({"topic":"chat:h","since":{"seq":4,"epoch":epoch},"limit":2})).await;
    assert_eq!(page["recovered"], true);
    assert_eq!(seqs_of(&page), vec![5, 6], "the first after since");
    let (_, gone) = h(json!({"topic":"chat:h","since":{"seq":2,"epoch":epoch}})).await;
    assert_eq!(gone["recovered"], false);
    assert_eq!(seqs_of(&gone), Vec::<u64>::new());
    let (_, other) = h(json!({"topic":"chat:h","since":{"seq":4,"epoch":"x"}})).await;
    assert_eq!(other["recovered"], false);
    let (_, fresh) = h(json!({"topic":"chat:new"})).await;
    assert_eq!((fresh["seq"].as_u64(), seqs_of(&fresh)), (Some(0), vec![]));

    let (status, e) = h(json!({"topic":"news"})).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("not_a_stream")));
    let (status, e) = h(json!({"topic":"bad topic"})).await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_topic")));
    for bad in [
        json!({}),
        json!({"topic":"chat:h","limit":-1}),
        json!({"topic":"chat:h","since":{"seq":-1,"epoch":"e"}}),
        json!({"topic":"chat:h","since":{"seq":1}}),
        json!({"topic":"chat:h","extra":1}),
    ] {
        let (status, e) = h(bad.clone()).await;
        assert_eq!(
            (status, e["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    let (status, _) = history(&server, r#"{"topic":"chat:h"}"#).await;
    assert_eq!(status, 401, "the API key is required");
}

#[tokio::test]
async fn history_limit_is_capped() {
    let server = start_streams(5000, &[]).await;
    let batch: Vec<Value> = (1..=1500u64)
        .map(|n| json!({"topic":"chat:big","data":{"n":n}}))
        .collect();
    http_publish(&server, Value::Array(batch)).await;
    let (status, v) = history(&server, r#"{"topic":"chat:big","limit":100000}"#).await;
    assert_eq!(status, 200);
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), wsgate_gateway::http_api::HISTORY_LIMIT_MAX);
    assert_eq!(msgs[0]["seq"], 501, "the newest 1000");
    let (_, v) = history(&server, r#"{"topic":"chat:big"}"#).await;
    assert_eq!(
        v["messages"].as_array().unwrap().len(),
        wsgate_gateway::http_api::HISTORY_LIMIT_DEFAULT
    );
    // Subscribe with `since` gives the whole missed run (not capped like a page).
    let (mut ws, _) = connect(&server).await;
    let epoch = v["epoch"].as_str().unwrap();
    let r = call(
        &mut ws,
        json!({"op":"subscribe","id":1,"topics":["chat:big"],"since":{"chat:big":{"seq":0,"epoch":epoch}}}),
    )
    .await;
    assert_eq!(r["streams"]["chat:big"]["recovered"], true, "{r}");
    assert_eq!(
        seqs(&mut ws, "chat:big", 1500).await,
        (1..=1500).collect::<Vec<_>>()
    );
    subscribe(&mut ws, 2, &["news"]).await;
}
