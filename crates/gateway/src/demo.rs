//! The browser client (`/wsgate.js`, always served) and, with `--demo`, a demo page at
//! `/` plus a ticker that publishes to `demo.ticker` through the broker — the same path
//! as the HTTP API, so with Redis every node's page sees every node's ticker.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use wsgate_fanout::unix_nanos;

use crate::http_api::Body;
use crate::protocol::json_string;
use crate::state::Gateway;

/// The dependency-free ES module client (clients/js/wsgate.js).
const CLIENT_JS: &str = include_str!("../../../clients/js/wsgate.js");
/// The demo page (clients/js/demo/index.html).
const DEMO_HTML: &str = include_str!("../../../clients/js/demo/index.html");

fn static_file(content_type: &'static str, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

/// `GET /wsgate.js`.
pub fn client_js() -> Response<Body> {
    static_file("text/javascript; charset=utf-8", CLIENT_JS)
}

/// `GET /` with `--demo`.
pub fn page() -> Response<Body> {
    static_file("text/html; charset=utf-8", DEMO_HTML)
}

const SYMBOLS: [&str; 4] = ["ACME", "GLOBX", "INITECH", "UMBRELLA"];

/// Publishes a random-walk ticker to `demo.ticker` every 500 ms until the node stops
/// or starts draining.
pub async fn run_ticker(gw: Arc<Gateway>) {
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
        if let Err(e) = gw
            .broker
            .publish("demo.ticker", data.as_bytes(), unix_nanos())
            .await
        {
            tracing::debug!(error = %e, "demo ticker publish failed");
        }
    }
}
