//! The bounded values of every label. A value not listed here still works (the
//! counter is created on first use) but only listed values exist, at zero, before
//! anything happened — which is what dashboards and `rate()` need. Add new reasons
//! here and to docs/metrics.md.

/// `wsgate_disconnects_total{reason}` (the gateway's `Disconnect::label`).
pub const DISCONNECT: &[&str] = &[
    "client_close",
    "client_gone",
    "heartbeat_timeout",
    "slow_consumer",
    "rate_limit",
    "too_big",
    "drain",
    "protocol_error",
    "invalid_utf8",
    "token_expired",
    "server_disconnect",
    "rebalance",
    "error",
];

/// `wsgate_connections_refused_total{reason}`: why an upgrade request was refused.
pub const REFUSED: &[&str] = &[
    "not_websocket",
    "draining",
    "max_connections",
    "bad_handshake",
    "overloaded",
];

/// `wsgate_messages_dropped_total{reason}`.
/// - `slow_consumer`: queued for a client that was then closed with 4008 (or that
///   overflowed its queue).
/// - `disconnected`: queued for a client whose connection ended another way.
/// - `broker_unavailable`: a publication the broker refused (not accepted).
/// - `drop_oldest`: dropped from a lagging client's queue by its namespace's
///   `slow_consumer = "drop_oldest"` policy (the connection stays).
/// - `conflated`: replaced in a lagging client's queue by a newer publication of its
///   topic (`slow_consumer = "latest"`).
pub const DROPPED: &[&str] = &[
    "slow_consumer",
    "disconnected",
    "broker_unavailable",
    "drop_oldest",
    "conflated",
];

/// `wsgate_messages_received_total{source}`.
pub const SOURCE: &[&str] = &["client", "http", "redis"];

/// `wsgate_join_leave_events_total{event}`.
pub const JOIN_LEAVE: &[&str] = &["join", "leave"];

/// `wsgate_join_leave_events_total{outcome}`: pushed one by one, or skipped by the
/// per-topic rate rule (and summarised in one `presence_changed`).
pub const JOIN_LEAVE_OUTCOME: &[&str] = &["pushed", "skipped"];

/// `wsgate_api_requests_total{endpoint}`.
pub const API_ENDPOINTS: &[&str] = &[
    "publish",
    "history",
    "presence",
    "presence_stats",
    "disconnect",
    "subscribe",
    "unsubscribe",
    "info",
    "rebalance",
];

/// `wsgate_server_commands_total{command}`.
pub const SERVER_COMMANDS: &[&str] = &["disconnect", "subscribe", "unsubscribe"];

/// `wsgate_rebalance_runs_total{trigger}`: `POST /api/rebalance`, or the node's own
/// check (`--rebalance-auto`).
pub const REBALANCE_TRIGGER: &[&str] = &["api", "auto"];
