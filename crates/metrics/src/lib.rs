//! Prometheus metrics for wsgate.
//!
//! # Layout
//! - [`Metrics`]: every metric the gateway exports, registered in a registry the
//!   caller owns (no global registry), handed out as cheap cloned handles.
//! - [`Metrics::encode`]: the Prometheus text exposition for `/metrics`.
//!
//! Labels are bounded enums (reasons, sources); never a topic, user or connection id.
//! Hot-path counters are pre-resolved handles (one relaxed atomic add, no label
//! lookup), and the gateway adds to them once per written batch, not per message.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every wsgate metric. Clone the fields you need; they share their values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Upgrades completed.
    pub connections_accepted: IntCounter,
    /// Upgrade requests refused, by reason.
    pub connections_refused: IntCounterVec,
    /// Connections ended, by reason.
    pub disconnects: IntCounterVec,
    /// (topic, connection) subscription pairs on this node.
    pub subscriptions: IntGauge,
    /// Topics with at least one local subscriber.
    pub topics: IntGauge,
    /// Publications accepted, by source (client, http, redis).
    pub messages_received: IntCounterVec,
    /// Message frames written to subscribers' sockets.
    pub messages_delivered: IntCounter,
    /// WebSocket payload bytes read from clients.
    pub bytes_received: IntCounter,
    /// Bytes written to clients' sockets (frames, headers included).
    pub bytes_sent: IntCounter,
    /// Messages not delivered, by reason.
    pub messages_dropped: IntCounterVec,
    /// Bytes waiting in a connection's outbound queue, sampled at each write batch.
    pub outbound_queue_bytes: Histogram,
    /// Publication accepted → frame written to a subscriber's socket.
    pub delivery_latency: Histogram,
    /// Time for the broker to accept a publication.
    pub broker_publish_duration: Histogram,
    /// Errors from `accept(2)` (e.g. EMFILE), survived with a back-off.
    pub accept_errors: IntCounter,
    /// 1 while the node drains.
    pub draining: IntGauge,
    /// 1 when the broker can fan out.
    pub broker_up: IntGauge,
    /// Constant 1, labelled with the version.
    pub build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

/// Latency buckets from 50 µs to 10 s.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    /// Creates and registers every metric in `registry`.
    pub fn new(registry: Registry) -> Self {
        let r = &registry;
        let m = Metrics {
            connections: gauge(r, "wsgate_connections", "Open WebSocket connections."),
            connections_accepted: counter(
                r,
                "wsgate_connections_accepted_total",
                "WebSocket upgrades completed.",
            ),
            connections_refused: counter_vec(
                r,
                "wsgate_connections_refused_total",
                "WebSocket upgrade requests refused, by reason.",
                "reason",
            ),
            disconnects: counter_vec(
                r,
                "wsgate_disconnects_total",
                "WebSocket connections ended, by reason.",
                "reason",
            ),
            subscriptions: gauge(
                r,
                "wsgate_subscriptions",
                "Current (topic, connection) subscriptions on this node.",
            ),
            topics: gauge(
                r,
                "wsgate_topics",
                "Topics with at least one local subscriber.",
            ),
            messages_received: counter_vec(
                r,
                "wsgate_messages_received_total",
                "Publications accepted by this node, by source.",
                "source",
            ),
            messages_delivered: counter(
                r,
                "wsgate_messages_delivered_total",
                "Message frames written to subscribers' sockets.",
            ),
            bytes_received: counter(
                r,
                "wsgate_bytes_received_total",
                "WebSocket message payload bytes received from clients.",
            ),
            bytes_sent: counter(
                r,
                "wsgate_bytes_sent_total",
                "Bytes written to WebSocket clients, frame headers included.",
            ),
            messages_dropped: counter_vec(
                r,
                "wsgate_messages_dropped_total",
                "Messages not delivered, by reason.",
                "reason",
            ),
            outbound_queue_bytes: histogram(
                r,
                "wsgate_outbound_queue_bytes",
                "Bytes queued for a connection when its writer takes a batch.",
                prometheus::exponential_buckets(256.0, 4.0, 8).expect("valid buckets"),
            ),
            delivery_latency: histogram(
                r,
                "wsgate_delivery_latency_seconds",
                "From a node accepting a publication to its frame being written to a subscriber.",
                latency_buckets(),
            ),
            broker_publish_duration: histogram(
                r,
                "wsgate_broker_publish_duration_seconds",
                "Time for the broker to accept a publication.",
                latency_buckets(),
            ),
            accept_errors: counter(
                r,
                "wsgate_accept_errors_total",
                "Errors from accept(2), e.g. out of file descriptors.",
            ),
            draining: gauge(r, "wsgate_draining", "1 while the node is draining."),
            broker_up: gauge(r, "wsgate_broker_up", "1 when the broker can fan out."),
            build_info: {
                let g = IntGaugeVec::new(
                    Opts::new("wsgate_build_info", "Build information; constant 1."),
                    &["version"],
                )
                .expect("valid metric");
                r.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The registry the metrics live in (to register more collectors).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Prometheus text exposition of everything in the registry.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Registry::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_family() {
        let m = Metrics::default();
        m.connections.set(3);
        m.disconnects.with_label_values(&["slow_consumer"]).inc();
        let text = m.encode();
        assert!(text.contains("wsgate_connections 3"));
        assert!(text.contains("wsgate_disconnects_total{reason=\"slow_consumer\"} 1"));
        assert!(text.contains("wsgate_build_info{version="));
    }
}
