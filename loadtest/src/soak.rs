//! `soak-report`: reads what `loadtest/soak.sh` left in its directory (the nodes'
//! `/metrics` samples, the script's events, the generator reports), decides whether
//! the soak passed, prints the verdict and the latency per window, and draws the plot.
//!
//! The rules (loadtest/README.md, "Soak"), each its own check:
//! - **alive**: every node answered every sample with its process alive.
//! - **fds / tasks back to baseline**: per node, the median of the idle samples after
//!   the load ended and settled is at most the median of the idle samples before any
//!   client connected plus a small tolerance: whatever the soak opened was closed.
//! - **RSS flat**: per node, over the loaded phase after the warm-up, the median of the
//!   last 20% of the time is at most the median of 20–40% × (1 + rel) + abs. The first
//!   20% is left out: allocator pools, buffers and history fill up there.
//! - **streams exact**: the stream run lost nothing, and saw no duplicate, reordering,
//!   seq gap, seq step back or `reset` (Redis persists, so nothing is ever gone).
//! - **plain exact off the restarts**: every plain segment run (kept out of the Redis
//!   restart windows) lost, duplicated and reordered nothing. The plain run across the
//!   restarts reports its loss (at most once), not asserted.
//! - **the load ran**: publications acknowledged in every run, churn cycles completed.
//!
//! Latency percentiles per window are reported and plotted, not asserted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _, Result};
use plotters::prelude::*;

use crate::chart::{font_ready, FAMILY};
use crate::report::{decode_hist, Latency, Report};
use crate::stats::new_hist;

/// `soak-report` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// The directory `loadtest/soak.sh` wrote (samples.csv, events.csv, *.json).
    #[arg(long)]
    pub dir: PathBuf,
    /// Write the plot (PNG) here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Latency window (default: the loaded phase / 30, at least 10 s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Option<std::time::Duration>,
    /// Start of the loaded phase left out of the RSS rule (at most a fifth of it).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub warmup: std::time::Duration,
    /// RSS: relative growth allowed between the two windows.
    #[arg(long, default_value_t = 0.10)]
    pub rss_rel: f64,
    /// RSS: absolute growth allowed on top of it, MiB.
    #[arg(long, default_value_t = 8.0)]
    pub rss_abs_mib: f64,
    /// Open files allowed above the idle baseline at the end.
    #[arg(long, default_value_t = 5)]
    pub fds_tolerance: u64,
    /// Tasks allowed above the idle baseline at the end.
    #[arg(long, default_value_t = 5)]
    pub tasks_tolerance: u64,
}

/// One scrape of one node (`samples.csv`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    pub t_ms: u64,
    pub node: usize,
    pub alive: bool,
    pub rss: Option<u64>,
    pub fds: Option<u64>,
    pub tasks: Option<u64>,
    pub connections: Option<u64>,
    pub delivered: Option<u64>,
}

/// Parses `samples.csv` (header first).
pub fn parse_samples(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 9 {
            bail!("samples.csv line {}: {} fields", n + 1, f.len());
        }
        let num = |s: &str| s.trim().parse::<u64>().ok();
        out.push(Sample {
            t_ms: num(f[0]).with_context(|| format!("samples.csv line {}", n + 1))?,
            node: num(f[1]).with_context(|| format!("samples.csv line {}", n + 1))? as usize,
            alive: f[2].trim() == "1",
            rss: num(f[3]),
            fds: num(f[4]),
            tasks: num(f[5]),
            connections: num(f[6]),
            delivered: num(f[7]),
        });
    }
    out.sort_by_key(|s| (s.t_ms, s.node));
    Ok(out)
}

/// One line of `events.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub t_ms: u64,
    pub name: String,
    pub detail: String,
}

