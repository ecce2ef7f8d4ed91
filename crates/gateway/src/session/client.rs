//! A client: its state, its read loop and the command dispatch.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;
use wsgate_fanout::frame::{self, op};

use super::outbox::Outbox;
use super::ratelimit::{RateLimiter, Verdict};
use super::replies::Pending;
use super::subscribe::By;
use super::topics::TopicSet;
use super::Mode;
use crate::close::Disconnect;
use crate::gateway::Gateway;
use crate::protocol::{self, Command, CommandError, ErrorCode};
use crate::security::auth::Identity;
use crate::ws::close::close_reply;
use crate::ws::message::{Assembler, Message};
use crate::ws::read::{FrameReader, ReadError};

/// The whole state of one client: who it is, what it is subscribed to, its limits and
/// pending replies. Owned by the session's reader loop.
pub(crate) struct Client {
    pub(super) gw: Arc<Gateway>,
    pub(super) outbox: Arc<Outbox>,
    pub(super) id: u64,
    /// Topics this session is subscribed to.
    pub(super) topics: TopicSet,
    pub(super) limiter: RateLimiter,
    /// Replies that must wait behind a publication the broker has not answered yet,
    /// in command order (see [`Replies`](super::replies::Replies)). Started at the first such publication.
    pub(super) replies: Option<mpsc::Sender<Pending>>,
    pub(super) assembler: Assembler,
    /// Who the client is and what it may do (replaced by `refresh`).
    /// Behind an `Arc`: without auth every session shares one anonymous identity.
    pub(super) identity: Arc<Identity>,
    /// When the session ends unless refreshed (unix seconds, leeway included),
    /// watched by the [`expiry`](super::refresh::expiry) task (only when auth is on).
    pub(super) expires: Option<tokio::sync::watch::Sender<u64>>,
    pub(super) mode: Mode,
}

/// What the read loop found to do that needs an await.
enum Work {
    /// Server API commands wait in the outbox.
    Commands,
    /// A whole message from the client.
    Message(Message),
    /// The session is over (the client's close, EOF, a protocol error).
    End,
}

impl Client {
    /// Reads and runs commands until the client ends the session (or breaks the
    /// protocol). Dropped mid-way when the writer ends first: the session is over.
    ///
    /// Frames that need no await (pings, pongs, fragments, the close) are handled
    /// inside one poll ([`Client::poll_work`]) and a command runs in a boxed future,
    /// so this future, which an idle connection keeps for its whole life, holds only
    /// its two references and the pending poll.
    ///
    /// An `async move` block rather than an `async fn`, whose arguments would be
    /// stored twice in the future.
    #[allow(clippy::manual_async_fn)]
    pub(super) fn run<'a, R: AsyncRead + Unpin + Send>(
        &'a mut self,
        frames: &'a mut FrameReader<R>,
    ) -> impl Future<Output = ()> + Send + 'a {
        async move {
            loop {
                // A `let` statement: the `Work` is gone before the await below.
                let work: Pin<Box<dyn Future<Output = bool> + Send + '_>> =
                    match std::future::poll_fn(|cx| self.poll_work(frames, cx)).await {
                        Work::End => return,
                        Work::Commands => Box::pin(async {
                            self.on_server_commands().await;
                            true
                        }),
                        // Boxed: the commands' futures are large and short-lived.
                        Work::Message(message) => Box::pin(self.on_message(message)),
                    };
                if !work.await {
                    return;
                }
            }
        }
    }

    /// Reads frames until one completes a message, a server command waits (checked
    /// first), or the session ends; answers pings and records every frame's arrival
    /// on the way.
    fn poll_work<R: AsyncRead + Unpin>(
        &mut self,
        frames: &mut FrameReader<R>,
        cx: &mut Context<'_>,
    ) -> Poll<Work> {
        loop {
            if self.outbox.poll_command().is_ready() {
                return Poll::Ready(Work::Commands);
            }
            let frame = match ready!(frames.poll_next(cx)) {
                Ok(frame) => frame,
                Err(e) => {
                    let reason = match e {
                        ReadError::Protocol(reason) => reason,
                        ReadError::Gone => Disconnect::ClientGone,
                    };
                    debug!(reason = reason.label(), "read ended");
                    self.outbox.close(reason);
                    return Poll::Ready(Work::End);
                }
            };
            self.outbox.heard(self.gw.sessions.now_ms());
            match frame.opcode {
                op::PING => {
                    self.outbox
                        .push_control(frame::encode(op::PONG, &frame.payload));
                    continue;
                }
                op::PONG => continue,
                op::CLOSE => {
                    let (reason, reply) = close_reply(&frame.payload);
                    self.outbox.close_with(reason, Some(reply));
                    return Poll::Ready(Work::End);
                }
                _ => {}
            }
            if frame.opcode == op::TEXT
                && frame.fin
                && !frame.compressed
                && std::str::from_utf8(&frame.payload).is_err()
            {
                self.outbox.close(Disconnect::InvalidUtf8);
                return Poll::Ready(Work::End);
            }
            self.gw
                .metrics
                .bytes_received
                .inc_by(frame.payload.len() as u64);
            match self.assembler.push(frame) {
                Ok(Some(m)) => return Poll::Ready(Work::Message(m)),
                Ok(None) => continue,
                Err(reason) => {
                    self.outbox.close(reason);
                    return Poll::Ready(Work::End);
                }
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
            // Compressed back when the connection negotiated it (and it is worth it),
            // like a publication.
            let frame =
                if self.outbox.deflates() && frame.len() >= wsgate_fanout::deflate::MIN_PAYLOAD {
                    wsgate_fanout::deflate::deflate_frame(&frame)
                } else {
                    frame
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
            Command::Subscribe { id, topics, since } => {
                match self.subscribe(id, topics, since, By::Client).await {
                    Ok(Some(reply)) => Ok(reply),
                    Ok(None) => return true,
                    Err(e) => Err(e),
                }
            }
            Command::Unsubscribe { id, topics } => Ok(self.unsubscribe(id, topics)),
            Command::Publish { id, topic, data } => {
                match self.publish(id, &topic, data.get().as_bytes()).await {
                    Ok(Some(reply)) => Ok(reply),
                    Ok(None) => return true,
                    Err(e) => Err(e),
                }
            }
            Command::Ping { id } => Ok(protocol::pong_reply(id)),
            Command::Presence { id, topic } => self.presence(id, &topic, false).await,
            Command::PresenceStats { id, topic } => self.presence(id, &topic, true).await,
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
    pub(super) async fn reply(&self, frame: Bytes) {
        match &self.replies {
            Some(tx) => {
                let _ = tx.send(Pending::Ready(frame)).await;
            }
            None => {
                self.outbox.push(frame, 0);
            }
        }
    }

    pub(super) async fn reply_error(&self, err: &CommandError) {
        self.reply(frame::text(protocol::error_reply(err).as_bytes()))
            .await;
    }
}
