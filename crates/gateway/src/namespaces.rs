//! The `[[namespaces]]` section of the configuration file (docs/configuration.md):
//! which topics belong to which namespace, and what the namespace's topics are:
//! streams (`history_size` + `history_ttl`), presence (`presence`, `join_leave`,
//! `join_leave_rate`), what clients may do themselves (`client_publish`,
//! `client_subscribe`), what a lagging reader's queue does (`slow_consumer`) and
//! whether publications are compressed for clients that negotiated it (`compression`). Every option is an optional field of [`Entry`], off (or
//! v1's behaviour) by default.
//!
//! No namespace, or a namespace without options, means plain (v1) topics.

use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use wsgate_fanout::{Namespace, Namespaces, Pattern, PresenceOptions, SlowConsumer, StreamOptions};

use crate::config_file::SettingError;

/// The largest `history_size`: kept publications per stream.
pub const MAX_HISTORY_SIZE: u64 = 1_000_000;

/// The longest `history_ttl`: 30 days.
pub const MAX_HISTORY_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The largest `join_leave_rate`: events pushed per topic and second on a node.
pub const MAX_JOIN_LEAVE_RATE: i64 = 10_000;

/// The longest namespace name.
pub const MAX_NAME_LEN: usize = 64;

/// The file's namespaces; its other keys are flags, read elsewhere.
#[derive(Debug, Deserialize)]
struct Section {
    #[serde(default)]
    namespaces: Vec<Entry>,
}

/// One `[[namespaces]]` table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Spanned<String>,
    topics: Spanned<Vec<Spanned<String>>>,
    #[serde(default, alias = "history-size")]
    history_size: Option<Spanned<i64>>,
    #[serde(default, alias = "history-ttl")]
    history_ttl: Option<Spanned<String>>,
    #[serde(default)]
    presence: Option<Spanned<bool>>,
    #[serde(default, alias = "join-leave")]
    join_leave: Option<Spanned<bool>>,
    #[serde(default, alias = "join-leave-rate")]
    join_leave_rate: Option<Spanned<i64>>,
    #[serde(default, alias = "client-publish")]
    client_publish: Option<bool>,
    #[serde(default, alias = "client-subscribe")]
    client_subscribe: Option<bool>,
    #[serde(default, alias = "slow-consumer")]
    slow_consumer: Option<Spanned<String>>,
    #[serde(default)]
    compression: Option<bool>,
}

fn err(span: Range<usize>, message: String) -> SettingError {
    SettingError {
        span: Some(span),
        message,
    }
}

