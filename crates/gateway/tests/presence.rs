//! Presence, join/leave and the server API in the embedded broker (docs/protocol.md,
//! "Presence and join/leave", "Server API") — a real gateway on 127.0.0.1:0, real
//! clients. The same across nodes with Redis: crates/wsgate/tests/presence_cluster.rs.

use std::time::Duration;

use serde_json::{json, Value};
use wsgate_fanout::{Namespace, Namespaces, Node, Pattern, PresenceOptions};
use wsgate_gateway::security::Security;
use wsgate_gateway::Gateway;
use wsgate_metrics::Metrics;
use wsgate_testkit::gateway::jwt;
use wsgate_testkit::gateway::{start_gateway, TestServer};
use wsgate_testkit::http::http;
use wsgate_testkit::ws::Client as Ws;

const KEY: &str = "the-api-key";

/// A gateway with `room.*` (presence, join/leave at `rate`/s), `who.*` (presence
/// only), `alerts.*` (no client publish, server-side subscriptions only).
async fn start(rate: u32, args: &[&str]) -> TestServer {
    let mut all = vec!["--api-key", KEY];
    all.extend_from_slice(args);
    let cfg = wsgate_testkit::gateway::config(&all);
    let ns = |name: &str, pattern: &str| Namespace {
        name: name.into(),
        topics: vec![Pattern::parse(pattern).unwrap()],
        ..Default::default()
    };
    let namespaces = Namespaces::new(vec![
        Namespace {
            presence: Some(PresenceOptions {
                join_leave: true,
                join_leave_rate: rate,
            }),
            ..ns("rooms", "room.*")
        },
        Namespace {
            presence: Some(PresenceOptions::default()),
            ..ns("who", "who.*")
        },
        Namespace {
            client_publish: false,
            client_subscribe: false,
            ..ns("alerts", "alerts.*")
        },
    ])
    .unwrap();
    let node = Node::in_memory_with(
        Metrics::default(),
        cfg.max_publication_size(),
        namespaces,
        1 << 20,
    );
    let security = Security::from_config(&cfg).unwrap();
    start_gateway(Gateway::new(cfg, node, security)).await
}

/// A `POST /api/…` with the API key.
async fn api(server: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let (status, text) = http(
        server.addr,
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.to_string().as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The next frame whose `op` is `op`, within 5 s, skipping the rest; panics if none.
async fn next_op(ws: &mut Ws, op: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_json(left).await {
            Some(v) if v["op"] == op => return v,
            Some(_) => continue,
            None => panic!("no {op} within 5 s"),
        }
    }
}

/// Every frame that arrives within `within`.
async fn drain(ws: &mut Ws, within: Duration) -> Vec<Value> {
    let mut got = Vec::new();
    while let Some(v) = ws.next_json(within).await {
        got.push(v);
    }
    got
}

fn session(ws: &Ws) -> String {
    ws.welcome["session"].as_str().unwrap().to_owned()
}

fn sessions(reply: &Value) -> Vec<String> {
    let mut s: Vec<String> = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["session"].as_str().unwrap().to_owned())
        .collect();
    s.sort();
    s
}

