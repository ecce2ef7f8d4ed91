//! Opening connections: source-address spreading, the open-file limit, and a lean
//! client WebSocket handshake.
//!
//! One destination port accepts at most ~28,000 concurrent connections from one
//! source address (the ephemeral port range). Each socket is therefore bound to the
//! next address of `--source-addrs` (127.0.0.2, .3, …: all of 127/8 is local) with
//! `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the port at connect time per
//! 4-tuple instead of reserving one per source address at bind time.
//!
//! The handshake is written by hand instead of going through hyper: it is one
//! request and one response head, and keeping the plain `TcpStream` under the
//! reader ([`crate::wsconn`], no boxed upgrade stream) keeps both the connect rate and the cost per
//! delivery low. The response head is consumed with `peek` + exact `read`, so the
//! first WebSocket frames that follow it in the same segment stay in the socket.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use base64::Engine as _;
use nix::sys::socket::{setsockopt, sockopt::IpBindAddressNoPort};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// A parsed `ws://host:port/path` (or `http://…` for the publish API).
#[derive(Debug, Clone)]
pub struct Url {
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Url {
    /// Parses and resolves a `ws://` or `http://` URL (no TLS: loopback only).
    pub fn parse(s: &str) -> Result<Url> {
        let rest = s
            .strip_prefix("ws://")
            .or_else(|| s.strip_prefix("http://"))
            .with_context(|| format!("{s}: only ws:// and http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let addr = authority
            .to_socket_addrs()
            .with_context(|| format!("{s}: cannot resolve {authority}"))?
            .next()
            .with_context(|| format!("{s}: {authority} resolves to nothing"))?;
        Ok(Url {
            authority: authority.to_string(),
            addr,
            path: path.to_string(),
        })
    }
}

/// Parses `127.0.0.2-127.0.0.9` or `127.0.0.2,127.0.0.3` (or a mix).
pub fn parse_source_addrs(s: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b): (std::net::Ipv4Addr, std::net::Ipv4Addr) = (
                a.parse().with_context(|| format!("bad address {a}"))?,
                b.parse().with_context(|| format!("bad address {b}"))?,
            );
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_536 {
                bail!("bad address range {part}");
            }
            out.extend((a..=b).map(|n| IpAddr::V4(n.into())));
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad address {part}"))?,
            );
        }
    }
    Ok(out)
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024),
    }
}

/// Opens TCP connections, round-robin over the source addresses.
#[derive(Debug, Default)]
pub struct Dialer {
    sources: Vec<IpAddr>,
    next: AtomicUsize,
}

impl Dialer {
    /// A dialer over `sources` (empty: let the kernel choose).
    pub fn new(sources: Vec<IpAddr>) -> Self {
        Dialer {
            sources,
            next: AtomicUsize::new(0),
        }
    }

    /// Connects to `addr`, with a small receive buffer when `rcvbuf` is set (slow
    /// consumers use that so the server feels their backpressure quickly).
    pub async fn dial(&self, addr: SocketAddr, rcvbuf: Option<u32>) -> std::io::Result<TcpStream> {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(n) = rcvbuf {
            sock.set_recv_buffer_size(n)?;
        }
        if !self.sources.is_empty() {
            let i = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.len();
            setsockopt(&sock, IpBindAddressNoPort, &true).map_err(std::io::Error::from)?;
            sock.bind(SocketAddr::new(self.sources[i], 0))?;
        }
        let stream = sock.connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Why a connection attempt failed, for the failure table of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    Connect,
    Handshake,
    Subscribe,
    Timeout,
}

impl Failure {
    /// The key used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Handshake => "handshake",
            Failure::Subscribe => "subscribe",
            Failure::Timeout => "timeout",
        }
    }
}

/// A refused upgrade that said when to come back: HTTP 503 `overloaded` (the node's
/// `--upgrade-rate`), with `retry_after_ms` in its body or `Retry-After` (seconds).
#[derive(Debug, Clone, Copy)]
pub struct Overloaded(pub Duration);

impl std::fmt::Display for Overloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "handshake refused: HTTP 503 overloaded, retry after {:?}",
            self.0
        )
    }
}

impl std::error::Error for Overloaded {}

/// The wait a 503's head (`Retry-After`, seconds) and body (`retry_after_ms`) ask for.
fn retry_after(headers: &[httparse::Header<'_>], body: &[u8]) -> Option<Duration> {
    let from_body = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["retry_after_ms"].as_u64())
        .map(Duration::from_millis);
    from_body.or_else(|| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .map(Duration::from_secs)
    })
}

