//! What metrics cost on the fan-out path.
//!
//! Each iteration: 8 publications to a topic with 1 000 local subscribers, through
//! the real [`MemoryBroker`] → [`Hub`] → [`Outbox`] path (encode once, 8 000
//! non-blocking enqueues), then every subscriber's queue is taken as one batch and
//! written with one `writev(2)` to that subscriber's own socket (a Unix socket pair;
//! the reading end is drained outside the timed part), as the writer task does.
//! Variants:
//! - `off`: no metric work at all;
//! - `per_connection` (what the writer does): [`ConnectionStats`] per connection,
//!   folded into the shared metrics at most every 250 ms;
//! - `shared_per_batch` (for comparison): the shared atomics and histograms
//!   updated on every batch.
//!
//! Groups: `fanout_1000_socket` (the real cost, with the `writev(2)`) on 1 thread and
//! on 2 threads (subscribers split between them, so two cores update metrics at the
//! same time), and `fanout_1000_no_socket` (no write at all: the metric work against
//! the in-memory part of fan-out alone, an upper bound on its share). `cargo bench -p wsgate-gateway
//! --bench metrics_overhead`; results in docs/benchmarks.md.

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsgate_fanout::{unix_nanos, Broker, Hub, MemoryBroker, Subscriber};
use wsgate_gateway::outbox::{Batch, Outbox};
use wsgate_metrics::{ConnectionStats, Metrics};

const SUBSCRIBERS: usize = 1000;
const PER_ITER: usize = 8;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    PerConnection,
    SharedPerBatch,
}

/// One subscriber as its writer sees it.
struct Conn {
    outbox: Arc<Outbox>,
    batch: Batch,
    bufs: VecDeque<Bytes>,
    borns: Vec<u64>,
    stats: ConnectionStats,
    /// The socket the writer writes to, and the client's end.
    tx: UnixStream,
    rx: UnixStream,
}

/// Writes every queued frame, like the writer's `write_all_bufs`.
fn write_all(tx: &mut UnixStream, bufs: &mut VecDeque<Bytes>) {
    use bytes::Buf;
    while !bufs.is_empty() {
        let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
        let mut n = tx.write_vectored(&slices).expect("socket buffer has room");
        while n > 0 {
            let front = bufs.front_mut().unwrap();
            if n >= front.len() {
                n -= front.len();
                bufs.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
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
fn write_side(conns: &mut [Conn], mode: Mode, metrics: &Metrics, socket: bool) {
    for c in conns {
        c.outbox.take(&mut c.batch);
        match mode {
            Mode::Off => {
                c.bufs.extend(c.batch.frames.drain(..).map(|i| i.frame));
            }
            Mode::PerConnection => {
                c.stats.record_queue(c.batch.bytes);
                c.borns.clear();
                let mut bytes = 0u64;
                for item in c.batch.frames.drain(..) {
                    c.borns.push(item.born);
                    bytes += item.frame.len() as u64;
                    c.bufs.push_back(item.frame);
                }
                c.stats.record_written(bytes, &c.borns, unix_nanos());
            }
            Mode::SharedPerBatch => {
                metrics.outbound_queue_bytes.observe(c.batch.bytes as f64);
                c.borns.clear();
                let mut bytes = 0u64;
                for item in c.batch.frames.drain(..) {
                    c.borns.push(item.born);
                    bytes += item.frame.len() as u64;
                    c.bufs.push_back(item.frame);
                }
                let now = unix_nanos();
                let latency = metrics.delivery_latency.local();
                for &b in &c.borns {
                    latency.observe(now.saturating_sub(b) as f64 / 1e9);
                }
                latency.flush();
                metrics.messages_delivered.inc_by(c.borns.len() as u64);
                metrics.bytes_sent.inc_by(bytes);
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

fn setup(metrics: &Metrics, threads: usize) -> (Arc<Hub>, MemoryBroker, Vec<Vec<Conn>>) {
    let hub = Arc::new(Hub::default());
    let broker = MemoryBroker::new(hub.clone());
    let topic: Arc<str> = Arc::from("bench");
    let mut groups: Vec<Vec<Conn>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..SUBSCRIBERS {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let sub: Arc<dyn Subscriber> = outbox.clone();
        hub.subscribe(&topic, i as u64, sub);
        let (tx, rx) = UnixStream::pair().expect("socket pair");
        rx.set_nonblocking(true).unwrap();
        groups[i % threads].push(Conn {
            outbox,
            batch: Batch::default(),
            bufs: VecDeque::new(),
            borns: Vec::new(),
            stats: ConnectionStats::new(metrics),
            tx,
            rx,
        });
    }
    (hub, broker, groups)
}

fn bench(c: &mut Criterion) {
    let data = br#"{"price":123.45,"symbol":"AAPL","ts":1700000000000}"#;
    for (group, socket, threads) in [
        ("fanout_1000_no_socket", false, 1usize),
        ("fanout_1000_socket", true, 1),
        ("fanout_1000_socket", true, 2),
    ] {
        let mut g = c.benchmark_group(group);
        g.sample_size(30);
        g.throughput(Throughput::Elements((SUBSCRIBERS * PER_ITER) as u64));
        for (name, mode) in [
            ("off", Mode::Off),
            ("per_connection", Mode::PerConnection),
            ("shared_per_batch", Mode::SharedPerBatch),
        ] {
            let metrics = Metrics::default();
            let (_hub, broker, mut groups) = setup(&metrics, threads);
            g.bench_function(BenchmarkId::new(name, format!("{threads}_threads")), |b| {
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        for _ in 0..PER_ITER {
                            drop(broker.publish("bench", data, unix_nanos()));
                        }
                        if threads == 1 {
                            write_side(&mut groups[0], mode, &metrics, socket);
                        } else {
                            std::thread::scope(|s| {
                                for group in groups.iter_mut() {
                                    let m = &metrics;
                                    s.spawn(move || write_side(group, mode, m, socket));
                                }
                            });
                        }
                        timed += start.elapsed();
                        for group in groups.iter_mut() {
                            drain(group);
                        }
                    }
                    timed
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