#[tokio::test]
async fn presence_lists_subscribers_and_join_leave_reach_the_others() {
    let server = start(100, &[]).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.subscribe(&["room.1"]).await;
    b.subscribe(&["room.1"]).await;

    // A hears B's join, B hears nothing of its own.
    let join = next_op(&mut a, "join").await;
    assert_eq!(
        join,
        json!({"op":"join","topic":"room.1","session":session(&b),"user":null})
    );

    let r = a.call(json!({"op":"presence","topic":"room.1"})).await;
    assert_eq!(r["op"], "presence", "{r}");
    assert_eq!(r["topic"], "room.1");
    let mut both = vec![session(&a), session(&b)];
    both.sort();
    assert_eq!(sessions(&r), both);
    let node = server.gw.node_id.clone();
    assert!(r["clients"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["node"] == node.as_str() && c["user"].is_null()));
    let s = b
        .call(json!({"op":"presence_stats","topic":"room.1"}))
        .await;
    assert_eq!(
        (s["op"].as_str(), s["clients"].as_u64(), s["users"].as_u64()),
        (Some("presence_stats"), Some(2), Some(0))
    );

    // Unsubscribe: A hears B leave, and B is no longer listed.
    b.unsubscribe(&["room.1"]).await;
    let leave = next_op(&mut a, "leave").await;
    assert_eq!(leave["session"], session(&b));
    let r = a.call(json!({"op":"presence","topic":"room.1"})).await;
    assert_eq!(sessions(&r), vec![session(&a)]);

    // A disconnect is a leave too; B (no longer subscribed) hears nothing.
    b.subscribe(&["room.1"]).await;
    assert_eq!(next_op(&mut a, "join").await["session"], session(&b));
    let gone = session(&a);
    drop(a);
    let leave = next_op(&mut b, "leave").await;
    assert_eq!(leave["session"], gone);
    let r = b.call(json!({"op":"presence","topic":"room.1"})).await;
    assert_eq!(sessions(&r), vec![session(&b)]);
    let rest = drain(&mut b, Duration::from_millis(300)).await;
    assert!(
        rest.iter().all(|v| v["session"] != session(&b)),
        "a connection never hears its own join or leave: {rest:?}"
    );

    // The same over HTTP.
    let (status, body) = api(&server, "/api/presence", json!({"topic":"room.1"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["topic"], "room.1");
    assert_eq!(sessions(&body), vec![session(&b)]);
    let (status, body) = api(&server, "/api/presence_stats", json!({"topic":"room.1"})).await;
    assert_eq!(
        (status, body),
        (200, json!({"topic":"room.1","clients":1,"users":0}))
    );
}

#[tokio::test]
async fn presence_without_join_leave_and_the_refusals() {
    let server = start(100, &[]).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    a.subscribe(&["who.x"]).await;
    b.subscribe(&["who.x"]).await;
    let r = a.call(json!({"op":"presence","topic":"who.x"})).await;
    assert_eq!(sessions(&r).len(), 2, "{r}");
    b.unsubscribe(&["who.x"]).await;
    let got = drain(&mut a, Duration::from_millis(300)).await;
    assert!(
        got.iter().all(|v| v["op"] != "join" && v["op"] != "leave"),
        "no join/leave without join_leave: {got:?}"
    );

    // Not a presence topic: not_enabled, over WebSocket and HTTP.
    let r = a.call(json!({"op":"presence","topic":"plain.topic"})).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("not_enabled"))
    );
    let (status, body) = api(&server, "/api/presence", json!({"topic":"plain"})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("not_enabled")));
    // Invalid topics and bodies.
    let r = a.call(json!({"op":"presence","topic":"no spaces"})).await;
    assert_eq!(r["code"], "invalid_topic");
    let r = a.call(json!({"op":"presence"})).await;
    assert_eq!(r["code"], "bad_request");
    let (status, body) = api(&server, "/api/presence", json!({"topic":"a b"})).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_topic"))
    );
    let (status, body) = api(&server, "/api/presence", json!({"topics":"x"})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_request")));
    // The API key.
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/presence",
        &[],
        br#"{"topic":"who.x"}"#,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = http(server.addr, "GET", "/api/info", &[], b"").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn presence_needs_the_right_to_subscribe_and_shows_users() {
    let server = start(100, &["--jwt-secret", jwt::SECRET]).await;
    let token = |sub: &str, subscribe: &[&str]| {
        jwt::hs256(&json!({"sub":sub,"exp":jwt::now()+600,"subscribe":subscribe,"publish":["**"]}))
    };
    let connect = |t: String| {
        let addr = server.addr;
        async move { Ws::session(addr, &format!("/ws?token={t}"), &[]).await }
    };
    let mut alice = connect(token("alice", &["room.*"])).await;
    let mut alice2 = connect(token("alice", &["room.*"])).await;
    let mut bob = connect(token("bob", &["news"])).await;
    alice.subscribe(&["room.1"]).await;
    alice2.subscribe(&["room.1"]).await;
    let join = next_op(&mut alice, "join").await;
    assert_eq!(join["user"], "alice");
    let r = alice.call(json!({"op":"presence","topic":"room.1"})).await;
    assert!(
        r["clients"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["user"] == "alice"),
        "{r}"
    );
    let s = alice
        .call(json!({"op":"presence_stats","topic":"room.1"}))
        .await;
    assert_eq!(
        (s["clients"].as_u64(), s["users"].as_u64()),
        (Some(2), Some(1))
    );
    let r = bob.call(json!({"op":"presence","topic":"room.1"})).await;
    assert_eq!(r["code"], "forbidden", "{r}");
}

