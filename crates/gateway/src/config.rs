//! Gateway configuration: every setting is a flag with a `WSGATE_*` environment
//! equivalent, and its default lives here, once. `wsgate --help` prints them all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 25s, 1m)"))
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("KiB") {
        (n, 1024)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1024 * 1024)
    } else if let Some(n) = s.strip_suffix("GiB") {
        (n, 1024 * 1024 * 1024)
    } else {
        (s, 1)
    };
    num.trim()
        .parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| format!("`{s}` is not a byte size (examples: 65536, 64KiB, 1MiB)"))
}

/// wsgate: a horizontally scalable WebSocket pub/sub gateway.
///
/// Clients connect to `ws://<listen>/ws` and speak the JSON protocol in
/// docs/protocol.md; backends publish with `POST /api/publish` (or Redis, with
/// `--redis-url`). Health and metrics are on the admin listener.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "wsgate",
    version,
    about = "wsgate: a horizontally scalable WebSocket pub/sub gateway",
    long_about = None,
    max_term_width = 100
)]
pub struct Config {
    /// TOML configuration file: any of these settings, keyed by the flag's name
    /// (`max_message_size = "64KiB"`), and the `[[namespaces]]` that make topics streams.
    /// Flags and WSGATE_* variables override it. docs/configuration.md.
    #[arg(long, env = "WSGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address for WebSocket clients (`/ws`) and the HTTP publish API.
    #[arg(long, env = "WSGATE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address for `/healthz`, `/readyz`, `/metrics` and `POST /drain`. May equal
    /// `--listen` to serve everything on one port.
    #[arg(long, env = "WSGATE_ADMIN_LISTEN", default_value = "127.0.0.1:9090")]
    pub admin_listen: SocketAddr,

    /// This node's id, sent to clients in `welcome` (default: the host name).
    #[arg(long, env = "WSGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// Interval between server WebSocket pings (the first one is jittered).
    #[arg(long, env = "WSGATE_HEARTBEAT_INTERVAL", default_value = "25s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// A client that sends no frame of any kind for this long is closed with 4000.
    #[arg(long, env = "WSGATE_HEARTBEAT_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub heartbeat_timeout: Duration,

    /// On SIGTERM/SIGINT (or `POST /drain`), clients are closed with 1001 spread
    /// evenly over this window, then the process exits 0.
    #[arg(long, env = "WSGATE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Maximum WebSocket connections on this node; more are refused with HTTP 503.
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// How far over its fair share of the fleet's connections a node may be before
    /// rebalancing sheds the excess, as a fraction of the share (0.1: 10 % over). The
    /// share is the connections of the live, non-draining nodes divided among them by
    /// their `--max-connections`. docs/operations.md, "Rebalancing after a scale-out".
    #[arg(long, env = "WSGATE_REBALANCE_MARGIN", default_value_t = 0.1)]
    pub rebalance_margin: f64,

    /// Most of a node's connections shed per second while it rebalances, as a fraction
    /// (0.01: 1 % a second, and at least one a second), the closes (1012) jittered.
    #[arg(long, env = "WSGATE_REBALANCE_RATE", default_value_t = 0.01)]
    pub rebalance_rate: f64,

    /// Automatic rebalancing: the node checks the fleet every sixth of
    /// `--presence-timeout` and sheds what it holds over its share plus the margin.
    /// Default: on with Redis, off with the in-memory broker (one node).
    #[arg(long, env = "WSGATE_REBALANCE_AUTO", action = clap::ArgAction::Set)]
    pub rebalance_auto: Option<bool>,

    /// Largest client message (after reassembling fragments); larger closes with 1009.
    #[arg(long, env = "WSGATE_MAX_MESSAGE_SIZE", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_message_size: usize,

    /// Largest `data` of one publication (client or HTTP): `payload_too_large` / 413.
    /// Defaults to `--max-message-size`.
    #[arg(long, env = "WSGATE_MAX_PUBLICATION_SIZE", value_parser = parse_bytes)]
    pub max_publication_size: Option<usize>,

    /// Bytes that may wait in one connection's outbound queue; a client that falls
    /// further behind is closed with 4008 (slow consumer).
    #[arg(long, env = "WSGATE_OUTBOUND_QUEUE_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    pub outbound_queue_bytes: usize,

