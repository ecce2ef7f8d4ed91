//! Small I/O adapters.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, ReadBuf};

/// A reader that first yields bytes already read from the stream (what hyper read
/// past the upgrade request), then reads from the stream itself.
pub struct Prefixed<R> {
    prefix: Bytes,
    inner: R,
}

impl<R> Prefixed<R> {
    pub fn new(prefix: Bytes, inner: R) -> Self {
        // hyper hands over a slice of its own read buffer (8 KiB), which the slice
        // would keep alive for the connection's life: copy the few bytes (usually
        // none) so that buffer is freed now.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&prefix)
        };
        Prefixed { prefix, inner }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Prefixed<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

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
    use tokio::io::AsyncReadExt;

    #[test]
    fn consume_pops_and_advances() {
        let mut bufs: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"].map(Bytes::from_static).into();
        consume(&mut bufs, 6);
        assert_eq!(bufs, VecDeque::from([Bytes::from_static(b"gh")]));
        consume(&mut bufs, 0);
        consume(&mut bufs, 2);
        assert!(bufs.is_empty());
    }

    #[tokio::test]
    async fn prefix_then_stream() {
        let mut r = Prefixed::new(Bytes::from_static(b"abc"), &b"def"[..]);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "abcdef");
    }
}
