//! Scenario `resume-storm`: a node's worth of clients comes back at once and resumes
//! its streams with `since`, while other clients watch a live topic.
//!
//! Order of a run:
//! 1. one publication per stream topic, so that every stream has a position;
//! 2. the live subscribers subscribe, the live publisher starts (`--live-rate`), the
//!    monitor starts (t0: the chart is the live topic's);
//! 3. the `--clients` subscribe to the stream topics (client i to topic i mod T) and
//!    record the position `subscribed` reports; live latency is measured `--before`;
//! 4. all of them disconnect; `--missed` publications are made per topic (HTTP
//!    batches or WebSocket), the last positions noted from the answers;
//! 5. the storm: all clients reconnect at once and subscribe with `since`; each must
//!    receive every missed seq exactly once, in order (gaps, dups and resets counted
//!    per client and topic) up to the last position; completion time per client is
//!    measured from the start of the reconnect, and the live latency during the
//!    storm is kept apart from the latency before it;
//! 6. `--after` more seconds of reading (late duplicates) and live, then the end.
//!
//! Bounded: the storm is given `--duration` to complete, every connect
//! `--connect-timeout`, the publishing of the missed messages 60 s.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::publisher::{Endpoints, Plan, Publisher};
use super::session::{self, Session};
use crate::cli::{PublishVia, ResumeStormArgs};
use crate::http::HttpConn;
use crate::net::{push_frame, Failure, Url};
use crate::payload::{self, encode, Stamp};
use crate::proto::{classify, Op, Target};
use crate::report::{LiveCheck, Report, ResumeStorm, Steady};
use crate::run::{self, Ctx, Monitor};
use crate::seq::{SeqCounts, SeqTracker};
use crate::stats::{new_hist, now_ns};
use crate::stream::{self, Position, StreamCounts, StreamTracker};
use crate::wsconn::{WsConn, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};

/// Live latency phases.
const SETUP: usize = 0;
const BEFORE: usize = 1;
const AWAY: usize = 2;
const DURING: usize = 3;
const AFTER: usize = 4;

/// A stream position: seq within an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pos {
    pub seq: u64,
    pub epoch: String,
}

/// What one storm client ended with.
#[derive(Debug, Default)]
struct ClientResult {
    failure: Option<Failure>,
    /// Reconnect start → `subscribed` reply, µs.
    subscribed_us: Option<u64>,
    recovered: Option<bool>,
    /// The reply's epoch differed from the one the missed publications were made in.
    epoch_changed: bool,
    /// Reconnect start → last missed seq received, µs.
    completed_us: Option<u64>,
    streams: StreamCounts,
    /// Messages received after the reconnect.
    received: u64,
    /// Missed messages owed to this client.
    owed: u64,
    closed_by_server: Option<String>,
}

