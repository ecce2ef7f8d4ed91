//! Command-line interface: one subcommand per scenario, plus `merge`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::proto::Target;

/// Drives wsgate (or a peer server) at scale and reports what really happened.
#[derive(Debug, Parser)]
#[command(name = "wsgate-loadtest", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// S subscribers over T topics, P publishers at a fixed rate or open loop.
    Fanout(FanoutArgs),
    /// Fan-out where a share of the subscribers stops reading.
    Slow(SlowArgs),
    /// Ramp to N connections and hold them idle: connect rate, server memory and CPU.
    Idle(IdleArgs),
    /// Connect / subscribe / disconnect storms at a rate.
    Churn(ChurnArgs),
    /// Clients subscribed to streams all disconnect, miss publications, and come
    /// back at once with `since`: completion time, exactness, live traffic meanwhile.
    ResumeStorm(ResumeStormArgs),
    /// Scale-out: many connections over many nodes (`--url` lists them), each in a
    /// room of `--room-size` and on one of `--tickers`; rooms and tickers published
    /// over HTTP on other nodes than their subscribers'; churn; held and measured.
    Scale(ScaleArgs),
    /// Merge the JSON reports of generator processes that split one run.
    Merge(MergeArgs),
    /// Print a Markdown table comparing reports (grouped by --label).
    Table(TableArgs),
    /// No server: what the same fan-out costs the kernel alone (plain threads writing
    /// frames into loopback sockets, epoll readers): the yardstick for any server here.
    Floor(crate::floor::FloorArgs),
    /// No server: what holding N idle connections with heartbeats costs the kernel
    /// alone (one thread pinging from a wheel and reading pongs; clients in a child
    /// process): the yardstick for a server's idle CPU here.
    FloorIdle(crate::floor_idle::FloorIdleArgs),
    /// The verdict and plot of a soak (`loadtest/soak.sh`): leaks, deaths, loss.
    SoakReport(crate::soak::SoakArgs),
}

/// Which of the run's subscribers, publishers or connections this process takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub k: usize,
    pub n: usize,
}

impl Split {
    /// Whether global index `i` belongs to this process.
    pub fn owns(&self, i: usize) -> bool {
        i % self.n == self.k
    }

    /// How many of `total` indices belong to this process.
    pub fn share(&self, total: usize) -> usize {
        (0..total).filter(|i| self.owns(*i)).count()
    }
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (k, n) = s.split_once('/').ok_or("expected K/N, e.g. 0/2")?;
        let k: usize = k.parse().map_err(|_| "K is not a number")?;
        let n: usize = n.parse().map_err(|_| "N is not a number")?;
        if n == 0 || k >= n {
            return Err("need 0 <= K < N".into());
        }
        Ok(Split { k, n })
    }
}

pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Options every scenario shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Protocol flavour of the server.
    #[arg(
        long,
        value_enum,
        default_value = "wsgate",
        env = "WSGATE_LOADTEST_TARGET"
    )]
    pub target: Target,
    /// WebSocket URL(s) that subscribers (idle/churn: all connections) use, round-robin.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/ws",
        env = "WSGATE_LOADTEST_URL"
    )]
    pub url: Vec<String>,
    /// Source addresses to spread connections over: `127.0.0.2-127.0.0.9` or a list.
    #[arg(long, env = "WSGATE_LOADTEST_SOURCE_ADDRS")]
    pub source_addrs: Option<String>,
    /// Length of the measured phase (fanout/slow: publishing; churn: the storm;
    /// idle: the hold after the ramp).
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub duration: Duration,
    /// Seconds excluded from the steady window at the start of the phase.
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub warmup: Duration,
    /// Seconds excluded from the steady window at the end of the phase.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub tail: Duration,
    /// This process's part of a run split over N processes (K from 0).
    #[arg(long, default_value = "0/1")]
    pub split: Split,
    /// Start the measured phase at this UNIX time in ms (all split processes alike).
    #[arg(long)]
    pub start_at: Option<u64>,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Connections opened per second while ramping (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connection attempts in flight at once while ramping.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Give up on a connect + handshake + subscribe after this long.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub connect_timeout: Duration,
    /// Topic names are this prefix followed by the topic index. Default: `lt.<run>.`
    /// with a run id from `--start-at` (so split processes agree) or random, so that
    /// a backlog left in a server by an earlier run never reaches this run's
    /// subscribers.
    #[arg(long)]
    pub topic_prefix: Option<String>,
    /// Server process(es) to watch through /proc (CPU, RSS).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Prometheus page(s) scraped at the end (e.g. http://127.0.0.1:9090/metrics).
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
    /// Keep only metrics whose name starts with this.
    #[arg(long, default_value = "wsgate_")]
    pub metrics_prefix: String,
    /// Write the JSON report here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a PNG chart (throughput and latency percentiles over time) here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// A name for this run in reports and charts.
    #[arg(long, default_value = "")]
    pub label: String,
    /// No progress bars (they are hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Offer permessage-deflate (RFC 7692) in every handshake and inflate compressed
    /// messages, as browsers do.
    #[arg(long)]
    pub compression: bool,
    /// Pad payloads with varied quote-like text instead of `x` (compresses like
    /// typical JSON; for comparing compression).
    #[arg(long)]
    pub pad_text: bool,
}

