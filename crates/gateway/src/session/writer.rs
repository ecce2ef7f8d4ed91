//! The writer: the only owner of a connection's write half.
//!
//! It takes everything queued in the [`Outbox`] at once, writes it with vectored
//! writes (no copy of the shared publication frames) and flushes once per batch,
//! and it writes the close frame when the session ends. Heartbeat pings reach it
//! through the outbox from [`crate::heartbeat`].

use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep, timeout};
use wsgate_fanout::{frame, unix_nanos};
use wsgate_metrics::DeliveryStats;

use crate::close::Disconnect;
use crate::session::outbox::{Batch, Outbox};

/// Slices handed to one `writev(2)` call at most (below Linux's IOV_MAX of 1024).
const MAX_IOV: usize = 512;
/// Batches of at most this many frames are written from slices on the stack.
const SMALL_IOV: usize = 8;
/// How long a close frame, and the client's answer to it, may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Everything the writer needs besides the socket.
pub(crate) struct Writer {
    pub outbox: Arc<Outbox>,
    pub stats: DeliveryStats,
    pub heartbeat_timeout: Duration,
}

impl Writer {
    /// Runs until the connection closes; returns why.
    ///
    /// Heartbeat pings come through the outbox (see [`crate::heartbeat`]), so an
    /// idle writer waits for its outbox and nothing else: no timer of its own.
    ///
    /// Everything that completes at once — taking a batch, writing it, flushing:
    /// most writes — happens inside one poll ([`Writer::poll_step`]), so this
    /// future, which every idle connection keeps for its whole life, holds no write
    /// state; a write the socket does not take at once continues in a boxed future.
    ///
    /// An `async move` block rather than an `async fn`, whose arguments would be
    /// stored twice in the future.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn run<'a, W: AsyncWrite + Unpin>(
        &'a self,
        io: &'a mut W,
    ) -> impl Future<Output = Disconnect> + 'a {
        async move {
            let mut batch = Batch::default();
            loop {
                let reason = match poll_fn(|cx| self.poll_step(&mut *io, &mut batch, cx)).await {
                    Step::Close(reason) => reason,
                    Step::Failed(reason) => {
                        // The frame stream may be cut mid-frame: no close frame is possible.
                        self.outbox.close(reason);
                        return reason;
                    }
                    Step::Stalled(cursor, close) => {
                        let result = Box::pin(self.slow_write(io, &batch, cursor)).await;
                        self.written(&mut batch, result.is_ok());
                        if let Err(reason) = result {
                            self.outbox.close(reason);
                            return reason;
                        }
                        match close {
                            Some(reason) => reason,
                            None => continue,
                        }
                    }
                };
                // Anything queued after the close request was refused by the outbox, so
                // the batch just written was the last one.
                let frame = self.outbox.take_close_frame();
                // Boxed: the close handshake's timers are needed once per connection
                // and should not make every idle writer's future larger.
                Box::pin(self.finish(io, reason, frame)).await;
                return reason;
            }
        }
    }

    /// Takes and writes batches (control frames first, then queued frames in order,
    /// then one flush each) until the outbox is empty, a close is due, a write fails,
    /// or the socket does not take a batch at once.
    fn poll_step<W: AsyncWrite + Unpin>(
        &self,
        io: &mut W,
        batch: &mut Batch,
        cx: &mut Context<'_>,
    ) -> Poll<Step> {
        loop {
            let close = self.outbox.take_batch(batch);
            if !batch.is_empty() {
                let mut cursor = Cursor::default();
                match poll_write_flush(&mut *io, batch, &mut cursor, cx) {
                    Poll::Ready(Ok(())) => self.written(batch, true),
                    Poll::Ready(Err(_)) => {
                        self.written(batch, false);
                        return Poll::Ready(Step::Failed(Disconnect::ClientGone));
                    }
                    Poll::Pending => return Poll::Ready(Step::Stalled(cursor, close)),
                }
                if close.is_none() {
                    continue;
                }
            }
            if let Some(reason) = close {
                return Poll::Ready(Step::Close(reason));
            }
            ready!(self.outbox.poll_notified(cx));
        }
    }

    /// Counts a written batch and gives back the buffers of light ones.
    fn written(&self, batch: &mut Batch, ok: bool) {
        let light = batch.frames.len() <= 1;
        if ok {
            let bytes: u64 = batch.control.iter().map(|f| f.len() as u64).sum::<u64>()
                + batch
                    .frames
                    .iter()
                    .map(|i| i.frame().len() as u64)
                    .sum::<u64>();
            let born = batch.frames.iter().map(|i| i.born).filter(|&b| b != 0);
            // Latency ends when the socket has taken the frame: one clock read per
            // batch (none for a batch of pings and replies).
            let now = if batch.frames.iter().any(|i| i.born != 0) {
                unix_nanos()
            } else {
                0
            };
            self.stats.record_batch(batch.bytes, bytes, born, now);
        }
        if light || batch.frames.capacity() > 1024 {
            // A batch of at most one frame (a reply, a ping, light traffic): give
            // the buffers back, so that a connection going idle keeps only the
            // queue's own (which the heartbeat frees). Busy connections, whose
            // batches carry several frames, keep theirs. Also drop a burst's worth.
            *batch = Batch::default();
        } else {
            batch.control.clear();
            batch.frames.clear();
        }
    }

    /// The rest of a write the socket did not take at once, bounded by the heartbeat
    /// timeout and cut short when the connection is declared a slow consumer.
    async fn slow_write<W: AsyncWrite + Unpin>(
        &self,
        io: &mut W,
        batch: &Batch,
        mut cursor: Cursor,
    ) -> Result<(), Disconnect> {
        let stall = sleep(self.heartbeat_timeout);
        tokio::pin!(stall);
        loop {
            tokio::select! {
                r = poll_fn(|cx| poll_write_flush(&mut *io, batch, &mut cursor, cx)) => {
                    break r.map_err(|_| Disconnect::ClientGone)
                }
                _ = self.outbox.notified() => {
                    if let Some(reason) = self.outbox.closing() {
                        if reason.discards_queue() {
                            break Err(reason);
                        }
                    }
                }
                _ = &mut stall => break Err(Disconnect::SlowConsumer),
            }
        }
    }

    /// Sends the close frame (best effort), waits briefly for the client's answer,
    /// and shuts the socket down.
    async fn finish<W: AsyncWrite + Unpin>(
        &self,
        io: &mut W,
        reason: Disconnect,
        frame: Option<Bytes>,
    ) {
        let frame = match frame {
            Some(f) => Some(f),
            None if reason.sends_close() => Some(frame::close(reason.code(), reason.reason())),
            None => None,
        };
        if let Some(frame) = frame {
            let sent = timeout(CLOSE_GRACE, async {
                io.write_all(&frame).await?;
                io.flush().await
            })
            .await;
            if matches!(sent, Ok(Ok(()))) && reason.sends_close() {
                // RFC 6455 §7.1.1: the server closes TCP after the client's close.
                let _ = timeout(CLOSE_GRACE, async {
                    while !self.outbox.is_reader_done() {
                        self.outbox.notified().await;
                    }
                })
                .await;
            }
        }
        let _ = timeout(CLOSE_GRACE, io.shutdown()).await;
    }
}

