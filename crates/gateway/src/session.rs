//! One WebSocket session: the reader loop and the commands it runs.
//!
//! One task per connection runs two loops side by side: the reader, which reads
//! frames and runs commands, and the [`Writer`], which alone owns the write half.
//! (Two tasks would cost a second task allocation and join handle per connection,
//! a few hundred bytes of an idle connection's budget.) Frames are read with
//! [`FrameReader`], which holds no buffer while the client is quiet and is cancel
//! safe.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, Instrument};
use wsgate_fanout::{frame, PublishAck, PublishError, Source, Subscriber};

use crate::auth::Identity;
use crate::close::Disconnect;
use crate::frames::{op, Frame, FrameReader, ReadError};
use crate::heartbeat::Key;
use crate::iplimit::IpSlot;
use crate::outbox::Outbox;
use crate::protocol::{self, Command, CommandError, ErrorCode};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::security::Admitted;
use crate::state::{ConnectionSlot, Gateway};
use crate::writer::Writer;

/// What a session does with client messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `/ws`: the pub/sub protocol.
    PubSub,
    /// `/echo` (`--echo`): sends every message back, text as text, binary as binary.
    Echo,
}

/// Everything a session starts with besides its socket.
pub(crate) struct Start {
    pub peer: SocketAddr,
    pub slot: ConnectionSlot,
    pub admitted: Admitted,
    pub mode: Mode,
}

/// Starts a session on an upgraded connection; the future runs it to its end.
///
/// Not an `async fn`: what an async fn holds (its arguments, and locals even once
/// moved out) stays in the session task's memory, allocated once per connection
/// and kept for its whole life. Setting up in plain functions leaves the future
/// only what the session needs while it runs.
pub(crate) fn run<R, W>(
    gw: Arc<Gateway>,
    read: R,
    write: W,
    start: Start,
) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (session, span) = open(gw, read, write, start);
    session.run().instrument(span)
}

/// A running session: what the reader task holds for the connection's life.
struct Session<R, W> {
    reader: Reader,
    frames: FrameReader<R>,
    writer: Writer,
    write: W,
    key: Key,
    ip_slot: IpSlot,
    slot: ConnectionSlot,
}

/// Registers a new session and queues its welcome (and, with auth, starts its
/// expiry task).
fn open<R, W>(gw: Arc<Gateway>, read: R, write: W, start: Start) -> (Session<R, W>, tracing::Span)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let id = gw.next_session_id();
    let session = format!("{:016x}", rand::random::<u64>());
    // One span per connection, from upgrade to close (never one per message): it is
    // what OTLP export shows of a connection's life.
    let span = tracing::info_span!(
        "session",
        otel.kind = "server",
        session = %session,
        peer = %start.peer,
        disconnect.reason = tracing::field::Empty,
        close.code = tracing::field::Empty,
    );
    let _entered = span.enter();
    let cfg = &gw.config;
    let Start {
        slot,
        admitted,
        mode,
        ..
    } = start;
    let Admitted { identity, ip_slot } = admitted;
    gw.metrics.connections_accepted.inc();
    debug!("connected");
    let outbox = Arc::new(Outbox::new(cfg.outbound_queue_bytes));
    if mode == Mode::PubSub {
        // An echo client expects only its own messages back.
        let welcome = protocol::welcome(
            &session,
            &gw.node_id,
            cfg.heartbeat_interval.as_millis() as u64,
        );
        outbox.push(frame::text(welcome.as_bytes()), 0);
    }
    let key = gw.sessions.insert(outbox.clone());
    if gw.is_draining() {
        // Upgraded while the drain began: tell it to go elsewhere at once.
        outbox.close(Disconnect::Drain);
    }

    let writer = Writer {
        outbox: outbox.clone(),
        stats: gw.metrics.delivery.clone(),
        heartbeat_timeout: cfg.heartbeat_timeout,
    };

    // Token expiry is watched by a task of its own, only when tokens are used; it
    // ends when the reader (the sender) is dropped.
    let expires = gw.security.auth.is_some().then(|| {
        let (expires, deadline) = tokio::sync::watch::channel(0);
        set_deadline(&expires, &identity, cfg.jwt_leeway);
        gw.tracker
            .spawn(expiry(deadline, outbox.clone()).in_current_span());
        expires
    });

    let frames = FrameReader::new(read, cfg.max_message_size);
    let reader = Reader {
        outbox,
        gw: gw.clone(),
        id,
        topics: TopicSet::default(),
        limiter: RateLimiter::new(cfg.rate_burst, Instant::now()),
        replies: None,
        assembler: Assembler::new(cfg.max_message_size),
        identity,
        expires,
        mode,
    };
    drop(_entered);
    let session = Session {
        reader,
        frames,
        writer,
        write,
        key,
        ip_slot,
        slot,
    };
    (session, span)
}

