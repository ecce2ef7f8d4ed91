//! Scenario `scale`: many connections held over many nodes, a realistic mix of topics,
//! publishers on other nodes than the subscribers, churn.
//!
//! # The mix
//! Connection i goes to node `i mod N` (the `--url` list). It subscribes to its room,
//! `i / room_size` (so the members of a room sit on consecutive, different nodes), and
//! to ticker `(i / N) mod T` (so every node holds subscribers of every ticker). Topic
//! ids: rooms `0..R`, tickers `R..R+T`; names `<prefix>room.<r>` and
//! `<prefix>ticker.<t>`.
//!
//! # Publishing
//! Every topic is published over HTTP (`POST /api/publish`, an array per request)
//! through one node: a room through the node after its last member's (none of its
//! members is there when there are more nodes than members), a ticker through node
//! `t mod N`. The topics of a class (rooms, tickers) are shared among the split
//! processes (class index `j mod n`). Seq `s` of the topic with class index `j` of a
//! class of `C` topics is due `(s + j / C) / rate` s after the start: the topics of a
//! class take turns, evenly spread over each period, so the class as a whole is one
//! evenly spaced stream (10 tickers at 0.05/s: one ticker publication every 2 s, not
//! all ten at once every 20 s). Every process can therefore compute when any seq of
//! any topic is due; each publishes its topics in that order.
//!
//! # Accounting with churn
//! A subscription confirmed at T is owed every publication due after T (sent at or
//! after its due time, so accepted after the subscription was confirmed). When a
//! connection (re)subscribes, the seqs from the highest it has seen + 1 up to the
//! first one due after T are not owed (`skipped`: it was away, or not yet
//! subscribed); those that arrive anyway count as `unowed`, not as unique. So
//! `expected = Σ published × subscribers − skipped` and `lost = expected − unique`
//! stay exact under churn.
//!
//! # Per connection
//! One task per connection, holding the socket and a few hundred bytes: the read
//! buffer is released whenever it holds no partial frame (`WsConn::release`), so an
//! idle connection holds no buffer; sequence windows for its two topics; latency
//! samples go to the shared timeline after each read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::session;
use crate::cli::{ScaleArgs, Split};
use crate::http::HttpConn;
use crate::net::{Failure, Url};
use crate::payload::{self, Stamp};
use crate::report::{Connect, Fanout, Latency, NodeStat, Report, Scale, Steady};
use crate::run::{self, pace, Ctx, Monitor};
use crate::seq::SeqCounts;
use crate::stats::{new_hist, now_ns, LocalRecorder};
use crate::sysmon;
use crate::wsconn::{WsConn, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};

/// The run's topology and schedule, the same in every split process.
#[derive(Debug, Clone)]
pub struct Mix {
    pub connections: usize,
    pub nodes: usize,
    pub room_size: usize,
    pub rooms: usize,
    pub tickers: usize,
    pub room_rate: f64,
    pub ticker_rate: f64,
    pub split: Split,
}

impl Mix {
    pub fn new(a: &ScaleArgs, nodes: usize, split: Split) -> Mix {
        let room_size = a.room_size.max(1);
        Mix {
            connections: a.connections,
            nodes: nodes.max(1),
            room_size,
            rooms: a.connections.div_ceil(room_size),
            tickers: a.tickers,
            room_rate: a.room_rate,
            ticker_rate: a.ticker_rate,
            split,
        }
    }

    /// Rooms and tickers.
    pub fn topics(&self) -> usize {
        self.rooms + self.tickers
    }

    /// The node connection `i` connects to.
    pub fn node_of(&self, i: usize) -> usize {
        i % self.nodes
    }

    /// The topic ids connection `i` subscribes to: its room, then its ticker.
    pub fn topics_of(&self, i: usize) -> Vec<u32> {
        let mut t = vec![(i / self.room_size) as u32];
        if self.tickers > 0 {
            t.push((self.rooms + (i / self.nodes) % self.tickers) as u32);
        }
        t
    }

    /// The node topic `x` is published through.
    pub fn pub_node(&self, x: u32) -> usize {
        let x = x as usize;
        if x < self.rooms {
            ((x + 1) * self.room_size) % self.nodes
        } else {
            (x - self.rooms) % self.nodes
        }
    }

    /// The topic's name after the run's prefix.
    pub fn name(&self, x: u32) -> String {
        let x = x as usize;
        if x < self.rooms {
            format!("room.{x}")
        } else {
            format!("ticker.{}", x - self.rooms)
        }
    }

    /// Class of topic `x`: (index in the class, topics in the class, rate per topic).
    fn class(&self, x: u32) -> (usize, usize, f64) {
        let x = x as usize;
        if x < self.rooms {
            (x, self.rooms, self.room_rate)
        } else {
            (x - self.rooms, self.tickers, self.ticker_rate)
        }
    }

    /// When seq `s` of the topic with class index `j` (of `count`) at `rate` is due,
    /// in ns after the start. The one formula publishers and subscribers share.
    fn class_due_ns(j: usize, count: usize, s: u64, rate: f64) -> u64 {
        ((s as f64 + j as f64 / count as f64) * 1e9 / rate) as u64
    }

    /// When seq `s` of topic `x` is due (ns after the start); `None` if never.
    pub fn due_ns(&self, x: u32, s: u64) -> Option<u64> {
        let (j, count, rate) = self.class(x);
        (rate > 0.0).then(|| Self::class_due_ns(j, count, s, rate))
    }

