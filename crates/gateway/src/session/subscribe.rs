//! `subscribe` and `unsubscribe`, and leaving every topic at the end. The hub and
//! broker sequence (and its undo) is the node's: [`wsgate_fanout::Node::subscribe`].

use std::sync::Arc;

use wsgate_fanout::Subscriber;

use super::client::Client;
use crate::protocol::{self, CommandError, ErrorCode};

impl Client {
    pub(super) async fn subscribe(
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
