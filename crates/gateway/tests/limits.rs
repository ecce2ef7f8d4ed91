//! Inbound limits, malformed frames, backpressure and heartbeats.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;
use wsgate_testkit::ws::*;

#[tokio::test]
async fn oversize_message_closes_1009_and_neighbours_are_unaffected() {
    let s = start(&["--max-message-size", "1024"]).await;
    let mut victim = s.connect().await;
    let mut neighbour = s.connect().await;
    neighbour.subscribe_with_id(1, &["t"]).await;
    // Exactly the limit is fine (an error reply, since it is not JSON).
    victim.send(Message::text("x".repeat(1024))).await.unwrap();
    assert_eq!(victim.recv().await["code"], "bad_request");
    victim.send(Message::text("x".repeat(1025))).await.unwrap();
    assert_eq!(victim.expect_close().await, Some(1009));
    neighbour
        .send_json(&json!({"op":"publish","id":2,"topic":"t","data":"still here"}))
        .await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(neighbour.recv().await);
    }
    assert!(seen.contains(&json!({"op":"message","topic":"t","data":"still here"})));
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"too_big\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_bounded() {
    let s = start(&["--max-message-size", "1024"]).await;
    let mut raw = raw_connect(s.addr).await;
    let (op, welcome) = read_frame(&mut raw).await;
    assert_eq!(op, 1, "{}", String::from_utf8_lossy(&welcome));
    // {"op":"ping","id":1} in three fragments, a ping in the middle.
    let cmd = br#"{"op":"ping","id":1}"#;
    raw.write_all(&client_frame(false, 0x1, &cmd[..5]))
        .await
        .unwrap();
    raw.write_all(&client_frame(false, 0x0, &cmd[5..12]))
        .await
        .unwrap();
    raw.write_all(&client_frame(true, 0x9, b"hb"))
        .await
        .unwrap();
    raw.write_all(&client_frame(true, 0x0, &cmd[12..]))
        .await
        .unwrap();
    let (op, payload) = read_frame(&mut raw).await;
    assert_eq!(
        (op, payload.as_slice()),
        (0xA, &b"hb"[..]),
        "client ping answered"
    );
    let (op, payload) = read_frame(&mut raw).await;
    assert_eq!(
        (op, payload.as_slice()),
        (0x1, &br#"{"op":"pong","id":1}"#[..])
    );
    // Fragments that add up past the limit, each under it.
    raw.write_all(&client_frame(false, 0x1, &[b' '; 400]))
        .await
        .unwrap();
    for _ in 0..5 {
        raw.write_all(&client_frame(false, 0x0, &[b' '; 400]))
            .await
            .unwrap();
    }
    let (op, payload) = read_frame(&mut raw).await;
    assert_eq!(op, 0x8);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
}

#[tokio::test]
async fn invalid_utf8_and_protocol_errors_close_without_harm() {
    let s = start(&[]).await;
    let mut raw = raw_connect(s.addr).await;
    read_frame(&mut raw).await;
    raw.write_all(&client_frame(true, 0x1, &[0xff, 0xfe]))
        .await
        .unwrap();
    let (op, payload) = read_frame(&mut raw).await;
    assert_eq!(
        (op, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1007)
    );

    let mut raw = raw_connect(s.addr).await;
    read_frame(&mut raw).await;
    // Reserved opcode 0x3.
    raw.write_all(&client_frame(true, 0x3, b"?")).await.unwrap();
    let (op, payload) = read_frame(&mut raw).await;
    assert_eq!(
        (op, u16::from_be_bytes([payload[0], payload[1]])),
        (0x8, 1002)
    );

    // The server is fine.
    let mut ws = s.connect().await;
    ws.send_json(&json!({"op":"ping","id":1})).await;
    assert_eq!(ws.recv().await["op"], "pong");
}

