//! `wsgate` nodes on a real 3-primary Redis Cluster, `--redis-mode cluster` (issue 9):
//! sharded pub/sub. Every publish path reaches every node; topics are held with
//! `SSUBSCRIBE` on the primary owning their slot, exactly while a local client wants
//! them; order holds across nodes; hash tags co-locate topics.

use std::time::Duration;

use serde_json::json;
use wsgate_redis::cluster::slot::key_slot;
use wsgate_testkit::process::{subscribe_each_at_once, Node};
use wsgate_testkit::redis::command_calls;
use wsgate_testkit::redis::RedisCluster;
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(10);

fn node(cluster: &RedisCluster, extra: &[&str]) -> Node {
    let mut args = vec![
        "--redis-mode",
        "cluster",
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
        "--redis-unsubscribe-delay",
        "200ms",
    ];
    args.extend_from_slice(extra);
    Node::start(Some(&cluster.seeds()), &args)
}

/// `per_shard` topic names for each primary (in slot order), with the primary's port.
fn topics_on_every_shard(cluster: &RedisCluster, per_shard: usize) -> Vec<(String, u16)> {
    let ranges = cluster.slot_ranges();
    let mut out: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let topic = format!("room.{i}");
        let slot = key_slot(format!("wsgate:{topic}").as_bytes());
        let port = ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .unwrap()
            .2;
        if out.iter().filter(|(_, p)| *p == port).count() < per_shard {
            out.push((topic, port));
        }
        if out.len() == per_shard * cluster.primaries().len() {
            break;
        }
    }
    out
}

