//! The human-readable summary printed at the end of a run.

use std::fmt::Write as _;

use crate::report::{Latency, Report};

fn lat(l: &Latency) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
    )
}

/// Renders the summary of a report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "== {} {} vs {}{} — {} s measured, steady window {}..{} s",
        r.tool,
        r.scenario,
        r.target,
        if r.label.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.label)
        },
        r.duration_s,
        r.steady.from_s,
        r.steady.to_s
    );
    let c = &r.connect;
    let _ = writeln!(
        s,
        "connections: {} attempted, {} ok, {} failed {:?}; {:.0}/s; latency {}",
        c.attempted,
        c.succeeded,
        c.failed,
        c.failures,
        c.rate_per_s,
        lat(&c.latency)
    );
    if c.overloaded_retries > 0 {
        let _ = writeln!(
            s,
            "  {} upgrades refused with 503 overloaded and retried after the hint",
            c.overloaded_retries
        );
    }
    if let Some(f) = &r.fanout {
        let _ = writeln!(
            s,
            "published: sent {} acked {} errors {} unacked {} ({:.0}/s steady)",
            f.sent, f.published, f.publish_errors, f.unacked, f.publishes_per_s_steady
        );
        let _ = writeln!(
            s,
            "deliveries: expected {} delivered {} unique {} lost {} duplicated {} reordered {} extra {}",
            f.expected, f.delivered, f.unique, f.lost, f.duplicated, f.reordered, f.extra
        );
        if f.streams.messages > 0 || f.streams.resets > 0 {
            let st = &f.streams;
            let _ = writeln!(
                s,
                "streams: {} messages with seq; stream_gaps {} ({} seqs missing) stream_dups {} resets {}",
                st.messages, st.gaps, st.missing, st.dups, st.resets
            );
        }
        let _ = writeln!(
            s,
            "throughput: {:.0} deliveries/s (steady window)",
            f.deliveries_per_s_steady
        );
        let _ = writeln!(s, "latency (steady): {}", lat(&f.latency));
        let _ = writeln!(s, "latency (all):    {}", lat(&f.latency_all));
        if let Some(g) = &f.slow {
            let _ = writeln!(
                s,
                "slow subscribers: {} of which {} disconnected by the server {:?}",
                g.subscribers, g.disconnected, g.close_codes
            );
        }
    }
    if let Some(i) = &r.idle {
        let _ = writeln!(
            s,
            "idle: {} held for {:.1} s after a {:.1} s ramp; server RSS {:?} -> {:?} KiB = {} bytes/conn; server CPU idle {}; generator {} bytes/conn",
            i.held,
            i.hold_s,
            i.ramp_s,
            i.server_rss_before_kib,
            i.server_rss_after_kib,
            i.server_rss_per_connection_bytes.map_or("?".into(), |v| format!("{v:.0}")),
            i.server_cpu_idle_cores.map_or("?".into(), |v| format!("{:.2}% of a core", v * 100.0)),
            i.generator_rss_per_connection_bytes.map_or("?".into(), |v| format!("{v:.0}")),
        );
    }
    if let Some(rs) = &r.resume {
        resume(&mut s, rs);
    }
    if let Some(sc) = &r.scale {
        scale(&mut s, sc);
    }
    let g = &r.generator;
    let _ = writeln!(
        s,
        "generator: {:.2} s user + {:.2} s sys over {:.1} s = {:.2} cores; {} CPU s per million events; max RSS {} MiB",
        g.cpu_user_s,
        g.cpu_sys_s,
        g.wall_s,
        g.cpu_cores,
        g.cpu_s_per_million_events.map_or("?".into(), |v| format!("{v:.3}")),
        g.max_rss_kib / 1024
    );
    for sv in &r.servers {
        let _ = writeln!(
            s,
            "server {} ({}): {:.2} CPU s, {:.2} cores steady, {} CPU s per million events, RSS {} -> {} MiB (max {})",
            sv.pid,
            sv.name,
            sv.cpu_s,
            sv.cpu_cores_steady,
            sv.cpu_s_per_million_events.map_or("?".into(), |v| format!("{v:.3}")),
            sv.rss_start_kib / 1024,
            sv.rss_end_kib / 1024,
            sv.rss_max_kib / 1024
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

fn scale(s: &mut String, sc: &crate::report::Scale) {
    let opt = |v: Option<f64>, d: usize| v.map_or("?".into(), |v| format!("{v:.d$}"));
    let _ = writeln!(
        s,
        "scale: {} of {} connections held at the end over {} nodes; {} rooms of {} at {}/s, {} tickers at {}/s: {:.0} deliveries/s offered",
        sc.held, sc.connections, sc.nodes, sc.rooms, sc.room_size, sc.room_rate, sc.tickers, sc.ticker_rate, sc.offered_deliveries_per_s
    );
    let _ = writeln!(
        s,
        "  late (> {} ms): {}; churn {:.1}%/min: {} closed and reopened, server closes {:?}, reconnects failed {}; not owed: {} skipped, {} arrived anyway",
        sc.on_time_ms, sc.late, sc.churn_per_min * 100.0, sc.churned, sc.server_closed, sc.reconnect_failed, sc.skipped, sc.unowed
    );
    let _ = writeln!(
        s,
        "  CPU over {:.0} s steady: nodes {:.2} s ({} s per million deliveries), Redis {:.2} s ({}), generators {:.2} s ({})",
        sc.window_s,
        sc.nodes_cpu_s,
        opt(sc.nodes_cpu_s_per_million, 2),
        sc.redis_cpu_s,
        opt(sc.redis_cpu_s_per_million, 2),
        sc.generator_cpu_s,
        opt(sc.generator_cpu_s_per_million, 2),
    );
    let _ = writeln!(
        s,
        "  generator RSS: {} bytes per connection",
        opt(sc.generator_rss_per_connection_bytes, 0)
    );
    if !sc.node_stats.is_empty() {
        let per: Vec<f64> = sc
            .node_stats
            .iter()
            .filter_map(|n| n.rss_per_connection_bytes)
            .collect();
        let (lo, hi) = per
            .iter()
            .fold((f64::MAX, 0f64), |(a, b), v| (a.min(*v), b.max(*v)));
        let mean = per.iter().sum::<f64>() / per.len().max(1) as f64;
        let cores: f64 = sc.node_stats.iter().map(|n| n.cpu_cores).sum();
        let _ = writeln!(
            s,
            "  nodes: RSS per connection {mean:.0} bytes (min {lo:.0}, max {hi:.0}); {cores:.2} cores in all over the steady window"
        );
    }
}

fn resume(s: &mut String, rs: &crate::report::ResumeStorm) {
    let _ = writeln!(
        s,
        "resume storm: {} clients over {} topics missed {} publications each (made in {:.0} ms, {:.0}/s)",
        rs.clients,
        rs.topics,
        rs.missed_per_topic,
        rs.publish_s * 1000.0,
        rs.publications_per_s
    );
    let _ = writeln!(
        s,
        "reconnected {} (failed {}), recovered {} / not recovered {}{}; completed {} of {}: {}",
        rs.reconnected,
        rs.reconnect_failed,
        rs.recovered,
        rs.not_recovered,
        if rs.epoch_changed > 0 {
            format!(", epoch changed {}", rs.epoch_changed)
        } else {
            String::new()
        },
        rs.completed,
        rs.clients,
        match rs.completion_s {
            Some(c) => format!("all within {c:.3} s of the reconnect start"),
            None if rs.timed_out => format!("NOT ALL, gave up after {:.1} s", rs.storm_s),
            None => "NOT ALL".into(),
        }
    );
    let _ = writeln!(s, "completion per client:  {}", lat(&rs.completion));
    let _ = writeln!(s, "subscribed per client:  {}", lat(&rs.subscribed));
    let st = &rs.streams;
    let _ = writeln!(
        s,
        "replayed: expected {} received {}; stream_gaps {} ({} seqs missing) stream_dups {} resets {} -> {}",
        rs.expected,
        rs.received,
        st.gaps,
        st.missing,
        st.dups,
        st.resets,
        if rs.ok { "EXACT" } else { "NOT EXACT" }
    );
    if !rs.failures.is_empty() {
        let _ = writeln!(s, "failures: {:?}", rs.failures);
    }
    if let Some(l) = &rs.live {
        let _ = writeln!(
            s,
            "live {} ({} subscribers, {}/s): published {} expected {} delivered {} lost {}",
            l.topic, l.subscribers, l.rate, l.published, l.expected, l.delivered, l.lost
        );
        let _ = writeln!(s, "  live before: {}", lat(&l.before));
        let _ = writeln!(s, "  live away:   {}", lat(&l.away));
        let _ = writeln!(s, "  live during: {}", lat(&l.during));
        let _ = writeln!(s, "  live after:  {}", lat(&l.after));
    }
}

/// The number each scenario is judged by, and whether higher is better.
fn key_metric(r: &Report) -> Option<(f64, bool)> {
    match (&r.fanout, &r.idle) {
        (Some(f), _) => Some((f.deliveries_per_s_steady, true)),
        (None, Some(i)) => i.server_rss_per_connection_bytes.map(|v| (v, false)),
        (None, None) => Some((r.connect.rate_per_s, true)),
    }
}

/// A Markdown table comparing reports; rows grouped by label (the workload), each
/// with "wsgate advantage": how many times better wsgate did on the key metric
/// (deliveries/s, cycles/s, or idle RSS per connection).
pub fn table(reports: &[Report]) -> String {
    let mut s = String::from(
        "| workload | target | result | latency p50 / p99 / p99.9 (ms) | lost / dup / reordered | server CPU (cores; s per M events) | generator CPU (cores; s per M events) | wsgate advantage |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let mut labels: Vec<&str> = Vec::new();
    for r in reports {
        if !labels.contains(&r.label.as_str()) {
            labels.push(&r.label);
        }
    }
    for label in labels {
        let group: Vec<&Report> = reports.iter().filter(|r| r.label == label).collect();
        let base = group
            .iter()
            .find(|r| r.target == "wsgate")
            .and_then(|r| key_metric(r));
        for r in group {
            let (result, lat, loss) = match (&r.fanout, &r.idle) {
                (None, None) if r.resume.is_some() => {
                    let rs = r.resume.as_ref().expect("checked");
                    (
                        format!(
                            "{}/{} resumed {} missed in {}; live p99 {:.2} ms before, {:.2} during",
                            rs.completed,
                            rs.clients,
                            rs.missed_per_topic,
                            rs.completion_s
                                .map_or("NOT ALL".into(), |c| format!("{c:.2} s")),
                            rs.live.as_ref().map_or(0.0, |l| l.before.p99_ms),
                            rs.live.as_ref().map_or(0.0, |l| l.during.p99_ms),
                        ),
                        &rs.completion,
                        format!(
                            "gaps {} / dups {} / resets {}",
                            rs.streams.gaps, rs.streams.dups, rs.streams.resets
                        ),
                    )
                }
                (Some(f), _) => {
                    let mut res = format!(
                        "{:.0} deliveries/s (of {:.0} offered)",
                        f.deliveries_per_s_steady,
                        offered(r)
                    );
                    if let Some(g) = &f.slow {
                        res.push_str(&format!(
                            "; slow: {}/{} cut {:?}",
                            g.disconnected, g.subscribers, g.close_codes
                        ));
                    }
                    (
                        res,
                        &f.latency,
                        format!("{} / {} / {}", f.lost, f.duplicated, f.reordered),
                    )
                }
                (None, Some(i)) => (
                    format!(
                        "{} held, {:.0} connects/s, {} B RSS/conn, {} idle CPU",
                        i.held,
                        r.connect.rate_per_s,
                        i.server_rss_per_connection_bytes
                            .map_or("?".into(), |v| format!("{v:.0}")),
                        i.server_cpu_idle_cores
                            .map_or("?".into(), |v| format!("{:.2}%", v * 100.0)),
                    ),
                    &r.connect.latency,
                    format!("{} failed", r.connect.failed),
                ),
                (None, None) => (
                    format!("{:.0} connect cycles/s", r.connect.rate_per_s),
                    &r.connect.latency,
                    format!("{} failed", r.connect.failed),
                ),
            };
            let server = r
                .servers
                .iter()
                .map(|sv| {
                    format!(
                        "{:.2}; {}",
                        sv.cpu_cores_steady,
                        sv.cpu_s_per_million_events
                            .map_or("?".into(), |v| format!("{v:.2}"))
                    )
                })
                .collect::<Vec<_>>()
                .join(" + ");
            let g = &r.generator;
            let gen = format!(
                "{:.2}; {}",
                g.cpu_cores,
                g.cpu_s_per_million_events
                    .map_or("?".into(), |v| format!("{v:.2}"))
            );
            let adv = match (base, key_metric(r)) {
                (Some((b, higher)), Some((v, _))) if v > 0.0 && b > 0.0 => {
                    format!("{:.2}×", if higher { b / v } else { v / b })
                }
                _ => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {label} | {} | {result} | {:.2} / {:.2} / {:.2} | {loss} | {server} | {gen} | {adv} |",
                r.target, lat.p50_ms, lat.p99_ms, lat.p999_ms
            );
        }
    }
    s
}

/// Deliveries per second offered: publications/s × subscribers per topic.
fn offered(r: &Report) -> f64 {
    let Some(f) = &r.fanout else { return 0.0 };
    let subs: u64 = r.raw.subscribers_per_topic.iter().sum::<u64>()
        + f.slow.as_ref().map_or(0, |g| g.subscribers);
    let per_topic = subs as f64 / r.raw.subscribers_per_topic.len().max(1) as f64;
    f.publishes_per_s_steady * per_topic
}
