//! permessage-deflate (RFC 7692): the handshake's negotiation and the inflation of
//! compressed client messages. Publications are compressed in
//! [`wsgate_fanout::deflate`], once per node.
//!
//! # What is negotiated
//! The first offer the gateway can accept is accepted with
//! `server_no_context_takeover` and `client_no_context_takeover`, whatever the offer
//! asked for (§7.1.1.1 and §7.1.1.2 allow both in any response):
//! - `server_no_context_takeover` makes every compressed server message
//!   independent of the connection's earlier ones, which is what lets one
//!   compressed frame serve every subscriber;
//! - `client_no_context_takeover` does the same for the client's messages, so a
//!   connection keeps no inflate state (a 32 KiB window and zlib's state) between
//!   messages: each message is inflated, whole, by a per-thread inflater.
//!
//! `client_max_window_bits` (with or without a value) is accepted and left out of
//! the response: a 15-bit inflate window reads any smaller one. An offered
//! `server_max_window_bits` below 15 is accepted and echoed; publications are
//! compressed with a 15-bit window, so such a connection is sent uncompressed
//! messages (RSV1 clear is always allowed). An offer with an unknown or repeated
//! parameter, or a bad value, is declined (§5): the next offer is tried, and
//! without one the connection is served uncompressed. Nothing here refuses a
//! handshake.

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};
use http::header::SEC_WEBSOCKET_EXTENSIONS;
use http::{HeaderMap, HeaderValue};

use crate::close::Disconnect;

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";

/// The empty stored block a sender's sync flush ends with and removes (§7.2.2):
/// put back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What a connection negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Deflate {
    /// permessage-deflate is in use: the client may send compressed messages.
    pub on: bool,
    /// Publications may be sent compressed (the client did not ask for a window
    /// smaller than the shared frames use).
    pub send: bool,
}

/// One accepted offer: what the connection uses and the response's header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    pub deflate: Deflate,
    pub response: HeaderValue,
}

/// A window-bits value: a decimal 8 to 15, maybe quoted (§7.1.2.1 allows a
/// quoted-string of the same).
fn window_bits(v: &str) -> Option<u8> {
    let v = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v);
    if v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// One offer's parameters (after the name); `None` when it must be declined.
fn accept_offer<'a>(params: impl Iterator<Item = &'a str>) -> Option<Accepted> {
    let mut seen = [false; 4];
    let mut server_bits = None;
    for p in params {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (p.trim(), None),
        };
        let i = match key {
            "server_no_context_takeover" | "client_no_context_takeover" => {
                if value.is_some() {
                    return None;
                }
                if key.starts_with("server") {
                    0
                } else {
                    1
                }
            }
            "server_max_window_bits" => {
                server_bits = Some(window_bits(value?)?);
                2
            }
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[i], true) {
            return None;
        }
    }
    let mut response = format!("{NAME}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some(Accepted {
        deflate: Deflate {
            on: true,
            send: server_bits.is_none_or(|b| b == 15),
        },
        response: HeaderValue::from_str(&response).expect("a valid header value"),
    })
}

/// The first acceptable permessage-deflate offer of a handshake's
/// `Sec-WebSocket-Extensions` headers, if any.
pub(crate) fn negotiate(headers: &HeaderMap) -> Option<Accepted> {
    headers
        .get_all(SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|offer| {
            let mut parts = offer.split(';');
            let name = parts.next()?.trim();
            if !name.eq_ignore_ascii_case(NAME) {
                return None;
            }
            accept_offer(parts.filter(|p| !p.trim().is_empty()))
        })
}

