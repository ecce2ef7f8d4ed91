//! Scenario `churn`: connect, subscribe, disconnect — over and over, at a rate (or as
//! fast as `--concurrency` workers go) for `--duration`. Measures completed cycles
//! per second and the latency of connect + handshake + subscribe.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::session;
use crate::cli::ChurnArgs;
use crate::report::{Connect, Report, Steady};
use crate::run::{self, Ctx, Monitor};
use crate::stats::now_ns;
use crate::wsconn::OP_CLOSE;

#[derive(Default)]
struct Worker {
    attempted: u64,
    succeeded: u64,
    failures: BTreeMap<String, u64>,
    max_lag_ms: f64,
}

/// Runs the scenario and returns this process's report.
pub async fn run(ctx: Arc<Ctx>, a: ChurnArgs) -> Result<Report> {
    let split = ctx.common.split;
    // The rate is for the whole run; each process takes its share.
    let rate = a.rate / split.n as f64;
    ctx.wait_start().await;
    let phase = ctx.common.duration;
    let bar = ctx.bar(phase.as_secs(), "churn");
    let monitor = Monitor::start(&ctx, bar, "cycles");
    let start = monitor.started;
    let end = start + phase;
    let slot = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..a.concurrency.max(1))
        .map(|w| {
            let (c, slot) = (Arc::clone(&ctx), Arc::clone(&slot));
            let topics = a.topics;
            tokio::spawn(async move {
                let mut me = Worker::default();
                let mut rec = c.timeline.recorder(w);
                loop {
                    let k = slot.fetch_add(1, Ordering::Relaxed);
                    if rate > 0.0 {
                        let due = start + Duration::from_secs_f64(k as f64 / rate);
                        if due >= end {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        me.max_lag_ms = me.max_lag_ms.max(due.elapsed().as_secs_f64() * 1000.0);
                    } else if Instant::now() >= end {
                        break;
                    }
                    // Global cycle index, so split processes use different topics/URLs.
                    let g = k as usize * split.n + split.k;
                    let url = &c.urls[g % c.urls.len()];
                    let topic: Vec<String> = (topics > 0)
                        .then(|| c.topic(g % topics))
                        .into_iter()
                        .collect();
                    let started = now_ns();
                    me.attempted += 1;
                    match session::open(&c, url, &topic, None).await {
                        Ok(mut s) => {
                            let now = now_ns();
                            rec.record(now, (now - started) / 1000);
                            me.succeeded += 1;
                            c.open.fetch_add(1, Ordering::Relaxed);
                            // A clean close: our close frame, then the server's.
                            let bye = async {
                                s.ws.send(OP_CLOSE, &1000u16.to_be_bytes()).await?;
                                loop {
                                    if s.ws.read_frame().await?.opcode == OP_CLOSE {
                                        return Ok::<(), std::io::Error>(());
                                    }
                                }
                            };
                            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
                            c.open.fetch_sub(1, Ordering::Relaxed);
                        }
                        Err(f) => *me.failures.entry(f.as_str().to_string()).or_default() += 1,
                    }
                }
                me
            })
        })
        .collect();
    let mut connect = Connect::default();
    let mut max_lag_ms: f64 = 0.0;
    for w in workers {
        let w = w.await?;
        connect.attempted += w.attempted;
        connect.succeeded += w.succeeded;
        for (k, v) in w.failures {
            connect.failed += v;
            *connect.failures.entry(k).or_default() += v;
        }
        max_lag_ms = max_lag_ms.max(w.max_lag_ms);
    }
    let wall_s = monitor.started.elapsed().as_secs_f64();
    let (first, samples) = monitor.stop().await;
    let mut r = Report {
        duration_s: phase.as_secs() as u32,
        steady: Steady::new(
            phase.as_secs() as u32,
            ctx.common.warmup.as_secs() as u32,
            ctx.common.tail.as_secs() as u32,
        ),
        ..Report::default()
    };
    r.set_seconds(&ctx.timeline.take_seconds());
    run::fill_from_samples(&ctx, &mut r, &first, &samples, wall_s);
    let steady = r.steady.range();
    let steady_events: u64 = r
        .timeline
        .get(steady.clone())
        .unwrap_or(&[])
        .iter()
        .map(|s| s.events)
        .sum();
    connect.rate_per_s = steady_events as f64 / steady.len().max(1) as f64;
    connect.overloaded_retries = ctx.overloaded.load(std::sync::atomic::Ordering::Relaxed);
    r.connect = connect;
    if rate > 0.0 && max_lag_ms > 100.0 {
        r.notes.push(format!(
            "cycles started up to {max_lag_ms:.0} ms late: --concurrency too low for --rate, or the server is saturated"
        ));
    }
    run::scrape_metrics(&ctx, &mut r).await;
    run::finish(&ctx, &mut r, "churn")?;
    Ok(r)
}
