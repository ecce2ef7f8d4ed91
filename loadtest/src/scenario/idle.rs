//! Scenario `idle`: ramp to N connections (each subscribed to a topic unless
//! `--topics 0`), let them settle, hold them idle for `--duration`, and measure the
//! connect rate, the failures, the server's memory per connection and its CPU while
//! nothing happens but heartbeats.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wsconn::OP_CLOSE;
use anyhow::Result;
use indicatif::ProgressBar;
use tokio::sync::Semaphore;

use super::session;
use crate::cli::IdleArgs;
use crate::net::Failure;
use crate::report::{Connect, Idle, Report, Steady};
use crate::run::{self, pace, Ctx, Monitor};
use crate::stats::now_ns;
use crate::sysmon;

/// How one held connection ended.
enum Held {
    Failed(Failure),
    /// Stayed open until the end.
    Kept,
    /// The server closed it during the run.
    Dropped,
}

/// Runs the scenario and returns this process's report.
pub async fn run(ctx: Arc<Ctx>, a: IdleArgs) -> Result<Report> {
    let split = ctx.common.split;
    let mine: Vec<usize> = (0..a.connections).filter(|i| split.owns(*i)).collect();
    let ticks = sysmon::ticks_per_second();
    ctx.wait_start().await;
    let self_rss_before = sysmon::self_rss_kib();
    // t0 is the start of the ramp: the timeline shows connects per second.
    let monitor = Monitor::start(&ctx, ProgressBar::hidden(), "connects");
    let bar = ctx.bar(mine.len() as u64, "connect");
    let done = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(Semaphore::new(ctx.common.connect_concurrency.max(1)));
    let ramp_start = Instant::now();
    let mut tasks = Vec::with_capacity(mine.len());
    for (k, &i) in mine.iter().enumerate() {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        pace(ramp_start, ctx.common.connect_rate, k as u64).await;
        bar.set_position(done.load(Ordering::Relaxed) as u64);
        let (c, done) = (Arc::clone(&ctx), Arc::clone(&done));
        let topics: Vec<String> = (a.topics > 0)
            .then(|| c.topic(i % a.topics))
            .into_iter()
            .collect();
        tasks.push(tokio::spawn(async move {
            let url = &c.urls[i % c.urls.len()];
            let started = now_ns();
            let opened = session::open(&c, url, &topics, None).await;
            drop(permit);
            let mut s = match opened {
                Ok(s) => s,
                Err(f) => {
                    done.fetch_add(1, Ordering::Relaxed);
                    return Held::Failed(f);
                }
            };
            let now = now_ns();
            let mut rec = c.timeline.recorder(i);
            rec.record(now, (now - started) / 1000);
            drop(rec);
            c.open.fetch_add(1, Ordering::Relaxed);
            done.fetch_add(1, Ordering::Relaxed);
            // Hold: read (answering pings automatically) until the end of the run.
            let held = loop {
                tokio::select! {
                    _ = c.cancel.cancelled() => break Held::Kept,
                    f = s.ws.read_frame() => match f {
                        Ok(f) if f.opcode == OP_CLOSE => break Held::Dropped,
                        Ok(_) => {}
                        Err(_) => break Held::Dropped,
                    },
                }
            };
            c.open.fetch_sub(1, Ordering::Relaxed);
            held
        }));
    }
    while done.load(Ordering::Relaxed) < mine.len() {
        bar.set_position(done.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let ramp_s = ramp_start.elapsed().as_secs_f64();
    let connected = ctx.open.load(Ordering::Relaxed);

    tokio::time::sleep(a.settle).await;
    let hold_from_s = monitor.started.elapsed().as_secs_f64().ceil() as u32;
    let servers_at = || -> Vec<Option<sysmon::ProcSample>> {
        ctx.common
            .server_pid
            .iter()
            .map(|p| sysmon::sample(*p, ticks))
            .collect()
    };
    let before_hold = servers_at();
    let self_rss_after = sysmon::self_rss_kib();
    let hold_started = Instant::now();
    let bar = ctx.bar(ctx.common.duration.as_secs(), "hold");
    while hold_started.elapsed() < ctx.common.duration {
        bar.set_position(hold_started.elapsed().as_secs());
        bar.set_message(format!("{} conns", ctx.open.load(Ordering::Relaxed)));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bar.finish_and_clear();
    let after_hold = servers_at();
    let hold_s = hold_started.elapsed().as_secs_f64();
    let held_at_end = ctx.open.load(Ordering::Relaxed);
    ctx.cancel.cancel();
    let mut connect = Connect {
        attempted: mine.len() as u64,
        overloaded_retries: ctx.overloaded.load(Ordering::Relaxed),
        ..Connect::default()
    };
    let mut dropped = 0;
    for t in tasks {
        match t.await? {
            Held::Failed(f) => {
                connect.failed += 1;
                *connect.failures.entry(f.as_str().to_string()).or_default() += 1;
            }
            Held::Kept => connect.succeeded += 1,
            Held::Dropped => {
                connect.succeeded += 1;
                dropped += 1;
            }
        }
    }
    let wall_s = monitor.started.elapsed().as_secs_f64();
    let (first, samples) = monitor.stop().await;

    let total_s = samples.len() as u32;
    let mut r = Report {
        duration_s: total_s,
        // The steady window is the hold.
        steady: Steady {
            from_s: hold_from_s.min(total_s.saturating_sub(1)),
            to_s: total_s.max(1),
        },
        ..Report::default()
    };
    r.set_seconds(&ctx.timeline.take_seconds());
    run::fill_from_samples(&ctx, &mut r, &first, &samples, wall_s);
    connect.rate_per_s = connect.succeeded as f64 / ramp_s.max(1e-9);
    r.connect = connect;
    let sum =
        |v: &[Option<sysmon::ProcSample>], f: fn(&sysmon::ProcSample) -> f64| -> Option<f64> {
            (!v.is_empty())
                .then(|| v.iter().map(|p| p.as_ref().map(f)).sum::<Option<f64>>())
                .flatten()
        };
    let rss = |p: &sysmon::ProcSample| p.rss_kib as f64;
    let cpu = |p: &sysmon::ProcSample| p.cpu_s;
    let rss_before = sum(&first.servers, rss).map(|v| v as u64);
    let rss_after = sum(&before_hold, rss).map(|v| v as u64);
    let held = connected.max(1) as f64;
    r.idle = Some(Idle {
        held: held_at_end,
        ramp_s,
        hold_s,
        server_rss_before_kib: rss_before,
        server_rss_after_kib: rss_after,
        server_rss_per_connection_bytes: match (rss_before, rss_after) {
            (Some(b), Some(a)) if connected > 0 => Some(a.saturating_sub(b) as f64 * 1024.0 / held),
            _ => None,
        },
        server_cpu_idle_cores: match (sum(&before_hold, cpu), sum(&after_hold, cpu)) {
            (Some(b), Some(a)) => Some((a - b) / hold_s.max(1e-9)),
            _ => None,
        },
        generator_rss_per_connection_bytes: (connected > 0)
            .then(|| self_rss_after.saturating_sub(self_rss_before) as f64 * 1024.0 / held),
    });
    if dropped > 0 {
        r.notes.push(format!(
            "{dropped} connections were closed by the server while held"
        ));
    }
    run::scrape_metrics(&ctx, &mut r).await;
    run::finish(&ctx, &mut r, "idle")?;
    Ok(r)
}
