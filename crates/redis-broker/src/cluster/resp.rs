//! A minimal RESP2 client for the cluster relay's own connections.
//!
//! Why not the `redis` crate's connections: its pub/sub connection has no
//! `SSUBSCRIBE`, and cluster mode needs to see every reply as it is — a `-MOVED` for
//! one command of a pipeline, a `sunsubscribe` the *server* pushes when a slot
//! leaves a node — which a general-purpose client hides or treats as an error of the
//! whole connection. RESP2 is five frame types; this module parses them from a
//! buffer (no allocation per nested array beyond the values) and writes commands.
//!
//! Connections are opened in one place, [`open`], so transport options (TLS) are
//! added there only.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// How long opening a connection (TCP + `AUTH`) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

impl Value {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bulk(b) => Some(b),
            Value::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// Malformed input from the server: the connection cannot be trusted any more.
#[derive(Debug)]
pub struct ProtocolError(pub String);

/// Parses one complete frame from the start of `buf`: `Ok(None)` when more bytes are
/// needed, else the value and the number of bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut pos = 0;
    match parse_at(buf, &mut pos, 0)? {
        Some(v) => Ok(Some((v, pos))),
        None => Ok(None),
    }
}

/// Nesting deeper than this is not something Redis sends (`CLUSTER SLOTS` is 3).
const MAX_DEPTH: usize = 8;
/// Larger than any bulk string Redis allows (`proto-max-bulk-len` is 512 MB).
const MAX_BULK: usize = 512 * 1024 * 1024;

fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = &buf[*pos..];
    let end = memchr_crlf(rest)?;
    *pos += end + 2;
    Some(&rest[..end])
}

fn memchr_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn number(line: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ProtocolError(format!("bad number {:?}", String::from_utf8_lossy(line))))
}

fn parse_at(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Value>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("reply nested too deep".into()));
    }
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let Some(head) = line(buf, pos) else {
        return Ok(None);
    };
    let text = || String::from_utf8_lossy(head).into_owned();
    Ok(Some(match kind {
        b'+' => Value::Simple(text()),
        b'-' => Value::Error(text()),
        b':' => Value::Int(number(head)?),
        b'$' => {
            let n = number(head)?;
            if n < 0 {
                return Ok(Some(Value::Nil));
            }
            let n = n as usize;
            if n > MAX_BULK {
                return Err(ProtocolError("bulk string too long".into()));
            }
            if buf.len() < *pos + n + 2 {
                return Ok(None);
            }
            let v = buf[*pos..*pos + n].to_vec();
            *pos += n + 2;
            Value::Bulk(v)
        }
        b'*' => {
            let n = number(head)?;
            if n < 0 {
                return Ok(Some(Value::Nil));
            }
            let mut items = Vec::with_capacity((n as usize).min(1024));
            for _ in 0..n {
                match parse_at(buf, pos, depth + 1)? {
                    Some(v) => items.push(v),
                    None => return Ok(None),
                }
            }
            Value::Array(items)
        }
        other => {
            return Err(ProtocolError(format!(
                "unexpected reply type byte {other:#x}"
            )))
        }
    }))
}

/// Appends `args` as one RESP command (an array of bulk strings) to `out`.
pub fn encode<A: AsRef<[u8]>>(out: &mut Vec<u8>, args: &[A]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Any byte stream a connection can run on (plain TCP today).
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// The read half of a connection, with its buffer.
pub struct Reader {
    io: ReadHalf<Box<dyn Transport>>,
    buf: Vec<u8>,
    start: usize,
}

impl Reader {
    /// The next reply.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes read stay in the buffer for the next call.
    pub async fn next(&mut self) -> std::io::Result<Value> {
        loop {
            match parse(&self.buf[self.start..]) {
                Ok(Some((v, used))) => {
                    self.start += used;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    return Ok(v);
                }
                Ok(None) => {}
                Err(ProtocolError(e)) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                }
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // Into spare capacity: no zeroing per read.
            self.buf.reserve(64 * 1024);
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The write half of a connection.
pub struct Writer {
    io: WriteHalf<Box<dyn Transport>>,
}

impl Writer {
    /// Writes already encoded commands.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}

/// Credentials sent with `AUTH` on every new connection (from the seed URL).
#[derive(Clone, Default)]
pub struct Auth {
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Opens a connection to `host:port` and authenticates it.
///
/// # Errors
/// Connect failure or timeout, or a refused `AUTH`.
pub async fn open(host: &str, port: u16, auth: &Auth) -> std::io::Result<(Reader, Writer)> {
    let connect = async {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Transport> = Box::new(tcp);
        let (r, w) = tokio::io::split(stream);
        let mut reader = Reader {
            io: r,
            buf: Vec::new(),
            start: 0,
        };
        let mut writer = Writer { io: w };
        if let Some(password) = &auth.password {
            let mut cmd = Vec::new();
            match &auth.username {
                Some(user) => encode(&mut cmd, &["AUTH", user, password]),
                None => encode(&mut cmd, &["AUTH", password]),
            }
            writer.send(&cmd).await?;
            if let Value::Error(e) = reader.next().await? {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!("AUTH refused: {e}"),
                ));
            }
        }
        Ok((reader, writer))
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_frame_type_and_waits_for_more() {
        let input = b"+OK\r\n-MOVED 1 127.0.0.1:7000\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$8\r\nsmessage\r\n*1\r\n:1\r\n";
        let mut pos = 0;
        let mut got = Vec::new();
        while let Some((v, used)) = parse(&input[pos..]).unwrap() {
            got.push(v);
            pos += used;
        }
        assert_eq!(pos, input.len());
        assert_eq!(
            got,
            vec![
                Value::Simple("OK".into()),
                Value::Error("MOVED 1 127.0.0.1:7000".into()),
                Value::Int(42),
                Value::Bulk(b"abc".to_vec()),
                Value::Nil,
                Value::Array(vec![
                    Value::Bulk(b"smessage".to_vec()),
                    Value::Array(vec![Value::Int(1)])
                ]),
            ]
        );
        // Every strict prefix of a frame is "need more", never an error.
        let frame = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        for cut in 0..frame.len() {
            assert!(parse(&frame[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert!(parse(frame).unwrap().is_some());
        assert!(parse(b"?x\r\n").is_err());
    }

    #[test]
    fn encodes_commands() {
        let mut out = Vec::new();
        encode(&mut out, &["SPUBLISH", "ch", ""]);
        assert_eq!(out, b"*3\r\n$8\r\nSPUBLISH\r\n$2\r\nch\r\n$0\r\n\r\n");
    }
}
