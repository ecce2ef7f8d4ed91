//! The delivery hot path without sockets: encode a publication once, hand it to every
//! local subscriber's outbox (what `MemoryBroker::publish` does), and the writer's
//! side of taking a batch. Regressions in encode/enqueue show up here.
//!
//! With permessage-deflate (`deflate/…`): compressing a frame per payload size, and a
//! fan-out whose subscribers compress or not.
//!
//! `cargo bench -p wsgate-gateway --bench fanout`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsgate_fanout::{Hub, Publication, SlowConsumer, Subscriber, TagKind};
use wsgate_gateway::session::outbox::{Batch, Outbox};

fn encode(c: &mut Criterion) {
    let data = format!(
        r#"{{"p":1,"s":123456,"t":1732400000000000000,"pad":"{}"}}"#,
        "x".repeat(40)
    );
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("publication_100B", |b| {
        b.iter(|| Publication::encode(black_box("bench.topic"), black_box(data.as_bytes()), 1))
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let data = format!(r#"{{"p":1,"s":123456,"pad":"{}"}}"#, "x".repeat(60));
    let mut g = c.benchmark_group("deliver");
    // The default (`disconnect`) and a namespace with a slow-consumer policy, whose
    // publications carry a tag: what readers that keep up pay for it.
    for (name, policy) in [
        ("encode_once_enqueue_take", SlowConsumer::Disconnect),
        (
            "encode_once_enqueue_take_drop_oldest",
            SlowConsumer::DropOldest,
        ),
    ] {
        deliver(&mut g, name, policy, &data);
    }
    g.finish();
}

fn deliver(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    policy: SlowConsumer,
    data: &str,
) {
    for subs in [1usize, 100, 2000] {
        let hub = Hub::default();
        let topic: Arc<str> = Arc::from("bench.topic");
        let outboxes: Vec<Arc<Outbox>> =
            (0..subs).map(|_| Arc::new(Outbox::new(64 << 20))).collect();
        for (i, ob) in outboxes.iter().enumerate() {
            hub.subscribe(&topic, i as u64, ob.clone() as Arc<dyn Subscriber>);
        }
        let mut batch = Batch::default();
        g.throughput(Throughput::Elements(subs as u64));
        g.bench_with_input(BenchmarkId::new(name, subs), &subs, |b, _| {
            b.iter(|| {
                let p = Publication::encode(&topic, data.as_bytes(), 1).with_policy(
                    policy,
                    &topic,
                    None,
                    TagKind::Message,
                );
                hub.deliver(&topic, &p);
                // The writers' side: take what was queued (as each writer would).
                for ob in &outboxes {
                    ob.take(&mut batch);
                    batch.frames.clear();
                }
            })
        });
    }
}

/// A lagging reader: each publication pushed into its full 64 KiB queue makes room by
/// its namespace's policy (`drop_oldest` drops the oldest queued; `latest`, over 16
/// topics, replaces its topic's queued one). Plain topics and a stream.
fn lagging(c: &mut Criterion) {
    let data = format!(r#"{{"p":1,"s":123456,"pad":"{}"}}"#, "x".repeat(60));
    let epoch: Arc<str> = Arc::from("e1");
    let topics: Vec<Arc<str>> = (0..16).map(|i| Arc::from(format!("t.{i}"))).collect();
    let mut g = c.benchmark_group("lagging");
    g.throughput(Throughput::Elements(1));
    for (name, policy, stream) in [
        ("drop_oldest", SlowConsumer::DropOldest, false),
        ("drop_oldest_stream", SlowConsumer::DropOldest, true),
        ("latest", SlowConsumer::Latest, false),
        ("latest_stream", SlowConsumer::Latest, true),
    ] {
        let ob = Outbox::new(64 << 10);
        let mut seq = 0u64;
        let mut next = || {
            seq += 1;
            let topic = &topics[(seq % 16) as usize];
            let p = if stream {
                Publication::encode_seq(topic, data.as_bytes(), 1, seq)
            } else {
                Publication::encode(topic, data.as_bytes(), 1)
            };
            p.with_policy(
                policy,
                topic,
                stream.then_some((seq, &epoch)),
                TagKind::Message,
            )
        };
        while ob.queued_bytes() < (60 << 10) {
            ob.deliver(&next());
        }
        g.bench_function(name, |b| {
            b.iter_batched(
                &mut next,
                |p| ob.deliver(&p),
                criterion::BatchSize::SmallInput,
            )
        });
        assert!(ob.closing().is_none());
    }
    g.finish();
}

/// Quote-like JSON of about `size` bytes: keys repeat, numbers vary (compresses like
/// typical JSON, not like a run of one letter).
fn typical_json(size: usize) -> String {
    let mut s = String::from("[");
    let mut i = 0u64;
    while s.len() + 2 < size {
        let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        s.push_str(&format!(
            r#"{{"sym":"S{}","bid":{}.{:02},"ask":{}.{:02},"vol":{}}},"#,
            x % 500,
            x % 1000,
            (x >> 10) % 100,
            x % 1000 + 1,
            (x >> 17) % 100,
            (x >> 7) % 100_000
        ));
        i += 1;
    }
    s.truncate(size.saturating_sub(2).max(1));
    // Cut at a character boundary of the repeated text; keep it a JSON string so
    // the size is exact (the compressor does not care about validity).
    format!("\"{}\"", s.replace('"', "'"))
}

/// permessage-deflate: what compressing one publication costs per payload size (and
/// how many bytes it saves, printed), and what a fan-out to 2000 subscribers costs
/// when every one compresses, half of them, or none (the shared frame is compressed
/// once per publication).
fn deflate(c: &mut Criterion) {
    let mut g = c.benchmark_group("deflate");
    for size in [64usize, 128, 256, 512, 1024, 4096] {
        let data = typical_json(size);
        let p = Publication::encode("bench.topic", data.as_bytes(), 1);
        let packed = wsgate_fanout::deflate::deflate_frame(&p.frame);
        eprintln!(
            "deflate: {size} B payload: frame {} B -> {} B ({:.0} %)",
            p.frame.len(),
            packed.len(),
            100.0 * packed.len() as f64 / p.frame.len() as f64
        );
        g.throughput(Throughput::Bytes(p.frame.len() as u64));
        g.bench_with_input(BenchmarkId::new("compress_frame", size), &p, |b, p| {
            b.iter(|| wsgate_fanout::deflate::deflate_frame(black_box(&p.frame)))
        });
    }
    let data = typical_json(1024);
    let subs = 2000usize;
    for (name, compressing) in [("none", 0), ("half", subs / 2), ("all", subs)] {
        let hub = Hub::default();
        let topic: Arc<str> = Arc::from("bench.topic");
        let outboxes: Vec<Arc<Outbox>> = (0..subs)
            .map(|i| Arc::new(Outbox::new(64 << 20).with_deflate(i < compressing)))
            .collect();
        for (i, ob) in outboxes.iter().enumerate() {
            hub.subscribe(&topic, i as u64, ob.clone() as Arc<dyn Subscriber>);
        }
        let mut batch = Batch::default();
        g.throughput(Throughput::Elements(subs as u64));
        g.bench_function(BenchmarkId::new("deliver_1KiB_2000", name), |b| {
            b.iter(|| {
                let p =
                    Publication::encode(&topic, data.as_bytes(), 1).compressible(compressing > 0);
                hub.deliver(&topic, &p);
                for ob in &outboxes {
                    ob.take(&mut batch);
                    batch.frames.clear();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, encode, fanout, lagging, deflate);
criterion_main!(benches);
