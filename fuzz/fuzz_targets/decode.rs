//! The protocol decoder must never panic, and its errors must encode as JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_gateway::protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = protocol::decode(text) {
            let reply = protocol::error_reply(&e);
            assert!(reply.starts_with("{\"op\":\"error\""));
        }
    }
});
