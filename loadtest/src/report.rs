//! The JSON report: what a run measured, the math that turns raw counts into the
//! numbers people read (expected, lost, steady-window rates, percentiles), and the
//! merge of reports written by several generator processes that split one run.
//!
//! A report keeps its raw material (per-topic counts, one serialized HDR histogram
//! per second) so that merging is exact: percentiles of a merged run come from merged
//! histograms, never from averaged percentiles.

use std::collections::BTreeMap;
use std::ops::Range;

use anyhow::{Context as _, Result};
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::seq::SeqCounts;
use crate::stats::{new_hist, SecondAcc};
use crate::stream::StreamCounts;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Samples behind these numbers.
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Percentiles of a histogram recorded in microseconds.
    pub fn from_hist(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since t0.
    pub t: u32,
    /// Deliveries (fan-out) or completed connects (idle, churn) in this second.
    pub events: u64,
    /// Publications sent in this second.
    pub published: u64,
    /// Open connections at the end of this second.
    pub connections: u64,
    /// Latency of this second's events.
    pub latency: Latency,
    /// Server CPU in cores (summed over watched pids) during this second.
    pub server_cpu_cores: Option<f64>,
    /// Server resident memory (KiB, summed over watched pids).
    pub server_rss_kib: Option<u64>,
    /// The generator's own CPU in cores during this second.
    pub generator_cpu_cores: f64,
}

/// The steady window: seconds `[from_s, to_s)` of the measured phase.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Steady {
    pub from_s: u32,
    pub to_s: u32,
}

impl Steady {
    /// Excludes `warmup_s` at the start and `tail_s` at the end of a phase of
    /// `duration_s` seconds; falls back to the whole phase when nothing would remain.
    pub fn new(duration_s: u32, warmup_s: u32, tail_s: u32) -> Steady {
        let to = duration_s.saturating_sub(tail_s);
        if warmup_s < to {
            Steady {
                from_s: warmup_s,
                to_s: to,
            }
        } else {
            Steady {
                from_s: 0,
                to_s: duration_s.max(1),
            }
        }
    }

    /// The window as indices into the timeline.
    pub fn range(&self) -> Range<usize> {
        self.from_s as usize..self.to_s as usize
    }

    /// Its length in seconds.
    pub fn seconds(&self) -> u32 {
        self.to_s - self.from_s
    }
}

/// Fan-out (and slow-consumer) results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fanout {
    pub subscribers: u64,
    pub publishers: u64,
    pub topics: u64,
    pub payload_bytes: u64,
    /// Publications the generator sent.
    pub sent: u64,
    /// Publications the server acknowledged (WS `published`, HTTP 200, Redis reply,
    /// NATS PONG after the batch). Expected deliveries are computed from these.
    pub published: u64,
    pub publish_errors: u64,
    /// Sent but neither acknowledged nor refused when the run ended.
    pub unacked: u64,
    /// Σ over topics of acknowledged publications × subscribers of the topic.
    pub expected: u64,
    pub delivered: u64,
    pub unique: u64,
    /// `expected − unique` (never negative).
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub foreign: u64,
    /// Unique deliveries beyond the expected ones: publications that arrived although
    /// their acknowledgement did not (normally 0).
    pub extra: u64,
    pub deliveries_per_s_steady: f64,
    pub publishes_per_s_steady: f64,
    /// Latency over the steady window.
    pub latency: Latency,
    /// Latency over the whole run.
    pub latency_all: Latency,
    /// Worst delay of a publisher behind its schedule (fixed-rate runs).
    pub max_publish_lag_ms: f64,
    /// Subscribers that stopped reading (scenario `slow`).
    pub slow: Option<SlowGroup>,
    /// Stream topics: seq contiguity over the (reading) subscribers: `gaps`
    /// (stream_gaps), `dups` (stream_dups), `resets`. All zero on plain topics.
    #[serde(default)]
    pub streams: StreamCounts,
}

/// The subscribers that stopped reading, in scenario `slow`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlowGroup {
    pub subscribers: u64,
    /// Of them, how many the server disconnected (close frame or connection end).
    pub disconnected: u64,
    /// Close codes seen (`"4008"`, …; `"eof"` for a connection end without one).
    pub close_codes: BTreeMap<String, u64>,
    pub counts: SeqCounts,
}

