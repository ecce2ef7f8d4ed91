//! wsgate's connection layer: a hyper 1 server whose `/ws` upgrades with
//! fastwebsockets into pub/sub sessions.
//!
//! # Layout
//! - [`config`]: every setting, its `WSGATE_*` variable and default.
//! - [`server`]: listeners, routing, the accept loop (survives EMFILE), the upgrade,
//!   and the end of the drain.
//! - [`frames`]: client WebSocket frames, read without a buffer held while idle.
//! - [`heartbeat`]: the live sessions, pinged (or closed 4000) by one shared
//!   ticker instead of a timer per connection; the drain walks the same table.
//! - [`session`]: one connection's reader loop and its commands (subscribe,
//!   unsubscribe, publish, ping), message reassembly and limits.
//! - [`writer`]: the task that alone writes to a socket: batches, one flush per batch,
//!   close frames.
//! - [`outbox`]: the byte-bounded, non-blocking outbound queue between them (and the
//!   hub's [`wsgate_fanout::Subscriber`]).
//! - [`protocol`]: the JSON command codec and replies (docs/protocol.md).
//! - [`close`]: every way a session ends: close code, reason, metric label.
//! - [`ratelimit`]: per-connection token buckets.
//! - [`demo`]: the browser client at `/wsgate.js`, and with `--demo` a demo page at
//!   `/` fed by an in-process ticker.
//! - [`http_api`]: `POST /api/publish`, `/healthz`, `/readyz`, `/metrics`, `/drain`.
//! - [`security`]: the checks before an upgrade (origin 403, token 401, per-IP 429),
//!   built from [`auth`] (JWT verification), [`acl`] (topic patterns), [`origin`],
//!   [`iplimit`] and [`tls`] (rustls, reloaded on SIGHUP or file change).
//! - [`state`]: the node's shared state and shutdown tree ([`Gateway`]).

pub mod acl;
pub mod auth;
pub mod close;
pub mod config;
pub mod demo;
mod frames;
mod heartbeat;
pub mod http_api;
pub mod io;
pub mod iplimit;
pub mod origin;
pub mod outbox;
pub mod protocol;
pub mod ratelimit;
pub mod security;
pub mod server;
mod session;
pub mod state;
pub mod tls;
mod writer;

pub use config::{Config, LogFormat};
pub use server::Server;
pub use state::Gateway;
