//! `subscribe` and `unsubscribe`, the same two made by the server (the server API, a
//! token's `topics` claim), and leaving every topic at the end. The hub and broker
//! sequence (and its undo) is the node's: [`wsgate_fanout::Node::subscribe_streams`];
//! presence is listed before the subscription and taken out after it.

use std::sync::Arc;

use tracing::warn;
use wsgate_fanout::{frame, StreamStart, Subscriber};

use super::client::Client;
use super::outbox::ServerCommand;
use super::replies::Pending;
use super::session_name;
use crate::protocol::{self, CommandError, ErrorCode, Since};

/// Who asked for a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum By {
    /// The client's own command: its permissions and the namespace rules apply.
    Client,
    /// The server: no permission check; the replies carry `"id":null`.
    Server,
}

impl By {
    fn reply(self, reply: String) -> String {
        match self {
            By::Client => reply,
            By::Server => protocol::unasked(reply),
        }
    }
}

impl Client {
    /// The session id as clients see it.
    pub(super) fn session_name(&self) -> Arc<str> {
        Arc::from(session_name(self.gw.session_of(self.id)))
    }

    /// The user presence lists (the token's `sub`), if any.
    pub(super) fn user(&self) -> Option<Arc<str>> {
        (!self.identity.subject.is_empty()).then(|| Arc::from(self.identity.subject.as_str()))
    }

    /// Subscribes; answers the reply to send, or `None` when it was already queued
    /// (a command with a stream: its reply must precede the stream's replay and live
    /// publications, so the node has it queued at that exact point).
    pub(super) async fn subscribe(
        &mut self,
        id: Option<u64>,
        topics: Vec<Arc<str>>,
        since: Since,
        by: By,
    ) -> Result<Option<String>, CommandError> {
        if by == By::Client {
            self.may_subscribe(id, &topics)?;
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
        let namespaces = self.gw.node.namespaces();
        let streams = topics.iter().any(|t| namespaces.stream(t).is_some());
        if !streams {
            if !fresh.is_empty() {
                self.join(id, &fresh, &[], &since, |_| {}).await?;
            }
            return Ok(Some(by.reply(protocol::topics_reply(
                "subscribed",
                id,
                &topics,
            ))));
        }
        // Replies still waiting behind a publication leave first: this one is queued
        // directly, at the point the node says.
        if let Some(tx) = &self.replies {
            let (done, wait) = tokio::sync::oneshot::channel();
            if tx.send(Pending::Barrier(done)).await.is_ok() {
                let _ = wait.await;
            }
        }
        let held: Vec<Arc<str>> = topics
            .iter()
            .filter(|t| !fresh.contains(t))
            .cloned()
            .collect();
        let outbox = self.outbox.clone();
        self.join(id, &fresh, &held, &since, |starts| {
            let reply = by.reply(protocol::subscribed_reply(id, &topics, starts));
            outbox.push(frame::text(reply.as_bytes()), 0);
        })
        .await?;
        Ok(None)
    }

    /// The client's permission to subscribe to every one of `topics` itself.
    fn may_subscribe(&self, id: Option<u64>, topics: &[Arc<str>]) -> Result<(), CommandError> {
        if let Some(t) = topics.iter().find(|t| !self.identity.subscribe.allows(t)) {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {}", protocol::json_string(t)),
            ));
        }
        let namespaces = self.gw.node.namespaces();
        // Topics it already has (the server subscribed it) are no new subscription.
        if let Some(t) = topics
            .iter()
            .find(|t| !namespaces.client_subscribe(t) && !self.topics.contains(t))
        {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!(
                    "only the server subscribes connections to {} (its namespace has client_subscribe = false)",
                    protocol::json_string(t)
                ),
            ));
        }
        Ok(())
    }

    /// The node's subscribe of `fresh` topics (with where `held` streams stand), the
    /// session's topic set kept in step; `ready` runs with the stream starts. The
    /// presence of `fresh` presence topics is listed first (so every node lists the
    /// connection by the time its reply is sent) and taken out again on failure.
    async fn join(
        &mut self,
        id: Option<u64>,
        fresh: &[Arc<str>],
        held: &[Arc<str>],
        since: &Since,
        ready: impl FnOnce(&[StreamStart]),
    ) -> Result<(), CommandError> {
        let sub: Arc<dyn Subscriber> = self.outbox.clone();
        for t in fresh {
            self.topics.insert(t.clone());
        }
        let node = &self.gw.node;
        let presence = node.namespaces().has_presence();
        let listed = if presence {
            node.presence_join(self.id, &self.session_name(), self.user().as_ref(), fresh)
                .await
        } else {
            Ok(())
        };
        let joined = match listed {
            Ok(()) => {
                node.subscribe_streams(self.id, &sub, fresh, held, since, ready)
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = joined {
            // The node took them out of the hub again.
            if presence {
                node.presence_leave(&self.session_name(), fresh);
            }
            for t in fresh {
                self.topics.remove(t);
            }
            return Err(CommandError::new(id, ErrorCode::Unavailable, e.to_string()));
        }
        Ok(())
    }

    /// Unsubscribes from those of `topics` the session has; answers which those were.
    fn leave(&mut self, topics: &[Arc<str>]) -> Vec<Arc<str>> {
        let mine = &mut self.topics;
        let left: Vec<Arc<str>> = topics.iter().filter(|t| mine.remove(t)).cloned().collect();
        let node = &self.gw.node;
        node.unsubscribe(self.id, left.iter().cloned());
        if node.namespaces().has_presence() && !left.is_empty() {
            node.presence_leave(&self.session_name(), &left);
        }
        left
    }

    pub(super) fn unsubscribe(&mut self, id: Option<u64>, topics: Vec<Arc<str>>) -> String {
        self.leave(&topics);
        protocol::topics_reply("unsubscribed", id, &topics)
    }

    /// Leaves every topic (the session is over).
    pub(super) fn leave_all(&mut self) {
        let all: Vec<Arc<str>> = self.topics.drain().collect();
        let node = &self.gw.node;
        node.unsubscribe(self.id, all.iter().cloned());
        if node.namespaces().has_presence() && !all.is_empty() {
            node.presence_leave(&self.session_name(), &all);
        }
    }

    /// Carries out the server API commands waiting in the outbox (between the
    /// client's own commands: the reader owns the session's topics).
    pub(super) async fn on_server_commands(&mut self) {
        while let Some(command) = self.outbox.take_command() {
            self.on_server_command(command).await;
        }
    }

    async fn on_server_command(&mut self, command: ServerCommand) {
        match command {
            ServerCommand::Subscribe(topics) => {
                let reply = self
                    .subscribe(None, topics, Since::default(), By::Server)
                    .await;
                match reply {
                    Ok(Some(text)) => self.reply(frame::text(text.as_bytes())).await,
                    Ok(None) => {}
                    Err(e) => warn!(
                        session = %self.session_name(),
                        code = e.code.as_str(),
                        "server-side subscribe failed: {}",
                        e.message
                    ),
                }
            }
            ServerCommand::Unsubscribe(topics) => {
                let left = self.leave(&topics);
                if !left.is_empty() {
                    let text =
                        By::Server.reply(protocol::topics_reply("unsubscribed", None, &left));
                    self.reply(frame::text(text.as_bytes())).await;
                }
            }
        }
    }
}