/// Connection results (every scenario connects).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connect {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Failures by kind (`connect`, `handshake`, `subscribe`, `timeout`, …).
    pub failures: BTreeMap<String, u64>,
    /// Completed connections per second (ramp for idle, steady window for churn).
    pub rate_per_s: f64,
    /// Connect + WebSocket handshake (+ subscribe when asked) latency.
    pub latency: Latency,
    /// Upgrades refused with 503 `overloaded` (a node's `--upgrade-rate`) and retried
    /// after the server's hint: not failures.
    #[serde(default)]
    pub overloaded_retries: u64,
}

/// Idle results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Idle {
    pub held: u64,
    pub ramp_s: f64,
    pub hold_s: f64,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
    pub server_rss_per_connection_bytes: Option<f64>,
    /// Server CPU in cores while the connections sat idle.
    pub server_cpu_idle_cores: Option<f64>,
    pub generator_rss_per_connection_bytes: Option<f64>,
}

/// Scenario `resume-storm`: clients that all come back at once and resume their
/// streams with `since`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ResumeStorm {
    pub clients: u64,
    pub topics: u64,
    /// Publications made per topic while the clients were away.
    pub missed_per_topic: u64,
    /// Clients whose first subscribe failed (they take no part in the storm).
    pub failed_first_subscribe: u64,
    /// Seconds the first subscribe of every client took.
    pub subscribe_s: f64,
    /// The missed publications: how many, how long they took, at what rate.
    pub published: u64,
    pub publish_s: f64,
    pub publications_per_s: f64,
    /// Reconnects whose resubscribe was confirmed / that failed.
    pub reconnected: u64,
    pub reconnect_failed: u64,
    /// `recovered` in the resubscribe's reply: true / false (or missing).
    pub recovered: u64,
    pub not_recovered: u64,
    /// Replies in another epoch than the missed publications'.
    pub epoch_changed: u64,
    /// Clients that received every missed seq exactly once, in order.
    pub completed: u64,
    /// The others (not recovered, gap, dup, reset, or out of time).
    pub incomplete: u64,
    /// Missed messages owed to the reconnected clients, and messages they received.
    pub expected: u64,
    pub received: u64,
    /// Reconnect start → the last client complete (seconds); `None` unless all
    /// clients completed.
    pub completion_s: Option<f64>,
    /// Per client: reconnect start → last missed message received.
    pub completion: Latency,
    /// Per client: reconnect start → `subscribed` reply.
    pub subscribed: Latency,
    /// How long the storm phase lasted (all complete, or `--duration`).
    pub storm_s: f64,
    pub timed_out: bool,
    /// Seq contiguity over the storm clients.
    pub streams: StreamCounts,
    /// Reconnect failures and server closes by kind.
    pub failures: BTreeMap<String, u64>,
    /// The live topic, for "without stalling live traffic".
    pub live: Option<LiveCheck>,
    /// Every client complete, exactly, in time.
    pub ok: bool,
}

/// Live traffic to other clients during a resume storm.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LiveCheck {
    pub topic: String,
    pub subscribers: u64,
    /// Publications per second offered.
    pub rate: f64,
    /// Acknowledged live publications, expected deliveries, unique deliveries, lost.
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Latency while the storm clients sat subscribed (`--before`).
    pub before: Latency,
    /// While the missed publications were made.
    pub away: Latency,
    /// From the reconnect start until every client completed.
    pub during: Latency,
    /// The `--after` seconds that followed.
    pub after: Latency,
    /// When the live topic is a stream.
    pub streams: StreamCounts,
}

