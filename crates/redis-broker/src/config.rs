//! The Redis relay's settings: a clap section the binary flattens into its command
//! line, with the defaults and the checks beside the flags. [`RedisArgs::broker`]
//! turns them into a ready-to-start [`BrokerSetup`] (files read, URLs checked), and
//! [`BrokerSetup::node`] starts the broker inside a [`Node`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use tracing::{info, warn};
use wsgate_fanout::{Namespaces, Node};
use wsgate_metrics::Metrics;

use crate::cluster::{ClusterBroker, ClusterOptions};
use crate::connect::{cluster_client, ConnectError, Connector, SentinelOptions, TlsFiles};
use crate::RedisOptions;

/// How `--redis-url` is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisMode {
    /// One Redis (classic `PUBLISH`/`SUBSCRIBE`).
    Single,
    /// A Redis Cluster (7+): sharded pub/sub, `SPUBLISH`/`SSUBSCRIBE` on the shard
    /// owning each topic's slot. `--redis-url` lists seed nodes, comma-separated.
    Cluster,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 25s, 1m)"))
}

/// Redis settings. Without `--redis-url` and `--redis-sentinel` the node runs on its
/// in-memory broker.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Redis (several nodes as one service; docs/redis.md)")]
pub struct RedisArgs {
    /// Redis URL: `redis://[[user]:password@]host:port[/db]`, `rediss://…` for TLS. With
    /// it (or `--redis-sentinel`), every node sharing this Redis acts as one service;
    /// without it the in-memory broker is used. See docs/redis.md.
    #[arg(long, env = "WSGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis password; overrides the one in `--redis-url` (no URL-encoding needed).
    #[arg(long, env = "WSGATE_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,

    /// CA certificate(s) (PEM) that sign the Redis server certificate, for `rediss://`
    /// (replaces the system roots).
    #[arg(long, env = "WSGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) for Redis servers that require mutual TLS.
    #[arg(long, env = "WSGATE_REDIS_CLIENT_CERT", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,

    /// Private key (PEM) of `--redis-client-cert`.
    #[arg(long, env = "WSGATE_REDIS_CLIENT_KEY", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,

    /// Comma-separated Redis Sentinel addresses (`host:port`). The master named by
    /// `--redis-sentinel-master` is asked for on every (re)connect; `--redis-url` then
    /// only gives the scheme, user, password and database (its host is not used).
    #[arg(
        long,
        env = "WSGATE_REDIS_SENTINEL",
        value_delimiter = ',',
        requires = "redis_sentinel_master"
    )]
    pub redis_sentinel: Vec<String>,

    /// The master's name in the sentinels' configuration.
    #[arg(long, env = "WSGATE_REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,

    /// Password of the sentinels themselves (`requirepass` in sentinel.conf), if set.
    #[arg(long, env = "WSGATE_REDIS_SENTINEL_PASSWORD", hide_env_values = true)]
    pub redis_sentinel_password: Option<String>,

    /// Prefix of the Redis channel of each topic (`PUBLISH <prefix><topic> <payload>`).
    #[arg(long, env = "WSGATE_REDIS_PREFIX", default_value = crate::DEFAULT_PREFIX)]
    pub redis_prefix: String,

    /// How long a topic stays subscribed in Redis after its last local subscriber
    /// left (so flapping clients do not churn Redis).
    #[arg(long, env = "WSGATE_REDIS_UNSUBSCRIBE_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub redis_unsubscribe_delay: Duration,

    /// Streams, single mode: how long stream publications wait for more to share one
    /// Redis function call, once they come in faster than this apart (a busy node).
    /// Saves Redis CPU at moderate rates for up to this much latency; `0s`: never
    /// wait. At most 100ms. docs/configuration.md.
    #[arg(long, env = "WSGATE_REDIS_STREAM_LINGER", default_value = "1ms", value_parser = parse_duration)]
    pub redis_stream_linger: Duration,

    /// `single` Redis, or a Redis `cluster` (sharded pub/sub; `--redis-url` is then a
    /// comma-separated list of seed nodes, any one of which is enough). docs/redis.md.
    #[arg(long, env = "WSGATE_REDIS_MODE", value_enum, default_value = "single")]
    pub redis_mode: RedisMode,

    /// Cluster mode: co-locate related topics. With `.`, topic `room42.chat` uses the
    /// channel `<prefix>{room42}.chat`, so every `room42.*` topic is on one shard.
    /// Unset: channels are `<prefix><topic>` as in single mode.
    #[arg(long, env = "WSGATE_REDIS_HASH_TAG_SEPARATOR")]
    pub redis_hash_tag_separator: Option<char>,

    /// Presence: the bound between a node's death (crash, network cut) and its
    /// connections leaving every presence list, their `leave`s sent and the node gone
    /// from `GET /api/info`. Nodes heartbeat every sixth of it. At least 1s.
    #[arg(long, env = "WSGATE_PRESENCE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub presence_timeout: Duration,
}

