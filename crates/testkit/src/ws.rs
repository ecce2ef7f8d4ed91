//! The WebSocket test client, and raw sockets for tests that must misbehave.
//!
//! [`Client`] speaks the wsgate protocol over tungstenite (a client nobody here
//! wrote), over TCP or any stream (TLS). It dereferences to the tungstenite stream
//! ([`Ws`]) for tests that send or read frames themselves (`SinkExt`, `StreamExt`).
//!
//! Raw: [`raw_connect`] does the handshake on a plain TCP stream and stops there;
//! [`client_frame`] builds client frames (masked, any opcode, any `FIN`, every
//! length encoding); [`read_frame`] reads one server frame.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long a reply or an expected frame may take.
pub const WITHIN: Duration = Duration::from_secs(10);

/// A byte stream a client runs over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The tungstenite stream under a [`Client`].
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// What the server sent next, pings and pongs skipped.
#[derive(Debug)]
pub enum Received {
    Json(Value),
    Binary(Vec<u8>),
    /// A close frame's code (1005 when it carries none).
    Close(u16),
}

/// A WebSocket client speaking the wsgate protocol.
pub struct Client {
    ws: Ws,
    /// The `welcome` frame, when the client read it (`Null` otherwise).
    pub welcome: Value,
    next_id: u64,
    /// Messages read while waiting for a reply, handed out by `next_message`.
    backlog: VecDeque<Value>,
}

impl Deref for Client {
    type Target = Ws;
    fn deref(&self) -> &Ws {
        &self.ws
    }
}

impl DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Ws {
        &mut self.ws
    }
}

impl Client {
    /// Connects to `/ws` at `addr` and reads the welcome.
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::session(addr, "/ws", &[]).await
    }

    /// Connects to `path` with extra headers and reads the welcome.
    pub async fn session(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Client {
        let mut c = Self::open(addr, path, headers).await.expect("upgrade");
        c.read_welcome().await;
        c
    }

    /// Opens a WebSocket to `path` with extra headers, reading nothing; `Err`
    /// carries the refusal.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        Self::open_over(stream, addr, path, headers).await
    }

    /// Like [`Client::open`], over an already open stream (e.g. TLS).
    pub async fn open_over(
        stream: impl Io + 'static,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, String> {
        let mut req = format!("ws://{addr}{path}")
            .into_client_request()
            .map_err(|e| e.to_string())?;
        for (k, v) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v).expect("header value"),
            );
        }
        let stream: Box<dyn Io> = Box::new(stream);
        let (ws, _) = tokio::time::timeout(WITHIN, tokio_tungstenite::client_async(req, stream))
            .await
            .map_err(|_| format!("no handshake response in {WITHIN:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(Client {
            ws,
            welcome: Value::Null,
            next_id: 1,
            backlog: VecDeque::new(),
        })
    }

    /// Reads the welcome frame (asserting it is one) into [`Client::welcome`].
    pub async fn read_welcome(&mut self) -> &Value {
        let w = self.recv().await;
        assert_eq!(w["op"], "welcome", "{w}");
        self.welcome = w;
        &self.welcome
    }

    /// Sends a text frame as it is.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends a JSON value as it is (its `id` too, if any).
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a command with the next id of this client (set in `cmd`); returns the id.
    pub async fn command(&mut self, mut cmd: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        cmd["id"] = json!(id);
        self.send_json(&cmd).await;
        id
    }

    /// Sends a command with the next id and waits ([`WITHIN`]) for the reply with
    /// that id; messages that arrive meanwhile are kept for
    /// [`Client::next_message`].
    pub async fn call(&mut self, cmd: Value) -> Value {
        let id = self.command(cmd).await;
        self.reply(id).await
    }

    /// Sends a text frame as it is and returns the next frame, which must be JSON.
    pub async fn call_text(&mut self, text: &str) -> Value {
        self.send_text(text).await;
        self.recv().await
    }

    /// Waits ([`WITHIN`]) for the reply with `id`, keeping messages for
    /// [`Client::next_message`] and skipping other frames.
    pub async fn reply(&mut self, id: u64) -> Value {
        let fut = async {
            loop {
                let v = self
                    .read_json()
                    .await
                    .expect("connection ended before the reply");
                if v["id"] == json!(id) {
                    return v;
                }
                if v["op"] == "message" {
                    self.backlog.push_back(v);
                }
            }
        };
        tokio::time::timeout(WITHIN, fut)
            .await
            .expect("reply in time")
    }

    /// Subscribes (next id) and asserts the reply says `subscribed`.
    pub async fn subscribe(&mut self, topics: &[&str]) {
        let r = self.call(json!({"op":"subscribe","topics":topics})).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }

    /// Subscribes with `id`; the very next frame must be the `subscribed` reply.
    pub async fn subscribe_with_id(&mut self, id: u64, topics: &[&str]) {
        self.send_json(&json!({"op":"subscribe","id":id,"topics":topics}))
            .await;
        let r = self.recv().await;
        assert_eq!(r["op"], "subscribed", "{r}");
        assert_eq!(r["id"], id);
    }

    /// Unsubscribes (next id) and asserts the reply says `unsubscribed`.
    pub async fn unsubscribe(&mut self, topics: &[&str]) {
        let r = self.call(json!({"op":"unsubscribe","topics":topics})).await;
        assert_eq!(r["op"], "unsubscribed", "{r}");
    }

    /// The next text frame as JSON, within [`WITHIN`]; panics on anything else
    /// (pings and pongs are skipped).
    pub async fn recv(&mut self) -> Value {
        match self.frame(WITHIN).await {
            Received::Json(v) => v,
            Received::Binary(b) => panic!("unexpected binary frame {b:?}"),
            Received::Close(c) => panic!("closed with {c}"),
        }
    }

    /// The next frame within `within` (pings and pongs skipped); panics when none
    /// comes or the connection ends without a close frame.
    pub async fn frame(&mut self, within: Duration) -> Received {
        let next = tokio::time::timeout(within, self.next_received())
            .await
            .expect("a frame in time");
        next.expect("a frame before the connection ended")
    }

    /// Waits ([`WITHIN`]) for the close frame, skipping everything else; its code
    /// (1005 when it carries none), or `None` if the connection just ended.
    pub async fn expect_close(&mut self) -> Option<u16> {
        let fut = async {
            loop {
                match self.next_received().await? {
                    Received::Close(code) => return Some(code),
                    _ => continue,
                }
            }
        };
        tokio::time::timeout(WITHIN, fut)
            .await
            .expect("timed out waiting for close")
    }

    /// The next `message` frame within `within` (replies skipped), or `None`.
    pub async fn next_message(&mut self, within: Duration) -> Option<Value> {
        if let Some(v) = self.backlog.pop_front() {
            return Some(v);
        }
        let fut = async {
            loop {
                let v = self.read_json().await?;
                if v["op"] == "message" {
                    return Some(v);
                }
            }
        };
        tokio::time::timeout(within, fut).await.ok().flatten()
    }

    /// The next JSON frame of any kind (replies included) within `within`, or `None`
    /// (nothing came, or the connection ended).
    pub async fn next_json(&mut self, within: Duration) -> Option<Value> {
        tokio::time::timeout(within, self.read_json())
            .await
            .ok()
            .flatten()
    }

    /// Whether the connection still answers a ping command with a pong.
    pub async fn alive(&mut self) -> bool {
        let id = self.command(json!({"op":"ping"})).await;
        let fut = async {
            loop {
                match self.read_json().await {
                    None => return false,
                    Some(v) if v["id"] == json!(id) => return v["op"] == "pong",
                    Some(_) => continue,
                }
            }
        };
        tokio::time::timeout(WITHIN, fut).await.unwrap_or(false)
    }

    /// The next frame, pings and pongs skipped; `None` when the connection ended
    /// (or failed) without a close frame.
    async fn next_received(&mut self) -> Option<Received> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => {
                    return Some(Received::Json(
                        serde_json::from_str(&t).expect("the server sent JSON"),
                    ))
                }
                Ok(Message::Binary(b)) => return Some(Received::Binary(b.to_vec())),
                Ok(Message::Close(f)) => {
                    return Some(Received::Close(f.map_or(1005, |f| u16::from(f.code))))
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// The next JSON frame, skipping other frames; `None` when the connection ended.
    async fn read_json(&mut self) -> Option<Value> {
        loop {
            match self.next_received().await? {
                Received::Json(v) => return Some(v),
                Received::Close(_) => return None,
                Received::Binary(_) => continue,
            }
        }
    }
}

