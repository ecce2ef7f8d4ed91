//! Presence, join/leave and the server API across nodes (issue 17): real `wsgate`
//! processes on a real Redis (single and cluster), real WebSocket clients. A node
//! killed with SIGKILL leaves no ghost: its connections leave presence, and `leave`
//! reaches the others, within the presence bound; a Redis restart loses no entry of a
//! connection that is still there.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wsgate_testkit::gateway::jwt;
use wsgate_testkit::http::http;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::{Redis, RedisCluster};
use wsgate_testkit::ws::Client;

const KEY: &str = "cluster-api-key";
/// The presence bound the nodes run with (`--presence-timeout`).
const BOUND: Duration = Duration::from_secs(3);
/// How long past the bound a test waits before calling it a failure (a loaded CI
/// machine; the measured time is printed).
const SLACK: Duration = Duration::from_secs(7);
/// A node claims dead nodes once its own heartbeats have run for the grace: the
/// lease, or 5 s if longer (docs/redis.md, "Heartbeats, the lease and the bound").
const GRACE: Duration = Duration::from_secs(5);

fn config_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "[[namespaces]]\nname = \"rooms\"\ntopics = [\"room.*\"]\npresence = true\njoin_leave = true\n\
         join_leave_rate = 1000\n",
    )
    .unwrap();
    file
}

/// `n` nodes on `redis` (single URL, or cluster seeds), named n0, n1, …, with the
/// presence bound [`BOUND`].
fn nodes(redis: &[&str], config: &tempfile::NamedTempFile, n: usize) -> Vec<Node> {
    nodes_bound(redis, config, n, "3s")
}

/// [`nodes`] with the presence bound `bound` (`--presence-timeout`).
fn nodes_bound(
    redis: &[&str],
    config: &tempfile::NamedTempFile,
    n: usize,
    bound: &str,
) -> Vec<Node> {
    let path = config.path().to_str().unwrap().to_owned();
    (0..n)
        .map(|i| {
            let id = format!("n{i}");
            let mut args = vec![
                "--config",
                &path,
                "--node-id",
                &id,
                "--api-key",
                KEY,
                "--jwt-secret",
                jwt::SECRET,
                "--presence-timeout",
                bound,
                "--drain-timeout",
                "0s",
            ];
            args.extend_from_slice(redis);
            let node = Node::start(None, &args);
            // Ready: its Redis (every shard) connected, so the first subscribe works.
            assert!(
                wsgate_testkit::wait_until(Duration::from_secs(30), || node.is_ready()),
                "{id} not ready: {}",
                node.logs()
            );
            node
        })
        .collect()
}

fn token(user: &str) -> String {
    jwt::hs256(&json!({"sub":user,"exp":jwt::now()+600,"subscribe":["**"],"publish":["**"]}))
}

async fn connect(node: &Node, user: &str) -> Client {
    Client::session(node.addr, &format!("/ws?token={}", token(user)), &[]).await
}

