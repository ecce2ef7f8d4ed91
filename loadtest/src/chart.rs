//! PNG chart of a report: throughput (or open connections) over time on top,
//! latency percentiles (log scale) below, the steady window shaded.
//!
//! Text uses `ab_glyph` with a TrueType font found at run time (no system font
//! library needed at build time): `$WSGATE_LOADTEST_FONT`, else `fc-match`, else a
//! few usual paths. Without any font the chart is drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::report::Report;

pub(crate) const FAMILY: &str = "sans-serif";

/// Registers a font once; false when none was found.
pub(crate) fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let Some(path) = find_font() else {
            eprintln!(
                "chart: no TrueType font found (set WSGATE_LOADTEST_FONT); drawing without text"
            );
            return false;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return false;
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes).is_ok()
    })
}

fn find_font() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WSGATE_LOADTEST_FONT") {
        return Some(p.into());
    }
    if let Ok(out) = std::process::Command::new("fc-match")
        .args(["-f", "%{file}", "sans-serif:style=Regular"])
        .output()
    {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("ttf")) && p.is_file() {
            return Some(p);
        }
    }
    [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

/// Draws `report` into a PNG at `path`.
pub fn render(report: &Report, path: &Path) -> Result<()> {
    if report.scale.is_some() {
        return render_scale(report, path);
    }
    let text = font_ready();
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (top, bottom) = root.split_vertically(400);
    let n = report.timeline.len().max(1) as f64;
    let idle = report.scenario == "idle";
    let series: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|s| {
            (
                f64::from(s.t) + 0.5,
                if idle {
                    s.connections as f64
                } else {
                    s.events as f64
                },
            )
        })
        .collect();
    let what = match report.scenario.as_str() {
        "idle" => "open connections",
        "churn" => "connect cycles / s",
        _ => "deliveries / s",
    };
    let steady = (
        f64::from(report.steady.from_s),
        f64::from(report.steady.to_s),
    );
    let title = title(report);

    linear_panel(&top, text, Some(&title), n, steady, what, series)?;

    let lat = |f: fn(&crate::report::Latency) -> f64| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .filter(|s| s.latency.count > 0)
            .map(|s| (f64::from(s.t) + 0.5, f(&s.latency).max(0.001)))
            .collect()
    };
    let lines = [
        ("p50", lat(|l| l.p50_ms), GREEN),
        ("p90", lat(|l| l.p90_ms), BLUE),
        ("p99", lat(|l| l.p99_ms), RGBColor(230, 120, 0)),
        ("p99.9", lat(|l| l.p999_ms), RED),
    ];
    latency_panel(
        &bottom,
        text,
        n,
        steady,
        45,
        SeriesLabelPosition::UpperRight,
        lines,
    )?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn title(r: &Report) -> String {
    let name = if r.label.is_empty() {
        String::new()
    } else {
        format!("{} — ", r.label)
    };
    if let Some(rs) = &r.resume {
        return format!(
            "{name}{} vs {}: live topic; {}/{} clients resumed {} missed, {}",
            r.scenario,
            r.target,
            rs.completed,
            rs.clients,
            rs.missed_per_topic,
            rs.completion_s
                .map_or("NOT ALL".to_string(), |c| format!("all within {c:.2} s")),
        );
    }
    if let (Some(sc), Some(f)) = (&r.scale, &r.fanout) {
        return format!(
            "{name}scale: {} connections held on {} nodes, {:.0} deliveries/s, p99 {:.1} ms, lost {}, late {}",
            sc.held, sc.nodes, f.deliveries_per_s_steady, f.latency.p99_ms, f.lost, sc.late
        );
    }
    match &r.fanout {
        Some(f) => format!(
            "{name}{} vs {}: {:.0} deliveries/s steady, p99 {:.2} ms (steady window shaded)",
            r.scenario, r.target, f.deliveries_per_s_steady, f.latency.p99_ms
        ),
        None => format!(
            "{name}{} vs {}: {:.0} connects/s, connect p99 {:.2} ms",
            r.scenario, r.target, r.connect.rate_per_s, r.connect.latency.p99_ms
        ),
    }
}

type Chart<'a, Y> =
    ChartContext<'a, BitMapBackend<'a>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

fn draw_mesh<Y>(chart: &mut Chart<'_, Y>, text: bool, x: &str, y: &str) -> Result<()>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc(x)
            .y_desc(y)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| anyhow!("{e}"))
}

