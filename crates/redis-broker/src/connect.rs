//! Opening connections to Redis, in one place: the URL, a password given apart from it,
//! TLS (a private CA, a client certificate for mutual TLS), Sentinel, and the Redis
//! Cluster client ([`cluster_client`]), which takes the same credentials and TLS
//! material as single mode.
//!
//! The publisher and the subscription manager never build a client themselves: they ask
//! the [`Connector`] for a connection every time they (re)connect. With Sentinel that
//! is what makes a failover work: each (re)connect asks the sentinels who the master is
//! *now* (and the crate checks with `ROLE` that it really is one) instead of returning to
//! the address that worked last time. [`Connector::client_for`] hands out clients for
//! other addresses with the same credentials and TLS settings (for a caller that learns
//! node addresses from Redis itself).
//!
//! Nothing here ever formats a password: [`Connector::target`] and
//! [`explain`] are what goes into logs.
//!
//! `rediss://…#insecure` (TLS without certificate verification) works only when built
//! with the `insecure-tls` feature, which only the tests enable ([`INSECURE_TLS`]);
//! otherwise [`Connector::new`] refuses such a URL.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, ConnectionAddr, ConnectionInfo, ErrorKind,
    IntoConnectionInfo, ProtocolVersion, RedisError, RedisResult, TlsCertificates, TlsMode,
};

/// Whether `#insecure` Redis URLs are built in (the `insecure-tls` feature, tests only).
pub const INSECURE_TLS: bool = cfg!(feature = "insecure-tls");

use crate::limits::RESPONSE_TIMEOUT;

pub use crate::limits::{CONNECT_TIMEOUT, SENTINEL_TIMEOUT};

/// TLS material, as PEM bytes (read by the caller, so a missing file is a start-up error
/// and not a retry loop).
#[derive(Clone, Default)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the server's certificate. Replaces the system roots.
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain, for servers that require mutual TLS.
    pub client_cert: Option<Vec<u8>>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub client_key: Option<Vec<u8>>,
}

impl TlsFiles {
    fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }

    fn certificates(&self) -> Result<Option<TlsCertificates>, ConnectError> {
        let client_tls = match (&self.client_cert, &self.client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            (None, None) => None,
            _ => {
                return Err(ConnectError(
                    "a client certificate needs its key, and a key its certificate".into(),
                ))
            }
        };
        if client_tls.is_none() && self.ca.is_none() {
            return Ok(None);
        }
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert: self.ca.clone(),
        }))
    }
}

/// Where the master is found when Redis runs under Sentinel.
#[derive(Clone)]
pub struct SentinelOptions {
    /// Sentinel addresses, `host:port`.
    pub nodes: Vec<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> …`).
    pub master: String,
    /// Password of the sentinels themselves (`requirepass` in sentinel.conf), if any.
    pub password: Option<String>,
}

impl fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelOptions")
            .field("nodes", &self.nodes)
            .field("master", &self.master)
            .finish_non_exhaustive()
    }
}

/// Everything needed to open a connection.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// `redis://[user[:password]@]host:port[/db]`, or `rediss://…` for TLS (append
    /// `#insecure` to skip certificate verification: only with the `insecure-tls`
    /// feature, for tests). With Sentinel, the
    /// host and port are not used: the sentinels name the master; the scheme, user,
    /// password and database still apply to it.
    pub url: String,
    /// Overrides the URL's password (so it can come from a secret of its own and need not
    /// be URL-encoded).
    pub password: Option<String>,
    /// TLS material for `rediss://`.
    pub tls: TlsFiles,
    /// Find the master through these sentinels.
    pub sentinel: Option<SentinelOptions>,
}

impl fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL and the password may hold secrets: never print them.
        f.debug_struct("ConnectOptions")
            .field("sentinel", &self.sentinel)
            .finish_non_exhaustive()
    }
}

/// A configuration that cannot work, whatever Redis does: reported at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectError(pub String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

