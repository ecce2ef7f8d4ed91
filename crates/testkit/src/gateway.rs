//! A real gateway in the test's own process: both listeners on `127.0.0.1:0`, the
//! in-memory broker, real sockets. Shut down when its handle drops.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use wsgate_gateway::{Config, Gateway, Server};
use wsgate_metrics::Metrics;

use crate::http::{http, parse_metrics, raw, val};
use crate::ws::Client;

/// A running gateway.
pub struct TestServer {
    /// `/ws` and the publish API.
    pub addr: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`, `/drain`.
    pub admin: SocketAddr,
    pub gw: Arc<Gateway>,
    /// The server's task: it ends when the gateway has shut down.
    pub task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.gw.shutdown.cancel();
    }
}

/// The configuration of a test gateway: both listeners on port 0, plus `args`
/// (flag, value, flag, value…); panics if it does not validate.
pub fn config(args: &[&str]) -> Config {
    let mut argv = vec![
        "wsgate",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    argv.extend_from_slice(args);
    let c = Config::parse_from(argv);
    c.validate().expect("valid test config");
    c
}

/// Starts a gateway with the test defaults plus `args`.
pub async fn start(args: &[&str]) -> TestServer {
    start_with(config(args)).await
}

/// Starts a gateway with the in-memory broker and `cfg`.
pub async fn start_with(cfg: Config) -> TestServer {
    let gw = Gateway::in_memory(cfg, Metrics::default()).expect("valid security settings");
    start_gateway(gw).await
}

/// Serves a gateway built by the test.
pub async fn start_gateway(gw: Arc<Gateway>) -> TestServer {
    let server = Server::bind(gw.clone()).await.expect("bind");
    let addr = server.local_addr();
    let admin = server.admin_addr();
    let task = tokio::spawn(server.run());
    TestServer {
        addr,
        admin,
        gw,
        task,
    }
}

impl TestServer {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A client on `/ws`, past the welcome ([`Client::welcome`]).
    pub async fn connect(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// One series of a `/metrics` scrape (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = http(self.admin, "GET", "/metrics", &[], b"").await;
        val(&parse_metrics(&text), series)
    }

    /// `wsgate_connections_refused_total{reason}` as scraped.
    pub async fn refused(&self, reason: &str) -> u64 {
        let r = raw(
            self.admin,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let needle = format!("wsgate_connections_refused_total{{reason=\"{reason}\"}} ");
        r.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0)
    }
}

/// Tokens for the authentication tests.
pub mod jwt {
    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    use serde_json::Value;

    /// The HS256 secret of [`hs256`] (give it to `--jwt-secret`).
    pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";

    /// Seconds since the epoch.
    pub fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// An HS256 token signed with [`SECRET`].
    pub fn hs256(claims: &Value) -> String {
        sign(Algorithm::HS256, SECRET.as_bytes(), claims)
    }

    /// A token signed with `alg`: `key` is the secret (HS*) or a PEM private key.
    pub fn sign(alg: Algorithm, key: &[u8], claims: &Value) -> String {
        let key = match alg {
            Algorithm::HS256 | Algorithm::HS384 => EncodingKey::from_secret(key),
            Algorithm::ES256 => EncodingKey::from_ec_pem(key).unwrap(),
            _ => EncodingKey::from_rsa_pem(key).unwrap(),
        };
        encode(&Header::new(alg), claims, &key).unwrap()
    }
}
