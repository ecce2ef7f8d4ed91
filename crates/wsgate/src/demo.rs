//! `--demo`: a ticker that publishes a random walk of four prices to `demo.ticker`
//! every 500 ms through the node — the same path as the HTTP API, so with Redis every
//! node's demo page sees every node's ticker — and the chat room's `chat:*` topics made
//! a stream unless the configuration says otherwise. The page itself is served by the
//! gateway (`/`, with `--demo`).

use std::sync::Arc;
use std::time::Duration;

use wsgate_fanout::{
    unix_nanos, Namespace, Namespaces, Pattern, PresenceOptions, Source, StreamOptions,
};
use wsgate_gateway::protocol::json_string;
use wsgate_gateway::Gateway;

const SYMBOLS: [&str; 4] = ["ACME", "GLOBX", "INITECH", "UMBRELLA"];

/// The demo page's chat room (clients/js/demo/index.html).
const CHAT_TOPIC: &str = "chat:demo";

/// The namespaces with the demo chat's `chat:*` made a stream (the last 1000 messages,
/// 10 minutes), so that a page resumes across node drains with nothing lost, with
/// presence and join/leave, so that the page shows who is in the room. A
/// configuration that already covers `chat:demo` (a stream or not) is left as it is;
/// a more specific configured pattern (`chat:room-*`) still decides for its topics.
/// Nodes sharing a Redis must agree on streams: all started with `--demo`, they do.
pub(crate) fn with_chat_stream(namespaces: Namespaces) -> Namespaces {
    if namespaces.namespace(CHAT_TOPIC).is_some() {
        return namespaces;
    }
    let mut list: Vec<Namespace> = namespaces.iter().cloned().collect();
    list.push(Namespace {
        name: "demo-chat".into(),
        topics: vec![Pattern::parse("chat:*").expect("a valid pattern")],
        stream: Some(StreamOptions {
            history_size: 1000,
            history_ttl: Duration::from_secs(600),
        }),
        presence: Some(PresenceOptions {
            join_leave: true,
            ..PresenceOptions::default()
        }),
        ..Default::default()
    });
    Namespaces::new(list).unwrap_or(namespaces)
}

/// Publishes a random-walk ticker to `demo.ticker` every 500 ms until the node stops
/// or starts draining.
pub(crate) async fn run_ticker(gw: Arc<Gateway>) {
    let mut prices = [101.0f64, 57.0, 12.5, 230.0];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = gw.drain_started.cancelled() => return,
            _ = gw.shutdown.cancelled() => return,
        }
        let ts = unix_nanos() / 1_000_000;
        let rows: Vec<String> = SYMBOLS
            .iter()
            .zip(prices.iter_mut())
            .map(|(symbol, price)| {
                // ±0.5 % per tick, two decimals.
                *price *= 1.0 + rand::random_range(-0.005..0.005);
                *price = (*price * 100.0).round() / 100.0;
                format!(
                    r#"{{"symbol":"{symbol}","price":{price:.2},"ts":{ts},"node":{}}}"#,
                    json_string(&gw.node_id)
                )
            })
            .collect();
        let data = format!("[{}]", rows.join(","));
        let result = match gw
            .node
            .publish(Source::Demo, "demo.ticker", data.as_bytes())
        {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "demo ticker publish failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use wsgate_fanout::{Publication, Subscriber};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);
    impl Subscriber for Recorder {
        fn deliver(&self, p: &Publication) {
            // The JSON starts after the frame header.
            let start = match p.frame[1] {
                0..=125 => 2,
                126 => 4,
                _ => 10,
            };
            let text = String::from_utf8_lossy(&p.frame[start..]).into();
            self.0.lock().push(text);
        }
    }

    #[test]
    fn the_demo_chat_is_a_stream_unless_configured() {
        let plain = with_chat_stream(Namespaces::default());
        let opts = plain.stream(CHAT_TOPIC).expect("chat:demo is a stream");
        assert_eq!(opts.history_size, 1000);
        assert!(plain.stream("chat:other").is_some());
        assert!(
            plain.stream("demo.ticker").is_none(),
            "the ticker stays plain"
        );

        let configured = Namespaces::new(vec![
            Namespace {
                name: "chat".into(),
                topics: vec![Pattern::parse("chat:*").unwrap()],
                stream: None,
                ..Default::default()
            },
            Namespace {
                name: "news".into(),
                topics: vec![Pattern::parse("news:*").unwrap()],
                stream: Some(StreamOptions {
                    history_size: 5,
                    history_ttl: Duration::from_secs(60),
                }),
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(
            with_chat_stream(configured.clone()),
            configured,
            "the configuration decides"
        );

        let rooms = Namespaces::new(vec![Namespace {
            name: "rooms".into(),
            topics: vec![Pattern::parse("chat:room-*").unwrap()],
            stream: None,
            ..Default::default()
        }])
        .unwrap();
        let both = with_chat_stream(rooms);
        assert!(both.stream(CHAT_TOPIC).is_some());
        assert!(both.presence(CHAT_TOPIC).is_some_and(|p| p.join_leave));
        assert!(
            both.stream("chat:room-1").is_none(),
            "the more specific pattern"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_ticker_publishes_four_prices_until_the_drain() {
        let gw = Gateway::in_memory(
            wsgate_gateway::Config::for_tests(),
            wsgate_metrics::Metrics::default(),
        )
        .unwrap();
        let rec = Arc::new(Recorder::default());
        gw.node
            .hub()
            .subscribe(&Arc::from("demo.ticker"), 1, rec.clone());
        let task = tokio::spawn(run_ticker(gw.clone()));
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        gw.start_drain();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the ticker stops when the drain starts")
            .unwrap();
        let got = rec.0.lock().clone();
        assert!(got.len() >= 2, "{got:?}");
        let m: serde_json::Value = serde_json::from_str(&got[0]).unwrap();
        assert_eq!(m["topic"], "demo.ticker");
        let rows = m["data"].as_array().expect("an array of prices");
        assert_eq!(rows.len(), 4);
        assert!(rows
            .iter()
            .all(|r| r["price"].is_f64() && r["symbol"].is_string()));
    }
}