    /// How many seqs of topic `x` are due at or before `t_ns` after the start (the
    /// first seq due after it).
    pub fn due_by(&self, x: u32, t_ns: u64) -> u64 {
        let (j, count, rate) = self.class(x);
        if rate <= 0.0 {
            return 0;
        }
        let due = |s: u64| Self::class_due_ns(j, count, s, rate);
        // An estimate, then exact against the formula itself.
        let est = (t_ns as f64 / 1e9 * rate - j as f64 / count as f64).floor() + 1.0;
        let mut s = est.max(0.0) as u64;
        while s > 0 && due(s - 1) > t_ns {
            s -= 1;
        }
        while due(s) <= t_ns {
            s += 1;
        }
        s
    }

    /// Seqs of topic `x` published in a phase of `d_ns` (due strictly before it).
    pub fn total(&self, x: u32, d_ns: u64) -> u64 {
        if d_ns == 0 {
            0
        } else {
            self.due_by(x, d_ns - 1)
        }
    }

    /// The class indices process `split` publishes, per class: rooms, tickers (as
    /// topic ids), with the rate of the class.
    fn my_streams(&self) -> Vec<(Vec<u32>, f64)> {
        let Split { k, n } = self.split;
        let rooms = (0..self.rooms).filter(|j| j % n == k).map(|j| j as u32);
        let tickers = (0..self.tickers)
            .filter(|j| j % n == k)
            .map(|j| (self.rooms + j) as u32);
        vec![
            (rooms.collect(), self.room_rate),
            (tickers.collect(), self.ticker_rate),
        ]
    }

    /// Deliveries per second the schedule offers with every connection subscribed.
    pub fn offered_per_s(&self) -> f64 {
        let ticker = if self.tickers > 0 {
            self.ticker_rate
        } else {
            0.0
        };
        self.connections as f64 * (self.room_rate + ticker)
    }

    /// Connections assigned to node `n`.
    pub fn on_node(&self, n: usize) -> usize {
        self.connections / self.nodes + usize::from(n < self.connections % self.nodes)
    }
}

/// Sequence accounting of one connection over its (at most two) topics, across
/// reconnects: see the module's "Accounting with churn".
#[derive(Debug, Default)]
pub struct Tracker {
    slots: Vec<Slot>,
    pub counts: SeqCounts,
    pub skipped: u64,
    pub unowed: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    topic: u32,
    /// Highest seq seen + 1 (0: none yet).
    next: u64,
    /// Bit i: seq `next - 1 - i` arrived.
    seen: u128,
    /// Seqs `[skip_lo, skip_hi)` are not owed (since the last subscription).
    skip_lo: u64,
    skip_hi: u64,
}

impl Tracker {
    pub fn new(topics: &[u32]) -> Tracker {
        Tracker {
            slots: topics
                .iter()
                .map(|t| Slot {
                    topic: *t,
                    ..Slot::default()
                })
                .collect(),
            ..Tracker::default()
        }
    }

    /// A subscription was confirmed; `owed_from(topic)` is the first seq due after
    /// that instant (capped at what the run publishes).
    pub fn subscribed(&mut self, owed_from: impl Fn(u32) -> u64) {
        for s in &mut self.slots {
            let lo = s.next;
            let hi = owed_from(s.topic).max(lo);
            self.skipped += hi - lo;
            s.skip_lo = lo;
            s.skip_hi = hi;
        }
    }

    /// Accounts one delivery of (topic, seq).
    pub fn record(&mut self, topic: u32, seq: u64) {
        self.counts.delivered += 1;
        let Some(s) = self.slots.iter_mut().find(|s| s.topic == topic) else {
            self.counts.foreign += 1;
            return;
        };
        let owed = !(s.skip_lo..s.skip_hi).contains(&seq);
        if seq >= s.next {
            let shift = seq - s.next + 1;
            s.seen = if shift >= 128 {
                1
            } else {
                (s.seen << shift) | 1
            };
            s.next = seq + 1;
            if owed {
                self.counts.unique += 1;
            } else {
                self.unowed += 1;
            }
            return;
        }
        let age = s.next - 1 - seq;
        if age < 128 {
            let bit = 1u128 << age;
            if s.seen & bit != 0 {
                self.counts.duplicated += 1;
                return;
            }
            s.seen |= bit;
        }
        if owed {
            self.counts.reordered += 1;
            self.counts.unique += 1;
        } else {
            self.unowed += 1;
        }
    }
}

/// What the run shares with every connection task.
struct Shared {
    mix: Mix,
    /// Start of the publishing schedule (ns since the epoch; set once known, before
    /// `start` announces it) and its length (ns).
    start_ns: AtomicU64,
    phase_ns: u64,
    /// Connection attempts of the ramp that finished (either way).
    ramped: AtomicUsize,
    connect_hist: Mutex<hdrhistogram::Histogram<u64>>,
    churned: AtomicU64,
    reconnect_failed: AtomicU64,
    server_closed: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn start(&self) -> u64 {
        self.start_ns.load(Ordering::Relaxed)
    }

    /// First seq of `x` owed to a subscription confirmed at `at_ns`.
    fn owed_from(&self, x: u32, at_ns: u64) -> u64 {
        let total = self.mix.total(x, self.phase_ns);
        match at_ns.checked_sub(self.start()) {
            None => 0,
            Some(t) => self.mix.due_by(x, t).min(total),
        }
    }
}