/// Where [`Writer::poll_step`] stopped.
enum Step {
    /// A close is due and everything queued before it is written.
    Close(Disconnect),
    /// A write failed: the connection is gone.
    Failed(Disconnect),
    /// The socket did not take the whole batch at once: written up to the cursor;
    /// the close to do once it is all written, if one is due.
    Stalled(Cursor, Option<Disconnect>),
}

/// How much of a batch has been written: whole frames, then bytes of the next.
#[derive(Default)]
struct Cursor {
    frame: usize,
    offset: usize,
}

/// Writes what is left of `batch` after `cursor`, then flushes.
///
/// # Cancel safety
/// The cursor records what was written, so polling may stop and resume.
fn poll_write_flush<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &Batch,
    cursor: &mut Cursor,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    ready!(poll_write_batch(&mut *io, batch, cursor, cx))?;
    Pin::new(io).poll_flush(cx)
}

/// The `i`th frame of a batch: control frames first.
fn nth(batch: &Batch, i: usize) -> Option<&Bytes> {
    match batch.control.get(i) {
        Some(f) => Some(f),
        None => batch
            .frames
            .get(i - batch.control.len())
            .map(|item| item.frame()),
    }
}

/// Writes what is left of `batch` after `cursor` with `writev(2)` calls (as few as
/// the socket allows), without copying the frames.
///
/// # Cancel safety
/// The cursor records what was written, so polling may stop and resume.
fn poll_write_batch<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &Batch,
    cursor: &mut Cursor,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<()>> {
    let total = batch.control.len() + batch.frames.len();
    while cursor.frame < total {
        let left = total - cursor.frame;
        let n = if left <= SMALL_IOV {
            let mut slices = [IoSlice::new(&[]); SMALL_IOV];
            let k = fill(&mut slices, batch, cursor);
            ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
        } else {
            let mut slices = vec![IoSlice::new(&[]); left.min(MAX_IOV)];
            let k = fill(&mut slices, batch, cursor);
            ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
        };
        if n == 0 {
            return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
        }
        advance(batch, cursor, n);
    }
    Poll::Ready(Ok(()))
}

