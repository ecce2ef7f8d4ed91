//! WebSocket opcodes, and server → client frames (RFC 6455 §5.2).
//!
//! The opcodes are defined here, once, for both directions (the gateway's frame
//! reader uses them too): this is the lowest crate that encodes frames, because the
//! node encodes each publication into its frame once.
//!
//! Server frames are never masked, so a frame's bytes do not depend on the
//! connection: that is what lets a publication be encoded once and shared by every
//! subscriber. Frames here are always final (FIN set); we never fragment.

use bytes::{BufMut, Bytes, BytesMut};

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod op {
    /// A continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// A text frame (UTF-8).
    pub const TEXT: u8 = 0x1;
    /// A binary frame.
    pub const BINARY: u8 = 0x2;
    /// A close frame.
    pub const CLOSE: u8 = 0x8;
    /// A ping frame.
    pub const PING: u8 = 0x9;
    /// A pong frame.
    pub const PONG: u8 = 0xA;
}

/// The first header byte of a final frame with `opcode`.
const fn fin(opcode: u8) -> u8 {
    0x80 | opcode
}

/// A complete ping frame without payload: what the heartbeat sends, shared, static.
pub static EMPTY_PING: [u8; 2] = [fin(op::PING), 0];

/// Length of the header of an unmasked frame carrying `payload_len` bytes.
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes the header of a final, unmasked frame.
pub fn put_header(buf: &mut BytesMut, opcode: u8, payload_len: usize) {
    buf.put_u8(fin(opcode));
    match payload_len {
        0..=125 => buf.put_u8(payload_len as u8),
        126..=65535 => {
            buf.put_u8(126);
            buf.put_u16(payload_len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(payload_len as u64);
        }
    }
}

/// A complete frame with the given opcode and payload.
pub fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// A complete text frame.
pub fn text(payload: &[u8]) -> Bytes {
    encode(op::TEXT, payload)
}

/// A close frame with a status code and a (truncated to fit) UTF-8 reason.
pub fn close(code: u16, reason: &str) -> Bytes {
    // Control frame payloads are at most 125 bytes: 2 for the code, 123 for the reason.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(op::CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_encodings() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let f = text(&[b'a'; 126]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        assert_eq!(f.len(), 4 + 126);
        let f = text(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        assert_eq!(f.len(), 10 + 70_000);
    }

    #[test]
    fn the_static_ping_is_an_empty_ping() {
        assert_eq!(&EMPTY_PING[..], &encode(op::PING, b"")[..]);
        assert_eq!(EMPTY_PING, [0x89, 0x00]);
    }

    #[test]
    fn close_frame_is_bounded() {
        let f = close(4008, &"é".repeat(200));
        assert_eq!(f[0], 0x88);
        assert!(f[1] as usize <= 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4008);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
