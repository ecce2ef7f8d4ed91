//! The HTTP publish API and the admin endpoints.

use serde_json::json;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;

#[tokio::test]
async fn publish_single_and_batch() {
    let s = start(&[]).await;
    let mut ws = s.connect().await;
    ws.subscribe_with_id(1, &["a", "b"]).await;
    let (status, body) = http(
        s.addr,
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        br#"{"topic":"a","data":{"k":1}}"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"ok":true,"published":1}"#)
    );
    assert_eq!(
        ws.recv().await,
        json!({"op":"message","topic":"a","data":{"k":1}})
    );
    let (status, body) = http(
        s.addr,
        "POST",
        "/api/publish",
        &[],
        br#"[{"topic":"a","data":1},{"topic":"b","data":"two"},{"topic":"a","data":null}]"#,
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"ok":true,"published":3}"#)
    );
    assert_eq!(ws.recv().await["data"], 1);
    assert_eq!(ws.recv().await["data"], "two");
    assert_eq!(
        ws.recv().await,
        json!({"op":"message","topic":"a","data":null})
    );
    assert_eq!(
        s.metric("wsgate_messages_received_total{source=\"http\"}")
            .await,
        4.0
    );
}

#[tokio::test]
async fn bad_requests_are_refused_whole() {
    let s = start(&["--http-max-body", "2KiB", "--max-publication-size", "100"]).await;
    let mut ws = s.connect().await;
    ws.subscribe_with_id(1, &["a"]).await;
    let cases: &[(&[u8], u16, &str)] = &[
        (b"not json", 400, "bad_request"),
        (b"[]", 400, "bad_request"),
        (b"[1,2]", 400, "bad_request"),
        (br#"{"data":1}"#, 400, "bad_request"),
        (br#"{"topic":"a"}"#, 400, "bad_request"),
        (br#"[{"topic":"a","data":1},{"topic":"bad topic","data":1}]"#, 400, "invalid_topic"),
        (br#"{"topic":"a","data":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#, 413, "payload_too_large"),
    ];
    for (body, status, code) in cases {
        let (st, text) = http(s.addr, "POST", "/api/publish", &[], body).await;
        assert_eq!(st, *status, "{} -> {text}", String::from_utf8_lossy(body));
        assert!(text.contains(code), "{text}");
    }
    let big = format!(r#"{{"topic":"a","data":"{}"}}"#, "x".repeat(3000));
    let (st, _) = http(s.addr, "POST", "/api/publish", &[], big.as_bytes()).await;
    assert_eq!(st, 413);
    let (st, _) = http(s.addr, "GET", "/api/publish", &[], b"").await;
    assert_eq!(st, 405);
    // Nothing of the refused batch was delivered.
    ws.send_json(&json!({"op":"ping","id":2})).await;
    assert_eq!(ws.recv().await, json!({"op":"pong","id":2}));
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let s = start(&["--api-key", "s3cret-key"]).await;
    let body = br#"{"topic":"a","data":1}"#;
    let refused: [&[(&str, &str)]; 4] = [
        &[],
        &[("Authorization", "Bearer wrong")],
        &[("Authorization", "Bearer s3cret-ke")],
        &[("Authorization", "s3cret-key")],
    ];
    for headers in refused {
        let status = http(s.addr, "POST", "/api/publish", headers, body).await.0;
        assert_eq!(status, 401, "{headers:?}");
    }
    let ok = [("Authorization", "Bearer s3cret-key")];
    assert_eq!(http(s.addr, "POST", "/api/publish", &ok, body).await.0, 200);
    // Without a key configured, the API is open.
    let open = start(&[]).await;
    assert_eq!(
        http(open.addr, "POST", "/api/publish", &[], body).await.0,
        200
    );
}

#[tokio::test]
async fn health_readiness_metrics_and_routing() {
    let s = start(&[]).await;
    let (st, body) = http(s.admin, "GET", "/healthz", &[], b"").await;
    assert_eq!((st, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (st, body) = http(s.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(st, 200);
    assert!(
        body.contains(r#""ready":true"#) && body.contains(r#""broker":"memory""#),
        "{body}"
    );
    let (st, body) = http(s.admin, "GET", "/metrics", &[], b"").await;
    assert_eq!(st, 200);
    assert!(body.contains("wsgate_build_info"));
    // Admin endpoints are not on the public listener, and vice versa.
    assert_eq!(http(s.addr, "GET", "/metrics", &[], b"").await.0, 404);
    assert_eq!(
        http(s.admin, "POST", "/api/publish", &[], b"{}").await.0,
        404
    );
    // /ws without an upgrade is 426.
    assert_eq!(http(s.addr, "GET", "/ws", &[], b"").await.0, 426);
    assert_eq!(http(s.addr, "GET", "/nope", &[], b"").await.0, 404);
}

#[tokio::test]
async fn one_port_for_everything_when_configured() {
    // Bind a free port, then ask for listen == admin-listen on it.
    let port = wsgate_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let s = start_with(wsgate_gateway::Config::try_parse_from_args(&[
        "--listen",
        &addr,
        "--admin-listen",
        &addr,
    ]))
    .await;
    assert_eq!(s.addr, s.admin);
    assert_eq!(http(s.addr, "GET", "/readyz", &[], b"").await.0, 200);
    assert_eq!(
        http(
            s.addr,
            "POST",
            "/api/publish",
            &[],
            br#"{"topic":"a","data":1}"#
        )
        .await
        .0,
        200
    );
}

#[tokio::test]
async fn drain_endpoint_closes_clients_1001_and_refuses_new_ones() {
    let mut s = start(&["--drain-timeout", "300ms"]).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(s.connect().await);
    }
    let (st, _) = http(s.admin, "POST", "/drain", &[], b"").await;
    assert_eq!(st, 202);
    let (st, body) = http(s.admin, "GET", "/readyz", &[], b"").await;
    assert_eq!(st, 503, "{body}");
    match tokio_tungstenite::connect_async(s.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("upgrade accepted while draining"),
    }
    for c in clients.iter_mut() {
        assert_eq!(c.expect_close().await, Some(1001));
    }
    tokio::time::timeout(std::time::Duration::from_secs(10), &mut s.task)
        .await
        .expect("server finished")
        .unwrap();
}

#[tokio::test]
async fn client_js_is_served_and_the_demo_only_when_enabled() {
    let s = start(&[]).await;
    let (st, body) = http(s.addr, "GET", "/wsgate.js", &[], b"").await;
    assert_eq!(st, 200);
    assert!(body.contains("export"), "an ES module");
    assert_eq!(
        http(s.addr, "GET", "/", &[], b"").await.0,
        404,
        "no demo by default"
    );
    let demo = start(&["--demo"]).await;
    let (st, body) = http(demo.addr, "GET", "/", &[], b"").await;
    assert_eq!(st, 200);
    assert!(body.contains("/wsgate.js"), "the page loads the client");
    // The ticker is the binary's (crates/wsgate/src/demo.rs, tested there).
}

#[tokio::test]
async fn with_an_upgrade_rate_welcome_and_drain_closes_carry_reconnect_hints() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    // 10 upgrades/s and a drain that closes everyone at once: the drained clients
    // are told to come back 100 ms apart.
    let mut s = start(&[
        "--drain-timeout",
        "0s",
        "--upgrade-rate",
        "10",
        "--upgrade-burst",
        "10",
    ])
    .await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(s.connect().await);
    }
    // The first client was the node's first: one refill of the burst (1 s).
    assert_eq!(
        clients[0].welcome["reconnect_ms"], 1000,
        "{}",
        clients[0].welcome
    );
    assert!(clients[0].welcome["heartbeat_ms"].is_u64());
    let (st, _) = http(s.admin, "POST", "/drain", &[], b"").await;
    assert_eq!(st, 202);
    let mut hints = Vec::new();
    for c in clients.iter_mut() {
        let frame = loop {
            match tokio::time::timeout(wsgate_testkit::ws::WITHIN, c.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(f))) => break f.expect("a close frame with a code"),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        };
        assert_eq!(u16::from(frame.code), 1001);
        let reason = frame.reason.to_string();
        assert!(reason.starts_with("node draining: reconnect"), "{reason}");
        hints.push(
            reason
                .rsplit_once("; retry=")
                .map(|(_, ms)| ms.parse::<u64>().unwrap()),
        );
    }
    hints.sort();
    assert_eq!(hints, [None, Some(100), Some(200), Some(300), Some(400)]);
    tokio::time::timeout(std::time::Duration::from_secs(10), &mut s.task)
        .await
        .expect("server finished")
        .unwrap();
}
