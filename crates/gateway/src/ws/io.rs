//! Small I/O adapters.

use std::collections::VecDeque;

use bytes::{Buf, Bytes};

/// Drops the first `n` bytes of `bufs` after a (vectored) write accepted them:
/// whole buffers are popped, a partly written one is advanced.
///
/// # Panics
/// If `n` is more than `bufs` holds.
pub fn consume(bufs: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let front = bufs.front_mut().expect("wrote no more than was queued");
        if n >= front.len() {
            n -= front.len();
            bufs.pop_front();
        } else {
            front.advance(n);
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_pops_and_advances() {
        let mut bufs: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"].map(Bytes::from_static).into();
        consume(&mut bufs, 6);
        assert_eq!(bufs, VecDeque::from([Bytes::from_static(b"gh")]));
        consume(&mut bufs, 0);
        consume(&mut bufs, 2);
        assert!(bufs.is_empty());
    }
}
