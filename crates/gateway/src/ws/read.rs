//! Reads client WebSocket frames (RFC 6455 §5) without holding a buffer while a
//! connection is idle.
//!
//! An idle connection is most connections: a reader that kept a read buffer of its
//! own (fastwebsockets keeps 8 KiB per connection for its whole life) would spend
//! more memory on nothing than everything else a session holds. Here a read goes
//! into a per-thread scratch buffer during a single `poll_read` call; whole frames
//! are copied out (unmasked) as owned payloads, and only the bytes of a frame not
//! complete yet stay with the connection ([`FrameReader::partial`], freed as soon as
//! it is consumed).
//!
//! This module does the framing only: reserved bits, opcodes, control-frame rules,
//! the size limit. What a frame means (pongs owed, close codes, UTF-8 of text) is
//! for [`super::message`], [`super::close`] and the session.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use wsgate_fanout::frame::op;

use crate::close::Disconnect;

/// Bytes read per `poll_read` (the scratch buffer of each thread).
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// One frame from the client, unmasked.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub fin: bool,
    pub opcode: u8,
    /// RSV1 on the first frame of a message: the message is compressed
    /// (permessage-deflate, only when negotiated).
    pub compressed: bool,
    pub payload: Vec<u8>,
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// The client broke the framing rules, or sent a frame over the limit.
    Protocol(Disconnect),
    /// The connection ended (EOF, also in the middle of a frame, or an I/O error).
    Gone,
}

/// The client's side of a connection, read frame by frame.
pub(crate) struct FrameReader<R> {
    io: R,
    /// The start of a frame not complete yet; empty (and unallocated) between frames.
    partial: Vec<u8>,
    /// The largest payload accepted, inclusive (`u32`: every idle session holds one).
    max_payload: u32,
    /// permessage-deflate was negotiated: RSV1 may be set on a message's first frame.
    deflate: bool,
}

/// What the first bytes of `buf` hold.
enum Parsed {
    /// A whole frame of `len` bytes (header included).
    Frame(Frame, usize),
    /// More bytes are needed; at least this many in all.
    Need(usize),
}