impl<R: AsyncRead + Unpin + Send, W: AsyncWrite + Unpin + Send> Session<R, W> {
    /// An `async move` block rather than an `async fn`, whose argument would be
    /// stored twice in the future.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let reason = {
                let Session {
                    reader,
                    frames,
                    writer,
                    write,
                    ..
                } = &mut self;
                let mut writing = std::pin::pin!(writer.run(write));
                // The writer first: when it has ended the session, the reader stops
                // (its read is cancel safe; a command cut short leaves nothing that
                // `leave_all` does not undo).
                let ended = tokio::select! {
                    biased;
                    reason = &mut writing => Some(reason),
                    () = reader.run(frames) => None,
                };
                reader.outbox.reader_finished();
                reader.leave_all();
                match ended {
                    Some(reason) => reason,
                    None => writing.await,
                }
            };
            self.close(reason);
        }
    }

    /// Counts and logs the end of the session; frees its slots.
    fn close(self, reason: Disconnect) {
        let gw = &self.reader.gw;
        gw.sessions.remove(self.key);
        gw.metrics.disconnected(reason.label());
        let label = if reason == Disconnect::SlowConsumer {
            "slow_consumer"
        } else {
            "disconnected"
        };
        gw.metrics.dropped(label, self.reader.outbox.dropped());
        let span = tracing::Span::current();
        span.record("disconnect.reason", reason.label());
        span.record("close.code", reason.code());
        debug!(reason = reason.label(), "disconnected");
        drop(self.reader);
        drop(self.ip_slot);
        drop(self.slot);
    }
}

/// Reassembles fragmented messages, enforcing the size limit on the whole message
/// (the frame reader only bounds single frames) and validating UTF-8 as fragments
/// arrive.
struct Assembler {
    max: usize,
    buf: Vec<u8>,
    opcode: Option<u8>,
    /// Bytes of `buf` known to be valid UTF-8 (text messages).
    checked: usize,
}

enum Message {
    Text(Bytes),
    Binary(Bytes),
}

impl Assembler {
    fn new(max: usize) -> Self {
        Assembler {
            max,
            buf: Vec::new(),
            opcode: None,
            checked: 0,
        }
    }