/// Scenario `scale`: connections held over many nodes, rooms and tickers, churn.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scale {
    pub nodes: u64,
    /// Connections in the whole run.
    pub connections: u64,
    pub rooms: u64,
    pub room_size: u64,
    /// Publications per second per room / per ticker.
    pub room_rate: f64,
    pub tickers: u64,
    pub ticker_rate: f64,
    /// Deliveries per second the schedule offers with every connection subscribed.
    pub offered_deliveries_per_s: f64,
    /// Connections open at the end of the publishing phase.
    pub held: u64,
    /// `--churn`: share of the connections closed and reopened per minute.
    pub churn_per_min: f64,
    /// Closes made by the generator (churn), each followed by a reconnect.
    pub churned: u64,
    /// Connections the server closed (then reopened), by close code.
    pub server_closed: BTreeMap<String, u64>,
    /// Reconnect attempts that failed (retried after 1 s).
    pub reconnect_failed: u64,
    /// Publications not owed to a connection: due while it was away (churn) or
    /// before its subscription was confirmed. Subtracted from `expected`.
    pub skipped: u64,
    /// Deliveries of publications that were not owed (arrived anyway); not unique.
    pub unowed: u64,
    /// A delivery slower than this is late.
    pub on_time_ms: f64,
    /// Deliveries slower than `on_time_ms`, over the whole run (to the histograms'
    /// precision, 0.1 %).
    pub late: u64,
    /// The generator processes' RSS growth over their ramps, and the connections
    /// they held then: their memory per connection.
    pub generator_rss_delta_kib: u64,
    pub generator_connections: u64,
    pub generator_rss_per_connection_bytes: Option<f64>,
    /// Length of the window the CPU figures below were measured over (the steady
    /// window of the process that watched the nodes and Redis).
    pub window_s: f64,
    /// CPU seconds over that window: every node, Redis, every generator process.
    pub nodes_cpu_s: f64,
    pub redis_cpu_s: f64,
    pub generator_cpu_s: f64,
    /// CPU seconds per million deliveries (steady window), each of the above.
    pub nodes_cpu_s_per_million: Option<f64>,
    pub redis_cpu_s_per_million: Option<f64>,
    pub generator_cpu_s_per_million: Option<f64>,
    /// Per node (`--server-pid`, in `--url` order).
    pub node_stats: Vec<NodeStat>,
}

/// One gateway node in a `scale` run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStat {
    pub pid: u32,
    /// Connections assigned to it.
    pub connections: u64,
    /// RSS before the ramp and at the end of the publishing phase.
    pub rss_before_kib: u64,
    pub rss_held_kib: u64,
    pub rss_per_connection_bytes: Option<f64>,
    /// CPU cores over the steady window.
    pub cpu_cores: f64,
}

/// What the generator itself cost (getrusage of this process).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Generator {
    pub processes: u32,
    pub threads: u32,
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    pub wall_s: f64,
    /// Average cores busy over the measured phase.
    pub cpu_cores: f64,
    /// The headline cost figure: CPU seconds per million deliveries (fan-out) or per
    /// million connects (idle, churn).
    pub cpu_s_per_million_events: Option<f64>,
    pub max_rss_kib: u64,
}

/// A watched server process (`--server-pid`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Server {
    pub pid: u32,
    pub name: String,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_max_kib: u64,
    /// CPU seconds used during the measured phase.
    pub cpu_s: f64,
    /// Average cores over the steady window.
    pub cpu_cores_steady: f64,
    /// CPU seconds per million events (deliveries or connects) over the whole phase.
    pub cpu_s_per_million_events: Option<f64>,
}

/// Raw material kept for exact merging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Raw {
    pub published_per_topic: Vec<u64>,
    pub subscribers_per_topic: Vec<u64>,
    pub counts: SeqCounts,
    /// One V2+deflate HDR histogram (µs) per second, base64.
    pub hist_seconds: Vec<String>,
    /// Fan-out only: the subscribers' connect latency histogram, likewise encoded.
    #[serde(default)]
    pub connect_hist: Option<String>,
}

