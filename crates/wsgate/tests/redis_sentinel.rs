//! Redis under Sentinel, seen from real `wsgate` nodes: a master, one replica and three
//! sentinels on free ports; the master is killed, the sentinels promote the replica, the
//! nodes find the new master by asking the sentinels again, clients stay connected and
//! delivery resumes.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::ws::Client;
use wsgate_testkit::{free_port, wait_until};

const MASTER: &str = "wsgate-master";
const WAIT: Duration = Duration::from_secs(15);

/// A `redis-server --sentinel` with its own writable config file (sentinels rewrite it).
struct Sentinel {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER} 1000\n\
                 sentinel failover-timeout {MASTER} 3000\n\
                 sentinel parallel-syncs {MASTER} 1\n",
                dir = dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .args(["--sentinel", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let s = Sentinel {
            port,
            child,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || s.master_port().is_some()),
            "sentinel did not start on {port}"
        );
        s
    }

    fn conn(&self) -> Option<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()
    }

    /// The master's port as this sentinel sees it now.
    fn master_port(&self) -> Option<u16> {
        let addr: Option<(String, String)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(MASTER)
            .query(&mut self.conn()?)
            .ok()?;
        addr?.1.parse().ok()
    }

    /// `SENTINEL MASTER <name>` as a map.
    fn master_info(&self) -> HashMap<String, String> {
        self.conn()
            .and_then(|mut c| {
                redis::cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(MASTER)
                    .query(&mut c)
                    .ok()
            })
            .unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replication_online(master: &Redis) -> bool {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut master.conn())
        .unwrap_or_default();
    info.contains("state=online")
}

/// A master, its replica (in sync), three sentinels that know both and each other, and
/// two gateway nodes that found the master through the sentinels.
struct Setup {
    master: Redis,
    replica: Redis,
    sentinels: Vec<Sentinel>,
    a: Node,
    b: Node,
    _dirs: [tempfile::TempDir; 2],
}

fn setup() -> Setup {
    let master_dir = tempfile::tempdir().unwrap();
    let replica_dir = tempfile::tempdir().unwrap();
    let master = Redis::start_with(&["--dir", master_dir.path().to_str().unwrap()]);
    let master_port = master.port.to_string();
    let replica = Redis::start_with(&[
        "--dir",
        replica_dir.path().to_str().unwrap(),
        "--replicaof",
        "127.0.0.1",
        &master_port,
    ]);
    assert!(
        wait_until(WAIT, || replication_online(&master)),
        "replica in sync"
    );
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(master.port)).collect();
    // Before the failure: every sentinel knows the replica and the other sentinels.
    assert!(
        wait_until(Duration::from_secs(20), || sentinels.iter().all(|s| {
            let m = s.master_info();
            m.get("num-slaves").map(String::as_str) == Some("1")
                && m.get("num-other-sentinels").map(String::as_str) == Some("2")
        })),
        "sentinels discovered each other and the replica"
    );

    let list = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect::<Vec<_>>()
        .join(",");
    let args = [
        "--redis-sentinel",
        list.as_str(),
        "--redis-sentinel-master",
        MASTER,
        "--rate-limit",
        "1000000",
        "--rate-burst",
        "1000000",
    ];
    let a = Node::start_logged(None, &args);
    let b = Node::start_logged(None, &args);
    assert!(
        wait_until(WAIT, || a.is_ready() && b.is_ready()),
        "{}{}",
        a.logs(),
        b.logs()
    );
    Setup {
        master,
        replica,
        sentinels,
        a,
        b,
        _dirs: [master_dir, replica_dir],
    }
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
    let Setup {
        mut master,
        replica,
        sentinels,
        a,
        b,
        _dirs,
    } = setup();
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
    assert_eq!(master.channels("wsgate:*"), ["wsgate:failover"]);

    master.kill();
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
        sentinels[0].master_port(),
        Some(replica.port),
        "the replica was promoted"
    );
    // The subscription lives on the new master now.
    assert!(wait_until(WAIT, || replica.channels("wsgate:*") == ["wsgate:failover"]));
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
    assert_eq!(s.master.channels("wsgate:*"), ["wsgate:manual"]);
    // The old master stays up and becomes a replica: Redis itself would keep the nodes'
    // connections; the sentinels close them when they reconfigure it.
    let mut sentinel = s.sentinels[0].conn().expect("sentinel");
    let _: redis::Value = redis::cmd("SENTINEL")
        .arg("FAILOVER")
        .arg(MASTER)
        .query(&mut sentinel)
        .unwrap();
    assert!(
        wait_until(WAIT, || s.sentinels[0].master_port()
            == Some(s.replica.port)),
        "the sentinels promoted the replica"
    );
    assert!(
        wait_until(Duration::from_secs(30), || {
            s.replica.channels("wsgate:*") == ["wsgate:manual"]
                && s.master.channels("wsgate:*").is_empty()
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
