//! Cluster mode through topology changes (issue 9): a primary killed and its replica
//! promoted, slots moved with `redis-cli --cluster reshard`, a cluster that is not
//! formed yet. Clients stay connected; delivery resumes on the new owner.

use std::time::Duration;

use serde_json::json;
use wsgate_redis::cluster::slot::key_slot;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::RedisCluster;
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(10);
/// Failure detection (node timeout 1 s) plus a replica election, with room to spare.
const FAILOVER: Duration = Duration::from_secs(30);

fn node(cluster: &RedisCluster) -> Node {
    Node::start(
        Some(&cluster.seeds()),
        &[
            "--redis-mode",
            "cluster",
            "--redis-unsubscribe-delay",
            "200ms",
        ],
    )
}

/// A topic name whose channel (`wsgate:<topic>`) hashes to `slot`.
fn topic_in_slot(slot: u16) -> String {
    (0..)
        .map(|i| format!("mv.{i}"))
        .find(|t| key_slot(format!("wsgate:{t}").as_bytes()) == slot)
        .unwrap()
}

/// One topic per primary (the lowest slot each primary owns).
fn one_topic_per_shard(cluster: &RedisCluster) -> Vec<String> {
    let mut firsts: Vec<u16> = Vec::new();
    let mut seen = Vec::new();
    for (a, _, port) in cluster.slot_ranges() {
        if !seen.contains(&port) {
            seen.push(port);
            firsts.push(a);
        }
    }
    firsts.into_iter().map(topic_in_slot).collect()
}

