//! A connection's outbound queue: byte-bounded, never blocking the producer.
//!
//! Publications (from the hub, on whatever task delivers them), replies (from the
//! reader) and control frames all enter here with a non-blocking push; the writer
//! task alone drains it, takes everything queued in one go and writes it with one
//! flush. When queued bytes would pass the limit the client is declared a slow
//! consumer: the queue is emptied at once (memory stays bounded however many
//! clients stop reading) and the writer closes the connection with 4008.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use wsgate_fanout::{Publication, Subscriber};

use crate::close::Disconnect;

/// One queued frame.
#[derive(Debug, Clone)]
pub struct Item {
    /// The complete WebSocket frame.
    pub frame: Bytes,
    /// When the publication was accepted (unix ns) — 0 for replies and control frames,
    /// which are not counted as deliveries.
    pub born: u64,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Item>,
    /// Pings and pongs: written before anything else in the next batch.
    control: Vec<Bytes>,
    bytes: usize,
    /// Set once; the first reason wins.
    closing: Option<Disconnect>,
    /// A close frame to send instead of the reason's own (the echo of a client's).
    close_frame: Option<Bytes>,
    /// Publications thrown away because of the close.
    dropped: u64,
    /// Set when the reader has finished (the client's close arrived, or EOF). Here
    /// rather than in an atomic of its own: it fits in this struct's padding, and
    /// the outbox of every idle connection is counted in bytes.
    reader_done: bool,
    /// Server API commands for the session's reader, in arrival order.
    inbox: Vec<ServerCommand>,
    /// The reader's waker while it waits for [`Outbox::next_command`].
    reader_waker: Option<std::task::Waker>,
}

/// A server API command for one session's reader (the one task that owns the
/// session's topics carries it out, between the client's own commands).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCommand {
    /// Subscribe to these topics (`POST /api/subscribe`, a token's `topics` claim).
    Subscribe(Vec<std::sync::Arc<str>>),
    /// Unsubscribe from these topics (`POST /api/unsubscribe`).
    Unsubscribe(Vec<std::sync::Arc<str>>),
}

/// What the writer took from the queue.
#[derive(Debug, Default)]
pub struct Batch {
    pub control: Vec<Bytes>,
    pub frames: VecDeque<Item>,
    /// Bytes that were queued when the batch was taken.
    pub bytes: usize,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.control.is_empty() && self.frames.is_empty()
    }
}

/// The outbound queue of one connection.
pub struct Outbox {
    state: Mutex<State>,
    /// The writer's waker (the writer is the only task that waits here).
    waker: AtomicWaker,
    /// Set when there is something for the writer; kept until it looks, so a push
    /// between the writer's last `take` and its wait is never lost. `take` clears it:
    /// a push that the batch already carries needs no wake-up of its own.
    signaled: AtomicBool,
    limit: usize,
    /// When the client was last heard from (any frame), in milliseconds on the
    /// session table's clock: written by the reader, read by the heartbeat ticker.
    heard_ms: AtomicU64,
}

