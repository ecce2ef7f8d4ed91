//! The binary: bad key files and an unreachable JWKS URL exit 2 with a clear message,
//! an open gateway warns loudly, SIGHUP reloads the TLS certificate without a restart,
//! and a failing JWKS refresh is logged while the node carries on.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

use wsgate_testkit::free_port;
use wsgate_testkit::process::Process;
use wsgate_testkit::tls::Ca;

fn write_server_cert(ca: &Ca, dir: &Path) {
    let leaf = ca.leaf(&["localhost"]);
    // Write then rename, as a rotation tool would: no half-written file is seen.
    leaf.write(&dir.join("cert.tmp"), &dir.join("key.tmp"));
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
}

async fn handshake(ca: &Ca, addr: SocketAddr) -> bool {
    ca.connect(addr, "localhost").await.is_ok()
}

async fn until(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[test]
fn unusable_key_files_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a key").unwrap();
    let junk = junk.to_str().unwrap();
    for args in [
        vec!["--tls-cert", junk, "--tls-key", junk],
        vec!["--jwt-public-key", junk],
        vec!["--tls-cert", "/nonexistent/cert.pem", "--tls-key", junk],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid configuration"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warns_when_open_and_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let old = Ca::new("old CA");
    write_server_cert(&old, dir.path());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{}", free_port());
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let running = Process::spawn(
        &[
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &[],
    );
    let addr: SocketAddr = listen.parse().unwrap();
    assert!(
        until(Duration::from_secs(10), async || handshake(&old, addr)
            .await)
        .await
    );
    assert!(running.logged("AUTH IS OFF"), "{:?}", running.log_lines());

    let new = Ca::new("new CA");
    write_server_cert(&new, dir.path());
    running.signal("HUP");
    assert!(until(Duration::from_secs(3), async || handshake(&new, addr).await).await);
    assert!(!handshake(&old, addr).await);
    assert!(
        until(Duration::from_secs(3), async || running
            .logged("certificate reloaded"))
        .await
    );
}

/// A tiny HTTP server on 127.0.0.1 answering every request with the current
/// (status, body), each on a connection of its own.
fn jwks_server(reply: Arc<Mutex<(u16, String)>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let (status, body) = reply.lock().unwrap().clone();
            let response = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut stream, response.as_bytes());
        }
    });
    url
}

#[test]
fn an_unreachable_jwks_url_exits_2_naming_the_setting() {
    let url = format!("http://127.0.0.1:{}/jwks.json", free_port());
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--jwt-jwks-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid configuration")
            && err.contains("--jwt-jwks-url")
            && err.contains("Connection refused"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_jwks_refresh_is_logged_and_the_node_keeps_serving() {
    // An HS256 key ("k" is base64url of the secret).
    let jwks = r#"{"keys":[{"kty":"oct","alg":"HS256","kid":"h1","k":"dGVzdC1zZWNyZXQtMDEyMzQ1Njc4OWFiY2RlZg"}]}"#;
    let reply = Arc::new(Mutex::new((200, jwks.to_string())));
    let url = jwks_server(reply.clone());
    let admin = format!("127.0.0.1:{}", free_port());
    let running = Process::spawn(
        &[
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--admin-listen",
            &admin,
            "--jwt-jwks-url",
            &url,
            "--jwt-jwks-refresh",
            "1s",
        ],
        &[],
    );
    let log = || running.logs();
    assert!(
        until(Duration::from_secs(10), async || running
            .logged("JWKS loaded"))
        .await,
        "{}",
        log()
    );
    assert!(!running.logged("AUTH IS OFF"), "{}", log());
    *reply.lock().unwrap() = (503, String::new());
    assert!(
        until(Duration::from_secs(10), async || running
            .logged("JWKS refresh failed: keeping the last good key set"))
        .await,
        "{}",
        log()
    );
    assert!(running.logged("HTTP 503"), "{}", log());
    assert!(
        until(Duration::from_secs(10), async || running
            .logged("admin endpoints serving"))
        .await,
        "{}",
        log()
    );
    let admin: SocketAddr = admin.parse().unwrap();
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut head = String::new();
    BufReader::new(s).read_line(&mut head).unwrap();
    assert!(head.contains("200"), "{head}");
}
