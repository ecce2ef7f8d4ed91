//! JWT on connect, topic permissions, refresh and expiry, against a real gateway.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::json;
use wsgate_testkit::gateway::jwt::*;
use wsgate_testkit::gateway::*;
use wsgate_testkit::http::*;
use wsgate_testkit::ws::*;

fn auth_args() -> Vec<&'static str> {
    vec!["--jwt-secret", SECRET, "--jwt-leeway", "0s"]
}

fn good_claims() -> serde_json::Value {
    json!({"sub":"alice","exp":now() + 600,"subscribe":["chat.*","user.{sub}.*"],"publish":["chat.*"]})
}

async fn refused_with(node: &TestServer, token: Option<&str>) -> String {
    let path = match token {
        Some(t) => format!("/ws?token={t}"),
        None => "/ws".to_string(),
    };
    raw(node.addr, &upgrade_request(&path, "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_401_before_upgrade() {
    let node = start(&auth_args()).await;
    let r = refused_with(&node, None).await;
    assert_eq!(status(&r), 401, "{r}");
    assert!(
        r.to_ascii_lowercase().contains("www-authenticate: bearer"),
        "{r}"
    );
    assert_eq!(node.refused("auth_missing").await, 1);
    // An empty bearer header is as good as none.
    let r = raw(
        node.addr,
        &upgrade_request("/ws", "Authorization: Bearer \r\n"),
    )
    .await;
    assert_eq!(status(&r), 401, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_by_query_or_header() {
    let node = start(&auth_args()).await;
    let token = hs256(&good_claims());
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");
    let bearer = format!("Bearer {token}");
    let mut ws = Client::session(node.addr, "/ws", &[("Authorization", &bearer)]).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_401() {
    let node = start(&[
        "--jwt-secret",
        SECRET,
        "--jwt-leeway",
        "0s",
        "--jwt-audience",
        "wsgate",
        "--jwt-issuer",
        "https://issuer.test",
    ])
    .await;
    let base = json!({"sub":"a","exp":now() + 600,"aud":"wsgate","iss":"https://issuer.test"});
    let with = |k: &str, v: serde_json::Value| {
        let mut c = base.clone();
        c[k] = v;
        c
    };
    // The control: the base token is accepted.
    let ok = hs256(&base);
    assert_eq!(status(&refused_with(&node, Some(&ok)).await), 101);

    let expired = hs256(&with("exp", json!(now() - 60)));
    let not_yet = hs256(&with("nbf", json!(now() + 600)));
    let wrong_sig = sign(Algorithm::HS256, b"another-secret", &base);
    let wrong_aud = hs256(&with("aud", json!("someone-else")));
    let wrong_iss = hs256(&with("iss", json!("https://evil.test")));
    let no_exp = {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove("exp");
        hs256(&c)
    };
    // `alg: none`: a header and claims with an empty signature.
    let b64 = |v: &serde_json::Value| {
        use base64_url::encode;
        encode(&serde_json::to_vec(v).unwrap())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&base)
    );
    // HS384 is not configured even with the right secret.
    let other_alg = sign(Algorithm::HS384, SECRET.as_bytes(), &base);
    let garbage = "not-a-jwt".to_string();
    for (name, token, reason) in [
        ("expired", expired, "auth_expired"),
        ("nbf in the future", not_yet, "auth_invalid"),
        ("wrong signature", wrong_sig, "auth_invalid"),
        ("wrong audience", wrong_aud, "auth_invalid"),
        ("wrong issuer", wrong_iss, "auth_invalid"),
        ("no exp", no_exp, "auth_invalid"),
        ("alg none", alg_none, "auth_invalid"),
        ("unconfigured alg", other_alg, "auth_invalid"),
        ("garbage", garbage, "auth_invalid"),
    ] {
        let before = node.refused(reason).await;
        let r = refused_with(&node, Some(&token)).await;
        assert_eq!(status(&r), 401, "{name}: {r}");
        assert_eq!(node.refused(reason).await, before + 1, "{name}");
    }
}

/// base64url without padding, as JWTs use.
mod base64_url {
    pub fn encode(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_public_key_and_algorithm_confusion() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("jwt.pub.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let node = start(&["--jwt-public-key", public.to_str().unwrap()]).await;
    let claims = good_claims();
    let token = sign(Algorithm::ES256, key.serialize_pem().as_bytes(), &claims);
    Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    // An HS256 token whose "secret" is the public key must not pass.
    let confused = sign(Algorithm::HS256, key.public_key_pem().as_bytes(), &claims);
    assert_eq!(status(&refused_with(&node, Some(&confused)).await), 401);
    // Another key pair's signature.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = sign(Algorithm::ES256, other.serialize_pem().as_bytes(), &claims);
    assert_eq!(status(&refused_with(&node, Some(&forged)).await), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_subscribe_and_publish_keep_the_connection() {
    let node = start(&auth_args()).await;
    let token = hs256(&good_claims());
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    let r = ws
        .call_text(r#"{"op":"subscribe","id":1,"topics":["chat.1","admin.x"]}"#)
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str(), r["id"].as_i64()),
        (Some("error"), Some("forbidden"), Some(1)),
        "{r}"
    );
    let r = ws
        .call_text(r#"{"op":"subscribe","id":2,"topics":["user.bob.inbox"]}"#)
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = ws
        .call_text(r#"{"op":"subscribe","id":3,"topics":["chat.1","user.alice.inbox"]}"#)
        .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let r = ws
        .call_text(r#"{"op":"publish","id":4,"topic":"user.alice.inbox","data":1}"#)
        .await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_i64()),
        (Some("forbidden"), Some(4)),
        "{r}"
    );
    let r = ws
        .call_text(r#"{"op":"publish","id":5,"topic":"chat.1","data":{"m":"hi"}}"#)
        .await;
    // Our own message and the reply, in either order.
    let r2 = ws.recv().await;
    let ops = [r["op"].as_str().unwrap(), r2["op"].as_str().unwrap()];
    assert!(
        ops.contains(&"published") && ops.contains(&"message"),
        "{r} {r2}"
    );
    assert_eq!(ws.call_text(r#"{"op":"ping","id":6}"#).await["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_permissions_may_do_nothing() {
    let node = start(&auth_args()).await;
    let token = hs256(&json!({"sub":"x","exp":now() + 600}));
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    let r = ws
        .call_text(r#"{"op":"subscribe","id":1,"topics":["news"]}"#)
        .await;
    assert_eq!(r["code"], "forbidden");
    let r = ws
        .call_text(r#"{"op":"publish","id":2,"topic":"news","data":1}"#)
        .await;
    assert_eq!(r["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_closes_with_1008() {
    let node = start(&auth_args()).await;
    let mut c = good_claims();
    c["exp"] = json!(now() + 2);
    let token = hs256(&c);
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");
    match ws.frame(Duration::from_secs(6)).await {
        Received::Close(code) => assert_eq!(code, 1008),
        _ => panic!("expected a close"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_extends_the_session() {
    let node = start(&auth_args()).await;
    let mut c = good_claims();
    c["exp"] = json!(now() + 2);
    let token = hs256(&c);
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    // Refused refreshes: bad signature, another subject, no token.
    let bad = sign(Algorithm::HS256, b"nope", &good_claims());
    let r = ws
        .call_text(&format!(r#"{{"op":"refresh","id":1,"token":"{bad}"}}"#))
        .await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_i64()),
        (Some("forbidden"), Some(1)),
        "{r}"
    );
    let mut bob = good_claims();
    bob["sub"] = json!("bob");
    let r = ws
        .call_text(&format!(
            r#"{{"op":"refresh","id":2,"token":"{}"}}"#,
            hs256(&bob)
        ))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = ws.call_text(r#"{"op":"refresh","id":3}"#).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    // A good one, whose exp is later.
    let fresh = hs256(&good_claims());
    let r = ws
        .call_text(&format!(r#"{{"op":"refresh","id":4,"token":"{fresh}"}}"#))
        .await;
    assert_eq!(r, json!({"op":"refreshed","id":4}));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":5}"#).await["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_narrower_token_leaves_revoked_topics() {
    let node = start(&auth_args()).await;
    let token = hs256(&good_claims());
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    let r = ws
        .call_text(r#"{"op":"subscribe","id":1,"topics":["chat.1"]}"#)
        .await;
    assert_eq!(r["op"], "subscribed");
    let narrow = hs256(&json!({"sub":"alice","exp":now() + 600,"subscribe":["user.{sub}.*"]}));
    let r = ws
        .call_text(&format!(r#"{{"op":"refresh","id":2,"token":"{narrow}"}}"#))
        .await;
    assert_eq!(r["op"], "refreshed");
    assert_eq!(node.gw.node.hub().subscription_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_without_auth_and_client_publish_off() {
    let node = start(&["--client-publish=false"]).await;
    let mut ws = Client::session(node.addr, "/ws", &[]).await;
    let r = ws
        .call_text(r#"{"op":"subscribe","id":1,"topics":["anything.at.all"]}"#)
        .await;
    assert_eq!(r["op"], "subscribed");
    let r = ws
        .call_text(r#"{"op":"publish","id":2,"topic":"anything.at.all","data":1}"#)
        .await;
    assert_eq!(
        (r["code"].as_str(), r["id"].as_i64()),
        (Some("forbidden"), Some(2)),
        "{r}"
    );
    let r = ws.call_text(r#"{"op":"refresh","id":3,"token":"x"}"#).await;
    assert_eq!(r["op"], "refreshed");
    let node = start(&[]).await;
    let mut ws = Client::session(node.addr, "/ws", &[]).await;
    ws.call_text(r#"{"op":"subscribe","id":1,"topics":["t"]}"#)
        .await;
    let r = ws
        .call_text(r#"{"op":"publish","id":2,"topic":"t","data":1}"#)
        .await;
    assert!(r["op"] == "published" || r["op"] == "message", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_public_key() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let public = format!("{dir}/tests/fixtures/rsa-test.pub.pem");
    let private = std::fs::read(format!("{dir}/tests/fixtures/rsa-test.key.pem")).unwrap();
    let node = start(&["--jwt-public-key", &public]).await;
    let token = sign(Algorithm::RS256, &private, &good_claims());
    Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    // The RSA public key used as an HMAC secret: algorithm confusion.
    let pem = std::fs::read(&public).unwrap();
    let confused = sign(Algorithm::HS256, &pem, &good_claims());
    assert_eq!(status(&refused_with(&node, Some(&confused)).await), 401);
    // RS384 with the right key is not configured.
    let rs384 = sign(Algorithm::RS384, &private, &good_claims());
    assert_eq!(status(&refused_with(&node, Some(&rs384)).await), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_file_selects_by_kid() {
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{encode, EncodingKey, Header};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&JwkSet { keys: vec![jwk] }).unwrap(),
    )
    .unwrap();
    let node = start(&["--jwt-public-key", path.to_str().unwrap()]).await;
    let token_with = |kid: &str| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        encode(&h, &good_claims(), &enc).unwrap()
    };
    Client::session(node.addr, &format!("/ws?token={}", token_with("k1")), &[]).await;
    assert_eq!(
        status(&refused_with(&node, Some(&token_with("k2"))).await),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_exp_does_not_crash() {
    let node = start(&auth_args()).await;
    let mut c = good_claims();
    c["exp"] = json!(u64::MAX);
    let token = hs256(&c);
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    assert_eq!(ws.call_text(r#"{"op":"ping","id":1}"#).await["op"], "pong");
    let r = ws
        .call_text(&format!(r#"{{"op":"refresh","id":2,"token":"{token}"}}"#))
        .await;
    assert_eq!(r["op"], "refreshed");
    assert_eq!(ws.call_text(r#"{"op":"ping","id":3}"#).await["op"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_to_a_shorter_token_moves_expiry_earlier() {
    let node = start(&auth_args()).await;
    let token = hs256(&good_claims());
    let mut ws = Client::session(node.addr, &format!("/ws?token={token}"), &[]).await;
    let mut short = good_claims();
    short["exp"] = json!(now() + 2);
    let r = ws
        .call_text(&format!(
            r#"{{"op":"refresh","id":1,"token":"{}"}}"#,
            hs256(&short)
        ))
        .await;
    assert_eq!(r["op"], "refreshed");
    match ws.frame(Duration::from_secs(6)).await {
        Received::Close(code) => assert_eq!(code, 1008),
        _ => panic!("expected a close"),
    }
}

// ---- JWKS from a URL (`--jwt-jwks-url`) ----

mod jwks_url {
    use std::convert::Infallible;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use clap::Parser;
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;
    use wsgate_gateway::security::Security;
    use wsgate_gateway::Config;
    use wsgate_testkit::tls::Ca;

    use super::{good_claims, refused_with, start, status, TestServer};

    /// An ES256 signing key and its public JWK under `kid`.
    struct SigningKey {
        enc: EncodingKey,
        jwk: Jwk,
    }

    impl SigningKey {
        fn new(kid: &str) -> Self {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
            let mut jwk = Jwk::from_encoding_key(&enc, Algorithm::ES256).unwrap();
            jwk.common.key_id = Some(kid.into());
            SigningKey { enc, jwk }
        }

        /// A valid token signed with this key, its header naming `kid` (or none).
        fn token(&self, kid: Option<&str>) -> String {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = kid.map(str::to_owned);
            encode(&h, &good_claims(), &self.enc).unwrap()
        }
    }

    fn jwks(keys: &[&SigningKey]) -> String {
        let set = JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        };
        serde_json::to_string(&set).unwrap()
    }

    /// What the JWKS server answers.
    #[derive(Clone)]
    enum Reply {
        Jwks(String),
        Status(u16),
        Garbage,
    }

    /// A real HTTP(S) server on 127.0.0.1 serving a JWKS at `/jwks.json`, switchable.
    struct JwksServer {
        url: String,
        reply: Arc<Mutex<Reply>>,
        requests: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(tls: Option<TlsAcceptor>, first: Reply) -> JwksServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let url = format!("{scheme}://{}/jwks.json", listener.local_addr().unwrap());
            let reply = Arc::new(Mutex::new(first));
            let requests = Arc::new(AtomicUsize::new(0));
            let (r, n) = (reply.clone(), requests.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (r, n, tls) = (r.clone(), n.clone(), tls.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let (r, n) = (r.clone(), n.clone());
                            async move {
                                n.fetch_add(1, Ordering::SeqCst);
                                let (code, body) =
                                    match (req.uri().path(), r.lock().unwrap().clone()) {
                                        ("/jwks.json", Reply::Jwks(body)) => (200, body),
                                        ("/jwks.json", Reply::Status(code)) => {
                                            (code, String::new())
                                        }
                                        ("/jwks.json", Reply::Garbage) => {
                                            (200, "<html>oops</html>".into())
                                        }
                                        _ => (404, String::new()),
                                    };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(code)
                                        .header("content-type", "application/json")
                                        // Each fetch on a new connection: a stopped
                                        // server is then really gone.
                                        .header("connection", "close")
                                        .body(Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                            }
                            Some(tls) => {
                                if let Ok(s) = tls.accept(tcp).await {
                                    let _ = http.serve_connection(TokioIo::new(s), service).await;
                                }
                            }
                        }
                    });
                }
            });
            JwksServer {
                url,
                reply,
                requests,
                task,
            }
        }

        fn serve(&self, reply: Reply) {
            *self.reply.lock().unwrap() = reply;
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        /// Closes the listening socket: fetches now fail to connect.
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    async fn accepted(node: &TestServer, token: &str) -> bool {
        status(&refused_with(node, Some(token)).await) == 101
    }

    /// Polls `f` every 50 ms until it holds, for at most `limit`.
    async fn within<F: Future<Output = bool>>(limit: Duration, mut f: impl FnMut() -> F) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if f().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A CA (PEM) and a TLS acceptor with a certificate it signed for 127.0.0.1.
    fn tls_pki() -> (String, TlsAcceptor) {
        let ca = Ca::new("wsgate test JWKS CA");
        let acceptor = ca.leaf(&["127.0.0.1"]).acceptor();
        (ca.cert_pem, acceptor)
    }

    /// The start-up error of a gateway with these flags (`None`: it would start).
    fn start_error(args: &[&str]) -> Option<String> {
        let mut argv = vec!["wsgate"];
        argv.extend_from_slice(args);
        Security::from_config(&Config::parse_from(argv))
            .err()
            .map(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn periodic_refresh_rotates_keys_and_keeps_them_through_failures() {
        let (a, b) = (SigningKey::new("a"), SigningKey::new("b"));
        let server = JwksServer::start(None, Reply::Jwks(jwks(&[&a]))).await;
        let node = start(&["--jwt-jwks-url", &server.url, "--jwt-jwks-refresh", "1s"]).await;
        assert_eq!(server.requests(), 1, "fetched once at start");
        assert!(accepted(&node, &a.token(Some("a"))).await);
        // Tokens without `kid` ask for no early fetch: only the periodic one can bring B.
        assert!(
            !accepted(&node, &b.token(None)).await,
            "B is not published yet"
        );

        server.serve(Reply::Jwks(jwks(&[&b])));
        let b_no_kid = b.token(None);
        assert!(
            within(Duration::from_secs(10), || accepted(&node, &b_no_kid)).await,
            "B accepted after a refresh"
        );
        assert!(accepted(&node, &b.token(Some("b"))).await);
        assert!(
            !accepted(&node, &a.token(Some("a"))).await,
            "A was withdrawn"
        );

        // Failed refreshes keep the last good set.
        for bad in [Reply::Status(500), Reply::Garbage] {
            server.serve(bad);
            let before = server.requests();
            assert!(
                within(Duration::from_secs(10), || async {
                    server.requests() >= before + 2
                })
                .await,
                "refreshes go on"
            );
            assert!(accepted(&node, &b.token(Some("b"))).await);
        }
        // The server goes away altogether.
        server.stop().await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(accepted(&node, &b.token(Some("b"))).await);
        assert!(accepted(&node, &b_no_kid).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_kid_fetches_early_at_most_once_per_window() {
        let (a, b) = (SigningKey::new("a"), SigningKey::new("b"));
        let server = JwksServer::start(None, Reply::Jwks(jwks(&[&a]))).await;
        // No periodic refresh within the test.
        let node = start(&["--jwt-jwks-url", &server.url, "--jwt-jwks-refresh", "1h"]).await;
        assert!(accepted(&node, &a.token(Some("a"))).await);
        assert_eq!(server.requests(), 1);

        // The provider publishes B and starts signing with it.
        server.serve(Reply::Jwks(jwks(&[&a, &b])));
        let token_b = b.token(Some("b"));
        assert!(
            !accepted(&node, &token_b).await,
            "the token that reveals the new kid is refused: the fetch is in the background"
        );
        assert!(
            within(Duration::from_secs(5), || accepted(&node, &token_b)).await,
            "B accepted after the early fetch"
        );
        assert_eq!(server.requests(), 2, "one early fetch");
        assert!(accepted(&node, &a.token(Some("a"))).await);

        // Unknown kids inside the window fetch nothing more.
        for i in 0..10 {
            let kid = format!("unknown-{i}");
            assert!(!accepted(&node, &b.token(Some(&kid))).await);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(server.requests(), 2, "rate limited");
        assert!(accepted(&node, &token_b).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn https_with_a_private_ca() {
        let a = SigningKey::new("a");
        let (ca_pem, acceptor) = tls_pki();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem).unwrap();
        let ca = ca.to_str().unwrap();
        let server = JwksServer::start(Some(acceptor), Reply::Jwks(jwks(&[&a]))).await;
        assert!(server.url.starts_with("https://127.0.0.1:"));
        let node = start(&["--jwt-jwks-url", &server.url, "--jwt-jwks-ca-file", ca]).await;
        assert!(accepted(&node, &a.token(Some("a"))).await);
        assert!(!accepted(&node, &SigningKey::new("a").token(Some("a"))).await);

        // The system roots do not know the test CA.
        let url = server.url.clone();
        let e = tokio::task::spawn_blocking(move || start_error(&["--jwt-jwks-url", &url]))
            .await
            .unwrap()
            .expect("an untrusted certificate fails the start");
        assert!(
            e.contains("--jwt-jwks-url") && e.contains("UnknownIssuer"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_fetch_that_fails_is_a_start_up_error() {
        let server = JwksServer::start(None, Reply::Status(404)).await;
        let url = server.url.clone();
        let down = format!("http://127.0.0.1:{}/jwks.json", wsgate_testkit::free_port());
        let errors = tokio::task::spawn_blocking(move || {
            let e = |args: &[&str]| start_error(args).expect("refused");
            vec![
                (e(&["--jwt-jwks-url", &url]), "HTTP 404"),
                (e(&["--jwt-jwks-url", &down]), "onnect"),
                (
                    e(&["--jwt-jwks-url", "ftp://127.0.0.1/jwks.json"]),
                    "http://",
                ),
                (
                    e(&["--jwt-jwks-url", &url, "--jwt-jwks-ca-file", "ca.pem"]),
                    "needs an https://",
                ),
                (
                    e(&["--jwt-jwks-url", &url, "--jwt-jwks-refresh", "0s"]),
                    "at least 1s",
                ),
            ]
        })
        .await
        .unwrap();
        for (e, expect) in errors {
            assert!(e.contains("--jwt-jwks"), "{e}");
            assert!(e.contains(expect), "{expect}: {e}");
        }
        // A document that is not a JWKS, or has no usable key.
        server.serve(Reply::Garbage);
        let url = server.url.clone();
        let e = tokio::task::spawn_blocking(move || start_error(&["--jwt-jwks-url", &url]))
            .await
            .unwrap()
            .unwrap();
        assert!(e.contains("not a JWKS"), "{e}");
        server.serve(Reply::Jwks(r#"{"keys":[]}"#.into()));
        let url = server.url.clone();
        let e = tokio::task::spawn_blocking(move || start_error(&["--jwt-jwks-url", &url]))
            .await
            .unwrap()
            .unwrap();
        assert!(e.contains("no RS256, ES256 or HS256"), "{e}");
    }
}
