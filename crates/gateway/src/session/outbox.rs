//! A connection's outbound queue: byte-bounded, never blocking the producer.
//!
//! Publications (from the hub, on whatever task delivers them), replies (from the
//! reader) and control frames all enter here with a non-blocking push; the writer
//! task alone drains it, takes everything queued in one go and writes it with one
//! flush. When queued bytes would pass the limit, the slow-consumer policies of the
//! queued publications' namespaces make room first (docs/configuration.md,
//! "Namespaces"): `latest` topics are conflated to their newest publication,
//! `drop_oldest` topics lose their oldest ones, and a stream's dropped publications
//! are replaced by a `reset` that covers exactly them. If that is not enough (or
//! nothing queued has such a policy: the default), the client is declared a slow
//! consumer: the queue is emptied at once (memory stays bounded however many clients
//! stop reading) and the writer closes the connection with 4008.
//!
//! The policies cost nothing until a queue overflows: a queued publication is one
//! reference to the [`Publication`] (its frame, compressed frame and [`Tag`] in one
//! shared allocation), whatever its namespace's policy, and the state of a lagging
//! connection is allocated when it first lags ([`Rare`]).

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use wsgate_fanout::{Publication, SlowConsumer, Subscriber, Tag, TagKind};

use crate::close::Disconnect;

/// One queued frame: a reply or a publication, one reference either way (40 bytes).
#[derive(Debug, Clone)]
pub struct Item {
    body: Body,
    /// When the publication was accepted (unix ns) — 0 for replies and control frames,
    /// which are not counted as deliveries.
    pub born: u64,
}

#[derive(Debug, Clone)]
enum Body {
    /// A frame of its own (a reply).
    Frame(Bytes),
    /// A publication, shared with every subscriber; its compressed frame when
    /// `true` ([`Publication::deflated_frame`]).
    Publication(Publication, bool),
}

impl Item {
    /// A frame of its own, never dropped by a policy.
    pub fn new(frame: Bytes, born: u64) -> Item {
        Item {
            body: Body::Frame(frame),
            born,
        }
    }

    /// A publication, its compressed frame when `deflated`.
    fn publication(p: Publication, deflated: bool, born: u64) -> Item {
        Item {
            body: Body::Publication(p, deflated),
            born,
        }
    }

    /// The complete WebSocket frame to write.
    pub fn frame(&self) -> &Bytes {
        match &self.body {
            Body::Frame(f) => f,
            Body::Publication(p, false) => &p.frame,
            Body::Publication(p, true) => p.deflated_frame(),
        }
    }

    /// The publication's slow-consumer tag: `None` for what is never dropped
    /// (replies, publications of `disconnect` namespaces).
    fn tag(&self) -> Option<&Tag> {
        match &self.body {
            Body::Frame(_) => None,
            Body::Publication(p, _) => p.tag.as_ref(),
        }
    }

    fn tag_is(&self, policy: SlowConsumer) -> bool {
        self.tag()
            .is_some_and(|t| t.policy == policy && t.has_message())
    }

    fn of_topic(&self, topic: &Arc<str>) -> Option<&Tag> {
        self.tag()
            .filter(|t| Arc::ptr_eq(&t.topic, topic) || t.topic == *topic)
    }

    /// A stream's `reset` up to `seq` of `epoch`, as a queue item.
    fn reset(tag: &Tag, seq: u64, epoch: &Arc<str>) -> Item {
        let p = Publication::reset(&tag.topic, seq, epoch).with_tag(Tag {
            policy: tag.policy,
            topic: tag.topic.clone(),
            position: Some((seq, epoch.clone())),
            kind: TagKind::Reset,
        });
        Item::publication(p, false, 0)
    }
}

