//! Plain HTTP endpoints: the publish API on the main listener, and health, readiness,
//! metrics and drain on the admin listener.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::fmt::Write as _;
use subtle::ConstantTimeEq;

use wsgate_fanout::{validate_topic, HistoryError, HistoryQuery, PublishError, Source};

use crate::gateway::Gateway;
use crate::protocol::{json_string, push_position};

/// The response body type of every endpoint.
pub type Body = Full<Bytes>;

/// A response with a JSON body.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// `{"error":"<code>","message":"…"}` with a status.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        format!(
            "{{\"error\":\"{code}\",\"message\":{}}}",
            json_string(message)
        ),
    )
}

/// `GET /healthz`: the process is alive.
pub fn healthz() -> Response<Body> {
    json(StatusCode::OK, r#"{"status":"ok"}"#)
}

/// `GET /readyz`: 200 when the node should get new connections; 503 while draining
/// or while its broker cannot fan out (Redis unreachable).
pub fn readyz(gw: &Gateway) -> Response<Body> {
    let ready = gw.is_ready();
    let body = format!(
        r#"{{"ready":{ready},"draining":{},"broker":"{}","broker_ready":{},"connections":{},"node":{}}}"#,
        gw.is_draining(),
        gw.node.broker_kind(),
        gw.node.broker_ready(),
        gw.connections(),
        json_string(&gw.node_id),
    );
    json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

/// `GET /metrics`: Prometheus text exposition.
pub fn metrics(gw: &Gateway) -> Response<Body> {
    gw.refresh_gauges();
    Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(Full::new(Bytes::from(gw.metrics.encode())))
        .expect("valid response")
}

/// `POST /drain`: starts the graceful drain (for a Kubernetes preStop hook).
pub fn drain(gw: &Gateway) -> Response<Body> {
    gw.start_drain();
    json(StatusCode::ACCEPTED, r#"{"draining":true}"#)
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

pub(crate) fn authorized(gw: &Gateway, req: &Request<Incoming>) -> bool {
    let Some(key) = gw.config.api_key.as_deref() else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    // Constant time, so the key cannot be guessed byte by byte from response times.
    given.ct_eq(key.as_bytes()).into()
}

/// The 405 of a call with another method than `allowed`.
pub(crate) fn method_not_allowed(allowed: Method) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allowed}"),
    );
    r.headers_mut().insert(
        header::ALLOW,
        allowed.as_str().parse().expect("valid header"),
    );
    r
}

/// The 401 of a call without the API key.
pub(crate) fn unauthorized() -> Response<Body> {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "missing or wrong API key",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        "Bearer".parse().expect("valid header"),
    );
    r
}

/// What every `POST /api/*` endpoint checks first: the method, the API key, the body
/// size; answers the body, or the refusal to send.
pub(crate) async fn api_body(
    gw: &Gateway,
    req: Request<Incoming>,
) -> Result<Bytes, Response<Body>> {
    if req.method() != Method::POST {
        return Err(method_not_allowed(Method::POST));
    }
    if !authorized(gw, &req) {
        return Err(unauthorized());
    }
    let max_body = gw.config.http_max_body;
    match Limited::new(req.into_body(), max_body).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("the body is over {max_body} bytes"),
        )),
        Err(_) => Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "could not read the body",
        )),
    }
}

