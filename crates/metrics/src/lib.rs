//! Prometheus metrics for wsgate.
//!
//! # Layout
//! - [`Metrics`] (this file): every metric the gateway exports, registered in a
//!   registry the caller owns (no global registry), handed out as cheap cloned
//!   handles. `docs/metrics.md` documents each one; keep the two in step.
//! - [`labels`]: the bounded label values (reasons, sources), pre-created at zero so
//!   dashboards and `rate()` see every series from the first scrape.
//! - [`delivery`]: [`DeliveryStats`], the per-delivery counters and histograms,
//!   striped per thread and summed at scrape time.
//!
//! Labels are bounded enums (reasons, sources, a Redis shard index); never a topic,
//! user or connection id.
//!
//! # The hot path
//! Fan-out touches no shared cache line: each writer batch is counted into the
//! [`DeliveryStats`] stripe of the thread it runs on (plain loads and stores, no
//! allocation, nothing per connection), and a scrape sums the stripes. Everything else that
//! counts (commands, HTTP requests, connects) is per client action and rate limited,
//! and uses pre-resolved handles (one relaxed atomic add, no label lookup).

pub mod delivery;
pub mod labels;
pub mod runtime;

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub use delivery::{DeliveryStats, DeliveryTotals};
pub use runtime::RuntimeCollector;

/// The families [`DeliveryStats`] exports (named here, with every other metric name).
pub mod delivery_names {
    pub const MESSAGES_DELIVERED: &str = "wsgate_messages_delivered_total";
    pub const BYTES_SENT: &str = "wsgate_bytes_sent_total";
    pub const OUTBOUND_QUEUE_BYTES: &str = "wsgate_outbound_queue_bytes";
    pub const DELIVERY_LATENCY: &str = "wsgate_delivery_latency_seconds";
}

/// Publications accepted, one pre-resolved handle per source.
#[derive(Clone)]
pub struct Received {
    /// Published by a WebSocket client.
    pub client: IntCounter,
    /// Published with `POST /api/publish`.
    pub http: IntCounter,
    /// Received from Redis (a backend's `PUBLISH`, or another node's relay).
    pub redis: IntCounter,
}

