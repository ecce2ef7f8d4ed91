//! Helpers for the security tests: a real gateway on 127.0.0.1:0, raw HTTP, a
//! WebSocket client, tokens.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_gateway::{Config, Gateway, Server};
use wsgate_metrics::Metrics;

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

/// A running gateway.
pub struct Node {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gw: Arc<Gateway>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.gw.shutdown.cancel();
    }
}

/// Starts a gateway with the test defaults plus `args`.
pub async fn start(args: &[&str]) -> Node {
    let mut all = vec![
        "wsgate",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--log-level",
        "warn",
    ];
    all.extend_from_slice(args);
    let cfg = Config::parse_from(all);
    cfg.validate().expect("valid test config");
    let gw = Gateway::in_memory(cfg, Metrics::default()).expect("valid security settings");
    let server = Server::bind(gw.clone()).await.expect("bind");
    let addr = server.local_addr();
    let admin = server.admin_addr();
    tokio::spawn(server.run());
    Node { addr, admin, gw }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    sign(jsonwebtoken::Algorithm::HS256, SECRET.as_bytes(), claims)
}

pub fn sign(alg: jsonwebtoken::Algorithm, key: &[u8], claims: &Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = match alg {
        jsonwebtoken::Algorithm::HS256 | jsonwebtoken::Algorithm::HS384 => {
            EncodingKey::from_secret(key)
        }
        jsonwebtoken::Algorithm::ES256 => EncodingKey::from_ec_pem(key).unwrap(),
        _ => EncodingKey::from_rsa_pem(key).unwrap(),
    };
    encode(&Header::new(alg), claims, &key).unwrap()
}

/// A handshake request for `path` with extra header lines (each ending in CRLF).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` and returns the response head (status line and headers) and the
/// start of the body.
pub async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 8192];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("response in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        // A 101 keeps the socket open: the head is enough.
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of a response from [`raw`].
pub fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

pub type Ws = WebSocket<TokioIo<Upgraded>>;

/// Opens a WebSocket to `path` with extra headers; `Err` carries the refusal.
pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Ws, String> {
    let stream = TcpStream::connect(addr).await.unwrap();
    connect_over(stream, addr, path, headers).await
}

/// Like [`connect`], over an already open stream (e.g. TLS).
pub async fn connect_over<S>(
    stream: S,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let mut req = hyper::Request::get(path)
        .header("Host", addr.to_string())
        .header("Upgrade", "websocket")
        .header("Connection", "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let (mut ws, _) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
        .await
        .map_err(|e| e.to_string())?;
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    Ok(ws)
}

pub async fn send(ws: &mut Ws, text: &str) {
    ws.write_frame(Frame::text(Payload::Owned(text.as_bytes().to_vec())))
        .await
        .unwrap();
}

/// What the server sent next, skipping pings and pongs.
pub enum Received {
    Json(Value),
    Binary(Vec<u8>),
    Close(u16),
}

pub async fn next(ws: &mut Ws, within: Duration) -> Received {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.read_frame())
            .await
            .expect("a frame in time")
            .expect("a frame");
        match frame.opcode {
            OpCode::Text => return Received::Json(serde_json::from_slice(&frame.payload).unwrap()),
            OpCode::Binary => return Received::Binary(frame.payload.to_vec()),
            OpCode::Close => {
                let code = if frame.payload.len() >= 2 {
                    u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                } else {
                    1005
                };
                return Received::Close(code);
            }
            _ => continue,
        }
    }
}

/// The next JSON frame (panics on anything else).
pub async fn json(ws: &mut Ws) -> Value {
    match next(ws, Duration::from_secs(5)).await {
        Received::Json(v) => v,
        Received::Binary(_) => panic!("binary frame"),
        Received::Close(c) => panic!("closed with {c}"),
    }
}

/// Connects and reads the welcome.
pub async fn session(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Ws {
    let mut ws = connect(addr, path, headers).await.expect("upgrade");
    let w = json(&mut ws).await;
    assert_eq!(w["op"], "welcome", "{w}");
    ws
}

/// Sends a command and returns the reply.
pub async fn call(ws: &mut Ws, text: &str) -> Value {
    send(ws, text).await;
    json(ws).await
}

/// `wsgate_connections_refused_total{reason}` as scraped.
pub async fn refused(node: &Node, reason: &str) -> u64 {
    let r = raw(
        node.admin,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let needle = format!("wsgate_connections_refused_total{{reason=\"{reason}\"}} ");
    r.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

pub type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;