/// Runs the scenario and returns its report.
pub async fn run(ctx: Arc<Ctx>, a: ResumeStormArgs) -> Result<Report> {
    if a.clients == 0 || a.topics == 0 {
        bail!("--clients and --topics must be at least 1");
    }
    if ctx.common.split.n > 1 {
        bail!("resume-storm does not split over processes (the storm must be one instant)");
    }
    if !ctx.common.target.is_json() {
        bail!("resume-storm needs wsgate's JSON protocol with streams");
    }
    if a.publish_via == PublishVia::Redis {
        bail!("resume-storm publishes the missed messages with --publish-via http or ws");
    }
    let topics: Vec<String> = (0..a.topics).map(|t| ctx.topic(t)).collect();
    let live_topic = a
        .live_topic
        .clone()
        .unwrap_or_else(|| format!("{}live", ctx.topic_prefix));
    let pub_urls = if a.pub_url.is_empty() {
        ctx.urls.clone()
    } else {
        a.pub_url
            .iter()
            .map(|u| Url::parse(u))
            .collect::<Result<Vec<_>>>()?
    };
    let http_url = match a.http_url.first() {
        Some(u) => Url::parse(u)?,
        None => Url {
            path: "/api/publish".into(),
            ..pub_urls[0].clone()
        },
    };

    // 1. Every stream gets a position before the clients subscribe.
    let mut missed_pub = MissedPublisher::connect(&ctx, &a, &pub_urls[0], &http_url).await?;
    let primed = missed_pub.publish(&topics, 1, a.payload).await?;
    if primed.len() < topics.len() {
        bail!(
            "publishing to {} returned no stream position: is --topic-prefix {:?} configured as a stream (a [[namespaces]] entry with history_size)?",
            topics[primed.len().min(topics.len() - 1)],
            ctx.topic_prefix
        );
    }

    // 2. Live subscribers and publisher; t0.
    let phase = Arc::new(AtomicUsize::new(SETUP));
    let live_stop = CancellationToken::new();
    let mut lives = Vec::new();
    let sem = Arc::new(Semaphore::new(ctx.common.connect_concurrency.max(1)));
    for i in 0..a.live_subscribers {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let (c, ph, t) = (Arc::clone(&ctx), Arc::clone(&phase), live_topic.clone());
        lives.push(tokio::spawn(async move {
            let url = &c.urls[i % c.urls.len()];
            let opened = session::open(&c, url, &[t], None).await;
            drop(permit);
            match opened {
                Ok(mut s) => {
                    c.open.fetch_add(1, Ordering::Relaxed);
                    let r = live_receive(&c, &mut s, i, &ph).await;
                    c.open.fetch_sub(1, Ordering::Relaxed);
                    Ok(r)
                }
                Err(f) => Err(f),
            }
        }));
    }
    // Let the live subscriptions settle before publishing.
    let _ = sem
        .acquire_many(ctx.common.connect_concurrency.max(1) as u32)
        .await?;
    let live_pub = if a.live_subscribers > 0 && a.live_rate > 0.0 {
        let endpoints = Endpoints {
            via: PublishVia::Ws,
            ws: pub_urls.clone(),
            http: Vec::new(),
            api_key: a.api_key.clone(),
            redis: None,
            redis_prefix: String::new(),
            redis_fcall: false,
        };
        let plan = Plan {
            index: 0,
            topic_idx: 0,
            topic: live_topic.clone(),
            rate: a.live_rate,
            phase: Duration::ZERO,
            payload: a.payload,
            batch: 64,
            max_inflight: 1024,
            stop: Some(live_stop.clone()),
        };
        Some(
            Publisher::connect(&ctx, plan, &endpoints, 0)
                .await
                .context("the live publisher could not connect")?,
        )
    } else {
        None
    };
    let bar = ctx.bar(0, "storm");
    let monitor = Monitor::start(&ctx, bar, "live deliveries");
    let live_handle = live_pub.map(|p| {
        let c = Arc::clone(&ctx);
        let start = monitor.started;
        // Stopped by `live_stop`; the end is only a bound.
        let end = start + Duration::from_secs(3600);
        tokio::spawn(async move { p.run(&c, start, end).await })
    });

    // 3. The clients subscribe and learn their positions.
    let connect_start = Instant::now();
    let mut opening = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let permit = Arc::clone(&sem).acquire_owned().await?;
        let (c, topic) = (Arc::clone(&ctx), topics[i % topics.len()].clone());
        opening.push(tokio::spawn(async move {
            let url = &c.urls[i % c.urls.len()];
            let r = session::open(&c, url, std::slice::from_ref(&topic), None).await;
            drop(permit);
            r.map(|s| {
                let pos = position(&s, &topic);
                (s, pos)
            })
        }));
    }
    let mut sessions: Vec<Option<Session>> = Vec::with_capacity(a.clients);
    let mut starts: Vec<Option<Pos>> = Vec::with_capacity(a.clients);
    let mut first_failures: BTreeMap<String, u64> = BTreeMap::new();
    for (i, h) in opening.into_iter().enumerate() {
        match h.await? {
            Ok((s, Some(p))) => {
                sessions.push(Some(s));
                starts.push(Some(p));
            }
            Ok((_, None)) => bail!(
                "{} is not a stream (its subscribed reply has no position): configure a namespace with history_size for --topic-prefix {:?}",
                topics[i % topics.len()],
                ctx.topic_prefix
            ),
            Err(f) => {
                *first_failures.entry(f.as_str().to_string()).or_default() += 1;
                sessions.push(None);
                starts.push(None);
            }
        }
    }
    let connect_s = connect_start.elapsed().as_secs_f64();
    ctx.open
        .fetch_add(sessions.iter().flatten().count() as u64, Ordering::Relaxed);
    phase.store(BEFORE, Ordering::Relaxed);
    tokio::time::sleep(a.before).await;

    // 4. Everyone leaves; the missed publications are made while they are away.
    phase.store(AWAY, Ordering::Relaxed);
    let leaving: Vec<_> = sessions
        .iter_mut()
        .filter_map(Option::take)
        .map(|mut s| {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    s.ws.send(crate::wsconn::OP_CLOSE, &1000u16.to_be_bytes()),
                )
                .await;
            })
        })
        .collect();
    for h in leaving {
        let _ = h.await;
    }
    ctx.open.store(
        a.live_subscribers
            .min(ctx.open.load(Ordering::Relaxed) as usize) as u64,
        Ordering::Relaxed,
    );
    // Give the server a moment to see the connections end.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publish_start = Instant::now();
    let targets = tokio::time::timeout(
        Duration::from_secs(60),
        missed_pub.publish(&topics, a.missed, a.payload),
    )
    .await
    .context("publishing the missed messages took more than 60 s")??;
    let publish_s = publish_start.elapsed().as_secs_f64();
    drop(missed_pub);
    if targets.len() < topics.len() {
        bail!("some topics got no position while publishing the missed messages");
    }

    // 5. The storm.
    let conc = if a.storm_concurrency == 0 {
        a.clients
    } else {
        a.storm_concurrency
    };
    let storm_sem = Arc::new(Semaphore::new(conc));
    let release = CancellationToken::new();
    let done = Arc::new(AtomicUsize::new(0));
    let storm_start = Instant::now();
    let deadline = storm_start + ctx.common.duration;
    phase.store(DURING, Ordering::Relaxed);
    let mut storm = Vec::with_capacity(a.clients);
    for (i, start) in starts.iter().enumerate() {
        let Some(start) = start.clone() else { continue };
        let topic = topics[i % topics.len()].clone();
        let target = targets[&topic].clone();
        let (c, sem, release, done) = (
            Arc::clone(&ctx),
            Arc::clone(&storm_sem),
            release.clone(),
            Arc::clone(&done),
        );
        storm.push(tokio::spawn(async move {
            storm_client(
                &c,
                i,
                &topic,
                &start,
                &target,
                storm_start,
                deadline,
                &sem,
                &release,
                &done,
            )
            .await
        }));
    }
    let clients = storm.len();
    while done.load(Ordering::Relaxed) < clients && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm_s = storm_start.elapsed().as_secs_f64();
    let timed_out = done.load(Ordering::Relaxed) < clients;
    phase.store(AFTER, Ordering::Relaxed);
    // 6. Late duplicates, live traffic after the storm.
    tokio::time::sleep(a.after).await;
    release.cancel();
    let mut results = Vec::with_capacity(clients);
    for h in storm {
        results.push(h.await?);
    }
    live_stop.cancel();
    let live_outcome = match live_handle {
        Some(h) => Some(h.await?),
        None => None,
    };
    // The last live deliveries.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.cancel.cancel();
    let mut live_results = Vec::new();
    for h in lives {
        live_results.push(h.await?);
    }
    let wall_s = monitor.started.elapsed().as_secs_f64();
    let (first, samples) = monitor.stop().await;

    // Account.
    let secs = samples.len() as u32;
    let mut r = Report {
        duration_s: secs,
        steady: Steady::new(secs, 0, 0),
        ..Report::default()
    };
    r.set_seconds(&ctx.timeline.take_seconds());
    run::fill_from_samples(&ctx, &mut r, &first, &samples, wall_s);
    let mut rs = ResumeStorm {
        clients: a.clients as u64,
        topics: a.topics as u64,
        missed_per_topic: a.missed as u64,
        subscribe_s: connect_s,
        publish_s,
        published: (a.missed * a.topics) as u64,
        publications_per_s: (a.missed * a.topics) as f64 / publish_s.max(1e-9),
        storm_s,
        timed_out,
        ..ResumeStorm::default()
    };
    let mut sub_hist = new_hist();
    let mut done_hist = new_hist();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    rs.failed_first_subscribe = first_failures.values().sum();
    for (k, v) in &first_failures {
        *codes.entry(format!("first_{k}")).or_default() += v;
    }
    for c in &results {
        if let Some(f) = c.failure {
            rs.reconnect_failed += 1;
            *codes.entry(f.as_str().to_string()).or_default() += 1;
            continue;
        }
        rs.reconnected += 1;
        if let Some(us) = c.subscribed_us {
            sub_hist.saturating_record(us.max(1));
        }
        match c.recovered {
            Some(true) => rs.recovered += 1,
            _ => rs.not_recovered += 1,
        }
        if c.epoch_changed {
            rs.epoch_changed += 1;
        }
        rs.received += c.received;
        rs.expected += c.owed;
        rs.streams.add(&c.streams);
        if let Some(code) = &c.closed_by_server {
            *codes.entry(format!("closed_{code}")).or_default() += 1;
        }
        match c.completed_us {
            Some(us) if c.streams.exact() && c.recovered == Some(true) => {
                rs.completed += 1;
                done_hist.saturating_record(us.max(1));
            }
            _ => rs.incomplete += 1,
        }
    }
    rs.failures = codes;
    rs.subscribed = crate::report::Latency::from_hist(&sub_hist);
    rs.completion = crate::report::Latency::from_hist(&done_hist);
    rs.completion_s = (rs.completed == a.clients as u64).then(|| done_hist.max() as f64 / 1e6);
    // Live.
    if a.live_subscribers > 0 {
        let mut hists: Vec<Histogram<u64>> = (0..=AFTER).map(|_| new_hist()).collect();
        let mut counts = SeqCounts::default();
        let mut streams = StreamCounts::default();
        let mut ok = 0u64;
        for l in live_results.iter().flatten() {
            ok += 1;
            for (h, lh) in hists.iter_mut().zip(&l.hists) {
                h.add(lh)?;
            }
            counts.add(&l.counts);
            streams.add(&l.streams);
        }
        let acked = live_outcome.as_ref().map_or(0, |o| o.acked);
        let lat = |p: usize| crate::report::Latency::from_hist(&hists[p]);
        rs.live = Some(LiveCheck {
            topic: live_topic.clone(),
            subscribers: ok,
            rate: a.live_rate,
            published: acked,
            expected: acked * ok,
            delivered: counts.unique,
            lost: (acked * ok).saturating_sub(counts.unique),
            before: lat(BEFORE),
            away: lat(AWAY),
            during: lat(DURING),
            after: lat(AFTER),
            streams,
        });
    }
    rs.ok = rs.completed == a.clients as u64
        && rs.streams.exact()
        && rs.not_recovered == 0
        && !timed_out;
    r.connect.attempted = a.clients as u64;
    r.connect.succeeded = rs.reconnected;
    r.connect.failed = rs.reconnect_failed;
    r.connect.latency = rs.subscribed.clone();
    r.resume = Some(rs);
    run::scrape_metrics(&ctx, &mut r).await;
    run::finish(&ctx, &mut r, "resume-storm")?;
    let rs = r.resume.as_ref().expect("set above");
    if !rs.ok {
        r.notes.insert(
            0,
            format!(
                "RESUME FAILED: {} of {} clients received every missed seq exactly once in order (recovered {}, not recovered {}, reconnect failures {}, stream_gaps {}, stream_dups {}, resets {}{})",
                rs.completed,
                rs.clients,
                rs.recovered,
                rs.not_recovered,
                rs.reconnect_failed,
                rs.streams.gaps,
                rs.streams.dups,
                rs.streams.resets,
                if rs.timed_out { ", timed out" } else { "" }
            ),
        );
    }
    if let Some(l) = &rs.live {
        if l.during.count > 0 && l.before.count > 0 {
            r.notes.push(format!(
                "live p99 during the storm {:.2} ms vs {:.2} ms before ({:.1}×)",
                l.during.p99_ms,
                l.before.p99_ms,
                l.during.p99_ms / l.before.p99_ms.max(1e-3)
            ));
        }
    }
    Ok(r)
}