#[tokio::test]
async fn the_join_leave_rate_rule_summarises_a_storm() {
    let server = start(3, &[]).await;
    let mut watcher = server.connect().await;
    watcher.subscribe(&["room.busy"]).await;
    let mut crowd = Vec::new();
    for _ in 0..10 {
        let mut c = server.connect().await;
        c.subscribe(&["room.busy"]).await;
        crowd.push(c);
    }
    let got = drain(&mut watcher, Duration::from_millis(1500)).await;
    let joins = got.iter().filter(|v| v["op"] == "join").count();
    let changed: Vec<&Value> = got
        .iter()
        .filter(|v| v["op"] == "presence_changed")
        .collect();
    assert_eq!(joins, 3, "the rate lets 3 a second through: {got:?}");
    assert_eq!(changed.len(), 1, "{got:?}");
    assert_eq!(changed[0]["topic"], "room.busy");
    assert_eq!(changed[0]["skipped"], 7);
    let skipped = server
        .metric("wsgate_join_leave_events_total{event=\"join\",outcome=\"skipped\"}")
        .await;
    assert_eq!(skipped, 7.0);
    // The list is whole whatever the events said.
    let r = watcher
        .call(json!({"op":"presence","topic":"room.busy"}))
        .await;
    assert_eq!(sessions(&r).len(), 11);
}