    fn push(&mut self, frame: Frame) -> Result<Option<Message>, Disconnect> {
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

/// A session's topics: a sorted vector, a few bytes where a hash set would take a
/// hundred for the one or two topics most connections have.
#[derive(Default)]
struct TopicSet(Vec<Arc<str>>);

impl TopicSet {
    fn contains(&self, t: &str) -> bool {
        self.0.binary_search_by(|x| (**x).cmp(t)).is_ok()
    }

    /// Adds `t`; `false` if it was there.
    fn insert(&mut self, t: Arc<str>) -> bool {
        match self.0.binary_search_by(|x| (**x).cmp(&*t)) {
            Ok(_) => false,
            Err(i) => {
                // Grow one at a time while small (most sessions never have many
                // topics), by doubling beyond.
                if self.0.len() < 4 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, t);
                true
            }
        }
    }

    /// Removes `t`; `false` if it was not there.
    fn remove(&mut self, t: &str) -> bool {
        match self.0.binary_search_by(|x| (**x).cmp(t)) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter()
    }

    fn drain(&mut self) -> impl Iterator<Item = Arc<str>> {
        std::mem::take(&mut self.0).into_iter()
    }
}

struct Reader {
    gw: Arc<Gateway>,
    outbox: Arc<Outbox>,
    id: u64,
    /// Topics this session is subscribed to.
    topics: TopicSet,
    limiter: RateLimiter,
    /// Replies that must wait behind a publication the broker has not answered yet,
    /// in command order (see [`Replies`]). Started at the first such publication.
    replies: Option<mpsc::Sender<Pending>>,
    assembler: Assembler,
    /// Who the client is and what it may do (replaced by `refresh`).
    /// Behind an `Arc`: without auth every session shares one anonymous identity.
    identity: Arc<Identity>,
    /// When the session ends unless refreshed (unix seconds, leeway included),
    /// watched by the [`expiry`] task (only when auth is on).
    expires: Option<tokio::sync::watch::Sender<u64>>,
    mode: Mode,
}

/// Stores the close deadline of `identity`'s token.
fn set_deadline(expires: &tokio::sync::watch::Sender<u64>, identity: &Identity, leeway: Duration) {
    let exp = identity
        .expires
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let deadline = exp.saturating_add(leeway.as_secs());
    expires.send_replace(deadline.min(crate::auth::MAX_EXP));
}

/// Closes the session with 1008 when its token's deadline passes. A `refresh` moves
/// the deadline, later or earlier, and wakes the task to sleep again.
async fn expiry(mut expires: tokio::sync::watch::Receiver<u64>, outbox: Arc<Outbox>) {
    loop {
        let deadline = UNIX_EPOCH + Duration::from_secs(*expires.borrow_and_update());
        let left = deadline
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left.is_zero() {
            outbox.close(Disconnect::TokenExpired);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(left) => {}
            changed = expires.changed() => if changed.is_err() { return },
        }
    }
}

/// How a client's close frame (its payload) ends the session: the reason, and the
/// close frame we answer with (RFC 6455 §5.5.1, §7.4).
fn close_reply(payload: &[u8]) -> (Disconnect, Bytes) {
    match payload.len() {
        0 => (
            Disconnect::ClientClose,
            frame::encode(frame::OP_CLOSE, payload),
        ),
        1 => {
            let reason = Disconnect::ProtocolError;
            (reason, frame::close(reason.code(), reason.reason()))
        }
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if std::str::from_utf8(&payload[2..]).is_err() {
                let reason = Disconnect::InvalidUtf8;
                return (reason, frame::close(reason.code(), reason.reason()));
            }
            // Codes a peer may send (§7.4.1–7.4.2): not 1004–1006, 1015, or unassigned.
            if matches!(code, 1000..=1003 | 1007..=1013 | 3000..=4999) {
                (
                    Disconnect::ClientClose,
                    frame::encode(frame::OP_CLOSE, payload),
                )
            } else {
                let mut reply = 1002u16.to_be_bytes().to_vec();
                reply.extend_from_slice(&payload[2..]);
                (
                    Disconnect::ProtocolError,
                    frame::encode(frame::OP_CLOSE, &reply),
                )
            }
        }
    }
}

