//! End-to-end on streams: a real `wsgate` process whose configuration file makes
//! `chat:*` streams, tiny bounded runs of the real generator against it.
//!
//! - `resume-storm`: every client must get every missed seq exactly once, in order,
//!   recovered, while the live topic keeps flowing;
//! - `fanout` on a stream topic: every message carries a seq, contiguous per
//!   subscriber (no gap, no dup, no reset), and the payload accounting still works.
//!
//! The gateway is the `wsgate` binary of this build (`cargo test --workspace` builds
//! it), started through the testkit; without it the tests fail, saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wsgate_testkit::process::Node;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wsgate-loadtest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Starts the gateway (the testkit's launcher: the `wsgate` binary of this build) with
/// `chat:*` as streams.
fn gateway(dir: &Path) -> Node {
    let conf = dir.join("wsgate.toml");
    std::fs::write(
        &conf,
        "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 1000\nhistory_ttl = \"10m\"\n",
    )
    .unwrap();
    Node::start(None, &["--config", conf.to_str().unwrap()])
}

fn run(args: &[&str], out: &Path) -> (bool, serde_json::Value) {
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate-loadtest"))
        .args(args)
        .args(["--no-progress", "--source-addrs", "127.0.0.2-127.0.0.3"])
        .arg("--out")
        .arg(out)
        .status()
        .unwrap();
    let report = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
    (status.success(), report)
}

#[test]
fn resume_storm_gets_every_missed_seq_exactly_once() {
    let dir = tmpdir("storm");
    let gw = gateway(&dir);
    let url = format!("ws://{}/ws", gw.addr);
    let pid = gw.pid().to_string();
    // 24 clients over 2 stream topics miss 150 publications each (HTTP batches of 40),
    // then all come back at once; 4 live subscribers of a plain topic meanwhile.
    let (ok, r) = run(
        &[
            "resume-storm",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--topic-prefix",
            "chat:storm-",
            "--clients",
            "24",
            "--topics",
            "2",
            "--missed",
            "150",
            "--http-batch",
            "40",
            "--live-subscribers",
            "4",
            "--live-rate",
            "100",
            "--live-topic",
            "live-plain",
            "--duration",
            "10s",
            "--before",
            "1s",
            "--after",
            "300ms",
        ],
        &dir.join("storm.json"),
    );
    let s = &r["resume"];
    assert!(ok, "resume-storm failed: {s:#}\n{:#}", r["notes"]);
    assert_eq!(r["scenario"], "resume-storm");
    assert_eq!(s["ok"], true, "{s:#}");
    assert_eq!(s["clients"], 24);
    assert_eq!(s["reconnected"], 24, "{s:#}");
    assert_eq!(s["recovered"], 24, "{s:#}");
    assert_eq!(s["completed"], 24, "{s:#}");
    assert_eq!(s["expected"], 24 * 150, "{s:#}");
    assert_eq!(s["received"], 24 * 150, "{s:#}");
    assert_eq!(s["streams"]["messages"], 24 * 150);
    assert_eq!(s["streams"]["gaps"], 0);
    assert_eq!(s["streams"]["dups"], 0);
    assert_eq!(s["streams"]["resets"], 0);
    assert!(s["completion_s"].as_f64().unwrap() > 0.0);
    assert_eq!(s["completion"]["count"], 24);
    let live = &s["live"];
    assert_eq!(live["subscribers"], 4);
    assert!(live["published"].as_u64().unwrap() > 100, "{live:#}");
    assert_eq!(live["lost"], 0, "{live:#}");
    assert!(live["before"]["count"].as_u64().unwrap() > 0, "{live:#}");
    assert!(live["during"]["count"].as_u64().unwrap() > 0, "{live:#}");
}

#[test]
fn resume_storm_fails_loudly_on_plain_topics() {
    let dir = tmpdir("storm-plain");
    let gw = gateway(&dir);
    let url = format!("ws://{}/ws", gw.addr);
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate-loadtest"))
        .args(["resume-storm", "--url", &url, "--topic-prefix", "plain-"])
        .args(["--clients", "2", "--missed", "5", "--no-progress"])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!status.status.success());
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("stream"), "{err}");
}

#[test]
fn fanout_on_a_stream_counts_contiguous_seqs() {
    let dir = tmpdir("stream-fanout");
    let gw = gateway(&dir);
    let url = format!("ws://{}/ws", gw.addr);
    let pid = gw.pid().to_string();
    // 2 s at 50 publications/s over 2 publishers = 100, each to 3 of 6 subscribers.
    let (ok, r) = run(
        &[
            "fanout",
            "--url",
            &url,
            "--server-pid",
            &pid,
            "--topic-prefix",
            "chat:fan-",
            "--subscribers",
            "6",
            "--topics",
            "2",
            "--publishers",
            "2",
            "--rate",
            "50",
            "--duration",
            "2s",
            "--warmup",
            "0s",
            "--tail",
            "0s",
            "--drain",
            "1s",
        ],
        &dir.join("fanout.json"),
    );
    assert!(ok);
    let f = &r["fanout"];
    assert_eq!(f["published"], 100, "{f:#}");
    assert_eq!(f["expected"], 300, "{f:#}");
    assert_eq!(f["lost"], 0, "{f:#}");
    assert_eq!(f["duplicated"], 0, "{f:#}");
    assert_eq!(f["streams"]["messages"], 300, "{f:#}");
    assert_eq!(f["streams"]["gaps"], 0, "{f:#}");
    assert_eq!(f["streams"]["dups"], 0, "{f:#}");
    assert_eq!(f["streams"]["resets"], 0, "{f:#}");
}