/// Parses `events.csv` (header first).
pub fn parse_events(text: &str) -> Result<Vec<Event>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let mut f = line.splitn(3, ',');
        let (Some(t), Some(name)) = (f.next(), f.next()) else {
            continue;
        };
        out.push(Event {
            t_ms: t
                .trim()
                .parse()
                .with_context(|| format!("events.csv line {}", n + 1))?,
            name: name.trim().to_string(),
            detail: f.next().unwrap_or("").trim().to_string(),
        });
    }
    Ok(out)
}

/// The phases of the soak, from its events (ms since the UNIX epoch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phases {
    pub ready: u64,
    pub load_start: u64,
    pub load_end: u64,
    pub settled: u64,
    pub stop: u64,
}

impl Phases {
    pub fn from_events(events: &[Event]) -> Result<Phases> {
        let at = |name: &str| {
            events
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.t_ms)
                .ok_or_else(|| anyhow!("events.csv has no {name}: the soak did not finish"))
        };
        Ok(Phases {
            ready: at("nodes_ready")?,
            load_start: at("load_start")?,
            load_end: at("load_end")?,
            settled: at("settled")?,
            stop: at("stop")?,
        })
    }
}

/// One check of the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
}

/// The median of `v` (the mean of the middle two for an even count); None if empty.
pub fn median(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0
    })
}

fn values(
    samples: &[Sample],
    node: usize,
    from: u64,
    to: u64,
    f: fn(&Sample) -> Option<u64>,
) -> Vec<u64> {
    samples
        .iter()
        .filter(|s| s.node == node && s.t_ms >= from && s.t_ms < to)
        .filter_map(f)
        .collect()
}

/// Idle end against idle baseline: `end ≤ baseline + tolerance` (medians).
pub fn back_to_baseline(
    what: &str,
    node: usize,
    baseline: &[u64],
    end: &[u64],
    tolerance: u64,
) -> Check {
    let name = format!("node {node}: {what} back to baseline");
    match (median(baseline.to_vec()), median(end.to_vec())) {
        (Some(b), Some(e)) => Check::new(
            name,
            e <= b + tolerance as f64,
            format!("idle before {b:.0}, idle after {e:.0} (tolerance +{tolerance})"),
        ),
        _ => Check::new(
            name,
            false,
            format!(
                "no samples ({} before, {} after)",
                baseline.len(),
                end.len()
            ),
        ),
    }
}

/// The RSS rule over `(t_ms, rss)` of one node's loaded phase `[from, to)`: the
/// median of the last 20% of the time against the median of 20–40%.
pub fn rss_flat(
    node: usize,
    points: &[(u64, u64)],
    from: u64,
    to: u64,
    rel: f64,
    abs_mib: f64,
) -> Check {
    let name = format!("node {node}: RSS flat");
    let span = to.saturating_sub(from).max(1) as f64;
    let frac = |t: u64| (t.saturating_sub(from)) as f64 / span;
    let window = |lo: f64, hi: f64| -> Vec<u64> {
        points
            .iter()
            .filter(|(t, _)| *t >= from && *t < to && frac(*t) >= lo && frac(*t) < hi)
            .map(|p| p.1)
            .collect()
    };
    let (early, late) = (window(0.2, 0.4), window(0.8, 1.0));
    let mib = |b: f64| b / (1024.0 * 1024.0);
    match (median(early.clone()), median(late.clone())) {
        (Some(e), Some(l)) => {
            let limit = e * (1.0 + rel) + abs_mib * 1024.0 * 1024.0;
            Check::new(
                name,
                l <= limit,
                format!(
                    "median {:.1} MiB at 20–40% of the load, {:.1} MiB over the last 20% \
                     (limit {:.1} MiB = +{:.0}% + {abs_mib} MiB)",
                    mib(e),
                    mib(l),
                    mib(limit),
                    rel * 100.0
                ),
            )
        }
        _ => Check::new(
            name,
            false,
            format!(
                "too few samples ({} early, {} late)",
                early.len(),
                late.len()
            ),
        ),
    }
}