/// Points `slices` at the unwritten frames from `cursor` on; returns how many.
fn fill<'a>(slices: &mut [IoSlice<'a>], batch: &'a Batch, cursor: &Cursor) -> usize {
    let mut k = 0;
    while k < slices.len() {
        let Some(f) = nth(batch, cursor.frame + k) else {
            break;
        };
        let skip = if k == 0 { cursor.offset } else { 0 };
        slices[k] = IoSlice::new(&f[skip..]);
        k += 1;
    }
    k
}

/// Moves `cursor` past `n` written bytes.
fn advance(batch: &Batch, cursor: &mut Cursor, mut n: usize) {
    while n > 0 {
        let len = nth(batch, cursor.frame)
            .expect("wrote no more than was queued")
            .len()
            - cursor.offset;
        if n >= len {
            n -= len;
            cursor.frame += 1;
            cursor.offset = 0;
        } else {
            cursor.offset += n;
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::outbox::Item;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_every_frame_in_order_across_partial_writes() {
        // A duplex with a tiny buffer forces many partial writes; 2000 frames need
        // more than one writev each time and the heap-allocated slices.
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut batch = Batch::default();
        batch.control.push(Bytes::from_static(b"[ping]"));
        batch.frames = (0..2000u32)
            .map(|i| Item::new(Bytes::from(format!("<{i}>")), 0))
            .collect();
        let expected: String =
            "[ping]".to_string() + &(0..2000u32).map(|i| format!("<{i}>")).collect::<String>();
        let reader = tokio::spawn(async move {
            let mut s = String::new();
            b.read_to_string(&mut s).await.unwrap();
            s
        });
        let mut cursor = Cursor::default();
        poll_fn(|cx| poll_write_batch(&mut a, &batch, &mut cursor, cx))
            .await
            .unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
        assert_eq!(cursor.frame, 2001);
    }

    #[tokio::test]
    async fn a_small_batch_is_written_whole() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let batch = Batch {
            frames: (0..3u8)
                .map(|i| Item::new(Bytes::from(vec![b'a' + i; 3]), 1))
                .collect(),
            ..Default::default()
        };
        let mut cursor = Cursor::default();
        poll_fn(|cx| poll_write_batch(&mut a, &batch, &mut cursor, cx))
            .await
            .unwrap();
        drop(a);
        let mut s = String::new();
        b.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "aaabbbccc");
    }
}
