//! `wsgate_runtime_tasks`: the tokio tasks alive in the node's runtime, read at
//! scrape time.
//!
//! Every connection, repair and timer the node runs is a task, so a count that keeps
//! rising under a steady load (or does not come back down once the load is gone) is
//! a leak: the soak (`loadtest/soak.sh`) watches it with the RSS and open files.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::IntGauge;

/// The name of the task gauge.
pub const RUNTIME_TASKS: &str = "wsgate_runtime_tasks";

/// A collector that sets [`RUNTIME_TASKS`] from the runtime of the thread that
/// scrapes (the node's own: `/metrics` is served on it). Scraped from outside any
/// runtime, it keeps the last value it read.
#[derive(Clone)]
pub struct RuntimeCollector {
    tasks: IntGauge,
}

impl RuntimeCollector {
    /// A new collector (the gauge starts at 0 until the first scrape on a runtime).
    pub fn new() -> Self {
        RuntimeCollector {
            tasks: IntGauge::new(
                RUNTIME_TASKS,
                "Tokio tasks alive in the node's runtime (read at scrape).",
            )
            .expect("valid metric"),
        }
    }

    /// Reads the current runtime's live task count into the gauge, if on a runtime.
    fn refresh(&self) {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let alive = handle.metrics().num_alive_tasks();
            self.tasks.set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
    }
}

impl Default for RuntimeCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector for RuntimeCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.tasks.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        self.tasks.collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::Metrics;

    fn tasks(m: &Metrics) -> i64 {
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("wsgate_runtime_tasks "))
            .expect("the task gauge is exported");
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn task_gauge_follows_the_runtime() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let m = Metrics::default();
        // Outside a runtime: exported, at 0.
        assert_eq!(tasks(&m), 0);
        rt.block_on(async {
            let before = tasks(&m);
            let (tx, rx) = tokio::sync::watch::channel(false);
            let handles: Vec<_> = (0..25)
                .map(|_| {
                    let mut rx = rx.clone();
                    tokio::spawn(async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    })
                })
                .collect();
            assert_eq!(tasks(&m), before + 25);
            tx.send(true).unwrap();
            for h in handles {
                h.await.unwrap();
            }
            assert_eq!(tasks(&m), before);
        });
        // Scraped from outside a runtime again: the last value read stays.
        assert_eq!(tasks(&m), 0);
    }
}