/// What [`RedisArgs::broker`] found: the broker to start, its inputs read and checked.
#[derive(Debug)]
pub enum BrokerSetup {
    /// One Redis, optionally found through Sentinel.
    Single(RedisOptions),
    /// A Redis Cluster.
    Cluster(ClusterOptions),
}

impl RedisArgs {
    /// Whether a Redis relay is configured (`--redis-url` or `--redis-sentinel`).
    pub fn enabled(&self) -> bool {
        self.redis_url.is_some() || !self.redis_sentinel.is_empty()
    }

    /// Cluster mode's `--redis-url`: seed URLs, comma-separated.
    fn urls(&self) -> Vec<&str> {
        let Some(url) = self.redis_url.as_deref() else {
            return Vec::new();
        };
        match self.redis_mode {
            RedisMode::Single => vec![url],
            RedisMode::Cluster => url.split(',').map(str::trim).collect(),
        }
    }

    /// Checks relations between settings that clap cannot express.
    ///
    /// # Errors
    /// A human-readable explanation of the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        for url in self.urls() {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err("--redis-url must start with redis:// or rediss://".into());
            }
        }
        if let Some(sep) = self.redis_hash_tag_separator {
            if self.redis_mode != RedisMode::Cluster {
                return Err("--redis-hash-tag-separator needs --redis-mode cluster".into());
            }
            if !matches!(sep, '.' | ':' | '/' | '-' | '_') {
                return Err("--redis-hash-tag-separator must be one of . : / - _".into());
            }
        }
        let tls_files = self.redis_ca_file.is_some() || self.redis_client_cert.is_some();
        if tls_files
            && !self
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss://"))
        {
            return Err(
                "--redis-ca-file and --redis-client-cert need a rediss:// --redis-url".into(),
            );
        }
        if self.redis_sentinel_master.is_some() && self.redis_sentinel.is_empty() {
            return Err("--redis-sentinel-master needs --redis-sentinel".into());
        }
        if self.redis_stream_linger > Duration::from_millis(100) {
            return Err("--redis-stream-linger must be at most 100ms".into());
        }
        if self.presence_timeout < Duration::from_secs(1) {
            return Err("--presence-timeout must be at least 1s".into());
        }
        if self.redis_mode == RedisMode::Cluster && !self.redis_sentinel.is_empty() {
            return Err("--redis-sentinel and --redis-mode cluster exclude each other (a cluster fails over by itself)".into());
        }
        Ok(())
    }

    /// The broker these settings ask for, with the TLS files read and the URLs,
    /// credentials and certificates checked as the broker will use them, so a bad file
    /// or URL is a clear error at start and not a retry loop. `None`: no Redis.
    ///
    /// # Errors
    /// What [`RedisArgs::validate`] refuses, an unreadable file, or what the connection
    /// layer refuses (naming the flag or the problem).
    pub fn broker(&self) -> Result<Option<BrokerSetup>, String> {
        self.validate()?;
        if !self.enabled() {
            return Ok(None);
        }
        let read = |flag: &str, p: &Option<PathBuf>| -> Result<Option<Vec<u8>>, String> {
            p.as_ref()
                .map(|p| std::fs::read(p).map_err(|e| format!("{flag} {}: {e}", p.display())))
                .transpose()
        };
        let tls = TlsFiles {
            ca: read("--redis-ca-file", &self.redis_ca_file)?,
            client_cert: read("--redis-client-cert", &self.redis_client_cert)?,
            client_key: read("--redis-client-key", &self.redis_client_key)?,
        };
        let redis = |e: ConnectError| format!("redis: {e}");
        if self.redis_mode == RedisMode::Cluster {
            let options = ClusterOptions {
                seeds: self.urls().into_iter().map(String::from).collect(),
                password: self.redis_password.clone(),
                tls,
                prefix: self.redis_prefix.clone(),
                unsubscribe_delay: self.redis_unsubscribe_delay,
                hash_tag_separator: self.redis_hash_tag_separator.map(|c| c as u8),
                metrics: None,
                install_functions: false,
                presence_timeout: self.presence_timeout,
            };
            let (push, _) = tokio::sync::mpsc::unbounded_channel();
            cluster_client(
                &options.seeds,
                options.password.as_deref(),
                &options.tls,
                push,
            )
            .map_err(redis)?;
            return Ok(Some(BrokerSetup::Cluster(options)));
        }
        let mut options = RedisOptions::new(
            self.redis_url
                .clone()
                .unwrap_or_else(|| "redis://localhost/".into()),
        );
        options.prefix = self.redis_prefix.clone();
        options.unsubscribe_delay = self.redis_unsubscribe_delay;
        options.presence_timeout = self.presence_timeout;
        options.stream_linger = self.redis_stream_linger;
        options.password = self.redis_password.clone();
        options.tls = tls;
        if !self.redis_sentinel.is_empty() {
            options.sentinel = Some(SentinelOptions {
                nodes: self.redis_sentinel.clone(),
                master: self.redis_sentinel_master.clone().unwrap_or_default(),
                password: self.redis_sentinel_password.clone(),
            });
        }
        Connector::new(&options.connect_options()).map_err(redis)?;
        Ok(Some(BrokerSetup::Single(options)))
    }
}

