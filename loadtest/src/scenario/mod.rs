//! The scenarios, one module each, and what they share.

pub mod churn;
pub mod fanout;
pub mod idle;
pub mod publisher;
pub mod resume;
pub mod scale;
pub mod session;
pub mod sse;
