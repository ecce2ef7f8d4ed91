//! The relay's time limits and batch sizes, one set for both modes.

use std::time::Duration;

/// Default delay between a topic's last local subscriber leaving and its unsubscribe.
pub const DEFAULT_UNSUBSCRIBE_DELAY: Duration = Duration::from_secs(1);
/// Time allowed to open one connection (TCP, TLS handshake, `AUTH`, `SELECT`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed to learn the master from the sentinels.
pub const SENTINEL_TIMEOUT: Duration = Duration::from_secs(5);
/// A command or pipeline that gets no answer within this long counts as a lost
/// connection (publishes fail `unavailable`).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A (un)subscribe that Redis does not confirm within this long fails, and the
/// connection (single mode) counts as lost.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle pub/sub connection is checked (single mode: `PING`): a Redis
/// that stopped answering sends no error, only silence.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Channels per (un)subscribe command at most (cluster mode: within one slot).
pub const CHUNK: usize = 2000;
/// Most publications sent in one pipeline (single mode) or in flight (cluster mode)
/// by one writer.
pub const MAX_BATCH: usize = 1024;
/// Single mode: how long the writer holds a pipeline with stream publications for
/// more to join its `wsgate_gateway_publish_many` call, when stream publications come
/// in faster than this apart (`--redis-stream-linger`; zero: never).
pub const DEFAULT_STREAM_LINGER: Duration = Duration::from_millis(1);
/// Cluster mode: how often the slot map is read and every shard probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Cluster mode: soonest probe after the previous one when something asked for it
/// (a lost connection, a server-pushed `sunsubscribe`).
pub const PROBE_MIN_GAP: Duration = Duration::from_millis(100);
/// Cluster mode: a shard whose probe is not answered within this long is down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
