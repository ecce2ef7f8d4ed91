//! A running gateway exports real spans over OTLP/HTTP (protobuf) to a receiver in
//! this test when `OTEL_EXPORTER_OTLP_ENDPOINT` is set — and exports nothing, with no
//! exporter at all, when it is not.

#[path = "obs_common/mod.rs"]
mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// One received span: its name, attributes, and its resource's attributes.
#[derive(Debug)]
struct Span {
    name: String,
    attrs: Vec<(String, String)>,
    resource: Vec<(String, String)>,
}

fn flat(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

/// A minimal OTLP/HTTP receiver: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (String, mpsc::UnboundedReceiver<(String, Span)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).expect("protobuf");
                        for rs in export.resource_spans {
                            let resource =
                                flat(&rs.resource.map(|r| r.attributes).unwrap_or_default());
                            for ss in rs.scope_spans {
                                for s in ss.spans {
                                    let span = Span {
                                        name: s.name,
                                        attrs: flat(&s.attributes),
                                        resource: resource.clone(),
                                    };
                                    let _ = tx.send((path.clone(), span));
                                }
                            }
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, rx)
}

fn attr<'a>(kvs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver() {
    let (url, mut spans) = receiver().await;
    let gw = start(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ],
    );
    let mut ws = connect(&gw).await;
    subscribe(&mut ws, "news").await;
    publish_http(&gw, "news", "1").await;
    assert_eq!(recv_json(&mut ws).await["op"], "message");
    ws.close(None).await.unwrap();
    let (status, _) = http(gw.admin, "GET", "/readyz", "").await;
    assert_eq!(status, 200);

    let (mut session, mut publish) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while session.is_none() || publish.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (path, span) = tokio::time::timeout(left, spans.recv())
            .await
            .expect("the gateway's spans within 20 s")
            .expect("receiver running");
        assert_eq!(path, "/v1/traces");
        match span.name.as_str() {
            "session" => session = Some(span),
            "POST /api/publish" => publish = Some(span),
            _ => {}
        }
    }
    let session = session.unwrap();
    assert_eq!(
        attr(&session.attrs, "disconnect.reason"),
        Some("client_close")
    );
    assert_eq!(attr(&session.attrs, "close.code"), Some("1000"));
    assert_eq!(attr(&session.resource, "service.name"), Some("wsgate"));
    assert_eq!(
        attr(&session.resource, "service.instance.id"),
        Some("test-node")
    );
    assert_eq!(
        attr(&session.resource, "deployment.environment"),
        Some("test")
    );
    let publish = publish.unwrap();
    assert_eq!(attr(&publish.attrs, "http.route"), Some("/api/publish"));
    assert_eq!(
        attr(&publish.attrs, "http.response.status_code"),
        Some("200")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoint_means_no_export() {
    let gw = start(&[], &[]);
    let mut ws = connect(&gw).await;
    subscribe(&mut ws, "news").await;
    drop(ws);
    let (status, _) = http(gw.admin, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let logs: Vec<String> = gw.logs.try_iter().collect();
    assert!(
        !logs.iter().any(|l| l.contains("OTLP")),
        "no exporter expected: {logs:?}"
    );
}

#[test]
fn a_grpc_protocol_is_refused_clearly() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("http/protobuf"), "{err}");
}