/// Checks of one fan-out report. `exact`: nothing may be lost either.
pub fn fanout_checks(name: &str, r: &Report, exact: bool, stream: bool) -> Vec<Check> {
    let Some(f) = &r.fanout else {
        return vec![Check::new(name, false, "not a fan-out report")];
    };
    let mut out = vec![Check::new(
        format!("{name}: published"),
        f.published > 0 && r.connect.failed == 0,
        format!(
            "{} acknowledged ({} refused); {} connections ({} subscribers, {} publishers), \
             {} failed",
            f.published,
            f.publish_errors,
            r.connect.succeeded,
            f.subscribers,
            f.publishers,
            r.connect.failed
        ),
    )];
    let lost_detail = format!(
        "lost {} of {} expected ({:.4}%), duplicated {}, reordered {}",
        f.lost,
        f.expected,
        if f.expected > 0 {
            f.lost as f64 * 100.0 / f.expected as f64
        } else {
            0.0
        },
        f.duplicated,
        f.reordered
    );
    if exact {
        out.push(Check::new(
            format!("{name}: nothing lost, duplicated or reordered"),
            f.lost == 0 && f.duplicated == 0 && f.reordered == 0,
            lost_detail,
        ));
    } else {
        out.push(Check::new(
            format!("{name}: loss (reported, not asserted)"),
            true,
            lost_detail,
        ));
    }
    if stream {
        let s = &f.streams;
        out.push(Check::new(
            format!("{name}: every seq once, in order, no reset"),
            s.messages > 0 && s.gaps == 0 && s.dups == 0 && s.resets == 0,
            format!(
                "{} stream messages: {} gaps ({} seqs missing), {} steps back, {} resets",
                s.messages, s.gaps, s.missing, s.dups, s.resets
            ),
        ));
    }
    out
}

/// Latency per window of `width_ms` from `origin_ms`: (window start s, latency).
pub fn windows(r: &Report, origin_ms: u64, width_ms: u64) -> Result<Vec<(f64, Latency)>> {
    let mut acc: BTreeMap<u64, hdrhistogram::Histogram<u64>> = BTreeMap::new();
    for (i, h) in r.raw.hist_seconds.iter().enumerate() {
        let h = decode_hist(h)?;
        if h.is_empty() {
            continue;
        }
        let at = (r.t0_unix_ms + i as u64 * 1000).saturating_sub(origin_ms);
        acc.entry(at / width_ms)
            .or_insert_with(new_hist)
            .add(&h)
            .context("histogram bounds")?;
    }
    Ok(acc
        .into_iter()
        .map(|(w, h)| ((w * width_ms) as f64 / 1000.0, Latency::from_hist(&h)))
        .collect())
}