/// How one connection task ended.
struct ConnOut {
    topics: Vec<u32>,
    failure: Option<Failure>,
    tracker: Tracker,
}

/// Why a read loop stopped.
enum End {
    Cancelled,
    Churn,
    Closed(String),
}

/// Runs the scenario and returns this process's report.
pub async fn run(ctx: Arc<Ctx>, a: ScaleArgs) -> Result<Report> {
    if !ctx.common.target.is_json() {
        bail!("scale speaks wsgate's JSON protocol and HTTP publish API");
    }
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let split = ctx.common.split;
    let mix = Mix::new(&a, ctx.urls.len(), split);
    let mine: Vec<usize> = (0..a.connections).filter(|i| split.owns(*i)).collect();
    let ticks = sysmon::ticks_per_second();
    let phase = ctx.common.duration;
    let rss_self_before = sysmon::self_rss_kib();

    // t0 is the start of the ramp: the timeline shows connections climbing.
    let monitor = Monitor::start(&ctx, indicatif::ProgressBar::hidden(), "deliveries");
    let planned_start = ctx.common.start_at.map(|ms| ms * 1_000_000);
    let sh = Arc::new(Shared {
        mix: mix.clone(),
        start_ns: AtomicU64::new(planned_start.unwrap_or(0)),
        phase_ns: phase.as_nanos() as u64,
        ramped: AtomicUsize::new(0),
        connect_hist: Mutex::new(new_hist()),
        churned: AtomicU64::new(0),
        reconnect_failed: AtomicU64::new(0),
        server_closed: Mutex::default(),
    });

    // 1. Ramp. The schedule's start is announced to the connections through `start`:
    //    at once with --start-at, else once the ramp is over.
    let (start_tx, start_rx) = tokio::sync::watch::channel(planned_start);
    let bar = ctx.bar(mine.len() as u64, "connect");
    let sem = Arc::new(Semaphore::new(ctx.common.connect_concurrency.max(1)));
    let ramp_start = Instant::now();
    // Churn: each connection closes and reopens once every 1/churn minutes; the
    // connections take their turns spread evenly over that period.
    let churn_period_ns = (a.churn > 0.0).then(|| (60e9 / a.churn) as u64);
    let mut tasks = Vec::with_capacity(mine.len());
    for (k, &i) in mine.iter().enumerate() {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        pace(ramp_start, ctx.common.connect_rate, k as u64).await;
        bar.set_position(sh.ramped.load(Ordering::Relaxed) as u64);
        let churn_offset =
            churn_period_ns.map(|p| (p as f64 * k as f64 / mine.len() as f64) as u64);
        let (c, r, rx) = (Arc::clone(&ctx), Arc::clone(&sh), start_rx.clone());
        let topics = mix.topics_of(i);
        let node = mix.node_of(i);
        tasks.push(tokio::spawn(async move {
            connection(
                c,
                r,
                rx,
                node,
                topics,
                permit,
                churn_offset,
                churn_period_ns,
            )
            .await
        }));
    }
    drop(start_rx);
    while sh.ramped.load(Ordering::Relaxed) < mine.len() {
        bar.set_position(sh.ramped.load(Ordering::Relaxed) as u64);
        bar.set_message(format!("{} open", ctx.open.load(Ordering::Relaxed)));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let ramped_open = ctx.open.load(Ordering::Relaxed);
    let rss_self_after = sysmon::self_rss_kib();
    let mut notes = Vec::new();

    // 2. The schedule's start.
    let start_ns = match planned_start {
        Some(s) => {
            if now_ns() > s {
                notes.push(format!(
                    "the ramp ended {:.1} s after --start-at: connections subscribed late are owed only what was due after",
                    (now_ns() - s) as f64 / 1e9
                ));
            }
            s
        }
        None => now_ns() + a.settle.as_nanos() as u64,
    };
    sh.start_ns.store(start_ns, Ordering::Relaxed);
    let _ = start_tx.send(Some(start_ns));
    sleep_until_ns(start_ns).await;

    // 3. Publish for the phase, sampling the costs over the steady window.
    let t0_ns = ctx.timeline.t0_ns();
    let pub_from_s = (start_ns.saturating_sub(t0_ns) as f64 / 1e9).ceil() as u32;
    let steady = Steady::new(
        phase.as_secs() as u32,
        ctx.common.warmup.as_secs() as u32,
        ctx.common.tail.as_secs() as u32,
    );
    let steady = Steady {
        from_s: pub_from_s + steady.from_s,
        to_s: pub_from_s + steady.to_s,
    };
    let publishing = tokio::spawn(publish(Arc::clone(&ctx), Arc::clone(&sh), a.clone()));
    let bar = ctx.bar(phase.as_secs(), "scale");
    let snap = |ctx: &Ctx| Snap {
        servers: ctx
            .common
            .server_pid
            .iter()
            .map(|p| sysmon::sample(*p, ticks))
            .collect(),
        redis: a
            .redis_pid
            .iter()
            .map(|p| sysmon::sample(*p, ticks))
            .collect(),
        usage: sysmon::self_usage(),
        at: Instant::now(),
    };
    let (mut steady_a, mut steady_b) = (None, None);
    let mut last = (ctx.timeline.total(), Instant::now());
    let end_ns = start_ns + phase.as_nanos() as u64;
    while now_ns() < end_ns {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let sec = ((now_ns() - t0_ns) / 1_000_000_000) as u32;
        if steady_a.is_none() && sec >= steady.from_s {
            steady_a = Some(snap(&ctx));
        }
        if steady_b.is_none() && sec >= steady.to_s {
            steady_b = Some(snap(&ctx));
        }
        if last.1.elapsed() >= Duration::from_secs(1) {
            let total = ctx.timeline.total();
            let rate = (total - last.0) as f64 / last.1.elapsed().as_secs_f64();
            last = (total, Instant::now());
            bar.set_position(
                (now_ns().saturating_sub(start_ns) / 1_000_000_000).min(phase.as_secs()),
            );
            bar.set_message(format!(
                "{rate:.0} deliveries/s  {} conns  {} churned",
                ctx.open.load(Ordering::Relaxed),
                sh.churned.load(Ordering::Relaxed)
            ));
        }
    }
    bar.finish_and_clear();
    let held_end = snap(&ctx);
    let steady_b = steady_b.unwrap_or_else(|| held_end.clone());
    let steady_a = steady_a.unwrap_or_else(|| held_end.clone());
    let held = ctx.open.load(Ordering::Relaxed);
    let pub_out = publishing.await?;

    // 4. Drain, stop.
    let drain_end = Instant::now() + a.drain;
    let mut last = (ctx.timeline.total(), Instant::now());
    while Instant::now() < drain_end && last.1.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let total = ctx.timeline.total();
        if total != last.0 {
            last = (total, Instant::now());
        }
    }
    ctx.cancel.cancel();
    let mut outs = Vec::with_capacity(tasks.len());
    for t in tasks {
        outs.push(t.await?);
    }
    let wall_s = monitor.started.elapsed().as_secs_f64();
    let (first, samples) = monitor.stop().await;

    // 5. Account.
    let total_s = samples.len() as u32;
    let mut r = Report {
        duration_s: total_s,
        steady: if steady.to_s <= total_s && steady.from_s < steady.to_s {
            steady
        } else {
            Steady::new(total_s, pub_from_s, 0)
        },
        ..Report::default()
    };
    r.set_seconds(&ctx.timeline.take_seconds());
    run::fill_from_samples(&ctx, &mut r, &first, &samples, wall_s);
    r.raw.published_per_topic = pub_out
        .published
        .iter()
        .map(|p| p.load(Ordering::Relaxed))
        .collect();
    r.raw.subscribers_per_topic = vec![0; mix.topics()];
    let mut connect = Connect {
        attempted: mine.len() as u64,
        overloaded_retries: ctx.overloaded.load(Ordering::Relaxed),
        ..Connect::default()
    };
    let mut counts = SeqCounts::default();
    let (mut skipped, mut unowed) = (0, 0);
    for o in &outs {
        if let Some(f) = o.failure {
            connect.failed += 1;
            *connect.failures.entry(f.as_str().to_string()).or_default() += 1;
            continue;
        }
        connect.succeeded += 1;
        for t in &o.topics {
            r.raw.subscribers_per_topic[*t as usize] += 1;
        }
        counts.add(&o.tracker.counts);
        skipped += o.tracker.skipped;
        unowed += o.tracker.unowed;
    }
    r.raw.counts = counts;
    connect.rate_per_s = connect.succeeded as f64 / ramp_s.max(1e-9);
    let hist = sh.connect_hist.lock().expect("hist lock").clone();
    connect.latency = Latency::from_hist(&hist);
    r.raw.connect_hist = Some(crate::report::encode_hist(&hist));
    r.connect = connect;
    r.fanout = Some(Fanout {
        subscribers: r.connect.succeeded,
        publishers: pub_out.senders,
        topics: mix.topics() as u64,
        payload_bytes: a.payload as u64,
        sent: pub_out.sent,
        publish_errors: pub_out.errors,
        max_publish_lag_ms: pub_out.max_lag_ms,
        ..Fanout::default()
    });
    if !pub_out.codes.is_empty() {
        notes.push(format!("publish errors by kind: {:?}", pub_out.codes));
    }

    let window_s = steady_b.at.duration_since(steady_a.at).as_secs_f64();
    let cpu_delta = |a: &[Option<sysmon::ProcSample>], b: &[Option<sysmon::ProcSample>]| -> f64 {
        a.iter()
            .zip(b)
            .filter_map(|(x, y)| Some(y.as_ref()?.cpu_s - x.as_ref()?.cpu_s))
            .sum()
    };
    let node_stats = ctx
        .common
        .server_pid
        .iter()
        .enumerate()
        .map(|(n, pid)| {
            let before = first
                .servers
                .get(n)
                .copied()
                .flatten()
                .map_or(0, |p| p.rss_kib);
            let at_end = held_end
                .servers
                .get(n)
                .copied()
                .flatten()
                .map_or(0, |p| p.rss_kib);
            let conns = if ctx.common.server_pid.len() == mix.nodes {
                mix.on_node(n) as u64
            } else {
                0
            };
            let cpu = match (steady_a.servers.get(n), steady_b.servers.get(n)) {
                (Some(Some(x)), Some(Some(y))) => (y.cpu_s - x.cpu_s) / window_s.max(1e-9),
                _ => 0.0,
            };
            NodeStat {
                pid: *pid,
                connections: conns,
                rss_before_kib: before,
                rss_held_kib: at_end,
                rss_per_connection_bytes: (conns > 0)
                    .then(|| at_end.saturating_sub(before) as f64 * 1024.0 / conns as f64),
                cpu_cores: cpu,
            }
        })
        .collect();
    let ss = &sh;
    r.scale = Some(Scale {
        nodes: mix.nodes as u64,
        connections: a.connections as u64,
        rooms: mix.rooms as u64,
        room_size: mix.room_size as u64,
        room_rate: a.room_rate,
        tickers: a.tickers as u64,
        ticker_rate: a.ticker_rate,
        offered_deliveries_per_s: mix.offered_per_s(),
        held,
        churn_per_min: a.churn,
        churned: ss.churned.load(Ordering::Relaxed),
        server_closed: ss.server_closed.lock().expect("lock").clone(),
        reconnect_failed: ss.reconnect_failed.load(Ordering::Relaxed),
        skipped,
        unowed,
        on_time_ms: a.on_time.as_secs_f64() * 1000.0,
        generator_rss_delta_kib: rss_self_after.saturating_sub(rss_self_before),
        generator_connections: ramped_open,
        window_s: if ctx.common.server_pid.is_empty() && a.redis_pid.is_empty() {
            0.0
        } else {
            window_s
        },
        nodes_cpu_s: cpu_delta(&steady_a.servers, &steady_b.servers),
        redis_cpu_s: cpu_delta(&steady_a.redis, &steady_b.redis),
        generator_cpu_s: (steady_b.usage.user_s + steady_b.usage.sys_s)
            - (steady_a.usage.user_s + steady_a.usage.sys_s),
        node_stats,
        ..Scale::default()
    });
    r.notes.extend(notes);
    run::scrape_metrics(&ctx, &mut r).await;
    run::finish(&ctx, &mut r, "scale")?;
    Ok(r)
}

