//! The server API (docs/protocol.md, "Server API"): presence over HTTP, and commands
//! that act on connections wherever they are.
//!
//! - `POST /api/presence`, `POST /api/presence_stats`: a topic's presence.
//! - `POST /api/disconnect`, `/api/subscribe`, `/api/unsubscribe`: a [`Control`]
//!   command, sent to every node through the broker ([`wsgate_fanout::Node::control`]);
//!   each node carries it out on its own connections ([`on_control`]). A user or
//!   session no node has is not an error: nothing is done.
//! - `GET /api/info`: every live node.
//! - `POST /api/rebalance`: what each node holds over its share, and (unless a dry
//!   run) a [`Control::Rebalance`] to every node, which sheds its part
//!   ([`crate::rebalance`]).
//!
//! All on the main listener, behind the API key when one is configured.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};
use wsgate_fanout::frame;
use wsgate_fanout::node::{Hooks, PresenceError};
use wsgate_fanout::{validate_topic, NodeInfo};

use crate::close::Disconnect;
use crate::gateway::Gateway;
use crate::http_api::{api_body, authorized, error, json, method_not_allowed, unauthorized, Body};
use crate::protocol::{json_string, presence_clients};
use crate::session::outbox::ServerCommand;
use crate::session::session_number;

/// The close code of `POST /api/disconnect` when the call names none.
pub const DEFAULT_DISCONNECT_CODE: u16 = 4010;

/// The longest close reason: a close frame's payload is at most 125 bytes, two of
/// which are the code.
pub const MAX_REASON_LEN: usize = 123;

/// Which connections a command is for: every connection of a user (the token's
/// `sub`), or one session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    User(String),
    Session(String),
}

/// A server command as it travels to every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Control {
    Disconnect {
        target: Target,
        code: u16,
        reason: String,
    },
    Subscribe {
        target: Target,
        topics: Vec<Arc<str>>,
    },
    Unsubscribe {
        target: Target,
        topics: Vec<Arc<str>>,
    },
    /// `POST /api/rebalance`: how many connections each node (by id) sheds.
    Rebalance { shed: BTreeMap<String, u64> },
}

impl Control {
    fn name(&self) -> &'static str {
        match self {
            Control::Disconnect { .. } => "disconnect",
            Control::Subscribe { .. } => "subscribe",
            Control::Unsubscribe { .. } => "unsubscribe",
            Control::Rebalance { .. } => "rebalance",
        }
    }

    fn target(&self) -> Option<&Target> {
        match self {
            Control::Disconnect { target, .. }
            | Control::Subscribe { target, .. }
            | Control::Unsubscribe { target, .. } => Some(target),
            Control::Rebalance { .. } => None,
        }
    }
}

/// Tells the node who its gateway is: its id, its numbers, and where server
/// commands go. Weak: the node is part of the gateway.
pub(crate) fn hooks(gw: &Arc<Gateway>) -> Hooks {
    let started = Instant::now();
    let for_info: Weak<Gateway> = Arc::downgrade(gw);
    let for_control = for_info.clone();
    let node_id: Arc<str> = Arc::from(gw.node_id.as_str());
    let id = node_id.clone();
    Hooks {
        node_id,
        info: Box::new(move || match for_info.upgrade() {
            Some(gw) => node_info(&gw, started),
            None => NodeInfo {
                node: id.to_string(),
                connections: 0,
                subscriptions: 0,
                topics: 0,
                uptime_s: started.elapsed().as_secs(),
                version: env!("CARGO_PKG_VERSION").into(),
                draining: true,
                capacity: 0,
            },
        }),
        control: Box::new(move |bytes| {
            if let Some(gw) = for_control.upgrade() {
                on_control(&gw, bytes);
            }
        }),
    }
}

fn node_info(gw: &Gateway, started: Instant) -> NodeInfo {
    let hub = gw.node.hub();
    NodeInfo {
        node: gw.node_id.clone(),
        connections: gw.connections() as u64,
        subscriptions: u64::try_from(hub.subscription_count()).unwrap_or(0),
        topics: u64::try_from(hub.topic_count()).unwrap_or(0),
        uptime_s: started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").into(),
        draining: gw.is_draining(),
        capacity: gw.config.max_connections as u64,
    }
}