fn read_report(p: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// Runs `soak-report`: prints the verdict; Ok(true) when the soak passed.
pub fn run(a: &SoakArgs) -> Result<bool> {
    let samples = parse_samples(&std::fs::read_to_string(a.dir.join("samples.csv"))?)?;
    let events = parse_events(&std::fs::read_to_string(a.dir.join("events.csv"))?)?;
    let ph = Phases::from_events(&events)?;
    let nodes = samples.iter().map(|s| s.node + 1).max().unwrap_or(0);
    let mut checks = Vec::new();

    // Nodes.
    for n in 0..nodes {
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.node == n).collect();
        let dead = mine.iter().filter(|s| !s.alive).count();
        let dead_event = events
            .iter()
            .any(|e| e.name == "node_dead" && e.detail == n.to_string());
        let unanswered = mine.iter().filter(|s| s.rss.is_none()).count();
        checks.push(Check::new(
            format!("node {n}: alive"),
            dead == 0 && !dead_event,
            format!(
                "{} samples, {dead} with the process gone, {unanswered} scrapes unanswered",
                mine.len()
            ),
        ));
        let base = |f| values(&samples, n, ph.ready, ph.load_start, f);
        let end = |f| values(&samples, n, ph.settled, ph.stop, f);
        checks.push(back_to_baseline(
            "open fds",
            n,
            &base(|s| s.fds),
            &end(|s| s.fds),
            a.fds_tolerance,
        ));
        checks.push(back_to_baseline(
            "tasks",
            n,
            &base(|s| s.tasks),
            &end(|s| s.tasks),
            a.tasks_tolerance,
        ));
        // A short soak keeps most of its loaded phase: at most a fifth is warm-up.
        let load = ph.load_end.saturating_sub(ph.load_start);
        let from = ph.load_start + (a.warmup.as_millis() as u64).min(load / 5);
        let rss: Vec<(u64, u64)> = mine
            .iter()
            .filter_map(|s| s.rss.map(|r| (s.t_ms, r)))
            .collect();
        checks.push(rss_flat(
            n,
            &rss,
            from,
            ph.load_end,
            a.rss_rel,
            a.rss_abs_mib,
        ));
    }
    if nodes == 0 {
        checks.push(Check::new("nodes", false, "no samples"));
    }

    // Generator runs.
    let stream = read_report(&a.dir.join("stream.json"));
    let plain = read_report(&a.dir.join("plain.json"));
    match &stream {
        Ok(r) => checks.extend(fanout_checks("stream", r, true, true)),
        Err(e) => checks.push(Check::new("stream", false, format!("{e:#}"))),
    }
    match &plain {
        Ok(r) => checks.extend(fanout_checks("plain across restarts", r, false, false)),
        Err(e) => checks.push(Check::new("plain", false, format!("{e:#}"))),
    }
    let segments = events.iter().filter(|e| e.name == "segment_start");
    for e in segments {
        match read_report(&a.dir.join(format!("{}.json", e.detail))) {
            Ok(r) => checks.extend(fanout_checks(
                &format!("plain {}", e.detail),
                &r,
                true,
                false,
            )),
            Err(err) => checks.push(Check::new(e.detail.clone(), false, format!("{err:#}"))),
        }
    }
    match read_report(&a.dir.join("churn.json")) {
        Ok(r) => checks.push(Check::new(
            "churn: cycles completed",
            r.connect.succeeded > 0,
            format!(
                "{} of {} cycles, {:.1}/s; failures (reported) {:?}",
                r.connect.succeeded, r.connect.attempted, r.connect.rate_per_s, r.connect.failures
            ),
        )),
        Err(e) => checks.push(Check::new("churn", false, format!("{e:#}"))),
    }

    // Latency per window, reported.
    let load_ms = ph.load_end.saturating_sub(ph.load_start);
    let width_ms = a
        .window
        .map(|w| w.as_millis() as u64)
        .unwrap_or((load_ms / 30).max(10_000))
        .max(1000);
    let restarts: Vec<f64> = events
        .iter()
        .filter(|e| e.name == "redis_stop")
        .map(|e| e.t_ms.saturating_sub(ph.load_start) as f64 / 1000.0)
        .collect();
    let mut lat = Vec::new();
    for (name, r) in [("stream", &stream), ("plain", &plain)] {
        if let Ok(r) = r {
            lat.push((name, windows(r, ph.load_start, width_ms)?));
        }
    }
    let at: Vec<String> = restarts.iter().map(|t| format!("{t:.0} s")).collect();
    println!(
        "soak: {nodes} nodes, {:.0} s of load, {} Redis restarts{}",
        load_ms as f64 / 1000.0,
        restarts.len(),
        if at.is_empty() {
            String::new()
        } else {
            format!(" (at {})", at.join(", "))
        }
    );
    println!(
        "latency per {} s window, ms (p50 / p99 / max; not asserted):",
        width_ms / 1000
    );
    for (name, w) in &lat {
        let cells: Vec<String> = w
            .iter()
            .map(|(t, l)| format!("{t:.0}s {:.1}/{:.1}/{:.0}", l.p50_ms, l.p99_ms, l.max_ms))
            .collect();
        println!("  {name}: {}", cells.join("  "));
    }
    let ok = checks.iter().all(|c| c.ok);
    for c in &checks {
        println!(
            "  [{}] {}: {}",
            if c.ok { "ok" } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    println!("{}", if ok { "SOAK PASSED" } else { "SOAK FAILED" });
    if let Some(p) = &a.chart {
        let plot = Plot {
            samples: &samples,
            nodes,
            origin_ms: ph.load_start,
            end_s: ph.stop.saturating_sub(ph.load_start) as f64 / 1000.0,
            start_s: -(ph.load_start.saturating_sub(ph.ready) as f64 / 1000.0),
            restarts: &restarts,
            latency: &lat,
        };
        plot.draw(p)
            .with_context(|| format!("drawing {}", p.display()))?;
    }
    Ok(ok)
}

/// What the plot shows.
struct Plot<'a> {
    samples: &'a [Sample],
    nodes: usize,
    origin_ms: u64,
    start_s: f64,
    end_s: f64,
    restarts: &'a [f64],
    latency: &'a [(&'a str, Vec<(f64, Latency)>)],
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

