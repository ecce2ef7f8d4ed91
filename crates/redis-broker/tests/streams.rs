//! Streams in single mode against a real redis-server: two brokers ("nodes") on one
//! Redis number one stream together, read its history, hear a backend's `FCALL`, and
//! survive a flush, a lost function library, a restart and a killed subscription.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{cli, eventually, Event, Recorder};
use wsgate_fanout::{Broker, BrokerError, HistoryQuery, Origin, Position, StreamOptions};
use wsgate_redis::streams::StreamKeys;
use wsgate_redis::{RedisBroker, RedisOptions};
use wsgate_testkit::redis::Redis;

const WAIT: Duration = Duration::from_secs(10);

fn opts(size: usize, ttl: Duration) -> StreamOptions {
    StreamOptions {
        history_size: size,
        history_ttl: ttl,
    }
}

async fn broker(redis: &Redis, events: &Arc<Recorder>) -> RedisBroker {
    let mut options = RedisOptions::new(redis.url());
    options.unsubscribe_delay = Duration::ZERO;
    options.install_functions = true;
    let b = RedisBroker::start(options, events.clone()).unwrap();
    assert!(eventually(WAIT, || b.is_ready()).await, "broker ready");
    b
}

async fn subscribe(b: &RedisBroker, topics: &[&str]) {
    let topics = topics.iter().map(|t| Arc::from(*t)).collect();
    b.subscribe(topics).await.unwrap();
}

async fn publish(b: &RedisBroker, topic: &str, data: &str, o: &StreamOptions) -> Position {
    b.publish_stream(topic, data.as_bytes(), 7, o)
        .await
        .unwrap()
}

