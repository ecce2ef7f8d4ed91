//! permessage-deflate (RFC 7692) for publications: a frame compressed once and
//! shared by every connection that negotiated the extension.
//!
//! One compressed frame can serve every such connection because the gateway always
//! negotiates `server_no_context_takeover`: each message is compressed on its own,
//! from an empty window, so nothing of a connection's earlier messages is needed to
//! inflate it. The payload is raw DEFLATE with the final empty stored block
//! (`00 00 ff ff`) stripped (§7.2.1), in a frame with RSV1 set.
//!
//! A frame is compressed by the first connection that needs it
//! ([`crate::Publication::deflated_frame`]), at most once per publication: nothing
//! is spent on publications that no compressing connection receives, nor on topics
//! whose namespace turns compression off, nor on payloads under [`MIN_PAYLOAD`].
//! What was compressed, and how long it took, is counted in [`stats`].

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, FlushCompress, Status};

use crate::frame;

/// Payloads shorter than this are sent uncompressed (RSV1 clear) even to
/// compressing connections: below it DEFLATE saves too few bytes to pay for the
/// CPU (docs/benchmarks.md, "permessage-deflate").
pub const MIN_PAYLOAD: usize = 256;

/// The compression level (zlib's scale). A frame is compressed once and sent to
/// every compressing subscriber, so a good ratio is worth more than speed.
const LEVEL: u32 = 6;

/// RSV1: "this message is compressed" (RFC 7692 §6).
pub const RSV1: u8 = 0x40;

/// The empty stored block a sync flush ends with, removed from the wire form.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

thread_local! {
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::new(LEVEL), false));
}

static BYTES_IN: AtomicU64 = AtomicU64::new(0);
static BYTES_OUT: AtomicU64 = AtomicU64::new(0);
static NANOS: AtomicU64 = AtomicU64::new(0);

/// What this process has compressed so far.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Frame bytes handed to the compressor (headers included).
    pub bytes_in: u64,
    /// Frame bytes it produced (headers included; a frame that would not shrink
    /// counts as its uncompressed self).
    pub bytes_out: u64,
    /// Time spent compressing, in nanoseconds.
    pub nanos: u64,
}

/// What this process has compressed so far (for the metrics).
pub fn stats() -> Stats {
    Stats {
        bytes_in: BYTES_IN.load(Ordering::Relaxed),
        bytes_out: BYTES_OUT.load(Ordering::Relaxed),
        nanos: NANOS.load(Ordering::Relaxed),
    }
}

/// The payload of a complete, unmasked, final server frame, and its opcode.
pub(crate) fn split(frame: &[u8]) -> (u8, &[u8]) {
    let opcode = frame[0] & 0x0F;
    let at = match frame[1] & 0x7F {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    (opcode, &frame[at..])
}

/// Compresses `payload` as one permessage-deflate message: raw DEFLATE from an
/// empty window, sync-flushed, the trailing `00 00 ff ff` removed.
pub fn compress(payload: &[u8]) -> Vec<u8> {
    COMPRESSOR.with_borrow_mut(|c| {
        c.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let before = c.total_in() as usize;
            let status = c
                .compress_vec(&payload[before..], &mut out, FlushCompress::Sync)
                .expect("compressing into a vector cannot fail");
            let done = c.total_in() as usize == payload.len()
                && out.len() < out.capacity()
                && status != Status::BufError;
            if done {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        out
    })
}

/// The compressed form of a complete, final, unmasked server frame: RSV1 set and
/// the payload compressed; `frame` itself when compression would not make it
/// smaller.
pub fn deflate_frame(frame: &Bytes) -> Bytes {
    let started = Instant::now();
    let (opcode, payload) = split(frame);
    let packed = compress(payload);
    let out = if frame::header_len(packed.len()) + packed.len() < frame.len() {
        let mut buf = BytesMut::with_capacity(frame::header_len(packed.len()) + packed.len());
        frame::put_header(&mut buf, opcode, packed.len());
        buf[0] |= RSV1;
        buf.put_slice(&packed);
        buf.freeze()
    } else {
        frame.clone()
    };
    BYTES_IN.fetch_add(frame.len() as u64, Ordering::Relaxed);
    BYTES_OUT.fetch_add(out.len() as u64, Ordering::Relaxed);
    NANOS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(data: &[u8]) -> Vec<u8> {
        let mut input = data.to_vec();
        input.extend_from_slice(&TAIL);
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    #[test]
    fn a_compressed_frame_inflates_to_the_payload() {
        let payload =
            br#"{"op":"message","topic":"t","data":{"price":1.5,"price2":1.5,"price3":1.5}}"#
                .repeat(20);
        let plain = frame::text(&payload);
        let packed = deflate_frame(&plain);
        assert_eq!(packed[0], 0x80 | RSV1 | frame::op::TEXT);
        assert!(packed.len() < plain.len() / 4, "{} bytes", packed.len());
        let (_, body) = split(&packed);
        assert!(!body.ends_with(&TAIL), "the tail is stripped");
        assert_eq!(inflate(body), payload);
        // From an empty window every time: the same bytes, however often.
        assert_eq!(deflate_frame(&plain), packed);
    }

    #[test]
    fn an_incompressible_frame_stays_as_it_is() {
        let plain = frame::text(b"\"x\"");
        assert_eq!(deflate_frame(&plain), plain);
        assert_eq!(plain[0] & RSV1, 0);
    }

    #[test]
    fn large_payloads_use_extended_lengths() {
        let payload: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_string().into_bytes())
            .collect();
        let packed = compress(&payload);
        assert_eq!(inflate(&packed), payload);
    }
}