/// Carries out a server command on this node's matching connections.
pub(crate) fn on_control(gw: &Arc<Gateway>, bytes: &[u8]) {
    let command: Control = match serde_json::from_slice(bytes) {
        Ok(c) => c,
        Err(e) => {
            // Anyone with access to the broker can write anything there.
            warn!(error = %e, "ignored a malformed server command");
            return;
        }
    };
    let found = match command.target() {
        None => {
            if let Control::Rebalance { shed } = &command {
                crate::rebalance::on_command(gw, shed);
            }
            return;
        }
        Some(Target::User(user)) => gw
            .sessions
            .find(|e| e.user.as_deref() == Some(user.as_str())),
        Some(Target::Session(name)) => match session_number(name) {
            Some(n) => gw.sessions.find(|e| e.session == n),
            None => Vec::new(),
        },
    };
    if found.is_empty() {
        debug!(
            command = command.name(),
            "server command: no connection here"
        );
        return;
    }
    gw.metrics
        .server_commands
        .with_label_values(&[command.name()])
        .inc_by(found.len() as u64);
    info!(
        command = command.name(),
        connections = found.len(),
        "server command"
    );
    for outbox in found {
        match &command {
            Control::Disconnect { code, reason, .. } => {
                let close = frame::close(*code, reason);
                outbox.close_with(Disconnect::ServerApi, Some(close));
            }
            Control::Subscribe { topics, .. } => {
                outbox.command(ServerCommand::Subscribe(topics.clone()));
            }
            Control::Unsubscribe { topics, .. } => {
                outbox.command(ServerCommand::Unsubscribe(topics.clone()));
            }
            Control::Rebalance { .. } => {}
        }
    }
}

/// A request body, or the 400 that says what was expected.
fn body_of<T: for<'de> Deserialize<'de>>(body: &Bytes, expected: &str) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("expected {expected}: {e}"))
}

fn bad(code: &str, message: &str) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, code, message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicRequest {
    topic: String,
}

