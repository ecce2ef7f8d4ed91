//! Message reassembly: fragments into whole messages.

use bytes::Bytes;
use wsgate_fanout::frame::op;

use super::read::Frame;
use crate::close::Disconnect;

/// Reassembles fragmented messages, enforcing the size limit on the whole message
/// (the frame reader only bounds single frames) and validating UTF-8 as fragments
/// arrive.
pub(crate) struct Assembler {
    max: usize,
    buf: Vec<u8>,
    opcode: Option<u8>,
    /// Bytes of `buf` known to be valid UTF-8 (text messages).
    checked: usize,
}

/// A whole client message.
pub(crate) enum Message {
    Text(Bytes),
    Binary(Bytes),
}

impl Assembler {
    pub(crate) fn new(max: usize) -> Self {
        Assembler {
            max,
            buf: Vec::new(),
            opcode: None,
            checked: 0,
        }
    }

    pub(crate) fn push(&mut self, frame: Frame) -> Result<Option<Message>, Disconnect> {
        match (frame.opcode, self.opcode) {
            (op::TEXT | op::BINARY, Some(_)) => Err(Disconnect::ProtocolError),
            (op::CONTINUATION, None) => Err(Disconnect::ProtocolError),
            (op::TEXT, None) if frame.fin => {
                // The reader has validated UTF-8 of unfragmented text.
                Ok(Some(Message::Text(Bytes::from(frame.payload))))
            }
            (op::BINARY, None) if frame.fin => {
                Ok(Some(Message::Binary(Bytes::from(frame.payload))))
            }
            (opcode @ (op::TEXT | op::BINARY), None) => {
                self.opcode = Some(opcode);
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
                let buf = std::mem::take(&mut self.buf);
                match opcode {
                    op::TEXT => {
                        if std::str::from_utf8(&buf).is_err() {
                            return Err(Disconnect::InvalidUtf8);
                        }
                        Ok(Some(Message::Text(Bytes::from(buf))))
                    }
                    _ => Ok(Some(Message::Binary(Bytes::from(buf)))),
                }
            }
            _ => Ok(None),
        }
    }

    fn append(&mut self, data: &[u8]) -> Result<(), Disconnect> {
        if self.buf.len() + data.len() > self.max {
            return Err(Disconnect::TooBig);
        }
        self.buf.extend_from_slice(data);
        if self.opcode == Some(op::TEXT) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn f(fin: bool, opcode: u8, payload: &[u8]) -> Frame {
        Frame {
            fin,
            opcode,
            payload: payload.to_vec(),
        }
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
}