thread_local! {
    /// Raw DEFLATE, 15-bit window (reads any smaller one); reset per message.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Inflates one compressed message (its frames' payloads, joined), refusing to
/// produce more than `max` bytes: a message that would is [`Disconnect::TooBig`]
/// (1009) as soon as the output passes the limit, so a small compressed message
/// cannot make the gateway allocate more than `max`. Data that is not DEFLATE is
/// [`Disconnect::ProtocolError`] (1002).
pub(crate) fn inflate(data: &[u8], max: usize) -> Result<Vec<u8>, Disconnect> {
    INFLATER.with_borrow_mut(|d| {
        d.reset(false);
        let mut out = Vec::with_capacity((data.len() * 4).max(64).min(max.saturating_add(1)));
        // The message, then the tail the sender removed.
        for input in [data, &TAIL[..]] {
            let start = d.total_in();
            loop {
                let used = (d.total_in() - start) as usize;
                let status = d
                    .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
                    .map_err(|_| Disconnect::ProtocolError)?;
                if out.len() > max {
                    return Err(Disconnect::TooBig);
                }
                let used = (d.total_in() - start) as usize;
                let full = out.len() == out.capacity();
                if status == Status::StreamEnd {
                    // A final block: a later message could not follow it; whatever
                    // comes after it is not ours to read.
                    return Ok(out);
                }
                if used == input.len() && !full {
                    break;
                }
                if full {
                    if out.len() == max.saturating_add(1) {
                        return Err(Disconnect::TooBig);
                    }
                    // Grow, never past one byte over the limit.
                    let want = out.capacity().saturating_mul(2).min(max.saturating_add(1));
                    out.reserve_exact(want - out.len());
                } else if status == Status::BufError {
                    return Err(Disconnect::ProtocolError);
                }
            }
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wsgate_fanout::deflate::compress;

    fn offer(v: &str) -> Option<Accepted> {
        let mut h = HeaderMap::new();
        h.insert(SEC_WEBSOCKET_EXTENSIONS, HeaderValue::from_str(v).unwrap());
        negotiate(&h)
    }

    fn response(v: &str) -> Option<String> {
        offer(v).map(|a| a.response.to_str().unwrap().to_string())
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn offers_are_accepted_with_both_no_context_takeovers() {
        assert_eq!(response("permessage-deflate").as_deref(), Some(BOTH));
        assert_eq!(
            response("permessage-deflate; client_max_window_bits").as_deref(),
            Some(BOTH)
        );
        assert_eq!(
            response("permessage-deflate; client_max_window_bits=10; server_no_context_takeover")
                .as_deref(),
            Some(BOTH)
        );
        let a = offer("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(
            a.response.to_str().unwrap(),
            format!("{BOTH}; server_max_window_bits=10")
        );
        assert_eq!(
            a.deflate,
            Deflate {
                on: true,
                send: false
            }
        );
        let a = offer("permessage-deflate; server_max_window_bits=\"15\"").unwrap();
        assert_eq!(
            a.deflate,
            Deflate {
                on: true,
                send: true
            }
        );
    }

    #[test]
    fn bad_offers_are_declined_and_the_next_one_tried() {
        for bad in [
            "permessage-deflate; foo",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        assert_eq!(
            response("permessage-deflate; foo, permessage-deflate; client_max_window_bits")
                .as_deref(),
            Some(BOTH)
        );
        assert_eq!(negotiate(&HeaderMap::new()), None);
    }

    #[test]
    fn inflates_what_was_compressed() {
        let text = br#"{"op":"publish","topic":"t","data":"hello hello hello"}"#.repeat(50);
        assert_eq!(inflate(&compress(&text), 1 << 20).unwrap(), text);
        assert_eq!(inflate(&compress(b""), 10).unwrap(), b"");
        // Exactly at the limit is fine.
        assert_eq!(inflate(&compress(&text), text.len()).unwrap(), text);
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 50 << 20];
        let bomb = compress(&zeros);
        assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
        assert_eq!(inflate(&bomb, 64 << 10), Err(Disconnect::TooBig));
        assert_eq!(inflate(&bomb, (50 << 20) - 1), Err(Disconnect::TooBig));
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff, 0x12], 100),
            Err(Disconnect::ProtocolError)
        );
    }
}