impl Reader {
    /// Reads and runs commands until the client ends the session (or breaks the
    /// protocol). Dropped mid-way when the writer ends first: the session is over.
    async fn run<R: AsyncRead + Unpin>(&mut self, frames: &mut FrameReader<R>) {
        loop {
            let result = frames.next().await;
            let frame = match result {
                Ok(frame) => frame,
                Err(e) => {
                    let reason = match e {
                        ReadError::Protocol(reason) => reason,
                        ReadError::Gone => Disconnect::ClientGone,
                    };
                    debug!(reason = reason.label(), "read ended");
                    self.outbox.close(reason);
                    return;
                }
            };
            self.outbox.heard(self.gw.sessions.now_ms());
            match frame.opcode {
                op::PING => {
                    self.outbox
                        .push_control(frame::encode(frame::OP_PONG, &frame.payload));
                    continue;
                }
                op::PONG => continue,
                op::CLOSE => {
                    let (reason, reply) = close_reply(&frame.payload);
                    self.outbox.close_with(reason, Some(reply));
                    return;
                }
                _ => {}
            }
            if frame.opcode == op::TEXT && frame.fin && std::str::from_utf8(&frame.payload).is_err()
            {
                self.outbox.close(Disconnect::InvalidUtf8);
                return;
            }
            self.gw
                .metrics
                .bytes_received
                .inc_by(frame.payload.len() as u64);
            let message = match self.assembler.push(frame) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(reason) => {
                    self.outbox.close(reason);
                    return;
                }
            };
            // Boxed: the commands' futures are large and short-lived, and an idle
            // session's future (kept for the connection's whole life) should not
            // reserve room for them.
            if !Box::pin(self.on_message(message)).await {
                return;
            }
        }
    }

    /// Runs one message; `false` ends the session.
    async fn on_message(&mut self, message: Message) -> bool {
        let cfg = &self.gw.config;
        let verdict = self
            .limiter
            .check(Instant::now(), cfg.rate_limit, cfg.rate_burst);
        if verdict == Verdict::Abuse {
            self.outbox.close(Disconnect::RateLimit);
            return false;
        }
        if self.mode == Mode::Echo {
            let frame = match &message {
                Message::Text(t) => frame::text(t),
                Message::Binary(b) => frame::encode(op::BINARY, b),
            };
            self.outbox.push(frame, 0);
            return true;
        }
        let text = match &message {
            Message::Text(t) => std::str::from_utf8(t).expect("validated UTF-8"),
            Message::Binary(_) => {
                self.reply_error(&CommandError::new(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported: send JSON text frames",
                ))
                .await;
                return true;
            }
        };
        let command = match protocol::decode(text) {
            Ok(c) => c,
            Err(e) => {
                self.reply_error(&e).await;
                return true;
            }
        };
        if verdict == Verdict::Reject {
            self.reply_error(&CommandError::new(
                command.id(),
                ErrorCode::RateLimited,
                "too many commands: slow down",
            ))
            .await;
            return true;
        }
        let reply = match command {
            Command::Subscribe { id, topics } => self.subscribe(id, topics).await,
            Command::Unsubscribe { id, topics } => Ok(self.unsubscribe(id, topics)),
            Command::Publish { id, topic, data } => {
                match self.publish(id, &topic, data.get().as_bytes()).await {
                    Ok(Some(reply)) => Ok(reply),
                    Ok(None) => return true,
                    Err(e) => Err(e),
                }
            }
            Command::Ping { id } => Ok(protocol::pong_reply(id)),
            Command::Refresh { id, token } => self.refresh(id, &token),
        };
        match reply {
            Ok(text) => self.reply(frame::text(text.as_bytes())).await,
            Err(e) => self.reply_error(&e).await,
        }
        true
    }

    /// Queues a reply behind any publication still waiting for the broker, so that
    /// replies leave in the order of the commands.
    async fn reply(&self, frame: Bytes) {
        match &self.replies {
            Some(tx) => {
                let _ = tx.send(Pending::Ready(frame)).await;
            }
            None => {
                self.outbox.push(frame, 0);
            }
        }
    }

    async fn reply_error(&self, err: &CommandError) {
        self.reply(frame::text(protocol::error_reply(err).as_bytes()))
            .await;
    }

    /// `refresh`: a new token replaces the session's identity and moves its expiry.
    /// Topics the new token no longer allows are left.
    fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<String, CommandError> {
        let Some(auth) = &self.gw.security.auth else {
            // Nothing expires without auth; accepting keeps clients that always
            // refresh working against an open gateway.
            return Ok(protocol::refreshed_reply(id));
        };
        let identity = auth
            .verify(token)
            .map_err(|e| CommandError::new(id, ErrorCode::Forbidden, e.to_string()))?;
        if identity.subject != self.identity.subject {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                "the new token is for another subject",
            ));
        }
        let revoked: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|t| !identity.subscribe.allows(t))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            self.unsubscribe(None, revoked);
        }
        if let Some(expires) = &self.expires {
            set_deadline(expires, &identity, self.gw.config.jwt_leeway);
        }
        self.identity = Arc::new(identity);
        Ok(protocol::refreshed_reply(id))
    }

    async fn subscribe(
        &mut self,
        id: Option<u64>,
        topics: Vec<Arc<str>>,
    ) -> Result<String, CommandError> {
        if let Some(t) = topics.iter().find(|t| !self.identity.subscribe.allows(t)) {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {}", protocol::json_string(t)),
            ));
        }
        let mut fresh: Vec<Arc<str>> = Vec::new();
        for t in &topics {
            if !self.topics.contains(t) && !fresh.contains(t) {
                fresh.push(t.clone());
            }
        }
        let max = self.gw.config.max_topics_per_connection;
        if self.topics.len() + fresh.len() > max {
            return Err(CommandError::new(
                id,
                ErrorCode::TooManyTopics,
                format!("at most {max} topics per connection"),
            ));
        }
        if !fresh.is_empty() {
            let sub: Arc<dyn Subscriber> = self.outbox.clone();
            for t in &fresh {
                self.topics.insert(t.clone());
            }
            if let Err(e) = self.gw.node.subscribe(self.id, &sub, &fresh).await {
                // The node took them out of the hub again.
                for t in &fresh {
                    self.topics.remove(t);
                }
                return Err(CommandError::new(id, ErrorCode::Unavailable, e.to_string()));
            }
        }
        Ok(protocol::topics_reply("subscribed", id, &topics))
    }

    fn unsubscribe(&mut self, id: Option<u64>, topics: Vec<Arc<str>>) -> String {
        let mine = &mut self.topics;
        self.gw
            .node
            .unsubscribe(self.id, topics.iter().filter(|t| mine.remove(t)).cloned());
        protocol::topics_reply("unsubscribed", id, &topics)
    }

    /// Leaves every topic (the session is over).
    fn leave_all(&mut self) {
        self.gw.node.unsubscribe(self.id, self.topics.drain());
    }

    /// Publishes; returns the reply now, or `None` when the reply will be queued by a
    /// task once the broker answers.
    async fn publish(
        &mut self,
        id: Option<u64>,
        topic: &str,
        data: &[u8],
    ) -> Result<Option<String>, CommandError> {
        let cfg = &self.gw.config;
        if !cfg.client_publish {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                "client publishing is disabled on this gateway",
            ));
        }
        if !self.identity.publish.allows(topic) {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!("not allowed to publish to {}", protocol::json_string(topic)),
            ));
        }
        // Ordering is fixed when `publish` returns, so later publishes from this
        // client cannot overtake this one even while its reply is pending.
        let mut ack = match self.gw.node.publish(Source::Client, topic, data) {
            Ok(ack) => ack,
            Err(e @ PublishError::TooLarge { .. }) => {
                return Err(CommandError::new(
                    id,
                    ErrorCode::PayloadTooLarge,
                    e.to_string(),
                ))
            }
            Err(e @ PublishError::InvalidTopic(_)) => {
                return Err(CommandError::new(
                    id,
                    ErrorCode::InvalidTopic,
                    format!("invalid topic: {e}"),
                ))
            }
        };
        if self.replies.is_none() {
            if let Some(result) = ack.now() {
                // The in-memory broker: answered (and counted) at once, nothing is
                // queued.
                return match result {
                    Ok(()) => Ok(Some(protocol::published_reply(id))),
                    Err(e) => Err(CommandError::new(id, ErrorCode::Unavailable, e.to_string())),
                };
            }
        }
        let tx = self.replies.get_or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.gw.config.max_inflight_publishes);
            let replies = Replies {
                rx,
                outbox: self.outbox.clone(),
            };
            self.gw.tracker.spawn(replies.run().in_current_span());
            tx
        });
        // At the limit this waits: the client's further commands stay in its socket
        // (TCP backpressure) instead of piling up here.
        let _ = tx.send(Pending::Publish { id, ack }).await;
        Ok(None)
    }
}