/// Costs sampled at one instant.
#[derive(Clone)]
struct Snap {
    servers: Vec<Option<sysmon::ProcSample>>,
    redis: Vec<Option<sysmon::ProcSample>>,
    usage: sysmon::SelfUsage,
    at: Instant,
}

async fn sleep_until_ns(at_ns: u64) {
    let now = now_ns();
    if at_ns > now {
        tokio::time::sleep(Duration::from_nanos(at_ns - now)).await;
    }
}

/// One connection, from the ramp to the end of the run, reconnecting after churn or
/// a close by the server.
#[allow(clippy::too_many_arguments)]
async fn connection(
    ctx: Arc<Ctx>,
    sh: Arc<Shared>,
    mut start_rx: tokio::sync::watch::Receiver<Option<u64>>,
    node: usize,
    topics: Vec<u32>,
    permit: tokio::sync::OwnedSemaphorePermit,
    churn_offset: Option<u64>,
    churn_period: Option<u64>,
) -> ConnOut {
    let mut tracker = Tracker::new(&topics);
    let started = Instant::now();
    // Boxed: the connect's state is only held while connecting, not by the task
    // for the rest of its life.
    let first = Box::pin(open(&ctx, &sh.mix, node, &topics)).await;
    drop(permit);
    let mut ws = match first {
        Ok(ws) => ws,
        Err(f) => {
            sh.ramped.fetch_add(1, Ordering::Relaxed);
            return ConnOut {
                topics,
                failure: Some(f),
                tracker,
            };
        }
    };
    let subscribed_at = now_ns();
    sh.connect_hist
        .lock()
        .expect("hist lock")
        .saturating_record((started.elapsed().as_micros() as u64).max(1));
    ctx.open.fetch_add(1, Ordering::Relaxed);
    sh.ramped.fetch_add(1, Ordering::Relaxed);
    // Deliveries are owed once the schedule's start is known (when every connection
    // of the process has ramped). Meanwhile the node's pings are answered, as a real
    // client does: left unread through a ramp of minutes, 500,000 connections would
    // answer several pings each at once when publishing starts.
    let mut rec = ctx.timeline.recorder(topics[0] as usize);
    let start = wait_for_start(&ctx, &mut ws, &mut start_rx, &mut tracker, &mut rec).await;
    drop(start_rx);
    let Some(start) = start else {
        ctx.open.fetch_sub(1, Ordering::Relaxed);
        return ConnOut {
            topics,
            failure: None,
            tracker,
        };
    };
    tracker.subscribed(|x| sh.owed_from(x, subscribed_at));
    let end_ns = start + sh.phase_ns;
    let mut churn_at = churn_offset.map(|o| start + o).filter(|at| *at < end_ns);
    loop {
        let end = read_loop(&ctx, &mut ws, &mut tracker, &mut rec, churn_at).await;
        ctx.open.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Cancelled => break,
            End::Churn => {
                sh.churned.fetch_add(1, Ordering::Relaxed);
                let _ = ws.send(OP_CLOSE, &1000u16.to_be_bytes()).await;
                churn_at = churn_at
                    .zip(churn_period)
                    .map(|(at, p)| at + p)
                    .filter(|at| *at < end_ns);
            }
            End::Closed(code) => {
                *sh.server_closed
                    .lock()
                    .expect("lock")
                    .entry(code)
                    .or_default() += 1;
            }
        }
        drop(ws);
        // Reconnect (a real client would), until it works or the run ends.
        ws = loop {
            if ctx.cancel.is_cancelled() {
                return ConnOut {
                    topics,
                    failure: None,
                    tracker,
                };
            }
            match Box::pin(open(&ctx, &sh.mix, node, &topics)).await {
                Ok(ws) => break ws,
                Err(_) => {
                    sh.reconnect_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = ctx.cancel.cancelled() => {}
                    }
                }
            }
        };
        let at = now_ns();
        tracker.subscribed(|x| sh.owed_from(x, at));
        ctx.open.fetch_add(1, Ordering::Relaxed);
    }
    ConnOut {
        topics,
        failure: None,
        tracker,
    }
}