impl From<RedisError> for ConnectError {
    fn from(e: RedisError) -> Self {
        ConnectError(e.to_string())
    }
}

enum Target {
    Direct(Client),
    /// Locked while asking: the sentinel client caches its connections to the sentinels.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

/// Opens connections; cheap to clone (shared by the publisher and the subscriber).
#[derive(Clone)]
pub struct Connector {
    target: Arc<Target>,
    /// The parsed URL with the password applied: the template for [`Self::client_for`].
    info: ConnectionInfo,
    certificates: Option<TlsCertificates>,
    /// For logs: where we connect, without credentials.
    description: Arc<str>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.description)
    }
}

fn is_tls(addr: &ConnectionAddr) -> Option<bool> {
    match addr {
        ConnectionAddr::TcpTls { insecure, .. } => Some(*insecure),
        _ => None,
    }
}

/// Refuses `#insecure` unless it is built in: without the feature the redis crate would
/// fail every connect attempt, a retry loop instead of a clear error at start.
fn check_insecure(tls: Option<bool>, built_in: bool) -> Result<(), ConnectError> {
    if tls == Some(true) && !built_in {
        return Err(ConnectError(
            "`#insecure` (TLS without certificate verification) is not built into this \
             binary: it exists for tests only (the `insecure-tls` feature). Drop it from \
             the URL and let the certificate be verified: --redis-ca-file for a private CA"
                .into(),
        ));
    }
    Ok(())
}

impl Connector {
    /// Checks the options and prepares clients (nothing is connected yet).
    ///
    /// # Errors
    /// An invalid URL, TLS files without `rediss://`, PEM that does not parse, an empty
    /// sentinel list.
    pub fn new(options: &ConnectOptions) -> Result<Connector, ConnectError> {
        let info = parse_url(&options.url, options.password.as_deref())?;
        let tls = is_tls(info.addr());
        check_insecure(tls, INSECURE_TLS)?;
        let certificates = check_tls(tls, &options.tls)?;
        let target = match &options.sentinel {
            None => {
                let client = match &certificates {
                    Some(c) => Client::build_with_tls(info.clone(), c.clone())?,
                    None => Client::open(info.clone())?,
                };
                Target::Direct(client)
            }
            Some(s) => Target::Sentinel(tokio::sync::Mutex::new(sentinel_client(
                s,
                &info,
                tls,
                &certificates,
            )?)),
        };
        let security = match tls {
            None => "",
            Some(false) => ", tls",
            Some(true) => ", tls without verification",
        };
        let description: Arc<str> = match (&options.sentinel, info.addr()) {
            (Some(s), _) => format!(
                "master `{}` via sentinels {}{security}",
                s.master,
                s.nodes.join(",")
            )
            .into(),
            (
                None,
                ConnectionAddr::Tcp(h, p)
                | ConnectionAddr::TcpTls {
                    host: h, port: p, ..
                },
            ) => format!("{h}:{p}{security}").into(),
            (None, other) => format!("{other:?}").into(),
        };
        Ok(Connector {
            target: Arc::new(target),
            info,
            certificates,
            description,
        })
    }

    /// Where this connects, for logs (no credentials).
    pub fn target(&self) -> &str {
        &self.description
    }

    /// A client for the current master (Sentinel: asked now), or the configured server.
    ///
    /// # Errors
    /// No sentinel answered, none names a usable master, or the master check failed.
    pub async fn client(&self) -> RedisResult<Client> {
        match &*self.target {
            Target::Direct(c) => Ok(c.clone()),
            Target::Sentinel(s) => {
                let ask = async { s.lock().await.async_get_client().await };
                match tokio::time::timeout(SENTINEL_TIMEOUT, ask).await {
                    Ok(r) => r,
                    Err(_) => Err(RedisError::from((
                        ErrorKind::Io,
                        "the sentinels did not name a master in time",
                    ))),
                }
            }
        }
    }

