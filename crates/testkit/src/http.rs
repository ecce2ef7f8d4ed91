//! A minimal HTTP/1.1 client, one request per connection (`Connection: close`):
//! enough for the publish API and the admin endpoints, and raw requests for tests
//! that look at exact status lines and headers.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a response may take.
const RESPONSE_WITHIN: Duration = Duration::from_secs(10);

fn request_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> String {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// `(status, body)` of a whole response (0 when there is no status line); a chunked
/// body is decoded.
fn split_response(bytes: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
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

/// Sends a request with exactly `headers` (plus `Host`, `Content-Length` and
/// `Connection: close`); `(status, body)`, or the connection's error.
pub async fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request_text(addr, method, path, headers, body).as_bytes())
        .await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    tokio::time::timeout(RESPONSE_WITHIN, s.read_to_end(&mut out))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no response in 10 s"))??;
    match split_response(&out) {
        (0, _) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("no status line in {:?}", String::from_utf8_lossy(&out)),
        )),
        ok => Ok(ok),
    }
}

/// Like [`try_request`], panicking on a connection error.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    try_request(addr, method, path, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// A request with a JSON body (`Content-Type: application/json`), panicking on a
/// connection error.
pub async fn http_json(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    try_http_json(addr, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http_json`], with a connection error as an error (for servers still
/// starting).
pub async fn try_http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> io::Result<(u16, String)> {
    let json = [("Content-Type", "application/json")];
    try_request(addr, method, path, &json, body.as_bytes()).await
}

/// [`http_json`] without a runtime, for synchronous polling; `(0, "")` when the
/// connection fails.
pub fn blocking(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(RESPONSE_WITHIN)).unwrap();
    let json = [("Content-Type", "application/json")];
    let req = request_text(addr, method, path, &json, body.as_bytes()) + body;
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    split_response(&resp)
}

/// A WebSocket handshake request for `path` with extra header lines (each ending in
/// CRLF).
pub fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// Sends `request` as it is and returns the response: the head (status line and
/// headers) and the body as far as `Content-Length` says; for a `101`, the head only
/// (the socket stays open).
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

/// Parses a Prometheus exposition into `series → value` (`name{labels}` as written).
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

/// A value from [`parse_metrics`] (0 when absent).
pub fn val(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_split_and_chunks_decode() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(split_response(plain), (200, "ok".into()));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(split_response(chunked), (404, "abcde".into()));
        assert_eq!(split_response(b""), (0, String::new()));
    }

    #[test]
    fn expositions_parse_by_series() {
        let m = parse_metrics("# HELP x\nx 1\ny{a=\"b c\"} 2.5\n\n");
        assert_eq!(val(&m, "x"), 1.0);
        assert_eq!(val(&m, "y{a=\"b c\"}"), 2.5);
        assert_eq!(val(&m, "z"), 0.0);
    }
}
