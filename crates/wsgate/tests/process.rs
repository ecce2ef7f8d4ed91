//! The `wsgate` binary as a process: signals, drain, exit codes, memory, and a
//! WebSocket client nobody here wrote (Python `websockets`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use wsgate_testkit::free_port;
use wsgate_testkit::http::blocking;
use wsgate_testkit::process::Node;
use wsgate_testkit::ws::client_frame;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_1001_spread_over_the_window_then_exits_0() {
    let mut gw = Node::start(None, &["--drain-timeout", "2s"]);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (ws, _) = tokio_tungstenite::connect_async(gw.ws_url()).await.unwrap();
        clients.push(ws);
    }
    let started = Instant::now();
    gw.signal("TERM");
    // Readiness flips at once; new upgrades are refused.
    let mut refused = false;
    for _ in 0..50 {
        if blocking(gw.admin, "GET", "/readyz", "").0 == 503 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "/readyz turns 503 during the drain");
    match tokio_tungstenite::connect_async(gw.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503 while draining, got {:?}", other.map(|_| ())),
    }
    // Every client is read concurrently, so each close is timed when it arrives.
    let waits: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                loop {
                    match tokio::time::timeout(Duration::from_secs(10), ws.next())
                        .await
                        .expect("closed in time")
                    {
                        Some(Ok(Message::Close(Some(f)))) => {
                            assert_eq!(u16::from(f.code), 1001);
                            return started.elapsed();
                        }
                        Some(Ok(_)) => continue,
                        other => panic!("expected a 1001 close frame, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut closed_at = Vec::new();
    for w in waits {
        closed_at.push(w.await.unwrap());
    }
    closed_at.sort();
    let spread = closed_at[9] - closed_at[0];
    // Ten closes spread evenly over 2 s: first and last are ~1.8 s apart, not a burst.
    assert!(
        spread >= Duration::from_millis(900),
        "closes were not spread: {closed_at:?}"
    );
    let status = tokio::task::spawn_blocking(move || gw.wait_exit(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn invalid_config_exits_non_zero_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--heartbeat-interval", "30s", "--heartbeat-timeout", "5s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--heartbeat-timeout"));
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .env("WSGATE_MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert!(!out.status.success(), "env vars are validated too");
}

#[test]
fn help_documents_every_setting_with_its_env_var() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--admin-listen",
        "--heartbeat-interval",
        "--heartbeat-timeout",
        "--drain-timeout",
        "--max-connections",
        "--max-message-size",
        "--outbound-queue-bytes",
        "--max-topics-per-connection",
        "--rate-limit",
        "--api-key",
        "--log-format",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(
        help.contains("WSGATE_LISTEN") && help.contains("[default: 25s]"),
        "{help}"
    );
}

#[test]
fn help_lists_the_drain_subcommand() {
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let drain = help
        .lines()
        .find(|l| l.trim_start().starts_with("drain "))
        .unwrap_or_else(|| panic!("--help does not list `drain`:\n{help}"));
    assert!(drain.contains("graceful drain"), "{drain}");
    assert!(help.contains("wsgate <COMMAND>"), "{help}");
    // Its own help is still `wsgate drain --help`.
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["drain", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--admin-url"));
}

#[test]
fn a_flood_to_a_client_that_stopped_reading_keeps_memory_bounded() {
    let gw = Node::start(None, &["--outbound-queue-bytes", "256KiB"]);
    // A client that subscribes, then never reads again.
    let mut slow = upgraded_client(gw.addr.port());
    let cmd = br#"{"op":"subscribe","topics":["flood"]}"#;
    slow.write_all(&client_frame(true, 0x1, cmd)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(gw.pid());
    // 200 MB of publications.
    let item = format!(r#"{{"topic":"flood","data":"{}"}}"#, "x".repeat(10_000));
    let batch = format!("[{}]", vec![item; 50].join(","));
    for _ in 0..400 {
        let (status, body) = blocking(gw.addr, "POST", "/api/publish", &batch);
        assert_eq!(status, 200, "{body}");
    }
    let after = rss_kib(gw.pid());
    // 200 MB went through; the process grew by far less (allocator noise aside).
    assert!(
        after < before + 64 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // The session ends on its own task, after the publishes were accepted: wait
    // for it to be counted (bounded; a node that never cuts the client fails).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = blocking(gw.admin, "GET", "/metrics", "");
        if metrics.contains("wsgate_disconnects_total{reason=\"slow_consumer\"} 1") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The kernel send buffer of a client's socket on the server side, read with `ss`
/// (iproute2): the `tb` field of its socket memory.
fn server_side_sndbuf(port: u16) -> u64 {
    let out = Command::new("ss")
        .args(["-tmnH", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .expect("ss (iproute2) is needed by this test");
    let text = String::from_utf8_lossy(&out.stdout);
    let tb = text
        .split(|c: char| c == ',' || c == '(' || c.is_whitespace())
        .find_map(|f| f.strip_prefix("tb"))
        .unwrap_or_else(|| panic!("no socket memory in: {text}"));
    tb.parse().unwrap()
}

/// A raw WebSocket client: the upgrade is done, nothing else read or sent.
fn upgraded_client(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(c, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut line = String::new();
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    c
}

#[test]
fn client_sockets_get_the_configured_send_buffer() {
    // Linux doubles SO_SNDBUF for its bookkeeping and caps it at net.core.wmem_max.
    let wmem_max: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let gw = Node::start(None, &[]);
    let _c = upgraded_client(gw.addr.port());
    assert_eq!(
        server_side_sndbuf(gw.addr.port()),
        2 * wmem_max.min(256 * 1024)
    );
    let gw = Node::start(None, &["--socket-send-buffer", "64KiB"]);
    let _c = upgraded_client(gw.addr.port());
    assert_eq!(
        server_side_sndbuf(gw.addr.port()),
        2 * wmem_max.min(64 * 1024)
    );
    // 0: left to the kernel's autotuning, which sizes it from the initial congestion
    // window and the MSS (on loopback, with its 64 KiB MTU: megabytes at once).
    let gw = Node::start(None, &["--socket-send-buffer", "0"]);
    let _c = upgraded_client(gw.addr.port());
    let auto = server_side_sndbuf(gw.addr.port());
    assert!(
        auto != 2 * wmem_max.min(256 * 1024) && auto != 2 * wmem_max.min(64 * 1024),
        "{auto}"
    );
}

/// The Python `websockets` library (installed by the test command) drives the
/// protocol: see tests/clients/python_client.py.
#[test]
fn python_websockets_client_speaks_the_protocol() {
    let gw = Node::start(
        None,
        &["--max-message-size", "4096", "--node-id", "py-node"],
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/python_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(gw.ws_url())
        .output()
        .expect("python3 runs (the test command installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}

/// The Python `httpx` library (installed by the test command) reads `/sse`: events,
/// heartbeat comments, and a reconnect with `Last-Event-ID` resuming a stream; see
/// tests/clients/python_sse_client.py.
#[test]
fn python_httpx_reads_server_sent_events() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[[namespaces]]\nname = \"chat\"\ntopics = [\"chat:*\"]\nhistory_size = 100\nhistory_ttl = \"10m\"\n",
    )
    .unwrap();
    let gw = Node::start(
        None,
        &[
            "--config",
            config.path().to_str().unwrap(),
            "--heartbeat-interval",
            "1s",
        ],
    );
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/python_sse_client.py"
    );
    let out = Command::new("timeout")
        .arg("60")
        .arg("python3")
        .arg(script)
        .arg(format!("http://{}", gw.addr))
        .output()
        .expect("python3 runs (the test command installs httpx)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python SSE client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
}

/// With a tiny open-files limit, connections past it make `accept(2)` fail with
/// EMFILE: the node counts, backs off, keeps serving, and accepts again once
/// descriptors are free.
#[test]
fn accept_loop_survives_running_out_of_file_descriptors() {
    let (port, admin) = (free_port(), free_port());
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec {} --listen 127.0.0.1:{port} --admin-listen 127.0.0.1:{admin} --log-level error",
            env!("CARGO_BIN_EXE_wsgate")
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while blocking(at(admin), "GET", "/healthz", "").0 != 200 {
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Far more connections than descriptors; they sit in the backlog or get accepted.
    let mut held: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the gateway died");
    held.clear();
    // Once descriptors are free again, it serves as before.
    let mut served = false;
    for _ in 0..100 {
        if let (200, body) = blocking(at(admin), "GET", "/metrics", "") {
            let errors = body
                .lines()
                .find_map(|l| l.strip_prefix("wsgate_accept_errors_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            assert!(errors > 0.0, "EMFILE was counted");
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "the gateway serves again after EMFILE");
    // The public listener, where EMFILE hit, accepts again too.
    let publish = blocking(
        at(port),
        "POST",
        "/api/publish",
        r#"{"topic":"t","data":1}"#,
    );
    assert_eq!(publish.0, 200, "public accept loop alive");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn drain_subcommand_starts_the_drain_of_a_running_node() {
    let mut gw = Node::start(None, &["--drain-timeout", "200ms"]);
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["drain", "--admin-url", &format!("http://{}", gw.admin)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = gw.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "the node drained and exited 0");
    // Nothing listens any more: the command fails, with a message.
    let out = Command::new(env!("CARGO_BIN_EXE_wsgate"))
        .args(["drain", "--admin-url", &format!("http://{}", gw.admin)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.is_empty());
}
