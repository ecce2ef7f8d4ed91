//! One WebSocket session: the reader loop and the commands it runs.
//!
//! The session's own task reads frames and runs commands; a second task, the
//! [`Writer`], owns the write half. fastwebsockets' `read_frame` is not cancel safe,
//! so it only ever races the writer's exit, after which the session is over and no
//! other read happens: a partly read frame is never resumed.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Role, WebSocketError, WebSocketRead};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};
use wsgate_fanout::{frame, unix_nanos, BrokerError, BrokerFuture, Subscriber};

use crate::auth::Identity;
use crate::close::Disconnect;
use crate::outbox::Outbox;
use crate::protocol::{self, Command, CommandError, ErrorCode};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::security::Admitted;
use crate::state::{ConnectionSlot, Gateway};
use crate::writer::{Liveness, Writer};

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

/// Runs a session to its end on an upgraded connection.
pub(crate) async fn run<R, W>(gw: Arc<Gateway>, read: R, write: W, start: Start)
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
    run_inner(gw, read, write, id, session, start)
        .instrument(span)
        .await
}

async fn run_inner<R, W>(
    gw: Arc<Gateway>,
    read: R,
    write: W,
    id: u64,
    session: String,
    start: Start,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
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
    let welcome = protocol::welcome(
        &session,
        &gw.node_id,
        cfg.heartbeat_interval.as_millis() as u64,
    );
    if mode == Mode::PubSub {
        // An echo client expects only its own messages back.
        outbox.push(frame::text(welcome.as_bytes()), 0);
    }
    gw.sessions.insert(id, outbox.clone());
    if gw.is_draining() {
        // Upgraded while the drain began: tell it to go elsewhere at once.
        outbox.close(Disconnect::Drain);
    }

    let liveness = Arc::new(Liveness::new());
    let reader_done = CancellationToken::new();
    let writer_done = CancellationToken::new();
    let writer = Writer {
        outbox: outbox.clone(),
        liveness: liveness.clone(),
        metrics: gw.metrics.clone(),
        heartbeat_interval: cfg.heartbeat_interval,
        heartbeat_timeout: cfg.heartbeat_timeout,
        reader_done: reader_done.clone(),
    };
    let writer = {
        let writer_done = writer_done.clone();
        gw.tracker.spawn(
            async move {
                let reason = writer.run(write).await;
                writer_done.cancel();
                reason
            }
            .in_current_span(),
        )
    };

    let (expires, deadline) = tokio::sync::watch::channel(0);
    if gw.security.auth.is_some() {
        set_deadline(&expires, &identity, cfg.jwt_leeway);
        gw.tracker
            .spawn(expiry(deadline, outbox.clone(), reader_done.clone()).in_current_span());
    }

    let (ws, _) = fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Server);
    let mut reader = Reader {
        subscriber: outbox.clone(),
        outbox,
        gw: gw.clone(),
        id,
        topics: HashSet::new(),
        limiter: RateLimiter::new(cfg.rate_limit, cfg.rate_burst, Instant::now()),
        replies: None,
        liveness,
        assembler: Assembler::new(cfg.max_message_size),
        identity,
        expires,
        mode,
    };
    reader.run(ws, &writer_done).await;
    reader_done.cancel();
    reader.leave_all();

    let reason = writer.await.unwrap_or(Disconnect::Error);
    gw.sessions.remove(id);
    gw.metrics.disconnected(reason.label());
    let label = if reason == Disconnect::SlowConsumer {
        "slow_consumer"
    } else {
        "disconnected"
    };
    gw.metrics.dropped(label, reader.outbox.dropped());
    let span = tracing::Span::current();
    span.record("disconnect.reason", reason.label());
    span.record("close.code", reason.code());
    debug!(reason = reason.label(), "disconnected");
    drop(ip_slot);
    drop(slot);
}

/// Reassembles fragmented messages, enforcing the size limit on the whole message
/// (fastwebsockets only bounds single frames) and validating UTF-8 as fragments
/// arrive.
struct Assembler {
    max: usize,
    buf: Vec<u8>,
    opcode: Option<OpCode>,
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

