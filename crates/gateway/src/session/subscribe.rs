//! `subscribe` and `unsubscribe`, and leaving every topic at the end. The hub and
//! broker sequence (and its undo) is the node's: [`wsgate_fanout::Node::subscribe_streams`].

use std::sync::Arc;

use wsgate_fanout::{frame, StreamStart, Subscriber};

use super::client::Client;
use super::replies::Pending;
use crate::protocol::{self, CommandError, ErrorCode, Since};

impl Client {
    /// Subscribes; answers the reply to send, or `None` when it was already queued
    /// (a command with a stream: its reply must precede the stream's replay and live
    /// publications, so the node has it queued at that exact point).
    pub(super) async fn subscribe(
        &mut self,
        id: Option<u64>,
        topics: Vec<Arc<str>>,
        since: Since,
    ) -> Result<Option<String>, CommandError> {
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
        let namespaces = self.gw.node.namespaces();
        let streams = topics.iter().any(|t| namespaces.stream(t).is_some());
        if !streams {
            if !fresh.is_empty() {
                self.join(id, &fresh, &[], &since, |_| {}).await?;
            }
            return Ok(Some(protocol::topics_reply("subscribed", id, &topics)));
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
            let reply = protocol::subscribed_reply(id, &topics, starts);
            outbox.push(frame::text(reply.as_bytes()), 0);
        })
        .await?;
        Ok(None)
    }

    /// The node's subscribe of `fresh` topics (with where `held` streams stand), the
    /// session's topic set kept in step; `ready` runs with the stream starts.
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
        let joined = self
            .gw
            .node
            .subscribe_streams(self.id, &sub, fresh, held, since, ready)
            .await;
        if let Err(e) = joined {
            // The node took them out of the hub again.
            for t in fresh {
                self.topics.remove(t);
            }
            return Err(CommandError::new(id, ErrorCode::Unavailable, e.to_string()));
        }
        Ok(())
    }

    pub(super) fn unsubscribe(&mut self, id: Option<u64>, topics: Vec<Arc<str>>) -> String {
        let mine = &mut self.topics;
        self.gw
            .node
            .unsubscribe(self.id, topics.iter().filter(|t| mine.remove(t)).cloned());
        protocol::topics_reply("unsubscribed", id, &topics)
    }

    /// Leaves every topic (the session is over).
    pub(super) fn leave_all(&mut self) {
        self.gw.node.unsubscribe(self.id, self.topics.drain());
    }
}