fn parse(buf: &[u8], max_payload: usize, deflate: bool) -> Result<Parsed, ReadError> {
    if buf.len() < 2 {
        return Ok(Parsed::Need(2));
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let compressed = b0 & 0x40 != 0;
    // RSV2 and RSV3 belong to no extension we negotiate; RSV1 is permessage-deflate's
    // and only on the first frame of a data message (RFC 7692 §6): never on a control
    // frame or a continuation, never without the extension.
    if b0 & 0x30 != 0 || (compressed && !(deflate && matches!(opcode, op::TEXT | op::BINARY))) {
        return Err(ReadError::Protocol(Disconnect::ProtocolError));
    }
    let control = opcode >= op::CLOSE;
    if !matches!(
        opcode,
        op::CONTINUATION | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG
    ) {
        return Err(ReadError::Protocol(Disconnect::ProtocolError));
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(Parsed::Need(4));
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(Parsed::Need(10));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if control && (!fin || len > 125) {
        // Control frames are never fragmented and carry at most 125 bytes (§5.5).
        return Err(ReadError::Protocol(Disconnect::ProtocolError));
    }
    if len > max_payload as u64 {
        return Err(ReadError::Protocol(Disconnect::TooBig));
    }
    let len = len as usize;
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(Parsed::Need(at + 4));
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        // RFC 6455 wants clients to mask; like the library this replaces, an unmasked
        // frame is accepted as it is.
        None
    };
    let total = at + len;
    if buf.len() < total {
        return Ok(Parsed::Need(total));
    }
    let mut payload = buf[at..total].to_vec();
    if let Some(mask) = mask {
        unmask(&mut payload, mask);
    }
    Ok(Parsed::Frame(
        Frame {
            fin,
            opcode,
            compressed,
            payload,
        },
        total,
    ))
}

/// XORs `data` with the repeating 4-byte `mask` (§5.3).
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(crate) fn new(io: R, max_payload: usize) -> Self {
        FrameReader {
            io,
            partial: Vec::new(),
            max_payload: u32::try_from(max_payload).unwrap_or(u32::MAX),
            deflate: false,
        }
    }

    /// Accepts compressed messages (RSV1 on a message's first frame): the connection
    /// negotiated permessage-deflate.
    pub(crate) fn with_deflate(mut self, on: bool) -> Self {
        self.deflate = on;
        self
    }

    /// Starts with `prefix`: bytes of the stream read before (what hyper read past
    /// the upgrade request). Copied, so that the buffer they came from is not kept.
    pub(crate) fn with_prefix(mut self, prefix: &[u8]) -> Self {
        self.partial = prefix.to_vec();
        self
    }

    /// Whether permessage-deflate was negotiated.
    pub(crate) fn deflates(&self) -> bool {
        self.deflate
    }

    /// The next frame (the tests' form of [`FrameReader::poll_next`]).
    #[cfg(test)]
    pub(crate) async fn next(&mut self) -> Result<Frame, ReadError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next frame.
    ///
    /// # Cancel safety
    /// Bytes read are parsed or kept before `Ready` is returned, so a caller that
    /// stops polling loses nothing and the next poll continues where it left off.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Frame, ReadError>> {
        loop {
            if !self.partial.is_empty() {
                match parse(&self.partial, self.max_payload as usize, self.deflate)? {
                    Parsed::Frame(frame, used) => {
                        self.partial.drain(..used);
                        if self.partial.is_empty() {
                            // Between frames a connection holds no buffer.
                            self.partial = Vec::new();
                        }
                        return Poll::Ready(Ok(frame));
                    }
                    Parsed::Need(n) => self.partial.reserve(n - self.partial.len()),
                }
            }
            let got = ready!(self.poll_read_some(cx))?;
            if let Some(frame) = got {
                return Poll::Ready(Ok(frame));
            }
        }
    }

    /// Reads what the socket has into the scratch buffer. If nothing was pending and
    /// the bytes start with a whole frame, returns it without copying the frame's
    /// bytes anywhere but into its payload; whatever else was read goes to `partial`.
    fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame>, ReadError>> {
        SCRATCH_BUF.with_borrow_mut(|scratch| {
            let mut rb = ReadBuf::new(&mut scratch[..]);
            match ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Poll::Ready(Ok(None)),
                Err(_) => return Poll::Ready(Err(ReadError::Gone)),
            }
            let data = rb.filled();
            if data.is_empty() {
                return Poll::Ready(Err(ReadError::Gone));
            }
            if self.partial.is_empty() {
                if let Parsed::Frame(frame, used) =
                    parse(data, self.max_payload as usize, self.deflate)?
                {
                    self.partial.extend_from_slice(&data[used..]);
                    return Poll::Ready(Ok(Some(frame)));
                }
            }
            self.partial.extend_from_slice(data);
            Poll::Ready(Ok(None))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgate_testkit::ws::client_frame;

    async fn read_all(bytes: Vec<u8>, max: usize) -> (Vec<Frame>, ReadError) {
        let mut r = FrameReader::new(&bytes[..], max);
        let mut frames = Vec::new();
        loop {
            match r.next().await {
                Ok(f) => frames.push(f),
                Err(e) => return (frames, e),
            }
        }
    }

    #[tokio::test]
    async fn the_prefix_is_read_first_and_may_end_mid_frame() {
        // What hyper read past the upgrade: a whole frame and the start of the next.
        let mut all = client_frame(true, op::TEXT, b"one");
        let cut = all.len() + 3;
        all.extend(client_frame(true, op::TEXT, b"two"));
        let mut r = FrameReader::new(&all[cut..], 100).with_prefix(&all[..cut]);
        assert_eq!(r.next().await.unwrap().payload, b"one");
        assert_eq!(r.next().await.unwrap().payload, b"two");
        assert_eq!(r.next().await, Err(ReadError::Gone));
    }

    #[tokio::test]
    async fn frames_of_every_length_encoding_arrive_unmasked() {
        let big = vec![7u8; 70_000];
        let mut bytes = client_frame(true, op::TEXT, b"hello");
        bytes.extend(client_frame(true, op::BINARY, &[1u8; 300]));
        bytes.extend(client_frame(false, op::TEXT, b"frag"));
        bytes.extend(client_frame(true, op::PING, b""));
        bytes.extend(client_frame(true, op::CONTINUATION, &big));
        let (frames, end) = read_all(bytes, 100_000).await;
        assert_eq!(end, ReadError::Gone);
        let summary: Vec<(bool, u8, usize)> = frames
            .iter()
            .map(|f| (f.fin, f.opcode, f.payload.len()))
            .collect();
        assert_eq!(
            summary,
            [
                (true, op::TEXT, 5),
                (true, op::BINARY, 300),
                (false, op::TEXT, 4),
                (true, op::PING, 0),
                (true, op::CONTINUATION, 70_000)
            ]
        );
        assert_eq!(frames[0].payload, b"hello");
        assert!(frames[4].payload.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn byte_by_byte_delivery_gives_the_same_frames() {
        let mut bytes = client_frame(true, op::TEXT, b"{\"op\":\"ping\"}");
        bytes.extend(client_frame(true, op::PONG, b"xy"));
        let (a, b) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let mut a = a;
            for byte in bytes {
                a.write_all(&[byte]).await.unwrap();
            }
        });
        let mut r = FrameReader::new(b, 1000);
        assert_eq!(r.next().await.unwrap().payload, b"{\"op\":\"ping\"}");
        let pong = r.next().await.unwrap();
        assert_eq!(
            (pong.opcode, pong.payload.as_slice()),
            (op::PONG, &b"xy"[..])
        );
        assert!(r.partial.capacity() == 0, "no buffer kept between frames");
        writer.await.unwrap();
        assert_eq!(r.next().await, Err(ReadError::Gone));
    }

    #[tokio::test]
    async fn framing_violations_are_refused() {
        let protocol = ReadError::Protocol(Disconnect::ProtocolError);
        let mut rsv = client_frame(true, op::TEXT, b"x");
        rsv[0] |= 0x40;
        let mut bad_op = client_frame(true, op::TEXT, b"x");
        bad_op[0] = 0x83;
        for (bytes, want) in [
            (rsv, protocol.clone()),
            (bad_op, protocol.clone()),
            (client_frame(false, op::PING, b""), protocol.clone()),
            (client_frame(true, op::PONG, &[0; 126]), protocol.clone()),
            (
                client_frame(true, op::TEXT, &[0; 101]),
                ReadError::Protocol(Disconnect::TooBig),
            ),
        ] {
            let (frames, end) = read_all(bytes, 100).await;
            assert!(frames.is_empty());
            assert_eq!(end, want);
        }
        // RSV1 is permessage-deflate's: refused without it, and with it on control
        // frames and continuations.
        let mut rsv1 = client_frame(true, op::TEXT, b"x");
        rsv1[0] |= 0x40;
        let (frames, end) = read_all(rsv1.clone(), 100).await;
        assert_eq!((frames.len(), end), (0, protocol.clone()));
        let mut r = FrameReader::new(&rsv1[..], 100).with_deflate(true);
        assert!(r.next().await.unwrap().compressed);
        for (fin, opcode) in [
            (true, op::PING),
            (true, op::CLOSE),
            (true, op::CONTINUATION),
        ] {
            let mut f = client_frame(fin, opcode, b"");
            f[0] |= 0x40;
            let mut r = FrameReader::new(&f[..], 100).with_deflate(true);
            assert_eq!(r.next().await, Err(protocol.clone()), "opcode {opcode}");
        }
        let mut rsv2 = client_frame(true, op::TEXT, b"x");
        rsv2[0] |= 0x20;
        let mut r = FrameReader::new(&rsv2[..], 100).with_deflate(true);
        assert_eq!(r.next().await, Err(protocol.clone()));
        // Exactly at the limit is fine; EOF inside a frame is the client gone.
        let (frames, _) = read_all(client_frame(true, op::TEXT, &[b'a'; 100]), 100).await;
        assert_eq!(frames.len(), 1);
        let mut cut = client_frame(true, op::TEXT, b"abcdef");
        cut.truncate(5);
        assert_eq!(read_all(cut, 100).await, (vec![], ReadError::Gone));
    }

    #[test]
    fn unmask_matches_bytewise_xor() {
        let mask = [1, 2, 3, 4];
        let mut data: Vec<u8> = (0..11).collect();
        let want: Vec<u8> = data
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        unmask(&mut data, mask);
        assert_eq!(data, want);
    }
}
