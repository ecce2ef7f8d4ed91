//! The payload every published message carries, and the fast scan that reads it back.
//!
//! A publication's `data` is `{"p":<publisher>,"s":<seq>,"t":<send time, ns since the
//! UNIX epoch>,"pad":"xx…"}`, padded so the object is the requested size (with
//! `--pad-text`, padded with quote-like text whose numbers vary from message to
//! message, which compresses about as well as typical JSON rather than as a run of
//! one letter). Subscribers
//! do not run a JSON parser per message: they look for the three keys with `memmem`,
//! which keeps the generator's cost per delivery low. Key order and spaces after the
//! colon do not matter, so a server that re-serializes the object (sorted keys,
//! pretty-printed) is still read correctly.

use std::io::Write as _;
use std::sync::LazyLock;

use memchr::memmem;

// Searchers built once: `memmem::find` would build one per call, per message.
static DATA: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(b"\"data\":"));
static KEY_P: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"p\":"));
static KEY_S: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"s\":"));
static KEY_T: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(b"\"t\":"));

/// What a subscriber learns from one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Global publisher index (unique over every generator process of the run).
    pub publisher: u32,
    /// Per-publisher sequence number, from 0, without gaps on the sending side.
    pub seq: u64,
    /// Send time in nanoseconds since the UNIX epoch (all processes share the clock).
    pub sent_ns: u64,
}

static PAD_TEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Pads payloads with varied text rather than `x` (`--pad-text`).
pub fn set_pad_text(on: bool) {
    PAD_TEXT.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Appends about `n` bytes of quote-like text (symbols, prices, volumes) whose
/// numbers depend on `seed`.
fn pad_text(buf: &mut Vec<u8>, seed: u64, n: usize) {
    const WORDS: [&str; 8] = ["bid", "ask", "last", "vol", "open", "high", "low", "chg"];
    let end = buf.len() + n;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0usize;
    while buf.len() < end {
        // xorshift64: cheap, deterministic per message.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let _ = write!(
            buf,
            "SYM{} {} {}.{:02} ; ",
            x % 500,
            WORDS[i % WORDS.len()],
            (x >> 20) % 1000,
            (x >> 40) % 100
        );
        i += 1;
    }
    buf.truncate(end);
}

/// Appends the JSON object for `stamp` to `buf`, padded with `x` so that the object
/// alone is `size` bytes long (or as short as possible when `size` is smaller).
pub fn encode(buf: &mut Vec<u8>, stamp: &Stamp, size: usize) {
    let start = buf.len();
    // Writing into a Vec cannot fail.
    let _ = write!(
        buf,
        "{{\"p\":{},\"s\":{},\"t\":{},\"pad\":\"",
        stamp.publisher, stamp.seq, stamp.sent_ns
    );
    let used = buf.len() - start + 2; // closing `"}`
    if PAD_TEXT.load(std::sync::atomic::Ordering::Relaxed) {
        pad_text(
            buf,
            stamp.seq ^ u64::from(stamp.publisher) << 48,
            size.saturating_sub(used),
        );
    } else {
        buf.resize(buf.len() + size.saturating_sub(used), b'x');
    }
    buf.extend_from_slice(b"\"}");
}