#[test]
fn slots_agree_with_cluster_keyslot() {
    let cluster = RedisCluster::start(3, 0);
    for key in [
        "wsgate:news",
        "wsgate:{room42}.chat",
        "x{}y",
        "{a}{b}",
        "{",
        "}{",
    ]
    .into_iter()
    .map(String::from)
    .chain((0..200).map(|i| format!("wsgate:prices.T{i}/x-{}", i * 7919)))
    {
        assert_eq!(
            key_slot(key.as_bytes()),
            cluster.keyslot(&key),
            "slot of {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_path_reaches_every_node_across_all_shards() {
    let cluster = RedisCluster::start(3, 0);
    let nodes = [node(&cluster, &[]), node(&cluster, &[])];
    for n in &nodes {
        assert!(
            wait_until(WAIT, || n.is_ready()),
            "node ready on the cluster"
        );
    }
    let topics = topics_on_every_shard(&cluster, 2);
    let names: Vec<&str> = topics.iter().map(|(t, _)| t.as_str()).collect();
    let mut subs = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(n.addr).await;
        c.subscribe(&names).await;
        subs.push(c);
    }
    let mut publisher = Client::connect(nodes[0].addr).await;
    for (topic, _) in &topics {
        // 1. WebSocket on node 0, 2. HTTP on node 1, 3. redis-cli -c SPUBLISH.
        let r = publisher
            .call(json!({"op":"publish","topic":topic,"data":{"from":"ws"}}))
            .await;
        assert_eq!(r["op"], "published", "{r}");
        let (status, body) = nodes[1].http_publish(topic, json!({"from":"http"}));
        assert_eq!(status, 200, "{body}");
        let out = cluster.cli_spublish(&format!("wsgate:{topic}"), r#"{"from":"redis-cli"}"#);
        assert_eq!(out.trim(), "2", "both nodes hold the channel: {out}");
    }
    // Per topic, the order published; topics on different shards arrive through
    // different connections, so no order holds between them.
    for (i, c) in subs.iter_mut().enumerate() {
        let mut got: std::collections::HashMap<String, Vec<String>> = Default::default();
        for _ in 0..3 * topics.len() {
            let m = c
                .next_message(WAIT)
                .await
                .unwrap_or_else(|| panic!("node {i}: only {got:?}"));
            got.entry(m["topic"].as_str().unwrap().to_string())
                .or_default()
                .push(m["data"]["from"].as_str().unwrap().to_string());
        }
        for (topic, _) in &topics {
            assert_eq!(got[topic], ["ws", "http", "redis-cli"], "node {i}, {topic}");
        }
    }

    // Each primary holds exactly the topics of its slots.
    for port in cluster.primaries() {
        let mut want: Vec<String> = topics
            .iter()
            .filter(|(_, p)| *p == port)
            .map(|(t, _)| format!("wsgate:{t}"))
            .collect();
        want.sort();
        assert_eq!(cluster.shardchannels(port), want, "primary {port}");
    }
    // Unsubscribing one topic per shard on both nodes drops it from its primary.
    let dropped: Vec<&str> = cluster
        .primaries()
        .into_iter()
        .map(|port| topics.iter().find(|(_, p)| *p == port).unwrap().0.as_str())
        .collect();
    for c in &mut subs {
        c.unsubscribe(&dropped).await;
    }
    for port in cluster.primaries() {
        let mut want: Vec<String> = topics
            .iter()
            .filter(|(t, p)| *p == port && !dropped.contains(&t.as_str()))
            .map(|(t, _)| format!("wsgate:{t}"))
            .collect();
        want.sort();
        assert_eq!(want.len(), 1);
        assert!(
            wait_until(WAIT, || cluster.shardchannels(port) == want),
            "primary {port}: {:?}, want {want:?}",
            cluster.shardchannels(port)
        );
    }
    // Per-shard metrics: one label per shard index, never a topic.
    let (_, metrics) = nodes[0].get("/metrics");
    for shard in 0..3 {
        assert!(
            metrics.contains(&format!("wsgate_redis_shard_up{{shard=\"{shard}\"}} 1")),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!("wsgate_redis_shard_topics{{shard=\"{shard}\"}} 1")),
            "{metrics}"
        );
    }
    assert!(
        metrics.contains("wsgate_redis_cluster_shards 3"),
        "{metrics}"
    );
    assert!(metrics.contains("wsgate_redis_up 1"), "{metrics}");
    assert!(!metrics.contains("room."), "no topic in any label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_cross_nodes_complete_and_in_order() {
    const N: u64 = 10_000;
    let cluster = RedisCluster::start(3, 0);
    let (a, b) = (node(&cluster, &[]), node(&cluster, &[]));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    wsgate_testkit::process::ordered_stream_crosses_nodes(&a, &b, N, WAIT).await;
    let (_, metrics) = a.get("/metrics");
    let owner = cluster
        .primaries()
        .iter()
        .position(|p| *p == cluster.owner("wsgate:seq"));
    let line = format!(
        "wsgate_redis_shard_publishes_total{{shard=\"{}\"}} {N}",
        owner.unwrap()
    );
    assert!(metrics.contains(&line), "{line} in {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_tags_colocate_related_topics() {
    let cluster = RedisCluster::start(3, 0);
    let n = node(&cluster, &["--redis-hash-tag-separator", "."]);
    assert!(wait_until(WAIT, || n.is_ready()));
    let mut c = Client::connect(n.addr).await;
    c.subscribe(&["room42.chat", "room42.typing", "news"]).await;
    let chat = "wsgate:{room42}.chat";
    let owner = cluster.owner(chat);
    assert_eq!(owner, cluster.owner("wsgate:{room42}.typing"));
    let held = cluster.shardchannels(owner);
    assert!(held.contains(&chat.to_string()), "{held:?}");
    assert!(
        held.contains(&"wsgate:{room42}.typing".to_string()),
        "{held:?}"
    );
    // A topic without the separator keeps its plain channel name.
    assert!(cluster
        .shardchannels(cluster.owner("wsgate:news"))
        .contains(&"wsgate:news".to_string()));
    // A backend publishes to the tagged channel; clients see the plain topic.
    cluster.cli_spublish(chat, r#""hi""#);
    let m = c.next_message(WAIT).await.expect("delivered");
    assert_eq!(m["topic"], "room42.chat");
    assert_eq!(m["data"], "hi");
    let r = c
        .call(json!({"op":"publish","topic":"room42.typing","data":1}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    let m = c.next_message(WAIT).await.expect("delivered");
    assert_eq!(m["topic"], "room42.typing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_subscribes_are_batched_per_slot() {
    const CLIENTS: usize = 100;
    let cluster = RedisCluster::start(3, 0);
    let n = node(&cluster, &["--redis-hash-tag-separator", "."]);
    assert!(wait_until(WAIT, || n.is_ready()));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::connect(n.addr).await);
    }
    // All in one slot (tag `lobby`), so they may share SSUBSCRIBE commands.
    let owner = cluster.owner("wsgate:{lobby}.x");
    let calls = || -> u64 {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &owner.to_string(), "INFO", "commandstats"])
            .output()
            .unwrap();
        command_calls(&String::from_utf8_lossy(&out.stdout), "ssubscribe").unwrap_or(0)
    };
    let before = calls();
    subscribe_each_at_once(&mut clients, |i| format!("lobby.user{i}")).await;
    assert_eq!(cluster.shardchannels(owner).len(), CLIENTS);
    let used = calls() - before;
    println!("{CLIENTS} concurrent subscribes in one slot took {used} SSUBSCRIBE commands");
    assert!(
        used < CLIENTS as u64,
        "{used} SSUBSCRIBE commands for {CLIENTS} topics"
    );
}
