//! One WebSocket session, from upgrade to close: its lifecycle, its commands, and the
//! queues and tasks around it.
//!
//! # Layout
//! - this file: the lifecycle. [`run`] opens a session (registers it, queues its
//!   `welcome`), runs its reader and writer side by side, and closes it (leaves every
//!   topic, counts and logs the end).
//! - [`client`]: [`Client`], the whole state of one client (identity, topics, limits,
//!   pending replies), its read loop and the command dispatch.
//! - one file per command family: [`subscribe`] (`subscribe`, `unsubscribe`, and
//!   the server API's subscriptions), [`publish`], [`presence`] (`presence`,
//!   `presence_stats`), [`refresh`] (and the token-expiry task).
//! - [`replies`]: the ordered replies queue (a reply never overtakes a publication
//!   the broker has not answered yet).
//! - [`topics`]: the set of a client's topics, small for the common one or two.
//! - [`ratelimit`]: the per-connection command budget.
//! - [`outbox`]: the byte-bounded, non-blocking outbound queue (the hub's
//!   [`wsgate_fanout::Subscriber`]) between the fan-out and the writer.
//! - [`writer`]: the half that alone writes to the socket: batches, one flush per
//!   batch, close frames.
//! - [`sse`]: the same session over Server-Sent Events (`GET /sse`): no reader, and a
//!   write half that turns the WebSocket frames into events.
//! - [`registry`]: the live sessions, pinged (or closed 4000) by one shared
//!   heartbeat ticker; the drain walks the same table.
//!
//! One task per connection runs two loops side by side: the client's reader, which
//! reads frames and runs commands, and the [`Writer`], which alone owns the write
//! half. (Two tasks would cost a second task allocation and join handle per
//! connection, a few hundred bytes of an idle connection's budget.) Frames are read
//! with [`FrameReader`], which holds no buffer while the client is quiet and is cancel
//! safe.

mod client;
pub mod outbox;
mod presence;
mod publish;
pub(crate) mod ratelimit;
mod refresh;
pub(crate) mod registry;
mod replies;
pub(crate) mod sse;
mod subscribe;
mod topics;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{debug, Instrument};
use wsgate_fanout::frame;

use crate::close::Disconnect;
use crate::gateway::{ConnectionSlot, Gateway};
use crate::protocol;
use crate::security::iplimit::IpSlot;
use crate::security::Admitted;
use crate::ws::message::Assembler;
use crate::ws::read::FrameReader;

use self::client::Client;
use self::outbox::{Outbox, ServerCommand};
use self::ratelimit::RateLimiter;
use self::refresh::{expiry, set_deadline};
use self::registry::Key;
use self::topics::TopicSet;
use self::writer::Writer;

/// A session id as clients see it (`welcome`'s `session`): 16 hex digits.
pub(crate) fn session_name(id: u64) -> String {
    format!("{id:016x}")
}

/// A session id as clients see it, back to its number; `None` if it cannot be one.
pub(crate) fn session_number(name: &str) -> Option<u64> {
    (name.len() == 16)
        .then(|| u64::from_str_radix(name, 16).ok())
        .flatten()
}

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
    /// What permessage-deflate the handshake negotiated.
    pub deflate: crate::ws::deflate::Deflate,
    /// Bytes of the WebSocket stream read with the upgrade request (usually none).
    pub prefix: bytes::Bytes,
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
    let deflate = start.deflate.on;
    let (session, span) = open(gw.clone(), read, write, start);
    gw.metrics.transport_connection("websocket", deflate, 1);
    InSpan::new(span, session.run())
}

pin_project_lite::pin_project! {
    /// A future polled inside a tracing span, like tracing's `Instrumented`, but
    /// holding the span on the heap, and only when it is enabled: `Instrumented`
    /// keeps the span (40 bytes) inline, in the memory every connection keeps for
    /// its whole life, also when the level filters the span out (`--log-level warn`).
    struct InSpan<F> {
        span: Option<Box<tracing::Span>>,
        #[pin]
        fut: F,
    }
}

impl<F> InSpan<F> {
    fn new(span: tracing::Span, fut: F) -> Self {
        InSpan {
            span: (!span.is_disabled()).then(|| Box::new(span)),
            fut,
        }
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.as_ref().map(|s| s.enter());
        this.fut.poll(cx)
    }
}

