//! Property tests (run by `cargo test`): the protocol decoder and the reply encoders
//! never panic, and what they produce keeps the contract. The topic/permission
//! matcher has its own properties beside it (src/acl.rs); the same entry points are
//! exposed to cargo-fuzz in crates/gateway/fuzz/ (nightly only).

use proptest::prelude::*;
use serde_json::Value;
use wsgate_gateway::protocol::{self, decode, Command, CommandError, ErrorCode, MAX_ID};
use wsgate_gateway::security::acl::Acl;

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            "subscribe",
            "unsubscribe",
            "publish",
            "ping",
            "refresh",
            "presence",
            "presence_stats",
            "op",
            "news"
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped like commands: known keys with values of any type.
fn command_like() -> impl Strategy<Value = Value> {
    let key = prop_oneof!["op", "id", "topics", "topic", "data", "token", "x"];
    prop::collection::btree_map(key, json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

fn check(text: &str) {
    match decode(text) {
        Ok(cmd) => {
            if let Some(id) = cmd.id() {
                assert!(id <= MAX_ID);
            }
            match cmd {
                Command::Subscribe { topics, .. } | Command::Unsubscribe { topics, .. } => {
                    assert!(!topics.is_empty());
                    for t in &topics {
                        wsgate_fanout::validate_topic(t).unwrap();
                    }
                    let reply: Value =
                        serde_json::from_str(&protocol::topics_reply("subscribed", None, &topics))
                            .unwrap();
                    assert_eq!(reply["topics"].as_array().unwrap().len(), topics.len());
                }
                Command::Publish { topic, data, .. } => {
                    wsgate_fanout::validate_topic(&topic).unwrap();
                    let _: Value = serde_json::from_str(data.get()).unwrap();
                }
                Command::Presence { topic, .. } | Command::PresenceStats { topic, .. } => {
                    wsgate_fanout::validate_topic(&topic).unwrap();
                    let reply: Value =
                        serde_json::from_str(&protocol::presence_reply(None, &topic, &[])).unwrap();
                    assert_eq!(reply["topic"].as_str(), Some(&*topic));
                }
                Command::Ping { .. } | Command::Refresh { .. } => {}
            }
        }
        Err(e) => {
            // Every error reply is one valid JSON object with the `id` key.
            let v: Value = serde_json::from_str(&protocol::error_reply(&e)).unwrap();
            assert_eq!(v["op"], "error");
            assert!(v.as_object().unwrap().contains_key("id"));
            assert!(e.id.is_none_or(|id| id <= MAX_ID));
        }
    }
}

proptest! {
    // 2000 cases per property in CI; `PROPTEST_CASES=200000` for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn decode_never_panics_on_any_text(text in ".{0,200}") {
        check(&text);
    }

    #[test]
    fn decode_never_panics_on_any_json(v in json_value()) {
        check(&v.to_string());
    }

    #[test]
    fn decode_handles_command_shapes(v in command_like()) {
        check(&v.to_string());
    }

    #[test]
    fn a_valid_id_is_echoed_in_errors(id in 0..=MAX_ID, op in "[a-z]{1,8}") {
        prop_assume!(!["subscribe", "unsubscribe", "publish", "ping", "refresh"].contains(&op.as_str()));
        let e = decode(&format!(r#"{{"op":"{op}","id":{id}}}"#)).unwrap_err();
        prop_assert_eq!((e.code, e.id), (ErrorCode::UnknownOp, Some(id)));
    }

    #[test]
    fn error_messages_of_any_text_stay_valid_json(msg in ".{0,64}", id in proptest::option::of(0..=MAX_ID)) {
        let e = CommandError::new(id, ErrorCode::Forbidden, msg.clone());
        let v: Value = serde_json::from_str(&protocol::error_reply(&e)).unwrap();
        prop_assert_eq!(v["message"].as_str().unwrap(), msg.as_str());
    }

    #[test]
    fn acl_never_panics(patterns in prop::collection::vec(".{0,16}", 0..5), sub in ".{0,8}", topic in ".{0,32}") {
        let _ = Acl::new(&patterns, &sub).allows(&topic);
    }
}
