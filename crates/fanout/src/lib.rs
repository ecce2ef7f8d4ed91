//! Topic fan-out for wsgate: which local connection wants which topic, and how a
//! publication reaches them.
//!
//! # Layout
//! - [`node`]: the [`Node`], which owns the hub and the broker and is the only place
//!   that joins them: subscribe (hub add → broker subscribe → undo on failure),
//!   unsubscribe, publish (validation, counting), and the broker's event handler that
//!   encodes each arriving publication once and delivers it.
//! - [`hub`]: the topic → local subscribers index. Pure data, sharded by topic hash, no
//!   I/O, no `.await` under a lock. `subscribe` says "first local subscriber",
//!   `unsubscribe` says "now empty".
//! - [`broker`]: the [`Broker`] trait, the seam between a node and the rest of the
//!   cluster; [`BrokerEvents`], how a broker reports back; and [`MemoryBroker`], the
//!   embedded single-node default.
//! - [`publication`]: a publication encoded **once** into its complete WebSocket frame;
//!   every local subscriber shares those bytes.
//! - [`frame`]: server-side WebSocket frame encoding (unmasked, so it can be built once).
//! - [`stream`]: which topics are streams ([`Namespaces`]), positions and history,
//!   and [`stream::StreamState`], a node's pure view of one stream (in order,
//!   duplicates dropped, gaps repaired or reset).
//! - [`presence`]: who is on a topic ([`PresenceEntry`]), join/leave events, the
//!   node list of `GET /api/info` ([`NodeInfo`]), the node's own presence table and
//!   the per-topic rate rule of join/leave pushes.
//! - [`history`]: the embedded broker's in-memory stream history (bounded per stream
//!   by count and age, in total by bytes).
//! - [`topic`]: topic name validation (the contract's `invalid_topic` rule).
//!
//! Relays (e.g. Redis, in `wsgate-redis`) implement [`Broker`] and report what they
//! receive through the [`BrokerEvents`] the node hands them; they never see the hub.
//!
//! One publication, end to end: a session calls [`Node::publish`] → the broker
//! ([`Broker::publish`]) → on every node, [`BrokerEvents::publication`] →
//! [`Publication::encode`] → [`Hub::deliver`] → each subscriber's queue
//! ([`Subscriber::deliver`]) → its writer.

pub mod broker;
pub mod deflate;
pub mod frame;
pub mod history;
pub mod hub;
pub mod node;
pub mod presence;
pub mod publication;
pub mod stream;
pub mod topic;

pub use broker::{Broker, BrokerError, BrokerEvents, BrokerFuture, MemoryBroker, Origin};
pub use history::{MemoryHistory, DEFAULT_HISTORY_MEMORY};
pub use hub::{Hub, Subscriber, SubscriberId};
pub use node::{HistoryError, Node, PublishAck, PublishError, Source, StreamStart};
pub use presence::{
    NodeInfo, PresenceEntry, PresenceEvent, PresenceKind, PresenceOptions, PresenceStats,
};
pub use publication::{unix_nanos, Encoded, Publication, Tag, TagKind};
pub use stream::{
    History, HistoryEntry, HistoryQuery, Namespace, Namespaces, Pattern, Position, SlowConsumer,
    StreamOptions,
};
pub use topic::{validate_topic, TopicError};