fn shade<Y>(chart: &mut Chart<'_, Y>, (from, to): (f64, f64), lo: f64, hi: f64) -> Result<()>
where
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(std::iter::once(Rectangle::new(
            [(from, lo), (to, hi)],
            RGBColor(120, 200, 120).mix(0.15).filled(),
        )))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The `scale` chart: four panels over time — open connections, deliveries per
/// second, latency percentiles (log), the nodes' RSS — the steady window shaded.
fn render_scale(report: &Report, path: &Path) -> Result<()> {
    let text = font_ready();
    let root = BitMapBackend::new(path, (1200, 1400)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (head, body) = root.split_vertically(40);
    if text {
        head.titled(&title(report), (FAMILY, 20))
            .map_err(|e| anyhow!("{e}"))?;
    }
    let panels = body.split_evenly((4, 1));
    let n = report.timeline.len().max(1) as f64;
    let steady = (
        f64::from(report.steady.from_s),
        f64::from(report.steady.to_s),
    );
    let at = |s: &crate::report::Second| f64::from(s.t) + 0.5;
    let conns: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|s| (at(s), s.connections as f64))
        .collect();
    let rate: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .map(|s| (at(s), s.events as f64))
        .collect();
    let rss: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .filter_map(|s| Some((at(s), s.server_rss_kib? as f64 / 1024.0)))
        .collect();
    linear_panel(&panels[0], text, None, n, steady, "open connections", conns)?;
    linear_panel(&panels[1], text, None, n, steady, "deliveries / s", rate)?;
    let lat = |f: fn(&crate::report::Latency) -> f64| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .filter(|s| s.latency.count > 0)
            .map(|s| (at(s), f(&s.latency).max(0.001)))
            .collect()
    };
    let lines = [
        ("p50", lat(|l| l.p50_ms), GREEN),
        ("p99", lat(|l| l.p99_ms), RGBColor(230, 120, 0)),
        ("p99.9", lat(|l| l.p999_ms), RED),
    ];
    latency_panel(
        &panels[2],
        text,
        n,
        steady,
        35,
        SeriesLabelPosition::UpperLeft,
        lines,
    )?;
    linear_panel(
        &panels[3],
        text,
        None,
        n,
        steady,
        "nodes' RSS (MiB, all)",
        rss,
    )?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// One latency line: its name, its points (seconds, ms), its colour.
type Percentile<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// A latency panel: one line per percentile (ms, log scale), the steady window shaded,
/// a legend at `legend`.
fn latency_panel<const N: usize>(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    text: bool,
    n: f64,
    steady: (f64, f64),
    x_label_size: u32,
    legend: SeriesLabelPosition,
    lines: [Percentile<'_>; N],
) -> Result<()> {
    let lmax = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 2.0;
    let lmin = lines
        .iter()
        .flat_map(|l| l.1.iter().map(|p| p.1))
        .fold(lmax, f64::min)
        / 2.0;
    let mut c = ChartBuilder::on(area);
    c.margin(10);
    if text {
        c.x_label_area_size(x_label_size).y_label_area_size(80);
    }
    let mut chart = c
        .build_cartesian_2d(0f64..n, (lmin.max(0.001)..lmax).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    draw_mesh(&mut chart, text, "seconds", "latency (ms, log)")?;
    shade(&mut chart, steady, lmin.max(0.001), lmax)?;
    for (name, points, color) in lines {
        let s = chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?;
        if text {
            s.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .position(legend)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// One series over time on a linear scale, the steady window shaded; the chart's
/// title above it when `caption` is given.
fn linear_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    text: bool,
    caption: Option<&str>,
    n: f64,
    steady: (f64, f64),
    what: &str,
    points: Vec<(f64, f64)>,
) -> Result<()> {
    let ymax = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut c = ChartBuilder::on(area);
    c.margin(10);
    if text {
        match caption {
            Some(title) => c.caption(title, (FAMILY, 20)).x_label_area_size(45),
            None => c.x_label_area_size(35),
        }
        .y_label_area_size(80);
    }
    let mut chart = c
        .build_cartesian_2d(0f64..n, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    draw_mesh(&mut chart, text, "seconds", what)?;
    shade(&mut chart, steady, 0.0, ymax)?;
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
