//! `GET /sse`: the Server-Sent Events transport (docs/protocol.md, "Server-Sent
//! Events").
//!
//! The request passes the checks of `GET /ws` in the same order (drain, the upgrade
//! bucket, origin, token, per-IP limit, `--max-connections`), then the topics those
//! of a `subscribe` (names, permissions, namespaces, the per-connection limit): every
//! refusal is a plain HTTP response with the HTTP API's JSON error body, before the
//! stream starts. An admitted request gets a `text/event-stream` response whose body
//! the session ([`crate::session::sse`]) writes.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Either;

use crate::gateway::Gateway;
use crate::http_api::Body;
use crate::protocol::{self, Command};
use crate::security::auth::percent_decode;
use crate::server::{refuse, turn_away};
use crate::session::sse::{decode_id, SseBody, SseStart};
use crate::session::{Mode, Start};

/// The response of `/sse`: an error, or the event stream.
pub type SseResponse = Response<Either<Body, SseBody>>;

/// The value of query parameter `name`, percent-decoded.
fn param(req: &Request<impl Sized>, name: &str) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .map(percent_decode)
}

fn left(r: Response<Body>) -> SseResponse {
    r.map(Either::Left)
}

/// Serves `GET /sse`.
pub(crate) fn serve<B>(gw: Arc<Gateway>, req: Request<B>, peer: SocketAddr) -> SseResponse {
    if req.method() != Method::GET {
        let mut r = crate::http_api::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return left(r);
    }
    if let Some(r) = turn_away(&gw) {
        return left(r);
    }
    // The topics and positions are judged before the admission's per-IP slot is
    // taken: a malformed request costs no slot.
    let topics: Vec<String> = param(&req, "topics")
        .map(|t| {
            t.split(',')
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // `Last-Event-ID` (a browser's reconnect) is newer than the URL's `since`.
    let last_id = req
        .headers()
        .get("last-event-id")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|v| !v.trim().is_empty());
    let since = match last_id.or_else(|| param(&req, "since")) {
        None => None,
        Some(id) => match decode_id(&id) {
            Some(json) => Some(json),
            None => {
                return left(refuse(
                    &gw,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "Last-Event-ID / since is not a stream id of this gateway (v1.…)",
                ))
            }
        },
    };
    // The same rules as a `subscribe` command: decode one.
    let command = format!(
        "{{\"op\":\"subscribe\",\"topics\":{}{}}}",
        serde_json::to_string(&topics).expect("strings serialize"),
        since.map(|s| format!(",\"since\":{s}")).unwrap_or_default()
    );
    let (topics, since) = if topics.is_empty() {
        (Vec::new(), Default::default())
    } else {
        match protocol::decode(&command) {
            Ok(Command::Subscribe { topics, since, .. }) => (topics, since),
            Ok(_) => unreachable!("a subscribe command"),
            Err(e) => {
                return left(refuse(
                    &gw,
                    StatusCode::BAD_REQUEST,
                    e.code.as_str(),
                    &e.message,
                ))
            }
        }
    };
    if topics.len() > gw.config.max_topics_per_connection {
        return left(refuse(
            &gw,
            StatusCode::BAD_REQUEST,
            "too_many_topics",
            &format!(
                "at most {} topics per connection",
                gw.config.max_topics_per_connection
            ),
        ));
    }
    let admitted = match gw.security.admit(&req, peer) {
        Ok(a) => a,
        Err(refusal) => {
            let (status, reason, message) = refusal.parts();
            let mut r = refuse(&gw, status, reason, &message);
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            return left(r);
        }
    };
    let origin = req.headers().get(header::ORIGIN).cloned();
    let namespaces = gw.node.namespaces();
    for t in &topics {
        let server_only = !namespaces.client_subscribe(t) && !admitted.identity.topics.contains(t);
        if !admitted.identity.subscribe.allows(t) || server_only {
            let message = if server_only {
                format!(
                    "only the server subscribes connections to {} (its namespace has client_subscribe = false)",
                    protocol::json_string(t)
                )
            } else {
                format!("not allowed to subscribe to {}", protocol::json_string(t))
            };
            return left(refuse(&gw, StatusCode::FORBIDDEN, "forbidden", &message));
        }
    }
    let Some(slot) = gw.try_reserve_connection() else {
        return left(refuse(
            &gw,
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections",
            "node is at its connection limit",
        ));
    };
    let start = Start {
        peer,
        slot,
        admitted,
        mode: Mode::PubSub,
        deflate: Default::default(),
        prefix: bytes::Bytes::new(),
    };
    let (body, session) = crate::session::sse::run(
        gw.clone(),
        SseStart {
            start,
            topics,
            since,
        },
    );
    gw.tracker.spawn(session);
    let mut response = Response::builder();
    if let Some(origin) = origin {
        // The origin policy admitted it: a page of that origin may read the stream
        // (`EventSource` sends no credentials but the URL's token).
        response = response
            .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)
            .header(header::VARY, "Origin");
    }
    response
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Either::Right(body))
        .expect("valid response")
}
