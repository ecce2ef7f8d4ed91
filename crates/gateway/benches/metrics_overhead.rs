//! What metrics cost on the fan-out path.
//!
//! Each iteration: 8 publications to a topic with 1 000 local subscribers, through
//! the real [`MemoryBroker`] → [`Hub`] → [`Outbox`] path (encode once, 8 000
//! non-blocking enqueues), then every subscriber's queue is taken as one batch and,
//! in the `socket` configurations, written with one `writev(2)` to that subscriber's
//! own socket (a Unix socket pair; the reading end is drained outside the timed part),
//! as the writer task does. Variants:
//! - `off`: no metric work at all;
//! - `striped` (what the writer does): [`wsgate_metrics::DeliveryStats`], one
//!   record per batch into the current thread's stripe (plain loads and stores,
//!   summed at scrape time);
//! - `shared_per_batch` (for comparison, an earlier design): shared prometheus
//!   atomics and float histograms updated on every batch.
//!
//! (The design in between, per-connection accumulators folded every 250 ms, is
//! gone from the code; its numbers are in docs/bench/history.md.)
//!
//! The machine this runs on is shared, so the variants are interleaved: every round
//! runs each variant for a few iterations, in rotating order, and the report gives
//! the median and the best round per variant. A criterion run of one variant after
//! the other mostly measured the neighbours' load.
//!
//! `cargo bench -p wsgate-gateway --bench metrics_overhead`; results in
//! docs/benchmarks.md.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wsgate_fanout::{unix_nanos, Node, Source, Subscriber};
use wsgate_gateway::session::outbox::{Batch, Outbox};
use wsgate_metrics::{latency_buckets, queue_buckets, Metrics};

const SUBSCRIBERS: usize = 1000;
const PER_ITER: usize = 8;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    Striped,
    SharedPerBatch,
}

/// The shared metrics of the earlier design (not registered anywhere).
struct Shared {
    queue: prometheus::Histogram,
    latency: prometheus::Histogram,
    delivered: prometheus::IntCounter,
    bytes_sent: prometheus::IntCounter,
}

impl Shared {
    fn new() -> Self {
        let h = |name: &str, b| {
            prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(name, "h").buckets(b))
                .unwrap()
        };
        Shared {
            queue: h("q", queue_buckets()),
            latency: h("l", latency_buckets()),
            delivered: prometheus::IntCounter::new("d", "d").unwrap(),
            bytes_sent: prometheus::IntCounter::new("b", "b").unwrap(),
        }
    }
}

/// One subscriber as its writer sees it.
struct Conn {
    outbox: Arc<Outbox>,
    batch: Batch,
    bufs: VecDeque<Bytes>,
    borns: Vec<u64>,
    /// The socket the writer writes to, and the client's end.
    tx: UnixStream,
    rx: UnixStream,
}

/// Writes every queued frame, like the writer's `write_all_bufs`.
fn write_all(tx: &mut UnixStream, bufs: &mut VecDeque<Bytes>) {
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let n = tx.write_vectored(&slices).expect("socket buffer has room");
        drop(slices);
        wsgate_gateway::ws::io::consume(bufs, n);
    }
}

