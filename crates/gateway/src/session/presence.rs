//! `presence` and `presence_stats`: who is on a topic, across every node, for whoever
//! may subscribe to it (or already is subscribed).

use std::sync::Arc;

use wsgate_fanout::node::PresenceError;

use super::client::Client;
use crate::protocol::{self, CommandError, ErrorCode};

impl Client {
    /// Answers `presence` (the list) or, with `stats`, `presence_stats` (counts).
    pub(super) async fn presence(
        &mut self,
        id: Option<u64>,
        topic: &Arc<str>,
        stats: bool,
    ) -> Result<String, CommandError> {
        let subscribed = self.topics.contains(topic);
        let may = self.identity.subscribe.allows(topic)
            && self.gw.node.namespaces().client_subscribe(topic);
        if !subscribed && !may {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!(
                    "not allowed to see the presence of {}",
                    protocol::json_string(topic)
                ),
            ));
        }
        self.gw
            .metrics
            .presence_queries
            .with_label_values(&["client"])
            .inc();
        let node = &self.gw.node;
        let answer = if stats {
            node.presence_stats(topic)
                .await
                .map(|s| protocol::presence_stats_reply(id, topic, s))
        } else {
            node.presence(topic)
                .await
                .map(|list| protocol::presence_reply(id, topic, &list))
        };
        answer.map_err(|e| presence_error(id, &e))
    }
}

/// The client error of a presence query that failed.
pub(crate) fn presence_error(id: Option<u64>, e: &PresenceError) -> CommandError {
    let code = match e {
        PresenceError::NotEnabled(_) => ErrorCode::NotEnabled,
        PresenceError::InvalidTopic(_) => ErrorCode::InvalidTopic,
        PresenceError::Broker(_) => ErrorCode::Unavailable,
    };
    CommandError::new(id, code, e.to_string())
}
