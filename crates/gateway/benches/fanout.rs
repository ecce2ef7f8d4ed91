//! The delivery hot path without sockets: encode a publication once, hand it to every
//! local subscriber's outbox (what `MemoryBroker::publish` does), and the writer's
//! side of taking a batch. Regressions in encode/enqueue show up here.
//!
//! `cargo bench -p wsgate-gateway --bench fanout`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wsgate_fanout::{Hub, Publication, Subscriber};
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
        g.bench_with_input(
            BenchmarkId::new("encode_once_enqueue_take", subs),
            &subs,
            |b, _| {
                b.iter(|| {
                    let p = Publication::encode(&topic, data.as_bytes(), 1);
                    hub.deliver(&topic, &p);
                    // The writers' side: take what was queued (as each writer would).
                    for ob in &outboxes {
                        ob.take(&mut batch);
                        batch.frames.clear();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, encode, fanout);
criterion_main!(benches);
