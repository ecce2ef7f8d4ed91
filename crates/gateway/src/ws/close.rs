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

    /// The payload of a reply frame (server frames are unmasked, and a close frame's
    /// payload fits the one-byte length).
    fn payload_of(reply: &Bytes) -> &[u8] {
        assert!(reply[1] <= 125, "a control frame carries at most 125 bytes");
        assert_eq!(reply.len(), 2 + usize::from(reply[1]));
        &reply[2..]
    }

    #[test]
    fn the_edges_of_the_code_ranges() {
        for (code, valid) in [
            (1012, true),
            (1013, true),
            (1014, false),
            (1002, true),
            (1003, true),
            (2999, false),
            (3000, true),
            (4000, true),
            (4999, true),
            (5000, false),
            (u16::MAX, false),
        ] {
            let (reason, reply) = close_reply(&payload(code, b""));
            if valid {
                assert_eq!(reason, Disconnect::ClientClose, "{code}");
                assert_eq!(code_of(&reply), Some(code), "{code} echoed");
            } else {
                assert_eq!(reason, Disconnect::ProtocolError, "{code}");
                assert_eq!(code_of(&reply), Some(1002), "{code}");
            }
        }
    }

    #[test]
    fn a_code_alone_is_echoed_alone() {
        let (reason, reply) = close_reply(&payload(1001, b""));
        assert_eq!(reason, Disconnect::ClientClose);
        assert_eq!(payload_of(&reply), &1001u16.to_be_bytes());
    }

    #[test]
    fn the_longest_reason_is_echoed_whole() {
        // 2 bytes of code and 123 of reason: the most a control frame carries (longer
        // close frames never get here, the frame reader refuses them).
        let long = "é".repeat(61) + "!";
        assert_eq!(long.len(), 123);
        let p = payload(4321, long.as_bytes());
        let (reason, reply) = close_reply(&p);
        assert_eq!(reason, Disconnect::ClientClose);
        assert_eq!(payload_of(&reply), &p[..]);
    }

    #[test]
    fn a_refused_code_keeps_the_clients_reason() {
        let (reason, reply) = close_reply(&payload(1005, "nope ✓".as_bytes()));
        assert_eq!(reason, Disconnect::ProtocolError);
        let mut want = 1002u16.to_be_bytes().to_vec();
        want.extend_from_slice("nope ✓".as_bytes());
        assert_eq!(payload_of(&reply), &want[..]);
    }

    #[test]
    fn a_bad_reason_wins_over_a_bad_code_and_gets_our_own_reason() {
        for code in [1000, 1005, 5000] {
            // A reason cut inside a character is not UTF-8 either.
            let cut = &"é".as_bytes()[..1];
            let (reason, reply) = close_reply(&payload(code, cut));
            assert_eq!(reason, Disconnect::InvalidUtf8, "{code}");
            let mut want = 1007u16.to_be_bytes().to_vec();
            want.extend_from_slice(Disconnect::InvalidUtf8.reason().as_bytes());
            assert_eq!(payload_of(&reply), &want[..], "{code}");
        }
    }

    #[test]
    fn a_one_byte_payload_is_answered_with_our_protocol_error() {
        for byte in [0u8, 0x03, 0xE8, 0xFF] {
            let (reason, reply) = close_reply(&[byte]);
            assert_eq!(reason, Disconnect::ProtocolError);
            let mut want = 1002u16.to_be_bytes().to_vec();
            want.extend_from_slice(b"protocol error");
            assert_eq!(payload_of(&reply), &want[..], "{byte}");
        }
    }
}
