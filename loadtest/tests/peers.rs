//! End-to-end: tiny bounded runs of the real binary against real servers on loopback
//! (Redis + the Node baseline peer, and nats-server), each spawned on free ports.
//!
//! Needs `redis-server`, `nats-server`, `node` and `npm` on PATH (`loadtest/bench.sh
//! install` installs them); the peer's node_modules are installed here with `npm ci`
//! when missing.

use std::io::{BufRead as _, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child when the test ends, however it ends.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

use wsgate_testkit::free_port;

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Guard {
    Guard(
        cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {what} ({e}); run `loadtest/bench.sh install`")
        }),
    )
}

fn redis() -> (Guard, u16) {
    let port = free_port();
    let g = spawn(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null()),
        "redis-server",
    );
    wait_port(port);
    (g, port)
}

fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

fn node_peer(redis_port: u16) -> (Guard, u16) {
    let dir = peers_dir();
    if !dir.join("node_modules").is_dir() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed for the Node peer")
            .success();
        assert!(ok, "npm ci failed in {}", dir.display());
    }
    let port = free_port();
    let mut g = spawn(
        Command::new("node")
            .arg("server.js")
            .current_dir(&dir)
            .env("PEER_LISTEN", format!("127.0.0.1:{port}"))
            .env("REDIS_URL", format!("redis://127.0.0.1:{redis_port}"))
            .stdout(Stdio::piped()),
        "node",
    );
    let mut line = String::new();
    BufReader::new(g.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), format!("listening {port}"));
    (g, port)
}

fn nats(dir: &Path) -> (Guard, u16) {
    let (client, ws, http) = (free_port(), free_port(), free_port());
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{http}\"\n\
             websocket {{\n  listen: \"127.0.0.1:{ws}\"\n  no_tls: true\n}}\n"
        ),
    )
    .unwrap();
    let g = spawn(
        Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .stderr(Stdio::null()),
        "nats-server",
    );
    wait_port(ws);
    (g, ws)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wsgate-loadtest-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs the generator and returns its JSON report.
fn loadtest(args: &[&str], out: &Path, server_pid: u32) -> serde_json::Value {
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate-loadtest"))
        .args(args)
        .args([
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--tail",
            "1s",
            "--no-progress",
        ])
        .args(["--source-addrs", "127.0.0.2-127.0.0.3"])
        .arg("--server-pid")
        .arg(server_pid.to_string())
        .arg("--out")
        .arg(out)
        .arg("--chart")
        .arg(out.with_extension("png"))
        .status()
        .unwrap();
    assert!(status.success(), "loadtest {args:?} failed");
    assert!(out.with_extension("png").metadata().unwrap().len() > 1000);
    serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap()
}