/// The namespaces of a configuration file's text (none when it has no
/// `[[namespaces]]`), checked.
///
/// # Errors
/// The first problem, naming the namespace and its setting: an unknown key, a wrong
/// type, a bad or duplicate pattern, a duplicate name, `history_size` outside
/// 1..=[`MAX_HISTORY_SIZE`], `history_ttl` not a positive duration up to
/// [`MAX_HISTORY_TTL`], or only one of the two.
pub fn parse(text: &str) -> Result<Namespaces, SettingError> {
    let section: Section = toml::from_str(text).map_err(|e| {
        let m = e.message();
        let message = match e.span().and_then(|s| key_at(text, s.start)) {
            Some(k) if k != "namespaces" => format!("namespaces: `{k}`: {m}"),
            _ if m.contains("expected a sequence") => {
                format!("namespaces: {m} (write one [[namespaces]] table per namespace)")
            }
            _ => format!("namespaces: {m}"),
        };
        SettingError {
            span: e.span(),
            message,
        }
    })?;
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut patterns: HashMap<String, String> = HashMap::new();
    let mut list = Vec::new();
    for (i, entry) in section.namespaces.into_iter().enumerate() {
        let name = entry.name.get_ref().clone();
        let at = |key: &str| format!("namespaces[{i}] ({name:?}).{key}");
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !name_ok {
            return Err(err(
                entry.name.span(),
                format!(
                    "namespaces[{i}].name {name:?}: 1 to {MAX_NAME_LEN} letters, digits, `_`, `-` or `.`"
                ),
            ));
        }
        if let Some(first) = names.insert(name.clone(), i) {
            return Err(err(
                entry.name.span(),
                format!(
                    "namespaces[{i}].name: {name:?} is already the name of namespaces[{first}]"
                ),
            ));
        }
        if entry.topics.get_ref().is_empty() {
            return Err(err(
                entry.topics.span(),
                format!(
                    "{}: at least one topic pattern (`chat:*`, `news`, `*`)",
                    at("topics")
                ),
            ));
        }
        let mut topics = Vec::new();
        for t in entry.topics.into_inner() {
            let pattern = Pattern::parse(t.get_ref())
                .map_err(|e| err(t.span(), format!("{}: {e}", at("topics"))))?;
            if let Some(other) = patterns.insert(pattern.as_string(), name.clone()) {
                return Err(err(
                    t.span(),
                    format!(
                        "{}: {:?} is already claimed by namespace {other:?} (each pattern belongs to one namespace)",
                        at("topics"),
                        pattern.as_string()
                    ),
                ));
            }
            topics.push(pattern);
        }
        let stream = match (entry.history_size, entry.history_ttl) {
            (None, None) => None,
            (Some(size), None) => {
                return Err(err(
                    size.span(),
                    format!("{}: needed with history_size (how long a stream keeps a message, e.g. \"10m\")", at("history_ttl")),
                ))
            }
            (None, Some(ttl)) => {
                return Err(err(
                    ttl.span(),
                    format!("{}: needed with history_ttl (how many messages a stream keeps, e.g. 1000)", at("history_size")),
                ))
            }
            (Some(size), Some(ttl)) => Some(StreamOptions {
                history_size: history_size(&size).map_err(|m| err(size.span(), format!("{}: {m}", at("history_size"))))?,
                history_ttl: history_ttl(&ttl).map_err(|m| err(ttl.span(), format!("{}: {m}", at("history_ttl"))))?,
            }),
        };
        let presence = presence_options(&entry.presence, &entry.join_leave, &entry.join_leave_rate)
            .map_err(|(span, m)| err(span, at(&m)))?;
        let slow_consumer = match &entry.slow_consumer {
            None => SlowConsumer::default(),
            Some(v) => SlowConsumer::parse(v.get_ref()).ok_or_else(|| {
                err(
                    v.span(),
                    format!(
                        "{}: {:?} is not a policy (one of \"disconnect\", \"drop_oldest\", \"latest\")",
                        at("slow_consumer"),
                        v.get_ref()
                    ),
                )
            })?,
        };
        list.push(Namespace {
            name,
            topics,
            stream,
            presence,
            client_publish: entry.client_publish.unwrap_or(true),
            client_subscribe: entry.client_subscribe.unwrap_or(true),
            slow_consumer,
            compression: entry.compression.unwrap_or(true),
        });
    }
    Namespaces::new(list).map_err(|message| SettingError {
        span: None,
        message,
    })
}

/// One line per namespace, for `wsgate check-config` and the start log:
/// `chat: chat:*, dm:* → stream (history 1000 messages, 10m)`.
pub fn describe(namespaces: &Namespaces) -> Vec<String> {
    namespaces
        .iter()
        .map(|ns| {
            let topics: Vec<String> = ns.topics.iter().map(Pattern::as_string).collect();
            let mut what = vec![match &ns.stream {
                Some(s) => format!(
                    "stream (history {} messages, {})",
                    s.history_size,
                    humantime::format_duration(s.history_ttl)
                ),
                None => "plain".to_string(),
            }];
            if let Some(p) = &ns.presence {
                what.push(if p.join_leave {
                    format!(
                        "presence, join/leave (at most {}/s per topic)",
                        p.join_leave_rate
                    )
                } else {
                    "presence".to_string()
                });
            }
            if !ns.client_publish {
                what.push("no client publish".to_string());
            }
            if !ns.client_subscribe {
                what.push("server-side subscriptions only".to_string());
            }
            if ns.slow_consumer != SlowConsumer::Disconnect {
                what.push(format!("slow consumers: {}", ns.slow_consumer.as_str()));
            }
            if !ns.compression {
                what.push("uncompressed".to_string());
            }
            format!("{}: {} → {}", ns.name, topics.join(", "), what.join(", "))
        })
        .collect()
}

