//! What every scenario shares: the run context, the once-a-second monitor (publish
//! counts, open connections, server CPU/RSS, generator CPU) and the report's common
//! parts (generator cost, servers, metrics, warnings).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::net::{parse_source_addrs, Dialer, Failure, Url};
use crate::report::{Generator, Report, Second, Server};
use crate::stats::{now_ns, Timeline};
use crate::sysmon::{self, ProcSample, SelfUsage};

/// Shared state of one generator process's run.
pub struct Ctx {
    pub common: Common,
    pub urls: Vec<Url>,
    pub dialer: Dialer,
    pub timeline: Arc<Timeline>,
    /// Open connections right now.
    pub open: AtomicU64,
    /// Publications sent so far (for the per-second published column).
    pub sent: AtomicU64,
    /// Upgrades refused with 503 `overloaded` and retried after the server's hint.
    pub overloaded: AtomicU64,
    /// Tells long-lived connection tasks to stop.
    pub cancel: CancellationToken,
    pub threads: usize,
    /// See `--topic-prefix`.
    pub topic_prefix: String,
    /// The first error message of each failure kind, for the report's notes.
    pub first_errors: Mutex<BTreeMap<&'static str, String>>,
}

impl Ctx {
    /// Builds the context from the common options.
    pub fn new(common: Common, threads: usize) -> Result<Arc<Ctx>> {
        crate::net::set_compression(common.compression);
        crate::payload::set_pad_text(common.pad_text);
        let urls = common
            .url
            .iter()
            .map(|u| Url::parse(u))
            .collect::<Result<Vec<_>>>()?;
        let sources = match &common.source_addrs {
            Some(s) => parse_source_addrs(s)?,
            None => Vec::new(),
        };
        Ok(Arc::new(Ctx {
            urls,
            dialer: Dialer::new(sources),
            timeline: Timeline::new(threads * 4),
            open: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            threads,
            first_errors: Mutex::default(),
            topic_prefix: common.topic_prefix.clone().unwrap_or_else(|| {
                let run = common
                    .start_at
                    .unwrap_or_else(|| u64::from(rand::random::<u32>()));
                format!("lt.{run:x}.")
            }),
            common,
        }))
    }

    /// Notes a failure (keeping the first message of each kind) and returns its kind.
    pub fn fail(&self, kind: Failure, e: impl std::fmt::Display) -> Failure {
        if let Ok(mut m) = self.first_errors.lock() {
            m.entry(kind.as_str()).or_insert_with(|| e.to_string());
        }
        kind
    }

    /// Name of topic `t`.
    pub fn topic(&self, t: usize) -> String {
        format!("{}{t}", self.topic_prefix)
    }

    /// A progress bar of `len` steps (hidden with --no-progress or without a tty).
    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let target = if self.common.no_progress {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(what.to_string());
        bar
    }

    /// Waits until `--start-at` (if given), so split processes start together.
    pub async fn wait_start(&self) {
        if let Some(ms) = self.common.start_at {
            let now_ms = now_ns() / 1_000_000;
            if ms > now_ms {
                tokio::time::sleep(Duration::from_millis(ms - now_ms)).await;
            }
        }
    }
}

/// One sample of the monitor, taken at the end of each second.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub sent: u64,
    pub open: u64,
    pub servers: Vec<Option<ProcSample>>,
    pub usage: SelfUsage,
}

/// Samples once a second from t0 until stopped; drives the run's progress bar.
pub struct Monitor {
    stop: CancellationToken,
    handle: JoinHandle<Vec<Sample>>,
    pub started: Instant,
    pub first: Sample,
}

fn take_sample(ctx: &Ctx, ticks: f64) -> Sample {
    Sample {
        sent: ctx.sent.load(Ordering::Relaxed),
        open: ctx.open.load(Ordering::Relaxed),
        servers: ctx
            .common
            .server_pid
            .iter()
            .map(|p| sysmon::sample(*p, ticks))
            .collect(),
        usage: sysmon::self_usage(),
    }
}