    /// A client for another server (`host:port`) with this connector's credentials,
    /// database and TLS settings.
    ///
    /// # Errors
    /// When the TLS material cannot be applied.
    pub fn client_for(&self, host: &str, port: u16) -> RedisResult<Client> {
        let addr = match is_tls(self.info.addr()) {
            Some(insecure) => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host.to_string(), port),
        };
        let info = self.info.clone().set_addr(addr);
        match &self.certificates {
            Some(c) => Client::build_with_tls(info, c.clone()),
            None => Client::open(info),
        }
    }

    /// A multiplexed connection (commands, pipelines) to the current master.
    ///
    /// # Errors
    /// As [`Self::client`], and any failure to connect (timeout, TLS, `AUTH`).
    pub async fn multiplexed(
        &self,
        response_timeout: Duration,
    ) -> RedisResult<redis::aio::MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(response_timeout));
        let mut conn = self
            .client()
            .await?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        // Connecting without credentials succeeds even where Redis wants some (`NOAUTH`
        // comes with the first command): a connection counts only once Redis answers.
        redis::cmd("PING")
            .query_async::<redis::Value>(&mut conn)
            .await?;
        Ok(conn)
    }

    /// A dedicated pub/sub connection to the current master.
    ///
    /// # Errors
    /// As [`Self::client`], and any failure to connect (timeout, TLS, `AUTH`).
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        let client = self.client().await?;
        let open = async {
            let mut pubsub = client.get_async_pubsub().await?;
            // As in `multiplexed`: only a connection Redis answers on counts.
            pubsub.ping::<redis::Value>().await?;
            Ok(pubsub)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((ErrorKind::Io, "connect timed out"))),
        }
    }
}

/// The URL parsed, with `password` (when given) replacing its password.
fn parse_url(url: &str, password: Option<&str>) -> Result<ConnectionInfo, ConnectError> {
    // The rustls provider this workspace builds with; a no-op when the process has one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let info = url.into_connection_info().map_err(|e| {
        // The crate's message never echoes the URL, so it is safe to show.
        ConnectError(format!("invalid Redis URL: {e}"))
    })?;
    Ok(match password {
        Some(p) => info
            .clone()
            .set_redis_settings(info.redis_settings().clone().set_password(p)),
        None => info,
    })
}

/// Checks the TLS material against the URL's scheme (`tls`: `Some(insecure)` for
/// `rediss://`) and turns it into the crate's form.
fn check_tls(tls: Option<bool>, files: &TlsFiles) -> Result<Option<TlsCertificates>, ConnectError> {
    if tls.is_none() && !files.is_empty() {
        return Err(ConnectError(
            "a CA file or client certificate needs a rediss:// URL".into(),
        ));
    }
    if let Some(ca) = &files.ca {
        // An empty trust store would fail every handshake: say so now.
        if !ca.windows(11).any(|w| w == b"CERTIFICATE") {
            return Err(ConnectError("the CA file holds no PEM certificate".into()));
        }
    }
    files.certificates()
}

