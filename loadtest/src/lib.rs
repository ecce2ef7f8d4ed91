//! wsgate-loadtest: drives wsgate (or a peer server) at scale and reports the truth.
//!
//! # Layout
//! - `cli` — command line: one subcommand per scenario, plus `merge`.
//! - `run` — the run context, the once-a-second monitor, common report parts.
//! - `scenario/` — `fanout` (also `slow`), `idle`, `churn`, `resume` (`resume-storm`);
//!   `session` is one client connection (connect, subscribe, receive), `publisher` the
//!   WS/HTTP/Redis publishers.
//! - `net` — source-address spreading, open-file limit, the client handshake, frames.
//! - `wsconn` — the client WebSocket reader: one `read` per wake-up, every frame in it
//!   parsed in place.
//! - `proto` — protocol flavours: wsgate/peer JSON, NATS text protocol.
//! - `payload` — the stamped payload (`p`, `s`, `t`, padding) and its fast scan.
//! - `seq` — lost/duplicated/reordered accounting per subscriber and publisher.
//! - `stream` — stream positions: seq contiguity per subscriber and topic (gaps,
//!   duplicates, resets), read from the envelope's tail without a JSON parse.
//! - `stats` — per-second HDR histograms fed by cheap per-task recorders.
//! - `report` — the JSON report, its math (steady window, percentiles), and merging.
//! - `floor` — the kernel-only fan-out (no server, no generator): the yardstick for
//!   any server on this machine; `floor_idle` — the same for idle connections
//!   with heartbeats (pings from a wheel, pongs read back).
//! - `soak` — `soak-report`: the verdict and plot of `loadtest/soak.sh`.
//! - `chart` — the PNG chart; `sysmon` — /proc, getrusage, /metrics; `http` — a
//!   small HTTP client; `summary` — the human-readable summary.
#![forbid(unsafe_code)]

pub mod chart;
pub mod cli;
pub mod floor;
pub mod floor_idle;
pub mod http;
pub mod net;
pub mod payload;
pub mod proto;
pub mod report;
pub mod run;
pub mod scenario;
pub mod seq;
pub mod soak;
pub mod stats;
pub mod stream;
pub mod summary;
pub mod sysmon;
pub mod wsconn;