static COMPRESSION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes every handshake offer permessage-deflate (`--compression`).
pub fn set_compression(on: bool) {
    COMPRESSION.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether handshakes offer permessage-deflate (and compressed messages are inflated).
pub fn compression() -> bool {
    COMPRESSION.load(std::sync::atomic::Ordering::Relaxed)
}

/// Performs the client handshake on `stream` for `url`; returns the stream positioned
/// at the first WebSocket frame (read it with [`crate::wsconn::WsConn`]).
///
/// # Errors
/// Any I/O error, a status other than 101, or a wrong `Sec-WebSocket-Accept`. A 503
/// that says when to retry is an [`Overloaded`] (`downcast_ref` it).
pub async fn handshake_stream(mut stream: TcpStream, url: &Url) -> Result<TcpStream> {
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let offer = if compression() {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
        url.path, url.authority
    );
    stream.write_all(req.as_bytes()).await?;

    let mut buf = [0u8; 4096];
    let head_len = loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            bail!("connection closed during the handshake");
        }
        if let Some(i) = memchr::memmem::find(&buf[..n], b"\r\n\r\n") {
            break i + 4;
        }
        if n == buf.len() {
            bail!("handshake response head over {} bytes", buf.len());
        }
        // The head arrived in pieces (rare): `peek` would return the same bytes at
        // once, so wait a little for the rest instead of spinning.
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    stream.read_exact(&mut buf[..head_len]).await?;

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&buf[..head_len])
        .context("bad handshake response")?;
    if resp.code == Some(503) {
        let len = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| {
                std::str::from_utf8(h.value)
                    .ok()?
                    .trim()
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0)
            .min(4096);
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        if let Some(wait) = retry_after(resp.headers, &body) {
            return Err(Overloaded(wait).into());
        }
    }
    if resp.code != Some(101) {
        bail!("handshake refused: HTTP {}", resp.code.unwrap_or(0));
    }
    let accept = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|h| h.value)
        .context("no Sec-WebSocket-Accept")?;
    if accept != expected_accept(&key).as_bytes() {
        bail!("wrong Sec-WebSocket-Accept");
    }
    Ok(stream)
}

/// `base64(sha1(key + GUID))` as RFC 6455 §4.2.2 defines it.
fn expected_accept(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

/// Appends one masked client frame (`opcode` 1 text, 2 binary) to `out`.
///
/// Building frames into one buffer lets a publisher write a whole batch with one
/// syscall instead of one per frame.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65_536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask: [u8; 4] = rand::random();
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    fastwebsockets::unmask(&mut out[start..], mask);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_503_hint_comes_from_the_body_else_retry_after() {
        let h = [httparse::Header {
            name: "Retry-After",
            value: b"2",
        }];
        let body = br#"{"error":"overloaded","message":"m","retry_after_ms":1234}"#;
        assert_eq!(retry_after(&h, body), Some(Duration::from_millis(1234)));
        assert_eq!(retry_after(&h, b""), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&[], br#"{"error":"draining"}"#), None);
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            expected_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn source_address_lists_and_ranges() {
        let v = parse_source_addrs("127.0.0.2-127.0.0.4, 127.0.0.9").unwrap();
        let s: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        assert_eq!(s, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"]);
        assert!(parse_source_addrs("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_addrs("").unwrap().is_empty());
    }

    #[test]
    fn frames_are_masked_and_unmask_back() {
        for len in [5usize, 200, 70_000] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            push_frame(&mut out, 1, &payload);
            let (hlen, mask_at) = match len {
                0..=125 => (2, 2),
                126..=65_535 => (4, 4),
                _ => (10, 10),
            };
            assert_eq!(out[0], 0x81);
            assert_eq!(out.len(), hlen + 4 + len);
            let mask: [u8; 4] = out[mask_at..mask_at + 4].try_into().unwrap();
            let mut body = out[hlen + 4..].to_vec();
            fastwebsockets::unmask(&mut body, mask);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn urls() {
        let u = Url::parse("ws://127.0.0.1:8080/ws?x=1").unwrap();
        assert_eq!(u.path, "/ws?x=1");
        assert_eq!(u.authority, "127.0.0.1:8080");
        assert_eq!(Url::parse("ws://127.0.0.1:4222").unwrap().path, "/");
        assert!(Url::parse("wss://127.0.0.1:1/").is_err());
    }
}
