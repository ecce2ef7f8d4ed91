//! Watching processes: the generator's own cost (getrusage) and the servers' CPU and
//! memory (`/proc/<pid>`), plus samples from a Prometheus `/metrics` page.

use std::collections::BTreeMap;

use nix::sys::resource::{getrusage, UsageWho};

/// CPU and memory of one process at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User + system CPU time in seconds.
    pub cpu_s: f64,
    /// Resident set size in KiB.
    pub rss_kib: u64,
}

/// Clock ticks per second for `/proc/<pid>/stat` (almost always 100).
pub fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .unwrap_or(100.0)
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` if the process is gone.
pub fn sample(pid: u32, ticks: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let (cpu_s, rss_kib) = parse_proc(&stat, &status, ticks)?;
    Some(ProcSample { cpu_s, rss_kib })
}

/// The process name (`comm`).
pub fn name(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn parse_proc(stat: &str, status: &str, ticks: f64) -> Option<(f64, u64)> {
    // The command name may contain spaces and parentheses: fields start after the
    // last `)`. utime and stime are fields 14 and 15, i.e. 12 and 13 after it.
    let after = &stat[stat.rfind(')')? + 2..];
    let mut fields = after.split_ascii_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_ascii_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(((utime + stime) / ticks, rss_kib))
}

/// The generator's own resource use so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfUsage {
    pub user_s: f64,
    pub sys_s: f64,
    pub max_rss_kib: u64,
}

/// getrusage(RUSAGE_SELF).
pub fn self_usage() -> SelfUsage {
    usage(UsageWho::RUSAGE_SELF)
}

/// getrusage(RUSAGE_THREAD): the calling thread's CPU (`max_rss_kib` is the
/// process's).
pub fn thread_usage() -> SelfUsage {
    usage(UsageWho::RUSAGE_THREAD)
}

fn usage(who: UsageWho) -> SelfUsage {
    match getrusage(who) {
        Ok(u) => {
            let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            SelfUsage {
                user_s: s(u.user_time()),
                sys_s: s(u.system_time()),
                max_rss_kib: u.max_rss() as u64,
            }
        }
        Err(_) => SelfUsage::default(),
    }
}

/// Current RSS of this process in KiB.
pub fn self_rss_kib() -> u64 {
    sample(std::process::id(), ticks_per_second())
        .map(|s| s.rss_kib)
        .unwrap_or(0)
}

/// Samples of a Prometheus text page whose metric name starts with `prefix`
/// (labels kept in the key), skipping comments, NaN and histograms' buckets.
pub fn parse_metrics(text: &str, prefix: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let key = key.trim();
            if key.contains("_bucket") {
                return None;
            }
            let v: f64 = value.trim().parse().ok()?;
            v.is_finite().then(|| (key.to_string(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 100 1000000 500";
        let status = "Name:\tx\nVmRSS:\t  20480 kB\nThreads: 4\n";
        assert_eq!(parse_proc(stat, status, 100.0), Some((3.0, 20480)));
    }

    #[test]
    fn reads_this_process() {
        let s = sample(std::process::id(), ticks_per_second()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(self_usage().max_rss_kib > 0);
    }

    #[test]
    fn parses_metrics() {
        let text = "# HELP wsgate_connections x\nwsgate_connections 12\nwsgate_x_bucket{le=\"1\"} 3\nother 1\nwsgate_y{node=\"a\"} 2.5\n";
        let m = parse_metrics(text, "wsgate_");
        assert_eq!(m.len(), 2);
        assert_eq!(m["wsgate_connections"], 12.0);
        assert_eq!(m["wsgate_y{node=\"a\"}"], 2.5);
    }
}