/// The client side: reads what was written (not timed).
fn drain(conns: &mut [Conn]) {
    let mut buf = [0u8; 4096];
    for c in conns {
        loop {
            match c.rx.read(&mut buf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
    }
}

/// The writer's per-batch work, minus the socket.
fn write_side(conns: &mut [Conn], mode: Mode, m: &(Metrics, Shared), socket: bool) {
    let (metrics, shared) = m;
    for c in conns {
        c.outbox.take(&mut c.batch);
        match mode {
            Mode::Off => {
                c.bufs
                    .extend(c.batch.frames.drain(..).map(|i| i.frame().clone()));
            }
            Mode::Striped => {
                let frames = &c.batch.frames;
                let bytes: u64 = frames.iter().map(|i| i.frame().len() as u64).sum();
                let born = frames.iter().map(|i| i.born).filter(|&b| b != 0);
                metrics
                    .delivery
                    .record_batch(c.batch.bytes, bytes, born, unix_nanos());
                c.bufs
                    .extend(c.batch.frames.drain(..).map(|i| i.frame().clone()));
            }
            Mode::SharedPerBatch => {
                shared.queue.observe(c.batch.bytes as f64);
                c.borns.clear();
                let mut bytes = 0u64;
                for item in c.batch.frames.drain(..) {
                    c.borns.push(item.born);
                    bytes += item.frame().len() as u64;
                    c.bufs.push_back(item.frame().clone());
                }
                let now = unix_nanos();
                // Prometheus' float histogram, a local one per batch, flushed at once.
                let latency = shared.latency.local();
                for &b in &c.borns {
                    latency.observe(now.saturating_sub(b) as f64 / 1e9);
                }
                latency.flush();
                shared.delivered.inc_by(c.borns.len() as u64);
                shared.bytes_sent.inc_by(bytes);
            }
        }
        if socket {
            write_all(&mut c.tx, &mut c.bufs);
        } else {
            std::hint::black_box(&c.bufs);
            c.bufs.clear();
        }
    }
}

fn setup(threads: usize) -> (Node, Vec<Vec<Conn>>) {
    let node = Node::in_memory(Metrics::default(), 1 << 16);
    let topic: Arc<str> = Arc::from("bench");
    let mut groups: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..SUBSCRIBERS {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let sub: Arc<dyn Subscriber> = outbox.clone();
        node.hub().subscribe(&topic, i as u64, sub);
        let (tx, rx) = UnixStream::pair().expect("socket pair");
        rx.set_nonblocking(true).unwrap();
        groups[i % threads].push(Conn {
            outbox,
            batch: Batch::default(),
            bufs: VecDeque::new(),
            borns: Vec::new(),
            tx,
            rx,
        });
    }
    (node, groups)
}

/// One variant, ready to run.
struct Setup {
    name: &'static str,
    mode: Mode,
    metrics: (Metrics, Shared),
    node: Node,
    groups: Vec<Vec<Conn>>,
    /// Seconds per iteration, one entry per round.
    rounds: Vec<f64>,
}

const DATA: &[u8] = br#"{"price":123.45,"symbol":"AAPL","ts":1700000000000}"#;

/// Runs `iters` iterations; returns the timed seconds per iteration.
fn run(s: &mut Setup, iters: usize, socket: bool) -> f64 {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let start = Instant::now();
        for _ in 0..PER_ITER {
            drop(s.node.publish(Source::Http, "bench", DATA));
        }
        let (mode, m) = (s.mode, &s.metrics);
        if s.groups.len() == 1 {
            write_side(&mut s.groups[0], mode, m, socket);
        } else {
            std::thread::scope(|sc| {
                for group in s.groups.iter_mut() {
                    sc.spawn(move || write_side(group, mode, m, socket));
                }
            });
        }
        timed += start.elapsed();
        if socket {
            for group in s.groups.iter_mut() {
                drain(group);
            }
        }
    }
    timed.as_secs_f64() / iters as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a test run (`cargo test --benches`) does not:
    // then one quick round only checks that everything works.
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, iters) = if full { (40, 20) } else { (1, 1) };
    println!("metrics overhead: {SUBSCRIBERS} subscribers x {PER_ITER} publications per iteration, {rounds} interleaved rounds of {iters}");
    for (config, socket, threads) in [
        ("no_socket", false, 1usize),
        ("socket", true, 1),
        ("socket", true, 2),
    ] {
        let mut setups: Vec<Setup> = [
            ("off", Mode::Off),
            ("striped", Mode::Striped),
            ("shared_per_batch", Mode::SharedPerBatch),
        ]
        .into_iter()
        .map(|(name, mode)| {
            let metrics = (Metrics::default(), Shared::new());
            let (node, groups) = setup(threads);
            Setup {
                name,
                mode,
                metrics,
                node,
                groups,
                rounds: Vec::new(),
            }
        })
        .collect();
        for s in setups.iter_mut() {
            run(s, iters, socket); // warm-up
        }
        for round in 0..rounds {
            let n = setups.len();
            for k in 0..n {
                let s = &mut setups[(round + k) % n];
                let t = run(s, iters, socket);
                s.rounds.push(t);
            }
        }
        let base = median(&setups[0].rounds);
        let base_min = setups[0].rounds.iter().copied().fold(f64::MAX, f64::min);
        for s in &setups {
            let med = median(&s.rounds);
            let min = s.rounds.iter().copied().fold(f64::MAX, f64::min);
            let msgs = (SUBSCRIBERS * PER_ITER) as f64;
            println!(
                "{config:>9} {threads} thread(s) {:>16}: median {:>8.1} µs/iter ({:>5.2} M deliveries/s, {:+6.1}% vs off), best {:>8.1} µs ({:+6.1}%)",
                s.name,
                med * 1e6,
                msgs / med / 1e6,
                (med / base - 1.0) * 100.0,
                min * 1e6,
                (min / base_min - 1.0) * 100.0,
            );
        }
    }
}