/// Reads until the schedule's start is known, as the read loop does (pings answered,
/// deliveries accounted: a process whose ramp ends after `--start-at` learns the start
/// after the first publications); `None` if the run was cancelled first. A connection
/// the server closes meanwhile waits without reading: its read loop then finds it
/// closed and reconnects.
async fn wait_for_start(
    ctx: &Ctx,
    ws: &mut WsConn,
    start_rx: &mut tokio::sync::watch::Receiver<Option<u64>>,
    tr: &mut Tracker,
    rec: &mut LocalRecorder,
) -> Option<u64> {
    let mut reading = true;
    loop {
        let filled = tokio::select! {
            biased;
            r = start_rx.wait_for(Option::is_some) => return r.ok().and_then(|v| *v),
            _ = ctx.cancel.cancelled() => return None,
            r = ws.fill(), if reading => r.is_ok(),
        };
        reading = filled && handle_frames(ws, tr, rec, now_ns()).await.is_ok();
        rec.flush();
        ws.release();
    }
}

/// Handles every complete frame read: deliveries are accounted (received at `now`),
/// pings answered; how the connection ended when the server closed it or broke the
/// protocol.
async fn handle_frames(
    ws: &mut WsConn,
    tr: &mut Tracker,
    rec: &mut LocalRecorder,
    now: u64,
) -> Result<(), End> {
    loop {
        let mut pong = None;
        match ws.next_frame() {
            Ok(None) => return Ok(()),
            Err(_) => return Err(End::Closed("protocol".into())),
            Ok(Some(f)) => match f.opcode {
                OP_TEXT => {
                    let st = payload::scan_message(f.payload).or_else(|| {
                        matches!(crate::proto::classify(f.payload), crate::proto::Op::Message)
                            .then(|| payload::scan(f.payload))
                            .flatten()
                    });
                    if let Some(Stamp {
                        publisher,
                        seq,
                        sent_ns,
                    }) = st
                    {
                        tr.record(publisher, seq);
                        rec.record(now, now.saturating_sub(sent_ns) / 1000);
                    }
                }
                OP_PING => {
                    let mut p = [0u8; 125];
                    let n = f.payload.len().min(125);
                    p[..n].copy_from_slice(&f.payload[..n]);
                    pong = Some((p, n));
                }
                OP_CLOSE => {
                    let code = match f.payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
                        _ => "none".into(),
                    };
                    return Err(End::Closed(code));
                }
                _ => {}
            },
        }
        if let Some((p, n)) = pong {
            if ws.send(OP_PONG, &p[..n]).await.is_err() {
                return Err(End::Closed("eof".into()));
            }
        }
    }
}

