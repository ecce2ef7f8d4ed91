//! The one test harness of the wsgate crates (a dev-dependency only).
//!
//! # Layout
//! - [`port`]: free loopback ports outside the kernel's ephemeral range, for the
//!   processes tests start and hand a port on the command line.
//! - [`wait`]: bounded polling ([`wait_until`]).
//! - [`http`]: a minimal HTTP/1.1 client (async and blocking), raw requests and
//!   upgrade requests, and reading a `/metrics` exposition.
//! - [`ws`]: the WebSocket test client ([`ws::Client`], tungstenite underneath, over
//!   TCP or TLS) and, for tests that must misbehave, raw sockets and the client frame
//!   builder ([`ws::client_frame`]: masked frames of any length, any flags).
//! - `gateway` (feature `gateway`): a real gateway in this process, on port 0;
//!   JWT helpers (`gateway::jwt`).
//! - [`process`]: the `wsgate` binary as a process on free ports: its log, waiting
//!   until it answers (bounded), killed on drop; scenarios across nodes.
//! - [`proxy`]: a fault-injecting TCP proxy (latency, throttle, stall, cut, heal),
//!   for one node's link to Redis.
//! - [`streams`]: stream clients that resume across nodes by themselves, and the
//!   seq-by-seq check of what they received.
//! - `redis` (feature `redis`): private `redis-server` processes and Redis
//!   Clusters on free ports, killed on drop.
//! - `tls` (feature `tls`): a test CA, certificates it signs, rustls clients that
//!   trust it.
//!
//! Every wait is bounded: a test that hangs fails with what it was waiting for.

pub mod http;
pub mod port;
pub mod process;
pub mod proxy;
pub mod streams;
pub mod wait;
pub mod ws;

#[cfg(feature = "gateway")]
pub mod gateway;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "tls")]
pub mod tls;

pub use port::{ephemeral_range, free_port, quiet_range};
pub use wait::{eventually, wait_until};