/// How publications reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// `publish` commands over WebSocket (NATS: `PUB`).
    Ws,
    /// `POST /api/publish`.
    Http,
    /// `PUBLISH <prefix><topic>` straight into Redis.
    Redis,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Subscribers in the whole run (split processes share them).
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Topics; subscriber i takes topic i mod T, publisher j publishes to j mod T.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Publishers in the whole run.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Publications per second over all publishers (0: open loop, as fast as the
    /// server acknowledges, bounded by --max-inflight per publisher).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Size in bytes of each publication's `data` object.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How publications reach the server.
    #[arg(long, value_enum, default_value = "ws")]
    pub publish_via: PublishVia,
    /// WebSocket URL(s) publishers use (default: --url); point at another node to
    /// measure the cross-node path.
    #[arg(long, value_delimiter = ',')]
    pub pub_url: Vec<String>,
    /// HTTP publish API URL(s) (default: derived from --pub-url, path /api/publish).
    #[arg(long, value_delimiter = ',')]
    pub http_url: Vec<String>,
    /// Publications per HTTP request (more than 1 sends a JSON array).
    #[arg(long, default_value_t = 1)]
    pub http_batch: usize,
    /// Bearer key for the HTTP publish API.
    #[arg(long, env = "WSGATE_API_KEY")]
    pub api_key: Option<String>,
    /// Redis for --publish-via redis.
    #[arg(
        long,
        default_value = "redis://127.0.0.1:6379",
        env = "WSGATE_REDIS_URL"
    )]
    pub redis_url: String,
    /// Channel prefix the servers subscribe with.
    #[arg(long, default_value = "wsgate:")]
    pub redis_prefix: String,
    /// With --publish-via redis: publish as a backend publishes into a stream,
    /// `FCALL wsgate_publish 1 <prefix><topic> <payload>`, instead of `PUBLISH`
    /// (which a gateway does not deliver on a stream topic).
    #[arg(long)]
    pub redis_fcall: bool,
    /// Unacknowledged publications allowed per publisher.
    #[arg(long, default_value_t = 1024)]
    pub max_inflight: usize,
    /// Most publications written at once by one publisher.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// After publishing stops, wait for the last deliveries: until none arrived for
    /// 1 s, at most this long. What has not arrived by then counts as lost.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub drain: Duration,
    /// Subscribers read Server-Sent Events (`GET /sse?topics=…` on their --url's
    /// node) instead of WebSockets; publishers are unchanged.
    #[arg(long)]
    pub sse: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SlowArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// Share of subscribers that stop reading.
    #[arg(long, default_value_t = 0.1)]
    pub slow_share: f64,
    /// When (after publishing starts) they stop reading.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub slow_after: Duration,
    /// Receive buffer of the slow subscribers' sockets, so that the server feels
    /// their backpressure within the run rather than after megabytes.
    #[arg(long, default_value_t = 4096)]
    pub slow_rcvbuf: u32,
    /// Slow subscribers subscribe to every topic (the others to one each), so each
    /// receives the whole publication stream and fills the server's buffers fast.
    #[arg(long)]
    pub slow_all_topics: bool,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections in the whole run.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Subscribe each connection to one of this many topics (0: no subscribe).
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
    /// Pause between the end of the ramp and the idle measurement.
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub settle: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connect-subscribe-disconnect cycles per second (0: as fast as possible).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Cycles in flight at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Each cycle subscribes to one of this many topics (0: no subscribe).
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ResumeStormArgs {
    /// Common options. `--duration` is the time the storm is given to complete
    /// (from the reconnect start); `--topic-prefix` must name stream topics.
    #[command(flatten)]
    pub common: Common,
    /// Clients that subscribe, leave, and all come back at once.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Stream topics; client i takes topic i mod T (names: prefix + index).
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Publications made per topic while the clients are away.
    #[arg(long, default_value_t = 1000)]
    pub missed: usize,
    /// Size in bytes of each publication's `data` object.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// How the missed publications are made (http: `--http-batch` per request; ws:
    /// batches of 64 commands). The live topic is always published over WebSocket.
    #[arg(long, value_enum, default_value = "http")]
    pub publish_via: PublishVia,
    /// Publications per HTTP request.
    #[arg(long, default_value_t = 100)]
    pub http_batch: usize,
    /// WebSocket URL(s) of the publishers (default: --url).
    #[arg(long, value_delimiter = ',')]
    pub pub_url: Vec<String>,
    /// HTTP publish API URL (default: derived from --pub-url, path /api/publish).
    #[arg(long, value_delimiter = ',')]
    pub http_url: Vec<String>,
    /// Bearer key for the HTTP publish API.
    #[arg(long, env = "WSGATE_API_KEY")]
    pub api_key: Option<String>,
    /// Reconnects in flight at once during the storm (0: all the clients).
    #[arg(long, default_value_t = 0)]
    pub storm_concurrency: usize,
    /// Subscribers of a separate live topic (0: no live traffic).
    #[arg(long, default_value_t = 0)]
    pub live_subscribers: usize,
    /// Publications per second on the live topic, over the whole run.
    #[arg(long, default_value_t = 50.0)]
    pub live_rate: f64,
    /// The live topic (default: the topic prefix followed by `live`).
    #[arg(long)]
    pub live_topic: Option<String>,
    /// How long live latency is measured with the clients subscribed, before they
    /// leave (the baseline).
    #[arg(long, value_parser = duration, default_value = "3s")]
    pub before: Duration,
    /// After the storm: how long clients keep reading (late duplicates count) and
    /// live latency is measured.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub after: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Common options. `--url` lists the nodes (connection i goes to node i mod N);
    /// `--duration` is the publishing phase; `--start-at` its start (all split
    /// processes alike: each ramps its connections first).
    #[command(flatten)]
    pub common: Common,
    /// Connections in the whole run (split processes share them: i mod N = K).
    #[arg(long, default_value_t = 2000)]
    pub connections: usize,
    /// Members per room: connection i is in room i / room-size, so a room's members
    /// sit on consecutive nodes.
    #[arg(long, default_value_t = 10)]
    pub room_size: usize,
    /// Publications per second to each room.
    #[arg(long, default_value_t = 0.01)]
    pub room_rate: f64,
    /// Tickers: connection i also takes ticker i mod T, so the tickers reach everyone
    /// (0: rooms only).
    #[arg(long, default_value_t = 10)]
    pub tickers: usize,
    /// Publications per second to each ticker.
    #[arg(long, default_value_t = 0.05)]
    pub ticker_rate: f64,
    /// Size in bytes of each publication's `data` object.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Connections closed and opened again per minute, as a share of all of them
    /// (0.015: 1.5 % a minute), during the publishing phase.
    #[arg(long, default_value_t = 0.015)]
    pub churn: f64,
    /// A delivery that took longer than this is late.
    #[arg(long, value_parser = duration, default_value = "500ms")]
    pub on_time: Duration,
    /// Most publications per HTTP request (`POST /api/publish` with an array).
    #[arg(long, default_value_t = 500)]
    pub http_batch: usize,
    /// Bearer key for the HTTP publish API.
    #[arg(long, env = "WSGATE_API_KEY")]
    pub api_key: Option<String>,
    /// Redis process(es) whose CPU is measured over the steady window.
    #[arg(long, value_delimiter = ',')]
    pub redis_pid: Vec<u32>,
    /// Without --start-at: pause between the end of the ramp and publishing.
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub settle: Duration,
    /// After publishing stops, wait for the last deliveries: until none arrived for
    /// 1 s, at most this long.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub drain: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// Reports to merge.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct TableArgs {
    /// Reports to compare.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parses_and_partitions() {
        let s: Split = "1/3".parse().unwrap();
        assert!(s.owns(1) && s.owns(4) && !s.owns(0));
        assert_eq!(s.share(10), 3);
        assert!("3/3".parse::<Split>().is_err());
        assert!("x".parse::<Split>().is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