    /// Kernel send buffer (SO_SNDBUF) of each client socket; 0 leaves it to the
    /// kernel's autotuning (up to net.ipv4.tcp_wmem's maximum, 4 MiB by default).
    /// A stalled client holds this much in the kernel (Linux doubles the value for
    /// its bookkeeping) on top of --outbound-queue-bytes before it is cut as a slow
    /// consumer: the bound cuts stalled clients sooner and keeps their buffers from
    /// pressing on every other connection's. 256 KiB still lets one client take
    /// about 5 MB/s at 100 ms round trip.
    #[arg(long, env = "WSGATE_SOCKET_SEND_BUFFER", default_value = "256KiB", value_parser = parse_bytes)]
    pub socket_send_buffer: usize,

    /// Maximum topics one connection may be subscribed to (`too_many_topics`).
    #[arg(long, env = "WSGATE_MAX_TOPICS_PER_CONNECTION", default_value_t = 1000)]
    pub max_topics_per_connection: usize,

    /// Sustained commands per second per connection (token bucket refill rate).
    #[arg(long, env = "WSGATE_RATE_LIMIT", default_value_t = 200.0)]
    pub rate_limit: f64,

    /// Commands a connection may send in a burst (token bucket size). Commands over
    /// the limit get `rate_limited`; as many again over the limit closes with 4029.
    #[arg(long, env = "WSGATE_RATE_BURST", default_value_t = 400.0)]
    pub rate_burst: f64,

    /// Publications a connection may have waiting for the broker at once.
    #[arg(long, env = "WSGATE_MAX_INFLIGHT_PUBLISHES", default_value_t = 256)]
    pub max_inflight_publishes: usize,

    /// Whether clients may publish over WebSocket (`forbidden` when off).
    #[arg(long, env = "WSGATE_CLIENT_PUBLISH", default_value_t = true, action = clap::ArgAction::Set)]
    pub client_publish: bool,

    /// Bearer key required by `POST /api/publish` (none: the API is open).
    #[arg(long, env = "WSGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Largest HTTP publish request body (413 above).
    #[arg(long, env = "WSGATE_HTTP_MAX_BODY", default_value = "1MiB", value_parser = parse_bytes)]
    pub http_max_body: usize,

    /// Time a client has to send its HTTP request headers (slowloris guard).
    #[arg(long, env = "WSGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// TLS certificate chain (PEM) for the public listener (`wss://` and HTTPS for the
    /// publish API). Reloaded on SIGHUP and when the file changes. Needs `--tls-key`.
    #[arg(long, env = "WSGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1) matching `--tls-cert`.
    #[arg(long, env = "WSGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Shared secret for HS256 JWTs. With this, `--jwt-public-key` or `--jwt-jwks-url`,
    /// every client needs a valid token (docs/auth.md); with none, clients are anonymous.
    #[arg(long, env = "WSGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key (RSA for RS256, EC P-256 for ES256) or a JWKS file (`.json`)
    /// for verifying JWTs.
    #[arg(long, env = "WSGATE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// URL of a JWKS (`http://` or `https://`, e.g. an identity provider's
    /// `…/.well-known/jwks.json`): fetched at start (a failure exits 2), refreshed every
    /// `--jwt-jwks-refresh` and early when a token names an unknown `kid`.
    #[arg(long, env = "WSGATE_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// How often the `--jwt-jwks-url` key set is fetched again. A failed fetch keeps the
    /// last good key set (and is retried after at most 30 s).
    #[arg(long, env = "WSGATE_JWT_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwt_jwks_refresh: Duration,

    /// CA certificate(s) (PEM) that sign the `--jwt-jwks-url` server's certificate
    /// (replaces the system roots).
    #[arg(long, env = "WSGATE_JWT_JWKS_CA_FILE")]
    pub jwt_jwks_ca_file: Option<PathBuf>,

    /// Required `aud` claim of client tokens (unset: `aud` is not checked).
    #[arg(long, env = "WSGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim of client tokens (unset: `iss` is not checked).
    #[arg(long, env = "WSGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Clock skew tolerated on `exp` and `nbf` (the connection itself closes at `exp`).
    #[arg(long, env = "WSGATE_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// Comma-separated browser origins allowed to open WebSockets
    /// (`https://app.example.com`, `https://*.example.com`). Requests without an
    /// `Origin` header (non-browser clients) are not affected. Unset: any origin.
    #[arg(long, env = "WSGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// WebSocket upgrades admitted per second on this node (token bucket refill rate);
    /// beyond it (and the burst) upgrade requests get HTTP 503 `overloaded` with
    /// `Retry-After` before any work is done for them. 0: no limit (the default: a
    /// limit below what the node can really take only slows recovery; size it as in
    /// docs/operations.md, "Reconnect storms").
    #[arg(long, env = "WSGATE_UPGRADE_RATE", default_value_t = 0.0)]
    pub upgrade_rate: f64,

