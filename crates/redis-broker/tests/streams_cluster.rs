//! Streams in cluster mode against a real 3-primary Redis Cluster: every key of a
//! stream in its channel's slot, two brokers numbering streams on every shard, history,
//! a backend's `FCALL` through `redis-cli -c`, the library on every primary (and again
//! after `FUNCTION FLUSH`), and `resubscribed` after a killed connection.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, Event, Recorder};
use wsgate_fanout::{Broker, HistoryQuery, Origin, StreamOptions};
use wsgate_redis::streams::StreamKeys;
use wsgate_redis::{Channels, ClusterBroker, ClusterOptions};
use wsgate_testkit::redis::RedisCluster;

const WAIT: Duration = Duration::from_secs(15);

fn options(cluster: &RedisCluster) -> ClusterOptions {
    ClusterOptions {
        seeds: cluster.seeds().split(',').map(String::from).collect(),
        password: None,
        tls: Default::default(),
        prefix: "wsgate:".into(),
        unsubscribe_delay: Duration::ZERO,
        hash_tag_separator: Some(b'.'),
        metrics: None,
        install_functions: true,
        presence_timeout: wsgate_redis::DEFAULT_PRESENCE_TIMEOUT,
    }
}

async fn broker(cluster: &RedisCluster, events: &Arc<Recorder>) -> ClusterBroker {
    let b = ClusterBroker::start(options(cluster), events.clone()).unwrap();
    assert!(eventually(WAIT, || b.is_ready()).await, "broker ready");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_across_three_shards() {
    let cluster = RedisCluster::start(3, 0);
    let channels = Channels::new("wsgate:", Some(b'.'));
    // Topics on every shard, some with a hash tag (`room7.chat` → `wsgate:{room7}.chat`).
    let mut topics: Vec<String> = Vec::new();
    let mut owners: HashMap<String, u16> = HashMap::new();
    for i in 0..12 {
        for t in [format!("room{i}.chat"), format!("news{i}")] {
            let channel = String::from_utf8(channels.channel(&t)).unwrap();
            owners.insert(t.clone(), cluster.owner(&channel));
            topics.push(t);
        }
    }
    let shards: HashSet<u16> = owners.values().copied().collect();
    assert_eq!(shards.len(), 3, "the topics cover every shard");
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let (ea, eb) = (Recorder::with_topics(&names), Recorder::with_topics(&names));
    let (a, b) = (broker(&cluster, &ea).await, broker(&cluster, &eb).await);
    let arcs: Vec<Arc<str>> = names.iter().map(|t| Arc::from(*t)).collect();
    a.subscribe(arcs.clone()).await.unwrap();
    b.subscribe(arcs.clone()).await.unwrap();

    // The library is on every primary, in its sharded form.
    for port in cluster.primaries() {
        let code = cluster.cli_on(port, &["FUNCTION", "LIST", "WITHCODE"]);
        assert!(code.contains("wsgate_publish"), "{port}: {code}");
        assert!(code.contains("local SHARDED = true"), "{port}");
    }

    // Both brokers publish to every topic, pipelined: one numbering per stream.
    let o = StreamOptions {
        history_size: 4,
        history_ttl: Duration::from_secs(60),
    };
    let mut acks = Vec::new();
    for i in 0..3 {
        for t in &topics {
            for (n, x) in [("a", &a), ("b", &b)] {
                let data = format!("{{\"{n}\":{i}}}");
                acks.push((t.clone(), x.publish_stream(t, data.as_bytes(), 1, &o)));
            }
        }
    }
    let mut per_topic: HashMap<String, Vec<u64>> = HashMap::new();
    let mut epochs: HashMap<String, Arc<str>> = HashMap::new();
    for (t, ack) in acks {
        let p = ack.await.unwrap();
        per_topic.entry(t.clone()).or_default().push(p.seq);
        let e = epochs.entry(t).or_insert(p.epoch.clone());
        assert_eq!(*e, p.epoch, "one epoch per stream");
    }
    for (t, mut seqs) in per_topic {
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=6).collect::<Vec<_>>(), "{t}");
    }
    for events in [&ea, &eb] {
        for t in &topics {
            assert!(
                eventually(WAIT, || events.stream(t).len() == 6).await,
                "{t}"
            );
            let s = events.stream(t);
            assert_eq!(
                s.iter().map(|e| e.1).collect::<Vec<_>>(),
                (1..=6).collect::<Vec<_>>()
            );
            assert!(s
                .iter()
                .all(|e| *e.0 == *epochs[t] && e.3 == Origin::Gateway));
        }
    }

    // Every key of a stream is in its channel's slot, on the channel's owner.
    for t in &topics {
        let channel = String::from_utf8(channels.channel(t)).unwrap();
        let slot = cluster.keyslot(&channel);
        let k = StreamKeys::of(channel.as_bytes());
        for key in [&k.stream, &k.history, &k.options] {
            let key = std::str::from_utf8(key).unwrap();
            assert_eq!(cluster.keyslot(key), slot, "{key}");
            let exists = cluster.cli_on(owners[t], &["EXISTS", key]);
            assert_eq!(exists.trim(), "1", "{key} on its owner");
        }
    }

    // History on every shard.
    for t in &topics {
        let h = b.history(t, &o, HistoryQuery::Latest(10)).await.unwrap();
        assert_eq!(h.position.seq, 6);
        assert_eq!(h.first, 3);
        assert_eq!(
            h.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        let h = a
            .history(t, &o, HistoryQuery::After { seq: 4, limit: 1 })
            .await
            .unwrap();
        assert_eq!(h.entries.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![5]);
    }

    // A backend: `redis-cli -c FCALL` follows MOVED to the owner; the stored options
    // (4 kept) apply; text becomes a JSON string.
    let t = "room3.chat";
    let channel = String::from_utf8(channels.channel(t)).unwrap();
    let out = cluster.cli_on(
        cluster.any_port(),
        &[
            "-c",
            "FCALL",
            "wsgate_publish",
            "1",
            &channel,
            "from a backend",
        ],
    );
    assert_eq!(out.lines().next(), Some("7"), "{out}");
    for events in [&ea, &eb] {
        assert!(eventually(WAIT, || events.stream(t).len() == 7).await);
        let last = events.stream(t).pop().unwrap();
        assert_eq!(
            (last.1, &*last.2, last.3),
            (7, "\"from a backend\"", Origin::Backend)
        );
    }
    let h = a.history(t, &o, HistoryQuery::Latest(10)).await.unwrap();
    assert_eq!(h.entries.len(), 4);

    // A plain SPUBLISH on a stream's channel is reported as plain.
    cluster.cli_spublish(&channel, "{\"plain\":1}");
    assert!(
        eventually(WAIT, || ea.events().contains(&Event::Plain {
            topic: t.into(),
            data: "{\"plain\":1}".into(),
            origin: Origin::Backend,
        }))
        .await
    );

    // A primary that lost its functions: the next call installs them again.
    let owner = owners[t];
    cluster.cli_on(owner, &["FUNCTION", "FLUSH"]);
    let p = a.publish_stream(t, b"{}", 1, &o).await.unwrap();
    assert_eq!(p.seq, 8);
    assert!(cluster
        .cli_on(owner, &["FUNCTION", "LIST"])
        .contains("wsgate_history"));

    // A killed connection: the broker subscribes again and tells the node.
    assert!(ea.resubscribed().is_empty());
    // The brokers' connections to the owner (RESP3, holding shard channels: pubsub).
    let killed = cluster.cli_on(owner, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "2", "one per broker");
    assert!(
        eventually(WAIT, || ea
            .resubscribed()
            .iter()
            .any(|r| r.iter().any(|x| owners[x] == owner)))
        .await,
        "{:?}",
        ea.resubscribed()
    );
    // Still live on that shard afterwards.
    let before = ea.stream(t).len();
    a.publish_stream(t, b"{}", 1, &o).await.unwrap();
    assert!(eventually(WAIT, || ea.stream(t).len() == before + 1).await);
}