/// The position `subscribed` reported for `topic`.
fn position(s: &Session, topic: &str) -> Option<Pos> {
    s.positions
        .iter()
        .find(|(t, _)| t == topic)
        .map(|(_, p)| Pos {
            seq: p.seq,
            epoch: p.epoch.clone(),
        })
}

/// One client of the storm: reconnects with `since`, reads until the last missed
/// seq (or the deadline), then reads on until `release` (late duplicates).
#[allow(clippy::too_many_arguments)]
async fn storm_client(
    ctx: &Ctx,
    i: usize,
    topic: &str,
    start: &Pos,
    target: &Pos,
    storm_start: Instant,
    deadline: Instant,
    sem: &Semaphore,
    release: &CancellationToken,
    done: &AtomicUsize,
) -> ClientResult {
    let mut out = ClientResult {
        owed: target.seq.saturating_sub(start.seq),
        ..ClientResult::default()
    };
    let mut finished = false;
    let finish = |finished: &mut bool| {
        if !*finished {
            *finished = true;
            done.fetch_add(1, Ordering::Relaxed);
        }
    };
    let url = &ctx.urls[i % ctx.urls.len()];
    let cmd = Target::subscribe_since(
        &[topic.to_string()],
        2,
        &[(topic.to_string(), start.seq, start.epoch.clone())],
    );
    let permit = sem.acquire().await;
    let opened = session::open_with(ctx, url, Some(cmd), None).await;
    drop(permit);
    let mut s = match opened {
        Ok(s) => s,
        Err(f) => {
            out.failure = Some(f);
            finish(&mut finished);
            return out;
        }
    };
    out.subscribed_us = Some(storm_start.elapsed().as_micros() as u64);
    let reply: Option<Position> = s
        .positions
        .iter()
        .find(|(t, _)| t == topic)
        .map(|(_, p)| p.clone());
    out.recovered = reply.as_ref().and_then(|p| p.recovered);
    out.epoch_changed = reply.as_ref().is_some_and(|p| p.epoch != target.epoch);
    let mut tracker = StreamTracker::new();
    tracker.start(topic.as_bytes(), start.seq);
    if out.recovered != Some(true) {
        // Nothing will be replayed: not a success, nothing to wait for.
        finish(&mut finished);
    } else if start.seq >= target.seq {
        out.completed_us = out.subscribed_us;
        finish(&mut finished);
    }
    let mut cancelled = std::pin::pin!(release.cancelled());
    'outer: loop {
        loop {
            let frame = match s.ws.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    out.closed_by_server = Some("protocol".into());
                    break 'outer;
                }
            };
            match frame.opcode {
                OP_TEXT => {
                    let f = frame.payload;
                    match classify(f) {
                        Op::Message => {
                            out.received += 1;
                            if let (Some(at), Some(t)) = (stream::tail_seq(f), stream::topic_of(f))
                            {
                                tracker.record(t, at);
                            }
                        }
                        Op::Reset => {
                            if let Some((t, at)) = stream::parse_reset(f) {
                                tracker.reset(t.as_bytes(), at);
                            }
                        }
                        _ => {}
                    }
                }
                OP_PING => {
                    let p = frame.payload.to_vec();
                    let _ = s.ws.send(OP_PONG, &p).await;
                }
                OP_CLOSE => {
                    out.closed_by_server = Some(match frame.payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]).to_string(),
                        _ => "none".into(),
                    });
                    break 'outer;
                }
                _ => {}
            }
        }
        if !finished
            && tracker
                .last(topic.as_bytes())
                .is_some_and(|l| l >= target.seq)
        {
            out.completed_us = Some(storm_start.elapsed().as_micros() as u64);
            finish(&mut finished);
        }
        if !finished && Instant::now() >= deadline {
            finish(&mut finished);
        }
        let filled = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            _ = tokio::time::sleep_until(deadline.into()), if !finished => continue,
            r = s.ws.fill() => r,
        };
        if filled.is_err() {
            out.closed_by_server = Some("eof".into());
            break;
        }
    }
    finish(&mut finished);
    out.streams = tracker.counts();
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        s.ws.send(OP_CLOSE, &1000u16.to_be_bytes()),
    )
    .await;
    out
}