/// A reply waiting its turn in [`Replies`].
enum Pending {
    /// A publication the broker has not answered yet.
    Publish { id: Option<u64>, ack: PublishAck },
    /// Any other reply, made after such a publication.
    Ready(Bytes),
}

/// A session's publication replies, in command order: one task per connection that
/// publishes through an asynchronous broker (not one task per publication). The
/// broker answers in publish order (its pipeline is ordered), so awaiting the acks one
/// after another costs no extra round trips.
struct Replies {
    rx: mpsc::Receiver<Pending>,
    outbox: Arc<Outbox>,
}

impl Replies {
    async fn run(mut self) {
        while let Some(p) = self.rx.recv().await {
            let frame = match p {
                Pending::Ready(frame) => frame,
                Pending::Publish { id, ack } => {
                    // The ack counts the publication as it resolves.
                    let reply = match ack.await {
                        Ok(()) => protocol::published_reply(id),
                        Err(e) => protocol::error_reply(&CommandError::new(
                            id,
                            ErrorCode::Unavailable,
                            e.to_string(),
                        )),
                    };
                    frame::text(reply.as_bytes())
                }
            };
            self.outbox.push(frame, 0);
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn topic_set_is_a_set() {
        let mut s = TopicSet::default();
        for t in ["b", "a", "c", "a"] {
            s.insert(Arc::from(t));
        }
        assert_eq!(s.len(), 3);
        assert!(s.contains("a") && s.contains("c") && !s.contains("d"));
        assert_eq!(s.0.capacity(), 3, "no spare slots while small");
        assert!(s.remove("b") && !s.remove("b"));
        let rest: Vec<Arc<str>> = s.drain().collect();
        assert_eq!(rest, [Arc::from("a"), Arc::from("c")]);
        assert_eq!(s.len(), 0);
    }

    /// A session's future (its reader and writer loops) is allocated once per
    /// connection and kept for its whole life (docs/benchmarks.md, "Idle
    /// footprint"): it must stay small. Prints the sizes with `--nocapture`.
    #[tokio::test]
    async fn session_futures_stay_small() {
        let gw = Gateway::in_memory(
            crate::Config::for_tests(),
            wsgate_metrics::Metrics::default(),
        )
        .unwrap();
        let start = || {
            Box::new(Start {
                peer: "127.0.0.1:1".parse().unwrap(),
                slot: gw.try_reserve_connection().unwrap(),
                admitted: Admitted {
                    identity: Identity::anonymous(),
                    ip_slot: crate::iplimit::PerIpLimit::new(10)
                        .try_acquire("127.0.0.1".parse().unwrap())
                        .unwrap(),
                },
                mode: Mode::PubSub,
            })
        };
        // The plain-TCP halves, as in production.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (r, w) = server.into_split();
        let session = run(
            gw.clone(),
            crate::io::Prefixed::new(Bytes::new(), r),
            w,
            *start(),
        );
        let (r, mut w) = tokio::io::split(tokio::io::duplex(64).0);
        let writer = Writer {
            outbox: Arc::new(Outbox::new(10)),
            stats: gw.metrics.delivery.clone(),
            heartbeat_timeout: Duration::from_secs(1),
        };
        let writer = writer.run(&mut w);
        let (session_b, writer_b) = (
            std::mem::size_of_val(&session),
            std::mem::size_of_val(&writer),
        );
        println!("session future {session_b} B, writer future {writer_b} B");
        assert!(session_b <= 800, "session future {session_b} B");
        assert!(writer_b <= 320, "writer future {writer_b} B");
        drop(writer);
        drop(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Batch;
    use wsgate_fanout::{Broker, BrokerError, BrokerFuture};

    fn texts(ob: &Outbox) -> Vec<String> {
        let mut b = Batch::default();
        ob.take(&mut b);
        b.frames
            .iter()
            .map(|i| String::from_utf8(i.frame[2..].to_vec()).unwrap())
            .collect()
    }

    type Answer = tokio::sync::oneshot::Receiver<Result<(), BrokerError>>;

    /// A broker that answers each publication when the test says so.
    struct Manual(parking_lot::Mutex<std::collections::VecDeque<Answer>>);
    impl Broker for Manual {
        fn publish(&self, _: &str, _: &[u8], _: u64) -> BrokerFuture {
            let done = self.0.lock().pop_front().expect("an answer per publish");
            BrokerFuture::pending(async move { done.await.unwrap() })
        }
        fn subscribe(&self, _: Vec<Arc<str>>) -> BrokerFuture {
            BrokerFuture::ready(Ok(()))
        }
        fn release(&self, _: Vec<Arc<str>>) {}
        fn is_ready(&self) -> bool {
            true
        }
        fn kind(&self) -> &'static str {
            "manual"
        }
    }

    #[tokio::test]
    async fn replies_leave_in_command_order_whatever_order_the_broker_answers() {
        let (ack1, done1) = tokio::sync::oneshot::channel();
        let (ack2, done2) = tokio::sync::oneshot::channel();
        let answers = parking_lot::Mutex::new([done1, done2].into());
        let node = wsgate_fanout::Node::new(wsgate_metrics::Metrics::default(), 64, |_| {
            Ok::<_, ()>(Manual(answers))
        })
        .unwrap();
        let outbox = Arc::new(Outbox::new(1 << 20));
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(
            Replies {
                rx,
                outbox: outbox.clone(),
            }
            .run(),
        );
        let pending = |id| Pending::Publish {
            id: Some(id),
            ack: node.publish(Source::Client, "t", b"1").unwrap(),
        };
        tx.send(pending(1)).await.unwrap();
        tx.send(Pending::Ready(frame::text(b"{\"op\":\"pong\",\"id\":2}")))
            .await
            .unwrap();
        tx.send(pending(3)).await.unwrap();
        // The broker answers the later publication first, and refuses it.
        ack2.send(Err(BrokerError::Unavailable("down".into())))
            .unwrap();
        tokio::task::yield_now().await;
        assert!(texts(&outbox).is_empty(), "nothing may overtake id 1");
        ack1.send(Ok(())).unwrap();
        drop(tx);
        task.await.unwrap();
        let got = texts(&outbox);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], protocol::published_reply(Some(1)));
        assert_eq!(got[1], "{\"op\":\"pong\",\"id\":2}");
        assert!(
            got[2].contains("\"id\":3") && got[2].contains("unavailable"),
            "{}",
            got[2]
        );
        // Each publication was counted once, by its ack.
        let m = node.metrics();
        assert_eq!(m.received.client.get(), 1);
        assert_eq!(m.broker_publish_duration.get_sample_count(), 2);
    }
}