/// Connects and subscribes to `topics`; the connection holds no buffer when idle.
async fn open(ctx: &Ctx, mix: &Mix, node: usize, topics: &[u32]) -> Result<WsConn, Failure> {
    let names: Vec<String> = topics
        .iter()
        .map(|t| format!("{}{}", ctx.topic_prefix, mix.name(*t)))
        .collect();
    let cmd = ctx.common.target.subscribe(&names, 1);
    let mut s = session::open_with(ctx, &ctx.urls[node], Some(cmd), None).await?;
    s.ws.release();
    Ok(s.ws)
}

/// Reads and accounts deliveries until the run ends, the churn time comes, or the
/// server closes the connection.
async fn read_loop(
    ctx: &Ctx,
    ws: &mut WsConn,
    tr: &mut Tracker,
    rec: &mut LocalRecorder,
    churn_at: Option<u64>,
) -> End {
    let mut churn = churn_at.map(|at| {
        Box::pin(tokio::time::sleep(Duration::from_nanos(
            at.saturating_sub(now_ns()),
        )))
    });
    let mut cancelled = std::pin::pin!(ctx.cancel.cancelled());
    let mut now = now_ns();
    loop {
        if let Err(end) = handle_frames(ws, tr, rec, now).await {
            return end;
        }
        rec.flush();
        ws.release();
        let filled = match churn.as_mut() {
            Some(churn) => tokio::select! {
                biased;
                _ = &mut cancelled => return End::Cancelled,
                _ = churn => return End::Churn,
                r = ws.fill() => r,
            },
            None => tokio::select! {
                biased;
                _ = &mut cancelled => return End::Cancelled,
                r = ws.fill() => r,
            },
        };
        if filled.is_err() {
            return End::Closed("eof".into());
        }
        now = now_ns();
    }
}

/// What this process's publishing did.
struct PubOut {
    published: Vec<AtomicU64>,
    senders: u64,
    sent: u64,
    errors: u64,
    codes: BTreeMap<String, u64>,
    max_lag_ms: f64,
}

/// One publication handed to a node's sender: topic, seq, due (ns since the epoch).
type Item = (u32, u64, u64);

