//! The delivery hot path without sockets: encode a publication once, hand it to every
//! local subscriber's outbox (what `MemoryBroker::publish` does), and the writer's
//! side of taking a batch. Regressions in encode/enqueue show up here.
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

criterion_group!(benches, encode, fanout, lagging);
criterion_main!(benches);
