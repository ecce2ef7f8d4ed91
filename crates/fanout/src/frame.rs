//! Server → client WebSocket frames (RFC 6455 §5.2).
//!
//! Server frames are never masked, so a frame's bytes do not depend on the
//! connection: that is what lets a publication be encoded once and shared by every
//! subscriber. Frames here are always final (FIN set); we never fragment.

use bytes::{BufMut, Bytes, BytesMut};

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

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
    buf.put_u8(0x80 | opcode);
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
    encode(OP_TEXT, payload)
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
    encode(OP_CLOSE, &payload)
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
    fn close_frame_is_bounded() {
        let f = close(4008, &"é".repeat(200));
        assert_eq!(f[0], 0x88);
        assert!(f[1] as usize <= 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4008);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