/// A Redis Cluster client (RESP3, so that shard-channel messages arrive as pushes on
/// `push`) for the seed URLs, with the same credentials and TLS rules as single mode:
/// the first seed's user and password (or `password`) apply to every node, and every
/// seed must use the same scheme. Also returns a description for logs (no
/// credentials).
///
/// # Errors
/// No seed, an invalid URL, seeds that disagree on scheme or credentials, TLS files
/// without `rediss://`, PEM that does not parse.
pub fn cluster_client(
    seeds: &[String],
    password: Option<&str>,
    tls_files: &TlsFiles,
    push: impl AsyncPushSender,
) -> Result<(ClusterClient, String), ConnectError> {
    let Some(first) = seeds.first() else {
        return Err(ConnectError(
            "Redis Cluster mode needs at least one seed address".into(),
        ));
    };
    let mut infos = Vec::with_capacity(seeds.len());
    let mut hosts = Vec::with_capacity(seeds.len());
    for (i, url) in seeds.iter().enumerate() {
        let info = parse_url(url, password)
            .map_err(|e| ConnectError(format!("seed {}: {}", i + 1, e.0)))?;
        match info.addr() {
            ConnectionAddr::Tcp(h, p)
            | ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => hosts.push(format!("{h}:{p}")),
            _ => {
                return Err(ConnectError(format!(
                    "seed {}: only redis://host:port or rediss://host:port in cluster mode",
                    i + 1
                )))
            }
        }
        infos.push(info);
    }
    let tls = is_tls(parse_url(first, password)?.addr());
    check_insecure(tls, INSECURE_TLS)?;
    let certificates = check_tls(tls, tls_files)?;
    let mut b = ClusterClientBuilder::new(infos)
        .use_protocol(ProtocolVersion::RESP3)
        .push_sender(push)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        // A redirect or a refused connection is retried a few times, quickly; the
        // relay has its own timeouts and probes on top.
        .retries(3)
        .min_retry_wait(20)
        .max_retry_wait(500);
    if let Some(p) = password {
        b = b.password(p);
    }
    if let Some(insecure) = tls {
        b = b.tls(if insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Secure
        });
    }
    if let Some(c) = certificates {
        b = b.certs(c);
    }
    let client = b.build().map_err(|e| ConnectError(e.to_string()))?;
    let security = match tls {
        None => "",
        Some(false) => ", tls",
        Some(true) => ", tls without verification",
    };
    Ok((
        client,
        format!("cluster seeds {}{security}", hosts.join(",")),
    ))
}

fn sentinel_client(
    s: &SentinelOptions,
    info: &ConnectionInfo,
    tls: Option<bool>,
    certificates: &Option<TlsCertificates>,
) -> Result<SentinelClient, ConnectError> {
    if s.nodes.is_empty() {
        return Err(ConnectError("Sentinel needs at least one sentinel".into()));
    }
    if s.master.is_empty() {
        return Err(ConnectError("Sentinel needs the master's name".into()));
    }
    let mut nodes = Vec::with_capacity(s.nodes.len());
    for n in &s.nodes {
        let (host, port) = n
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| ConnectError(format!("sentinel `{n}` is not host:port")))?;
        // The sentinels speak TLS when the master does (Redis configures both alike).
        nodes.push(match tls {
            Some(insecure) => ConnectionAddr::TcpTls {
                host: host.to_string(),
                port,
                insecure,
                tls_params: None,
            },
            None => ConnectionAddr::Tcp(host.to_string(), port),
        });
    }
    let mut b = SentinelClientBuilder::new(nodes, s.master.clone(), SentinelServerType::Master)?;
    let settings = info.redis_settings();
    b = b.set_client_to_redis_db(settings.db());
    if let Some(u) = settings.username() {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = settings.password() {
        b = b.set_client_to_redis_password(p);
    }
    if let Some(p) = &s.password {
        b = b.set_client_to_sentinel_password(p);
    }
    if let Some(insecure) = tls {
        let mode = if insecure {
            TlsMode::Insecure
        } else {
            TlsMode::Secure
        };
        b = b
            .set_client_to_redis_tls_mode(mode)
            .set_client_to_sentinel_tls_mode(mode);
        if let Some(c) = certificates {
            b = b
                .set_client_to_redis_certificates(c.clone())
                .set_client_to_sentinel_certificates(c.clone());
        }
    }
    Ok(b.build()?)
}