impl Monitor {
    /// Starts sampling now (which becomes t0 of the timeline); `bar` shows seconds.
    pub fn start(ctx: &Arc<Ctx>, bar: ProgressBar, unit: &'static str) -> Monitor {
        let ticks = sysmon::ticks_per_second();
        let started = Instant::now();
        ctx.timeline.set_t0(now_ns());
        let first = take_sample(ctx, ticks);
        let stop = CancellationToken::new();
        let (c, s) = (Arc::clone(ctx), stop.clone());
        let handle = tokio::spawn(async move {
            let mut out = Vec::new();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::from_std(started) + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            let mut last_events = c.timeline.total();
            loop {
                tokio::select! {
                    _ = s.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let sample = take_sample(&c, ticks);
                let events = c.timeline.total();
                bar.set_position(out.len() as u64 + 1);
                bar.set_message(format!(
                    "{} {unit}/s  {} conns",
                    events - last_events,
                    sample.open
                ));
                last_events = events;
                out.push(sample);
            }
            bar.finish_and_clear();
            out
        });
        Monitor {
            stop,
            handle,
            started,
            first,
        }
    }

    /// Stops sampling; the samples at the end of seconds 1, 2, ….
    pub async fn stop(self) -> (Sample, Vec<Sample>) {
        self.stop.cancel();
        (self.first, self.handle.await.unwrap_or_default())
    }
}

/// Fills the report's timeline columns that come from monitor samples, the servers
/// section and the generator's cost over `[first, last sample]`.
pub fn fill_from_samples(
    ctx: &Ctx,
    report: &mut Report,
    first: &Sample,
    samples: &[Sample],
    wall_s: f64,
) {
    if report.timeline.len() < samples.len() {
        report.timeline.resize_with(samples.len(), Second::default);
    }
    let mut prev = first;
    for (i, s) in samples.iter().enumerate() {
        let sec = &mut report.timeline[i];
        sec.published = s.sent - prev.sent;
        sec.connections = s.open;
        let cpu = |x: &Sample| -> Option<f64> {
            x.servers
                .iter()
                .map(|p| p.map(|p| p.cpu_s))
                .sum::<Option<f64>>()
        };
        sec.server_cpu_cores = match (cpu(s), cpu(prev)) {
            (Some(a), Some(b)) if !s.servers.is_empty() => Some(a - b),
            _ => None,
        };
        sec.server_rss_kib = (!s.servers.is_empty())
            .then(|| {
                s.servers
                    .iter()
                    .map(|p| p.map(|p| p.rss_kib))
                    .sum::<Option<u64>>()
            })
            .flatten();
        sec.generator_cpu_cores =
            (s.usage.user_s + s.usage.sys_s) - (prev.usage.user_s + prev.usage.sys_s);
        prev = s;
    }
    let last = samples.last().unwrap_or(first);
    report.generator = Generator {
        processes: 1,
        threads: ctx.threads as u32,
        cpu_user_s: last.usage.user_s - first.usage.user_s,
        cpu_sys_s: last.usage.sys_s - first.usage.sys_s,
        wall_s,
        max_rss_kib: sysmon::self_usage().max_rss_kib,
        ..Generator::default()
    };
    let steady = report.steady.range();
    report.servers = ctx
        .common
        .server_pid
        .iter()
        .enumerate()
        .map(|(k, pid)| {
            let at = |s: &Sample| s.servers.get(k).copied().flatten();
            let rss: Vec<u64> = samples
                .iter()
                .filter_map(|s| at(s).map(|p| p.rss_kib))
                .collect();
            let cpu_at = |i: usize| -> Option<f64> {
                if i == 0 {
                    at(first)
                } else {
                    samples.get(i - 1).and_then(at)
                }
                .map(|p| p.cpu_s)
            };
            let steady_cpu = match (cpu_at(steady.start), cpu_at(steady.end.min(samples.len()))) {
                (Some(a), Some(b)) if steady.end > steady.start => {
                    (b - a) / (steady.end.min(samples.len()) - steady.start).max(1) as f64
                }
                _ => 0.0,
            };
            Server {
                pid: *pid,
                name: sysmon::name(*pid),
                rss_start_kib: at(first).map(|p| p.rss_kib).unwrap_or(0),
                rss_end_kib: rss.last().copied().unwrap_or(0),
                rss_max_kib: rss.iter().copied().max().unwrap_or(0),
                cpu_s: match (at(first), samples.last().and_then(at)) {
                    (Some(a), Some(b)) => b.cpu_s - a.cpu_s,
                    _ => 0.0,
                },
                cpu_cores_steady: steady_cpu,
                cpu_s_per_million_events: None,
            }
        })
        .collect();
}

/// Scrapes the metrics pages (best effort: a failure becomes a note).
pub async fn scrape_metrics(ctx: &Ctx, report: &mut Report) {
    for url in &ctx.common.metrics_url {
        match crate::http::get(url).await {
            Ok(text) => report
                .metrics
                .extend(sysmon::parse_metrics(&text, &ctx.common.metrics_prefix)),
            Err(e) => report
                .notes
                .push(format!("metrics scrape of {url} failed: {e:#}")),
        }
    }
}

/// Fields every report has, and the warnings derived from the numbers.
pub fn finish(ctx: &Ctx, report: &mut Report, scenario: &str) -> Result<()> {
    report.tool = format!("wsgate-loadtest {}", env!("CARGO_PKG_VERSION"));
    report.scenario = scenario.to_string();
    report.target = ctx.common.target.as_str().to_string();
    report.label = ctx.common.label.clone();
    report.commands = vec![std::env::args().collect()];
    report.t0_unix_ms = ctx.timeline.t0_ns() / 1_000_000;
    report.warmup_s = ctx.common.warmup.as_secs() as u32;
    report.tail_s = ctx.common.tail.as_secs() as u32;
    report.derive()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let g = &report.generator;
    if g.cpu_cores > 0.5 * cores {
        report.notes.push(format!(
            "the generator used {:.2} of {cores} cores on average: on a shared machine it may limit the result",
            g.cpu_cores
        ));
    }
    if report.connect.failed > 0 {
        report.notes.push(format!(
            "{} of {} connection attempts failed: {:?}",
            report.connect.failed, report.connect.attempted, report.connect.failures
        ));
    }
    if let Ok(m) = ctx.first_errors.lock() {
        for (kind, msg) in m.iter() {
            report.notes.push(format!("first {kind} error: {msg}"));
        }
    }
    if let Some(f) = &report.fanout {
        if f.lost > 0 || f.duplicated > 0 || f.reordered > 0 {
            report.notes.push(format!(
                "delivery was not exact: lost {}, duplicated {}, reordered {}",
                f.lost, f.duplicated, f.reordered
            ));
        }
        let st = &f.streams;
        if !st.exact() {
            report.notes.push(format!(
                "stream delivery was not contiguous: stream_gaps {} ({} seqs missing), stream_dups {}, resets {}",
                st.gaps, st.missing, st.dups, st.resets
            ));
        }
        if f.max_publish_lag_ms > 100.0 {
            report.notes.push(format!(
                "publishers fell up to {:.0} ms behind their schedule",
                f.max_publish_lag_ms
            ));
        }
    }
    Ok(())
}

/// Spreads `n` starts over time at `rate` per second (0: no pacing): waits until
/// slot `k` is due, measured from `from`.
pub async fn pace(from: Instant, rate: f64, k: u64) {
    if rate > 0.0 {
        let due = from + Duration::from_secs_f64(k as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
    }
}