/// The key of the `key = value` line holding `offset`, if it is one.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let offset = offset.min(text.len());
    let start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let end = text
        .get(offset..)?
        .find('\n')
        .map_or(text.len(), |i| offset + i);
    let (key, _) = text.get(start..end)?.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then_some(key)
}

/// The presence options of a namespace, or the key at fault (with its span) and why.
fn presence_options(
    presence: &Option<Spanned<bool>>,
    join_leave: &Option<Spanned<bool>>,
    rate: &Option<Spanned<i64>>,
) -> Result<Option<PresenceOptions>, (Range<usize>, String)> {
    let on = presence.as_ref().is_some_and(|p| *p.get_ref());
    if let Some(j) = join_leave.as_ref().filter(|j| *j.get_ref() && !on) {
        return Err((
            j.span(),
            "join_leave: needs presence = true (join/leave events are presence changes)".into(),
        ));
    }
    if let Some(r) = rate {
        let n = *r.get_ref();
        if !(1..=MAX_JOIN_LEAVE_RATE).contains(&n) {
            return Err((
                r.span(),
                format!("join_leave_rate: must be between 1 and {MAX_JOIN_LEAVE_RATE} events per second (got {n})"),
            ));
        }
        if !join_leave.as_ref().is_some_and(|j| *j.get_ref()) {
            return Err((r.span(), "join_leave_rate: needs join_leave = true".into()));
        }
    }
    if !on {
        return Ok(None);
    }
    let mut opts = PresenceOptions {
        join_leave: join_leave.as_ref().is_some_and(|j| *j.get_ref()),
        ..PresenceOptions::default()
    };
    if let Some(r) = rate {
        opts.join_leave_rate = *r.get_ref() as u32;
    }
    Ok(Some(opts))
}

fn history_size(size: &Spanned<i64>) -> Result<usize, String> {
    let n = *size.get_ref();
    match u64::try_from(n) {
        Ok(n @ 1..=MAX_HISTORY_SIZE) => Ok(n as usize),
        _ => Err(format!(
            "must be between 1 and {MAX_HISTORY_SIZE} (got {n})"
        )),
    }
}