/// The fast path for the frame a subscriber sees most: wsgate's envelope around
/// our own payload, `{"op":"message","topic":"<t>","data":{"p":N,"s":N,"t":N,…`,
/// read in one pass. `None` when the frame has any other shape (not a message,
/// other key order, spaces, …): then use [`crate::proto::classify`] and [`scan`].
pub fn scan_message(frame: &[u8]) -> Option<Stamp> {
    let rest = frame.strip_prefix(br#"{"op":"message","topic":""#)?;
    // Topics cannot contain a quote or a backslash, so the first quote ends it.
    let q = memchr::memchr(b'"', rest)?;
    let rest = rest[q..].strip_prefix(br#"","data":{"p":"#)?;
    let (publisher, rest) = leading_number(rest)?;
    let (seq, rest) = leading_number(rest.strip_prefix(br#","s":"#)?)?;
    let (sent_ns, _) = leading_number(rest.strip_prefix(br#","t":"#)?)?;
    Some(Stamp {
        publisher: u32::try_from(publisher).ok()?,
        seq,
        sent_ns,
    })
}

/// The unsigned integer at the start of `s` (at least one digit) and what follows.
fn leading_number(s: &[u8]) -> Option<(u64, &[u8])> {
    let len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for b in &s[..len] {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some((n, &s[len..]))
}

/// Finds the stamp inside a whole server frame (an envelope such as
/// `{"op":"message","topic":"t","data":{…}}`) or inside a bare payload.
///
/// Returns `None` when one of the three keys is missing or not a number.
pub fn scan(frame: &[u8]) -> Option<Stamp> {
    // Skip the envelope so that no envelope field can be mistaken for ours.
    let body = match DATA.find(frame) {
        Some(i) => &frame[i + 7..],
        None => frame,
    };
    let publisher = number_after(body, &KEY_P)?;
    let seq = number_after(body, &KEY_S)?;
    let sent_ns = number_after(body, &KEY_T)?;
    Some(Stamp {
        publisher: u32::try_from(publisher).ok()?,
        seq,
        sent_ns,
    })
}

/// Parses the unsigned integer that follows `key` (spaces allowed before it).
fn number_after(hay: &[u8], key: &memmem::Finder<'_>) -> Option<u64> {
    let at = key.find(hay)? + key.needle().len();
    let mut digits = hay[at..].iter().skip_while(|b| **b == b' ').peekable();
    digits.peek().filter(|b| b.is_ascii_digit())?;
    let mut n: u64 = 0;
    for b in digits.take_while(|b| b.is_ascii_digit()) {
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        publisher: 7,
        seq: 123_456,
        sent_ns: 1_700_000_000_123_456_789,
    };

    #[test]
    fn encodes_to_the_requested_size_and_scans_back() {
        for size in [10, 60, 100, 1000] {
            let mut buf = b"prefix".to_vec();
            encode(&mut buf, &STAMP, size);
            let obj = &buf[6..];
            let min = br#"{"p":7,"s":123456,"t":1700000000123456789,"pad":""}"#.len();
            assert_eq!(obj.len(), size.max(min));
            let v: serde_json::Value = serde_json::from_slice(obj).unwrap();
            assert_eq!(v["s"], 123_456);
            assert_eq!(scan(obj), Some(STAMP));
        }
    }

    #[test]
    fn scans_inside_an_envelope_in_any_key_order() {
        let f = br#"{"op":"message","topic":"lt.0","data":{"pad":"xx","t": 1700000000123456789,"s":123456,"p":7}}"#;
        assert_eq!(scan(f), Some(STAMP));
        let nats = br#"{"p":7,"s":123456,"t":1700000000123456789}"#;
        assert_eq!(scan(nats), Some(STAMP));
    }

    #[test]
    fn fast_path_agrees_with_the_general_scan() {
        let mut f = br#"{"op":"message","topic":"lt.5f.0","data":"#.to_vec();
        encode(&mut f, &STAMP, 100);
        f.push(b'}');
        assert_eq!(scan_message(&f), Some(STAMP));
        assert_eq!(scan(&f), Some(STAMP));
        // Other shapes are left to the general path.
        for other in [
            &br#"{"op":"message","topic":"a","data":{"pad":"x","p":7,"s":1,"t":2}}"#[..],
            br#"{"op":"message","topic":"a","data":{"p": 7,"s":1,"t":2}}"#,
            br#"{"op":"published","id":3}"#,
            br#"{"op":"message","topic":"a","data":{"p":7,"s":1}}"#,
            br#"{"op":"message","topic":"a","data":{"p":99999999999,"s":1,"t":2}}"#,
        ] {
            assert_eq!(scan_message(other), None);
        }
    }

    #[test]
    fn rejects_missing_or_malformed_fields() {
        assert_eq!(scan(br#"{"op":"message","data":{"p":1,"s":2}}"#), None);
        assert_eq!(scan(br#"{"data":{"p":"1","s":2,"t":3}}"#), None);
        assert_eq!(
            scan(br#"{"data":{"p":1,"s":99999999999999999999999,"t":3}}"#),
            None
        );
    }
}