/// A running session: what its task holds for the connection's life.
struct Session<R, W> {
    client: Client,
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
    let session_id = gw.session_of(id);
    let session = session_name(session_id);
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
        deflate,
        prefix,
        ..
    } = start;
    let Admitted { identity, ip_slot } = admitted;
    gw.metrics.connections_accepted.inc();
    debug!("connected");
    let outbox = Arc::new(Outbox::new(cfg.outbound_queue_bytes).with_deflate(deflate.send));
    if mode == Mode::PubSub {
        // An echo client expects only its own messages back.
        let welcome = protocol::welcome(
            &session,
            &gw.node_id,
            cfg.heartbeat_interval.as_millis() as u64,
            gw.reconnect_hint_ms(),
        );
        outbox.push(frame::text(welcome.as_bytes()), 0);
    }
    let user = (!identity.subject.is_empty()).then(|| Arc::from(identity.subject.as_str()));
    let key = gw.sessions.insert(outbox.clone(), session_id, user);
    if mode == Mode::PubSub && !identity.topics.is_empty() {
        // The token's server-side subscriptions: the reader's first command.
        outbox.command(ServerCommand::Subscribe(identity.topics.clone()));
    }
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

    let frames = FrameReader::new(read, cfg.max_message_size)
        .with_deflate(deflate.on)
        .with_prefix(&prefix);
    let client = Client {
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
        client,
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
                    client,
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
                    () = client.run(frames) => None,
                };
                client.outbox.reader_finished();
                client.leave_all();
                match ended {
                    Some(reason) => reason,
                    None => writing.await,
                }
            };
            // Counted here and in `run`: an SSE session (session/sse.rs) shares `open`
            // and `close` and counts itself as `sse`.
            self.client
                .gw
                .metrics
                .transport_connection("websocket", self.frames.deflates(), -1);
            self.close(reason);
        }
    }

    /// Counts and logs the end of the session; frees its slots.
    fn close(self, reason: Disconnect) {
        let gw = &self.client.gw;
        gw.sessions.remove(self.key);
        gw.metrics.disconnected(reason.label());
        let label = if reason == Disconnect::SlowConsumer {
            "slow_consumer"
        } else {
            "disconnected"
        };
        gw.metrics.dropped(label, self.client.outbox.dropped());
        let drops = self.client.outbox.take_policy_drops();
        gw.metrics.dropped("drop_oldest", drops.oldest);
        gw.metrics.dropped("conflated", drops.conflated);
        let span = tracing::Span::current();
        span.record("disconnect.reason", reason.label());
        span.record("close.code", reason.code());
        debug!(reason = reason.label(), "disconnected");
        drop(self.client);
        drop(self.ip_slot);
        drop(self.slot);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

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
                    identity: crate::security::auth::Identity::anonymous(),
                    ip_slot: crate::security::iplimit::PerIpLimit::new(10)
                        .try_acquire("127.0.0.1".parse().unwrap())
                        .unwrap(),
                },
                mode: Mode::PubSub,
                deflate: Default::default(),
                prefix: bytes::Bytes::new(),
            })
        };
        // The plain-TCP halves, as in production.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (r, w) = server.into_split();
        let session = run(gw.clone(), r, w, *start());
        let (r, mut w) = tokio::io::split(tokio::io::duplex(64).0);
        let writer = Writer {
            outbox: Arc::new(Outbox::new(10)),
            stats: gw.metrics.delivery.clone(),
            heartbeat_timeout: std::time::Duration::from_secs(1),
        };
        let writer = writer.run(&mut w);
        let (session_b, writer_b) = (
            std::mem::size_of_val(&session),
            std::mem::size_of_val(&writer),
        );
        println!("session future {session_b} B, writer future {writer_b} B");
        // tokio's task cell is the future plus ~120 bytes of header, trailer and
        // wrappers, in steps of 128 bytes (its alignment): 504 B keeps the cell at
        // 640 B (it was 1,024 B with a 792 B future).
        assert!(session_b <= 504, "session future {session_b} B");
        assert!(writer_b <= 112, "writer future {writer_b} B");
        drop(writer);
        drop(r);
    }
}