fn assert_exact(r: &serde_json::Value, subscribers: u64, published: u64) {
    let f = &r["fanout"];
    assert_eq!(f["subscribers"], subscribers, "{f:#}");
    assert_eq!(f["published"], published, "{f:#}");
    assert_eq!(f["publish_errors"], 0, "{f:#}");
    assert_eq!(f["expected"], published * subscribers / 2, "{f:#}"); // 2 topics
    assert_eq!(f["delivered"], f["expected"], "{f:#}");
    assert_eq!(f["lost"], 0);
    assert_eq!(f["duplicated"], 0);
    assert_eq!(f["reordered"], 0);
    assert!(f["latency"]["count"].as_u64().unwrap() > 0);
    assert!(f["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(
        r["timeline"].as_array().unwrap().len(),
        4,
        "3 s + 1 s drain"
    );
    assert!(r["generator"]["cpu_s_per_million_events"].as_f64().unwrap() > 0.0);
    assert!(r["servers"][0]["rss_max_kib"].as_u64().unwrap() > 0);
}

#[test]
fn fanout_against_the_node_peer_is_exact() {
    let dir = tmpdir("peer");
    let (_redis, redis_port) = redis();
    let (peer, port) = node_peer(redis_port);
    let url = format!("ws://127.0.0.1:{port}/ws");
    // 3 s at 40 publications/s over 2 publishers = 120, each to 5 of 10 subscribers.
    let common = [
        "--target",
        "peer",
        "--url",
        &url,
        "--subscribers",
        "10",
        "--topics",
        "2",
    ];
    let args = [
        &common[..],
        &["--publishers", "2", "--rate", "40", "--drain", "1s"],
    ]
    .concat();
    let r = loadtest(
        &[&["fanout"], &args[..]].concat(),
        &dir.join("ws.json"),
        peer.0.id(),
    );
    assert_exact(&r, 10, 120);
    // The same through the HTTP API and straight through Redis.
    let via_http = [&args[..], &["--publish-via", "http"]].concat();
    let r = loadtest(
        &[&["fanout"], &via_http[..]].concat(),
        &dir.join("http.json"),
        peer.0.id(),
    );
    assert_exact(&r, 10, 120);
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let via_redis = [
        &args[..],
        &["--publish-via", "redis", "--redis-url", &redis_url],
    ]
    .concat();
    let r = loadtest(
        &[&["fanout"], &via_redis[..]].concat(),
        &dir.join("redis.json"),
        peer.0.id(),
    );
    assert_exact(&r, 10, 120);
}

#[test]
fn fanout_idle_and_churn_against_nats() {
    let dir = tmpdir("nats");
    let (server, port) = nats(&dir);
    let url = format!("ws://127.0.0.1:{port}/");
    let pid = server.0.id();
    let base = ["--target", "nats", "--url", &url];
    let fan = [
        &["fanout"],
        &base[..],
        &["--subscribers", "10", "--topics", "2", "--publishers", "2"],
    ]
    .concat();
    let r = loadtest(
        &[&fan[..], &["--rate", "40", "--drain", "1s"]].concat(),
        &dir.join("fanout.json"),
        pid,
    );
    assert_exact(&r, 10, 120);

    let idle = [
        &["idle"],
        &base[..],
        &["--connections", "50", "--settle", "0s"],
    ]
    .concat();
    let r = loadtest(&idle, &dir.join("idle.json"), pid);
    assert_eq!(r["connect"]["succeeded"], 50);
    assert_eq!(r["idle"]["held"], 50);
    assert!(r["idle"]["server_cpu_idle_cores"].as_f64().is_some());

    let churn = [
        &["churn"],
        &base[..],
        &["--rate", "50", "--concurrency", "8"],
    ]
    .concat();
    let r = loadtest(&churn, &dir.join("churn.json"), pid);
    assert_eq!(r["connect"]["failed"], 0);
    // 3 s at 50 cycles/s.
    assert_eq!(r["connect"]["attempted"], 150);
    assert_eq!(r["connect"]["succeeded"], 150);
}

#[test]
fn split_runs_merge_into_one_exact_report() {
    let dir = tmpdir("split");
    let (server, port) = nats(&dir);
    let url = format!("ws://127.0.0.1:{port}/");
    let pid = server.0.id().to_string();
    let start_at = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 2500)
        .to_string();
    let exe = env!("CARGO_BIN_EXE_wsgate-loadtest");
    let run = |k: &str| {
        Command::new(exe)
            .args([
                "fanout",
                "--target",
                "nats",
                "--url",
                &url,
                "--subscribers",
                "10",
                "--topics",
                "2",
            ])
            .args([
                "--publishers",
                "2",
                "--rate",
                "40",
                "--duration",
                "3s",
                "--drain",
                "1s",
            ])
            .args([
                "--no-progress",
                "--server-pid",
                &pid,
                "--start-at",
                &start_at,
                "--split",
                k,
            ])
            .arg("--out")
            .arg(dir.join(format!("part{}.json", &k[..1])))
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (run("0/2"), run("1/2"));
    assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
    let merged = dir.join("merged.json");
    let status = Command::new(exe)
        .arg("merge")
        .arg(dir.join("part0.json"))
        .arg(dir.join("part1.json"))
        .arg("--out")
        .arg(&merged)
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&merged).unwrap()).unwrap();
    assert_eq!(r["generator"]["processes"], 2);
    assert_exact(&r, 10, 120);
}
