//! Topic fan-out for wsgate: which local connection wants which topic, and how a
//! publication reaches them.
//!
//! # Layout
//! - [`topic`]: topic name validation (the contract's `invalid_topic` rule).
//! - [`frame`]: server-side WebSocket frame encoding (unmasked, so it can be built once).
//! - [`publication`]: a publication encoded **once** into its complete WebSocket frame;
//!   every local subscriber shares those bytes.
//! - [`hub`]: the topic → local subscribers index. Pure data, sharded by topic hash, no
//!   I/O, no `.await` under a lock. `subscribe` says "first local subscriber",
//!   `unsubscribe` says "now empty" — the broker uses both to manage interest.
//! - [`broker`]: the [`Broker`] trait, the seam between a node and the rest of the
//!   cluster, and [`MemoryBroker`], the embedded single-node default.
//!
//! Relays (e.g. Redis) live in their own modules/crates and implement [`Broker`]:
//! they deliver what they receive with [`Hub::deliver`].

pub mod broker;
pub mod frame;
pub mod hub;
pub mod publication;
pub mod topic;

pub use broker::{Broker, BrokerError, BrokerFuture, MemoryBroker};
pub use hub::{Hub, Subscriber, SubscriberId};
pub use publication::{unix_nanos, Publication};
pub use topic::{validate_topic, TopicError};