impl Outbox {
    /// A queue that holds at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            waker: AtomicWaker::new(),
            signaled: AtomicBool::new(false),
            limit,
            heard_ms: AtomicU64::new(0),
        }
    }

    /// Records that a frame from the client arrived at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the client was last heard from (see [`Outbox::heard`]).
    pub fn last_heard(&self) -> u64 {
        self.heard_ms.load(Ordering::Relaxed)
    }

    /// The reader has finished: wakes the writer to see it.
    pub fn reader_finished(&self) {
        self.state.lock().reader_done = true;
        self.wake();
    }

    /// Whether [`Outbox::reader_finished`] was called.
    pub fn is_reader_done(&self) -> bool {
        self.state.lock().reader_done
    }

    /// Queues a frame. Returns `false` if it was not queued: the connection is
    /// closing, or this frame overflowed the queue (which starts the close).
    pub fn push(&self, frame: Bytes, born: u64) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            st.dropped += u64::from(born != 0);
            return false;
        }
        if st.bytes + frame.len() > self.limit {
            st.dropped +=
                u64::from(born != 0) + st.frames.iter().filter(|i| i.born != 0).count() as u64;
            Self::start_close(&mut st, Disconnect::SlowConsumer, None);
            drop(st);
            self.wake();
            return false;
        }
        let was_idle = st.frames.is_empty() && st.control.is_empty();
        st.bytes += frame.len();
        st.frames.push_back(Item { frame, born });
        drop(st);
        // The writer re-checks the queue after every write, so it only needs a wake-up
        // when the queue goes from empty to non-empty.
        if was_idle {
            self.wake();
        }
        true
    }

    /// Queues a ping or pong, to be written ahead of queued messages. Counts against
    /// the byte limit like anything else (a ping flood from a client that does not
    /// read makes it a slow consumer).
    pub fn push_control(&self, frame: Bytes) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        if st.bytes + frame.len() > self.limit {
            st.dropped += st.frames.iter().filter(|i| i.born != 0).count() as u64;
            Self::start_close(&mut st, Disconnect::SlowConsumer, None);
        } else {
            st.bytes += frame.len();
            st.control.push(frame);
        }
        drop(st);
        self.wake();
        true
    }

    /// Starts closing the connection for `reason` (ignored if already closing).
    pub fn close(&self, reason: Disconnect) {
        self.close_with(reason, None);
    }

    /// Like [`Outbox::close`], sending `frame` as the close frame.
    pub fn close_with(&self, reason: Disconnect, frame: Option<Bytes>) {
        let mut st = self.state.lock();
        if st.closing.is_none() {
            if reason.discards_queue() {
                st.dropped += st.frames.iter().filter(|i| i.born != 0).count() as u64;
            }
            Self::start_close(&mut st, reason, frame);
        }
        drop(st);
        self.wake();
    }

    /// Hands a server command to the session's reader. `false` if the connection is
    /// closing (the command would find nothing to act on).
    pub fn command(&self, command: ServerCommand) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() || st.reader_done {
            return false;
        }
        st.inbox.push(command);
        let waker = st.reader_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    /// Ready when a server command waits ([`Outbox::take_command`]); else the
    /// reader is woken when one comes. Only the session's reader polls here.
    pub fn poll_command(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let mut st = self.state.lock();
        if !st.inbox.is_empty() {
            return Poll::Ready(());
        }
        if st.inbox.capacity() > 0 {
            st.inbox = Vec::new();
        }
        if !st
            .reader_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.reader_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// The oldest server command waiting, if any.
    pub fn take_command(&self) -> Option<ServerCommand> {
        let mut st = self.state.lock();
        (!st.inbox.is_empty()).then(|| st.inbox.remove(0))
    }

    /// Wakes the writer unless a wake-up is already pending.
    fn wake(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn start_close(st: &mut State, reason: Disconnect, frame: Option<Bytes>) {
        st.closing = Some(reason);
        st.close_frame = frame;
        if reason.discards_queue() {
            st.frames = VecDeque::new();
            st.control = Vec::new();
            st.bytes = 0;
        }
    }

    /// Frees the queue's buffers if nothing is queued: an idle connection keeps none
    /// (the heartbeat calls this before each ping).
    pub fn trim(&self) {
        let mut st = self.state.lock();
        if st.frames.is_empty() && st.frames.capacity() > 0 {
            st.frames = VecDeque::new();
        }
        if st.control.is_empty() && st.control.capacity() > 0 {
            st.control = Vec::new();
        }
    }

    /// Why the connection is closing, if it is.
    pub fn closing(&self) -> Option<Disconnect> {
        self.state.lock().closing
    }

    /// Publications that were thrown away because of the close.
    pub fn dropped(&self) -> u64 {
        self.state.lock().dropped
    }

    /// Moves everything queued into `batch` (which the writer keeps and reuses, so
    /// its buffers' capacity survives between batches). Returns the close reason and
    /// frame once the queue is empty and a close has been requested.
    pub fn take(&self, batch: &mut Batch) -> Option<(Disconnect, Option<Bytes>)> {
        let reason = self.take_batch(batch)?;
        Some((reason, self.take_close_frame()))
    }

    /// Like [`Outbox::take`], returning only the close reason; the frame stays
    /// for [`Outbox::take_close_frame`]. (The writer keeps one byte, not a frame,
    /// across its write.)
    pub fn take_batch(&self, batch: &mut Batch) -> Option<Disconnect> {
        let mut st = self.state.lock();
        // Under the lock: every push before this is in the batch, every push after it
        // finds the queue empty and signals again.
        self.signaled.store(false, Ordering::Release);
        std::mem::swap(&mut st.frames, &mut batch.frames);
        std::mem::swap(&mut st.control, &mut batch.control);
        batch.bytes = std::mem::take(&mut st.bytes);
        st.closing
    }

    /// The close frame to send instead of the reason's own, if any.
    pub fn take_close_frame(&self) -> Option<Bytes> {
        self.state.lock().close_frame.take()
    }

    /// Waits until something is pushed or a close is requested.
    ///
    /// Only the connection's writer may wait here (one waker is kept).
    ///
    /// # Cancel safety
    /// Cancel safe: a signal not consumed stays for the next call.
    pub async fn notified(&self) {
        poll_fn(|cx| {
            if self.signaled.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            // Re-checked after registering: a signal set in between would
            // otherwise wake nobody.
            if self.signaled.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl Subscriber for Outbox {
    fn deliver(&self, publication: &Publication) {
        // A clone of `Bytes` is a reference-count increment: every subscriber shares
        // the frame encoded once by the broker.
        self.push(publication.frame.clone(), publication.accepted_at.max(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn frame(n: usize) -> Bytes {
        Bytes::from(vec![0u8; n])
    }

    #[test]
    fn overflow_empties_the_queue_and_closes_4008() {
        let ob = Outbox::new(1000);
        for _ in 0..9 {
            assert!(ob.push(frame(100), 1));
        }
        assert_eq!(ob.queued_bytes(), 900);
        assert!(!ob.push(frame(101), 1), "1001 bytes > limit");
        assert_eq!(ob.closing(), Some(Disconnect::SlowConsumer));
        assert_eq!(ob.queued_bytes(), 0, "memory released at once");
        assert_eq!(ob.dropped(), 10);
        assert!(!ob.push(frame(1), 1));
        assert_eq!(ob.dropped(), 11);
        let mut b = Batch::default();
        let close = ob.take(&mut b);
        assert!(b.is_empty());
        assert_eq!(close.map(|c| c.0), Some(Disconnect::SlowConsumer));
    }

    #[test]
    fn drain_close_keeps_what_is_queued() {
        let ob = Outbox::new(1000);
        ob.push(frame(10), 1);
        ob.push_control(frame(2));
        ob.close(Disconnect::Drain);
        ob.close(Disconnect::SlowConsumer);
        let mut b = Batch::default();
        let close = ob.take(&mut b).unwrap();
        assert_eq!(close.0, Disconnect::Drain, "first reason wins");
        assert_eq!((b.frames.len(), b.control.len(), b.bytes), (1, 1, 12));
    }

    #[tokio::test]
    async fn a_push_already_taken_does_not_wake_the_writer_again() {
        let ob = Arc::new(Outbox::new(1000));
        ob.push(frame(1), 1);
        let mut b = Batch::default();
        ob.take(&mut b);
        assert_eq!(b.frames.len(), 1);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), ob.notified());
        assert!(waiting.await.is_err(), "the batch carried it: no wake-up");
        // A push from another task wakes the waiting writer.
        let ob2 = ob.clone();
        let waiter = tokio::spawn(async move { ob2.notified().await });
        tokio::task::yield_now().await;
        ob.push(frame(1), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .unwrap();
    }

    #[tokio::test]
    async fn a_push_before_waiting_is_not_lost() {
        let ob = Outbox::new(1000);
        ob.push(frame(1), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), ob.notified())
            .await
            .expect("permit kept");
    }
}