    fn push(&mut self, frame: Frame<'_>) -> Result<Option<Message>, Disconnect> {
        match (frame.opcode, self.opcode) {
            (OpCode::Text | OpCode::Binary, Some(_)) => Err(Disconnect::ProtocolError),
            (OpCode::Continuation, None) => Err(Disconnect::ProtocolError),
            (OpCode::Text, None) if frame.fin => {
                // fastwebsockets has validated UTF-8 of unfragmented text.
                Ok(Some(Message::Text(Bytes::from(frame.payload.to_vec()))))
            }
            (OpCode::Binary, None) if frame.fin => {
                Ok(Some(Message::Binary(Bytes::from(frame.payload.to_vec()))))
            }
            (op @ (OpCode::Text | OpCode::Binary), None) => {
                self.opcode = Some(op);
                self.append(&frame.payload)?;
                Ok(None)
            }
            (OpCode::Continuation, Some(op)) => {
                self.append(&frame.payload)?;
                if !frame.fin {
                    return Ok(None);
                }
                self.opcode = None;
                self.checked = 0;
                let buf = std::mem::take(&mut self.buf);
                match op {
                    OpCode::Text => {
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
        if self.opcode == Some(OpCode::Text) {
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

struct Reader {
    gw: Arc<Gateway>,
    outbox: Arc<Outbox>,
    subscriber: Arc<Outbox>,
    id: u64,
    /// Topics this session is subscribed to.
    topics: HashSet<Arc<str>>,
    limiter: RateLimiter,
    /// Replies that must wait behind a publication the broker has not answered yet,
    /// in command order (see [`Replies`]). Started at the first such publication.
    replies: Option<mpsc::Sender<Pending>>,
    liveness: Arc<Liveness>,
    assembler: Assembler,
    /// Who the client is and what it may do (replaced by `refresh`).
    identity: Identity,
    /// When the session ends unless refreshed (unix seconds, leeway included),
    /// watched by the [`expiry`] task.
    expires: tokio::sync::watch::Sender<u64>,
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
async fn expiry(
    mut expires: tokio::sync::watch::Receiver<u64>,
    outbox: Arc<Outbox>,
    done: CancellationToken,
) {
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
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(left) => {}
            changed = expires.changed() => if changed.is_err() { return },
        }
    }
}

fn classify(err: &WebSocketError) -> Disconnect {
    match err {
        WebSocketError::FrameTooLarge => Disconnect::TooBig,
        WebSocketError::InvalidUTF8 => Disconnect::InvalidUtf8,
        WebSocketError::UnexpectedEOF
        | WebSocketError::IoError(_)
        | WebSocketError::ConnectionClosed => Disconnect::ClientGone,
        _ => Disconnect::ProtocolError,
    }
}

impl Reader {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        mut ws: WebSocketRead<R>,
        writer_done: &CancellationToken,
    ) {
        ws.set_auto_close(true);
        ws.set_auto_pong(true);
        // fastwebsockets refuses frames of `payload_len >= max`; ours is inclusive.
        ws.set_max_message_size(self.gw.config.max_message_size + 1);
        loop {
            // A close frame that fastwebsockets owes the client (the echo of its
            // close, or 1002 for a bad close code) is kept to be sent as ours.
            let mut owed_close: Option<Bytes> = None;
            let outbox = &self.outbox;
            let mut send = |f: Frame<'_>| {
                let bytes = frame::encode(f.opcode as u8, &f.payload);
                if f.opcode == OpCode::Close {
                    owed_close = Some(bytes);
                } else {
                    outbox.push_control(bytes);
                }
                std::future::ready(Ok::<(), Infallible>(()))
            };
            let result = tokio::select! {
                biased;
                _ = writer_done.cancelled() => return,
                r = ws.read_frame(&mut send) => r,
            };
            let frame = match result {
                Ok(frame) => frame,
                Err(e) => {
                    debug!(error = %e, "read ended");
                    self.outbox.close_with(classify(&e), owed_close);
                    return;
                }
            };
            self.liveness.touch();
            match frame.opcode {
                OpCode::Close => {
                    self.outbox.close_with(Disconnect::ClientClose, owed_close);
                    return;
                }
                OpCode::Ping | OpCode::Pong => continue,
                _ => {}
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
            if !self.on_message(message).await {
                return;
            }
        }
    }

    /// Runs one message; `false` ends the session.
    async fn on_message(&mut self, message: Message) -> bool {
        let verdict = self.limiter.check(Instant::now());
        if verdict == Verdict::Abuse {
            self.outbox.close(Disconnect::RateLimit);
            return false;
        }
        if self.mode == Mode::Echo {
            let frame = match &message {
                Message::Text(t) => frame::text(t),
                Message::Binary(b) => frame::encode(OpCode::Binary as u8, b),
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
        set_deadline(&self.expires, &identity, self.gw.config.jwt_leeway);
        self.identity = identity;
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
            // Into the hub first, so nothing published once the broker confirms can
            // miss this connection.
            let sub: Arc<dyn Subscriber> = self.subscriber.clone();
            for t in &fresh {
                self.gw.hub.subscribe(t, self.id, sub.clone());
                self.topics.insert(t.clone());
            }
            if let Err(e) = self.gw.broker.subscribe(fresh.clone()).await {
                let mut emptied = Vec::new();
                for t in fresh {
                    self.topics.remove(&t);
                    if self.gw.hub.unsubscribe(&t, self.id) {
                        emptied.push(t);
                    }
                }
                if !emptied.is_empty() {
                    self.gw.broker.release(emptied);
                }
                return Err(CommandError::new(id, ErrorCode::Unavailable, e.to_string()));
            }
        }
        Ok(protocol::topics_reply("subscribed", id, &topics))
    }

    fn unsubscribe(&mut self, id: Option<u64>, topics: Vec<Arc<str>>) -> String {
        let mut emptied = Vec::new();
        for t in &topics {
            if self.topics.remove(t) && self.gw.hub.unsubscribe(t, self.id) {
                emptied.push(t.clone());
            }
        }
        if !emptied.is_empty() {
            self.gw.broker.release(emptied);
        }
        protocol::topics_reply("unsubscribed", id, &topics)
    }

    /// Leaves every topic (the session is over).
    fn leave_all(&mut self) {
        let mut emptied = Vec::new();
        for t in self.topics.drain() {
            if self.gw.hub.unsubscribe(&t, self.id) {
                emptied.push(t);
            }
        }
        if !emptied.is_empty() {
            self.gw.broker.release(emptied);
        }
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
        let max = cfg.max_publication_size();
        if data.len() > max {
            return Err(CommandError::new(
                id,
                ErrorCode::PayloadTooLarge,
                format!("data is {} bytes; the limit is {max}", data.len()),
            ));
        }
        // Ordering is fixed when `publish` returns, so later publishes from this
        // client cannot overtake this one even while its reply is pending.
        let started = Instant::now();
        let mut ack = self.gw.broker.publish(topic, data, unix_nanos());
        if self.replies.is_none() {
            if let Some(result) = ack.now() {
                // The in-memory broker: answered at once, nothing is queued.
                self.gw
                    .metrics
                    .broker_publish_duration
                    .observe(started.elapsed().as_secs_f64());
                count_publish(&self.gw.metrics, &result);
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
                metrics: self.gw.metrics.clone(),
            };
            self.gw.tracker.spawn(replies.run().in_current_span());
            tx
        });
        // At the limit this waits: the client's further commands stay in its socket
        // (TCP backpressure) instead of piling up here.
        let _ = tx.send(Pending::Publish { id, started, ack }).await;
        Ok(None)
    }
}

/// A reply waiting its turn in [`Replies`].
enum Pending {
    /// A publication the broker has not answered yet.
    Publish {
        id: Option<u64>,
        started: Instant,
        ack: BrokerFuture,
    },
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
    metrics: wsgate_metrics::Metrics,
}

impl Replies {
    async fn run(mut self) {
        while let Some(p) = self.rx.recv().await {
            let frame = match p {
                Pending::Ready(frame) => frame,
                Pending::Publish { id, started, ack } => {
                    let result = ack.await;
                    self.metrics
                        .broker_publish_duration
                        .observe(started.elapsed().as_secs_f64());
                    count_publish(&self.metrics, &result);
                    let reply = match result {
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

/// Counts a client publication once the broker has answered: accepted ones are
/// received messages, refused ones are dropped.
fn count_publish(metrics: &wsgate_metrics::Metrics, result: &Result<(), BrokerError>) {
    match result {
        Ok(()) => metrics.received.client.inc(),
        Err(_) => metrics.dropped("broker_unavailable", 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Batch;

    fn texts(ob: &Outbox) -> Vec<String> {
        let mut b = Batch::default();
        ob.take(&mut b);
        b.frames
            .iter()
            .map(|i| String::from_utf8(i.frame[2..].to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn replies_leave_in_command_order_whatever_order_the_broker_answers() {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let (tx, rx) = mpsc::channel(8);
        let task = tokio::spawn(
            Replies {
                rx,
                outbox: outbox.clone(),
                metrics: wsgate_metrics::Metrics::default(),
            }
            .run(),
        );
        let (ack1, done1) = tokio::sync::oneshot::channel::<Result<(), BrokerError>>();
        let (ack2, done2) = tokio::sync::oneshot::channel::<Result<(), BrokerError>>();
        let pending =
            |id, done: tokio::sync::oneshot::Receiver<Result<(), BrokerError>>| Pending::Publish {
                id: Some(id),
                started: Instant::now(),
                ack: BrokerFuture::pending(async move { done.await.unwrap() }),
            };
        tx.send(pending(1, done1)).await.unwrap();
        tx.send(Pending::Ready(frame::text(b"{\"op\":\"pong\",\"id\":2}")))
            .await
            .unwrap();
        tx.send(pending(3, done2)).await.unwrap();
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
    }
}
