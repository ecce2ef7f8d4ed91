//! WebSocket framing in both directions, below the pub/sub protocol.
//!
//! # Layout
//! - [`read`]: client frames, read without a buffer held while idle: reserved bits,
//!   opcodes, control-frame rules, the size limit.
//! - [`message`]: fragments reassembled into whole messages, with the message size
//!   limit and UTF-8 checked as fragments arrive.
//! - [`close`]: the close handshake's rules (which codes a client may send, what we
//!   answer).
//! - [`deflate`]: permessage-deflate's negotiation, and compressed client messages
//!   inflated within the size limit.
//! - [`io`]: small I/O helpers (what a vectored write consumed).
//!
//! Server frames (always final, never masked, so one encoding serves every
//! subscriber) and the opcodes of both directions are defined once, in
//! [`wsgate_fanout::frame`]: the node encodes publications there.

pub(crate) mod close;
pub(crate) mod deflate;
pub mod io;
pub(crate) mod message;
pub(crate) mod read;

pub use wsgate_fanout::frame::{self, op};