/// Publishes this process's share of the schedule for the phase, through one HTTP
/// sender per node.
async fn publish(ctx: Arc<Ctx>, sh: Arc<Shared>, a: ScaleArgs) -> PubOut {
    let mix = &sh.mix;
    let published: Arc<Vec<AtomicU64>> =
        Arc::new((0..mix.topics()).map(|_| AtomicU64::new(0)).collect());
    let mut txs = Vec::new();
    let mut senders = Vec::new();
    for url in &ctx.urls {
        let (tx, rx) = mpsc::unbounded_channel::<Item>();
        txs.push(tx);
        let url = Url {
            path: "/api/publish".into(),
            ..url.clone()
        };
        let (c, s, p, batch, key, payload) = (
            Arc::clone(&ctx),
            Arc::clone(&sh),
            Arc::clone(&published),
            a.http_batch.max(1),
            a.api_key.clone(),
            a.payload,
        );
        senders.push(tokio::spawn(async move {
            sender(c, s, url, rx, p, batch, key, payload).await
        }));
    }
    let streams = mix.my_streams();
    let mut next = vec![0u64; streams.len()];
    let start = sh.start();
    loop {
        let now = now_ns().saturating_sub(start);
        let mut soonest = u64::MAX;
        for (c, (topics, rate)) in streams.iter().enumerate() {
            if topics.is_empty() || *rate <= 0.0 {
                continue;
            }
            loop {
                // The process's topics of a class in turn: their due times increase.
                let m = next[c];
                let x = topics[(m % topics.len() as u64) as usize];
                let seq = m / topics.len() as u64;
                let due = mix.due_ns(x, seq).unwrap_or(u64::MAX);
                if due >= sh.phase_ns {
                    break;
                }
                if due > now {
                    soonest = soonest.min(due);
                    break;
                }
                let _ = txs[mix.pub_node(x)].send((x, seq, start + due));
                next[c] += 1;
            }
        }
        if soonest == u64::MAX {
            break;
        }
        sleep_until_ns(start + soonest).await;
    }
    drop(txs);
    let mut out = PubOut {
        published: Vec::new(),
        senders: senders.len() as u64,
        sent: 0,
        errors: 0,
        codes: BTreeMap::new(),
        max_lag_ms: 0.0,
    };
    for s in senders {
        if let Ok(o) = s.await {
            out.sent += o.sent;
            out.errors += o.errors;
            out.max_lag_ms = out.max_lag_ms.max(o.max_lag_ms);
            for (k, v) in o.codes {
                *out.codes.entry(k).or_default() += v;
            }
        }
    }
    out.published = Arc::try_unwrap(published).unwrap_or_else(|p| {
        p.iter()
            .map(|x| AtomicU64::new(x.load(Ordering::Relaxed)))
            .collect()
    });
    out
}

#[derive(Default)]
struct SenderOut {
    sent: u64,
    errors: u64,
    codes: BTreeMap<String, u64>,
    max_lag_ms: f64,
}