/// A whole run report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub target: String,
    pub label: String,
    /// Command line of each generator process.
    pub commands: Vec<Vec<String>>,
    /// Start of second 0 (ms since the UNIX epoch).
    pub t0_unix_ms: u64,
    /// Length of the measured phase in seconds.
    pub duration_s: u32,
    /// Seconds excluded at the start and the end of the phase (`--warmup`, `--tail`).
    pub warmup_s: u32,
    pub tail_s: u32,
    pub steady: Steady,
    pub fanout: Option<Fanout>,
    pub connect: Connect,
    pub idle: Option<Idle>,
    /// Scenario `resume-storm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<ResumeStorm>,
    /// Scenario `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
    pub generator: Generator,
    pub servers: Vec<Server>,
    /// Selected samples scraped from `/metrics` at the end of the run.
    pub metrics: BTreeMap<String, f64>,
    /// Warnings a reader must see (generator saturated, failures, …).
    pub notes: Vec<String>,
    pub timeline: Vec<Second>,
    pub raw: Raw,
}

/// Serializes a histogram for [`Raw::hist_seconds`].
pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .expect("serializing into a Vec");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Reverses [`encode_hist`].
pub fn decode_hist(s: &str) -> Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .context("histogram is not base64")?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))?;
    let mut out = new_hist();
    out.add(&h).context("histogram bounds")?;
    Ok(out)
}

/// Σ over topics of publications × subscribers.
pub fn expected(published_per_topic: &[u64], subscribers_per_topic: &[u64]) -> u64 {
    published_per_topic
        .iter()
        .zip(subscribers_per_topic)
        .map(|(p, s)| p * s)
        .sum()
}

impl Report {
    /// Fills the timeline's events and histograms from the recorder's seconds.
    pub fn set_seconds(&mut self, seconds: &[SecondAcc]) {
        if self.timeline.len() < seconds.len() {
            self.timeline.resize_with(seconds.len(), Second::default);
        }
        self.raw.hist_seconds = seconds.iter().map(|s| encode_hist(&s.hist)).collect();
        for (i, s) in seconds.iter().enumerate() {
            self.timeline[i].events = s.events;
        }
    }

    /// Recomputes every derived number from the raw material and the timeline:
    /// percentiles per second and over the steady window, expected/lost, rates, costs.
    pub fn derive(&mut self) -> Result<()> {
        for (i, s) in self.timeline.iter_mut().enumerate() {
            s.t = i as u32;
        }
        let hists = self
            .raw
            .hist_seconds
            .iter()
            .map(|s| decode_hist(s))
            .collect::<Result<Vec<_>>>()?;
        let mut steady_hist = new_hist();
        let mut all_hist = new_hist();
        let range = self.steady.range();
        for (i, h) in hists.iter().enumerate() {
            if let Some(sec) = self.timeline.get_mut(i) {
                sec.latency = Latency::from_hist(h);
            }
            all_hist.add(h)?;
            if range.contains(&i) {
                steady_hist.add(h)?;
            }
        }
        let secs = f64::from(self.steady.seconds().max(1));
        let steady_sum = |f: fn(&Second) -> u64| -> u64 {
            self.timeline
                .get(range.clone())
                .unwrap_or(&[])
                .iter()
                .map(f)
                .sum()
        };
        let steady_events = steady_sum(|s| s.events);
        let steady_published = steady_sum(|s| s.published);
        let total_events: u64 = self.timeline.iter().map(|s| s.events).sum();

        if let Some(f) = self.fanout.as_mut() {
            let c = &self.raw.counts;
            f.expected = expected(
                &self.raw.published_per_topic,
                &self.raw.subscribers_per_topic,
            );
            f.published = self.raw.published_per_topic.iter().sum();
            f.delivered = c.delivered;
            f.unique = c.unique;
            f.duplicated = c.duplicated;
            f.reordered = c.reordered;
            f.foreign = c.foreign;
            f.lost = f.expected.saturating_sub(c.unique);
            f.extra = c.unique.saturating_sub(f.expected);
            f.deliveries_per_s_steady = steady_events as f64 / secs;
            f.publishes_per_s_steady = steady_published as f64 / secs;
            f.latency = Latency::from_hist(&steady_hist);
            f.latency_all = Latency::from_hist(&all_hist);
        } else if self.resume.is_none() {
            self.connect.latency = Latency::from_hist(&all_hist);
        }

        if let Some(sc) = self.scale.as_mut() {
            let on_time_us = (sc.on_time_ms * 1000.0) as u64;
            sc.late = all_hist.len() - all_hist.count_between(0, on_time_us);
            sc.generator_rss_per_connection_bytes = (sc.generator_connections > 0).then(|| {
                sc.generator_rss_delta_kib as f64 * 1024.0 / sc.generator_connections as f64
            });
            if let Some(f) = self.fanout.as_mut() {
                // What churned connections were not owed.
                f.expected = f.expected.saturating_sub(sc.skipped);
                f.lost = f.expected.saturating_sub(f.unique);
                f.extra = f.unique.saturating_sub(f.expected);
                let deliveries = f.deliveries_per_s_steady * sc.window_s;
                let per_m = |cpu: f64| (deliveries > 0.0).then(|| cpu / deliveries * 1e6);
                sc.nodes_cpu_s_per_million = per_m(sc.nodes_cpu_s);
                sc.redis_cpu_s_per_million = per_m(sc.redis_cpu_s);
                sc.generator_cpu_s_per_million = per_m(sc.generator_cpu_s);
            }
        }
        let g = &mut self.generator;
        let cpu = g.cpu_user_s + g.cpu_sys_s;
        g.cpu_cores = if g.wall_s > 0.0 { cpu / g.wall_s } else { 0.0 };
        g.cpu_s_per_million_events = per_million(cpu, total_events);
        for s in &mut self.servers {
            s.cpu_s_per_million_events = per_million(s.cpu_s, total_events);
        }
        Ok(())
    }