/// A WebSocket handshake on a plain TCP stream, then nothing: the stream is left
/// right after the `101` response head, for tests that write frames by hand.
pub async fn raw_connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(WITHIN, raw_handshake(addr))
        .await
        .expect("a handshake response in time")
}

async fn raw_handshake(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Byte by byte, so no frame bytes are consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// A client frame: `FIN` as given, no reserved bits, masked with a fixed key, in
/// the shortest length encoding (7 bits, 16 bits, 64 bits).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        n @ 0..=125 => f.push(0x80 | n as u8),
        n @ 126..=0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one server frame (unmasked, as servers send) within [`WITHIN`]:
/// `(opcode, payload)`.
pub async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    tokio::time::timeout(WITHIN, read_frame_now(s))
        .await
        .expect("a frame in time")
}

async fn read_frame_now(s: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.unwrap();
    let len = match h[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.unwrap();
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.unwrap();
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p).await.unwrap();
    (h[0] & 0x0f, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmasked(frame: &[u8], header: usize) -> Vec<u8> {
        let mask = &frame[header..header + 4];
        frame[header + 4..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect()
    }

    #[test]
    fn client_frames_are_masked_in_every_length_encoding() {
        let f = client_frame(true, 0x1, b"hi");
        assert_eq!(&f[..2], &[0x81, 0x80 | 2]);
        assert_eq!(unmasked(&f, 2), b"hi");
        assert_ne!(&f[6..], b"hi", "masked on the wire");
        let f = client_frame(false, 0x0, &[7; 300]);
        assert_eq!(&f[..4], &[0x00, 0x80 | 126, 1, 44]);
        assert_eq!(unmasked(&f, 4), vec![7; 300]);
        let f = client_frame(true, 0x2, &[9; 70_000]);
        assert_eq!(&f[..2], &[0x82, 0x80 | 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        assert_eq!(unmasked(&f, 10), vec![9; 70_000]);
    }

    #[tokio::test]
    async fn server_frames_are_read_in_every_length_encoding() {
        let mut bytes = vec![0x81, 2, b'o', b'k'];
        bytes.extend([0x82, 126, 1, 0]);
        bytes.extend([5; 256]);
        bytes.extend([0x88, 127, 0, 0, 0, 0, 0, 0, 0, 2, 3, 0xe8]);
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).await, (1, b"ok".to_vec()));
        assert_eq!(read_frame(&mut r).await, (2, vec![5; 256]));
        assert_eq!(read_frame(&mut r).await, (8, vec![3, 0xe8]));
        assert!(r.is_empty());
    }
}
