//! The client side of a WebSocket connection, made for reading many small frames
//! cheaply.
//!
//! A subscriber of the generator receives up to thousands of frames per second. This
//! reader does one `read` per wake-up into a buffer that holds many frames, then
//! parses every complete frame in it synchronously (no future per frame, no copy of
//! the payload), so the receive loop can take one clock reading per `read` and handle
//! the batch in a tight loop. [`WsConn::fill`] is the only await on the read side and
//! is cancel safe (bytes are either in the buffer or still in the socket), so the
//! reader may be raced against cancellation freely.
//!
//! Server frames are checked as RFC 6455 requires of a client: never masked, reserved
//! bits clear (but RSV1 on a message's first frame with `--compression`: the message
//! is inflated, permessage-deflate without context takeover), control frames final
//! and ≤ 125 bytes, continuation only inside a fragmented message. Fragmented
//! messages are reassembled.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;

use flate2::{Decompress, FlushDecompress};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::net::push_frame;

/// Opcodes (RFC 6455 §5.2).
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Read buffer to start with (the same as fastwebsockets' reader); it grows only for
/// a frame larger than itself.
const INITIAL_BUF: usize = 8 * 1024;
/// Largest message accepted from a server.
const MAX_MESSAGE: usize = 16 << 20;

/// One complete message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Where the last parsed frame's payload is (lets `next_frame` return a borrow
/// without holding one while parsing).
#[derive(Clone, Copy)]
enum Loc {
    Buf(usize, usize),
    Frag,
    Inflated,
}

thread_local! {
    /// Raw DEFLATE; reset per message (the gateway takes over no context).
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    /// Messages this thread inflated lately: compressed bytes → what they inflated to.
    static RECENT: RefCell<HashMap<Vec<u8>, Vec<u8>>> = RefCell::new(HashMap::new());
}

/// How many inflated messages a thread remembers before it starts over: a connection
/// that fell behind delivers dozens of publications in one read, so the copies of one
/// publication meet the thread interleaved with many others.
const KEEP: usize = 1024;

/// Inflates one permessage-deflate message into `out` (cleared first).
///
/// A node compresses a publication once and sends the same bytes to every
/// subscriber, so a thread reading many subscribers mostly meets bytes it inflated a
/// moment ago: those are answered from the result it kept (inflating is a pure
/// function of the bytes: the same output, without the generator's CPU becoming the
/// limit of a compressed fan-out run).
fn inflate(data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let hit = RECENT.with_borrow(|recent| match recent.get(data) {
        Some(output) => {
            out.clear();
            out.extend_from_slice(output);
            true
        }
        None => false,
    });
    if hit {
        return Ok(());
    }
    inflate_fresh(data, out)?;
    RECENT.with_borrow_mut(|recent| {
        if recent.len() >= KEEP {
            recent.clear();
        }
        recent.insert(data.to_vec(), out.clone());
    });
    Ok(())
}

fn inflate_fresh(data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    INFLATER.with_borrow_mut(|d| {
        d.reset(false);
        out.clear();
        out.reserve(data.len() * 4 + 64);
        for input in [data, &[0, 0, 0xff, 0xff][..]] {
            let start = d.total_in();
            loop {
                let used = (d.total_in() - start) as usize;
                d.decompress_vec(&input[used..], out, FlushDecompress::Sync)
                    .map_err(|_| protocol("bad compressed data"))?;
                if out.len() > MAX_MESSAGE {
                    return Err(protocol("message too large"));
                }
                if (d.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
                    break;
                }
                out.reserve(out.capacity());
            }
        }
        Ok(())
    })
}

/// A client WebSocket over a plain TCP stream, positioned after the handshake.
#[derive(Debug)]
pub struct WsConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// A fragmented message being reassembled: its opcode and bytes so far.
    frag_op: Option<u8>,
    frag: Vec<u8>,
    /// The fragmented message being reassembled is compressed.
    frag_compressed: bool,
    /// The last compressed message, inflated.
    inflated: Vec<u8>,
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

impl WsConn {
    /// Wraps a stream whose handshake is done.
    pub fn new(stream: TcpStream) -> Self {
        WsConn {
            stream,
            buf: vec![0; INITIAL_BUF],
            start: 0,
            end: 0,
            frag_op: None,
            frag: Vec::new(),
            frag_compressed: false,
            inflated: Vec::new(),
        }
    }

    /// Reads once from the socket into the buffer (making room first).
    ///
    /// # Errors
    /// I/O errors; `UnexpectedEof` when the server closed the connection.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn fill(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return self.fill_released().await;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A frame bigger than the buffer: grow (bounded by `parse`'s size check).
            let len = (self.buf.len() * 2).min(MAX_MESSAGE + 14).max(self.end + 1);
            self.buf.resize(len, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    /// Frees the read buffers when they hold nothing (no partial frame, no message
    /// being reassembled): a connection that waits between messages then holds no
    /// buffer. The next [`WsConn::fill`] waits for the socket to be readable first
    /// and only then takes a buffer for the read.
    pub fn release(&mut self) {
        if self.start == self.end && self.frag_op.is_none() {
            self.buf = Vec::new();
            self.frag = Vec::new();
            self.inflated = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// [`WsConn::fill`] after [`WsConn::release`]: waits for readiness without a
    /// buffer. Cancel safe (nothing is read before the last await).
    async fn fill_released(&mut self) -> io::Result<()> {
        loop {
            self.stream.readable().await?;
            let mut buf = vec![0; INITIAL_BUF];
            match self.stream.try_read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.buf = buf;
                    self.start = 0;
                    self.end = n;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The next complete frame already in the buffer, if any: a whole message (text
    /// or binary, reassembled if it was fragmented) or a control frame.
    ///
    /// # Errors
    /// A protocol violation by the server (the connection cannot go on).
    pub fn next_frame(&mut self) -> io::Result<Option<Frame<'_>>> {
        Ok(self.next_loc()?.map(|(op, loc)| self.frame_at(op, loc)))
    }

    fn next_loc(&mut self) -> io::Result<Option<(u8, Loc)>> {
        loop {
            match self.parse()? {
                None => return Ok(None),
                Some((op, Some(loc))) => return Ok(Some((op, loc))),
                Some((_, None)) => {}
            }
        }
    }

    fn frame_at(&self, opcode: u8, loc: Loc) -> Frame<'_> {
        let payload = match loc {
            Loc::Buf(a, b) => &self.buf[a..b],
            Loc::Frag => &self.frag[..],
            Loc::Inflated => &self.inflated[..],
        };
        Frame { opcode, payload }
    }

    /// Parses one frame header + payload from the buffer. `Some((op, None))` is a
    /// fragment that was absorbed into the reassembly buffer.
    fn parse(&mut self) -> io::Result<Option<(u8, Option<Loc>)>> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (avail[0], avail[1]);
        let compressed = b0 & 0x40 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x30 != 0
            || (compressed && !(crate::net::compression() && matches!(opcode, OP_TEXT | OP_BINARY)))
        {
            return Err(protocol("reserved bits set"));
        }
        if b1 & 0x80 != 0 {
            return Err(protocol("masked frame from the server"));
        }
        let fin = b0 & 0x80 != 0;
        let (len, head) = match b1 & 0x7F {
            126 => {
                if avail.len() < 4 {
                    return Ok(None);
                }
                (usize::from(u16::from_be_bytes([avail[2], avail[3]])), 4)
            }
            127 => {
                if avail.len() < 10 {
                    return Ok(None);
                }
                let n = u64::from_be_bytes(avail[2..10].try_into().expect("8 bytes"));
                (usize::try_from(n).unwrap_or(usize::MAX), 10)
            }
            n => (usize::from(n), 2),
        };
        if len > MAX_MESSAGE {
            return Err(protocol("frame too large"));
        }
        let control = opcode & 0x8 != 0;
        if control && (!fin || len > 125) {
            return Err(protocol("bad control frame"));
        }
        if avail.len() < head + len {
            return Ok(None);
        }
        let (a, b) = (self.start + head, self.start + head + len);
        self.start = b;
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => Ok(Some((opcode, Some(Loc::Buf(a, b))))),
            OP_TEXT | OP_BINARY if self.frag_op.is_some() => {
                Err(protocol("new message inside a fragmented one"))
            }
            OP_TEXT | OP_BINARY if fin && compressed => {
                inflate(&self.buf[a..b], &mut self.inflated)?;
                Ok(Some((opcode, Some(Loc::Inflated))))
            }
            OP_TEXT | OP_BINARY if fin => Ok(Some((opcode, Some(Loc::Buf(a, b))))),
            OP_TEXT | OP_BINARY => {
                self.frag_op = Some(opcode);
                self.frag_compressed = compressed;
                self.frag.clear();
                self.frag.extend_from_slice(&self.buf[a..b]);
                Ok(Some((opcode, None)))
            }
            OP_CONT => {
                let Some(op) = self.frag_op else {
                    return Err(protocol("continuation without a message"));
                };
                if self.frag.len() + len > MAX_MESSAGE {
                    return Err(protocol("message too large"));
                }
                self.frag.extend_from_slice(&self.buf[a..b]);
                if fin {
                    self.frag_op = None;
                    if std::mem::take(&mut self.frag_compressed) {
                        inflate(&self.frag, &mut self.inflated)?;
                        return Ok(Some((op, Some(Loc::Inflated))));
                    }
                    Ok(Some((op, Some(Loc::Frag))))
                } else {
                    Ok(Some((op, None)))
                }
            }
            _ => Err(protocol("unknown opcode")),
        }
    }

    /// The next message or control frame, reading as needed. Pings are answered
    /// (with a pong carrying their payload) before they are returned.
    ///
    /// # Errors
    /// As [`WsConn::fill`] and [`WsConn::next_frame`], and a failed pong.
    ///
    /// # Cancel safety
    /// Cancel safe except while a pong is being written (a pong may be lost).
    pub async fn read_frame(&mut self) -> io::Result<Frame<'_>> {
        loop {
            match self.next_loc()? {
                Some((OP_PING, loc)) => {
                    let ping = self.frame_at(OP_PING, loc).payload.to_vec();
                    self.send(OP_PONG, &ping).await?;
                    return Ok(self.frame_at(OP_PING, loc));
                }
                Some((op, loc)) => return Ok(self.frame_at(op, loc)),
                None => self.fill().await?,
            }
        }
    }

    /// Writes bytes that are already frames (e.g. a batch built with `push_frame`).
    ///
    /// # Errors
    /// I/O errors.
    pub async fn write_all(&mut self, frames: &[u8]) -> io::Result<()> {
        self.stream.write_all(frames).await
    }

    /// Sends one frame (masked, as a client must).
    ///
    /// # Errors
    /// I/O errors.
    ///
    /// # Cancel safety
    /// Not cancel safe: a cancelled call may have written part of the frame.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        push_frame(&mut out, opcode, payload);
        self.stream.write_all(&out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn server_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8]) {
        out.push(b0);
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=65535 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
    }

    async fn pair() -> (WsConn, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (WsConn::new(c), s)
    }

    #[tokio::test]
    async fn frames_cut_anywhere_reassembled_and_pings_answered() {
        let big = vec![b'b'; 70_000];
        let mut stream = Vec::new();
        server_frame(&mut stream, 0x81, b"hello");
        server_frame(&mut stream, 0x01, b"fra"); // text, not final
        server_frame(&mut stream, 0x89, b"p1"); // ping in the middle
        server_frame(&mut stream, 0x80, b"gment"); // final continuation
        server_frame(&mut stream, 0x82, &big);
        server_frame(&mut stream, 0x81, &[b'm'; 300]);
        server_frame(&mut stream, 0x88, &1000u16.to_be_bytes());
        let (mut ws, mut srv) = pair().await;
        let writer = tokio::spawn(async move {
            // Dribbled in small, uneven pieces.
            for chunk in stream.chunks(7) {
                srv.write_all(chunk).await.unwrap();
                srv.flush().await.unwrap();
            }
            let mut pong = [0u8; 8];
            srv.read_exact(&mut pong).await.unwrap();
            pong
        });
        let mut got = Vec::new();
        loop {
            let f = ws.read_frame().await.unwrap();
            got.push((f.opcode, f.payload.len(), f.payload.first().copied()));
            if f.opcode == OP_CLOSE {
                break;
            }
        }
        assert_eq!(
            got,
            [
                (OP_TEXT, 5, Some(b'h')),
                (OP_PING, 2, Some(b'p')),
                (OP_TEXT, 8, Some(b'f')),
                (OP_BINARY, 70_000, Some(b'b')),
                (OP_TEXT, 300, Some(b'm')),
                (OP_CLOSE, 2, Some(0x03)),
            ]
        );
        let pong = writer.await.unwrap();
        // A masked pong carrying "p1".
        assert_eq!((pong[0], pong[1]), (0x8A, 0x82));
        let mut body = pong[6..8].to_vec();
        fastwebsockets::unmask(&mut body, pong[2..6].try_into().unwrap());
        assert_eq!(body, b"p1");
    }

    #[tokio::test]
    async fn a_released_buffer_is_taken_again_for_the_next_read() {
        let (mut ws, mut srv) = pair().await;
        let mut first = Vec::new();
        server_frame(&mut first, 0x81, b"one");
        server_frame(&mut first, 0x81, b"two"); // cut below: not complete yet
        first.truncate(first.len() - 1);
        srv.write_all(&first).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, b"one");
        // A partial frame stays: nothing is released.
        ws.release();
        assert!(!ws.buf.is_empty());
        srv.write_all(b"o").await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, b"two");
        ws.release();
        assert!(ws.buf.is_empty());
        let mut next = Vec::new();
        server_frame(&mut next, 0x81, &[b'z'; 9000]);
        srv.write_all(&next).await.unwrap();
        assert_eq!(ws.read_frame().await.unwrap().payload, &[b'z'; 9000][..]);
        drop(srv);
        ws.release();
        assert_eq!(
            ws.read_frame().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[tokio::test]
    async fn compressed_messages_are_inflated() {
        use flate2::{Compress, Compression, FlushCompress};
        crate::net::set_compression(true);
        let text = b"{\"op\":\"message\",\"data\":\"abcabcabcabcabcabc\"}".repeat(20);
        let mut packed = Vec::with_capacity(text.len());
        Compress::new(Compression::default(), false)
            .compress_vec(&text, &mut packed, FlushCompress::Sync)
            .unwrap();
        packed.truncate(packed.len() - 4);
        let mut stream = Vec::new();
        server_frame(&mut stream, 0xC1, &packed);
        let (a, b) = packed.split_at(5);
        server_frame(&mut stream, 0x41, a);
        server_frame(&mut stream, 0x80, b);
        server_frame(&mut stream, 0x81, b"plain");
        let (mut ws, mut srv) = pair().await;
        srv.write_all(&stream).await.unwrap();
        for want in [&text[..], &text[..], b"plain"] {
            assert_eq!(ws.read_frame().await.unwrap().payload, want);
        }
    }

    #[test]
    fn repeated_messages_inflate_from_the_last_result_and_others_afresh() {
        use flate2::{Compress, Compression, FlushCompress};
        let pack = |text: &[u8]| {
            let mut packed = Vec::with_capacity(text.len() + 64);
            Compress::new(Compression::default(), false)
                .compress_vec(text, &mut packed, FlushCompress::Sync)
                .unwrap();
            packed.truncate(packed.len() - 4);
            packed
        };
        let (a, b) = (
            b"{\"k\":1,\"x\":\"aaaa\"}".repeat(9),
            b"{\"k\":2}".repeat(7),
        );
        let (pa, pb) = (pack(&a), pack(&b));
        let mut out = Vec::new();
        for (packed, want) in [(&pa, &a), (&pa, &a), (&pb, &b), (&pa, &a)] {
            inflate(packed, &mut out).unwrap();
            assert_eq!(out, *want);
        }
        assert!(inflate(&[0xff, 0xff, 0xff], &mut out).is_err(), "bad data");
        inflate(&pa, &mut out).unwrap();
        assert_eq!(out, a);
    }

    #[tokio::test]
    async fn protocol_violations_are_errors() {
        for bad in [
            vec![0x81u8, 0x81, 0, 0, 0, 0, b'x'], // masked
            vec![0xA1, 1, b'x'],                  // reserved bit (RSV2)
            vec![0x80, 1, b'x'],                  // continuation without a message
            vec![0x09, 0],                        // fragmented ping
        ] {
            let (mut ws, mut srv) = pair().await;
            srv.write_all(&bad).await.unwrap();
            assert!(ws.read_frame().await.is_err(), "{bad:?}");
        }
        let (mut ws, srv) = pair().await;
        drop(srv);
        assert_eq!(
            ws.read_frame().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
