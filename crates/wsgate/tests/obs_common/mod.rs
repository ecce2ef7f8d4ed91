//! Helpers shared by the binary's integration tests: start the real `wsgate` process
//! on free ports, talk to it with an independent WebSocket client and plain HTTP.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A running gateway process, killed on drop.
pub struct Gateway {
    child: Child,
    /// `/ws` and the publish API.
    pub public: SocketAddr,
    /// `/metrics`, `/readyz`, `/drain`.
    pub admin: SocketAddr,
    /// Log lines (JSON), as they arrive.
    pub logs: mpsc::Receiver<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `wsgate` on port 0 with `args` and `env`; waits for both listeners.
pub fn start(args: &[&str], env: &[(&str, &str)]) -> Gateway {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--node-id",
        "test-node",
    ])
    .args(args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // Tests must not inherit an exporter from the developer's shell.
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k.starts_with("WSGATE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start wsgate");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut public, mut admin) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while public.is_none() || admin.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("wsgate did not start in time");
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let addr = || v["listen"].as_str().and_then(|s| s.parse().ok());
        match v["message"].as_str() {
            Some("wsgate serving") => public = addr(),
            Some("admin endpoints serving") => admin = addr(),
            _ => {}
        }
    }
    Gateway {
        child,
        public: public.unwrap(),
        admin: admin.unwrap(),
        logs: rx,
    }
}

/// A minimal HTTP/1.1 request; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    try_http(addr, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http`], with a connection error as an error (for servers still starting).
pub async fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text[9..12].parse().expect("status code");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `POST /api/publish` of one message.
pub async fn publish_http(gw: &Gateway, topic: &str, data: &str) {
    let (status, body) = http(
        gw.public,
        "POST",
        "/api/publish",
        &format!(r#"{{"topic":"{topic}","data":{data}}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// The `/metrics` text.
pub async fn scrape(gw: &Gateway) -> String {
    let (status, body) = http(gw.admin, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    // hyper may answer with a chunked body; `Full` bodies come with a length, so
    // the body is the exposition itself.
    body
}

/// Parses an exposition into `series → value` (`name{labels}` as written).
pub fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// Scrapes until `check` passes on the parsed values (the writers fold their
/// counts in a few times a second), or panics with the last scrape after 10 s.
pub async fn eventually(gw: &Gateway, what: &str, check: impl Fn(&HashMap<String, f64>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(gw).await;
        if check(&parse(&text)) {
            return;
        }
        if Instant::now() > deadline {
            panic!("metrics never showed {what}:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A value from a parsed scrape (0 when absent).
pub fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects to `/ws` and reads the welcome.
pub async fn connect(gw: &Gateway) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.public))
        .await
        .expect("upgrade");
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["op"], "welcome");
    ws
}

/// Sends a JSON command.
pub async fn send(ws: &mut Ws, json: &str) {
    ws.send(Message::text(json)).await.expect("send");
}

/// Next text frame as JSON (pings skipped).
pub async fn recv_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("connection open")
            .expect("valid frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).expect("JSON frame");
        }
    }
}

/// Subscribes and waits for `subscribed`.
pub async fn subscribe(ws: &mut Ws, topic: &str) {
    send(
        ws,
        &format!(r#"{{"op":"subscribe","id":1,"topics":["{topic}"]}}"#),
    )
    .await;
    let r = recv_json(ws).await;
    assert_eq!(r["op"], "subscribed", "{r}");
}
