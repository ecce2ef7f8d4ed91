//! The observability deliverables against real tools: `promtool check metrics` on a
//! live scrape, `promtool check rules` / `test rules` on the alerts, and a real
//! Prometheus scraping a gateway under load, in which every PromQL expression of the
//! Grafana dashboard and of the alert rules parses and finds data.
//!
//! Needs `promtool` and `prometheus` on PATH (Debian package `prometheus`): installed
//! with apt-get on first use when missing; `.ci/observability-check` does the
//! same and runs every observability test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wsgate_testkit::http::*;
use wsgate_testkit::process::*;
use wsgate_testkit::ws::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

/// Installs the Debian package `prometheus` once if `promtool` or `prometheus` is
/// missing (a fresh CI machine), as .ci/observability-check does.
fn ensure_prometheus() {
    static INSTALL: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut tried = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if *tried || (on_path("promtool") && on_path("prometheus")) {
        return;
    }
    *tried = true;
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| {
        let mut c = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    eprintln!("installing the `prometheus` package for promtool and a real server...");
    let _ = apt(&["update", "-qq"]);
    let _ = apt(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "prometheus",
    ]);
}

fn tool(name: &str) -> Command {
    ensure_prometheus();
    assert!(
        on_path(name),
        "`{name}` is not installed and could not be installed: run \
         `apt-get install -y prometheus` (or .ci/observability-check)"
    );
    Command::new(name)
}

/// Some traffic of every kind until `stop`: subscribers that read, WebSocket and
/// HTTP publishers, connection churn.
fn load(gw: &Node, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (stop, addr) = (stop.clone(), gw.addr);
        tasks.push(tokio::spawn(async move {
            let mut ws = Client::connect(addr).await;
            ws.subscribe_with_id(1, &["load"]).await;
            while !stop.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(200), ws.recv()).await;
            }
        }));
    }
    let (stop2, addr) = (stop.clone(), gw.addr);
    tasks.push(tokio::spawn(async move {
        let mut ws = Client::connect(addr).await;
        let mut i = 0u64;
        while !stop2.load(Ordering::Relaxed) {
            i += 1;
            ws.send_text(&format!(
                r#"{{"op":"publish","id":{i},"topic":"load","data":{{"i":{i}}}}}"#
            ))
            .await;
            let _ = ws.recv().await;
            if i.is_multiple_of(5) {
                let body = format!(r#"{{"topic":"load","data":{i}}}"#);
                let _ = http_json(addr, "POST", "/api/publish", &body).await;
                // Churn: a connection that comes and goes.
                let mut c = Client::connect(addr).await;
                c.subscribe_with_id(1, &["churn"]).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    tasks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_live_scrape() {
    let gw = Node::start_json(&[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&gw, stop.clone());
    gw.eventually("deliveries", |m| {
        val(m, "wsgate_messages_delivered_total") > 10.0
    })
    .await;
    let text = gw.scrape().await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut child = tool("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_and_unit_tests_the_alert_rules() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = tool("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `expr` of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/wsgate.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    out
}

/// Every `expr:` of the alert rules (kept on one line each, see the file's header).
fn alert_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_owned())
        .collect()
}

/// Grafana's variables, as the dashboard would fill them with "All".
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$instance", ".*")
}

/// `wsgate_*` names an expression reads.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("wsgate_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out
}

/// The per-shard Redis families (`shard` label): the Redis broker creates their series
/// for its connections, so a gateway without Redis has none (docs/metrics.md, "Redis").
const REDIS_SHARD_PREFIX: &str = "wsgate_redis_shard_";

/// A dashboard query that reads only per-shard Redis series: without Redis it must
/// parse, but it has no data.
fn needs_redis_shards(expr: &str) -> bool {
    let names = metric_names(expr);
    !names.is_empty() && names.iter().all(|n| n.starts_with(REDIS_SHARD_PREFIX))
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = std::env::temp_dir().join(format!(
        "wsgate-prom-{}-{}",
        std::process::id(),
        target.port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = repo().join("deploy/prometheus/alerts.yml");
    std::fs::copy(&rules, dir.join("alerts.yml")).unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\n\
         scrape_configs:\n  - job_name: wsgate\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    // A free port: bound, then released for Prometheus (loopback only).
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], wsgate_testkit::free_port()));
    let child = tool("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Prometheus { child, addr, dir }
}

async fn query(prom: &Prometheus, q: &str) -> serde_json::Value {
    let (status, body) = http_json(
        prom.addr,
        "GET",
        &format!("/api/v1/query?query={}", encode(q)),
        "",
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|_| panic!("Prometheus answered {status}: {body}"));
    assert_eq!(v["status"], "success", "query `{q}` failed: {body}");
    v
}

fn has_data(v: &serde_json::Value) -> bool {
    v["data"]["result"]
        .as_array()
        .is_some_and(|r| !r.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_finds_data_for_every_dashboard_and_alert_query() {
    let gw = Node::start_json(&[], &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(&gw, stop.clone());
    let prom = start_prometheus(gw.admin);

    // Wait until Prometheus has a rate over traffic (a few scrapes with deliveries).
    let ready = "rate(wsgate_messages_delivered_total[30s]) > 0";
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let up = try_http_json(prom.addr, "GET", "/-/ready", "").await;
        if matches!(up, Ok((200, _))) && has_data(&query(&prom, ready).await) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never saw traffic");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few more scrapes, so that every rate window holds several samples.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut missing = Vec::new();
    let dash = dashboard_exprs();
    assert!(dash.len() >= 20, "the dashboard has its panels");
    for e in &dash {
        let q = grafana_to_promql(e);
        // query() asserts that it parses; the per-shard panels need Redis for data.
        if !has_data(&query(&prom, &q).await) && !needs_redis_shards(&q) {
            missing.push(format!("dashboard: {q}"));
        }
    }
    let alerts = alert_exprs();
    assert!(alerts.len() >= 8, "the rules have their expressions");
    for e in &alerts {
        // An alert's expression is empty unless it fires: it must parse, and every
        // series it reads must exist.
        query(&prom, e).await;
        for name in metric_names(e) {
            if !has_data(&query(&prom, &name).await) {
                missing.push(format!("alert `{e}` reads `{name}`"));
            }
        }
        if e.contains("up{job=\"wsgate\"}") {
            assert!(has_data(&query(&prom, "up{job=\"wsgate\"} == 1").await));
        }
    }
    // The rules loaded and were evaluated without error.
    let (_, rules) = http_json(prom.addr, "GET", "/api/v1/rules", "").await;
    let rules: serde_json::Value = serde_json::from_str(&rules).unwrap();
    let group = &rules["data"]["groups"][0];
    assert_eq!(group["rules"].as_array().unwrap().len(), alerts.len());
    for r in group["rules"].as_array().unwrap() {
        assert_eq!(r["health"], "ok", "rule {} is not healthy: {r}", r["name"]);
    }

    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    assert!(
        missing.is_empty(),
        "queries without data:\n{}",
        missing.join("\n")
    );
}