#[tokio::test]
async fn client_rules_of_a_namespace() {
    let server = start(100, &[]).await;
    let mut a = server.connect().await;
    let r = a
        .call(json!({"op":"publish","topic":"alerts.x","data":1}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(r["message"].as_str().unwrap().contains("client_publish"));
    let r = a
        .call(json!({"op":"subscribe","topics":["alerts.x"]}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    assert!(r["message"].as_str().unwrap().contains("client_subscribe"));
    // The server may subscribe it, and backends may publish there.
    let (status, body) = api(
        &server,
        "/api/subscribe",
        json!({"session":session(&a),"topics":["alerts.x"]}),
    )
    .await;
    assert_eq!((status, &body["ok"]), (200, &json!(true)), "{body}");
    let s = next_op(&mut a, "subscribed").await;
    assert_eq!(
        s,
        json!({"op":"subscribed","id":null,"topics":["alerts.x"]})
    );
    let (status, _) = api(
        &server,
        "/api/publish",
        json!({"topic":"alerts.x","data":"fire"}),
    )
    .await;
    assert_eq!(status, 200);
    let m = a.next_message(Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["data"], "fire");
    // Subscribing again to what the server gave it is not refused.
    a.subscribe(&["alerts.x"]).await;
}

#[tokio::test]
async fn server_api_subscribes_unsubscribes_and_disconnects() {
    let server = start(100, &["--jwt-secret", jwt::SECRET]).await;
    let token = |sub: &str| {
        jwt::hs256(&json!({"sub":sub,"exp":jwt::now()+600,"subscribe":["**"],"publish":["**"]}))
    };
    let addr = server.addr;
    let connect =
        |t: String| async move { Ws::session(addr, &format!("/ws?token={t}"), &[]).await };
    let mut a1 = connect(token("alice")).await;
    let mut a2 = connect(token("alice")).await;
    let mut bob = connect(token("bob")).await;

    // Subscribe every connection of alice: both get `subscribed` with id null,
    // then the topic's messages; bob gets nothing.
    let (status, body) = api(
        &server,
        "/api/subscribe",
        json!({"user":"alice","topics":["news","room.9"]}),
    )
    .await;
    assert_eq!((status, &body["ok"]), (200, &json!(true)), "{body}");
    for ws in [&mut a1, &mut a2] {
        let s = next_op(ws, "subscribed").await;
        assert_eq!(
            s,
            json!({"op":"subscribed","id":null,"topics":["news","room.9"]})
        );
    }
    let r = bob.call(json!({"op":"presence","topic":"room.9"})).await;
    assert_eq!(
        sessions(&r).len(),
        2,
        "server subscriptions are in presence: {r}"
    );
    api(&server, "/api/publish", json!({"topic":"news","data":1})).await;
    for ws in [&mut a1, &mut a2] {
        assert_eq!(
            ws.next_message(Duration::from_secs(5)).await.unwrap()["data"],
            1
        );
    }
    assert!(bob.next_message(Duration::from_millis(300)).await.is_none());

    // Unsubscribe one session only.
    let (status, _) = api(
        &server,
        "/api/unsubscribe",
        json!({"session":session(&a2),"topics":["news","never"]}),
    )
    .await;
    assert_eq!(status, 200);
    let u = next_op(&mut a2, "unsubscribed").await;
    assert_eq!(u, json!({"op":"unsubscribed","id":null,"topics":["news"]}));
    api(&server, "/api/publish", json!({"topic":"news","data":2})).await;
    assert_eq!(
        a1.next_message(Duration::from_secs(5)).await.unwrap()["data"],
        2
    );
    assert!(a2.next_message(Duration::from_millis(300)).await.is_none());

    // Unknown users and sessions: 200, nothing done.
    for target in [
        json!({"user":"nobody"}),
        json!({"session":"0000000000000000"}),
        json!({"session":"junk"}),
    ] {
        let (status, body) = api(&server, "/api/disconnect", target.clone()).await;
        assert_eq!(
            (status, &body["ok"]),
            (200, &json!(true)),
            "{target}: {body}"
        );
    }
    assert!(bob.alive().await && a1.alive().await);

    // Disconnect alice everywhere (4010), then bob with a code of our own.
    let (status, _) = api(&server, "/api/disconnect", json!({"user":"alice"})).await;
    assert_eq!(status, 200);
    assert_eq!(a1.expect_close().await, Some(4010));
    assert_eq!(a2.expect_close().await, Some(4010));
    let (status, _) = api(
        &server,
        "/api/disconnect",
        json!({"session":session(&bob),"code":4321,"reason":"moved"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bob.expect_close().await, Some(4321));
    let disconnects = server.gw.metrics.disconnects.clone();
    let counted = wsgate_testkit::wait::eventually(Duration::from_secs(5), || {
        disconnects.with_label_values(&["server_disconnect"]).get() == 3
    })
    .await;
    assert!(counted, "three server disconnects counted");
    let n = server
        .metric("wsgate_api_requests_total{endpoint=\"disconnect\",status=\"200\"}")
        .await;
    assert_eq!(n, 5.0);

    // Malformed commands.
    for (body, code) in [
        (json!({"topics":["a"]}), "bad_request"),
        (
            json!({"user":"a","session":"b","topics":["a"]}),
            "bad_request",
        ),
        (json!({"user":"a","topics":[]}), "bad_request"),
        (json!({"user":"a","topics":["a b"]}), "invalid_topic"),
        (
            json!({"user":"a","topics":["a"],"code":4000}),
            "bad_request",
        ),
        (json!({"user":"a","topcs":["a"]}), "bad_request"),
    ] {
        let (status, got) = api(&server, "/api/subscribe", body.clone()).await;
        assert_eq!((status, got["error"].as_str()), (400, Some(code)), "{body}");
    }
    for body in [
        json!({"user":"a","code":1000}),
        json!({"user":"a","code":5000}),
        json!({"user":"a","reason":"x".repeat(124)}),
        json!({"user":""}),
        json!([1]),
    ] {
        let (status, _) = api(&server, "/api/disconnect", body.clone()).await;
        assert_eq!(status, 400, "{body}");
    }
}

#[tokio::test]
async fn a_token_may_carry_server_side_subscriptions() {
    let server = start(100, &["--jwt-secret", jwt::SECRET]).await;
    let t =
        jwt::hs256(&json!({"sub":"carol","exp":jwt::now()+600,"topics":["alerts.carol","room.1"]}));
    let mut ws = Ws::session(server.addr, &format!("/ws?token={t}"), &[]).await;
    let s = next_op(&mut ws, "subscribed").await;
    assert_eq!(
        s,
        json!({"op":"subscribed","id":null,"topics":["alerts.carol","room.1"]})
    );
    api(
        &server,
        "/api/publish",
        json!({"topic":"alerts.carol","data":"hi"}),
    )
    .await;
    assert_eq!(
        ws.next_message(Duration::from_secs(5)).await.unwrap()["data"],
        "hi"
    );
    // No subscribe permission of its own: still not allowed to subscribe elsewhere.
    let r = ws.call(json!({"op":"subscribe","topics":["room.2"]})).await;
    assert_eq!(r["code"], "forbidden");
    // An invalid topic in the claim refuses the token.
    let bad = jwt::hs256(&json!({"sub":"x","exp":jwt::now()+600,"topics":["no spaces"]}));
    let (status, body) = http(
        server.addr,
        "GET",
        &format!("/ws?token={bad}"),
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        b"",
    )
    .await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn info_lists_this_node() {
    let server = start(100, &[]).await;
    let mut a = server.connect().await;
    a.subscribe(&["room.1", "news"]).await;
    let auth = format!("Bearer {KEY}");
    let (status, text) = http(
        server.addr,
        "GET",
        "/api/info",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{v}");
    let n = &nodes[0];
    assert_eq!(n["node"], server.gw.node_id.as_str());
    assert_eq!(
        (n["connections"].as_u64(), n["subscriptions"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(n["draining"], false);
    assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
    assert!(n["uptime_s"].is_u64());
    let (status, _) = http(
        server.addr,
        "POST",
        "/api/info",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 405);
}

#[tokio::test]
async fn rebalance_on_one_node_sheds_nothing() {
    let server = start(100, &["--max-connections", "500"]).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let id = server.gw.node_id.clone();
    for body in [
        json!({}),
        json!({"dry_run": true}),
        json!({"dry_run": false}),
    ] {
        let (status, v) = api(&server, "/api/rebalance", body.clone()).await;
        assert_eq!(status, 200, "{v}");
        let dry = body["dry_run"].as_bool().unwrap_or(false);
        assert_eq!(
            v,
            json!({"dry_run": dry, "nodes": [{"node": id, "connections": 2, "share": 2, "shed": 0}]})
        );
    }
    // No body at all is `{}`; unknown fields and other methods are refused.
    let auth = format!("Bearer {KEY}");
    let (status, text) = http(
        server.addr,
        "POST",
        "/api/rebalance",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, v) = api(&server, "/api/rebalance", json!({"dry_run": 1})).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );
    let (status, v) = api(&server, "/api/rebalance", json!({"nodes": []})).await;
    assert_eq!(status, 400, "{v}");
    let (status, _) = http(
        server.addr,
        "GET",
        "/api/rebalance",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 405);
    // The node says its capacity, the weight of its share.
    let (status, text) = http(
        server.addr,
        "GET",
        "/api/info",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["nodes"][0]["capacity"], 500);
    assert!(a.alive().await && b.alive().await);
}
