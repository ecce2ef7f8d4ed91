//! `publish`: the client's permissions here, the node's validation and counting in
//! [`wsgate_fanout::Node::publish`]; the reply now, or queued behind the broker's ack.

use tokio::sync::mpsc;
use tracing::Instrument;
use wsgate_fanout::{PublishError, Source};

use super::client::Client;
use super::replies::{Pending, Replies};
use crate::protocol::{self, CommandError, ErrorCode};

impl Client {
    /// Publishes; returns the reply now, or `None` when the reply will be queued by a
    /// task once the broker answers.
    pub(super) async fn publish(
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
        if !self.gw.node.namespaces().client_publish(topic) {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                format!(
                    "clients may not publish to {} (its namespace has client_publish = false)",
                    protocol::json_string(topic)
                ),
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
                    Ok(pos) => Ok(Some(protocol::published_reply(id, pos.as_ref()))),
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