/// What a live subscriber saw: latency per phase, sequence and stream counts.
struct LiveResult {
    hists: Vec<Histogram<u64>>,
    counts: SeqCounts,
    streams: StreamCounts,
}

/// Receives the live topic until `ctx.cancel`; latency goes to the timeline (for
/// the chart) and to the histogram of the current phase.
async fn live_receive(ctx: &Ctx, s: &mut Session, key: usize, phase: &AtomicUsize) -> LiveResult {
    let mut rec = ctx.timeline.recorder(key);
    let mut seq = SeqTracker::new(1);
    let mut tracker = StreamTracker::new();
    for (t, p) in &s.positions {
        tracker.start(t.as_bytes(), p.seq);
    }
    let mut hists: Vec<Histogram<u64>> = (0..=AFTER).map(|_| new_hist()).collect();
    let mut cancelled = std::pin::pin!(ctx.cancel.cancelled());
    let mut now = now_ns();
    'outer: loop {
        loop {
            let frame = match s.ws.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => break 'outer,
            };
            match frame.opcode {
                OP_TEXT => {
                    let f = frame.payload;
                    let st = payload::scan_message(f).or_else(|| {
                        (classify(f) == Op::Message)
                            .then(|| payload::scan(f))
                            .flatten()
                    });
                    if let Some(st) = st {
                        seq.record(st.publisher, st.seq);
                        let lat = now.saturating_sub(st.sent_ns) / 1000;
                        rec.record(now, lat);
                        hists[phase.load(Ordering::Relaxed)].saturating_record(lat.max(1));
                        if let (Some(at), Some(t)) = (stream::tail_seq(f), stream::topic_of(f)) {
                            tracker.record(t, at);
                        }
                    }
                }
                OP_PING => {
                    let p = frame.payload.to_vec();
                    let _ = s.ws.send(OP_PONG, &p).await;
                }
                OP_CLOSE => break 'outer,
                _ => {}
            }
        }
        let filled = tokio::select! {
            biased;
            _ = &mut cancelled => break,
            r = s.ws.fill() => r,
        };
        if filled.is_err() {
            break;
        }
        now = now_ns();
    }
    drop(rec);
    LiveResult {
        hists,
        counts: seq.counts(),
        streams: tracker.counts(),
    }
}

