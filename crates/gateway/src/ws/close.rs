//! The close handshake's rules: what a client's close frame means, and what we answer.

use bytes::Bytes;
use wsgate_fanout::frame::{self, op};

use crate::close::Disconnect;

/// How a client's close frame (its payload) ends the session: the reason, and the
/// close frame we answer with (RFC 6455 §5.5.1, §7.4).
pub(crate) fn close_reply(payload: &[u8]) -> (Disconnect, Bytes) {
    match payload.len() {
        0 => (Disconnect::ClientClose, frame::encode(op::CLOSE, payload)),
        1 => {
            let reason = Disconnect::ProtocolError;
            (reason, frame::close(reason.code(), reason.reason()))
        }
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if std::str::from_utf8(&payload[2..]).is_err() {
                let reason = Disconnect::InvalidUtf8;
                return (reason, frame::close(reason.code(), reason.reason()));
            }
            // Codes a peer may send (§7.4.1–7.4.2): not 1004–1006, 1015, or unassigned.
            if matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999) {
                (Disconnect::ClientClose, frame::encode(op::CLOSE, payload))
            } else {
                let mut reply = 1002u16.to_be_bytes().to_vec();
                reply.extend_from_slice(&payload[2..]);
                (Disconnect::ProtocolError, frame::encode(op::CLOSE, &reply))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        p
    }

    /// The close code a reply frame carries (or `None` for an empty close).
    fn code_of(reply: &Bytes) -> Option<u16> {
        assert_eq!(reply[0], 0x80 | op::CLOSE);
        (reply[1] >= 2).then(|| u16::from_be_bytes([reply[2], reply[3]]))
    }

    #[test]
    fn a_valid_close_is_echoed() {
        for code in [1000, 1001, 1003, 1007, 1011, 3000, 4999] {
            let p = payload(code, b"bye");
            let (reason, reply) = close_reply(&p);
            assert_eq!(reason, Disconnect::ClientClose, "{code}");
            assert_eq!(&reply[2..], &p[..], "{code} echoed with its reason");
        }
        let (reason, reply) = close_reply(b"");
        assert_eq!(reason, Disconnect::ClientClose);
        assert_eq!(code_of(&reply), None, "an empty close gets an empty close");
    }

    #[test]
    fn codes_a_peer_may_not_send_are_a_protocol_error() {
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            let (reason, reply) = close_reply(&payload(code, b"x"));
            assert_eq!(reason, Disconnect::ProtocolError, "{code}");
            assert_eq!(code_of(&reply), Some(1002), "{code}");
        }
    }

    #[test]
    fn a_one_byte_payload_or_a_bad_reason_is_refused() {
        let (reason, reply) = close_reply(&[3]);
        assert_eq!(reason, Disconnect::ProtocolError);
        assert_eq!(code_of(&reply), Some(1002));
        let (reason, reply) = close_reply(&payload(1000, &[0xff, 0xfe]));
        assert_eq!(reason, Disconnect::InvalidUtf8);
        assert_eq!(code_of(&reply), Some(1007));
    }
}