/// `POST /api/presence` (`stats: false`) and `POST /api/presence_stats`.
pub async fn presence(gw: Arc<Gateway>, req: Request<Incoming>, stats: bool) -> Response<Body> {
    let body = match api_body(&gw, req).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let request: TopicRequest = match body_of(&body, "{\"topic\": string}") {
        Ok(r) => r,
        Err(why) => return bad("bad_request", &why),
    };
    gw.metrics
        .presence_queries
        .with_label_values(&["http"])
        .inc();
    let topic = &request.topic;
    let answer = if stats {
        gw.node.presence_stats(topic).await.map(|s| {
            format!(
                r#"{{"topic":{},"clients":{},"users":{}}}"#,
                json_string(topic),
                s.clients,
                s.users
            )
        })
    } else {
        gw.node.presence(topic).await.map(|list| {
            format!(
                r#"{{"topic":{},"clients":{}}}"#,
                json_string(topic),
                presence_clients(&list)
            )
        })
    };
    match answer {
        Ok(text) => json(StatusCode::OK, text),
        Err(PresenceError::InvalidTopic(e)) => bad("invalid_topic", &format!("invalid topic: {e}")),
        Err(e @ PresenceError::NotEnabled(_)) => bad("not_enabled", &e.to_string()),
        Err(PresenceError::Broker(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

impl CommandRequest {
    fn target(&mut self) -> Option<Target> {
        match (self.user.take(), self.session.take()) {
            (Some(u), None) if !u.is_empty() => Some(Target::User(u)),
            (None, Some(s)) if !s.is_empty() => Some(Target::Session(s)),
            _ => None,
        }
    }
}

/// What each server command's request may hold, for its 400s.
const DISCONNECT_BODY: &str =
    "{\"user\"|\"session\": string, \"code\"?: 4000-4999, \"reason\"?: string}";
const TOPICS_BODY: &str = "{\"user\"|\"session\": string, \"topics\": [string, …]}";

/// `POST /api/disconnect`, `/api/subscribe`, `/api/unsubscribe` (`what`).
pub async fn command(gw: Arc<Gateway>, req: Request<Incoming>, what: &str) -> Response<Body> {
    let body = match api_body(&gw, req).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let expected = if what == "disconnect" {
        DISCONNECT_BODY
    } else {
        TOPICS_BODY
    };
    let mut request: CommandRequest = match body_of(&body, expected) {
        Ok(r) => r,
        Err(why) => return bad("bad_request", &why),
    };
    let Some(target) = request.target() else {
        return bad(
            "bad_request",
            "name the connections with exactly one of \"user\" or \"session\" (a non-empty string)",
        );
    };
    let command = match what {
        "disconnect" => {
            if request.topics.is_some() {
                return bad(
                    "bad_request",
                    &format!("expected {DISCONNECT_BODY}: no `topics` here"),
                );
            }
            let code = request.code.unwrap_or(DEFAULT_DISCONNECT_CODE);
            if !(4000..=4999).contains(&code) {
                return bad(
                    "bad_request",
                    &format!("`code` must be between 4000 and 4999 (got {code})"),
                );
            }
            let reason = request
                .reason
                .unwrap_or_else(|| Disconnect::ServerApi.reason().into());
            if reason.len() > MAX_REASON_LEN {
                return bad(
                    "bad_request",
                    &format!("`reason` is at most {MAX_REASON_LEN} bytes (a close frame's limit)"),
                );
            }
            Control::Disconnect {
                target,
                code,
                reason,
            }
        }
        _ => {
            if request.code.is_some() || request.reason.is_some() {
                return bad("bad_request", &format!("expected {TOPICS_BODY}"));
            }
            let topics = match request.topics {
                Some(t) if !t.is_empty() => t,
                _ => return bad("bad_request", "`topics` must be a non-empty list"),
            };
            if let Some((t, e)) = topics
                .iter()
                .find_map(|t| validate_topic(t).err().map(|e| (t, e)))
            {
                return bad(
                    "invalid_topic",
                    &format!("invalid topic {}: {e}", json_string(t)),
                );
            }
            let topics: Vec<Arc<str>> = topics.into_iter().map(Arc::from).collect();
            if what == "subscribe" {
                Control::Subscribe { target, topics }
            } else {
                Control::Unsubscribe { target, topics }
            }
        }
    };
    let bytes = serde_json::to_vec(&command).expect("commands serialize");
    match gw.node.control(&bytes).await {
        Ok(Some(nodes)) => json(StatusCode::OK, format!(r#"{{"ok":true,"nodes":{nodes}}}"#)),
        Ok(None) => json(StatusCode::OK, r#"{"ok":true}"#),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RebalanceRequest {
    #[serde(default)]
    dry_run: bool,
}

/// `POST /api/rebalance` (body optional: `{"dry_run":true}`): what each live node
/// holds over its share and will shed; unless a dry run, each node is told to shed
/// its part (paced, with 1012).
pub async fn rebalance(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let body = match api_body(&gw, req).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let request: RebalanceRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RebalanceRequest::default()
    } else {
        match body_of(&body, "no body, or {\"dry_run\"?: bool}") {
            Ok(r) => r,
            Err(why) => return bad("bad_request", &why),
        }
    };
    let nodes = match gw.node.nodes().await {
        Ok(n) => n,
        Err(e) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            )
        }
    };
    let plan = crate::rebalance::plan(&nodes, gw.config.rebalance_margin);
    let shedding: u64 = plan.iter().map(|p| p.shed).sum();
    if !request.dry_run && shedding > 0 {
        let shed = plan
            .iter()
            .filter(|p| p.shed > 0)
            .map(|p| (p.node.clone(), p.shed))
            .collect();
        let bytes = serde_json::to_vec(&Control::Rebalance { shed }).expect("commands serialize");
        if let Err(e) = gw.node.control(&bytes).await {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    }
    info!(
        dry_run = request.dry_run,
        nodes = plan.len(),
        shed = shedding,
        "rebalance requested"
    );
    let body = serde_json::json!({ "dry_run": request.dry_run, "nodes": plan }).to_string();
    json(StatusCode::OK, body)
}

/// `GET /api/info`: every live node, sorted by id.
pub async fn info(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return method_not_allowed(Method::GET);
    }
    if !authorized(&gw, &req) {
        return unauthorized();
    }
    match gw.node.nodes().await {
        Ok(mut nodes) => {
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            let body = serde_json::json!({ "nodes": nodes }).to_string();
            json(StatusCode::OK, body)
        }
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_travel_as_tagged_json() {
        let c = Control::Disconnect {
            target: Target::User("alice".into()),
            code: 4010,
            reason: "bye".into(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"disconnect","target":{"user":"alice"},"code":4010,"reason":"bye"}"#
        );
        assert_eq!(serde_json::from_str::<Control>(&text).unwrap(), c);
        let s = Control::Subscribe {
            target: Target::Session("00000000000000ff".into()),
            topics: vec!["a".into()],
        };
        let back: Control = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(serde_json::from_str::<Control>(r#"{"cmd":"explode"}"#).is_err());
        let r = Control::Rebalance {
            shed: [("n0".to_string(), 40)].into_iter().collect(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"cmd":"rebalance","shed":{"n0":40}}"#);
        assert_eq!(serde_json::from_str::<Control>(&text).unwrap(), r);
    }
}