/// Makes the publications the clients miss: HTTP batches or WebSocket `publish`
/// commands, reading the stream position of each answer.
enum MissedPublisher {
    Http {
        conn: HttpConn,
        bearer: Option<String>,
        batch: usize,
    },
    Ws {
        ws: WsConn,
        batch: usize,
    },
}

impl MissedPublisher {
    async fn connect(
        ctx: &Ctx,
        a: &ResumeStormArgs,
        ws_url: &Url,
        http_url: &Url,
    ) -> Result<MissedPublisher> {
        Ok(match a.publish_via {
            PublishVia::Http => {
                let stream = ctx.dialer.dial(http_url.addr, None).await?;
                MissedPublisher::Http {
                    conn: HttpConn::open(http_url, stream).await?,
                    bearer: a.api_key.clone(),
                    batch: a.http_batch.max(1),
                }
            }
            _ => {
                let stream = ctx.dialer.dial(ws_url.addr, None).await?;
                let stream = crate::net::handshake_stream(stream, ws_url).await?;
                MissedPublisher::Ws {
                    ws: WsConn::new(stream),
                    batch: 64,
                }
            }
        })
    }

    /// Publishes `n` stamped messages to each topic (topic after topic, in batches);
    /// returns the last position of each topic that answered with one.
    async fn publish(
        &mut self,
        topics: &[String],
        n: usize,
        size: usize,
    ) -> Result<BTreeMap<String, Pos>> {
        let mut last: BTreeMap<String, Pos> = BTreeMap::new();
        let mut data = Vec::with_capacity(size + 64);
        let mut id = 0u64;
        for (ti, topic) in topics.iter().enumerate() {
            let mut left = n;
            let mut seq = 0u64;
            while left > 0 {
                let k = left.min(match self {
                    MissedPublisher::Http { batch, .. } | MissedPublisher::Ws { batch, .. } => {
                        *batch
                    }
                });
                let sent_ns = now_ns();
                let stamp = |data: &mut Vec<u8>, seq: u64| {
                    data.clear();
                    let st = Stamp {
                        publisher: ti as u32,
                        seq,
                        sent_ns,
                    };
                    encode(data, &st, size);
                };
                match self {
                    MissedPublisher::Http { conn, bearer, .. } => {
                        let mut body = Vec::with_capacity(k * (size + 64));
                        body.push(b'[');
                        for j in 0..k {
                            stamp(&mut data, seq + j as u64);
                            if j > 0 {
                                body.push(b',');
                            }
                            body.extend_from_slice(
                                format!(r#"{{"topic":"{topic}","data":"#).as_bytes(),
                            );
                            body.extend_from_slice(&data);
                            body.push(b'}');
                        }
                        body.push(b']');
                        let (status, reply) = conn
                            .request(hyper::Method::POST, Bytes::from(body), bearer.as_deref())
                            .await?;
                        if status != 200 {
                            bail!(
                                "publish to {topic}: HTTP {status}: {}",
                                String::from_utf8_lossy(&reply)
                            );
                        }
                        if let Some(p) = http_last_position(&reply) {
                            last.insert(topic.clone(), p);
                        }
                    }
                    MissedPublisher::Ws { ws, .. } => {
                        let mut buf = Vec::new();
                        let mut cmd = Vec::new();
                        for j in 0..k {
                            stamp(&mut data, seq + j as u64);
                            id += 1;
                            cmd.clear();
                            Target::Wsgate.publish(&mut cmd, topic, id, &data);
                            push_frame(&mut buf, OP_TEXT, &cmd);
                        }
                        ws.write_all(&buf).await?;
                        let mut acked = 0;
                        while acked < k {
                            let f = ws.read_frame().await?;
                            match f.opcode {
                                OP_TEXT => {}
                                OP_CLOSE => bail!("the server closed the publisher"),
                                _ => continue,
                            }
                            match classify(f.payload) {
                                Op::Published => {
                                    acked += 1;
                                    if let Some(p) = ws_position(f.payload) {
                                        last.insert(topic.clone(), p);
                                    }
                                }
                                Op::Error(code) => bail!("publish to {topic} refused: {code}"),
                                _ => {}
                            }
                        }
                    }
                }
                seq += k as u64;
                left -= k;
            }
        }
        Ok(last)
    }
}

/// The last position in an HTTP publish answer: `"seq"`/`"epoch"` for one item, the
/// last entry of `"results"` for a batch.
fn http_last_position(body: &[u8]) -> Option<Pos> {
    #[derive(serde::Deserialize)]
    struct Item {
        seq: Option<u64>,
        epoch: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        seq: Option<u64>,
        epoch: Option<String>,
        #[serde(default)]
        results: Vec<Item>,
    }
    let a: Answer = serde_json::from_slice(body).ok()?;
    let (seq, epoch) = match a.results.last() {
        Some(i) => (i.seq, i.epoch.clone()),
        None => (a.seq, a.epoch),
    };
    Some(Pos {
        seq: seq?,
        epoch: epoch?,
    })
}

/// The position in a `published` answer.
fn ws_position(frame: &[u8]) -> Option<Pos> {
    #[derive(serde::Deserialize)]
    struct Published {
        seq: u64,
        epoch: String,
    }
    let p: Published = serde_json::from_slice(frame).ok()?;
    Some(Pos {
        seq: p.seq,
        epoch: p.epoch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_positions_from_publish_answers() {
        assert_eq!(
            http_last_position(br#"{"ok":true,"published":1,"seq":42,"epoch":"k2"}"#),
            Some(Pos {
                seq: 42,
                epoch: "k2".into()
            })
        );
        assert_eq!(
            http_last_position(
                br#"{"ok":true,"published":2,"results":[{"seq":43,"epoch":"k2"},{"seq":44,"epoch":"k2"}]}"#
            ),
            Some(Pos {
                seq: 44,
                epoch: "k2".into()
            })
        );
        assert_eq!(http_last_position(br#"{"ok":true,"published":2}"#), None);
        assert_eq!(
            ws_position(br#"{"op":"published","id":3,"seq":42,"epoch":"x"}"#),
            Some(Pos {
                seq: 42,
                epoch: "x".into()
            })
        );
        assert_eq!(ws_position(br#"{"op":"published","id":3}"#), None);
    }
}
