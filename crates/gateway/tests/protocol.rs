//! Every op and every error code of the contract, against a real server.

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;
use wsgate_testkit::ws::*;

#[tokio::test]
async fn welcome_carries_session_node_and_heartbeat() {
    let s = start(&[
        "--node-id",
        "node-a",
        "--heartbeat-interval",
        "7s",
        "--heartbeat-timeout",
        "20s",
    ])
    .await;
    let ws = s.connect().await;
    let w = ws.welcome.clone();
    assert_eq!(w["node"], "node-a");
    assert_eq!(w["heartbeat_ms"], 7000);
    assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()));
    let ws2 = s.connect().await;
    let w2 = ws2.welcome.clone();
    assert_ne!(w["session"], w2["session"], "sessions are unique");
}

#[tokio::test]
async fn subscribe_publish_unsubscribe_ping() {
    let s = start(&[]).await;
    let mut a = s.connect().await;
    let mut b = s.connect().await;
    a.subscribe_with_id(1, &["news", "prices.AAPL"]).await;
    // Subscribing twice is not an error.
    a.subscribe_with_id(2, &["news"]).await;

    b.send_json(
        &json!({"op":"publish","id":3,"topic":"news","data":{"title":"hi","n":[1,2.5,null]}}),
    )
    .await;
    assert_eq!(b.recv().await, json!({"op":"published","id":3}));
    let m = a.recv().await;
    assert_eq!(
        m,
        json!({"op":"message","topic":"news","data":{"title":"hi","n":[1,2.5,null]}})
    );

    // A publisher subscribed to the topic receives its own message.
    b.subscribe_with_id(4, &["prices.AAPL"]).await;
    b.send_json(&json!({"op":"publish","id":5,"topic":"prices.AAPL","data":189.5}))
        .await;
    let (mut got_reply, mut got_msg) = (false, false);
    for _ in 0..2 {
        let v = b.recv().await;
        got_reply |= v == json!({"op":"published","id":5});
        got_msg |= v == json!({"op":"message","topic":"prices.AAPL","data":189.5});
    }
    assert!(got_reply && got_msg);
    assert_eq!(a.recv().await["data"], 189.5);

    a.send_json(&json!({"op":"unsubscribe","id":6,"topics":["news","never-subscribed"]}))
        .await;
    assert_eq!(
        a.recv().await,
        json!({"op":"unsubscribed","id":6,"topics":["news","never-subscribed"]})
    );
    b.send_json(&json!({"op":"publish","id":7,"topic":"news","data":"gone"}))
        .await;
    assert_eq!(b.recv().await["op"], "published");
    a.send_json(&json!({"op":"ping","id":8})).await;
    // The next frame a sees is the pong: the news message was not delivered.
    assert_eq!(a.recv().await, json!({"op":"pong","id":8}));
    // Without an id, replies carry none.
    a.send_json(&json!({"op":"ping"})).await;
    assert_eq!(a.recv().await, json!({"op":"pong"}));
}

#[tokio::test]
async fn data_is_delivered_byte_for_byte() {
    let s = start(&[]).await;
    let mut a = s.connect().await;
    a.subscribe_with_id(1, &["t"]).await;
    let raw = r#"{"op":"publish","topic":"t","data":{ "spaced" : [1, 2] ,"u":"\u00e9"}}"#;
    a.send(Message::text(raw)).await.unwrap();
    let mut frames = Vec::new();
    for _ in 0..2 {
        if let Some(Ok(Message::Text(t))) = futures_util::StreamExt::next(&mut *a).await {
            frames.push(t.to_string());
        }
    }
    assert!(
        frames.contains(
            &r#"{"op":"message","topic":"t","data":{ "spaced" : [1, 2] ,"u":"\u00e9"}}"#
                .to_string()
        ),
        "{frames:?}"
    );
}

#[tokio::test]
async fn messages_from_one_publisher_arrive_in_order() {
    let s = start(&["--rate-limit", "100000", "--rate-burst", "100000"]).await;
    let mut sub = s.connect().await;
    let mut publ = s.connect().await;
    sub.subscribe_with_id(1, &["seq"]).await;
    for i in 0..2000u64 {
        publ.feed(Message::text(
            json!({"op":"publish","topic":"seq","data":i}).to_string(),
        ))
        .await
        .unwrap();
    }
    publ.flush().await.unwrap();
    for i in 0..2000u64 {
        assert_eq!(sub.recv().await["data"], i);
    }
}

