//! The node's side of presence, join/leave and server commands: its own entries
//! (the [`Table`]), what it asks its broker to list and announce, the events it
//! pushes to local subscribers under the per-topic rate rule, and the hooks through
//! which the gateway answers for itself (its id, its numbers, its connections).

use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::{Core, Node};
use crate::broker::{BrokerError, BrokerFuture};
use crate::presence::{
    changed_frame, Local, NodeInfo, PresenceEntry, PresenceEvent, PresenceStats, Verdict,
};
use crate::publication::Publication;
use crate::topic::{validate_topic, TopicError};
use crate::SubscriberId;

/// Carries out a server command (its JSON) on this node's connections.
pub type ControlHandler = Box<dyn Fn(&[u8]) + Send + Sync>;

/// What the gateway tells its node about itself, once, at start.
pub struct Hooks {
    /// The node's id (`welcome`'s `node`), written in its presence entries.
    pub node_id: Arc<str>,
    /// The node's numbers, for the cluster's node list.
    pub info: Box<dyn Fn() -> NodeInfo + Send + Sync>,
    /// Carries out a server command that reached this node (it acts on its own
    /// connections). Must not block.
    pub control: ControlHandler,
}

/// Why a presence query has no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PresenceError {
    /// The topic does not track presence (`not_enabled`).
    #[error("{0} does not track presence")]
    NotEnabled(String),
    /// The topic breaks the contract's naming rule.
    #[error(transparent)]
    InvalidTopic(#[from] TopicError),
    /// The broker could not answer.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Core {
    fn node_id(&self) -> Arc<str> {
        self.hooks
            .get()
            .map_or_else(|| Arc::from("local"), |h| h.node_id.clone())
    }

    fn presence_shard(&self, topic: &str) -> &parking_lot::Mutex<crate::presence::Table> {
        &self.presence[self.shard_of(topic)]
    }

    /// Every entry of this node, by topic.
    pub(super) fn snapshot(&self) -> Vec<(Arc<str>, Vec<PresenceEntry>)> {
        let node = self.node_id();
        let mut all = Vec::new();
        for shard in self.presence.iter() {
            for (topic, t) in shard.lock().iter() {
                let entries = t
                    .members
                    .iter()
                    .map(|(session, l)| PresenceEntry {
                        session: session.clone(),
                        user: l.user.clone(),
                        node: node.clone(),
                    })
                    .collect();
                all.push((topic.clone(), entries));
            }
        }
        all
    }

    /// A join or leave arrived: pushed to every local subscriber of the topic but
    /// the connection it is about, unless the topic's rate rule skips it.
    pub(super) fn on_presence_event(self: &Arc<Self>, topic: &str, event: PresenceEvent) {
        let Some(opts) = self.namespaces.presence(topic) else {
            return;
        };
        if !opts.join_leave || !self.hub.has_subscribers(topic) {
            return;
        }
        let kind = event.kind.op();
        let mut shard = self.presence_shard(topic).lock();
        let (except, verdict) = match shard.get_mut(topic) {
            Some(t) => (
                t.members.get(&event.session).map(|l| l.id),
                t.budget.admit(Instant::now(), opts.join_leave_rate),
            ),
            None => (None, Verdict::Push),
        };
        let events = &self.metrics.join_leave_events;
        match verdict {
            Verdict::Push => {
                let p = Publication::from_frame(event.frame(topic), 0);
                // Under the shard's lock: events of one topic leave in arrival order.
                self.hub.deliver_except(topic, &p, except);
                events.with_label_values(&[kind, "pushed"]).inc();
            }
            Verdict::SkipFirst(due) => {
                events.with_label_values(&[kind, "skipped"]).inc();
                drop(shard);
                self.summarise_at(Arc::from(topic), due);
            }
            Verdict::Skip => {
                events.with_label_values(&[kind, "skipped"]).inc();
            }
        }
    }

    /// At `due`, tells the topic's local subscribers how many events were skipped
    /// (`presence_changed`): their list is stale, a `presence` query refreshes it.
    fn summarise_at(self: &Arc<Self>, topic: Arc<str>, due: Instant) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let core = Arc::downgrade(self);
        rt.spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let Some(core) = core.upgrade() else {
                return;
            };
            let mut shard = core.presence_shard(&topic).lock();
            let skipped = match shard.get_mut(&*topic) {
                Some(t) => t.budget.take_skipped(Instant::now()),
                None => 0,
            };
            if skipped > 0 {
                let p = Publication::from_frame(changed_frame(&topic, skipped), 0);
                core.hub.deliver(&topic, &p);
                debug!(%topic, skipped, "join/leave events summarised");
            }
        });
    }
}