/// Every wsgate metric. Clone the fields you need; they share their values.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `wsgate_connections`: open WebSocket connections.
    pub connections: IntGauge,
    /// `wsgate_connections_accepted_total`: upgrades completed.
    pub connections_accepted: IntCounter,
    /// `wsgate_connections_refused_total{reason}`: upgrade requests refused
    /// ([`labels::REFUSED`]).
    pub connections_refused: IntCounterVec,
    /// `wsgate_disconnects_total{reason}`: connections ended ([`labels::DISCONNECT`]).
    pub disconnects: IntCounterVec,
    /// `wsgate_subscriptions`: (topic, connection) pairs on this node (set at scrape).
    pub subscriptions: IntGauge,
    /// `wsgate_topics`: topics with at least one local subscriber (set at scrape).
    pub topics: IntGauge,
    /// `wsgate_messages_received_total{source}`, all sources.
    pub messages_received: IntCounterVec,
    /// The same counter, resolved per source for the publish paths.
    pub received: Received,
    /// `wsgate_messages_delivered_total` (message frames written to subscribers),
    /// `wsgate_bytes_sent_total` (bytes written to clients, frame headers included),
    /// `wsgate_outbound_queue_bytes` (bytes queued for a connection when its writer
    /// takes a batch — a distribution over connections and time, no per-connection
    /// label) and `wsgate_delivery_latency_seconds` (publication accepted by a node,
    /// the publishing node through Redis → its frame written to a subscriber's
    /// socket): recorded once per written batch, see [`delivery`].
    pub delivery: DeliveryStats,
    /// `wsgate_bytes_received_total`: WebSocket payload bytes read from clients.
    pub bytes_received: IntCounter,
    /// `wsgate_transport_connections{transport,compression}`: open client
    /// connections by transport (`websocket`, `sse`) and whether they negotiated
    /// compression (`deflate`, `none`). See [`Metrics::transport_connection`].
    pub transport_connections: IntGaugeVec,
    /// The same gauge, resolved for `{transport="sse",compression="none"}`.
    pub transport_connections_sse: IntGauge,
    /// `wsgate_sse_events_total`: Server-Sent Events written (heartbeat comments
    /// not counted).
    pub sse_events: IntCounter,
    /// `wsgate_sse_bytes_sent_total`: bytes of SSE response bodies handed to HTTP.
    pub sse_bytes: IntCounter,
    /// `wsgate_messages_dropped_total{reason}`: messages not delivered
    /// ([`labels::DROPPED`]).
    pub messages_dropped: IntCounterVec,
    /// `wsgate_broker_publish_duration_seconds`: time for the broker to accept a
    /// publication (or an HTTP batch of them).
    pub broker_publish_duration: Histogram,
    /// `wsgate_accept_errors_total`: errors from `accept(2)` (e.g. EMFILE).
    pub accept_errors: IntCounter,
    /// `wsgate_draining`: 1 while the node drains.
    pub draining: IntGauge,
    /// `wsgate_ready`: 1 when `/readyz` answers 200 (set at scrape).
    pub ready: IntGauge,
    /// `wsgate_broker_up`: 1 when the broker can fan out (set at scrape).
    pub broker_up: IntGauge,
    /// `wsgate_broker_info{kind}`: constant 1, labelled with the broker in use
    /// (`memory`, `redis`); lets Redis alerts apply only where Redis is used.
    pub broker_info: IntGaugeVec,
    /// `wsgate_redis_up`: 1 while the Redis broker's connections are healthy. Stays 0
    /// without Redis (see `wsgate_broker_info`).
    pub redis_up: IntGauge,
    /// `wsgate_redis_reconnects_total`: Redis connections re-established after a
    /// loss. For the Redis broker: increment on every successful reconnect.
    pub redis_reconnects: IntCounter,
    /// `wsgate_redis_resubscribed_topics_total`: topics subscribed again from the hub
    /// after a reconnect. For the Redis broker: add the batch size after each
    /// resubscribe.
    pub redis_resubscribed_topics: IntCounter,
    /// `wsgate_redis_errors_total`: Redis commands that failed (publish, subscribe).
    pub redis_errors: IntCounter,
    /// `wsgate_redis_shard_up{shard}`: per pub/sub connection (cluster shard or
    /// connection index, a small bounded integer), 1 while connected. Use
    /// `redis_shard_up.with_label_values(&[&i.to_string()])` once per shard at start.
    pub redis_shard_up: IntGaugeVec,
    /// `wsgate_redis_shard_reconnects_total{shard}`: Redis Cluster mode, pub/sub
    /// connections to a shard's primary re-established after a loss (a failover
    /// included).
    pub redis_shard_reconnects: IntCounterVec,
    /// `wsgate_redis_shard_resubscribed_topics_total{shard}`: Redis Cluster mode,
    /// topics subscribed again on a shard after a reconnect, failover or slot move.
    pub redis_shard_resubscribed_topics: IntCounterVec,
    /// `wsgate_redis_shard_topics{shard}`: Redis Cluster mode, topics this node holds
    /// (`SSUBSCRIBE`d) on each shard.
    pub redis_shard_topics: IntGaugeVec,
    /// `wsgate_redis_shard_publishes_total{shard}`: Redis Cluster mode, publications
    /// this node sent (`SPUBLISH`) to each shard and Redis accepted.
    pub redis_shard_publishes: IntCounterVec,
    /// `wsgate_redis_cluster_slot_map_refreshes_total`: slot maps read from the
    /// cluster (`CLUSTER SLOTS`), periodic and on demand.
    pub redis_cluster_slot_map_refreshes: IntCounter,
    /// `wsgate_redis_cluster_slot_map_changes_total`: refreshes that found a different
    /// slot map (failover, resharding, a shard added or removed).
    pub redis_cluster_slot_map_changes: IntCounter,
    /// `wsgate_redis_cluster_redirects_total`: `MOVED`/`ASK` replies and
    /// server-pushed `sunsubscribe`s (a slot left its node) seen.
    pub redis_cluster_redirects: IntCounter,
    /// `wsgate_redis_cluster_shards`: primaries in the current slot map.
    pub redis_cluster_shards: IntGauge,
    /// `wsgate_build_info{version}`: constant 1.
    pub build_info: IntGaugeVec,
    /// `wsgate_stream_resumes_total{result}`: `subscribe` with `since`, by outcome
    /// (`recovered`, `not_recovered`).
    pub stream_resumes: IntCounterVec,
    /// `wsgate_stream_gaps_total`: stream publications that arrived with earlier seqs
    /// missing (each starts a repair from history).
    pub stream_gaps: IntCounter,
    /// `wsgate_stream_resets_total`: `reset`s sent to the local subscribers of a
    /// stream (what history no longer had, or a new epoch).
    pub stream_resets: IntCounter,
    /// `wsgate_stream_duplicates_total`: stream publications dropped because their
    /// seq was already delivered.
    pub stream_duplicates: IntCounter,
    /// `wsgate_stream_plain_publishes_total`: plain pub/sub messages on a stream's
    /// channel (not publications of the stream: not delivered).
    pub stream_plain_publishes: IntCounter,
    /// `wsgate_history_bytes`: bytes of stream history kept in this process
    /// (embedded mode).
    pub history_bytes: IntGauge,
    /// `wsgate_presence_entries`: this node's connections listed in presence (one
    /// per connection and presence topic; set at scrape).
    pub presence_entries: IntGauge,
    /// `wsgate_presence_errors_total`: presence writes the broker did not take (the
    /// node puts its entries right at its next heartbeat).
    pub presence_errors: IntCounter,
    /// `wsgate_presence_queries_total{source}`: presence and presence_stats queries
    /// answered by this node (`client`, `http`).
    pub presence_queries: IntCounterVec,
    /// `wsgate_join_leave_events_total{event,outcome}`: join/leave events that arrived
    /// for local subscribers, pushed one by one or skipped by the per-topic rate rule
    /// (then summarised in a `presence_changed`).
    pub join_leave_events: IntCounterVec,
    /// `wsgate_presence_dead_nodes_total`: dead nodes whose presence this node
    /// cleaned up (their entries removed, `leave` sent for them).
    pub presence_dead_nodes: IntCounter,
    /// `wsgate_presence_ghosts_removed_total`: entries of dead nodes removed by this
    /// node.
    pub presence_ghosts_removed: IntCounter,
    /// `wsgate_presence_resyncs_total`: times this node wrote its presence entries
    /// again (after Redis lost them, or after a failed write).
    pub presence_resyncs: IntCounter,
    /// `wsgate_cluster_nodes`: live nodes this node saw at its last heartbeat.
    pub cluster_nodes: IntGauge,
    /// `wsgate_api_requests_total{endpoint,status}`: HTTP API calls by endpoint
    /// (`publish`, `history`, `presence`, `presence_stats`, `disconnect`,
    /// `subscribe`, `unsubscribe`, `info`, `rebalance`) and status code.
    pub api_requests: IntCounterVec,
    /// `wsgate_server_commands_total{command}`: server API commands this node carried
    /// out on its own connections (one per matching connection).
    pub server_commands: IntCounterVec,
    /// `wsgate_rebalance_runs_total{trigger}`: sheddings this node started to give
    /// back what it held over its share (`api`: `POST /api/rebalance`; `auto`: its
    /// own check).
    pub rebalance_runs: IntCounterVec,
    /// `wsgate_rebalance_shed_total`: connections this node closed with 1012 to
    /// rebalance the fleet.
    pub rebalance_shed: IntCounter,
    /// `wsgate_rebalance_excess_connections`: connections over this node's share at its
    /// last check (0 when within the margin).
    pub rebalance_excess: IntGauge,
    /// `wsgate_compression_bytes_in_total`: frame bytes this process compressed for
    /// permessage-deflate (each publication once, however many subscribers).
    pub compression_bytes_in: IntCounter,
    /// `wsgate_compression_bytes_out_total`: the frame bytes that compression
    /// produced from them.
    pub compression_bytes_out: IntCounter,
    /// `wsgate_compression_seconds_total`: CPU time spent compressing them.
    pub compression_seconds: Counter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: T) -> T {
    registry
        .register(Box::new(m.clone()))
        .expect("metric names are unique");
    m
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric"))
}

