//! Streams across real `wsgate` nodes on one real Redis (issue 16): positions agree on
//! every node, a client resumes on another node with exactly what it missed, what
//! cannot be recovered says so, and backends publish into a stream with the documented
//! Redis command from a client nobody here wrote (redis-py).

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate_testkit::http::blocking;
use wsgate_testkit::process::Node;
use wsgate_testkit::redis::Redis;
use wsgate_testkit::wait_until;
use wsgate_testkit::ws::Client;

const WAIT: Duration = Duration::from_secs(10);

/// `chat:*` streams keeping `size` publications.
fn config(size: usize) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!(
            "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = {size}\nhistory_ttl = \"10m\"\n"
        ),
    )
    .unwrap();
    file
}

fn node(redis: &Redis, config: &tempfile::NamedTempFile) -> Node {
    Node::start(
        Some(&redis.url()),
        &["--config", config.path().to_str().unwrap()],
    )
}

/// The next message, which must be a stream message of `topic` at `seq`.
async fn expect_seq(c: &mut Client, topic: &str, seq: u64) -> Value {
    let m = c.next_message(WAIT).await.expect("a message");
    assert_eq!(
        (m["topic"].as_str(), m["seq"].as_u64()),
        (Some(topic), Some(seq)),
        "{m}"
    );
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = Redis::start();
    let cfg = config(20);
    let (a, b) = (node(&redis, &cfg), node(&redis, &cfg));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));

    let mut on_a = a.connect().await;
    let r = on_a
        .call(json!({"op":"subscribe","topics":["chat:x","news"]}))
        .await;
    let start = &r["streams"]["chat:x"];
    assert_eq!(start["seq"], 0, "{r}");
    let epoch = start["epoch"].as_str().unwrap().to_owned();
    let mut publisher = b.connect().await;
    for n in 1..=5u64 {
        let p = publisher
            .call(json!({"op":"publish","topic":"chat:x","data":{"n":n}}))
            .await;
        assert_eq!(
            (p["seq"].as_u64(), p["epoch"].as_str()),
            (Some(n), Some(&*epoch)),
            "{p}"
        );
    }
    for n in 1..=5 {
        expect_seq(&mut on_a, "chat:x", n).await;
    }
    // Both nodes agree on where the stream is.
    for n in [&a, &b] {
        let (status, body) = blocking(
            n.addr,
            "POST",
            "/api/history",
            r#"{"topic":"chat:x","limit":0}"#,
        );
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["seq"].as_u64(), v["epoch"].as_str()),
            (Some(5), Some(&*epoch))
        );
    }
    drop(on_a);
    for n in 6..=12u64 {
        assert_eq!(b.http_publish("chat:x", json!({ "n": n })).0, 200);
    }
    let mut on_b = b.connect().await;
    let r = on_b
        .call(json!({"op":"subscribe","topics":["chat:x"],"since":{"chat:x":{"seq":5,"epoch":epoch}}}))
        .await;
    assert_eq!(
        r["streams"]["chat:x"],
        json!({"seq":12,"epoch":epoch,"recovered":true}),
        "{r}"
    );
    for n in 6..=12 {
        let m = expect_seq(&mut on_b, "chat:x", n).await;
        assert_eq!(m["data"]["n"], n);
    }
    assert_eq!(a.http_publish("chat:x", json!({"n": 13})).0, 200);
    expect_seq(&mut on_b, "chat:x", 13).await;

    // Not recoverable: another epoch, trimmed (history keeps 20 of 33), beyond.
    for n in 14..=33u64 {
        assert_eq!(a.http_publish("chat:x", json!({ "n": n })).0, 200);
    }
    for since in [
        json!({"seq":5,"epoch":"other"}),
        json!({"seq":5,"epoch":epoch}),
        json!({"seq":40,"epoch":epoch}),
    ] {
        let mut c = a.connect().await;
        let r = c
            .call(json!({"op":"subscribe","topics":["chat:x"],"since":{"chat:x":since}}))
            .await;
        assert_eq!(
            r["streams"]["chat:x"],
            json!({"seq":33,"epoch":epoch,"recovered":false}),
            "{since}: {r}"
        );
    }
    let mut c = a.connect().await;
    let r = c
        .call(json!({"op":"subscribe","topics":["chat:x"],"since":{"chat:x":{"seq":13,"epoch":epoch}}}))
        .await;
    assert_eq!(
        r["streams"]["chat:x"]["recovered"], true,
        "14..33 are kept: {r}"
    );
    for n in 14..=33 {
        expect_seq(&mut c, "chat:x", n).await;
    }
}

/// Runs a Python snippet with redis-py against `redis`; its stdout.
fn python(redis: &Redis, code: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", code, &redis.port.to_string()])
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed (is the `redis` package installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishes_into_a_stream_with_redis_py() {
    let redis = Redis::start();
    let cfg = config(100);
    let (a, b) = (node(&redis, &cfg), node(&redis, &cfg));
    assert!(wait_until(WAIT, || a.is_ready() && b.is_ready()));
    let mut c = b.connect().await;
    let r = c.call(json!({"op":"subscribe","topics":["chat:py"]})).await;
    let epoch = r["streams"]["chat:py"]["epoch"]
        .as_str()
        .unwrap()
        .to_owned();

    // The documented command, from redis-py: JSON and plain text payloads.
    let out = python(
        &redis,
        r#"
import sys, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]))
for payload in ['{"text":"hi","n":1}', 'plain text']:
    seq, epoch = r.fcall("wsgate_publish", 1, "wsgate:chat:py", payload)
    print(seq, epoch.decode())
"#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        vec![format!("1 {epoch}"), format!("2 {epoch}")],
        "{out}"
    );
    let m = expect_seq(&mut c, "chat:py", 1).await;
    assert_eq!(
        m["data"],
        json!({"text":"hi","n":1}),
        "JSON delivered as is"
    );
    let m = expect_seq(&mut c, "chat:py", 2).await;
    assert_eq!(m["data"], "plain text", "text delivered as a JSON string");

    // A plain PUBLISH to the stream's channel is not a publication of the stream.
    python(
        &redis,
        r#"
import sys, redis
redis.Redis(host="127.0.0.1", port=int(sys.argv[1])).publish("wsgate:chat:py", '{"lost":true}')
"#,
    );
    let p = c
        .call(json!({"op":"publish","topic":"chat:py","data":"after"}))
        .await;
    assert_eq!(p["seq"], 3, "{p}");
    let m = expect_seq(&mut c, "chat:py", 3).await;
    assert_eq!(m["data"], "after", "the plain PUBLISH was not delivered");
    let counted = wait_until(WAIT, || {
        b.get("/metrics")
            .1
            .lines()
            .any(|l| l == "wsgate_stream_plain_publishes_total 1")
    });
    assert!(counted, "the plain PUBLISH is counted");
}
