//! A running gateway exports real spans over OTLP/HTTP (protobuf) to a receiver in
//! this test when `OTEL_EXPORTER_OTLP_ENDPOINT` is set — over `http://`, and over
//! `https://` to a receiver whose certificate a CA made here signs — and exports
//! nothing, with no exporter at all, when it is not.

use std::convert::Infallible;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
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
use tokio_rustls::TlsAcceptor;
use wsgate_testkit::http::*;
use wsgate_testkit::process::*;
use wsgate_testkit::tls::Ca;
use wsgate_testkit::wait_until;

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
    let (url, spans, _) = receiver_on(None).await;
    (url, spans)
}

/// The receiver, over TLS when given an acceptor (`https://` URL). The third channel
/// gets every failed TLS handshake's error.
async fn receiver_on(
    tls: Option<TlsAcceptor>,
) -> (
    String,
    mpsc::UnboundedReceiver<(String, Span)>,
    mpsc::UnboundedReceiver<String>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    let (failed_tx, failed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let tx = tx.clone();
            let tls = tls.clone();
            let failed = failed_tx.clone();
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
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), service).await;
                    }
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Err(e) => {
                            let _ = failed.send(e.to_string());
                        }
                    },
                }
            });
        }
    });
    (url, rx, failed)
}

/// A CA (its PEM written to `dir/ca.pem`) and a TLS acceptor with a certificate it
/// signed for 127.0.0.1.
fn tls_receiver_pki(dir: &Path) -> TlsAcceptor {
    let ca = Ca::new("wsgate test collector CA");
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    ca.leaf(&["127.0.0.1"]).acceptor()
}

/// Some traffic on `gw`, so it has a `session` span to export.
async fn one_session(gw: &Node) {
    let mut ws = gw.connect().await;
    ws.subscribe_with_id(1, &["news"]).await;
    ws.close(None).await.unwrap();
}

fn attr<'a>(kvs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kvs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver() {
    let (url, mut spans) = receiver().await;
    let gw = Node::start_json(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ],
    );
    let mut ws = gw.connect().await;
    ws.subscribe_with_id(1, &["news"]).await;
    gw.publish("news", "1").await;
    assert_eq!(ws.recv().await["op"], "message");
    ws.close(None).await.unwrap();
    let (status, _) = http_json(gw.admin, "GET", "/readyz", "").await;
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
    let gw = Node::start_json(&[], &[]);
    let mut ws = gw.connect().await;
    ws.subscribe_with_id(1, &["news"]).await;
    drop(ws);
    let (status, _) = http_json(gw.admin, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    let logs = gw.log_lines();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_receiver_signed_by_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut spans, mut failed) = receiver_on(Some(tls_receiver_pki(dir.path()))).await;
    assert!(url.starts_with("https://"), "{url}");
    let ca = dir.path().join("ca.pem");
    let ca = ca.to_str().unwrap();
    // The CA by the flag, and by the standard OpenTelemetry variable.
    let by_flag = Node::start_json(
        &["--otlp-ca-file", ca],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=flag"),
        ],
    );
    let by_env = Node::start_json(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=env"),
        ],
    );
    one_session(&by_flag).await;
    one_session(&by_env).await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(seen.contains(&"flag".to_string()) && seen.contains(&"env".to_string())) {
        let left = deadline.saturating_duration_since(Instant::now());
        let (path, span) = tokio::time::timeout(left, spans.recv())
            .await
            .unwrap_or_else(|_| panic!("session spans over https within 20 s, got {seen:?}"))
            .expect("receiver running");
        assert_eq!(path, "/v1/traces");
        if span.name == "session" {
            assert_eq!(attr(&span.resource, "service.name"), Some("wsgate"));
            seen.extend(attr(&span.resource, "deployment.environment").map(str::to_owned));
        }
    }
    assert!(failed.try_recv().is_err(), "no failed handshake expected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_receiver_outside_the_trusted_roots_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (url, mut spans, mut failed) = receiver_on(Some(tls_receiver_pki(dir.path()))).await;
    // No CA given: the system roots do not know the test CA, so the exporter must
    // refuse the receiver's certificate.
    let gw = Node::start_json(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", url.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    one_session(&gw).await;
    let e = tokio::time::timeout(Duration::from_secs(20), failed.recv())
        .await
        .expect("an export attempt within 20 s")
        .expect("receiver running");
    assert!(e.to_ascii_lowercase().contains("alert"), "{e}");
    assert!(
        spans.try_recv().is_err(),
        "no span may pass an unverified TLS"
    );
    // And the node's log says why.
    assert!(
        wait_until(Duration::from_secs(10), || gw.logged("UnknownIssuer")),
        "no certificate error in the log: {:?}",
        gw.log_lines()
    );
}

#[test]
fn an_unusable_otlp_ca_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    for (args, env, expect) in [
        (
            vec!["--otlp-ca-file", missing.to_str().unwrap()],
            None,
            "--otlp-ca-file",
        ),
        (
            vec!["--otlp-ca-file", not_pem.to_str().unwrap()],
            None,
            "no PEM certificate",
        ),
        (
            vec![],
            Some(missing.to_str().unwrap()),
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(&args)
            .env_remove("WSGATE_OTLP_CA_FILE")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:1");
        match env {
            Some(p) => cmd.env("OTEL_EXPORTER_OTLP_CERTIFICATE", p),
            None => cmd.env_remove("OTEL_EXPORTER_OTLP_CERTIFICATE"),
        };
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}