    /// Upgrades admitted at once above `--upgrade-rate` (token bucket size).
    /// Defaults to a quarter of a second's worth of the rate (at least 1).
    #[arg(long, env = "WSGATE_UPGRADE_BURST")]
    pub upgrade_burst: Option<f64>,

    /// Maximum WebSocket connections from one client IP address (0: no limit).
    #[arg(long, env = "WSGATE_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// Negotiates permessage-deflate (RFC 7692) on `/ws` and `/echo` with clients
    /// that offer it: publications of at least 256 bytes are compressed once per
    /// node and shared by every compressing subscriber; clients may send compressed
    /// messages. A namespace may opt out (`compression = false`). On by default.
    #[arg(long, env = "WSGATE_COMPRESSION", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub compression: bool,

    /// Serves `/echo`, a WebSocket echo endpoint on the same connection stack as
    /// `/ws`, for the Autobahn conformance suite. Never enable it in production.
    #[arg(long, env = "WSGATE_ECHO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub echo: bool,

    /// Serves a demo page at `/` (a chat room and a live ticker) and publishes a demo
    /// ticker to `demo.ticker` every 500 ms. Off by default.
    #[arg(long, env = "WSGATE_DEMO", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub demo: bool,

    /// Total memory for the stream history the in-memory broker keeps (streams are set
    /// per namespace in the --config file); over it, the least recently published
    /// streams lose their history first. Unused with Redis.
    #[arg(long, env = "WSGATE_HISTORY_MEMORY", default_value = "256MiB", value_parser = parse_bytes)]
    pub history_memory: usize,