/// A connection error for the logs, with a hint at the setting to check. Redis's and
/// rustls's messages never contain the password.
pub fn explain(e: &RedisError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    if e.kind() == ErrorKind::AuthenticationFailed
        || lower.contains("wrongpass")
        || lower.contains("noauth")
        || lower.contains("authentication")
    {
        format!("{text} (Redis refused the credentials: check the user and password of --redis-url / --redis-password)")
    } else if lower.contains("certificate")
        || lower.contains("tls")
        || lower.contains("handshake")
        || lower.contains("unknownissuer")
    {
        format!("{text} (TLS failed: check the rediss:// host name, --redis-ca-file and the client certificate)")
    } else if e.kind() == ErrorKind::MasterNameNotFoundBySentinel {
        format!("{text} (check --redis-sentinel-master)")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str) -> ConnectOptions {
        ConnectOptions {
            url: url.into(),
            ..ConnectOptions::default()
        }
    }

    #[test]
    fn describes_without_credentials() {
        let c = Connector::new(&opts("redis://user:s3cret@127.0.0.1:7000/2")).unwrap();
        assert_eq!(c.target(), "127.0.0.1:7000");
        assert!(!format!("{c:?}").contains("s3cret"));
        let mut o = opts("rediss://:s3cret@localhost:7001/");
        o.sentinel = Some(SentinelOptions {
            nodes: vec!["127.0.0.1:26379".into(), "[::1]:26380".into()],
            master: "mymaster".into(),
            password: Some("sentinel-s3cret".into()),
        });
        let c = Connector::new(&o).unwrap();
        assert_eq!(
            c.target(),
            "master `mymaster` via sentinels 127.0.0.1:26379,[::1]:26380, tls"
        );
        assert!(!format!("{o:?} {c:?}").contains("s3cret"));
    }

    #[test]
    fn password_flag_overrides_the_url() {
        let mut o = opts("redis://alice:old@127.0.0.1:7000/");
        o.password = Some("new".into());
        let c = Connector::new(&o).unwrap();
        let s = c.info.redis_settings();
        assert_eq!(s.username(), Some("alice"));
        assert_eq!(s.password(), Some("new"));
        // Other addresses get the same credentials.
        let other = c.client_for("127.0.0.2", 7002).unwrap();
        assert_eq!(
            other.get_connection_info().redis_settings().password(),
            Some("new")
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut o = opts("redis://127.0.0.1:7000/");
        o.tls.ca = Some(b"not pem".to_vec());
        let e = Connector::new(&o).unwrap_err();
        assert!(e.0.contains("rediss://"), "{e}");

        let mut o = opts("rediss://127.0.0.1:7000/");
        o.tls.client_cert = Some(b"x".to_vec());
        let e = Connector::new(&o).unwrap_err();
        assert!(e.0.contains("key"), "{e}");

        let e = Connector::new(&opts("http://127.0.0.1:7000/")).unwrap_err();
        assert!(e.0.contains("invalid Redis URL"), "{e}");

        let mut o = opts("redis://127.0.0.1:7000/");
        o.sentinel = Some(SentinelOptions {
            nodes: vec!["no-port".into()],
            master: "m".into(),
            password: None,
        });
        let e = Connector::new(&o).unwrap_err();
        assert!(e.0.contains("host:port"), "{e}");
    }

    #[test]
    fn insecure_is_refused_unless_built_in() {
        let e = check_insecure(Some(true), false).unwrap_err();
        assert!(
            e.0.contains("#insecure") && e.0.contains("--redis-ca-file"),
            "{e}"
        );
        assert!(check_insecure(Some(true), true).is_ok());
        assert!(check_insecure(Some(false), false).is_ok());
        assert!(check_insecure(None, false).is_ok());
        // This build: refused or accepted as the feature says.
        let r = Connector::new(&opts("rediss://127.0.0.1:7000/#insecure"));
        assert_eq!(r.is_ok(), INSECURE_TLS, "{:?}", r.err());
        Connector::new(&opts("rediss://127.0.0.1:7000/")).unwrap();
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        let mut o = opts("rediss://127.0.0.1:7000/");
        o.tls.ca =
            Some(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec());
        assert!(Connector::new(&o).is_err());
    }
}
