//! The kernel-only floor (`wsgate-loadtest floor`): a tiny bounded run of the real
//! binary on loopback must deliver every frame it wrote, exactly once, and report
//! latencies and CPU for both sides.

use std::process::Command;

#[test]
fn floor_delivers_every_frame_and_reports_its_costs() {
    let dir = std::env::temp_dir().join(format!("wsgate-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("floor.json");
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate-loadtest"))
        .args([
            "floor",
            "--sockets",
            "64",
            "--rate",
            "200",
            "--payload",
            "149",
        ])
        .args(["--duration", "2s", "--warmup", "1s"])
        .args(["--source-addrs", "127.0.0.2-127.0.0.3", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    // 149 bytes need the 16-bit length form: a 4-byte header.
    assert_eq!(r["frame_bytes"], 153, "{r:#}");
    let expected = r["expected"].as_u64().unwrap();
    // About 2 s x 200 publications x 64 sockets, every one delivered.
    assert!(expected >= 64 * 300, "{r:#}");
    assert_eq!(r["delivered"], expected, "{r:#}");
    let steady = r["latency"]["count"].as_u64().unwrap();
    assert!(steady > 0 && steady < expected, "{r:#}");
    let l = &r["latency"];
    assert!(
        l["p50_ms"].as_f64().unwrap() <= l["p99_ms"].as_f64().unwrap(),
        "{r:#}"
    );
    assert!(
        l["p99_ms"].as_f64().unwrap() <= l["max_ms"].as_f64().unwrap(),
        "{r:#}"
    );
    assert!(r["deliveries_per_write"].as_f64().unwrap() >= 1.0, "{r:#}");
    assert!(r["writer_cpu_s"].as_f64().unwrap() > 0.0, "{r:#}");
    assert!(r["reader_cpu_s"].as_f64().unwrap() > 0.0, "{r:#}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The idle floor (`wsgate-loadtest floor-idle`): its child process connects every
/// socket and answers every ping; the report counts the pings of the hold and their
/// pongs, and the server side's CPU.
#[test]
fn floor_idle_pings_every_connection_and_reads_the_pongs() {
    let dir = std::env::temp_dir().join(format!("wsgate-floor-idle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("floor-idle.json");
    let status = Command::new(env!("CARGO_BIN_EXE_wsgate-loadtest"))
        .args(["floor-idle", "--connections", "40", "--interval", "1s"])
        .args(["--duration", "2s", "--settle", "500ms"])
        .args(["--source-addrs", "127.0.0.2-127.0.0.3", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(r["connections"], 40, "{r:#}");
    // A one-second interval is one slot: every connection is pinged at each tick,
    // two or three ticks fall in the 2 s hold.
    let (pings, pongs) = (r["pings"].as_u64().unwrap(), r["pongs"].as_u64().unwrap());
    assert!((80..=120).contains(&pings), "{r:#}");
    // Pongs of the last tick may come after the hold; those of the tick before it
    // may count in it.
    assert!(pongs + 40 >= pings && pongs <= pings + 40, "{r:#}");
    std::fs::remove_dir_all(&dir).ok();
}