fn history_ttl(ttl: &Spanned<String>) -> Result<Duration, String> {
    let text = ttl.get_ref();
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e} (examples: 30s, 10m, 24h)"))?;
    if d.is_zero() || d > MAX_HISTORY_TTL {
        return Err(format!(
            "{text:?}: must be greater than 0 and at most 30 days"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        parse(text).unwrap_err().message
    }

    #[test]
    fn no_section_means_no_streams() {
        let ns = parse("listen = \"127.0.0.1:1\"\n").unwrap();
        assert_eq!(ns, Namespaces::default());
        assert!(!ns.has_streams());
        assert!(!parse("").unwrap().has_streams());
    }

    #[test]
    fn streams_and_plain_namespaces() {
        let ns = parse(
            r#"
            [[namespaces]]
            name = "chat"
            topics = ["chat:*", "dm:*"]
            history_size = 1000
            history_ttl = "10m"

            [[namespaces]]
            name = "lobby"
            topics = ["chat:lobby"]

            [[namespaces]]
            name = "feed"
            topics = ["feed"]
            history-size = 1
            history-ttl = "1s"
            "#,
        )
        .unwrap();
        let chat = ns.stream("chat:42").unwrap();
        assert_eq!(chat.history_size, 1000);
        assert_eq!(chat.history_ttl, Duration::from_secs(600));
        assert_eq!(ns.stream("dm:a").unwrap().history_size, 1000);
        assert!(ns.stream("chat:lobby").is_none(), "exact pattern, plain");
        assert_eq!(ns.namespace("chat:lobby").unwrap().name, "lobby");
        assert_eq!(
            ns.stream("feed").unwrap().history_ttl,
            Duration::from_secs(1)
        );
        assert!(ns.stream("news").is_none(), "no namespace: plain");
        assert_eq!(
            describe(&ns),
            [
                "chat: chat:*, dm:* → stream (history 1000 messages, 10m)",
                "lobby: chat:lobby → plain",
                "feed: feed → stream (history 1 messages, 1s)",
            ]
        );
    }

    #[test]
    fn presence_and_client_rules() {
        let ns = parse(
            r#"
            [[namespaces]]
            name = "rooms"
            topics = ["room.*"]
            presence = true
            join_leave = true
            join_leave_rate = 5

            [[namespaces]]
            name = "who"
            topics = ["who.*"]
            presence = true

            [[namespaces]]
            name = "alerts"
            topics = ["alerts.*"]
            client_publish = false
            client-subscribe = false
            "#,
        )
        .unwrap();
        let p = ns.presence("room.1").unwrap();
        assert!(p.join_leave);
        assert_eq!(p.join_leave_rate, 5);
        let p = ns.presence("who.1").unwrap();
        assert!(!p.join_leave);
        assert_eq!(
            p.join_leave_rate,
            wsgate_fanout::presence::DEFAULT_JOIN_LEAVE_RATE
        );
        assert!(ns.presence("alerts.x").is_none() && ns.presence("other").is_none());
        assert!(ns.client_publish("room.1") && ns.client_subscribe("room.1"));
        assert!(!ns.client_publish("alerts.x") && !ns.client_subscribe("alerts.x"));
        assert!(ns.client_publish("elsewhere") && ns.client_subscribe("elsewhere"));
        assert_eq!(
            describe(&ns),
            [
                "rooms: room.* → plain, presence, join/leave (at most 5/s per topic)",
                "who: who.* → plain, presence",
                "alerts: alerts.* → plain, no client publish, server-side subscriptions only",
            ]
        );
        let one = |body: &str| format!("[[namespaces]]\nname = \"n\"\ntopics = [\"t\"]\n{body}\n");
        let e = parse_err(&one("join_leave = true"));
        assert!(
            e.contains("namespaces[0] (\"n\").join_leave") && e.contains("presence = true"),
            "{e}"
        );
        let e = parse_err(&one(
            "presence = true\njoin_leave = true\njoin_leave_rate = 0",
        ));
        assert!(
            e.contains("join_leave_rate") && e.contains("between 1 and"),
            "{e}"
        );
        let e = parse_err(&one("presence = true\njoin_leave_rate = 3"));
        assert!(e.contains("needs join_leave"), "{e}");
        let e = parse_err(&one("presence = \"yes\""));
        assert!(e.contains("`presence`"), "{e}");
        parse(&one("presence = false\nclient_publish = true")).unwrap();
    }

    #[test]
    fn slow_consumer_policies() {
        let ns = parse(
            r#"
            [[namespaces]]
            name = "ticker"
            topics = ["px.*"]
            slow_consumer = "latest"

            [[namespaces]]
            name = "feed"
            topics = ["feed.*"]
            history_size = 10
            history_ttl = "1m"
            slow-consumer = "drop_oldest"

            [[namespaces]]
            name = "chat"
            topics = ["chat.*"]
            slow_consumer = "disconnect"

            [[namespaces]]
            name = "plain"
            topics = ["plain.*"]
            "#,
        )
        .unwrap();
        assert_eq!(ns.slow_consumer("px.1"), SlowConsumer::Latest);
        assert_eq!(ns.slow_consumer("feed.1"), SlowConsumer::DropOldest);
        assert_eq!(ns.slow_consumer("chat.1"), SlowConsumer::Disconnect);
        assert_eq!(ns.slow_consumer("plain.1"), SlowConsumer::Disconnect);
        assert_eq!(ns.slow_consumer("nowhere"), SlowConsumer::Disconnect);
        assert_eq!(
            describe(&ns),
            [
                "ticker: px.* → plain, slow consumers: latest",
                "feed: feed.* → stream (history 10 messages, 1m), slow consumers: drop_oldest",
                "chat: chat.* → plain",
                "plain: plain.* → plain",
            ]
        );
        let text = "[[namespaces]]\nname = \"n\"\ntopics = [\"t\"]\nslow_consumer = \"newest\"\n";
        let e = parse(text).unwrap_err();
        assert!(
            e.message.contains("namespaces[0] (\"n\").slow_consumer")
                && e.message.contains("\"newest\" is not a policy")
                && e.message.contains("drop_oldest"),
            "{}",
            e.message
        );
        assert_eq!(&text[e.span.unwrap()], "\"newest\"");
        let e = parse_err("[[namespaces]]\nname = \"n\"\ntopics = [\"t\"]\nslow_consumer = 1\n");
        assert!(e.contains("`slow_consumer`"), "{e}");
    }

    #[test]
    fn bounds_of_the_stream_options() {
        let ns = |size: &str, ttl: &str| {
            format!("[[namespaces]]\nname = \"n\"\ntopics = [\"t:*\"]\nhistory_size = {size}\nhistory_ttl = {ttl}\n")
        };
        parse(&ns("1000000", "\"30days\"")).unwrap();
        let e = parse_err(&ns("0", "\"10m\""));
        assert!(
            e.contains("namespaces[0] (\"n\").history_size") && e.contains("between 1 and 1000000"),
            "{e}"
        );
        assert!(parse_err(&ns("1000001", "\"10m\"")).contains("history_size"));
        assert!(parse_err(&ns("-5", "\"10m\"")).contains("got -5"));
        let e = parse_err(&ns("10", "\"0s\""));
        assert!(
            e.contains("history_ttl") && e.contains("greater than 0"),
            "{e}"
        );
        assert!(parse_err(&ns("10", "\"31days\"")).contains("history_ttl"));
        let e = parse_err(&ns("10", "\"soon\""));
        assert!(e.contains("history_ttl") && e.contains("examples"), "{e}");
        let e = parse_err(&ns("10", "600"));
        assert!(e.contains("`history_ttl`") && e.contains("string"), "{e}");
        let e = parse_err(&ns("\"many\"", "\"10m\""));
        assert!(e.contains("`history_size`"), "{e}");
        let e = parse_err("[[namespaces]]\nname = \"n\"\ntopics = [\"t\"]\nhistory_size = 5\n");
        assert!(e.contains("history_ttl: needed"), "{e}");
        let e = parse_err("[[namespaces]]\nname = \"n\"\ntopics = [\"t\"]\nhistory_ttl = \"5s\"\n");
        assert!(e.contains("history_size: needed"), "{e}");
    }

    #[test]
    fn names_patterns_and_keys_are_checked() {
        let e = parse_err("[[namespaces]]\nname = \"a\"\ntopics = [\"a*b\"]\n");
        assert!(e.contains("topics") && e.contains("a*b"), "{e}");
        let e = parse_err("[[namespaces]]\nname = \"a\"\ntopics = []\n");
        assert!(e.contains("namespaces[0] (\"a\").topics"), "{e}");
        let e = parse_err("[[namespaces]]\nname = \"\"\ntopics = [\"x\"]\n");
        assert!(e.contains("namespaces[0].name"), "{e}");
        let two = |a: &str, b: &str, pa: &str, pb: &str| {
            format!("[[namespaces]]\nname = \"{a}\"\ntopics = [\"{pa}\"]\n[[namespaces]]\nname = \"{b}\"\ntopics = [\"{pb}\"]\n")
        };
        let e = parse_err(&two("a", "a", "x", "y"));
        assert!(
            e.contains("namespaces[1].name") && e.contains("namespaces[0]"),
            "{e}"
        );
        let e = parse_err(&two("a", "b", "x:*", "x:*"));
        assert!(
            e.contains("namespaces[1] (\"b\").topics") && e.contains("\"a\""),
            "{e}"
        );
        parse(&two("a", "b", "x:*", "x:y:*")).unwrap();
        let e = parse_err("[[namespaces]]\nname = \"a\"\ntopics = [\"x\"]\nhistory_sise = 3\n");
        assert!(e.contains("unknown field `history_sise`"), "{e}");
        let e = parse("[[namespaces]]\nname = \"a\"\n\ntopics = [\"x\"]\nbogus = 1\n").unwrap_err();
        assert!(e.message.contains("bogus"), "{}", e.message);
        assert!(e.span.is_some(), "unknown keys are located");
        let e = parse_err("[[namespaces]]\ntopics = [\"x\"]\n");
        assert!(e.contains("name"), "{e}");
        let e = parse_err("namespaces = 3\n");
        assert!(e.contains("[[namespaces]]"), "{e}");
        let e = parse_err("[namespaces]\nname = \"x\"\n");
        assert!(e.contains("[[namespaces]]"), "{e}");
        let e = parse_err("[[namespaces]]\nname = \"a\"\ntopics = \"x\"\n");
        assert!(e.contains("`topics`"), "{e}");
    }
}
