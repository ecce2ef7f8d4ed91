//! Handshake hardening against a real gateway: origins, per-IP limit, slowloris,
//! header size, paths, the publish API key, and the `--echo` endpoint.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsgate_testkit::gateway::jwt::*;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;
use wsgate_testkit::ws::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list() {
    let node = start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ])
    .await;
    let r = raw(
        node.addr,
        &upgrade_request("/ws", "Origin: https://evil.example.net\r\n"),
    )
    .await;
    assert_eq!(status(&r), 403, "{r}");
    assert_eq!(node.refused("origin").await, 1);
    let r = raw(
        node.addr,
        &upgrade_request("/ws", "Origin: https://app.example.com.evil.net\r\n"),
    )
    .await;
    assert_eq!(status(&r), 403, "{r}");
    for ok in [
        "Origin: https://app.example.com\r\n",
        "Origin: https://x.example.org\r\n",
        "",
    ] {
        let r = raw(node.addr, &upgrade_request("/ws", ok)).await;
        assert_eq!(status(&r), 101, "{ok}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_checked_before_the_token() {
    let node = start(&[
        "--allowed-origins",
        "https://app.example.com",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    let r = raw(
        node.addr,
        &upgrade_request("/ws", "Origin: https://evil.example.net\r\n"),
    )
    .await;
    assert_eq!(status(&r), 403, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_limit() {
    let node = start(&["--max-connections-per-ip", "2"]).await;
    let a = Client::session(node.addr, "/ws", &[]).await;
    let _b = Client::session(node.addr, "/ws", &[]).await;
    let r = raw(node.addr, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&r), 429, "{r}");
    assert_eq!(node.refused("per_ip_limit").await, 1);
    drop(a);
    // The slot is released when the session ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = raw(node.addr, &upgrade_request("/ws", "")).await;
        if status(&r) == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the server closes the connection; returns when it did.
async fn wait_closed(s: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_the_handshake_timeout() {
    let node = start(&["--handshake-timeout", "1s"]).await;
    // Silent after connecting.
    let mut idle = TcpStream::connect(node.addr).await.unwrap();
    // A trickle: part of a request head, a byte at a time, never finished.
    let mut trickle = TcpStream::connect(node.addr).await.unwrap();
    let trickler = tokio::spawn(async move {
        trickle
            .write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if trickle.write_all(b"X").await.is_err() {
                break;
            }
        }
        wait_closed(&mut trickle, Duration::from_secs(4)).await
    });
    wait_closed(&mut idle, Duration::from_secs(4)).await;
    trickler.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let node = start(&[]).await;
    let big = format!("X-Filler: {}\r\n", "a".repeat(64 * 1024));
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let req = upgrade_request("/ws", &big);
    // The server may close before reading everything: ignore write errors.
    let _ = s.write_all(req.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(!text.starts_with("HTTP/1.1 101"), "{text}");
    if !text.is_empty() {
        assert_eq!(status(&text), 431, "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_only_on_ws() {
    let node = start(&[]).await;
    for path in ["/", "/wss", "/ws/x", "/echo", "/api/publish/ws"] {
        let r = raw(node.addr, &upgrade_request(path, "")).await;
        assert_ne!(status(&r), 101, "{path}: {r}");
    }
    // Not even the admin listener upgrades.
    let r = raw(node.admin, &upgrade_request("/ws", "")).await;
    assert_eq!(status(&r), 404, "{r}");
}

fn publish_request(auth: &str) -> String {
    let body = r#"{"topic":"news","data":1}"#;
    format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_key() {
    let node = start(&["--api-key", "k3y-k3y-k3y"]).await;
    for (auth, want) in [
        ("", 401),
        ("Authorization: Bearer wrong-key-xx\r\n", 401),
        ("Authorization: Bearer k3y-k3y-k3\r\n", 401),
        ("Authorization: Bearer k3y-k3y-k3yy\r\n", 401),
        ("Authorization: k3y-k3y-k3y\r\n", 401),
        ("Authorization: Bearer k3y-k3y-k3y\r\n", 200),
    ] {
        let r = raw(node.addr, &publish_request(auth)).await;
        assert_eq!(status(&r), want, "{auth}: {r}");
    }
    // Without a key the API is open.
    let node = start(&[]).await;
    assert_eq!(status(&raw(node.addr, &publish_request("")).await), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_endpoint_echoes_text_and_binary() {
    let node = start(&["--echo"]).await;
    let mut ws = Client::open(node.addr, "/echo", &[]).await.unwrap();
    // No welcome: an echo client gets back exactly what it sent.
    ws.send(Message::text("not even json")).await.unwrap();
    let f = ws.next().await.unwrap().unwrap();
    assert_eq!(f, Message::text("not even json"));
    ws.send(Message::binary(vec![0, 1, 2, 255])).await.unwrap();
    let f = ws.next().await.unwrap().unwrap();
    assert_eq!(f, Message::binary(vec![0u8, 1, 2, 255]));
    // /ws still speaks the protocol.
    let mut ws = Client::session(node.addr, "/ws", &[]).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");
}