/// Publishes `topic` over HTTP on `via` until `sub` receives one of them (the
/// others, sent while the shard was moving, may be refused or lost).
async fn wait_for_delivery(via: &Node, sub: &mut Client, topic: &str, within: Duration) -> bool {
    let end = std::time::Instant::now() + within;
    let mut n = 0;
    while std::time::Instant::now() < end {
        n += 1;
        let (status, _) = via.http_publish(topic, json!({"probe": n}));
        if status == 200 {
            while let Some(m) = sub.next_message(Duration::from_millis(300)).await {
                if m["topic"] == topic && m["data"]["probe"].is_number() {
                    return true;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_killed_replica_promoted_clients_stay_connected() {
    let mut cluster = RedisCluster::start(3, 1);
    let (a, b) = (node(&cluster), node(&cluster));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    let topics = one_topic_per_shard(&cluster);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut sub = Client::connect(b.addr).await;
    sub.subscribe(&names).await;
    let victim_topic = &topics[1];
    let victim = cluster.owner(&format!("wsgate:{victim_topic}"));
    assert!(cluster
        .shardchannels(victim)
        .contains(&format!("wsgate:{victim_topic}")));

    cluster.kill(victim);
    // Both nodes notice the lost shard (not ready), then follow the promotion.
    assert!(
        wait_until(WAIT, || !a.is_ready()),
        "a lost shard is not ready"
    );
    assert!(
        wait_until(FAILOVER, || a.is_ready() && b.is_ready()),
        "ready again after the replica took over"
    );
    // The cluster's nodes learn of the promotion by gossip, each in its own time: ask
    // until the one answering knows (the gateways may already have followed it).
    let channel = format!("wsgate:{victim_topic}");
    assert!(
        wait_until(FAILOVER, || cluster.owner(&channel) != victim),
        "the cluster reports a new owner of the victim's slot"
    );
    let promoted = cluster.owner(&channel);
    assert_ne!(promoted, victim);
    assert!(
        wait_for_delivery(&a, &mut sub, victim_topic, FAILOVER).await,
        "delivery resumed on the promoted replica"
    );
    assert!(
        cluster
            .shardchannels(promoted)
            .contains(&format!("wsgate:{victim_topic}")),
        "the node resubscribed on the new primary"
    );
    // The same client connection, never dropped, gets every topic from every path.
    assert!(sub.alive().await);
    for t in &topics {
        let (status, body) = a.http_publish(t, json!({"after": "failover"}));
        assert_eq!(status, 200, "{body}");
        cluster.cli_spublish(&format!("wsgate:{t}"), r#"{"after":"cli"}"#);
    }
    let mut got = Vec::new();
    while got.len() < 2 * topics.len() {
        let m = sub
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("{got:?}"));
        if m["data"]["after"].is_string() {
            got.push((
                m["topic"].as_str().unwrap().to_string(),
                m["data"]["after"].clone(),
            ));
        }
    }
    for t in &topics {
        assert!(got.contains(&(t.clone(), json!("failover"))), "{got:?}");
        assert!(got.contains(&(t.clone(), json!("cli"))), "{got:?}");
    }
    // Node b learns of the failover on its own next slot-map read (once a second):
    // bounded wait, not a race with a's deliveries.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = b.get("/metrics");
        let changes: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("wsgate_redis_cluster_slot_map_changes_total "))
            .and_then(|v| v.parse().ok())
            .unwrap();
        // At least the victim's topic: a placement that failed while the replica was
        // being promoted, or a resync after the reconnect, may place it once more.
        let resubscribed = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("wsgate_redis_shard_resubscribed_topics_total{shard=\"1\"} ")
            })
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n >= 1);
        if changes >= 2 && resubscribed {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "initial map and the failover ({changes} changes), the topic resubscribed on shard 1: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_moves_a_subscribed_topic_and_delivery_continues() {
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = (node(&cluster), node(&cluster));
    // A third node with no subscribers: nothing tells it about the move but the
    // `MOVED` its own publications get (or its periodic refresh).
    let c = node(&cluster);
    assert!(wait_until(WAIT, || a.is_ready()
        && b.is_ready()
        && c.is_ready()));
    let primaries = cluster.primaries();
    let (from, to) = (primaries[1], primaries[0]);
    // reshard moves the source's lowest slots first: this topic's slot moves.
    let first = cluster
        .slot_ranges()
        .into_iter()
        .find(|(_, _, p)| *p == from)
        .unwrap()
        .0;
    let moving = topic_in_slot(first);
    let staying = topic_in_slot(first + 100);
    let mut subs = Vec::new();
    for n in [&a, &b] {
        let mut c = Client::connect(n.addr).await;
        c.subscribe(&[moving.as_str(), staying.as_str()]).await;
        subs.push(c);
    }
    let channel = format!("wsgate:{moving}");
    assert!(cluster.shardchannels(from).contains(&channel));

    cluster.reshard(from, to, 10);
    assert_eq!(cluster.owner(&channel), to, "the slot moved");
    // Both nodes follow the move: the channel is held on the new owner by both.
    assert!(
        wait_until(WAIT, || cluster.shardnumsub(to, &channel) == 2
            && cluster.shardnumsub(from, &channel) == 0),
        "to: {:?} from: {:?}",
        cluster.shardchannels(to),
        cluster.shardchannels(from)
    );
    for c in &mut subs {
        assert!(c.alive().await);
    }
    // Published through the node that did not follow the move (nothing of it is
    // subscribed, so no server push told it): the cluster client follows the `MOVED`
    // to the new owner, and the publication is acknowledged only once it took it.
    let (status, body) = c.http_publish(&moving, json!({"via": "c"}));
    assert_eq!(status, 200, "{body}");
    // And node c's own view of the slot map (readiness, metrics) follows the move.
    let changes = || -> u64 {
        let (_, metrics) = c.get("/metrics");
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix("wsgate_redis_cluster_slot_map_changes_total ")?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    assert!(
        wait_until(WAIT, || changes() >= 2),
        "node c re-read the slot map: {} changes",
        changes()
    );
    // Every path reaches both nodes on the new owner, the unmoved topic too.
    for (i, via) in [&a, &b].into_iter().enumerate() {
        let (status, body) = via.http_publish(&moving, json!({"via": i}));
        assert_eq!(status, 200, "{body}");
    }
    let out = cluster.cli_spublish(&channel, r#"{"via":"cli"}"#);
    assert_eq!(out.trim(), "2", "both nodes subscribed on the new owner");
    let (status, _) = a.http_publish(&staying, json!({"via": "stay"}));
    assert_eq!(status, 200);
    for (i, c) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 5 {
            let m = c
                .next_message(WAIT)
                .await
                .unwrap_or_else(|| panic!("node {i}: {got:?}"));
            got.push(m["data"]["via"].clone());
        }
        got.sort_by_key(|v| v.to_string());
        assert_eq!(
            got,
            vec![json!("c"), json!("cli"), json!("stay"), json!(0), json!(1)],
            "node {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_every_slot_is_served() {
    let cluster = RedisCluster::spawn(3);
    let n = node(&cluster);
    // Servers up, no cluster formed: no slot map, not ready, subscribes refused.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(n.get("/readyz").0, 503);
    let mut c = Client::connect(n.addr).await;
    let r = c.call(json!({"op":"subscribe","topics":["early"]})).await;
    assert_eq!(r["code"], "unavailable", "{r}");
    let (status, _) = n.http_publish("early", json!(1));
    assert_eq!(status, 503);
    cluster.create(0);
    assert!(
        wait_until(WAIT, || n.is_ready()),
        "ready once the cluster serves every slot"
    );
    c.subscribe(&["early"]).await;
    let (status, body) = n.http_publish("early", json!(2));
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.next_message(WAIT).await.expect("delivered")["data"], 2);
}
