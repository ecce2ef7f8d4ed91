//! wsgate's connection layer: a hyper 1 server whose `/ws` upgrades into pub/sub
//! sessions on the fan-out [`wsgate_fanout::Node`].
//!
//! # Layout
//! - [`admission`]: the token bucket on upgrades (reconnect storms: 503 + a hint).
//! - [`config`]: every setting, its `WSGATE_*` variable and default.
//! - [`config_file`]: the `--config` TOML file, layered under flags and variables;
//!   [`namespaces`]: its `[[namespaces]]` section (which topics are streams).
//! - [`gateway`]: [`Gateway`], the node's shared state (configuration, the fan-out
//!   node, metrics, security, live sessions) and its shutdown tree.
//! - [`server`]: listeners, routing, the accept loop (survives EMFILE), the upgrade,
//!   and the end of the drain.
//! - [`session`]: one connection from upgrade to close: lifecycle, the client state and
//!   its commands (one file per command family), the ordered replies queue, token
//!   expiry, the outbound queue and the writer, the registry of live sessions and their
//!   heartbeats.
//! - [`ws`]: WebSocket framing below the protocol: frame reading, message reassembly,
//!   close-code rules.
//! - [`protocol`]: the JSON command codec and replies (docs/protocol.md).
//! - [`close`]: every way a session ends: close code, reason, metric label.
//! - [`security`]: the checks before an upgrade (origin 403, token 401, per-IP 429),
//!   auth (JWT), ACLs, TLS, and the posture log.
//! - [`namespaces`] also carries presence (`presence`, `join_leave`) and what clients
//!   may do themselves (`client_publish`, `client_subscribe`).
//! - [`http_api`]: `POST /api/publish`, `/api/history`, `/healthz`, `/readyz`,
//!   `/metrics`, `/drain`.
//! - [`server_api`]: presence over HTTP, and the server commands that act on
//!   connections on every node (`/api/disconnect`, `/api/subscribe`,
//!   `/api/unsubscribe`, `GET /api/info`); the node's side of those commands.
//! - [`assets`]: the browser client at `/wsgate.js`, and with `--demo` the demo page.
//!
//! One publication from a client, top to bottom: [`session`]'s client reads a frame
//! ([`ws`]), decodes a `publish` ([`protocol`]), checks its permissions and calls
//! [`wsgate_fanout::Node::publish`]; the broker reports it back on every node, where
//! the node encodes it once and hands it to each subscriber's outbox
//! ([`session::outbox`]); each session's writer takes its outbox's batch and writes
//! it with one flush.

pub mod admission;
pub mod assets;
pub mod close;
pub mod config;
pub mod config_file;
pub mod gateway;
pub mod http_api;
pub mod namespaces;
pub mod protocol;
pub mod rebalance;
pub mod security;
pub mod server;
pub mod server_api;
pub mod session;
pub mod sse;
pub mod ws;

pub use config::{Config, LogFormat};
pub use gateway::Gateway;
pub use server::Server;