    /// Log format.
    #[arg(long, env = "WSGATE_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,wsgate_gateway=debug`).
    #[arg(long, env = "WSGATE_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// CA certificate(s) (PEM) that sign the OTLP collector's certificate, for an
    /// `https://` `OTEL_EXPORTER_OTLP_ENDPOINT` (replaces the system roots; the standard
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE` is read when this is unset). docs/metrics.md.
    #[arg(long, env = "WSGATE_OTLP_CA_FILE")]
    pub otlp_ca_file: Option<PathBuf>,
}

impl Config {
    /// Checks relations between settings that clap cannot express.
    ///
    /// # Errors
    /// A human-readable explanation of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval.is_zero() {
            return Err("--heartbeat-interval must be greater than 0".into());
        }
        if self.heartbeat_timeout <= self.heartbeat_interval {
            return Err(format!(
                "--heartbeat-timeout ({:?}) must be longer than --heartbeat-interval ({:?})",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.max_message_size < 128 {
            return Err("--max-message-size must be at least 128 bytes".into());
        }
        if self.socket_send_buffer != 0 && self.socket_send_buffer < 4096 {
            return Err(
                "--socket-send-buffer must be 0 (kernel autotuning) or at least 4KiB".into(),
            );
        }
        if self.outbound_queue_bytes < 1024 {
            return Err("--outbound-queue-bytes must be at least 1KiB".into());
        }
        if self.history_memory < 64 * 1024 {
            return Err("--history-memory must be at least 64KiB".into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        if !(self.rate_limit > 0.0 && self.rate_burst >= 1.0) {
            return Err("--rate-limit must be > 0 and --rate-burst >= 1".into());
        }
        if !(self.upgrade_rate >= 0.0 && self.upgrade_rate.is_finite()) {
            return Err("--upgrade-rate must be >= 0 (0: no limit)".into());
        }
        if self
            .upgrade_burst
            .is_some_and(|b| !(b >= 1.0 && b.is_finite()))
        {
            return Err("--upgrade-burst must be >= 1".into());
        }
        if self.max_topics_per_connection == 0 || self.max_inflight_publishes == 0 {
            return Err(
                "--max-topics-per-connection and --max-inflight-publishes must be >= 1".into(),
            );
        }
        if self.api_key.as_deref() == Some("") {
            return Err("--api-key must not be empty (omit it to leave the API open)".into());
        }
        if self.jwt_secret.as_deref() == Some("") {
            return Err("--jwt-secret must not be empty".into());
        }
        if !(self.rebalance_margin.is_finite() && self.rebalance_margin >= 0.0) {
            return Err(
                "--rebalance-margin must be a fraction >= 0 (0.1: 10 % over the share)".into(),
            );
        }
        if !(self.rebalance_rate > 0.0 && self.rebalance_rate <= 1.0) {
            return Err(
                "--rebalance-rate must be a fraction in (0, 1] (0.01: 1 % a second)".into(),
            );
        }
        if let Some(p) = self.max_publication_size {
            if p == 0 {
                return Err("--max-publication-size must be at least 1".into());
            }
        }
        Ok(())
    }

    /// The publication size limit in force.
    pub fn max_publication_size(&self) -> usize {
        self.max_publication_size.unwrap_or(self.max_message_size)
    }

    /// The upgrade bucket's size in force: `--upgrade-burst`, else a quarter of a
    /// second at `--upgrade-rate` (at least 1).
    pub fn upgrade_burst(&self) -> f64 {
        self.upgrade_burst
            .unwrap_or((self.upgrade_rate / 4.0).max(1.0))
    }

    /// The node id in force: `--node-id`, else the host name, else a random id.
    pub fn resolved_node_id(&self) -> String {
        if let Some(id) = &self.node_id {
            return id.clone();
        }
        hostname::get()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()))
    }

    /// Parses `args` (without the program name) as if given on the command line.
    ///
    /// # Panics
    /// On invalid arguments (meant for tests and tools).
    pub fn try_parse_from_args(args: &[&str]) -> Self {
        let mut argv = vec!["wsgate"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).expect("valid arguments")
    }

    /// Whether clients must present a JWT.
    pub fn auth_enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some() || self.jwt_jwks_url.is_some()
    }

    /// Defaults, as if started with no flags and no environment (for tests).
    pub fn for_tests() -> Self {
        Config::parse_from([
            "wsgate",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::for_tests();
        c.validate().unwrap();
        assert_eq!(c.heartbeat_interval, Duration::from_secs(25));
        assert_eq!(c.outbound_queue_bytes, 1024 * 1024);
        assert_eq!(c.socket_send_buffer, 256 * 1024);
        assert_eq!(c.max_message_size, 64 * 1024);
        assert_eq!(c.max_publication_size(), 64 * 1024);
        assert_eq!(c.history_memory, wsgate_fanout::DEFAULT_HISTORY_MEMORY);
        assert!(c.config.is_none());
        assert_eq!((c.rebalance_margin, c.rebalance_rate), (0.1, 0.01));
        assert_eq!(c.rebalance_auto, None);
    }

    #[test]
    fn bad_values_are_explained() {
        let c = Config::try_parse_from(["wsgate", "--heartbeat-interval", "soon"]);
        assert!(c.unwrap_err().to_string().contains("examples"));
        let c = Config::try_parse_from(["wsgate", "--max-message-size", "12XB"]);
        assert!(c.is_err());
        let c = Config::parse_from([
            "wsgate",
            "--heartbeat-interval",
            "30s",
            "--heartbeat-timeout",
            "10s",
        ]);
        assert!(c.validate().unwrap_err().contains("heartbeat-timeout"));
        let c = Config::parse_from(["wsgate", "--rebalance-rate", "0"]);
        assert!(c.validate().unwrap_err().contains("--rebalance-rate"));
        let c = Config::parse_from(["wsgate", "--rebalance-margin=-1"]);
        assert!(c.validate().unwrap_err().contains("--rebalance-margin"));
        let c = Config::parse_from(["wsgate", "--rebalance-auto", "false"]);
        assert_eq!(c.rebalance_auto, Some(false));
        let c = Config::parse_from(["wsgate", "--history-memory", "1KiB"]);
        assert!(c.validate().unwrap_err().contains("--history-memory"));
        let c = Config::parse_from(["wsgate", "--socket-send-buffer", "1000"]);
        assert!(c.validate().unwrap_err().contains("socket-send-buffer"));
        for ok in ["0", "4KiB", "1MiB"] {
            Config::parse_from(["wsgate", "--socket-send-buffer", ok])
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("2MiB"), Ok(2 << 20));
        assert_eq!(parse_bytes("100"), Ok(100));
    }
}