#[tokio::test]
async fn rate_limit_then_4029_on_sustained_abuse() {
    let s = start(&["--rate-limit", "10", "--rate-burst", "20"]).await;
    let mut ws = s.connect().await;
    for i in 0..20 {
        ws.feed(Message::text(json!({"op":"ping","id":i}).to_string()))
            .await
            .unwrap();
    }
    // Over the limit: rate_limited errors (the bucket refills slowly).
    ws.feed(Message::text(json!({"op":"ping","id":100}).to_string()))
        .await
        .unwrap();
    ws.flush().await.unwrap();
    for i in 0..20 {
        assert_eq!(ws.recv().await, json!({"op":"pong","id":i}));
    }
    let v = ws.recv().await;
    assert_eq!(
        (v["code"].as_str(), v["id"].as_u64()),
        (Some("rate_limited"), Some(100)),
        "{v}"
    );
    // Keep hammering: closed with 4029.
    for i in 0..200 {
        if ws
            .send(Message::text(json!({"op":"ping","id":i}).to_string()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(ws.expect_close().await, Some(4029));
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"rate_limit\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn max_connections_refuses_before_upgrade() {
    let s = start(&["--max-connections", "2"]).await;
    let _a = s.connect().await;
    let b = s.connect().await;
    let err = tokio_tungstenite::connect_async(s.ws_url())
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(r) => assert_eq!(r.status(), 503),
        e => panic!("expected HTTP 503, got {e}"),
    }
    assert_eq!(
        s.metric("wsgate_connections_refused_total{reason=\"max_connections\"}")
            .await,
        1.0
    );
    // A slot frees when a client leaves.
    drop(b);
    let mut ok = false;
    for _ in 0..50 {
        if tokio_tungstenite::connect_async(s.ws_url()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "slot released after disconnect");
}

#[tokio::test]
async fn slow_consumer_is_dropped_with_4008_and_others_get_everything_in_order() {
    let s = start(&["--outbound-queue-bytes", "128KiB"]).await;
    // The slow client: a raw socket that subscribes and then never reads again.
    let mut slow = raw_connect(s.addr).await;
    read_frame(&mut slow).await;
    slow.write_all(&client_frame(
        true,
        0x1,
        br#"{"op":"subscribe","id":1,"topics":["flood"]}"#,
    ))
    .await
    .unwrap();
    let (_, reply) = read_frame(&mut slow).await;
    assert!(String::from_utf8_lossy(&reply).contains("subscribed"));
    let mut good = s.connect().await;
    good.subscribe_with_id(1, &["flood"]).await;

    // 20 MB through the HTTP API, in batches of 20 KB (well within a queue, so a
    // reading client never overflows): far beyond the slow client's socket buffers
    // plus its 128 KiB queue.
    let payload = "p".repeat(1000);
    let n_batches = 1000;
    let per_batch = 20;
    let reader = tokio::spawn(async move {
        let mut next = 0u64;
        while next < (n_batches * per_batch) as u64 {
            let v = good.recv().await;
            assert_eq!(v["data"]["seq"], next, "in order, nothing lost");
            next += 1;
        }
        good
    });
    for b in 0..n_batches {
        let items: Vec<_> = (0..per_batch)
            .map(|i| json!({"topic":"flood","data":{"seq": b * per_batch + i, "pad": payload}}))
            .collect();
        let body = serde_json::to_vec(&items).unwrap();
        let (status, text) = http(s.addr, "POST", "/api/publish", &[], &body).await;
        assert_eq!(status, 200, "{text}");
    }
    let _good = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("good subscriber kept up")
        .unwrap();
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"slow_consumer\"}")
            .await,
        1.0
    );
    assert!(
        s.metric("wsgate_messages_dropped_total{reason=\"slow_consumer\"}")
            .await
            > 0.0
    );
    // The queue was bounded: the largest batch ever taken is under the limit.
    let scrape = http(s.admin, "GET", "/metrics", &[], b"").await.1;
    let over = scrape
        .lines()
        .find(|l| l.starts_with("wsgate_outbound_queue_bytes_bucket{le=\"262144\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap();
    let count = s.metric("wsgate_outbound_queue_bytes_count").await;
    assert_eq!(
        over, count,
        "no batch above the 128 KiB limit (next bucket: 256 KiB)"
    );
}

#[tokio::test]
async fn silent_client_is_dropped_with_4000_and_live_one_is_kept() {
    let s = start(&[
        "--heartbeat-interval",
        "100ms",
        "--heartbeat-timeout",
        "400ms",
    ])
    .await;
    // Silent: reads the server's pings but never answers anything.
    let mut silent = raw_connect(s.addr).await;
    read_frame(&mut silent).await;
    let mut pings = 0;
    let code = loop {
        let (op, payload) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut silent))
            .await
            .expect("server acts");
        match op {
            0x9 => pings += 1,
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    assert_eq!(code, 4000);
    assert!(pings >= 2, "server pinged before giving up ({pings})");

    // Live: tungstenite answers pings with pongs while we read.
    let mut live = s.connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), live.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => panic!("live client closed: {f:?}"),
            Ok(Some(Err(e))) => panic!("live client error: {e}"),
            _ => {}
        }
    }
    live.send_json(&json!({"op":"ping","id":1})).await;
    assert_eq!(live.recv().await["op"], "pong");
    assert_eq!(
        s.metric("wsgate_disconnects_total{reason=\"heartbeat_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn upgrades_over_the_rate_get_503_overloaded_with_a_hint() {
    // A bucket of 3 that refills one token a second: the 4th upgrade at once is refused.
    let s = start(&["--upgrade-rate", "1", "--upgrade-burst", "3"]).await;
    assert_eq!(
        s.metric("wsgate_connections_refused_total{reason=\"overloaded\"}")
            .await,
        0.0
    );
    let _clients = [s.connect().await, s.connect().await, s.connect().await];
    let resp = raw(s.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&resp), 503, "{resp}");
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let retry_after: u64 = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("retry-after:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Retry-After header");
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "overloaded", "{v}");
    assert!(v["message"].as_str().unwrap().contains("retry"), "{v}");
    let ms = v["retry_after_ms"].as_u64().unwrap();
    // The next token comes within a second, plus jitter.
    assert!((1..=1300).contains(&ms), "{ms}");
    assert_eq!(retry_after, ms.div_ceil(1000).max(1));
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert_eq!(
        s.metric("wsgate_connections_refused_total{reason=\"overloaded\"}")
            .await,
        1.0
    );
    // Health and metrics are not rate limited.
    for _ in 0..5 {
        assert_eq!(http(s.admin, "GET", "/healthz", &[], b"").await.0, 200);
    }
    // After the hint, the upgrade goes through.
    tokio::time::sleep(Duration::from_millis(ms)).await;
    let _d = s.connect().await;
}