impl Plot<'_> {
    fn x(&self, t_ms: u64) -> f64 {
        (t_ms as f64 - self.origin_ms as f64) / 1000.0
    }

    fn per_node(&self, f: fn(&Sample) -> Option<f64>) -> Vec<(String, Vec<(f64, f64)>)> {
        (0..self.nodes)
            .map(|n| {
                let pts = self
                    .samples
                    .iter()
                    .filter(|s| s.node == n)
                    .filter_map(|s| f(s).map(|v| (self.x(s.t_ms), v)))
                    .collect();
                (format!("node {n}"), pts)
            })
            .collect()
    }

    /// Deliveries/s of all nodes, from the counters' differences between samples.
    fn deliveries(&self) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut pts = Vec::new();
        for n in 0..self.nodes {
            let mine: Vec<&Sample> = self
                .samples
                .iter()
                .filter(|s| s.node == n && s.delivered.is_some())
                .collect();
            for w in mine.windows(2) {
                let (a, b) = (w[0], w[1]);
                let dt = b.t_ms.saturating_sub(a.t_ms) as f64 / 1000.0;
                let dv = b
                    .delivered
                    .unwrap_or(0)
                    .saturating_sub(a.delivered.unwrap_or(0));
                if dt > 0.0 {
                    pts.push((self.x(b.t_ms), n, dv as f64 / dt));
                }
            }
        }
        // Sum per sampling round: nodes sampled together fall within a second.
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut sum: Vec<(f64, f64)> = Vec::new();
        for (t, _, v) in pts {
            match sum.last_mut() {
                Some(last) if t - last.0 < 1.0 => last.1 += v,
                _ => sum.push((t, v)),
            }
        }
        vec![("all nodes".to_string(), sum)]
    }

    fn draw(&self, path: &Path) -> Result<()> {
        let text = font_ready();
        let root = BitMapBackend::new(path, (1400, 1500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let root = if text {
            root.titled(
                "wsgate soak: nodes over time (Redis restarts dashed; 0 s = load start)",
                (FAMILY, 22),
            )
            .map_err(|e| anyhow!("{e}"))?
        } else {
            root
        };
        let panels = root.split_evenly((5, 1));
        let mib = |s: &Sample| s.rss.map(|r| r as f64 / (1024.0 * 1024.0));
        self.panel(&panels[0], "RSS (MiB)", &self.per_node(mib), false)?;
        self.panel(
            &panels[1],
            "open fds",
            &self.per_node(|s| s.fds.map(|v| v as f64)),
            false,
        )?;
        self.panel(
            &panels[2],
            "tokio tasks",
            &self.per_node(|s| s.tasks.map(|v| v as f64)),
            false,
        )?;
        self.panel(&panels[3], "deliveries / s", &self.deliveries(), false)?;
        let mut lat = Vec::new();
        for (name, w) in self.latency {
            for (q, f) in [
                ("p50", (|l: &Latency| l.p50_ms) as fn(&Latency) -> f64),
                ("p99", |l: &Latency| l.p99_ms),
            ] {
                lat.push((
                    format!("{name} {q}"),
                    w.iter()
                        .filter(|(_, l)| l.count > 0)
                        .map(|(t, l)| (*t, f(l).max(0.01)))
                        .collect(),
                ));
            }
        }
        self.panel(&panels[4], "latency per window (ms, log)", &lat, true)?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    fn panel(
        &self,
        area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
        what: &str,
        series: &[(String, Vec<(f64, f64)>)],
        log: bool,
    ) -> Result<()> {
        let all = || series.iter().flat_map(|s| s.1.iter().map(|p| p.1));
        let hi = all().fold(1.0, f64::max) * if log { 2.0 } else { 1.1 };
        let lo = if log {
            all().fold(hi, f64::min).max(0.01) / 2.0
        } else {
            0.0
        };
        let mut c = ChartBuilder::on(area);
        c.margin(10);
        if text_on() {
            c.x_label_area_size(35).y_label_area_size(70);
        }
        let x = self.start_s.min(0.0)..self.end_s.max(1.0);
        if log {
            let mut chart = c
                .build_cartesian_2d(x, (lo..hi).log_scale())
                .map_err(|e| anyhow!("{e}"))?;
            mesh(&mut chart.configure_mesh(), what)?;
            restart_marks(&mut chart, self.restarts, lo, hi)?;
            lines(&mut chart, series)
        } else {
            let mut chart = c
                .build_cartesian_2d(x, lo..hi)
                .map_err(|e| anyhow!("{e}"))?;
            mesh(&mut chart.configure_mesh(), what)?;
            restart_marks(&mut chart, self.restarts, lo, hi)?;
            lines(&mut chart, series)
        }
    }
}

fn text_on() -> bool {
    font_ready()
}

fn mesh<X, Y>(
    m: &mut plotters::chart::MeshStyle<'_, '_, X, Y, BitMapBackend<'_>>,
    what: &str,
) -> Result<()>
where
    X: plotters::coord::ranged1d::Ranged<ValueType = f64>
        + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>
        + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    if text_on() {
        m.x_desc("seconds since the load started")
            .y_desc(what)
            .label_style((FAMILY, 13))
            .axis_desc_style((FAMILY, 15));
    } else {
        m.x_labels(0).y_labels(0);
    }
    m.light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

/// A dashed vertical line at each Redis restart, from `lo` to `hi`.
fn restart_marks<'a, Y>(
    chart: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    restarts: &[f64],
    lo: f64,
    hi: f64,
) -> Result<()>
where
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for &r in restarts {
        chart
            .draw_series(DashedLineSeries::new(
                [(r, lo), (r, hi)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

fn lines<'a, Y>(
    chart: &mut ChartContext<
        'a,
        BitMapBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()>
where
    Y: plotters::coord::ranged1d::Ranged<ValueType = f64>,
{
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let s = chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
        if text_on() {
            s.label(name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text_on() {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 13))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn samples_and_events_parse() {
        let s = parse_samples(
            "t_ms,node,alive,rss_bytes,open_fds,tasks,connections,delivered_total,redis_up\n\
             2000,1,1,1048576,30,12,4,100,1\n\
             1000,0,0,,,,,,\n",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].node, 0);
        assert!(!s[0].alive);
        assert_eq!(s[0].rss, None);
        assert_eq!(s[1].rss, Some(MIB));
        assert_eq!(s[1].tasks, Some(12));
        let e =
            parse_events("t_ms,event,detail\n5,nodes_ready,3\n6,segment_start,seg-0\n").unwrap();
        assert_eq!(e[1].name, "segment_start");
        assert_eq!(e[1].detail, "seg-0");
        assert!(Phases::from_events(&e).is_err(), "no load_start");
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(vec![3, 1, 2]), Some(2.0));
        assert_eq!(median(vec![4, 1, 3, 2]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn baseline_rule_allows_the_tolerance_only() {
        assert!(back_to_baseline("fds", 0, &[20, 21, 20], &[24, 25], 5).ok);
        assert!(!back_to_baseline("fds", 0, &[20, 21, 20], &[26, 26], 5).ok);
        assert!(!back_to_baseline("tasks", 0, &[], &[26], 5).ok);
    }

    #[test]
    fn rss_rule_compares_late_with_early_windows() {
        // 100 s of load sampled every second: 0–20% is ignored (the fill-up).
        let flat: Vec<(u64, u64)> = (0..100)
            .map(|t| (t * 1000, if t < 20 { 10 * MIB } else { 50 * MIB }))
            .collect();
        assert!(rss_flat(0, &flat, 0, 100_000, 0.10, 8.0).ok);
        // Within 10% + 8 MiB: 50 → 62 MiB passes, 50 → 64 MiB fails.
        let grow = |end: u64| -> Vec<(u64, u64)> {
            (0..100)
                .map(|t| (t * 1000, if t >= 80 { end * MIB } else { 50 * MIB }))
                .collect()
        };
        assert!(rss_flat(0, &grow(62), 0, 100_000, 0.10, 8.0).ok);
        assert!(!rss_flat(0, &grow(64), 0, 100_000, 0.10, 8.0).ok);
        // A steady leak fails.
        let leak: Vec<(u64, u64)> = (0..100).map(|t| (t * 1000, (50 + t) * MIB)).collect();
        assert!(!rss_flat(0, &leak, 0, 100_000, 0.10, 8.0).ok);
        assert!(!rss_flat(0, &[], 0, 100_000, 0.10, 8.0).ok);
    }

    fn fanout_report(lost: u64, gaps: u64, resets: u64) -> Report {
        let mut r = Report::default();
        let mut f = crate::report::Fanout {
            published: 100,
            expected: 1000,
            lost,
            ..Default::default()
        };
        f.streams.messages = 1000;
        f.streams.gaps = gaps;
        f.streams.resets = resets;
        r.fanout = Some(f);
        r
    }

    #[test]
    fn fanout_checks_fail_on_loss_gaps_and_resets() {
        let all_ok = |c: Vec<Check>| c.iter().all(|c| c.ok);
        assert!(all_ok(fanout_checks(
            "s",
            &fanout_report(0, 0, 0),
            true,
            true
        )));
        assert!(!all_ok(fanout_checks(
            "s",
            &fanout_report(1, 0, 0),
            true,
            true
        )));
        assert!(!all_ok(fanout_checks(
            "s",
            &fanout_report(0, 1, 0),
            true,
            true
        )));
        assert!(!all_ok(fanout_checks(
            "s",
            &fanout_report(0, 0, 1),
            true,
            true
        )));
        // Plain across restarts: loss reported, not a failure.
        assert!(all_ok(fanout_checks(
            "p",
            &fanout_report(7, 0, 0),
            false,
            false
        )));
        // A run that published nothing proves nothing.
        let mut idle = fanout_report(0, 0, 0);
        idle.fanout.as_mut().unwrap().published = 0;
        assert!(!all_ok(fanout_checks("s", &idle, true, true)));
    }

    #[test]
    fn latency_windows_merge_seconds() {
        let mut r = Report {
            t0_unix_ms: 10_000,
            ..Default::default()
        };
        for i in 0..6u64 {
            let mut h = new_hist();
            h.record(1000 * (i + 1)).unwrap();
            r.raw.hist_seconds.push(crate::report::encode_hist(&h));
        }
        // Origin 1 s before t0, 3 s windows: seconds 0–1 | 2–4 | 5.
        let w = windows(&r, 9_000, 3_000).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].1.count, 2);
        assert_eq!(w[1].1.count, 3);
        assert_eq!(w[1].0, 3.0);
        assert!((w[2].1.max_ms - 6.0).abs() < 0.01);
    }
}
