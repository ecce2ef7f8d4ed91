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
