//! Scenarios `fanout` and `slow`: S subscribers over T topics, P publishers.
//!
//! Order of a run: ramp the subscribers (each confirmed subscribed), connect the
//! publishers, wait for `--start-at`, start the monitor (t0), publish for
//! `--duration`, wait (at most `--drain`) for the last deliveries, stop everything,
//! account.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::sync::{watch, Semaphore};

use super::publisher::{Endpoints, Outcome, Plan, Publisher};
use super::session::{self, Received};
use crate::cli::{FanoutArgs, PublishVia};
use crate::net::{Failure, Url};
use crate::proto::Target;
use crate::report::{Connect, Fanout, Latency, Report, SlowGroup, Steady};
use crate::run::{self, pace, Ctx, Monitor};
use crate::seq::SeqCounts;
use crate::stats::new_hist;

/// Options of scenario `slow`.
#[derive(Debug, Clone, Copy)]
pub struct SlowOpts {
    pub share: f64,
    pub after: Duration,
    pub rcvbuf: u32,
    /// Slow subscribers take every topic (more bytes per slow subscriber, so the
    /// server's buffers fill within a bounded run).
    pub all_topics: bool,
}

/// Whether subscriber `i` is one of the slow ones: spread evenly over the indices
/// (and so over topics and split processes).
pub fn is_slow(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

/// What one subscriber task ended with.
struct SubResult {
    topic: usize,
    slow: bool,
    failure: Option<Failure>,
    received: Received,
    /// Slow subscribers: how the server treated them ("4008", "eof", "open", …).
    close: Option<String>,
}

/// Runs the scenario and returns this process's report.
pub async fn run(ctx: Arc<Ctx>, a: FanoutArgs, slow: Option<SlowOpts>) -> Result<Report> {
    if a.topics == 0 || a.subscribers == 0 || a.publishers == 0 || a.batch == 0 {
        bail!("--topics, --subscribers, --publishers and --batch must be at least 1");
    }
    let split = ctx.common.split;
    let endpoints = endpoints(&ctx, &a)?;

    // 1. Subscribers.
    let mine: Vec<usize> = (0..a.subscribers).filter(|i| split.owns(*i)).collect();
    let bar = ctx.bar(mine.len() as u64, "subscribe");
    let ready = Arc::new(AtomicUsize::new(0));
    let connect_hist = Arc::new(Mutex::new(new_hist()));
    let (t0_tx, t0_rx) = watch::channel(None::<u64>);
    let sem = Arc::new(Semaphore::new(ctx.common.connect_concurrency.max(1)));
    let ramp_start = Instant::now();
    let mut subs = Vec::with_capacity(mine.len());
    for (k, &i) in mine.iter().enumerate() {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        pace(ramp_start, ctx.common.connect_rate, k as u64).await;
        bar.set_position(ready.load(Ordering::Relaxed) as u64);
        let (c, ready, hist, mut t0_rx) = (
            Arc::clone(&ctx),
            Arc::clone(&ready),
            Arc::clone(&connect_hist),
            t0_rx.clone(),
        );
        let slow = slow.filter(|s| is_slow(i, s.share));
        let publishers = a.publishers;
        let topic = i % a.topics;
        let topics: Vec<String> = match slow {
            Some(s) if s.all_topics => (0..a.topics).map(|t| ctx.topic(t)).collect(),
            _ => vec![ctx.topic(topic)],
        };
        let sse = a.sse;
        subs.push(tokio::spawn(async move {
            let url = &c.urls[i % c.urls.len()];
            let started = Instant::now();
            if sse {
                let opened = super::sse::open(&c, url, &topics).await;
                drop(permit);
                ready.fetch_add(1, Ordering::Relaxed);
                let mut s = match opened {
                    Ok(s) => s,
                    Err(f) => {
                        return SubResult {
                            topic,
                            slow: false,
                            failure: Some(f),
                            received: Received::default(),
                            close: None,
                        }
                    }
                };
                let us = started.elapsed().as_micros() as u64;
                hist.lock().expect("hist lock").saturating_record(us.max(1));
                c.open.fetch_add(1, Ordering::Relaxed);
                let received = super::sse::receive(&c, &mut s, i, publishers).await;
                c.open.fetch_sub(1, Ordering::Relaxed);
                let close = received.closed_by_server.clone();
                return SubResult {
                    topic,
                    slow: false,
                    failure: None,
                    received,
                    close,
                };
            }
            let opened = session::open(&c, url, &topics, slow.map(|s| s.rcvbuf)).await;
            drop(permit);
            if opened.is_ok() {
                let us = started.elapsed().as_micros() as u64;
                hist.lock().expect("hist lock").saturating_record(us.max(1));
            }
            ready.fetch_add(1, Ordering::Relaxed);
            let mut s = match opened {
                Ok(s) => s,
                Err(f) => {
                    return SubResult {
                        topic,
                        slow: slow.is_some(),
                        failure: Some(f),
                        received: Received::default(),
                        close: None,
                    }
                }
            };
            c.open.fetch_add(1, Ordering::Relaxed);
            let stop_at = match slow {
                Some(so) => {
                    let t0 = tokio::select! {
                        r = t0_rx.wait_for(Option::is_some) => r.ok().and_then(|v| *v),
                        _ = c.cancel.cancelled() => None,
                    };
                    Some(t0.unwrap_or(0) + so.after.as_nanos() as u64)
                }
                None => None,
            };
            let received =
                session::receive(&c, &mut s, i, publishers, slow.is_none(), stop_at).await;
            let close = if received.stalled {
                Some(session::stall(&c, &mut s).await)
            } else {
                received.closed_by_server.clone()
            };
            c.open.fetch_sub(1, Ordering::Relaxed);
            SubResult {
                topic,
                slow: slow.is_some(),
                failure: None,
                received,
                close,
            }
        }));
    }
    while ready.load(Ordering::Relaxed) < mine.len() {
        bar.set_position(ready.load(Ordering::Relaxed) as u64);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish_and_clear();
    let ramp_s = ramp_start.elapsed().as_secs_f64();

    // 2. Publishers.
    let my_pubs: Vec<usize> = (0..a.publishers).filter(|j| split.owns(*j)).collect();
    let per_pub_rate = a.rate / a.publishers as f64;
    let batch = if a.publish_via == PublishVia::Http {
        a.http_batch
    } else {
        a.batch
    };
    let mut pubs = Vec::new();
    for (k, &j) in my_pubs.iter().enumerate() {
        let plan = Plan {
            index: j as u32,
            topic_idx: j % a.topics,
            topic: ctx.topic(j % a.topics),
            rate: per_pub_rate,
            phase: phase(j, a.publishers, per_pub_rate),
            payload: a.payload,
            batch: batch.max(1),
            max_inflight: a.max_inflight.max(1),
            stop: None,
        };
        let p = Publisher::connect(&ctx, plan, &endpoints, k)
            .await
            .with_context(|| format!("publisher {j} could not connect"))?;
        pubs.push(p);
    }

    // 3. Publish.
    ctx.wait_start().await;
    let phase = a.common.duration;
    let bar = ctx.bar((phase + a.drain).as_secs(), "fanout");
    let monitor = Monitor::start(&ctx, bar, "deliveries");
    let _ = t0_tx.send(Some(ctx.timeline.t0_ns()));
    let start = monitor.started;
    let end = start + phase;
    let handles: Vec<_> = pubs
        .into_iter()
        .map(|p| {
            let c = Arc::clone(&ctx);
            tokio::spawn(async move { p.run(&c, start, end).await })
        })
        .collect();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for h in handles {
        outcomes.push(h.await?);
    }
    // Drain: an overloaded server may still hold a backlog; wait until deliveries
    // stop (nothing new for 1 s), at most --drain.
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
    let mut results = Vec::new();
    for h in subs {
        results.push(h.await?);
    }
    let wall_s = monitor.started.elapsed().as_secs_f64();
    let (first, samples) = monitor.stop().await;

    // 4. Account.
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
    r.raw.published_per_topic = vec![0; a.topics];
    r.raw.subscribers_per_topic = vec![0; a.topics];
    let mut f = Fanout {
        publishers: my_pubs.len() as u64,
        topics: a.topics as u64,
        payload_bytes: a.payload as u64,
        ..Fanout::default()
    };
    let mut codes = BTreeMap::new();
    for o in &outcomes {
        r.raw.published_per_topic[o.topic_idx] += o.acked;
        f.sent += o.sent;
        f.publish_errors += o.errors;
        f.unacked += o.sent.saturating_sub(o.acked + o.errors);
        f.max_publish_lag_ms = f.max_publish_lag_ms.max(o.max_lag_ms);
        for (k, v) in &o.error_codes {
            *codes.entry(k.clone()).or_insert(0u64) += v;
        }
    }
    if !codes.is_empty() {
        r.notes.push(format!("publish errors by code: {codes:?}"));
    }
    let mut connect = Connect {
        attempted: (mine.len() + my_pubs.len()) as u64,
        succeeded: my_pubs.len() as u64,
        ..Connect::default()
    };
    let mut slow_group = slow.map(|_| SlowGroup::default());
    let mut fast = SeqCounts::default();
    let mut streams = crate::stream::StreamCounts::default();
    for s in &results {
        if let Some(kind) = s.failure {
            connect.failed += 1;
            *connect
                .failures
                .entry(kind.as_str().to_string())
                .or_default() += 1;
            continue;
        }
        connect.succeeded += 1;
        match (&mut slow_group, s.slow) {
            (Some(g), true) => {
                g.subscribers += 1;
                g.counts.add(&s.received.counts);
                let code = s.close.clone().unwrap_or_else(|| "open".into());
                if code != "open" {
                    g.disconnected += 1;
                }
                *g.close_codes.entry(code).or_default() += 1;
            }
            _ => {
                r.raw.subscribers_per_topic[s.topic] += 1;
                fast.add(&s.received.counts);
                streams.add(&s.received.streams);
                f.subscribers += 1;
                if let Some(code) = &s.received.closed_by_server {
                    *connect
                        .failures
                        .entry(format!("closed_{code}"))
                        .or_default() += 1;
                }
            }
        }
    }
    r.raw.counts = fast;
    f.slow = slow_group;
    f.streams = streams;
    connect.rate_per_s = mine.len() as f64 / ramp_s.max(1e-9);
    let hist = connect_hist.lock().expect("hist lock").clone();
    connect.latency = Latency::from_hist(&hist);
    r.raw.connect_hist = Some(crate::report::encode_hist(&hist));
    connect.overloaded_retries = ctx.overloaded.load(std::sync::atomic::Ordering::Relaxed);
    r.connect = connect;
    r.fanout = Some(f);
    run::scrape_metrics(&ctx, &mut r).await;
    run::finish(&ctx, &mut r, if slow.is_some() { "slow" } else { "fanout" })?;
    if let Some(g) = r.fanout.as_ref().and_then(|f| f.slow.as_ref()) {
        if g.subscribers > 0 && g.disconnected == 0 {
            r.notes
                .push("no slow subscriber was disconnected by the server during the run".into());
        }
    }
    Ok(r)
}

fn endpoints(ctx: &Ctx, a: &FanoutArgs) -> Result<Endpoints> {
    let ws = if a.pub_url.is_empty() {
        ctx.urls.clone()
    } else {
        a.pub_url
            .iter()
            .map(|u| Url::parse(u))
            .collect::<Result<Vec<_>>>()?
    };
    let http = if a.http_url.is_empty() {
        ws.iter()
            .map(|u| Url {
                path: "/api/publish".into(),
                ..u.clone()
            })
            .collect()
    } else {
        a.http_url
            .iter()
            .map(|u| Url::parse(u))
            .collect::<Result<Vec<_>>>()?
    };
    let redis = match a.publish_via {
        PublishVia::Redis => {
            if ctx.common.target == Target::Nats {
                bail!("--publish-via redis needs a Redis-backed server (wsgate or peer)");
            }
            Some(redis::Client::open(a.redis_url.as_str())?)
        }
        _ => None,
    };
    if a.publish_via == PublishVia::Http && ctx.common.target == Target::Nats {
        bail!("NATS has no HTTP publish API here; use --publish-via ws");
    }
    Ok(Endpoints {
        via: a.publish_via,
        ws,
        http,
        api_key: a.api_key.clone(),
        redis,
        redis_prefix: a.redis_prefix.clone(),
        redis_fcall: a.redis_fcall,
    })
}

/// Publisher `j` of `publishers`, each at `rate` per second, starts this long after the
/// common start: together they publish at evenly spaced instants, `publishers * rate`
/// times a second, instead of `publishers` at once.
fn phase(j: usize, publishers: usize, rate: f64) -> Duration {
    if rate > 0.0 && publishers > 0 {
        Duration::from_secs_f64(j as f64 / (publishers as f64 * rate))
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_are_spread_evenly_over_one_period() {
        // 2 publishers at 125/s: one publication every 4 ms between them.
        assert_eq!(phase(0, 2, 125.0), Duration::ZERO);
        assert_eq!(phase(1, 2, 125.0), Duration::from_millis(4));
        // 4 at 250/s: 1 ms apart, the last 3 ms into the 4 ms period.
        let p: Vec<_> = (0..4).map(|j| phase(j, 4, 250.0).as_micros()).collect();
        assert_eq!(p, [0, 1000, 2000, 3000]);
        // Open loop: no schedule to spread.
        assert_eq!(phase(3, 4, 0.0), Duration::ZERO);
    }

    #[test]
    fn slow_share_is_spread_evenly() {
        let slow: Vec<usize> = (0..20).filter(|i| is_slow(*i, 0.25)).collect();
        assert_eq!(slow, [3, 7, 11, 15, 19]);
        assert_eq!((0..1000).filter(|i| is_slow(*i, 0.1)).count(), 100);
        assert_eq!((0..10).filter(|i| is_slow(*i, 0.0)).count(), 0);
    }
}
