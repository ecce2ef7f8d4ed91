//! The writer task: the only owner of a connection's write half.
//!
//! It takes everything queued in the [`Outbox`] at once, writes it with vectored
//! writes (no copy of the shared publication frames) and flushes once per batch. It
//! also sends the heartbeat pings and enforces the heartbeat timeout, and it writes
//! the close frame when the session ends.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::IoSlice;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use wsgate_fanout::{frame, unix_nanos};
use wsgate_metrics::{ConnectionStats, Metrics};

use crate::close::Disconnect;
use crate::outbox::{Batch, Outbox};

/// Slices handed to one `writev(2)` call at most (below Linux's IOV_MAX of 1024).
const MAX_IOV: usize = 512;
/// How long a close frame, and the client's answer to it, may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// When the client was last heard from, as milliseconds since the session began.
/// Written by the reader on every frame, read by the writer at each heartbeat.
pub(crate) struct Liveness {
    base: Instant,
    last_ms: AtomicU64,
}

impl Liveness {
    pub(crate) fn new() -> Self {
        Liveness {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that a frame arrived now.
    pub(crate) fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Everything the writer needs besides the socket.
pub(crate) struct Writer {
    pub outbox: Arc<Outbox>,
    pub liveness: Arc<Liveness>,
    pub metrics: Metrics,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Cancelled when the reader has finished (the client's close arrived, or EOF).
    pub reader_done: CancellationToken,
}

impl Writer {
    /// Runs until the connection closes; returns why.
    pub(crate) async fn run<W: AsyncWrite + Unpin>(self, mut io: W) -> Disconnect {
        let mut batch = Batch::default();
        let mut bufs: VecDeque<Bytes> = VecDeque::new();
        // Folded into the shared metrics a few times a second, not per batch: the
        // fan-out hot path touches no shared cache line (see wsgate_metrics::connection).
        let mut stats = ConnectionStats::new(&self.metrics);
        let mut borns: Vec<u64> = Vec::new();
        // The first ping is jittered so that connections made together (a reconnect
        // storm) do not ping together forever after.
        let jitter = rand::random_range(0.0..1.0);
        let mut next_ping = Instant::now() + self.heartbeat_interval.mul_f64(jitter);
        // Made once and re-armed, not re-created per wake-up: a new sleep and a new
        // cancellation wait would each register (and later deregister) with the
        // timer wheel and the token under a lock on every batch, which at hundreds of
        // thousands of wake-ups per second is a visible share of the fan-out cost.
        // Moving a registered timer later is lock-free.
        let mut idle_timer = pin!(sleep_until(next_ping));
        let mut armed = next_ping;
        let mut reader_gone = pin!(self.reader_done.clone().cancelled_owned());
        let mut reader_done = false;
        loop {
            if Instant::now() >= next_ping {
                self.heartbeat();
                next_ping = Instant::now() + self.heartbeat_interval;
            }
            let close = self.outbox.take(&mut batch);
            if !batch.is_empty() {
                let written = self
                    .write_batch(&mut io, &mut batch, &mut bufs, &mut stats, &mut borns)
                    .await;
                if let Err(reason) = written {
                    // The frame stream may be cut mid-frame: no close frame is possible.
                    self.outbox.close(reason);
                    return reason;
                }
                if close.is_none() {
                    continue;
                }
                // Anything queued after the close request was refused by the outbox,
                // so the batch just written was the last one.
            }
            if let Some((reason, frame)) = close {
                self.finish(&mut io, reason, frame).await;
                return reason;
            }
            // An idle writer still folds its last counts in on time.
            let wake = match stats.flush_if_due(unix_nanos()) {
                Some(wait) => next_ping.min(Instant::now() + wait),
                None => next_ping,
            };
            if wake != armed {
                idle_timer.as_mut().reset(wake);
                armed = wake;
            }
            tokio::select! {
                biased;
                _ = self.outbox.notified() => {}
                _ = &mut idle_timer => {
                    // Fired: the next reset re-registers it.
                    armed = Instant::now();
                }
                _ = &mut reader_gone, if !reader_done => {
                    // The reader closes the outbox before it finishes; this only wakes
                    // the loop to see it.
                    reader_done = true;
                }
            }
        }
    }

    /// Pings the client, or closes it if it has been silent too long.
    fn heartbeat(&self) {
        if self.liveness.silent_for() >= self.heartbeat_timeout {
            self.outbox.close(Disconnect::HeartbeatTimeout);
        } else {
            self.outbox.push_control(frame::encode(frame::OP_PING, b""));
        }
    }

    /// Writes one batch: control frames first, then queued frames in order, then one
    /// flush. Gives up when the client is declared a slow consumer meanwhile, or when
    /// the socket accepts nothing for the heartbeat timeout.
    async fn write_batch<W: AsyncWrite + Unpin>(
        &self,
        io: &mut W,
        batch: &mut Batch,
        bufs: &mut VecDeque<Bytes>,
        stats: &mut ConnectionStats,
        borns: &mut Vec<u64>,
    ) -> Result<(), Disconnect> {
        stats.record_queue(batch.bytes);
        let mut bytes = 0u64;
        borns.clear();
        for frame in batch.control.drain(..) {
            bytes += frame.len() as u64;
            bufs.push_back(frame);
        }
        for item in batch.frames.drain(..) {
            if item.born != 0 {
                borns.push(item.born);
            }
            bytes += item.frame.len() as u64;
            bufs.push_back(item.frame);
        }

        // The write borrows `bufs`; it ends with this block.
        let result = {
            let write = async {
                write_all_bufs(io, bufs).await?;
                io.flush().await
            };
            let mut write = pin!(write);
            // Fast path: the socket almost always takes the whole batch at once, and
            // then neither the stall timer nor a close watch is needed (both cost a
            // registration under a lock).
            match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
                Poll::Ready(r) => r.map_err(|_| Disconnect::ClientGone),
                Poll::Pending => {
                    let mut stall = pin!(sleep(self.heartbeat_timeout));
                    loop {
                        tokio::select! {
                            r = &mut write => break r.map_err(|_| Disconnect::ClientGone),
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
            }
        };
        bufs.clear();
        if bufs.capacity() > 1024 {
            // Do not keep a burst's worth of slots around for an idle connection.
            *bufs = VecDeque::new();
        }
        if batch.frames.capacity() > 1024 {
            batch.frames = VecDeque::new();
        }
        result?;
        // Latency ends when the socket has taken the frame: one clock read per batch.
        stats.record_written(bytes, borns, unix_nanos());
        if borns.capacity() > 1024 {
            *borns = Vec::new();
        }
        Ok(())
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
                let _ = timeout(CLOSE_GRACE, self.reader_done.cancelled()).await;
            }
        }
        let _ = timeout(CLOSE_GRACE, io.shutdown()).await;
    }
}

/// Writes every buffer in `bufs`, in order, with as few `writev(2)` calls as the
/// socket allows. Empties `bufs`.
///
/// # Cancel safety
/// Not cancel safe: a cancelled call may have written part of a frame.
async fn write_all_bufs<W: AsyncWrite + Unpin>(
    io: &mut W,
    bufs: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        // The slices live on the stack of one poll, not in the future (which would
        // carry them for the connection's life) nor on the heap (one allocation
        // per write).
        let n = poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut k = 0;
            for (slot, b) in slices.iter_mut().zip(bufs.iter()) {
                *slot = IoSlice::new(b);
                k += 1;
            }
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k])
        })
        .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        crate::io::consume(bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_every_buffer_in_order_across_partial_writes() {
        // A duplex with a tiny buffer forces many partial writes.
        let (mut a, mut b) = tokio::io::duplex(7);
        let mut bufs: VecDeque<Bytes> = (0..2000u32)
            .map(|i| Bytes::from(format!("<{i}>")))
            .collect();
        let expected: String = (0..2000u32).map(|i| format!("<{i}>")).collect();
        let reader = tokio::spawn(async move {
            let mut s = String::new();
            b.read_to_string(&mut s).await.unwrap();
            s
        });
        write_all_bufs(&mut a, &mut bufs).await.unwrap();
        drop(a);
        assert_eq!(reader.await.unwrap(), expected);
        assert!(bufs.is_empty());
    }
}
