//! Logs and traces: one `tracing` subscriber with up to two layers.
//!
//! - Logs: human-readable or JSON lines on stderr, filtered by `--log-level`.
//! - Traces: exported over OTLP/HTTP (protobuf) when the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//!   the other standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`,
//!   `OTEL_BSP_*`…) are read by the OpenTelemetry SDK itself. Unset, there is no
//!   exporter and no layer: nothing is recorded beyond what the logs need.
//!
//! Spans are per connection (`session`) and per HTTP request (`http.request`), never
//! per delivered message. The batch exporter runs on its own thread with a blocking
//! HTTP client, so the export never runs on (or blocks) the async workers.

use std::env;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;
use wsgate_gateway::LogFormat;

/// What the export layer sees: our spans at info and above, never the HTTP client's
/// own (exporting spans about exporting spans would feed itself).
const EXPORT_FILTER: &str = "info,reqwest=off,hyper=off,hyper_util=off,h2=off,opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off";

/// Holds the trace pipeline, if any; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Whether the environment asks for OTLP trace export.
pub fn otlp_requested() -> bool {
    let set = |k: &str| env::var(k).is_ok_and(|v| !v.trim().is_empty());
    let disabled = env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn resource(node_id: &str) -> Resource {
    let mut b = Resource::builder();
    let named = env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.is_empty())
        || env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    if !named {
        b = b.with_service_name("wsgate");
    }
    b.with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", node_id.to_owned()),
    ])
    .build()
}

/// Only OTLP/HTTP with protobuf is built in (no gRPC stack): refuse anything else
/// clearly rather than post protobuf to a gRPC port.
fn check_protocol() -> anyhow::Result<()> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Ok(p) = env::var(var) {
            let p = p.trim();
            if !p.is_empty() && p != "http/protobuf" {
                anyhow::bail!(
                    "{var}={p} is not supported: wsgate exports traces with OTLP over \
                     HTTP (`http/protobuf`, the collector's port 4318)"
                );
            }
        }
    }
    Ok(())
}

fn provider(node_id: &str) -> anyhow::Result<SdkTracerProvider> {
    check_protocol()?;
    // Protocol, endpoint, headers and timeout come from the OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP trace exporter: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource(node_id))
        .build())
}

/// Installs the global subscriber. Call before the async runtime starts (the OTLP
/// HTTP client is a blocking one and must not be built on a runtime thread).
///
/// # Errors
/// An invalid `level` filter, or an OTLP configuration the exporter refuses.
pub fn init(format: LogFormat, level: &str, node_id: &str) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level `{level}`: {e}"))?;
    let logs = match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);

    let provider = if otlp_requested() {
        Some(provider(node_id)?)
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("wsgate"))
            .with_filter(EnvFilter::new(EXPORT_FILTER))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP/HTTP");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    /// Exports the spans still buffered. Call outside the async runtime.
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("wsgate: OTLP trace export shutdown: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_filter_parses() {
        EnvFilter::try_new(EXPORT_FILTER).unwrap();
    }
}
