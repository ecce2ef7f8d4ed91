//! The permission matcher must never panic: input is split into patterns, a subject
//! and a topic at NUL bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate_gateway::security::acl::Acl;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts: Vec<&str> = text.split('\0').collect();
    let topic = parts.pop().unwrap_or("");
    let subject = parts.pop().unwrap_or("");
    let _ = Acl::new(&parts, subject).allows(topic);
});