/// Posts what is due to one node, everything queued in one request (at most `batch`).
#[allow(clippy::too_many_arguments)]
async fn sender(
    ctx: Arc<Ctx>,
    sh: Arc<Shared>,
    url: Url,
    mut rx: mpsc::UnboundedReceiver<Item>,
    published: Arc<Vec<AtomicU64>>,
    batch: usize,
    key: Option<String>,
    payload: usize,
) -> SenderOut {
    let mut out = SenderOut::default();
    let mut conn: Option<HttpConn> = None;
    let mut items = Vec::with_capacity(batch);
    let mut body = Vec::new();
    let mut data = Vec::new();
    let mut names: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    while let Some(first) = rx.recv().await {
        items.clear();
        items.push(first);
        while items.len() < batch {
            match rx.try_recv() {
                Ok(it) => items.push(it),
                Err(_) => break,
            }
        }
        let now = now_ns();
        body.clear();
        body.push(b'[');
        for (n, (x, seq, due)) in items.iter().enumerate() {
            out.max_lag_ms = out.max_lag_ms.max(now.saturating_sub(*due) as f64 / 1e6);
            if n > 0 {
                body.push(b',');
            }
            let name = names
                .entry(*x)
                .or_insert_with(|| format!("{}{}", ctx.topic_prefix, sh.mix.name(*x)));
            body.extend_from_slice(b"{\"topic\":\"");
            body.extend_from_slice(name.as_bytes());
            body.extend_from_slice(b"\",\"data\":");
            data.clear();
            payload::encode(
                &mut data,
                &Stamp {
                    publisher: *x,
                    seq: *seq,
                    sent_ns: now,
                },
                payload,
            );
            body.extend_from_slice(&data);
            body.push(b'}');
        }
        body.push(b']');
        let n = items.len() as u64;
        out.sent += n;
        ctx.sent.fetch_add(n, Ordering::Relaxed);
        let mut result = None;
        // One retry on a fresh connection if the kept-alive one broke.
        for _ in 0..2 {
            if conn.is_none() {
                conn = match tokio::net::TcpStream::connect(url.addr).await {
                    Ok(s) => HttpConn::open(&url, s).await.ok(),
                    Err(_) => None,
                };
            }
            let Some(c) = conn.as_mut() else { continue };
            match c
                .request(
                    hyper::Method::POST,
                    Bytes::copy_from_slice(&body),
                    key.as_deref(),
                )
                .await
            {
                Ok((status, _)) => {
                    result = Some(status);
                    break;
                }
                Err(_) => conn = None,
            }
        }
        match result {
            Some(200) => {
                for (x, _, _) in &items {
                    published[*x as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            Some(status) => {
                out.errors += n;
                *out.codes.entry(format!("http_{status}")).or_default() += n;
            }
            None => {
                out.errors += n;
                *out.codes.entry("connection".into()).or_default() += n;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mix(connections: usize, nodes: usize, split: &str) -> Mix {
        Mix {
            connections,
            nodes,
            room_size: 10,
            rooms: connections.div_ceil(10),
            tickers: 10,
            room_rate: 0.5,
            ticker_rate: 2.0,
            split: split.parse().unwrap(),
        }
    }

    #[test]
    fn rooms_span_nodes_and_are_published_elsewhere() {
        let m = mix(1000, 30, "0/1");
        assert_eq!(m.topics(), 110);
        for r in 0..m.rooms as u32 {
            let members: Vec<usize> = (0..m.connections)
                .filter(|i| m.topics_of(*i)[0] == r)
                .collect();
            assert_eq!(members.len(), 10);
            let nodes: std::collections::BTreeSet<usize> =
                members.iter().map(|i| m.node_of(*i)).collect();
            assert_eq!(nodes.len(), 10, "room {r}: one member per node");
            assert!(!nodes.contains(&m.pub_node(r)), "room {r}");
        }
        // Every node holds subscribers of every ticker.
        for t in 0..10u32 {
            let nodes: std::collections::BTreeSet<usize> = (0..m.connections)
                .filter(|i| m.topics_of(*i)[1] == m.rooms as u32 + t)
                .map(|i| m.node_of(i))
                .collect();
            assert_eq!(nodes.len(), 30, "ticker {t}");
        }
        assert_eq!(m.offered_per_s(), 1000.0 * 0.5 + 10.0 * 2.0 * 100.0);
        assert_eq!((0..30).map(|n| m.on_node(n)).sum::<usize>(), 1000);
        assert_eq!(
            m.on_node(9),
            (0..1000).filter(|i| m.node_of(*i) == 9).count()
        );
    }

    #[test]
    fn the_schedule_is_the_same_seen_from_any_process() {
        // 3 processes publish their shares; together each topic gets its rate, and
        // every seq's due time matches what a subscriber computes.
        let d = 10_000_000_000u64; // 10 s
        for split_n in [1, 3] {
            let mut seen: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
            for k in 0..split_n {
                let m = mix(1000, 30, &format!("{k}/{split_n}"));
                for (topics, _) in m.my_streams() {
                    // The process's order of publication is the order of due times.
                    let mut i = 0u64;
                    let mut last = 0;
                    loop {
                        let x = topics[(i % topics.len() as u64) as usize];
                        let due = m.due_ns(x, i / topics.len() as u64).unwrap();
                        if due >= d {
                            break;
                        }
                        assert!(due >= last, "process {k}: {due} after {last}");
                        last = due;
                        seen.entry(x).or_default().push(due);
                        i += 1;
                    }
                }
            }
            let m = mix(1000, 30, "0/1");
            assert_eq!(seen.len(), 110);
            // The tickers take turns: 10 at 2/s each, one every 50 ms, never together.
            let mut firsts: Vec<u64> = (0..10).map(|t| seen[&(m.rooms as u32 + t)][0]).collect();
            firsts.sort_unstable();
            for w in firsts.windows(2) {
                assert_eq!(w[1] - w[0], 50_000_000, "{firsts:?}");
            }
            for (x, dues) in &seen {
                let want = if (*x as usize) < m.rooms { 5 } else { 20 };
                assert_eq!(dues.len(), want, "topic {x}, {split_n} processes");
                assert_eq!(m.total(*x, d), want as u64);
                // due_by counts exactly the seqs due at or before t.
                for (s, due) in dues.iter().enumerate() {
                    let m = mix(1000, 30, &format!("0/{split_n}"));
                    assert_eq!(m.due_by(*x, *due), s as u64 + 1);
                    if let Some(before) = due.checked_sub(1) {
                        assert_eq!(m.due_by(*x, before), s as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn churn_skips_only_what_was_due_while_away() {
        let mut t = Tracker::new(&[3, 7]);
        t.subscribed(|_| 0);
        for s in 0..5 {
            t.record(3, s);
        }
        t.record(7, 0);
        t.record(9, 0); // not ours
                        // Away: 5..8 of topic 3 and 1..4 of topic 7 were due before the resubscribe.
        t.subscribed(|x| if x == 3 { 8 } else { 4 });
        assert_eq!(t.skipped, 3 + 3);
        t.record(3, 6); // published before the resubscribe, arrived anyway: not owed
        t.record(3, 8);
        t.record(3, 8); // duplicate
        t.record(3, 10); // 9 lost
        t.record(7, 4);
        assert_eq!(t.unowed, 1);
        assert_eq!(t.counts.unique, 5 + 1 + 2 + 1);
        assert_eq!(t.counts.duplicated, 1);
        assert_eq!(t.counts.foreign, 1);
        assert_eq!(t.counts.delivered, 12);
        // Owed: 0..11 of topic 3 minus 3 skipped = 8, got 7: one lost; topic 7: 0..5
        // minus 3 = 2, got 2.
        let owed = 11 + 5 - t.skipped;
        assert_eq!(owed - t.counts.unique, 1);
    }
}