    /// Merges reports of generator processes that split one run (`--split k/n`).
    /// Counts add up, histograms merge second by second (aligned on t0), the servers
    /// are those of the first report (every process watched the same ones).
    pub fn merge(mut parts: Vec<Report>) -> Result<Report> {
        anyhow::ensure!(!parts.is_empty(), "nothing to merge");
        parts.sort_by_key(|r| r.t0_unix_ms);
        let mut out = parts[0].clone();
        out.notes.clear();
        out.commands.clear();
        out.timeline.clear();
        out.raw = Raw::default();
        out.connect = Connect::default();
        out.generator = Generator::default();
        out.metrics.clear();
        let mut hists: Vec<Histogram<u64>> = Vec::new();
        let mut connect_hist: Option<Histogram<u64>> = None;
        let (mut from, mut to) = (0u32, u32::MAX);
        for (n, r) in parts.iter().enumerate() {
            anyhow::ensure!(
                r.scenario == out.scenario,
                "cannot merge scenario {} with {}",
                r.scenario,
                out.scenario
            );
            let shift = ((r.t0_unix_ms - out.t0_unix_ms) as f64 / 1000.0).round() as usize;
            for (i, s) in r.timeline.iter().enumerate() {
                let j = i + shift;
                if out.timeline.len() <= j {
                    out.timeline.resize_with(j + 1, Second::default);
                }
                let o = &mut out.timeline[j];
                o.events += s.events;
                o.published += s.published;
                o.connections += s.connections;
                o.generator_cpu_cores += s.generator_cpu_cores;
                o.server_cpu_cores = max_opt(o.server_cpu_cores, s.server_cpu_cores);
                o.server_rss_kib = o.server_rss_kib.max(s.server_rss_kib);
            }
            for (i, h) in r.raw.hist_seconds.iter().enumerate() {
                let j = i + shift;
                if hists.len() <= j {
                    hists.resize_with(j + 1, new_hist);
                }
                hists[j].add(decode_hist(h)?)?;
            }
            add_vec(&mut out.raw.published_per_topic, &r.raw.published_per_topic);
            add_vec(
                &mut out.raw.subscribers_per_topic,
                &r.raw.subscribers_per_topic,
            );
            out.raw.counts.add(&r.raw.counts);
            if let Some(h) = &r.raw.connect_hist {
                connect_hist
                    .get_or_insert_with(new_hist)
                    .add(decode_hist(h)?)?;
            }
            merge_connect(&mut out.connect, &r.connect);
            merge_generator(&mut out.generator, &r.generator);
            out.commands.extend(r.commands.iter().cloned());
            for n in &r.notes {
                if !out.notes.contains(n) {
                    out.notes.push(n.clone());
                }
            }
            out.duration_s = out.duration_s.max(r.duration_s + shift as u32);
            // The steady window of the whole is where every process was steady.
            from = from.max(r.steady.from_s + shift as u32);
            to = to.min(r.steady.to_s + shift as u32);
            if n > 0 {
                if let (Some(o), Some(f)) = (out.fanout.as_mut(), r.fanout.as_ref()) {
                    merge_fanout(o, f);
                }
                if let (Some(o), Some(i)) = (out.idle.as_mut(), r.idle.as_ref()) {
                    merge_idle(o, i);
                }
                if let (Some(o), Some(s)) = (out.scale.as_mut(), r.scale.as_ref()) {
                    merge_scale(o, s);
                }
                // The servers are those of the process that watched them.
                if out.servers.is_empty() {
                    out.servers = r.servers.clone();
                }
            }
            for (k, v) in &r.metrics {
                out.metrics.entry(k.clone()).or_insert(*v);
            }
        }
        out.raw.hist_seconds = hists.iter().map(encode_hist).collect();
        if let Some(h) = connect_hist {
            out.connect.latency = Latency::from_hist(&h);
            out.raw.connect_hist = Some(encode_hist(&h));
        }
        out.steady = if from < to {
            Steady {
                from_s: from,
                to_s: to,
            }
        } else {
            out.notes
                .push("the processes' steady windows do not overlap".into());
            Steady::new(out.duration_s, 0, 0)
        };
        out.derive()?;
        Ok(out)
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn per_million(cpu_s: f64, events: u64) -> Option<f64> {
    (events > 0).then(|| cpu_s / (events as f64 / 1e6))
}

fn add_vec(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

fn merge_connect(o: &mut Connect, c: &Connect) {
    o.attempted += c.attempted;
    o.succeeded += c.succeeded;
    o.failed += c.failed;
    o.overloaded_retries += c.overloaded_retries;
    o.rate_per_s += c.rate_per_s;
    for (k, v) in &c.failures {
        *o.failures.entry(k.clone()).or_default() += v;
    }
}

fn merge_generator(o: &mut Generator, g: &Generator) {
    o.processes += g.processes.max(1);
    o.threads += g.threads;
    o.cpu_user_s += g.cpu_user_s;
    o.cpu_sys_s += g.cpu_sys_s;
    o.wall_s = o.wall_s.max(g.wall_s);
    o.max_rss_kib += g.max_rss_kib;
}

fn merge_fanout(o: &mut Fanout, f: &Fanout) {
    o.subscribers += f.subscribers;
    o.sent += f.sent;
    o.publish_errors += f.publish_errors;
    o.unacked += f.unacked;
    o.max_publish_lag_ms = o.max_publish_lag_ms.max(f.max_publish_lag_ms);
    o.streams.add(&f.streams);
    if let (Some(os), Some(fs)) = (o.slow.as_mut(), f.slow.as_ref()) {
        os.subscribers += fs.subscribers;
        os.disconnected += fs.disconnected;
        os.counts.add(&fs.counts);
        for (k, v) in &fs.close_codes {
            *os.close_codes.entry(k.clone()).or_default() += v;
        }
    }
}

fn merge_scale(o: &mut Scale, s: &Scale) {
    o.held += s.held;
    o.churned += s.churned;
    o.reconnect_failed += s.reconnect_failed;
    o.skipped += s.skipped;
    o.unowed += s.unowed;
    o.generator_rss_delta_kib += s.generator_rss_delta_kib;
    o.generator_connections += s.generator_connections;
    o.generator_cpu_s += s.generator_cpu_s;
    for (k, v) in &s.server_closed {
        *o.server_closed.entry(k.clone()).or_default() += v;
    }
    // Nodes and Redis: measured by one process (the one given their pids).
    if o.node_stats.is_empty() && !s.node_stats.is_empty() {
        o.node_stats = s.node_stats.clone();
        o.nodes_cpu_s = s.nodes_cpu_s;
    }
    if o.window_s == 0.0 && s.window_s > 0.0 {
        o.window_s = s.window_s;
        o.nodes_cpu_s = s.nodes_cpu_s;
        o.redis_cpu_s = s.redis_cpu_s;
    }
}

fn merge_idle(o: &mut Idle, i: &Idle) {
    o.held += i.held;
    o.ramp_s = o.ramp_s.max(i.ramp_s);
    o.server_rss_before_kib = o.server_rss_before_kib.min(i.server_rss_before_kib);
    o.server_rss_after_kib = o.server_rss_after_kib.max(i.server_rss_after_kib);
    if let (Some(b), Some(a)) = (o.server_rss_before_kib, o.server_rss_after_kib) {
        o.server_rss_per_connection_bytes =
            (o.held > 0).then(|| a.saturating_sub(b) as f64 * 1024.0 / o.held as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(values: &[u64]) -> Histogram<u64> {
        let mut h = new_hist();
        for v in values {
            h.record(*v).unwrap();
        }
        h
    }

    #[test]
    fn steady_window_excludes_warmup_and_tail() {
        assert_eq!(
            Steady::new(20, 3, 2),
            Steady {
                from_s: 3,
                to_s: 18
            }
        );
        assert_eq!(Steady::new(20, 3, 2).seconds(), 15);
        // Nothing would remain: fall back to the whole phase.
        assert_eq!(Steady::new(4, 3, 2), Steady { from_s: 0, to_s: 4 });
    }

    #[test]
    fn percentiles_come_from_the_histogram() {
        let values: Vec<u64> = (1..=1000).collect();
        let l = Latency::from_hist(&hist_of(&values));
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 0.5).abs() < 0.001, "{l:?}");
        assert!((l.p99_ms - 0.99).abs() < 0.001, "{l:?}");
        assert!((l.max_ms - 1.0).abs() < 0.001, "{l:?}");
        assert_eq!(Latency::from_hist(&new_hist()), Latency::default());
    }

    #[test]
    fn histograms_round_trip() {
        let h = hist_of(&[1, 5, 5, 80_000, 1_000_000]);
        let back = decode_hist(&encode_hist(&h)).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
    }

    fn fanout_report(
        t0: u64,
        events: &[u64],
        lat_us: u64,
        published: Vec<u64>,
        subs: Vec<u64>,
        counts: SeqCounts,
    ) -> Report {
        let mut r = Report {
            scenario: "fanout".into(),
            t0_unix_ms: t0,
            duration_s: events.len() as u32,
            steady: Steady::new(events.len() as u32, 1, 1),
            fanout: Some(Fanout::default()),
            ..Report::default()
        };
        let seconds: Vec<SecondAcc> = events
            .iter()
            .map(|e| SecondAcc {
                events: *e,
                hist: hist_of(&vec![lat_us; *e as usize]),
            })
            .collect();
        r.set_seconds(&seconds);
        r.raw.published_per_topic = published;
        r.raw.subscribers_per_topic = subs;
        r.raw.counts = counts;
        r.generator = Generator {
            processes: 1,
            cpu_user_s: 1.0,
            cpu_sys_s: 1.0,
            wall_s: 4.0,
            ..Generator::default()
        };
        r.derive().unwrap();
        r
    }

    #[test]
    fn lost_expected_and_steady_rate() {
        let counts = SeqCounts {
            delivered: 33,
            unique: 30,
            duplicated: 3,
            ..SeqCounts::default()
        };
        // 2 topics: 10 publications × 2 subscribers + 4 × 3 = 32 expected.
        let r = fanout_report(
            0,
            &[100, 10, 20, 500],
            1000,
            vec![10, 4],
            vec![2, 3],
            counts,
        );
        let f = r.fanout.as_ref().unwrap();
        assert_eq!(f.expected, 32);
        assert_eq!(f.lost, 2);
        assert_eq!(f.duplicated, 3);
        assert_eq!(f.extra, 0);
        // Steady window is seconds 1 and 2.
        assert_eq!(f.deliveries_per_s_steady, 15.0);
        assert_eq!(f.latency.count, 30);
        assert_eq!(f.latency_all.count, 630);
        assert_eq!(r.generator.cpu_cores, 0.5);
        let per_m = r.generator.cpu_s_per_million_events.unwrap();
        assert!((per_m - 2.0 / 630.0 * 1e6).abs() < 1e-6);
    }

    #[test]
    fn scale_parts_merge_with_churn_and_late_accounted() {
        let c = |u| SeqCounts {
            delivered: u,
            unique: u,
            ..SeqCounts::default()
        };
        let part = |t0, lat_us, watcher: bool| {
            // Each part publishes 5 to the one topic and has 2 subscribers, which
            // receive both parts' 10 publications, but for 3 one of them was away
            // (skipped).
            let mut r = fanout_report(t0, &[0, 5, 4, 8], lat_us, vec![5], vec![2], c(17));
            r.scenario = "scale".into();
            r.scale = Some(Scale {
                held: 100,
                skipped: 3,
                on_time_ms: 1.0,
                generator_rss_delta_kib: 100,
                generator_connections: 100,
                generator_cpu_s: 0.5,
                window_s: if watcher { 2.0 } else { 0.0 },
                nodes_cpu_s: if watcher { 3.0 } else { 0.0 },
                node_stats: if watcher {
                    vec![NodeStat::default(); 2]
                } else {
                    Vec::new()
                },
                ..Scale::default()
            });
            if watcher {
                r.servers = vec![Server::default(); 2];
            }
            r.derive().unwrap();
            r
        };
        let a = part(10_000, 500, false);
        assert_eq!(a.fanout.as_ref().unwrap().expected, 7);
        assert_eq!(a.scale.as_ref().unwrap().late, 0);
        // The watcher's deliveries are slower than --on-time.
        let b = part(11_000, 2000, true);
        assert_eq!(b.scale.as_ref().unwrap().late, 17);
        let m = Report::merge(vec![a, b]).unwrap();
        let (f, s) = (m.fanout.as_ref().unwrap(), m.scale.as_ref().unwrap());
        assert_eq!(f.expected, (5 + 5) * (2 + 2) - 6);
        assert_eq!(f.unique, 34);
        assert_eq!(f.lost, 0);
        assert_eq!(s.held, 200);
        assert_eq!(s.late, 17);
        assert_eq!(s.generator_rss_per_connection_bytes, Some(1024.0));
        // Nodes and servers come from the process that watched them.
        assert_eq!(s.node_stats.len(), 2);
        assert_eq!(m.servers.len(), 2);
        assert_eq!(s.window_s, 2.0);
        // Timelines add up second by second, aligned on t0.
        assert_eq!(
            m.timeline.iter().map(|x| x.events).collect::<Vec<_>>(),
            [0, 5, 4 + 5, 8 + 4, 8]
        );
        let per_m = s.nodes_cpu_s_per_million.unwrap();
        assert!((per_m - 3.0 / (f.deliveries_per_s_steady * 2.0) * 1e6).abs() < 1e-6);
    }

    #[test]
    fn merge_aligns_seconds_and_adds_counts() {
        let c = |u| SeqCounts {
            delivered: u,
            unique: u,
            ..SeqCounts::default()
        };
        let a = fanout_report(10_000, &[10, 10, 10, 10], 500, vec![5], vec![1], c(5));
        // Second process started one second later and saw the other subscriber.
        let b = fanout_report(11_000, &[10, 10, 10, 10], 2000, vec![0], vec![1], c(5));
        let m = Report::merge(vec![b, a]).unwrap();
        let f = m.fanout.as_ref().unwrap();
        assert_eq!(m.timeline.len(), 5);
        assert_eq!(
            m.timeline.iter().map(|s| s.events).collect::<Vec<_>>(),
            [10, 20, 20, 20, 10]
        );
        assert_eq!(f.expected, 10);
        assert_eq!(f.unique, 10);
        assert_eq!(f.lost, 0);
        assert_eq!(m.generator.processes, 2);
        assert_eq!(m.timeline[0].latency.count, 10);
        assert_eq!(m.timeline[1].latency.count, 20);
        // a is steady over [1,3), b over [2,4): together [2,3).
        assert_eq!(m.steady, Steady { from_s: 2, to_s: 3 });
        assert_eq!(f.deliveries_per_s_steady, 20.0);
    }
}