impl BrokerSetup {
    /// How long a node that stops heartbeating stays listed (`--presence-timeout`):
    /// the node list is refreshed every sixth of it.
    pub fn presence_timeout(&self) -> Duration {
        match self {
            BrokerSetup::Single(o) => o.presence_timeout,
            BrokerSetup::Cluster(o) => o.presence_timeout,
        }
    }

    /// Starts the broker (on the current tokio runtime) inside a [`Node`]. Redis need
    /// not be up yet: the broker connects in the background and `/readyz` is 503 until
    /// it has (docs/redis.md).
    ///
    /// # Errors
    /// When the connection options cannot work (already checked by
    /// [`RedisArgs::broker`], so in practice never).
    pub fn node(self, metrics: Metrics, max_publication: usize) -> Result<Node, ConnectError> {
        self.node_with(metrics, max_publication, Namespaces::default())
    }

    /// The node, with its topics made streams as `namespaces` say.
    ///
    /// # Errors
    /// As [`BrokerSetup::node`].
    pub fn node_with(
        self,
        metrics: Metrics,
        max_publication: usize,
        namespaces: Namespaces,
    ) -> Result<Node, ConnectError> {
        match self {
            BrokerSetup::Cluster(mut options) => {
                if options.seeds.iter().any(|s| s.contains("#insecure")) {
                    warn!("redis TLS certificates are not verified (#insecure): for tests only");
                }
                options.metrics = Some(metrics.clone());
                options.install_functions = namespaces.has_streams();
                let prefix = options.prefix.clone();
                let node = Node::with_namespaces(metrics, max_publication, namespaces, |events| {
                    ClusterBroker::start(options, events)
                })?;
                info!(%prefix, "redis cluster (sharded pub/sub) fan-out enabled");
                Ok(node)
            }
            BrokerSetup::Single(mut options) => {
                if options.url.ends_with("#insecure") {
                    warn!("redis TLS certificates are not verified (#insecure): for tests only");
                }
                options.metrics = Some(metrics.clone());
                options.install_functions = namespaces.has_streams();
                let prefix = options.prefix.clone();
                let node = Node::with_namespaces(metrics, max_publication, namespaces, |events| {
                    crate::RedisBroker::start(options, events)
                })?;
                info!(%prefix, "redis fan-out enabled");
                Ok(node)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn parse(args: &[&str]) -> Result<RedisArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("wsgate").chain(args.iter().copied())).map(|c| c.redis)
    }

    fn args(args: &[&str]) -> RedisArgs {
        parse(args).expect("valid arguments")
    }

    #[test]
    fn defaults_mean_no_redis() {
        let a = args(&[]);
        a.validate().unwrap();
        assert!(!a.enabled());
        assert!(a.broker().unwrap().is_none());
        assert_eq!(a.redis_prefix, "wsgate:");
        assert_eq!(a.redis_unsubscribe_delay, Duration::from_secs(1));
        assert_eq!(a.redis_mode, RedisMode::Single);
        assert_eq!(a.presence_timeout, Duration::from_secs(30));
    }

    #[test]
    fn the_presence_timeout_reaches_both_modes() {
        let a = args(&["--redis-url", "redis://h:1/", "--presence-timeout", "3s"]);
        let Some(BrokerSetup::Single(o)) = a.broker().unwrap() else {
            panic!("single mode")
        };
        assert_eq!(o.presence_timeout, Duration::from_secs(3));
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://h:1",
            "--presence-timeout",
            "1m",
        ]);
        let Some(BrokerSetup::Cluster(o)) = a.broker().unwrap() else {
            panic!("cluster mode")
        };
        assert_eq!(o.presence_timeout, Duration::from_secs(60));
        let a = args(&["--presence-timeout", "500ms"]);
        assert!(a.validate().unwrap_err().contains("--presence-timeout"));
        assert!(parse(&["--presence-timeout", "soon"]).is_err());
    }

    #[test]
    fn the_stream_linger_reaches_single_mode_and_is_bounded() {
        let a = args(&["--redis-url", "redis://h:1/"]);
        let Some(BrokerSetup::Single(o)) = a.broker().unwrap() else {
            panic!("single mode")
        };
        assert_eq!(o.stream_linger, Duration::from_millis(1), "the default");
        let a = args(&["--redis-url", "redis://h:1/", "--redis-stream-linger", "0s"]);
        let Some(BrokerSetup::Single(o)) = a.broker().unwrap() else {
            panic!("single mode")
        };
        assert_eq!(o.stream_linger, Duration::ZERO);
        let a = args(&["--redis-stream-linger", "200ms"]);
        assert!(a
            .validate()
            .unwrap_err()
            .contains("--redis-stream-linger must be at most 100ms"));
        assert!(parse(&["--redis-stream-linger", "5x"]).is_err());
    }

    #[test]
    fn tls_and_sentinel_settings() {
        let a = args(&["--redis-url", "redis://h:1/", "--redis-ca-file", "ca.pem"]);
        assert!(a.validate().unwrap_err().contains("rediss://"));
        assert!(
            parse(&["--redis-sentinel", "a:1,b:2"]).is_err(),
            "the master name is required"
        );
        let a = args(&[
            "--redis-sentinel",
            "a:1,b:2",
            "--redis-sentinel-master",
            "m",
        ]);
        a.validate().unwrap();
        assert!(a.enabled());
        assert_eq!(a.redis_sentinel, ["a:1", "b:2"]);
        let Some(BrokerSetup::Single(o)) = a.broker().unwrap() else {
            panic!("single mode through sentinel")
        };
        assert_eq!(o.sentinel.unwrap().master, "m");
    }

    #[test]
    fn cluster_mode_takes_seed_lists() {
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://10.0.0.1:7000, redis://10.0.0.2:7000",
            "--redis-hash-tag-separator",
            ".",
            "--redis-prefix",
            "p:",
        ]);
        let Some(BrokerSetup::Cluster(o)) = a.broker().unwrap() else {
            panic!("cluster mode")
        };
        assert_eq!(o.seeds, ["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]);
        assert_eq!(o.hash_tag_separator, Some(b'.'));
        assert_eq!(o.prefix, "p:");
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://a:1,http://b:2",
        ]);
        assert!(a.validate().unwrap_err().contains("redis://"));
        // A list is not a single URL, and the tag rule is cluster-only.
        let a = args(&["--redis-url", "redis://a:1,redis://b:2"]);
        a.validate().unwrap();
        assert!(a.broker().is_err(), "one URL, not a list, in single mode");
        let a = args(&["--redis-hash-tag-separator", "."]);
        assert!(a.validate().unwrap_err().contains("cluster"));
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "redis://a:1",
            "--redis-hash-tag-separator",
            "#",
        ]);
        assert!(a.validate().unwrap_err().contains("one of"));
        // TLS works in cluster mode as in single mode; Sentinel does not.
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-url",
            "rediss://10.0.0.1:7000,rediss://10.0.0.2:7000",
            "--redis-ca-file",
            "/etc/ca.pem",
        ]);
        a.validate().unwrap();
        let a = args(&[
            "--redis-mode",
            "cluster",
            "--redis-sentinel",
            "a:1",
            "--redis-sentinel-master",
            "m",
        ]);
        assert!(a.validate().unwrap_err().contains("sentinel"));
    }

    #[test]
    fn unreadable_files_name_the_flag() {
        let a = args(&[
            "--redis-url",
            "rediss://h:1/",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ]);
        let e = a.broker().unwrap_err();
        assert!(e.contains("--redis-ca-file /nonexistent/ca.pem"), "{e}");
    }
}