impl Node {
    /// Sets what the gateway says about itself. Once; later calls are ignored.
    pub fn set_hooks(&self, hooks: Hooks) {
        let _ = self.core.hooks.set(hooks);
    }

    /// Lists connection `id` (`session`, `user`) in the presence of every presence
    /// topic among `topics` (announcing its join where join/leave is on), before
    /// it is subscribed: by the time its `subscribed` reply is sent, every node's
    /// query lists it. On failure what was listed is taken out again.
    ///
    /// # Errors
    /// The broker could not list it (`unavailable`).
    pub async fn presence_join(
        &self,
        id: SubscriberId,
        session: &Arc<str>,
        user: Option<&Arc<str>>,
        topics: &[Arc<str>],
    ) -> Result<(), BrokerError> {
        let core = &self.core;
        let node = core.node_id();
        let mut added = Vec::new();
        let mut acks: Vec<BrokerFuture> = Vec::new();
        for t in topics {
            let Some(opts) = core.namespaces.presence(t) else {
                continue;
            };
            let fresh = core
                .presence_shard(t)
                .lock()
                .entry(t.clone())
                .or_default()
                .members
                .insert(
                    session.clone(),
                    Local {
                        id,
                        user: user.cloned(),
                    },
                )
                .is_none();
            if !fresh {
                continue;
            }
            let entry = PresenceEntry {
                session: session.clone(),
                user: user.cloned(),
                node: node.clone(),
            };
            // No await between the table and the broker: a cancelled caller leaves
            // both, or neither, and its leave undoes both.
            acks.push(self.broker.presence_add(t, &entry, opts.join_leave));
            added.push(t.clone());
        }
        for ack in acks {
            if let Err(e) = ack.await {
                self.core.metrics.presence_errors.inc();
                self.presence_leave(session, &added);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Takes `session` out of the presence of `topics` (those it is listed in),
    /// announcing its leave where join/leave is on.
    pub fn presence_leave<'a>(
        &self,
        session: &Arc<str>,
        topics: impl IntoIterator<Item = &'a Arc<str>>,
    ) {
        let core = &self.core;
        for t in topics {
            let Some(opts) = core.namespaces.presence(t) else {
                continue;
            };
            let removed = {
                let mut shard = core.presence_shard(t).lock();
                let Some(table) = shard.get_mut(&**t) else {
                    continue;
                };
                let removed = table.members.remove(session);
                if table.members.is_empty() {
                    shard.remove(&**t);
                }
                removed
            };
            if let Some(local) = removed {
                let entry = PresenceEntry {
                    session: session.clone(),
                    user: local.user,
                    node: core.node_id(),
                };
                self.broker.presence_remove(t, &entry, opts.join_leave);
            }
        }
    }

    /// Every connection on `topic`, on every node.
    ///
    /// # Errors
    /// The topic is invalid or tracks no presence, or the broker cannot answer.
    pub async fn presence(&self, topic: &str) -> Result<Vec<PresenceEntry>, PresenceError> {
        validate_topic(topic)?;
        if self.core.namespaces.presence(topic).is_none() {
            return Err(PresenceError::NotEnabled(topic.to_owned()));
        }
        Ok(self.broker.presence(topic).await?)
    }

    /// The counts of `topic`'s presence.
    ///
    /// # Errors
    /// As [`Node::presence`].
    pub async fn presence_stats(&self, topic: &str) -> Result<PresenceStats, PresenceError> {
        Ok(PresenceStats::of(&self.presence(topic).await?))
    }

    /// This node's presence entries (connection–topic pairs).
    pub fn presence_entries(&self) -> usize {
        self.core
            .presence
            .iter()
            .map(|s| s.lock().values().map(|t| t.members.len()).sum::<usize>())
            .sum()
    }

    /// Sends a server command to every node (this one included); resolves with how
    /// many nodes it reached, when the broker knows.
    pub fn control(&self, command: &[u8]) -> BrokerFuture<Option<usize>> {
        self.broker.control(command)
    }

    /// Every live node of the cluster.
    ///
    /// # Errors
    /// The broker cannot answer.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.broker.nodes().await
    }

    /// Leaves the node list at the end of a drain ([`crate::Broker::leave`]).
    ///
    /// # Errors
    /// The broker could not take the node out (it then leaves when its lease ends).
    pub async fn leave(&self) -> Result<(), BrokerError> {
        self.broker.leave().await
    }
}
