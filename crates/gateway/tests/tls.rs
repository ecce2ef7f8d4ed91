//! Native TLS: a real TLS client (Python `websockets`) and a rustls client against a
//! test CA made here; certificate reload without restart.

use std::path::Path;
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;
use wsgate_testkit::tls::Ca;
use wsgate_testkit::ws::*;

/// Writes a server certificate for localhost/127.0.0.1 signed by `ca`.
fn server_cert(ca: &Ca, dir: &Path) {
    ca.leaf(&["localhost", "127.0.0.1"])
        .write(&dir.join("cert.pem"), &dir.join("key.pem"));
}

fn tls_args(dir: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        dir.join("cert.pem").to_str().unwrap().into(),
        "--tls-key".into(),
        dir.join("key.pem").to_str().unwrap().into(),
    ]
}

async fn tls_connect(
    ca: &Ca,
    addr: std::net::SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    ca.connect(addr, "localhost").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("wsgate test CA");
    server_cert(&ca, dir.path());
    std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
    let args = tls_args(dir.path());
    let node = start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let script = r#"
import json, ssl, sys
from websockets.sync.client import connect
ctx = ssl.create_default_context(cafile=sys.argv[1])
with connect(sys.argv[2], ssl=ctx) as ws:
    welcome = json.loads(ws.recv(timeout=5))
    assert welcome["op"] == "welcome", welcome
    ws.send(json.dumps({"op": "subscribe", "id": 1, "topics": ["tls.test"]}))
    assert json.loads(ws.recv(timeout=5))["op"] == "subscribed"
    ws.send(json.dumps({"op": "publish", "id": 2, "topic": "tls.test", "data": {"x": 1}}))
    got = sorted(json.loads(ws.recv(timeout=5))["op"] for _ in range(2))
    assert got == ["message", "published"], got
print("ok")
"#;
    let url = format!("wss://localhost:{}/ws", node.addr.port());
    let ca_path = dir.path().join("ca.pem");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", script, ca_path.to_str().unwrap(), &url])
            .output()
            .expect("python3 runs (the test needs Python with the `websockets` package)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "python client failed (is `websockets` installed?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The HTTP publish API is served over the same TLS listener.
    let mut s = tls_connect(&ca, node.addr).await.unwrap();
    let body = r#"{"topic":"tls.test","data":1}"#;
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Plain HTTP on the TLS port gets nowhere.
    let r = raw(node.addr, &upgrade_request("/ws", "")).await;
    assert!(!r.starts_with("HTTP/1.1 101"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rustls_client_and_reload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    server_cert(&old_ca, dir.path());
    let args = tls_args(dir.path());
    let node = start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;

    let tls = tls_connect(&old_ca, node.addr).await.unwrap();
    let mut ws = Client::open_over(tls, node.addr, "/ws", &[]).await.unwrap();
    assert_eq!(ws.recv().await["op"], "welcome");

    // Rotation: a new key and certificate from another CA.
    let new_ca = Ca::new("new CA");
    server_cert(&new_ca, dir.path());
    node.gw.security.tls.as_ref().unwrap().reload().unwrap();
    assert!(
        tls_connect(&old_ca, node.addr).await.is_err(),
        "old chain still served"
    );
    let tls = tls_connect(&new_ca, node.addr).await.unwrap();
    let mut ws2 = Client::open_over(tls, node.addr, "/ws", &[]).await.unwrap();
    assert_eq!(ws2.recv().await["op"], "welcome");
    // The connection made before the reload is unaffected.
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");

    // A broken file is refused and the current certificate stays.
    std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
    assert!(node.gw.security.tls.as_ref().unwrap().reload().is_err());
    node.gw.security.tls.as_ref().unwrap().reload_if_changed();
    assert!(tls_connect(&new_ca, node.addr).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_change_is_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    server_cert(&old_ca, dir.path());
    let args = tls_args(dir.path());
    let node = start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let tls = node.gw.security.tls.clone().unwrap();
    // Make sure the modification time moves even on coarse-grained file systems.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let new_ca = Ca::new("new CA");
    server_cert(&new_ca, dir.path());
    tls.reload_if_changed();
    assert!(tls_connect(&new_ca, node.addr).await.is_ok());
    assert!(tls_connect(&old_ca, node.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_client_is_cut_at_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    server_cert(&Ca::new("CA"), dir.path());
    let mut args = tls_args(dir.path());
    args.extend(["--handshake-timeout".into(), "1s".into()]);
    let node = start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let mut buf = [0u8; 64];
    // Never send a ClientHello: the server must hang up on its own.
    let r = tokio::time::timeout(std::time::Duration::from_secs(4), s.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "still open: {r:?}");
}
