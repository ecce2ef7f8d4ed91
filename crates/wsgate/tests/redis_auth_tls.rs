//! Redis with a password, an ACL user and TLS, seen from real `wsgate` nodes: the relay
//! works with the right settings; with wrong ones a node still starts and serves local
//! traffic, `/readyz` says not ready, publishes are `unavailable`, and the log explains
//! why without ever showing the password.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::tls::Pki;
use wsgate_testkit::ws::Client;
use wsgate_testkit::{free_port, wait_until};

const WAIT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "s3cret-Pa55";
const ALICE_PASSWORD: &str = "alice-Pa55";

fn node(url: &str, extra: &[&str]) -> Node {
    let mut args = vec!["--rate-limit", "1000000", "--rate-burst", "1000000"];
    args.extend_from_slice(extra);
    Node::start_logged(Some(url), &args)
}

/// A message published on `from` reaches a subscriber on `to` (and the other way round).
async fn relays(a: &Node, b: &Node, topic: &str) {
    let mut sub_a = Client::connect(a.addr).await;
    sub_a.subscribe(&[topic]).await;
    let mut sub_b = Client::connect(b.addr).await;
    sub_b.subscribe(&[topic]).await;
    let mut pub_a = Client::connect(a.addr).await;
    let r = pub_a
        .call(json!({"op":"publish","topic":topic,"data":"a->b"}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    assert_eq!(
        sub_b.next_message(WAIT).await.expect("a->b")["data"],
        "a->b"
    );
    let (status, body) = b.http_publish(topic, json!("b->a"));
    assert_eq!(status, 200, "{body}");
    // sub_a first sees its own node's publication, then b's.
    assert_eq!(sub_a.next_message(WAIT).await.expect("own")["data"], "a->b");
    assert_eq!(
        sub_a.next_message(WAIT).await.expect("b->a")["data"],
        "b->a"
    );
}

/// A node whose Redis settings are wrong: up, serving, not ready, refusing publishes.
async fn degraded(n: &Node) {
    assert_eq!(n.get("/healthz").0, 200);
    // Give it time for several connection attempts: it must never become ready.
    std::thread::sleep(Duration::from_secs(2));
    let (status, body) = n.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""broker_ready":false"#), "{body}");
    let mut c = Client::connect(n.addr).await;
    assert!(c.alive().await, "local traffic is served");
    let r = c.call(json!({"op":"publish","topic":"t","data":1})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let r = c.call(json!({"op":"subscribe","topics":["t"]})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    assert_eq!(n.http_publish("t", json!(1)).0, 503);
}

fn password_redis() -> Redis {
    let user = format!(">{ALICE_PASSWORD}");
    Redis::start_with(&[
        "--requirepass",
        PASSWORD,
        "--user",
        "alice",
        "on",
        &user,
        "~*",
        "&*",
        "+@all",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_and_acl_user_relay_between_nodes() {
    let redis = password_redis();
    let port = redis.port;
    // The default user's password in the URL; an ACL user; the password as its own flag.
    let a = node(&format!("redis://:{PASSWORD}@127.0.0.1:{port}/"), &[]);
    let b = node(
        &format!("redis://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/"),
        &[],
    );
    let c = node(
        &format!("redis://127.0.0.1:{port}/"),
        &["--redis-password", PASSWORD],
    );
    // The user in the URL, the password apart (what the Helm chart does).
    let d = node(
        &format!("redis://alice@127.0.0.1:{port}/"),
        &["--redis-password", ALICE_PASSWORD],
    );
    assert!(
        wait_until(WAIT, || a.is_ready()
            && b.is_ready()
            && c.is_ready()
            && d.is_ready()),
        "{}{}{}{}",
        a.logs(),
        b.logs(),
        c.logs(),
        d.logs()
    );
    relays(&a, &b, "auth.ab").await;
    relays(&b, &c, "auth.bc").await;
    relays(&c, &d, "auth.cd").await;
    // Redis sees b's connections as alice.
    let admin = redis::Client::open(format!("redis://:{PASSWORD}@127.0.0.1:{port}/"))
        .unwrap()
        .get_connection()
        .unwrap();
    let mut admin = admin;
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    assert!(list.contains("user=alice"), "{list}");
    for n in [&a, &b, &c, &d] {
        assert!(
            !n.logs().contains(PASSWORD) && !n.logs().contains(ALICE_PASSWORD),
            "{}",
            n.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_starts_serves_locally_and_explains() {
    let redis = password_redis();
    let port = redis.port;
    let wrong = "wrong-Pa55word";
    let cases = [
        node(&format!("redis://:{wrong}@127.0.0.1:{port}/"), &[]),
        node(&format!("redis://alice:{wrong}@127.0.0.1:{port}/"), &[]),
        node(
            &format!("redis://127.0.0.1:{port}/"),
            &["--redis-password", wrong],
        ),
        // No password at all against a server that wants one.
        node(&format!("redis://127.0.0.1:{port}/"), &[]),
    ];
    for (i, n) in cases.iter().enumerate() {
        println!("case {i}");
        degraded(n).await;
        let logs = n.logs();
        assert!(
            logs.contains("Redis refused the credentials"),
            "a clear error: {logs}"
        );
        assert!(!logs.contains(wrong) && !logs.contains(PASSWORD), "{logs}");
    }
}

// ---- TLS ----

/// A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
/// unrelated CA (`other-ca.pem`).
fn pki() -> Pki {
    let pki = Pki::new("wsgate test CA");
    pki.leaf("server", &["127.0.0.1", "localhost"]);
    pki.leaf("client", &["wsgate-node"]);
    pki
}

/// redis-server on a TLS port only, requiring client certificates signed by the CA.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    fn start(pki: &Pki) -> TlsRedis {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .args(["--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &pki.arg("server.pem")])
            .args(["--tls-key-file", &pki.arg("server.key")])
            .args(["--tls-ca-cert-file", &pki.arg("ca.pem")])
            .args(["--tls-auth-clients", "yes"])
            .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        assert!(
            wait_until(Duration::from_secs(10), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "redis-server (TLS) did not start"
        );
        TlsRedis { port, child }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_ca_and_client_certificate_relays() {
    let pki = pki();
    let redis = TlsRedis::start(&pki);
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client.key"),
    );
    let mtls = [
        "--redis-ca-file",
        ca.as_str(),
        "--redis-client-cert",
        cert.as_str(),
        "--redis-client-key",
        key.as_str(),
    ];
    // By IP address and by name: both are in the server certificate.
    let a = node(&format!("rediss://127.0.0.1:{}/", redis.port), &mtls);
    let b = node(&format!("rediss://localhost:{}/", redis.port), &mtls);
    // `#insecure` skips verification but still presents the certificate. Tests only: it
    // is built in by the `insecure-tls` feature, which this crate's dev-dependency on
    // wsgate-redis turns on (a release build refuses the URL: deploy/tests).
    let c = node(
        &format!("rediss://127.0.0.1:{}/#insecure", redis.port),
        &mtls[2..],
    );
    assert!(
        wait_until(WAIT, || a.is_ready() && b.is_ready() && c.is_ready()),
        "{}{}{}",
        a.logs(),
        b.logs(),
        c.logs()
    );
    relays(&a, &b, "tls.ab").await;
    relays(&b, &c, "tls.bc").await;
    assert!(c.logs().contains("not verified"), "{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_wrong_ca_or_no_client_certificate_is_not_ready() {
    let pki = pki();
    let redis = TlsRedis::start(&pki);
    let url = format!("rediss://127.0.0.1:{}/", redis.port);
    let (cert, key) = (pki.arg("client.pem"), pki.arg("client.key"));
    let (other, ca) = (pki.arg("other-ca.pem"), pki.arg("ca.pem"));
    // A CA that did not sign the server certificate.
    let wrong_ca = node(
        &url,
        &[
            "--redis-ca-file",
            &other,
            "--redis-client-cert",
            &cert,
            "--redis-client-key",
            &key,
        ],
    );
    // The system roots do not know the test CA either.
    let no_ca = node(
        &url,
        &["--redis-client-cert", &cert, "--redis-client-key", &key],
    );
    // The server verifies, but the node shows no client certificate.
    let no_client_cert = node(&url, &["--redis-ca-file", &ca]);
    // Plain TCP against the TLS port.
    let plain = node(&format!("redis://127.0.0.1:{}/", redis.port), &[]);
    for n in [&wrong_ca, &no_ca] {
        degraded(n).await;
        let logs = n.logs();
        assert!(logs.contains("TLS failed"), "{logs}");
        assert!(logs.contains("UnknownIssuer"), "{logs}");
    }
    degraded(&no_client_cert).await;
    degraded(&plain).await;
    assert!(!plain.logs().is_empty());
}

#[test]
fn unreadable_or_inconsistent_tls_settings_exit_2() {
    let pki = pki();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("WSGATE_REDIS_URL")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let missing = pki.arg("missing.pem");
    let (code, err) = run(&[
        "--redis-url",
        "rediss://127.0.0.1:1/",
        "--redis-ca-file",
        &missing,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--redis-ca-file"), "{err}");
    let key = pki.arg("client.key");
    let (code, err) = run(&[
        "--redis-url",
        "rediss://127.0.0.1:1/",
        "--redis-ca-file",
        &key,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no PEM certificate"), "{err}");
    let ca = pki.arg("ca.pem");
    let (code, err) = run(&[
        "--redis-url",
        "redis://127.0.0.1:1/",
        "--redis-ca-file",
        &ca,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("rediss://"), "{err}");
}
