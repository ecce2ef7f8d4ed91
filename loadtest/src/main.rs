//! `wsgate-loadtest`: parses the command line, raises the open-file limit, runs one
//! scenario (or merges reports), prints a summary, writes the JSON report and chart.
//!
//! # Layout
//! The work is in the library (`src/lib.rs` has the map); this file only wires it.
#![forbid(unsafe_code)]

use std::path::Path;

use anyhow::{Context as _, Result};
use clap::Parser as _;

use wsgate_loadtest::cli::{Cli, Cmd, Common};
use wsgate_loadtest::report::Report;
use wsgate_loadtest::run::Ctx;
use wsgate_loadtest::scenario::{churn, fanout, idle, resume, scale};
use wsgate_loadtest::{chart, floor, floor_idle, net, summary};

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::SoakReport(a) = &cli.cmd {
        // The verdict is the exit status.
        std::process::exit(if wsgate_loadtest::soak::run(a)? { 0 } else { 1 });
    }
    if let Cmd::Merge(m) = &cli.cmd {
        let parts = m
            .inputs
            .iter()
            .map(|p| read_report(p))
            .collect::<Result<Vec<_>>>()?;
        let report = Report::merge(parts)?;
        return output(&report, m.out.as_deref(), m.chart.as_deref());
    }
    if let Cmd::Table(t) = &cli.cmd {
        let reports = t
            .inputs
            .iter()
            .map(|p| read_report(p))
            .collect::<Result<Vec<_>>>()?;
        print!("{}", summary::table(&reports));
        return Ok(());
    }
    let nofile = net::raise_nofile();
    if let Cmd::Floor(a) = cli.cmd {
        floor::run(a)?;
        return Ok(());
    }
    if let Cmd::FloorIdle(a) = cli.cmd {
        floor_idle::run(a)?;
        return Ok(());
    }
    let common: &Common = match &cli.cmd {
        Cmd::Fanout(a) => &a.common,
        Cmd::Slow(a) => &a.fanout.common,
        Cmd::Idle(a) => &a.common,
        Cmd::Churn(a) => &a.common,
        Cmd::ResumeStorm(a) => &a.common,
        Cmd::Scale(a) => &a.common,
        Cmd::Merge(_) | Cmd::Table(_) | Cmd::Floor(_) | Cmd::FloorIdle(_) | Cmd::SoakReport(_) => {
            unreachable!("handled above")
        }
    };
    let threads = common.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    let ctx = Ctx::new(common.clone(), threads)?;
    let (out, chart_path) = (common.out.clone(), common.chart.clone());
    let mut report = rt.block_on(async move {
        match cli.cmd {
            Cmd::Fanout(a) => fanout::run(ctx, a, None).await,
            Cmd::Slow(a) => {
                let slow = fanout::SlowOpts {
                    share: a.slow_share,
                    after: a.slow_after,
                    rcvbuf: a.slow_rcvbuf,
                    all_topics: a.slow_all_topics,
                };
                fanout::run(ctx, a.fanout, Some(slow)).await
            }
            Cmd::Idle(a) => idle::run(ctx, a).await,
            Cmd::Churn(a) => churn::run(ctx, a).await,
            Cmd::ResumeStorm(a) => resume::run(ctx, a).await,
            Cmd::Scale(a) => scale::run(ctx, a).await,
            Cmd::Merge(_)
            | Cmd::Table(_)
            | Cmd::Floor(_)
            | Cmd::FloorIdle(_)
            | Cmd::SoakReport(_) => {
                unreachable!("handled above")
            }
        }
    })?;
    report.notes.push(format!("open-file limit: {nofile}"));
    // Connections still being torn down must not hold the process.
    rt.shutdown_background();
    output(&report, out.as_deref(), chart_path.as_deref())?;
    if report.resume.as_ref().is_some_and(|r| !r.ok) {
        // The report is written; the exit status says the resume was not exact.
        std::process::exit(1);
    }
    Ok(())
}

fn read_report(p: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

fn output(report: &Report, out: Option<&Path>, chart_path: Option<&Path>) -> Result<()> {
    print!("{}", summary::render(report));
    if let Some(p) = out {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(p, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = chart_path {
        chart::render(report, p).with_context(|| format!("drawing {}", p.display()))?;
    }
    Ok(())
}