/// `POST /api/publish` with `{"topic":…,"data":…}` or an array of them.
pub async fn publish(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let body = match api_body(&gw, req).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body must be UTF-8 JSON",
            )
        }
    };
    let batch = text.trim_start().starts_with('[');
    let items: Vec<Item<'_>> = match batch {
        true => match serde_json::from_str(text) {
            Ok(items) => items,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("invalid JSON: {e}"),
                )
            }
        },
        false => match serde_json::from_str(text) {
            Ok(item) => vec![item],
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("invalid JSON: {e}"),
                )
            }
        },
    };
    if items.is_empty() {
        return error(StatusCode::BAD_REQUEST, "bad_request", "the batch is empty");
    }
    // Validate everything before publishing anything: a batch is accepted whole or
    // refused whole when the request itself is wrong.
    let mut checked = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Some(topic) = item.topic.as_deref() else {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("item {i}: `topic` is required"),
            );
        };
        let Some(data) = item.data else {
            // The topic's own problem, if it has one, is the first thing to say.
            if let Err(e) = validate_topic(topic) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_topic",
                    &format!("item {i}: {e}"),
                );
            }
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("item {i}: `data` is required"),
            );
        };
        let data = data.get().as_bytes();
        match gw.node.check(topic, data) {
            Ok(()) => checked.push((topic, data)),
            Err(e @ PublishError::InvalidTopic(_)) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_topic",
                    &format!("item {i}: {e}"),
                )
            }
            Err(e @ PublishError::TooLarge { .. }) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    &format!("item {i}: {e}"),
                )
            }
        }
    }
    // Every publish is issued (ordered) before any is awaited: one pipeline. The node
    // counts each outcome.
    let acks: Vec<_> = checked
        .iter()
        .map(|(topic, data)| gw.node.publish(Source::Http, topic, data))
        .collect();
    let mut published = 0usize;
    let mut failure = None;
    // Each item's answer: its position on a stream, nothing on a plain topic.
    let mut results = String::from(",\"results\":[");
    let mut single = String::new();
    let mut any_stream = false;
    for (i, ack) in acks.into_iter().enumerate() {
        let outcome = match ack {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            // Checked above; kept as a failure rather than a panic.
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(position) => {
                published += 1;
                if i > 0 {
                    results.push(',');
                }
                results.push('{');
                if let Some(p) = &position {
                    any_stream = true;
                    let mut fields = String::new();
                    push_position(&mut fields, p);
                    // The fields open with a comma: none is needed inside `{…}`.
                    results.push_str(&fields[1..]);
                    single = fields;
                }
                results.push('}');
            }
            Err(e) => failure = Some(e),
        }
    }
    results.push(']');
    match failure {
        None => json(
            StatusCode::OK,
            format!(
                r#"{{"ok":true,"published":{published}{}}}"#,
                // A batch of plain topics is answered exactly as in v1.
                if !batch {
                    &single
                } else if any_stream {
                    &results
                } else {
                    ""
                }
            ),
        ),
        Some(e) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                r#"{{"error":"unavailable","message":{},"published":{published}}}"#,
                json_string(&e)
            ),
        ),
    }
}

/// Default and largest `limit` of `POST /api/history` (docs/protocol.md).
pub const HISTORY_LIMIT_DEFAULT: usize = 100;
/// Largest `limit` of `POST /api/history`; a larger one is capped (a client pages on
/// with `since`).
pub const HISTORY_LIMIT_MAX: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryRequest {
    topic: String,
    #[serde(default)]
    since: Option<HistorySince>,
    #[serde(default)]
    limit: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistorySince {
    seq: u64,
    epoch: String,
}

/// `POST /api/history` with `{"topic":…}`, optionally `since` and `limit`: a stream's
/// newest publications, or those after a position (docs/protocol.md, "Streams").
pub async fn history(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Body> {
    let body = match api_body(&gw, req).await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let request: HistoryRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "expected {{\"topic\": string, \"since\"?: {{\"seq\": integer >= 0, \"epoch\": string}}, \"limit\"?: integer >= 0}}: {e}"
                ),
            )
        }
    };
    let limit = request
        .limit
        .map_or(HISTORY_LIMIT_DEFAULT, |l| {
            usize::try_from(l).unwrap_or(usize::MAX)
        })
        .min(HISTORY_LIMIT_MAX);
    let query = match &request.since {
        None => HistoryQuery::Latest(limit),
        Some(s) => HistoryQuery::After { seq: s.seq, limit },
    };
    let read = match gw.node.history(&request.topic, query).await {
        Ok(h) => h,
        Err(HistoryError::InvalidTopic(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_topic",
                &format!("invalid topic: {e}"),
            )
        }
        Err(e @ HistoryError::NotAStream(_)) => {
            return error(StatusCode::BAD_REQUEST, "not_a_stream", &e.to_string())
        }
        Err(HistoryError::Broker(e)) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            )
        }
    };
    let recovered = request.since.as_ref().map(|s| read.covers(s.seq, &s.epoch));
    let mut out = String::with_capacity(
        96 + read
            .entries
            .iter()
            .map(|e| e.data.len() + 24)
            .sum::<usize>(),
    );
    let _ = write!(
        out,
        r#"{{"topic":{},"epoch":{},"seq":{}"#,
        json_string(&request.topic),
        json_string(&read.position.epoch),
        read.position.seq
    );
    if let Some(r) = recovered {
        let _ = write!(out, r#","recovered":{r}"#);
    }
    out.push_str(r#","messages":["#);
    if recovered != Some(false) {
        for (i, e) in read.entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, r#"{{"seq":{},"data":"#, e.seq);
            // Kept as valid JSON: spliced, not re-serialized.
            out.push_str(&String::from_utf8_lossy(&e.data));
            out.push('}');
        }
    }
    out.push_str("]}");
    json(StatusCode::OK, out)
}
