//! Message reassembly: fragments into whole messages, inflated when compressed
//! (permessage-deflate).

use bytes::Bytes;
use wsgate_fanout::frame::op;

use super::deflate::inflate;
use super::read::Frame;
use crate::close::Disconnect;

/// Reassembles fragmented messages, enforcing the size limit on the whole message
/// (the frame reader only bounds single frames) and validating UTF-8 as fragments
/// arrive.
pub(crate) struct Assembler {
    /// The largest message, in bytes (`u32`: every idle session holds one).
    max: u32,
    buf: Vec<u8>,
    opcode: Option<u8>,
    /// Bytes of `buf` known to be valid UTF-8 (text messages).
    checked: usize,
    /// The message being assembled is compressed: `buf` holds DEFLATE data, bounded
    /// like a message, inflated (within the limit) when the last fragment arrives.
    compressed: bool,
}

/// A whole client message.
pub(crate) enum Message {
    Text(Bytes),
    Binary(Bytes),
}

impl Assembler {
    pub(crate) fn new(max: usize) -> Self {
        Assembler {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            buf: Vec::new(),
            opcode: None,
            checked: 0,
            compressed: false,
        }
    }

    pub(crate) fn push(&mut self, frame: Frame) -> Result<Option<Message>, Disconnect> {
        match (frame.opcode, self.opcode) {
            (op::TEXT | op::BINARY, Some(_)) => Err(Disconnect::ProtocolError),
            (op::CONTINUATION, None) => Err(Disconnect::ProtocolError),
            (opcode @ (op::TEXT | op::BINARY), None) if frame.fin && frame.compressed => {
                let payload = inflate(&frame.payload, self.max as usize)?;
                finish(opcode, payload).map(Some)
            }
            (op::TEXT, None) if frame.fin => {
                // The reader has validated UTF-8 of unfragmented text.
                Ok(Some(Message::Text(Bytes::from(frame.payload))))
            }
            (op::BINARY, None) if frame.fin => {
                Ok(Some(Message::Binary(Bytes::from(frame.payload))))
            }
            (opcode @ (op::TEXT | op::BINARY), None) => {
                self.opcode = Some(opcode);
                self.compressed = frame.compressed;
                self.append(&frame.payload)?;
                Ok(None)
            }
            (op::CONTINUATION, Some(opcode)) => {
                self.append(&frame.payload)?;
                if !frame.fin {
                    return Ok(None);
                }
                self.opcode = None;
                self.checked = 0;
                let mut buf = std::mem::take(&mut self.buf);
                if std::mem::take(&mut self.compressed) {
                    buf = inflate(&buf, self.max as usize)?;
                }
                finish(opcode, buf).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn append(&mut self, data: &[u8]) -> Result<(), Disconnect> {
        if self.buf.len() + data.len() > self.max as usize {
            return Err(Disconnect::TooBig);
        }
        self.buf.extend_from_slice(data);
        if self.opcode == Some(op::TEXT) && !self.compressed {
            // Fail fast on invalid UTF-8; an incomplete sequence at the end may be
            // completed by the next fragment.
            match std::str::from_utf8(&self.buf[self.checked..]) {
                Ok(_) => self.checked = self.buf.len(),
                Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
                Err(_) => return Err(Disconnect::InvalidUtf8),
            }
        }
        Ok(())
    }
}

/// A whole message's payload as a message: text must be UTF-8.
fn finish(opcode: u8, payload: Vec<u8>) -> Result<Message, Disconnect> {
    match opcode {
        op::TEXT => {
            if std::str::from_utf8(&payload).is_err() {
                return Err(Disconnect::InvalidUtf8);
            }
            Ok(Message::Text(Bytes::from(payload)))
        }
        _ => Ok(Message::Binary(Bytes::from(payload))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgate_fanout::deflate::compress;

    fn f(fin: bool, opcode: u8, payload: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            compressed: false,
            payload: payload.to_vec(),
        }
    }

    fn z(fin: bool, opcode: u8, payload: &[u8]) -> Frame {
        Frame {
            compressed: true,
            ..f(fin, opcode, payload)
        }
    }

    #[test]
    fn compressed_messages_are_inflated_whole_or_fragmented() {
        let text = "héllo ".repeat(100);
        let packed = compress(text.as_bytes());
        let mut a = Assembler::new(1000);
        assert_eq!(text_of(a.push(z(true, op::TEXT, &packed)).unwrap()), text);
        let (x, y) = packed.split_at(packed.len() / 2);
        assert!(a.push(z(false, op::TEXT, x)).unwrap().is_none());
        assert_eq!(text_of(a.push(f(true, op::CONTINUATION, y)).unwrap()), text);
        // The next message is plain again.
        assert_eq!(
            text_of(a.push(f(true, op::TEXT, b"plain")).unwrap()),
            "plain"
        );
        // Inflated past the limit: 1009, however small the compressed message.
        let mut a = Assembler::new(599);
        assert!(matches!(
            a.push(z(true, op::BINARY, &packed)),
            Err(Disconnect::TooBig)
        ));
        // Inflated text is held to UTF-8.
        let mut a = Assembler::new(1000);
        assert!(matches!(
            a.push(z(true, op::TEXT, &compress(&[b'a', 0xff]))),
            Err(Disconnect::InvalidUtf8)
        ));
    }

    fn text_of(m: Option<Message>) -> String {
        text(m)
    }

    fn text(m: Option<Message>) -> String {
        match m {
            Some(Message::Text(t)) => String::from_utf8(t.to_vec()).unwrap(),
            Some(Message::Binary(_)) => panic!("binary"),
            None => panic!("no message yet"),
        }
    }

    #[test]
    fn whole_frames_pass_through_and_fragments_are_joined() {
        let mut a = Assembler::new(100);
        assert_eq!(text(a.push(f(true, op::TEXT, b"hi")).unwrap()), "hi");
        assert!(a.push(f(false, op::TEXT, b"he")).unwrap().is_none());
        assert!(a.push(f(false, op::CONTINUATION, b"ll")).unwrap().is_none());
        assert_eq!(
            text(a.push(f(true, op::CONTINUATION, b"o")).unwrap()),
            "hello"
        );
        assert!(a.push(f(false, op::BINARY, &[1, 2])).unwrap().is_none());
        match a.push(f(true, op::CONTINUATION, &[3])).unwrap() {
            Some(Message::Binary(b)) => assert_eq!(&b[..], &[1, 2, 3]),
            _ => panic!("a binary message"),
        }
        // Ready for the next message, with nothing left over.
        assert_eq!(text(a.push(f(true, op::TEXT, b"next")).unwrap()), "next");
    }

    #[test]
    fn fragmentation_rules_are_enforced() {
        let mut a = Assembler::new(100);
        assert!(matches!(
            a.push(f(true, op::CONTINUATION, b"x")),
            Err(Disconnect::ProtocolError)
        ));
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, b"a")).unwrap();
        assert!(
            matches!(
                a.push(f(true, op::TEXT, b"b")),
                Err(Disconnect::ProtocolError)
            ),
            "a new message inside a fragmented one"
        );
    }

    #[test]
    fn the_limit_applies_to_the_whole_message() {
        let mut a = Assembler::new(10);
        a.push(f(false, op::BINARY, &[0; 6])).unwrap();
        assert!(matches!(
            a.push(f(true, op::CONTINUATION, &[0; 5])),
            Err(Disconnect::TooBig)
        ));
        let mut a = Assembler::new(10);
        a.push(f(false, op::BINARY, &[0; 6])).unwrap();
        assert!(a
            .push(f(true, op::CONTINUATION, &[0; 4]))
            .unwrap()
            .is_some());
    }

    #[test]
    fn utf8_fails_fast_but_may_split_across_fragments() {
        let e = "é".as_bytes();
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, &[b'a', e[0]])).unwrap();
        assert_eq!(
            text(a.push(f(true, op::CONTINUATION, &[e[1]])).unwrap()),
            "aé"
        );
        let mut a = Assembler::new(100);
        assert!(matches!(
            a.push(f(false, op::TEXT, &[b'a', 0xff])),
            Err(Disconnect::InvalidUtf8)
        ));
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, &[e[0]])).unwrap();
        assert!(
            matches!(
                a.push(f(true, op::CONTINUATION, b"")),
                Err(Disconnect::InvalidUtf8)
            ),
            "a sequence cut at the end of the message"
        );
    }

    #[test]
    fn control_frames_between_fragments_leave_the_message_intact() {
        let mut a = Assembler::new(100);
        assert!(a.push(f(false, op::TEXT, b"he")).unwrap().is_none());
        for control in [op::PING, op::PONG] {
            assert!(
                a.push(f(true, control, b"ctl")).unwrap().is_none(),
                "a control frame is no message"
            );
        }
        assert!(a.push(f(false, op::CONTINUATION, b"ll")).unwrap().is_none());
        assert!(a.push(f(true, op::PING, b"")).unwrap().is_none());
        assert_eq!(
            text(a.push(f(true, op::CONTINUATION, b"o")).unwrap()),
            "hello",
            "control payloads are not part of the message"
        );
    }

    #[test]
    fn a_new_data_frame_is_refused_inside_either_kind_of_message() {
        for (first, second) in [
            (op::TEXT, op::BINARY),
            (op::BINARY, op::TEXT),
            (op::BINARY, op::BINARY),
        ] {
            for fin in [false, true] {
                let mut a = Assembler::new(100);
                a.push(f(false, first, b"a")).unwrap();
                assert!(
                    matches!(a.push(f(fin, second, b"b")), Err(Disconnect::ProtocolError)),
                    "{second} (fin {fin}) inside {first}"
                );
            }
        }
        // A continuation after a finished message has nothing to continue.
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, b"a")).unwrap();
        a.push(f(true, op::CONTINUATION, b"b")).unwrap();
        assert!(matches!(
            a.push(f(false, op::CONTINUATION, b"c")),
            Err(Disconnect::ProtocolError)
        ));
    }

    #[test]
    fn empty_fragments_and_empty_messages() {
        let mut a = Assembler::new(100);
        assert!(a.push(f(false, op::TEXT, b"")).unwrap().is_none());
        assert!(a.push(f(false, op::CONTINUATION, b"")).unwrap().is_none());
        assert_eq!(text(a.push(f(true, op::CONTINUATION, b"")).unwrap()), "");
        assert!(a.push(f(false, op::BINARY, b"")).unwrap().is_none());
        match a.push(f(true, op::CONTINUATION, b"")).unwrap() {
            Some(Message::Binary(b)) => assert!(b.is_empty()),
            _ => panic!("an empty binary message"),
        }
    }

    #[test]
    fn the_limit_counts_every_fragment_and_starts_over_per_message() {
        let mut a = Assembler::new(10);
        for _ in 0..3 {
            // Ten one-byte fragments reach the limit exactly, every time.
            a.push(f(false, op::TEXT, b"a")).unwrap();
            for _ in 0..8 {
                assert!(a.push(f(false, op::CONTINUATION, b"b")).unwrap().is_none());
            }
            assert_eq!(
                text(a.push(f(true, op::CONTINUATION, b"c")).unwrap()),
                "abbbbbbbbc"
            );
        }
        // One byte over, in a fragment that is not the last: refused at once.
        a.push(f(false, op::TEXT, &[b'x'; 10])).unwrap();
        assert!(matches!(
            a.push(f(false, op::CONTINUATION, b"y")),
            Err(Disconnect::TooBig)
        ));
        // A single fragment over the limit on its own.
        let mut a = Assembler::new(10);
        assert!(matches!(
            a.push(f(false, op::BINARY, &[0; 11])),
            Err(Disconnect::TooBig)
        ));
    }

    #[test]
    fn utf8_is_checked_in_every_fragment_not_only_the_last() {
        // Valid start, then a bad byte in a middle fragment: refused at once.
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, b"ab")).unwrap();
        assert!(matches!(
            a.push(f(false, op::CONTINUATION, &[0xC3, 0x28])),
            Err(Disconnect::InvalidUtf8)
        ));
        // A sequence started in one fragment and broken in the next.
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, &[b'a', 0xE2])).unwrap();
        assert!(matches!(
            a.push(f(false, op::CONTINUATION, &[0x82, b'x'])),
            Err(Disconnect::InvalidUtf8)
        ));
        // A UTF-16 surrogate (ED A0 80) is not UTF-8, split or not.
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, &[0xED])).unwrap();
        assert!(matches!(
            a.push(f(true, op::CONTINUATION, &[0xA0, 0x80])),
            Err(Disconnect::InvalidUtf8)
        ));
    }

    #[test]
    fn a_four_byte_character_may_be_cut_into_single_bytes() {
        let crab = "🦀".as_bytes();
        assert_eq!(crab.len(), 4);
        let mut a = Assembler::new(100);
        a.push(f(false, op::TEXT, &[b'<', crab[0]])).unwrap();
        a.push(f(false, op::CONTINUATION, &crab[1..2])).unwrap();
        a.push(f(false, op::CONTINUATION, &crab[2..3])).unwrap();
        a.push(f(false, op::CONTINUATION, &[crab[3], b'>', crab[0]]))
            .unwrap();
        assert_eq!(
            text(a.push(f(true, op::CONTINUATION, &crab[1..])).unwrap()),
            "<🦀>🦀"
        );
    }

    #[test]
    fn binary_messages_are_not_held_to_utf8() {
        let mut a = Assembler::new(100);
        a.push(f(false, op::BINARY, &[0xFF, 0xC3])).unwrap();
        a.push(f(false, op::CONTINUATION, &[0x28, 0xED])).unwrap();
        match a.push(f(true, op::CONTINUATION, &[0xA0])).unwrap() {
            Some(Message::Binary(b)) => assert_eq!(&b[..], &[0xFF, 0xC3, 0x28, 0xED, 0xA0]),
            _ => panic!("a binary message"),
        }
    }
}
