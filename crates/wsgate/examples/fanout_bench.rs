//! A small, honest fan-out measurement (until `wsgate-loadtest` lands): one publisher
//! client on one node, `subs` subscriber clients on another (or the same) node, all
//! real WebSocket connections from this process.
//!
//! ```sh
//! cargo run --release --example fanout_bench -- <pub ws url> <sub ws url> <subs> <messages> <rate/s>
//! ```
//!
//! Prints the publish→receive latency (percentiles, from timestamps the publisher puts
//! in `data`; same host, same clock) and the delivery throughput. `rate` 0 means as fast
//! as the publisher's replies allow (at most 256 in flight).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (pub_url, sub_url) = (args[1].clone(), args[2].clone());
    let subs: usize = args[3].parse().unwrap();
    let messages: u64 = args[4].parse().unwrap();
    let rate: f64 = args[5].parse().unwrap();

    // Subscribers: connect, subscribe, then count and time every message.
    let mut readers = Vec::new();
    for _ in 0..subs {
        let (mut ws, _) = tokio_tungstenite::connect_async(&sub_url).await.unwrap();
        ws.next().await.unwrap().unwrap(); // welcome
        ws.send(Message::Text(
            json!({"op":"subscribe","id":1,"topics":["bench"]})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let r: Value = match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => serde_json::from_str(&t).unwrap(),
            m => panic!("{m:?}"),
        };
        assert_eq!(r["op"], "subscribed", "{r}");
        readers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(messages as usize);
            let mut last = Instant::now();
            while (lat.len() as u64) < messages {
                let m = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    _ => break,
                };
                let now = now_ns();
                // `"data":{"t":<ns>}` — cheap extraction, no full parse per message.
                let t: u64 = m
                    .split("\"t\":")
                    .nth(1)
                    .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(now);
                lat.push(now.saturating_sub(t));
                last = Instant::now();
            }
            (lat, last)
        }));
    }

    let (mut publisher, _) = tokio_tungstenite::connect_async(&pub_url).await.unwrap();
    publisher.next().await.unwrap().unwrap();
    let (mut tx, mut rx) = publisher.split();
    let acks = tokio::spawn(async move {
        let mut ok = 0u64;
        let mut failed = 0u64;
        while ok + failed < messages {
            match rx.next().await {
                Some(Ok(Message::Text(t))) if t.contains("\"published\"") => ok += 1,
                Some(Ok(Message::Text(_))) => failed += 1,
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        (ok, failed)
    });
    let pad = "x".repeat(64);
    let start = Instant::now();
    for n in 0..messages {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let cmd = format!(
            r#"{{"op":"publish","id":{n},"topic":"bench","data":{{"t":{},"pad":"{pad}"}}}}"#,
            now_ns()
        );
        tx.send(Message::Text(cmd.into())).await.unwrap();
    }
    let sent = start.elapsed();
    let (ok, failed) = acks.await.unwrap();
    let mut all = Vec::new();
    let mut end = start;
    for r in readers {
        let (lat, last) = r.await.unwrap();
        end = end.max(last);
        all.extend(lat);
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |ns| *ns as f64 / 1e6)
    };
    let elapsed = end.duration_since(start).as_secs_f64();
    println!(
        "subs={subs} messages={messages} rate={rate} published_ok={ok} failed={failed} \
         delivered={}/{} in {elapsed:.2}s ({:.0} deliveries/s, publish phase {:.2}s) \
         latency ms p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        all.len(),
        messages * subs as u64,
        all.len() as f64 / elapsed,
        sent.as_secs_f64(),
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0),
    );
}