async fn expect_error(ws: &mut Client, frame: Message, id: serde_json::Value, code: &str) {
    ws.send(frame).await.unwrap();
    let v = ws.recv().await;
    assert_eq!(v["op"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["id"], id, "{v}");
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
}

fn text(v: serde_json::Value) -> Message {
    Message::text(v.to_string())
}

#[tokio::test]
async fn every_error_code_keeps_the_connection_open() {
    let s = start(&[
        "--max-topics-per-connection",
        "3",
        "--max-publication-size",
        "200",
    ])
    .await;
    let mut ws = s.connect().await;
    use serde_json::Value::Null;
    expect_error(&mut ws, Message::text("not json"), Null, "bad_request").await;
    expect_error(
        &mut ws,
        Message::binary(vec![1u8, 2, 3]),
        Null,
        "bad_request",
    )
    .await;
    expect_error(&mut ws, text(json!([1, 2])), Null, "bad_request").await;
    expect_error(&mut ws, text(json!({"id":1})), json!(1), "bad_request").await;
    expect_error(
        &mut ws,
        text(json!({"op":5,"id":2})),
        json!(2),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"ping","id":-3})),
        Null,
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"ping","id":"3"})),
        Null,
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"subscribe","id":4,"topics":[]})),
        json!(4),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"subscribe","id":5})),
        json!(5),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"publish","id":6,"topic":"t"})),
        json!(6),
        "bad_request",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"dance","id":7})),
        json!(7),
        "unknown_op",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"subscribe","id":8,"topics":["ok","not ok"]})),
        json!(8),
        "invalid_topic",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"subscribe","id":9,"topics":["x".repeat(201)]})),
        json!(9),
        "invalid_topic",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"publish","id":10,"topic":"a*b","data":1})),
        json!(10),
        "invalid_topic",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"subscribe","id":11,"topics":["a","b","c","d"]})),
        json!(11),
        "too_many_topics",
    )
    .await;
    expect_error(
        &mut ws,
        text(json!({"op":"publish","id":12,"topic":"t","data":"x".repeat(300)})),
        json!(12),
        "payload_too_large",
    )
    .await;

    // A rejected command subscribed nothing: "ok" (from the invalid_topic command)
    // and "a" (from too_many_topics) receive nothing.
    let mut p = s.connect().await;
    for t in ["ok", "a"] {
        p.send_json(&json!({"op":"publish","topic":t,"data":1}))
            .await;
        p.recv().await;
    }
    ws.subscribe_with_id(13, &["a", "b", "c"]).await;
    ws.send_json(&json!({"op":"ping","id":14})).await;
    assert_eq!(
        ws.recv().await,
        json!({"op":"pong","id":14}),
        "still open, nothing stray delivered"
    );
}

#[tokio::test]
async fn client_publish_can_be_forbidden() {
    let s = start(&["--client-publish", "false"]).await;
    let mut ws = s.connect().await;
    expect_error(
        &mut ws,
        text(json!({"op":"publish","id":1,"topic":"t","data":1})),
        json!(1),
        "forbidden",
    )
    .await;
    // Subscribing still works, and HTTP publishing still reaches the client.
    ws.subscribe_with_id(2, &["t"]).await;
    let (status, _) = http(
        s.addr,
        "POST",
        "/api/publish",
        &[],
        br#"{"topic":"t","data":"from-http"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ws.recv().await["data"], "from-http");
}

mod unavailable {
    use super::*;
    use std::sync::Arc;
    use wsgate_fanout::{Broker, BrokerError, BrokerFuture, Node};
    use wsgate_gateway::security::Security;
    use wsgate_gateway::Gateway;
    use wsgate_metrics::Metrics;

    /// A broker that is down: exercises the gateway's side of the broker seam (the
    /// Redis broker's own outage tests use a real Redis).
    struct DownBroker;
    impl Broker for DownBroker {
        fn publish(&self, _: &str, _: &[u8], _: u64) -> BrokerFuture {
            BrokerFuture::pending(async { Err(BrokerError::Unavailable("redis is down".into())) })
        }
        fn subscribe(&self, _: Vec<Arc<str>>) -> BrokerFuture {
            BrokerFuture::pending(async { Err(BrokerError::Unavailable("redis is down".into())) })
        }
        fn release(&self, _: Vec<Arc<str>>) {}
        fn is_ready(&self) -> bool {
            false
        }
        fn kind(&self) -> &'static str {
            "down"
        }
    }

    #[tokio::test]
    async fn broker_outage_is_unavailable_never_false_success() {
        let cfg = config(&[]);
        let node = Node::new(Metrics::default(), cfg.max_publication_size(), |_| {
            Ok::<_, ()>(DownBroker)
        })
        .unwrap();
        let security = Security::from_config(&cfg).unwrap();
        let gw = Gateway::new(cfg, node, security);
        let s = start_gateway(gw.clone()).await;
        let mut ws = s.connect().await;
        expect_error(
            &mut ws,
            text(json!({"op":"subscribe","id":1,"topics":["t"]})),
            json!(1),
            "unavailable",
        )
        .await;
        assert!(
            !gw.node.hub().has_subscribers("t"),
            "a failed subscribe is rolled back"
        );
        expect_error(
            &mut ws,
            text(json!({"op":"publish","id":2,"topic":"t","data":1})),
            json!(2),
            "unavailable",
        )
        .await;
        let (status, body) = http(
            s.addr,
            "POST",
            "/api/publish",
            &[],
            br#"{"topic":"t","data":1}"#,
        )
        .await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("unavailable"));
    }
}
