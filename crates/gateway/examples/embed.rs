//! A wsgate node inside your own program: the in-memory broker, the usual flags and
//! `WSGATE_*` variables, and your code publishing through the node.
//!
//! ```sh
//! cargo run -p wsgate-gateway --example embed -- --listen 127.0.0.1:8080
//! websocat ws://127.0.0.1:8080/ws   # then: {"op":"subscribe","topics":["clock"]}
//! ```

use std::time::Duration;

use clap::Parser;
use wsgate_fanout::{unix_nanos, Source};
use wsgate_gateway::{Config, Gateway, Server};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let gw = Gateway::in_memory(Config::parse(), wsgate_metrics::Metrics::default())?;
    let server = Server::bind(gw.clone()).await?;
    println!("clients: ws://{}/ws", server.local_addr());
    let app = gw.clone();
    tokio::spawn(async move {
        // Publications from the program go through the node, like the HTTP API's.
        while !app.is_draining() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = (unix_nanos() / 1_000_000).to_string();
            if let Ok(ack) = app.node.publish(Source::Http, "clock", now.as_bytes()) {
                let _ = ack.await;
            }
        }
    });
    let drain = gw.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        drain.start_drain(); // closes clients with 1001 over --drain-timeout, then stops
    });
    server.run().await;
    Ok(())
}