/// What only some connections need, allocated on first use: those that lag, those
/// closed with a close frame of their own, and those given server API commands.
#[derive(Default)]
struct Rare {
    /// A close frame to send instead of the reason's own (the echo of a client's).
    close_frame: Option<Bytes>,
    /// The queue overflowed since the writer last took it: `latest` publications
    /// replace their topic's queued one.
    lagging: bool,
    /// Publications dropped by `drop_oldest` and replaced by `latest`, not yet
    /// counted in the metrics ([`Outbox::trim`]).
    drops: PolicyDrops,
    /// Server API commands for the session's reader, in arrival order.
    inbox: Vec<ServerCommand>,
}

/// Publications a policy dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PolicyDrops {
    /// By `drop_oldest`.
    pub oldest: u64,
    /// By `latest`: replaced by a newer one of their topic.
    pub conflated: u64,
}

impl PolicyDrops {
    pub fn add(&mut self, other: PolicyDrops) {
        self.oldest += other.oldest;
        self.conflated += other.conflated;
    }
}

#[derive(Default)]
struct State {
    frames: VecDeque<Item>,
    /// Pings and pongs: written before anything else in the next batch.
    control: Vec<Bytes>,
    bytes: usize,
    /// Set once; the first reason wins.
    closing: Option<Disconnect>,
    /// The close frame of our own, a lagging connection's policy state.
    rare: Option<Box<Rare>>,
    /// Publications thrown away because of the close.
    dropped: u64,
    /// Set when the reader has finished (the client's close arrived, or EOF). Here
    /// rather than in an atomic of its own: it fits in this struct's padding, and
    /// the outbox of every idle connection is counted in bytes.
    reader_done: bool,
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
    /// The connection negotiated permessage-deflate and takes compressed
    /// publications ([`Publication::deflated_frame`]).
    deflate: bool,
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
            deflate: false,
            limit,
            heard_ms: AtomicU64::new(0),
        }
    }

    /// Queues publications compressed when they have a compressed form: the
    /// connection negotiated permessage-deflate.
    pub fn with_deflate(mut self, on: bool) -> Self {
        self.deflate = on;
        self
    }

    /// Whether publications are queued compressed (see [`Outbox::with_deflate`]).
    pub fn deflates(&self) -> bool {
        self.deflate
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
        self.push_item(Item::new(frame, born))
    }

    /// Queues an item, applying the slow-consumer policies when it overflows.
    fn push_item(&self, mut item: Item) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            st.dropped += u64::from(item.born != 0);
            return false;
        }
        let latest = item.tag_is(SlowConsumer::Latest);
        let mut tried = false;
        loop {
            if latest && !tried && st.lagging() {
                tried = true;
                match st.conflate_push(item) {
                    Ok(()) => {
                        // Replaced in place: the queue was not empty, the writer knows.
                        if st.bytes > self.limit && !st.make_room(0, self.limit) {
                            self.overflow(st, 0);
                            return false;
                        }
                        return true;
                    }
                    Err(back) => item = back,
                }
            }
            if st.bytes + item.frame().len() > self.limit {
                let was_lagging = st.lagging();
                if !st.make_room(item.frame().len(), self.limit) {
                    self.overflow(st, u64::from(item.born != 0));
                    return false;
                }
                if latest && !was_lagging {
                    continue; // now lagging: the item may replace its topic's
                }
            }
            break;
        }
        let was_idle = st.frames.is_empty() && st.control.is_empty();
        st.bytes += item.frame().len();
        st.frames.push_back(item);
        drop(st);
        // The writer re-checks the queue after every write, so it only needs a wake-up
        // when the queue goes from empty to non-empty.
        if was_idle {
            self.wake();
        }
        true
    }

    /// The queue overflowed and the policies could not make room: closes 4008,
    /// counting `refused` publications besides the queued ones as dropped.
    fn overflow(&self, mut st: parking_lot::MutexGuard<'_, State>, refused: u64) {
        st.dropped += refused + st.frames.iter().filter(|i| i.born != 0).count() as u64;
        Self::start_close(&mut st, Disconnect::SlowConsumer, None);
        drop(st);
        self.wake();
    }

    /// Queues a ping or pong, to be written ahead of queued messages. Counts against
    /// the byte limit like anything else (a ping flood from a client that does not
    /// read makes it a slow consumer).
    pub fn push_control(&self, frame: Bytes) -> bool {
        let mut st = self.state.lock();
        if st.closing.is_some() {
            return false;
        }
        if st.bytes + frame.len() > self.limit && !st.make_room(frame.len(), self.limit) {
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
        st.rare().inbox.push(command);
        drop(st);
        // The reader runs in the writer's task: waking the writer polls it too.
        self.wake();
        true
    }

    /// Ready when a server command waits ([`Outbox::take_command`]). Only the
    /// session's reader polls here, and it must run in the same task as the writer:
    /// [`Outbox::command`] wakes that task through the writer's waker, so an idle
    /// connection keeps one waker, not two.
    pub fn poll_command(&self) -> Poll<()> {
        let st = self.state.lock();
        if st.rare.as_ref().is_some_and(|r| !r.inbox.is_empty()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The oldest server command waiting, if any.
    pub fn take_command(&self) -> Option<ServerCommand> {
        let mut st = self.state.lock();
        let rare = st.rare.as_mut()?;
        (!rare.inbox.is_empty()).then(|| rare.inbox.remove(0))
    }

    /// Wakes the writer unless a wake-up is already pending.
    fn wake(&self) {
        if !self.signaled.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn start_close(st: &mut State, reason: Disconnect, frame: Option<Bytes>) {
        st.closing = Some(reason);
        if frame.is_some() {
            st.rare().close_frame = frame;
        }
        if reason.discards_queue() {
            st.frames = VecDeque::new();
            st.control = Vec::new();
            st.bytes = 0;
        }
    }

    /// Frees the queue's buffers if nothing is queued: an idle connection keeps none
    /// (the heartbeat calls this before each ping). Returns the publications the
    /// policies dropped since the last call, for the metrics, and frees the policy
    /// state of a connection that no longer lags.
    pub fn trim(&self) -> PolicyDrops {
        let mut st = self.state.lock();
        if st.frames.is_empty() && st.frames.capacity() > 0 {
            st.frames = VecDeque::new();
        }
        if st.control.is_empty() && st.control.capacity() > 0 {
            st.control = Vec::new();
        }
        let drops = st.take_drops();
        if st
            .rare
            .as_ref()
            .is_some_and(|r| !r.lagging && r.close_frame.is_none() && r.inbox.is_empty())
        {
            st.rare = None;
        }
        drops
    }

    /// The publications the policies dropped since the last call (or [`Outbox::trim`]).
    pub fn take_policy_drops(&self) -> PolicyDrops {
        self.state.lock().take_drops()
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
        if let Some(rare) = st.rare.as_mut() {
            rare.lagging = false; // the writer caught up with everything queued
        }
        st.closing
    }

    /// The close frame to send instead of the reason's own, if any.
    pub fn take_close_frame(&self) -> Option<Bytes> {
        self.state
            .lock()
            .rare
            .as_mut()
            .and_then(|r| r.close_frame.take())
    }

    /// Waits until something is pushed or a close is requested.
    ///
    /// Only the connection's writer may wait here (one waker is kept).
    ///
    /// # Cancel safety
    /// Cancel safe: a signal not consumed stays for the next call.
    pub async fn notified(&self) {
        poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// [`Outbox::notified`] as a poll: ready once something was pushed or a close
    /// requested since the last ready poll (or [`Outbox::take_batch`]).
    pub fn poll_notified(&self, cx: &mut std::task::Context<'_>) -> Poll<()> {
        if self.signaled.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Re-checked after registering: a signal set in between would otherwise wake
        // nobody.
        if self.signaled.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }
}

impl Subscriber for Outbox {
    fn deliver(&self, publication: &Publication) {
        // A clone of the publication is one reference-count increment, whatever it
        // carries: every subscriber shares the frame encoded once by the broker (and
        // its tag), and every compressing subscriber the frame compressed once, by
        // the first of them (when the push measures it).
        self.push_item(Item::publication(
            publication.clone(),
            self.deflate,
            publication.accepted_at.max(1),
        ));
    }
}

/// The slow-consumer policies, on the queue under its lock.
impl State {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Default::default)
    }

    fn lagging(&self) -> bool {
        self.rare.as_ref().is_some_and(|r| r.lagging)
    }

    fn take_drops(&mut self) -> PolicyDrops {
        self.rare
            .as_mut()
            .map(|r| std::mem::take(&mut r.drops))
            .unwrap_or_default()
    }

    /// Replaces the item at `i`, keeping the byte count.
    fn replace(&mut self, i: usize, item: Item) {
        self.bytes = self.bytes - self.frames[i].frame().len() + item.frame().len();
        self.frames[i] = item;
    }

    /// Makes room for `need` more bytes under `limit`: the first time since the
    /// writer last took the queue, conflates its `latest` publications; then drops
    /// the oldest `drop_oldest` ones. `false` when that is not enough; nothing is
    /// allocated when nothing queued has a policy.
    fn make_room(&mut self, need: usize, limit: usize) -> bool {
        if !self.frames.iter().any(|i| i.tag().is_some()) {
            return false;
        }
        if !self.lagging() {
            self.rare().lagging = true;
            self.conflate_all();
        }
        let mut i = 0;
        while self.bytes + need > limit {
            match self
                .frames
                .range(i..)
                .position(|it| it.tag_is(SlowConsumer::DropOldest))
            {
                Some(k) => i = self.drop_at(i + k),
                None => return false,
            }
        }
        true
    }

    /// Drops the `drop_oldest` publication at `i`; returns where to look for the
    /// next one. On a stream it is replaced by a `reset` up to its seq, merged into
    /// the topic's previous item when that is a `reset` of the same epoch (nothing
    /// of the topic between them: one `reset` covers both).
    fn drop_at(&mut self, i: usize) -> usize {
        self.rare().drops.oldest += 1;
        let item = &self.frames[i];
        if item.tag().is_some_and(|t| t.position.is_none()) {
            let gone = self.frames.remove(i).expect("in the queue");
            self.bytes -= gone.frame().len();
            return i;
        }
        // A stream's: its tag is needed while the queue changes.
        let Body::Publication(p, _) = &item.body else {
            unreachable!("a tagged publication")
        };
        let p = p.clone();
        let tag = p.tag.as_ref().expect("tagged");
        let (seq, epoch) = tag.position.as_ref().expect("a stream's");
        let prev = self
            .frames
            .range(..i)
            .rposition(|it| it.of_topic(&tag.topic).is_some());
        if let Some(j) = prev {
            let p = self.frames[j].tag().expect("of the topic");
            if p.kind == TagKind::Reset && p.position.as_ref().is_some_and(|(_, e)| e == epoch) {
                self.replace(j, Item::reset(tag, *seq, epoch));
                let gone = self.frames.remove(i).expect("in the queue");
                self.bytes -= gone.frame().len();
                return i;
            }
        }
        self.replace(i, Item::reset(tag, *seq, epoch));
        i + 1
    }

    /// A `latest` publication while lagging: takes the place of its topic's queued
    /// one, if the topic's last queued item is a publication (not a `reset`).
    /// `Err` gives the item back when there is none.
    fn conflate_push(&mut self, item: Item) -> Result<(), Item> {
        let topic = &item.tag().expect("tagged").topic;
        let last = self
            .frames
            .iter()
            .rposition(|it| it.of_topic(topic).is_some());
        match last {
            Some(j) if self.frames[j].tag_is(SlowConsumer::Latest) => {
                let merged = self.conflate(j, item);
                self.replace(j, merged);
                Ok(())
            }
            _ => Err(item),
        }
    }

    /// What takes the place of the `latest` publication at `j` when `item`, the next
    /// one of its topic, arrives: `item` itself, or on a stream one buffer with a
    /// `reset` up to the replaced publication's seq and then `item`.
    fn conflate(&mut self, j: usize, item: Item) -> Item {
        self.rare().drops.conflated += 1;
        let old = self.frames[j].tag().expect("tagged");
        let new = item.tag().expect("tagged");
        let Some((seq, epoch)) = &new.position else {
            return item;
        };
        let upto = match &old.position {
            Some((s, e)) if e == epoch => *s,
            // Another epoch (its announcement was lost with the replaced one): what
            // came before this publication in its own epoch is lost.
            _ => seq.saturating_sub(1),
        };
        let reset = Publication::reset(&new.topic, upto, epoch);
        let mut buf = BytesMut::with_capacity(reset.frame.len() + item.frame().len());
        buf.put_slice(&reset.frame);
        buf.put_slice(item.frame());
        let p = Publication::from_frame(buf.freeze(), 0).with_tag(Tag {
            kind: TagKind::ResetThenMessage(upto),
            ..Tag::clone(new)
        });
        Item::publication(p, false, item.born)
    }

    /// Conflates what was queued before the queue lagged: of each `latest` topic's
    /// run of publications (nothing else of the topic between them) only the newest
    /// stays, in the place of the first.
    fn conflate_all(&mut self) {
        if !self.frames.iter().any(|i| i.tag_is(SlowConsumer::Latest)) {
            return;
        }
        let mut last: HashMap<Arc<str>, usize> = HashMap::new();
        let mut removed = false;
        for i in 0..self.frames.len() {
            let Some(tag) = self.frames[i].tag() else {
                continue;
            };
            let mergeable = tag.kind == TagKind::Message && tag.policy == SlowConsumer::Latest;
            match last.get(&*tag.topic).copied() {
                Some(j) if mergeable && self.frames[j].tag_is(SlowConsumer::Latest) => {
                    let item = std::mem::replace(&mut self.frames[i], Item::new(Bytes::new(), 0));
                    self.bytes -= item.frame().len();
                    let merged = self.conflate(j, item);
                    self.replace(j, merged);
                    removed = true;
                }
                _ => {
                    last.insert(tag.topic.clone(), i);
                }
            }
        }
        if removed {
            // Every real frame has a header: the empty ones are the replaced.
            self.frames.retain(|i| !i.frame().is_empty());
        }
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

    /// The texts of every frame taken, in order (a conflated stream item holds two).
    fn texts(b: &Batch) -> Vec<String> {
        let mut out = Vec::new();
        for item in &b.frames {
            let mut f = &item.frame()[..];
            while !f.is_empty() {
                let (hl, len) = match f[1] & 0x7f {
                    126 => (4, u16::from_be_bytes([f[2], f[3]]) as usize),
                    n => (2, n as usize),
                };
                out.push(String::from_utf8(f[hl..hl + len].to_vec()).unwrap());
                f = &f[hl + len..];
            }
        }
        out
    }

    fn take_texts(ob: &Outbox) -> Vec<String> {
        let mut b = Batch::default();
        assert!(ob.take(&mut b).is_none(), "still open");
        texts(&b)
    }

    /// A reply's frame, 60 bytes.
    fn reply() -> Bytes {
        wsgate_fanout::frame::text(&[b'r'; 58])
    }

    fn epoch() -> Arc<str> {
        Arc::from("e1")
    }

    /// A publication of `topic` with `policy`, a stream's when `seq` is given. Its
    /// frame is 60 bytes (the data is padded), 68 on a stream.
    fn publication(policy: SlowConsumer, topic: &str, n: u64, seq: Option<u64>) -> Publication {
        let data = format!("{n:0>22}");
        let ep = epoch();
        let p = match seq {
            Some(s) => Publication::encode_seq(topic, data.as_bytes(), 1, s),
            None => Publication::encode(topic, data.as_bytes(), 1),
        };
        p.with_policy(policy, topic, seq.map(|s| (s, &ep)), TagKind::Message)
    }

    fn msg(topic: &str, n: u64) -> String {
        format!(r#"{{"op":"message","topic":"{topic}","data":{n:0>22}}}"#)
    }

    fn smsg(topic: &str, n: u64) -> String {
        format!(r#"{{"op":"message","topic":"{topic}","data":{n:0>22},"seq":{n}}}"#)
    }

    fn reset(topic: &str, seq: u64) -> String {
        format!(r#"{{"op":"reset","topic":"{topic}","seq":{seq},"epoch":"e1"}}"#)
    }

    #[test]
    fn frames_of_the_tests_have_the_sizes_said() {
        let p = publication(SlowConsumer::DropOldest, "t", 1, None);
        assert_eq!(p.frame.len(), 60);
        let p = publication(SlowConsumer::DropOldest, "t", 1, Some(1));
        assert_eq!(p.frame.len(), 68);
    }

    #[test]
    fn drop_oldest_drops_only_its_own_and_keeps_the_connection() {
        let ob = Outbox::new(600);
        ob.push(reply(), 0); // never dropped
        ob.deliver(&publication(SlowConsumer::Disconnect, "d", 0, None)); // untagged
        for n in 1..=8 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "f", n, None));
        }
        assert_eq!(ob.queued_bytes(), 600);
        ob.deliver(&publication(SlowConsumer::DropOldest, "f", 9, None));
        ob.deliver(&publication(SlowConsumer::DropOldest, "f", 10, None));
        assert_eq!(ob.closing(), None);
        assert_eq!(ob.queued_bytes(), 600);
        assert_eq!(ob.take_policy_drops().oldest, 2);
        let t = take_texts(&ob);
        assert_eq!(t.len(), 10);
        assert_eq!(t[1], msg("d", 0), "the disconnect namespace's stays");
        let kept: Vec<String> = (3..=10).map(|n| msg("f", n)).collect();
        assert_eq!(t[2..], kept[..], "the newest, in order");
        assert_eq!(ob.take_policy_drops(), PolicyDrops::default(), "taken");
    }

    #[test]
    fn drop_oldest_cuts_when_only_what_it_may_not_drop_remains() {
        let ob = Outbox::new(600);
        ob.deliver(&publication(SlowConsumer::DropOldest, "f", 1, None));
        for n in 0..9 {
            ob.deliver(&publication(SlowConsumer::Disconnect, "d", n, None));
        }
        assert_eq!(ob.queued_bytes(), 600);
        ob.deliver(&publication(SlowConsumer::Disconnect, "d", 9, None));
        assert_eq!(ob.closing(), None, "f:1 made room");
        assert_eq!(ob.queued_bytes(), 600);
        ob.deliver(&publication(SlowConsumer::DropOldest, "f", 2, None));
        assert_eq!(ob.closing(), Some(Disconnect::SlowConsumer));
        assert_eq!(ob.queued_bytes(), 0);
        assert_eq!(ob.dropped(), 11, "10 queued and the refused one");
    }

    #[test]
    fn the_default_closes_4008_without_any_policy_state() {
        let ob = Outbox::new(600);
        for n in 0..10 {
            ob.deliver(&publication(SlowConsumer::Disconnect, "d", n, None));
        }
        assert!(ob.state.lock().rare.is_none());
        ob.deliver(&publication(SlowConsumer::Disconnect, "d", 10, None));
        assert_eq!(ob.closing(), Some(Disconnect::SlowConsumer));
        assert!(ob.state.lock().rare.is_none(), "nothing allocated");
        assert_eq!(ob.dropped(), 11);
    }

    #[test]
    fn latest_keeps_the_newest_of_each_topic_in_the_first_ones_place() {
        let ob = Outbox::new(600);
        // a:1 b:1 a:2 r b:2 a:3 ... fills 600 bytes with 10 frames.
        let seq = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)];
        for (t, n) in seq {
            ob.deliver(&publication(SlowConsumer::Latest, t, n, None));
        }
        ob.push(reply(), 0);
        for (t, n) in [("c", 1), ("a", 4), ("b", 3), ("c", 2)] {
            ob.deliver(&publication(SlowConsumer::Latest, t, n, None));
        }
        assert_eq!(ob.queued_bytes(), 600);
        assert!(
            !ob.state.lock().lagging(),
            "no overflow yet: nothing replaced"
        );
        ob.deliver(&publication(SlowConsumer::Latest, "a", 5, None));
        assert_eq!(ob.closing(), None);
        // Conflated to a b (reply) c, then a:5 replaced a:4 in place.
        assert_eq!(ob.queued_bytes(), 240);
        // While lagging every newer publication takes its topic's place.
        ob.deliver(&publication(SlowConsumer::Latest, "c", 3, None));
        ob.deliver(&publication(SlowConsumer::Latest, "d", 1, None));
        ob.deliver(&publication(SlowConsumer::Latest, "b", 4, None));
        assert_eq!(ob.take_policy_drops().conflated, 9);
        let t = take_texts(&ob);
        assert_eq!(t.len(), 5);
        assert_eq!(
            [&t[0], &t[1], &t[3], &t[4]],
            [&msg("a", 5), &msg("b", 4), &msg("c", 3), &msg("d", 1)]
        );
        // Caught up: no longer lagging, so nothing is replaced.
        ob.deliver(&publication(SlowConsumer::Latest, "a", 6, None));
        ob.deliver(&publication(SlowConsumer::Latest, "a", 7, None));
        assert_eq!(take_texts(&ob), [msg("a", 6), msg("a", 7)]);
        assert_eq!(ob.trim(), PolicyDrops::default());
        assert!(ob.state.lock().rare.is_none(), "freed once caught up");
    }

    #[test]
    fn a_stream_dropped_by_drop_oldest_gets_one_reset_covering_exactly_the_drop() {
        let ob = Outbox::new(700);
        // 10 frames of 68 bytes: 680.
        for n in 1..=10 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "s", n, Some(n)));
        }
        for n in 11..=20 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "s", n, Some(n)));
            assert_eq!(ob.closing(), None);
            assert!(ob.queued_bytes() <= 700);
        }
        let drops = ob.take_policy_drops().oldest;
        let t = take_texts(&ob);
        let first_kept = 20 - (t.len() as u64 - 2);
        assert_eq!(t[0], reset("s", first_kept - 1), "{t:?}");
        assert_eq!(drops, first_kept - 1);
        let kept: Vec<String> = (first_kept..=20).map(|n| smsg("s", n)).collect();
        assert_eq!(t[1..], kept[..]);
    }

    #[test]
    fn resets_of_two_streams_stay_apart_and_follow_what_was_delivered() {
        let ob = Outbox::new(700);
        for n in 1..=5 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "s", n, Some(n)));
            ob.deliver(&publication(SlowConsumer::DropOldest, "u", n, Some(n)));
        }
        for n in 6..=9 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "s", n, Some(n)));
            ob.deliver(&publication(SlowConsumer::DropOldest, "u", n, Some(n)));
        }
        assert_eq!(ob.closing(), None);
        let t = take_texts(&ob);
        // Per topic: at most one reset, first, then a contiguous run to 9.
        for topic in ["s", "u"] {
            let of: Vec<&String> = t
                .iter()
                .filter(|x| x.contains(&format!("\"topic\":\"{topic}\"")))
                .collect();
            let r = of[0];
            assert!(r.starts_with(r#"{"op":"reset""#), "{of:?}");
            let upto: u64 = r
                .split("\"seq\":")
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let rest: Vec<String> = (upto + 1..=9).map(|n| smsg(topic, n)).collect();
            let got: Vec<String> = of[1..].iter().map(|s| s.to_string()).collect();
            assert_eq!(got, rest, "{topic}: {of:?}");
        }
    }

    #[test]
    fn a_stream_under_latest_announces_what_it_replaced() {
        let ob = Outbox::new(300);
        for n in 1..=4 {
            ob.deliver(&publication(SlowConsumer::Latest, "s", n, Some(n)));
        }
        assert_eq!(ob.queued_bytes(), 272);
        ob.deliver(&publication(SlowConsumer::Latest, "s", 5, Some(5)));
        ob.deliver(&publication(SlowConsumer::Latest, "s", 6, Some(6)));
        assert_eq!(ob.closing(), None);
        assert_eq!(take_texts(&ob), [reset("s", 5), smsg("s", 6)]);
        assert_eq!(ob.take_policy_drops().conflated, 5);
    }

    #[test]
    fn a_node_reset_is_kept_and_extended_by_later_drops() {
        let ob = Outbox::new(400);
        let ep = epoch();
        let p = Publication::reset("s", 3, &ep).with_policy(
            SlowConsumer::DropOldest,
            "s",
            Some((3, &ep)),
            TagKind::Reset,
        );
        ob.deliver(&p);
        for n in 4..=10 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "s", n, Some(n)));
        }
        assert_eq!(ob.closing(), None);
        let t = take_texts(&ob);
        assert_eq!(t[0], reset("s", 10 - (t.len() as u64 - 1)), "{t:?}");
        assert!(!t[1..].iter().any(|x| x.contains("reset")), "{t:?}");
    }

    #[test]
    fn a_ping_into_a_full_queue_makes_room_too() {
        let ob = Outbox::new(600);
        for n in 0..10 {
            ob.deliver(&publication(SlowConsumer::DropOldest, "f", n, None));
        }
        ob.push_control(frame(2));
        assert_eq!(ob.closing(), None);
        assert_eq!(ob.queued_bytes(), 542);
    }

    #[test]
    fn a_queued_item_is_one_reference_whatever_its_policy() {
        // The idle footprint and the per-subscriber cost: a frame's or a
        // publication's reference and the accept time, no tag of its own.
        assert!(std::mem::size_of::<Item>() <= 40);
        let ob = Outbox::new(1000);
        let p = publication(SlowConsumer::Latest, "a", 1, Some(1));
        ob.deliver(&p);
        let mut b = Batch::default();
        ob.take(&mut b);
        let Body::Publication(queued, false) = &b.frames[0].body else {
            panic!("{:?}", b.frames[0]);
        };
        assert!(std::ptr::eq(&**queued, &*p), "shared, not copied");
        assert_eq!(b.frames[0].frame().as_ptr(), p.frame.as_ptr());
    }

    #[test]
    fn a_compressing_connection_queues_the_compressed_frame_under_every_policy() {
        let data = format!("\"{}\"", "abc".repeat(200));
        let ob = Outbox::new(1000).with_deflate(true);
        let mut sent = Vec::new();
        for (n, policy) in [
            SlowConsumer::Disconnect,
            SlowConsumer::DropOldest,
            SlowConsumer::Latest,
        ]
        .into_iter()
        .enumerate()
        {
            let p = Publication::encode("z", data.as_bytes(), 1)
                .with_policy(policy, "z", None, TagKind::Message)
                .compressible(true);
            ob.deliver(&p);
            sent.push(p);
            let mut b = Batch::default();
            ob.take(&mut b);
            let f = b.frames[0].frame();
            assert_eq!(f[0], 0x80 | wsgate_fanout::deflate::RSV1 | 1, "{n}");
            assert!(f.len() < data.len() / 4);
            assert_eq!(b.bytes, f.len(), "counted compressed");
            assert_eq!(f.as_ptr(), sent[n].deflated_frame().as_ptr(), "shared");
        }
        // A lagging compressing connection drops by the compressed sizes.
        let size = sent[1].deflated_frame().len();
        let ob = Outbox::new(size * 4).with_deflate(true);
        for _ in 0..10 {
            ob.deliver(&sent[1]);
        }
        assert_eq!(ob.closing(), None);
        assert_eq!(ob.queued_bytes(), size * 4);
        assert_eq!(ob.take_policy_drops().oldest, 6);
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
