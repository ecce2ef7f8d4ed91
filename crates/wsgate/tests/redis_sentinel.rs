//! Redis under Sentinel, seen from real `wsgate` nodes: a master, one replica and three
//! sentinels on free ports; the master is killed, the sentinels promote the replica, the
//! nodes find the new master by asking the sentinels again, clients stay connected and
//! delivery resumes.

use std::time::{Duration, Instant};

use serde_json::json;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::{SentinelGroup, SENTINEL_MASTER};
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(15);

/// A master, its replica (in sync), three sentinels that know both and each other, and
/// two gateway nodes that found the master through the sentinels.
struct Setup {
    g: SentinelGroup,
    a: Node,
    b: Node,
}

fn setup() -> Setup {
    let g = SentinelGroup::start();
    let mut args: Vec<String> = g.node_args();
    args.extend(["--rate-limit", "1000000", "--rate-burst", "1000000"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Node::start_logged(None, &args);
    let b = Node::start_logged(None, &args);
    assert!(
        wait_until(WAIT, || a.is_ready() && b.is_ready()),
        "{}{}",
        a.logs(),
        b.logs()
    );
    Setup { g, a, b }
}

/// Publishes probes on `publisher` until one reaches `sub` (at most `within`).
async fn probe_until_delivered(
    publisher: &mut Client,
    sub: &mut Client,
    topic: &str,
    within: Duration,
) -> Option<serde_json::Value> {
    let start = Instant::now();
    let mut n = 1000;
    while start.elapsed() < within {
        let r = publisher
            .call(json!({"op":"publish","topic":topic,"data":n}))
            .await;
        if r["op"] == "published" {
            if let Some(m) = sub.next_message(Duration::from_millis(300)).await {
                return Some(m);
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n += 1;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_keeps_clients_and_resumes_delivery() {
    let Setup { mut g, a, b } = setup();
    let mut sub = Client::connect(b.addr).await;
    sub.subscribe(&["failover"]).await;
    let mut publisher = Client::connect(a.addr).await;
    for n in 0..20 {
        let r = publisher
            .call(json!({"op":"publish","topic":"failover","data":n}))
            .await;
        assert_eq!(r["op"], "published", "{r}");
    }
    for n in 0..20 {
        assert_eq!(sub.next_message(WAIT).await.expect("before")["data"], n);
    }
    // Both nodes hold their connections on the master, none on the replica.
    assert_eq!(g.master.channels("wsgate:*"), ["wsgate:failover"]);

    g.master.kill();
    let killed = Instant::now();
    assert!(wait_until(WAIT, || !a.is_ready()), "the outage is noticed");
    let r = publisher
        .call(json!({"op":"publish","topic":"failover","data":"lost"}))
        .await;
    assert_eq!(r["code"], "unavailable", "{r}");

    // Sentinel promotes the replica; the nodes ask the sentinels again and follow.
    let delivered = probe_until_delivered(
        &mut publisher,
        &mut sub,
        "failover",
        Duration::from_secs(40),
    )
    .await;
    let m = delivered.unwrap_or_else(|| {
        panic!(
            "delivery resumed after the failover\n{}\n{}",
            a.logs(),
            b.logs()
        )
    });
    assert!(m["data"].as_i64().unwrap() >= 1000, "{m}");
    println!(
        "delivery resumed {:?} after the master died",
        killed.elapsed()
    );
    assert_eq!(
        g.sentinels[0].master_port(),
        Some(g.replica.port),
        "the replica was promoted"
    );
    // The subscription lives on the new master now.
    assert!(wait_until(WAIT, || g.replica.channels("wsgate:*")
        == ["wsgate:failover"]));
    assert!(
        sub.alive().await && publisher.alive().await,
        "clients stayed"
    );
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    // In order again after the gap.
    for k in 0..20 {
        let r = publisher
            .call(json!({"op":"publish","topic":"failover","data":format!("after{k}")}))
            .await;
        assert_eq!(r["op"], "published", "{r}");
    }
    let mut k = 0;
    while k < 20 {
        let got = sub.next_message(WAIT).await.expect("after");
        // Late copies of the probes above may still be on their way: skip numbers.
        if got["data"].is_number() {
            continue;
        }
        assert_eq!(got["data"], format!("after{k}"));
        k += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_failover_moves_the_nodes_to_the_new_master() {
    let s = setup();
    let mut sub = Client::connect(s.b.addr).await;
    sub.subscribe(&["manual"]).await;
    let mut publisher = Client::connect(s.a.addr).await;
    assert_eq!(s.g.master.channels("wsgate:*"), ["wsgate:manual"]);
    // The old master stays up and becomes a replica: Redis itself would keep the nodes'
    // connections; the sentinels close them when they reconfigure it.
    let mut sentinel = s.g.sentinels[0].conn().expect("sentinel");
    let _: redis::Value = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(SENTINEL_MASTER)
        .query(&mut sentinel)
        .unwrap();
    assert!(
        wait_until(WAIT, || s.g.sentinels[0].master_port()
            == Some(s.g.replica.port)),
        "the sentinels promoted the replica"
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            s.g.replica.channels("wsgate:*") == ["wsgate:manual"]
                && s.g.master.channels("wsgate:*").is_empty()
        }),
        "the subscription moved to the new master\n{}\n{}",
        s.a.logs(),
        s.b.logs()
    );
    let m = probe_until_delivered(&mut publisher, &mut sub, "manual", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("delivery through the new master\n{}", s.a.logs()));
    assert!(m["data"].as_i64().unwrap() >= 1000, "{m}");
    assert!(
        sub.alive().await && publisher.alive().await,
        "clients stayed"
    );
    assert!(wait_until(WAIT, || s.a.is_ready() && s.b.is_ready()));
    // The publishing node publishes on the new master too (the old one, now a replica,
    // has no gateway connection left that could swallow publications).
    let r = publisher
        .call(json!({"op":"publish","topic":"manual","data":"last"}))
        .await;
    assert_eq!(r["op"], "published", "{r}");
    let mut last = None;
    while let Some(m) = sub.next_message(WAIT).await {
        if m["data"] == "last" {
            last = Some(m);
            break;
        }
    }
    assert!(last.is_some(), "the last publication arrived");
}