async fn api(node: &Node, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = http(
        node.addr,
        method,
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
        ],
        body.as_bytes(),
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The sessions a node's `POST /api/presence` lists, sorted.
async fn listed(node: &Node, topic: &str) -> Vec<(String, String, String)> {
    let (status, body) = api(node, "POST", "/api/presence", json!({"topic":topic})).await;
    assert_eq!(status, 200, "{body}");
    let mut l: Vec<(String, String, String)> = body["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["session"].as_str().unwrap().to_owned(),
                c["user"].as_str().unwrap_or("").to_owned(),
                c["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    l.sort();
    l
}

/// [`live_nodes`], or nothing while the node cannot answer yet (its Redis
/// connections still coming up).
async fn live_nodes_if_up(node: &Node) -> Vec<String> {
    let (status, body) = api(node, "GET", "/api/info", Value::Null).await;
    if status != 200 {
        return Vec::new();
    }
    body["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n["node"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn live_nodes(node: &Node) -> Vec<String> {
    let (status, body) = api(node, "GET", "/api/info", Value::Null).await;
    assert_eq!(status, 200, "{body}");
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect()
}

/// The next frame whose `op` is `op` within `within`, skipping the rest.
async fn next_op(ws: &mut Client, op: &str, within: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next_json(left).await {
            Some(v) if v["op"] == op => return Some(v),
            Some(_) => continue,
            None => return None,
        }
    }
}

fn session(ws: &Client) -> String {
    ws.welcome["session"].as_str().unwrap().to_owned()
}

/// Polls `check` every 50 ms until it holds or `within` passes; how long it took.
async fn within<F, Fut>(within: Duration, mut check: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Three nodes, a client of a different user on each: presence everywhere, joins
/// and leaves across nodes, then a SIGKILL of one node.
async fn presence_and_a_killed_node(redis: &[&str]) {
    let config = config_file();
    let mut ns = nodes(redis, &config, 3);
    let up = tokio::time::Instant::now();
    let mut c: Vec<Client> = Vec::new();
    for (i, user) in ["ann", "ben", "cid"].iter().enumerate() {
        c.push(connect(&ns[i], user).await);
    }
    for ws in c.iter_mut() {
        ws.subscribe(&["room.1"]).await;
    }
    // Listed on every node the moment `subscribed` came back.
    let mut want: Vec<(String, String, String)> = ["ann", "ben", "cid"]
        .iter()
        .enumerate()
        .map(|(i, u)| (session(&c[i]), u.to_string(), format!("n{i}")))
        .collect();
    want.sort();
    for n in &ns {
        assert_eq!(listed(n, "room.1").await, want);
    }
    // ann (first in) hears ben and cid join, from other nodes; nobody hears itself.
    let mut joined = Vec::new();
    for _ in 0..2 {
        let j = next_op(&mut c[0], "join", Duration::from_secs(5))
            .await
            .expect("a join from another node");
        joined.push(j["user"].as_str().unwrap().to_owned());
    }
    joined.sort();
    assert_eq!(joined, ["ben", "cid"]);
    let r = c[1]
        .call(json!({"op":"presence_stats","topic":"room.1"}))
        .await;
    assert_eq!(
        (r["clients"].as_u64(), r["users"].as_u64()),
        (Some(3), Some(3)),
        "{r}"
    );

    // ben leaves by unsubscribing: ann and cid hear it.
    c[1].unsubscribe(&["room.1"]).await;
    for i in [0, 2] {
        let l = next_op(&mut c[i], "leave", Duration::from_secs(5))
            .await
            .expect("ben's leave");
        assert_eq!(l["user"], "ben");
    }

    // n2 dies without cleaning up: cid must leave presence, and ann must hear it,
    // within the bound (the survivors up for their grace: the bound is that of a
    // running cluster).
    tokio::time::sleep_until(up + GRACE + Duration::from_millis(500)).await;
    let killed = Instant::now();
    let cid = session(&c[2]);
    ns[2].signal("KILL");
    ns[2].wait_exit(Duration::from_secs(5));
    let heard = next_op(&mut c[0], "leave", BOUND + SLACK)
        .await
        .expect("cid's leave from a surviving node");
    let heard_after = killed.elapsed();
    // The bound, with a second for a loaded machine's timers.
    assert!(
        heard_after <= BOUND + Duration::from_secs(1),
        "cid's leave came {heard_after:?} after the kill; the bound is {BOUND:?}"
    );
    assert_eq!(
        (heard["session"].as_str(), heard["user"].as_str()),
        (Some(cid.as_str()), Some("cid"))
    );
    let gone = within(BOUND + SLACK, || async {
        let n0 = &ns[0];
        listed(n0, "room.1").await.iter().all(|e| e.0 != cid)
    })
    .await;
    assert!(gone.is_some(), "cid is a ghost");
    let info = within(BOUND + SLACK, || async {
        live_nodes(&ns[1]).await == ["n0", "n1"]
    })
    .await;
    assert!(
        info.is_some(),
        "n2 still in /api/info: {:?}",
        live_nodes(&ns[1]).await
    );
    println!(
        "SIGKILL → leave delivered after {heard_after:?}, bound {BOUND:?}; n2 out of /api/info"
    );
    assert_eq!(
        listed(&ns[1], "room.1").await,
        vec![(session(&c[0]), "ann".into(), "n0".into())]
    );
    let dead: f64 = {
        let s0 = ns[0].scrape().await;
        let s1 = ns[1].scrape().await;
        [s0, s1]
            .iter()
            .map(|s| {
                let m = wsgate_testkit::http::parse_metrics(s);
                wsgate_testkit::http::val(&m, "wsgate_presence_dead_nodes_total")
            })
            .sum()
    };
    assert_eq!(dead, 1.0, "exactly one survivor cleaned the dead node up");
}

#[tokio::test]
async fn presence_across_nodes_and_no_ghost_after_sigkill() {
    let redis = Redis::start();
    let url = redis.url();
    presence_and_a_killed_node(&["--redis-url", &url]).await;
}

#[tokio::test]
async fn presence_across_cluster_shards_and_no_ghost_after_sigkill() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    presence_and_a_killed_node(&["--redis-mode", "cluster", "--redis-url", &seeds]).await;
}

#[tokio::test]
async fn a_redis_restart_loses_no_entry_of_a_live_connection() {
    let mut redis = Redis::start();
    let url = redis.url();
    let config = config_file();
    let ns = nodes(&["--redis-url", &url], &config, 2);
    let mut a = connect(&ns[0], "ann").await;
    let mut b = connect(&ns[1], "ben").await;
    a.subscribe(&["room.r"]).await;
    b.subscribe(&["room.r"]).await;
    let before = listed(&ns[0], "room.r").await;
    assert_eq!(before.len(), 2);
    redis.restart(); // no persistence: everything in it is gone
    let back = within(BOUND + SLACK + Duration::from_secs(10), || async {
        let n0 = &ns[0];
        let (status, body) = api(n0, "POST", "/api/presence", json!({"topic":"room.r"})).await;
        status == 200 && body["clients"].as_array().is_some_and(|c| c.len() == 2)
    })
    .await;
    assert!(
        back.is_some(),
        "presence not rebuilt after the Redis restart"
    );
    assert_eq!(listed(&ns[1], "room.r").await, before);
    assert_eq!(live_nodes(&ns[0]).await, ["n0", "n1"]);
    println!("presence rebuilt {back:?} after Redis came back");
    // The connections still work across nodes.
    assert!(a.alive().await && b.alive().await);
}

#[tokio::test]
async fn the_server_api_acts_on_every_node() {
    let redis = Redis::start();
    let url = redis.url();
    let config = config_file();
    let ns = nodes(&["--redis-url", &url], &config, 3);
    let mut ann0 = connect(&ns[0], "ann").await;
    let mut ann2 = connect(&ns[2], "ann").await;
    let mut ben1 = connect(&ns[1], "ben").await;

    // The API key on every endpoint.
    for (method, path) in [
        ("POST", "/api/disconnect"),
        ("POST", "/api/subscribe"),
        ("POST", "/api/unsubscribe"),
        ("POST", "/api/presence"),
        ("GET", "/api/info"),
    ] {
        let (status, _) = http(ns[1].addr, method, path, &[], br#"{"user":"ann"}"#).await;
        assert_eq!(status, 401, "{method} {path}");
    }

    // Subscribe ann (on n0 and n2) through n1; a publication through n1 reaches both.
    let (status, body) = api(
        &ns[1],
        "POST",
        "/api/subscribe",
        json!({"user":"ann","topics":["news"]}),
    )
    .await;
    assert_eq!((status, &body["ok"]), (200, &json!(true)), "{body}");
    assert_eq!(body["nodes"], 3, "the control channel reached every node");
    for ws in [&mut ann0, &mut ann2] {
        let s = next_op(ws, "subscribed", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(s, json!({"op":"subscribed","id":null,"topics":["news"]}));
    }
    api(
        &ns[1],
        "POST",
        "/api/publish",
        json!({"topic":"news","data":1}),
    )
    .await;
    for ws in [&mut ann0, &mut ann2] {
        assert_eq!(
            ws.next_message(Duration::from_secs(5)).await.unwrap()["data"],
            1
        );
    }
    assert!(ben1
        .next_message(Duration::from_millis(300))
        .await
        .is_none());

    // Unsubscribe one session through n0.
    let (status, _) = api(
        &ns[0],
        "POST",
        "/api/unsubscribe",
        json!({"session":session(&ann2),"topics":["news"]}),
    )
    .await;
    assert_eq!(status, 200);
    next_op(&mut ann2, "unsubscribed", Duration::from_secs(5))
        .await
        .unwrap();
    api(
        &ns[1],
        "POST",
        "/api/publish",
        json!({"topic":"news","data":2}),
    )
    .await;
    assert_eq!(
        ann0.next_message(Duration::from_secs(5)).await.unwrap()["data"],
        2
    );
    assert!(ann2
        .next_message(Duration::from_millis(300))
        .await
        .is_none());

    // Info lists the three nodes, with their connections.
    let (status, info) = api(&ns[2], "GET", "/api/info", Value::Null).await;
    assert_eq!(status, 200);
    let list = info["nodes"].as_array().unwrap();
    let ids: Vec<&str> = list.iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(ids, ["n0", "n1", "n2"]);
    assert!(list.iter().all(|n| n["connections"] == 1), "{info}");

    // Disconnect ann everywhere through n1 (4010), then ben with our own code.
    let t = Instant::now();
    let (status, _) = api(&ns[1], "POST", "/api/disconnect", json!({"user":"ann"})).await;
    assert_eq!(status, 200);
    assert_eq!(ann0.expect_close().await, Some(4010));
    assert_eq!(ann2.expect_close().await, Some(4010));
    let (status, _) = api(
        &ns[0],
        "POST",
        "/api/disconnect",
        json!({"session":session(&ben1),"code":4444,"reason":"moving you"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(ben1.expect_close().await, Some(4444));
    println!(
        "three disconnects across nodes closed {:?} after the first call",
        t.elapsed()
    );
    // Unknown: 200, nothing done.
    let (status, body) = api(&ns[2], "POST", "/api/disconnect", json!({"user":"nobody"})).await;
    assert_eq!((status, &body["ok"]), (200, &json!(true)));
}

/// Two clients nobody here wrote (Python `websockets`) on two nodes: each is listed
/// by the other's node, the first hears the second join and leave.
#[tokio::test]
async fn python_websockets_clients_see_each_other_across_nodes() {
    let redis = Redis::start();
    let url = redis.url();
    let config = config_file();
    let ns = nodes(&["--redis-url", &url], &config, 2);
    let urls: Vec<String> = ["ann", "ben"]
        .iter()
        .zip(&ns)
        .map(|(u, n)| format!("ws://{}/ws?token={}", n.addr, token(u)))
        .collect();
    let code = r#"
import asyncio, json, sys, websockets

async def next_op(ws, op):
    while True:
        v = json.loads(await ws.recv())
        if v["op"] == op:
            return v

async def main():
    async with websockets.connect(sys.argv[1]) as a, websockets.connect(sys.argv[2]) as b:
        wa, wb = json.loads(await a.recv()), json.loads(await b.recv())
        for ws in (a, b):
            await ws.send(json.dumps({"op": "subscribe", "id": 1, "topics": ["room.py"]}))
            assert (await asyncio.wait_for(next_op(ws, "subscribed"), 5))["id"] == 1
        join = await asyncio.wait_for(next_op(a, "join"), 5)
        assert (join["session"], join["user"]) == (wb["session"], "ben"), join
        await b.send(json.dumps({"op": "presence", "id": 2, "topic": "room.py"}))
        p = await asyncio.wait_for(next_op(b, "presence"), 5)
        listed = sorted((c["user"], c["node"]) for c in p["clients"])
        assert listed == [("ann", "n0"), ("ben", "n1")], listed
        await b.close()
        leave = await asyncio.wait_for(next_op(a, "leave"), 5)
        assert leave["session"] == wb["session"], leave
        print("ok")

asyncio.run(main())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", code, &urls[0], &urls[1]])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "python client failed (is `websockets` installed?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A drained node leaves the node list at once, not when its lease ends (30 s here),
/// and the others do not count it as dead: its connections left presence while it
/// drained.
async fn a_drained_node_leaves_at_once(redis: &[&str]) {
    let config = config_file();
    let mut ns = nodes_bound(redis, &config, 2, "60s");
    let both = within(Duration::from_secs(20), || async {
        live_nodes_if_up(&ns[0]).await == ["n0", "n1"]
    })
    .await;
    assert!(both.is_some(), "{:?}", live_nodes_if_up(&ns[0]).await);
    let mut bob = connect(&ns[1], "bob").await;
    bob.subscribe(&["room.d"]).await;
    assert_eq!(listed(&ns[0], "room.d").await.len(), 1);

    ns[1].signal("TERM");
    let status = ns[1].wait_exit(Duration::from_secs(20));
    assert!(status.success(), "n1 exited with {status}");
    // Well inside the 30 s lease: only a leave explains it.
    let gone = within(Duration::from_secs(10), || async {
        live_nodes(&ns[0]).await == ["n0"]
    })
    .await;
    assert!(
        gone.is_some(),
        "n1 still listed: {:?}",
        live_nodes(&ns[0]).await
    );
    println!("drained n1 out of /api/info after {gone:?}");
    assert!(listed(&ns[0], "room.d").await.is_empty());
    // n0's heartbeats (every 10 s with this bound) find nobody to clean.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let m = wsgate_testkit::http::parse_metrics(&ns[0].scrape().await);
    assert_eq!(
        wsgate_testkit::http::val(&m, "wsgate_presence_dead_nodes_total"),
        0.0,
        "the drained node was taken for a dead one"
    );
    assert_eq!(wsgate_testkit::http::val(&m, "wsgate_cluster_nodes"), 1.0);
}

#[tokio::test]
async fn a_drained_node_leaves_the_node_list_at_once() {
    let redis = Redis::start();
    let url = redis.url();
    a_drained_node_leaves_at_once(&["--redis-url", &url]).await;
}

#[tokio::test]
async fn a_drained_node_leaves_the_cluster_node_list_at_once() {
    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    a_drained_node_leaves_at_once(&["--redis-mode", "cluster", "--redis-url", &seeds]).await;
}