fn seqs(h: &wsgate_fanout::History) -> Vec<u64> {
    h.entries.iter().map(|e| e.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_number_one_stream_and_read_its_history() {
    let redis = Redis::start();
    let (ea, eb) = (
        Recorder::with_topics(&["chat:1"]),
        Recorder::with_topics(&["chat:1"]),
    );
    let (a, b) = (broker(&redis, &ea).await, broker(&redis, &eb).await);
    subscribe(&a, &["chat:1"]).await;
    subscribe(&b, &["chat:1"]).await;
    let o = opts(10, Duration::from_secs(60));

    // Before the first publication: seq 0 in an epoch both agree on.
    let h0 = a
        .history("chat:1", &o, HistoryQuery::Latest(10))
        .await
        .unwrap();
    assert_eq!((h0.position.seq, h0.first), (0, 1));
    assert!(h0.entries.is_empty());
    let h0b = b
        .history("chat:1", &o, HistoryQuery::Latest(0))
        .await
        .unwrap();
    assert_eq!(h0b.position, h0.position, "a read fixes the epoch");

    // Both nodes publish, pipelined: one numbering, no gap, one epoch.
    let mut acks = Vec::new();
    for i in 1..=20 {
        acks.push(a.publish_stream("chat:1", format!("{{\"a\":{i}}}").as_bytes(), i, &o));
        acks.push(b.publish_stream("chat:1", format!("{{\"b\":{i}}}").as_bytes(), i, &o));
    }
    let mut got = Vec::new();
    for ack in acks {
        let p = ack.await.unwrap();
        assert_eq!(p.epoch, h0.position.epoch);
        got.push(p.seq);
    }
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=40).collect::<Vec<_>>());
    let (a_seqs, b_seqs): (Vec<_>, Vec<_>) = got.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    assert!(
        a_seqs.windows(2).all(|w| w[0].1 < w[1].1),
        "one node's order holds"
    );
    assert!(b_seqs.windows(2).all(|w| w[0].1 < w[1].1));

    // Every node hears all 40, in seq order, as gateway publications.
    for events in [&ea, &eb] {
        assert!(eventually(WAIT, || events.stream("chat:1").len() == 40).await);
        let s = events.stream("chat:1");
        assert_eq!(
            s.iter().map(|e| e.1).collect::<Vec<_>>(),
            (1..=40).collect::<Vec<_>>()
        );
        assert!(s
            .iter()
            .all(|e| e.0 == *h0.position.epoch && e.3 == Origin::Gateway));
        assert!(
            events
                .events()
                .iter()
                .all(|e| !matches!(e, Event::Plain { .. })),
            "no relay message is taken for a plain one"
        );
    }

    // History: trimmed to the 10 newest; Latest and After.
    let h = b
        .history("chat:1", &o, HistoryQuery::Latest(100))
        .await
        .unwrap();
    assert_eq!(h.position.seq, 40);
    assert_eq!(h.first, 31);
    assert_eq!(seqs(&h), (31..=40).collect::<Vec<_>>());
    let h = a
        .history("chat:1", &o, HistoryQuery::Latest(3))
        .await
        .unwrap();
    assert_eq!(seqs(&h), vec![38, 39, 40]);
    let h = a
        .history("chat:1", &o, HistoryQuery::After { seq: 33, limit: 2 })
        .await
        .unwrap();
    assert_eq!(seqs(&h), vec![34, 35]);
    let data = ea.stream("chat:1");
    assert_eq!(
        h.entries[0].data,
        data[33].2.as_bytes(),
        "what was relayed is kept"
    );
    let h = a
        .history("chat:1", &o, HistoryQuery::After { seq: 5, limit: 100 })
        .await
        .unwrap();
    assert_eq!(
        seqs(&h),
        (31..=40).collect::<Vec<_>>(),
        "from the oldest kept"
    );
    assert!(h.covers(30, &h.position.epoch));
    assert!(!h.covers(29, &h.position.epoch));
    let h = a
        .history("chat:1", &o, HistoryQuery::After { seq: 40, limit: 5 })
        .await
        .unwrap();
    assert!(h.entries.is_empty());

    // The numbering expires the ttl after the last publication; the history key
    // outlives it by at most a sixteenth of the ttl (renewed now and then, not on
    // every publication).
    let mut c = redis.conn();
    let k = StreamKeys::of(b"wsgate:chat:1");
    let pttl = |c: &mut redis::Connection, key: &[u8]| -> i64 {
        redis::cmd("PTTL").arg(key).query(c).unwrap()
    };
    let (stream, history) = (pttl(&mut c, &k.stream), pttl(&mut c, &k.history));
    assert!(stream > 0 && stream <= 60_000, "{stream}");
    assert!(
        history >= stream && history <= 60_000 + 60_000 / 16,
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_publications_age_out() {
    let redis = Redis::start();
    let events = Recorder::with_topics(&[]);
    let a = broker(&redis, &events).await;
    let o = opts(100, Duration::from_millis(300));
    for i in 0..3 {
        publish(&a, "s", &i.to_string(), &o).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish(&a, "s", "3", &o).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let h = a.history("s", &o, HistoryQuery::Latest(100)).await.unwrap();
    assert_eq!(seqs(&h), vec![4], "the first three are older than the ttl");
    assert_eq!((h.position.seq, h.first), (4, 4));
    // Nothing published for the ttl: the stream is forgotten, numbering restarts.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let p = publish(&a, "s", "again", &o).await;
    assert_eq!(p.seq, 1);
    assert_ne!(p.epoch, h.position.epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishes_with_one_command() {
    let redis = Redis::start();
    let events = Recorder::with_topics(&["chat:1", "news"]);
    let a = broker(&redis, &events).await;
    subscribe(&a, &["chat:1", "news"]).await;
    let o = opts(3, Duration::from_secs(60));
    let p = publish(&a, "chat:1", r#"{"from":"gw"}"#, &o).await;
    assert_eq!(p.seq, 1);

    // redis-cli, as a backend's shell would; JSON as-is, text as a JSON string.
    let out = cli(
        redis.port,
        &[
            "FCALL",
            "wsgate_publish",
            "1",
            "wsgate:chat:1",
            r#"{"x": [1, 2]}"#,
        ],
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), vec!["2", &*p.epoch]);
    // The redis crate, as a raw command.
    let mut c = redis.conn();
    let (seq, epoch): (u64, String) = redis::cmd("FCALL")
        .arg("wsgate_publish")
        .arg(1)
        .arg("wsgate:chat:1")
        .arg("hello")
        .query(&mut c)
        .unwrap();
    assert_eq!((seq, &*epoch), (3, &*p.epoch));
    assert!(eventually(WAIT, || events.stream("chat:1").len() == 3).await);
    let s = events.stream("chat:1");
    assert_eq!(s[1].1, 2);
    assert_eq!(s[1].2, r#"{"x": [1, 2]}"#, "valid JSON byte for byte");
    assert_eq!(s[1].3, Origin::Backend);
    assert_eq!(
        (s[2].1, &*s[2].2, s[2].3),
        (3, r#""hello""#, Origin::Backend)
    );
    let at = events.events().iter().find_map(|e| match e {
        Event::Stream {
            seq: 3,
            accepted_at,
            ..
        } => Some(*accepted_at),
        _ => None,
    });
    let now = wsgate_fanout::unix_nanos();
    assert!(
        at.is_some_and(|at| at <= now && now - at < 10_000_000_000),
        "a backend's publication is stamped with Redis's time"
    );

    // The backend's calls honour the options the gateway stored (3 kept).
    for i in 0..4 {
        cli(
            redis.port,
            &[
                "FCALL",
                "wsgate_publish",
                "1",
                "wsgate:chat:1",
                &i.to_string(),
            ],
        );
    }
    let h = a
        .history("chat:1", &o, HistoryQuery::Latest(100))
        .await
        .unwrap();
    assert_eq!(seqs(&h), vec![5, 6, 7]);
    assert_eq!(&h.entries[2].data[..], b"3");

    // Without stored options: the defaults, or the call's own.
    let out = cli(
        redis.port,
        &[
            "FCALL",
            "wsgate_publish",
            "1",
            "wsgate:other",
            "x",
            "2",
            "60000",
        ],
    );
    assert!(out.starts_with("1\n"), "{out}");
    for _ in 0..299 {
        let _: redis::Value = redis::cmd("FCALL")
            .arg("wsgate_publish")
            .arg(1)
            .arg("wsgate:other")
            .arg("x")
            .arg(2)
            .arg(60_000)
            .query(&mut c)
            .unwrap();
    }
    // Trimmed to the call's size of 2, give or take one Redis stream node (100 entries
    // by default: MAXLEN ~), and read back exactly.
    let history = StreamKeys::of(b"wsgate:other").history;
    let len: u64 = redis::cmd("XLEN").arg(&history).query(&mut c).unwrap();
    assert!((2..=102).contains(&len), "{len}");
    let read: Vec<redis::Value> = redis::cmd("FCALL")
        .arg("wsgate_history")
        .arg(1)
        .arg("wsgate:other")
        .arg(2)
        .arg(60_000)
        .arg("latest")
        .arg(10)
        .query(&mut c)
        .unwrap();
    assert_eq!(
        read.len(),
        3 + 2 * 3,
        "the epoch, seq, first, then two entries"
    );
    assert_eq!(read[1], redis::Value::Int(300));
    assert_eq!(read[2], redis::Value::Int(299));

    // A plain PUBLISH on a stream's channel is reported as plain (the node decides).
    let n: u64 = redis::cmd("PUBLISH")
        .arg("wsgate:chat:1")
        .arg(r#"{"plain":true}"#)
        .query(&mut c)
        .unwrap();
    assert_eq!(n, 1);
    assert!(
        eventually(WAIT, || events.events().contains(&Event::Plain {
            topic: "chat:1".into(),
            data: r#"{"plain":true}"#.into(),
            origin: Origin::Backend,
        }))
        .await
    );
    // And plain topics stay plain.
    a.publish("news", b"{}", 1).await.unwrap();
    assert!(
        eventually(WAIT, || events.events().contains(&Event::Plain {
            topic: "news".into(),
            data: "{}".into(),
            origin: Origin::Gateway,
        }))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_starts_a_new_epoch_and_lost_functions_are_installed_again() {
    let mut redis = Redis::start();
    let events = Recorder::with_topics(&["t"]);
    let a = broker(&redis, &events).await;
    subscribe(&a, &["t"]).await;
    let o = opts(10, Duration::from_secs(60));
    let before = publish(&a, "t", "1", &o).await;
    publish(&a, "t", "2", &o).await;

    // FLUSHALL: the numbering restarts at 1 in a new epoch.
    cli(redis.port, &["FLUSHALL"]);
    let after = publish(&a, "t", "3", &o).await;
    assert_eq!(after.seq, 1);
    assert_ne!(after.epoch, before.epoch);
    let h = a.history("t", &o, HistoryQuery::Latest(10)).await.unwrap();
    assert_eq!(
        (h.position.clone(), h.first, seqs(&h)),
        (after.clone(), 1, vec![1])
    );

    // FUNCTION FLUSH: the next call installs the library again and succeeds.
    cli(redis.port, &["FUNCTION", "FLUSH"]);
    assert_eq!(publish(&a, "t", "4", &o).await.seq, 2);
    cli(redis.port, &["FUNCTION", "FLUSH"]);
    let h = a.history("t", &o, HistoryQuery::Latest(10)).await.unwrap();
    assert_eq!(seqs(&h), vec![1, 2]);

    // Redis restarted without persistence: the reconnect installs the library.
    let port = redis.port;
    redis.kill();
    let down = a.publish_stream("t", b"5", 1, &o).await;
    assert!(matches!(down, Err(BrokerError::Unavailable(_))), "{down:?}");
    let down = a.history("t", &o, HistoryQuery::Latest(1)).await;
    assert!(matches!(down, Err(BrokerError::Unavailable(_))), "{down:?}");
    let redis = Redis::start_on(port);
    assert!(eventually(WAIT, || a.is_ready()).await);
    assert!(
        eventually(WAIT, || cli(redis.port, &["FUNCTION", "LIST"])
            .contains("wsgate_publish"))
        .await,
        "installed on reconnect, before any call"
    );
    let p = publish(&a, "t", "6", &o).await;
    assert_eq!(p.seq, 1);
    assert_ne!(p.epoch, after.epoch);
    // The node was told its subscription is back: it catches its streams up.
    assert!(
        eventually(WAIT, || events
            .resubscribed()
            .contains(&vec!["t".to_string()]))
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_is_reported_once_resubscribed() {
    let redis = Redis::start();
    let events = Recorder::with_topics(&["a", "b"]);
    let x = broker(&redis, &events).await;
    subscribe(&x, &["a", "b"]).await;
    assert!(events.resubscribed().is_empty());
    let killed = cli(redis.port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed.trim(), "1");
    assert!(
        eventually(WAIT, || events.resubscribed()
            == vec![vec!["a".to_string(), "b".to_string()]])
        .await,
        "{:?}",
        events.resubscribed()
    );
    // Confirmed before it was reported: a publication now reaches the node.
    let o = opts(10, Duration::from_secs(60));
    publish(&x, "a", "{}", &o).await;
    assert!(eventually(WAIT, || events.stream("a").len() == 1).await);
}

/// A local subscriber keeping the text of every frame it gets (small frames only).
#[derive(Default)]
struct Frames(parking_lot::Mutex<Vec<String>>);

impl wsgate_fanout::Subscriber for Frames {
    fn deliver(&self, p: &wsgate_fanout::Publication) {
        assert!(p.frame.len() < 127, "small frames: a 2-byte header");
        let text = String::from_utf8(p.frame[2..].to_vec()).unwrap();
        self.0.lock().push(text);
    }
}

fn redis_node(redis: &Redis) -> wsgate_fanout::Node {
    use wsgate_fanout::{Namespace, Namespaces, Node, Pattern};
    let namespaces = Namespaces::new(vec![Namespace {
        name: "chat".into(),
        topics: vec![Pattern::parse("chat:*").unwrap()],
        stream: Some(opts(3, Duration::from_secs(60))),
        ..Default::default()
    }])
    .unwrap();
    let mut options = RedisOptions::new(redis.url());
    options.install_functions = true;
    Node::with_namespaces(
        wsgate_metrics::Metrics::default(),
        1 << 16,
        namespaces,
        |events| RedisBroker::start(options, events),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_and_resume_a_stream_through_redis() {
    use std::collections::HashMap;
    use wsgate_fanout::{Source, Subscriber};

    let redis = Redis::start();
    let (a, b) = (redis_node(&redis), redis_node(&redis));
    assert!(eventually(WAIT, || a.broker_ready() && b.broker_ready()).await);
    let frames = Arc::new(Frames::default());
    let sub: Arc<dyn Subscriber> = frames.clone();
    let topics = [Arc::from("chat:1"), Arc::from("news")];
    let mut starts = Vec::new();
    b.subscribe_streams(1, &sub, &topics, &[], &HashMap::new(), |s| {
        starts = s.to_vec()
    })
    .await
    .unwrap();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].position.seq, 0);
    let epoch = starts[0].position.epoch.clone();

    // Node a publishes; node b's subscriber gets every publication with its seq.
    for i in 1..=3 {
        let p = a
            .publish(Source::Http, "chat:1", format!("{i}").as_bytes())
            .unwrap()
            .await
            .unwrap()
            .expect("a stream has positions");
        assert_eq!((p.seq, &p.epoch), (i, &epoch));
    }
    a.publish(Source::Http, "news", b"{}")
        .unwrap()
        .await
        .unwrap();
    // A backend's publication takes the next seq.
    cli(
        redis.port,
        &[
            "FCALL",
            "wsgate_publish",
            "1",
            "wsgate:chat:1",
            "from a backend",
        ],
    );
    let want = [
        r#"{"op":"message","topic":"chat:1","data":1,"seq":1}"#,
        r#"{"op":"message","topic":"chat:1","data":2,"seq":2}"#,
        r#"{"op":"message","topic":"chat:1","data":3,"seq":3}"#,
        r#"{"op":"message","topic":"news","data":{}}"#,
        r#"{"op":"message","topic":"chat:1","data":"from a backend","seq":4}"#,
    ];
    assert!(
        eventually(WAIT, || frames.0.lock().len() == want.len()).await,
        "{:?}",
        frames.0.lock()
    );
    assert_eq!(*frames.0.lock(), want);

    // A client resuming after seq 2 on node a gets 3 and 4 from the Redis history.
    let late = Arc::new(Frames::default());
    let late_sub: Arc<dyn Subscriber> = late.clone();
    let since = HashMap::from([(
        Arc::from("chat:1"),
        Position {
            seq: 2,
            epoch: epoch.clone(),
        },
    )]);
    let mut starts = Vec::new();
    a.subscribe_streams(2, &late_sub, &topics[..1], &[], &since, |s| {
        starts = s.to_vec()
    })
    .await
    .unwrap();
    assert_eq!(starts[0].recovered, Some(true));
    assert!(eventually(WAIT, || late.0.lock().len() == 2).await);
    assert_eq!(
        *late.0.lock(),
        want[2..5]
            .iter()
            .filter(|w| w.contains("chat:1"))
            .copied()
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_queued_together_share_calls_and_keep_each_streams_order() {
    let redis = Redis::start();
    let topics = ["chat:a", "chat:b", "chat:c"];
    let events = Recorder::with_topics(&topics);
    let b = broker(&redis, &events).await;
    subscribe(&b, &topics).await;
    // Different options per stream: each keeps its own.
    let o: Vec<StreamOptions> = (0..3)
        .map(|i| opts(5 + i, Duration::from_secs(60 + 60 * i as u64)))
        .collect();
    let mut c = redis.conn();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();

    // 300 publications queued at once, the streams interleaved, with plain ones among
    // them (which end a run of stream publications).
    let mut acks = Vec::new();
    let mut plain = Vec::new();
    for i in 0..300u64 {
        let t = (i % 3) as usize;
        let data = format!("{{\"i\":{i}}}");
        acks.push((
            t,
            i,
            b.publish_stream(topics[t], data.as_bytes(), 1_000 + i, &o[t]),
        ));
        if i % 50 == 0 {
            plain.push(b.publish("plain", b"{}", 1));
        }
    }
    let mut next = [1u64; 3];
    let mut epochs: [Option<Arc<str>>; 3] = [None, None, None];
    for (t, i, ack) in acks {
        let p = ack.await.unwrap();
        assert_eq!(
            p.seq, next[t],
            "publication {i}: each stream numbered in queue order"
        );
        next[t] += 1;
        let e = epochs[t].get_or_insert_with(|| p.epoch.clone());
        assert_eq!(*e, p.epoch);
    }
    for ack in plain {
        ack.await.unwrap();
    }

    // Relayed in order, with their own data and accepted_at.
    for (t, topic) in topics.iter().enumerate() {
        assert!(eventually(WAIT, || events.stream(topic).len() == 100).await);
        let s = events.stream(topic);
        for (k, e) in s.iter().enumerate() {
            let i = 3 * k as u64 + t as u64;
            assert_eq!(e.1, k as u64 + 1);
            assert_eq!(e.2, format!("{{\"i\":{i}}}"), "{topic} seq {}", e.1);
        }
        let h = b
            .history(topic, &o[t], HistoryQuery::Latest(100))
            .await
            .unwrap();
        assert_eq!(h.position.seq, 100);
        assert_eq!(h.entries.len(), 5 + t, "{topic} keeps its own size");
        assert_eq!(
            h.entries.last().unwrap().accepted_at,
            1_000 + 297 + t as u64
        );
        let k = StreamKeys::of(format!("wsgate:{topic}").as_bytes());
        let ttl: i64 = redis::cmd("PTTL").arg(&k.history).query(&mut c).unwrap();
        let max = 60_000 + 60_000 * t as i64;
        assert!(
            ttl > max - 60_000 && ttl <= max + max / 16,
            "{topic}: {ttl}"
        );
    }

    // Far fewer function calls than publications.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut c)
        .unwrap();
    let calls: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("FCALL counted");
    assert!(calls < 100, "300 publications took {calls} calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_publish_many_call_writes_nothing() {
    let redis = Redis::start();
    let events = Recorder::with_topics(&[]);
    let _b = broker(&redis, &events).await;
    let mut c = redis.conn();
    // The second publication's channel index is out of range: refused whole.
    let r: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
        .arg("wsgate_gateway_publish_many")
        .arg(1)
        .arg("wsgate:chat:x")
        .arg(10)
        .arg(60_000)
        .arg(1)
        .arg("{}")
        .arg(5)
        .arg(2)
        .arg("{}")
        .arg(6)
        .query(&mut c);
    assert!(r.is_err(), "{r:?}");
    let k = StreamKeys::of(b"wsgate:chat:x");
    let exists: u64 = redis::cmd("EXISTS")
        .arg(&k.stream)
        .arg(&k.history)
        .query(&mut c)
        .unwrap();
    assert_eq!(exists, 0, "nothing written");
}

/// FCALLs Redis has run since its stats were reset.
fn fcalls(c: &mut redis::Connection) -> u64 {
    let stats: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_fcall:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_lingers_and_its_stream_publications_share_calls() {
    let redis = Redis::start();
    let topics = ["chat:a", "chat:b", "chat:c", "chat:d"];
    let events = Recorder::with_topics(&topics);
    let mut options = RedisOptions::new(redis.url());
    options.unsubscribe_delay = Duration::ZERO;
    options.install_functions = true;
    // Far longer than the pace below, however slow the machine.
    options.stream_linger = Duration::from_millis(100);
    let b = RedisBroker::start(options, events.clone()).unwrap();
    assert!(eventually(WAIT, || b.is_ready()).await, "broker ready");
    subscribe(&b, &topics).await;
    let o = opts(50, Duration::from_secs(60));
    let mut c = redis.conn();
    let _: () = redis::cmd("CONFIG").arg("RESETSTAT").query(&mut c).unwrap();

    // 200 publications one by one, each a millisecond after the previous one: alone,
    // each would be a call of its own (the pipeline is back long before the next).
    let mut acks = Vec::new();
    for i in 0..200u64 {
        let t = (i % 4) as usize;
        let data = format!("{{\"i\":{i}}}");
        acks.push((t, b.publish_stream(topics[t], data.as_bytes(), i, &o)));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut next = [1u64; 4];
    for (t, ack) in acks {
        let p = ack.await.unwrap();
        assert_eq!(
            p.seq, next[t],
            "{}: numbered in publication order",
            topics[t]
        );
        next[t] += 1;
    }
    let calls = fcalls(&mut c);
    assert!(calls <= 50, "200 publications took {calls} calls");

    // Relayed in order, each with its own data.
    for (t, topic) in topics.iter().enumerate() {
        assert!(eventually(WAIT, || events.stream(topic).len() == 50).await);
        for (k, e) in events.stream(topic).iter().enumerate() {
            assert_eq!(e.1, k as u64 + 1);
            assert_eq!(e.2, format!("{{\"i\":{}}}", 4 * k + t));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_returns_exactly_the_history_size_however_many_redis_keeps() {
    let redis = Redis::start();
    let events = Recorder::with_topics(&[]);
    let b = broker(&redis, &events).await;
    let o = opts(10, Duration::from_secs(60));
    let mut acks = Vec::new();
    for i in 0..250u64 {
        acks.push(b.publish_stream("s", format!("{i}").as_bytes(), i, &o));
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let h = b.history("s", &o, HistoryQuery::Latest(100)).await.unwrap();
    assert_eq!(seqs(&h), (241..=250).collect::<Vec<_>>());
    assert_eq!((h.position.seq, h.first), (250, 241));
    let h = b
        .history(
            "s",
            &o,
            HistoryQuery::After {
                seq: 200,
                limit: 100,
            },
        )
        .await
        .unwrap();
    assert_eq!(h.first, 241, "trimmed past 201: not recoverable from 200");
    assert!(!h.covers(200, &h.position.epoch));
    // The read trimmed the history key itself to the size.
    let mut c = redis.conn();
    let len: u64 = redis::cmd("XLEN")
        .arg(StreamKeys::of(b"wsgate:s").history)
        .query(&mut c)
        .unwrap();
    assert_eq!(len, 10);
}