/// A labelled counter whose every known label value exists (at 0) from the start.
fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let c = register(
        r,
        IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
    );
    for v in values {
        c.with_label_values(&[v]);
    }
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("valid metric"))
}

fn gauge_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric"),
    )
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
            .expect("valid metric"),
    )
}

/// Latency buckets from 50 µs to 10 s (the delivery histogram's bounds, in seconds).
pub fn latency_buckets() -> Vec<f64> {
    delivery::LATENCY_NS
        .iter()
        .map(|&ns| ns as f64 / 1e9)
        .collect()
}

/// Queue-size buckets: 256 B × 4ⁿ, up to 4 MiB (the default limit is 1 MiB).
pub fn queue_buckets() -> Vec<f64> {
    delivery::QUEUE_B.iter().map(|&b| b as f64).collect()
}

impl Metrics {
    /// Creates and registers every metric in `registry`.
    pub fn new(registry: Registry) -> Self {
        let r = &registry;
        let messages_received = counter_vec(
            r,
            "wsgate_messages_received_total",
            "Publications accepted by this node, by source (client, http, redis).",
            "source",
            labels::SOURCE,
        );
        let received = Received {
            client: messages_received.with_label_values(&["client"]),
            http: messages_received.with_label_values(&["http"]),
            redis: messages_received.with_label_values(&["redis"]),
        };
        let transport_connections = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "wsgate_transport_connections",
                    "Open client connections, by transport and compression.",
                ),
                &["transport", "compression"],
            )
            .expect("valid metric"),
        );
        for c in ["deflate", "none"] {
            transport_connections.with_label_values(&["websocket", c]);
        }
        let transport_connections_sse = transport_connections.with_label_values(&["sse", "none"]);
        let m = Metrics {
            transport_connections,
            transport_connections_sse,
            sse_events: counter(
                r,
                "wsgate_sse_events_total",
                "Server-Sent Events written to SSE clients (heartbeat comments not counted).",
            ),
            sse_bytes: counter(
                r,
                "wsgate_sse_bytes_sent_total",
                "Bytes of Server-Sent Events response bodies written.",
            ),
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
                labels::REFUSED,
            ),
            disconnects: counter_vec(
                r,
                "wsgate_disconnects_total",
                "WebSocket connections ended, by reason.",
                "reason",
                labels::DISCONNECT,
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
            messages_received,
            received,
            delivery: register(r, DeliveryStats::new()),
            bytes_received: counter(
                r,
                "wsgate_bytes_received_total",
                "WebSocket message payload bytes received from clients.",
            ),
            messages_dropped: counter_vec(
                r,
                "wsgate_messages_dropped_total",
                "Messages not delivered, by reason.",
                "reason",
                labels::DROPPED,
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
            ready: gauge(
                r,
                "wsgate_ready",
                "1 when the node accepts new connections (/readyz answers 200).",
            ),
            broker_up: gauge(r, "wsgate_broker_up", "1 when the broker can fan out."),
            broker_info: gauge_vec(
                r,
                "wsgate_broker_info",
                "The broker this node uses (memory, redis); constant 1.",
                "kind",
            ),
            redis_up: gauge(
                r,
                "wsgate_redis_up",
                "1 while the Redis broker is connected; 0 when down or not used.",
            ),
            redis_reconnects: counter(
                r,
                "wsgate_redis_reconnects_total",
                "Redis connections re-established after a loss.",
            ),
            redis_resubscribed_topics: counter(
                r,
                "wsgate_redis_resubscribed_topics_total",
                "Topics subscribed again after a Redis reconnect.",
            ),
            redis_errors: counter(
                r,
                "wsgate_redis_errors_total",
                "Redis commands that failed.",
            ),
            redis_shard_up: gauge_vec(
                r,
                "wsgate_redis_shard_up",
                "1 while the Redis pub/sub connection for this shard index is up.",
                "shard",
            ),
            redis_shard_reconnects: counter_vec(
                r,
                "wsgate_redis_shard_reconnects_total",
                "Redis Cluster: pub/sub connections to this shard index re-established.",
                "shard",
                &[],
            ),
            redis_shard_resubscribed_topics: counter_vec(
                r,
                "wsgate_redis_shard_resubscribed_topics_total",
                "Redis Cluster: topics subscribed again on this shard index after a reconnect, failover or slot move.",
                "shard",
                &[],
            ),
            redis_shard_topics: gauge_vec(
                r,
                "wsgate_redis_shard_topics",
                "Redis Cluster: topics this node holds (SSUBSCRIBE) on this shard index.",
                "shard",
            ),
            redis_shard_publishes: counter_vec(
                r,
                "wsgate_redis_shard_publishes_total",
                "Redis Cluster: publications sent with SPUBLISH to this shard index and accepted.",
                "shard",
                &[],
            ),
            redis_cluster_slot_map_refreshes: counter(
                r,
                "wsgate_redis_cluster_slot_map_refreshes_total",
                "Redis Cluster: slot maps read from the cluster.",
            ),
            redis_cluster_slot_map_changes: counter(
                r,
                "wsgate_redis_cluster_slot_map_changes_total",
                "Redis Cluster: slot map refreshes that found a different map.",
            ),
            redis_cluster_redirects: counter(
                r,
                "wsgate_redis_cluster_redirects_total",
                "Redis Cluster: MOVED/ASK replies and server-pushed sunsubscribes seen.",
            ),
            redis_cluster_shards: gauge(
                r,
                "wsgate_redis_cluster_shards",
                "Redis Cluster: primaries in the current slot map.",
            ),
            build_info: gauge_vec(
                r,
                "wsgate_build_info",
                "Build information; constant 1.",
                "version",
            ),
            stream_resumes: counter_vec(
                r,
                "wsgate_stream_resumes_total",
                "Stream subscribes with `since`, by outcome.",
                "result",
                &["recovered", "not_recovered"],
            ),
            stream_gaps: counter(
                r,
                "wsgate_stream_gaps_total",
                "Stream publications that arrived with earlier seqs missing (repaired from history).",
            ),
            stream_resets: counter(
                r,
                "wsgate_stream_resets_total",
                "Stream resets sent to local subscribers (history lost, or a new epoch).",
            ),
            stream_duplicates: counter(
                r,
                "wsgate_stream_duplicates_total",
                "Stream publications dropped because their seq was already delivered.",
            ),
            stream_plain_publishes: counter(
                r,
                "wsgate_stream_plain_publishes_total",
                "Plain pub/sub messages on a stream's channel: not a publication of the stream, not delivered.",
            ),
            history_bytes: gauge(
                r,
                "wsgate_history_bytes",
                "Bytes of stream history kept in this process (embedded mode).",
            ),
            presence_entries: gauge(
                r,
                "wsgate_presence_entries",
                "This node's connections listed in presence (connection-topic pairs).",
            ),
            presence_errors: counter(
                r,
                "wsgate_presence_errors_total",
                "Presence writes the broker did not take (put right at the next heartbeat).",
            ),
            presence_queries: counter_vec(
                r,
                "wsgate_presence_queries_total",
                "Presence queries answered, by source (client, http).",
                "source",
                &["client", "http"],
            ),
            join_leave_events: {
                let c = register(
                    r,
                    IntCounterVec::new(
                        Opts::new(
                            "wsgate_join_leave_events_total",
                            "join/leave events for local subscribers, pushed or skipped by the rate rule.",
                        ),
                        &["event", "outcome"],
                    )
                    .expect("valid metric"),
                );
                for e in labels::JOIN_LEAVE {
                    for o in labels::JOIN_LEAVE_OUTCOME {
                        c.with_label_values(&[e, o]);
                    }
                }
                c
            },
            presence_dead_nodes: counter(
                r,
                "wsgate_presence_dead_nodes_total",
                "Dead nodes whose presence entries this node removed (leave sent for them).",
            ),
            presence_ghosts_removed: counter(
                r,
                "wsgate_presence_ghosts_removed_total",
                "Presence entries of dead nodes removed by this node.",
            ),
            presence_resyncs: counter(
                r,
                "wsgate_presence_resyncs_total",
                "Times this node wrote its presence entries again (Redis lost them, or a write failed).",
            ),
            cluster_nodes: gauge(
                r,
                "wsgate_cluster_nodes",
                "Live gateway nodes seen at this node's last heartbeat.",
            ),
            api_requests: {
                let c = register(
                    r,
                    IntCounterVec::new(
                        Opts::new(
                            "wsgate_api_requests_total",
                            "HTTP API calls, by endpoint and status code.",
                        ),
                        &["endpoint", "status"],
                    )
                    .expect("valid metric"),
                );
                for e in labels::API_ENDPOINTS {
                    c.with_label_values(&[e, "200"]);
                }
                c
            },
            server_commands: counter_vec(
                r,
                "wsgate_server_commands_total",
                "Server API commands carried out on this node's connections, by command.",
                "command",
                labels::SERVER_COMMANDS,
            ),
            rebalance_runs: counter_vec(
                r,
                "wsgate_rebalance_runs_total",
                "Sheddings this node started to rebalance the fleet, by trigger (api, auto).",
                "trigger",
                labels::REBALANCE_TRIGGER,
            ),
            rebalance_shed: counter(
                r,
                "wsgate_rebalance_shed_total",
                "Connections this node closed with 1012 to rebalance the fleet.",
            ),
            rebalance_excess: gauge(
                r,
                "wsgate_rebalance_excess_connections",
                "Connections over this node's share of the fleet at its last check.",
            ),
            compression_bytes_in: counter(
                r,
                "wsgate_compression_bytes_in_total",
                "Frame bytes compressed for permessage-deflate (each publication once per node).",
            ),
            compression_bytes_out: counter(
                r,
                "wsgate_compression_bytes_out_total",
                "Frame bytes produced by permessage-deflate compression.",
            ),
            compression_seconds: register(
                r,
                Counter::new(
                    "wsgate_compression_seconds_total",
                    "Time spent compressing publications for permessage-deflate.",
                )
                .expect("valid metric"),
            ),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // process_* (CPU, memory, open/max file descriptors): a node's fd headroom
        // is its connection headroom. Only Linux has the collector.
        #[cfg(target_os = "linux")]
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process metrics registered once per registry");
        // wsgate_runtime_tasks: a leak of connections or timers shows as tasks.
        register(&m.registry, RuntimeCollector::new());
        m
    }

    /// Records which broker the node uses (`wsgate_broker_info{kind}`).
    pub fn set_broker_kind(&self, kind: &str) {
        self.broker_info.reset();
        self.broker_info.with_label_values(&[kind]).set(1);
    }

    /// Counts a disconnect; `reason` must be one of [`labels::DISCONNECT`].
    pub fn disconnected(&self, reason: &str) {
        self.disconnects.with_label_values(&[reason]).inc();
    }

    /// Adds `delta` (1 on open, -1 on close) to the open connections of `transport`,
    /// compressed (`deflate`) or not.
    pub fn transport_connection(&self, transport: &str, deflate: bool, delta: i64) {
        let compression = if deflate { "deflate" } else { "none" };
        self.transport_connections
            .with_label_values(&[transport, compression])
            .add(delta);
    }

    /// Brings the compression counters up to the process's totals (at scrape):
    /// bytes in, bytes out, nanoseconds.
    pub fn set_compression(&self, bytes_in: u64, bytes_out: u64, nanos: u64) {
        let catch_up = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        catch_up(&self.compression_bytes_in, bytes_in);
        catch_up(&self.compression_bytes_out, bytes_out);
        let secs = nanos as f64 / 1e9;
        let now = self.compression_seconds.get();
        if secs > now {
            self.compression_seconds.inc_by(secs - now);
        }
    }

    /// Counts `n` dropped messages; `reason` must be one of [`labels::DROPPED`].
    pub fn dropped(&self, reason: &str, n: u64) {
        if n > 0 {
            self.messages_dropped.with_label_values(&[reason]).inc_by(n);
        }
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
        m.disconnected("slow_consumer");
        m.received.client.inc();
        m.set_broker_kind("memory");
        let text = m.encode();
        assert!(text.contains("wsgate_connections 3"));
        assert!(text.contains("wsgate_disconnects_total{reason=\"slow_consumer\"} 1"));
        assert!(text.contains("wsgate_messages_received_total{source=\"client\"} 1"));
        assert!(text.contains("wsgate_build_info{version="));
        assert!(text.contains("wsgate_broker_info{kind=\"memory\"} 1"));
        #[cfg(target_os = "linux")]
        assert!(text.contains("process_open_fds"));
        assert!(text.contains("wsgate_runtime_tasks 0"));
    }

    #[test]
    fn every_known_label_value_exists_at_zero() {
        let text = Metrics::default().encode();
        for (family, label, values) in [
            ("wsgate_disconnects_total", "reason", labels::DISCONNECT),
            (
                "wsgate_connections_refused_total",
                "reason",
                labels::REFUSED,
            ),
            ("wsgate_messages_dropped_total", "reason", labels::DROPPED),
            ("wsgate_messages_received_total", "source", labels::SOURCE),
        ] {
            for v in values {
                let series = format!("{family}{{{label}=\"{v}\"}} 0");
                assert!(text.contains(&series), "missing {series}");
            }
        }
    }

    #[test]
    fn redis_metrics_exist_without_redis() {
        let text = Metrics::default().encode();
        for name in [
            "wsgate_redis_up 0",
            "wsgate_redis_reconnects_total 0",
            "wsgate_redis_resubscribed_topics_total 0",
            "wsgate_redis_errors_total 0",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
    }
}
