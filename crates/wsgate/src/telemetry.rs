//! Logs and traces: one `tracing` subscriber with up to two layers.
//!
//! - Logs: human-readable or JSON lines on stderr, filtered by `--log-level`.
//! - Traces: exported over OTLP/HTTP (protobuf) when the standard
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//!   the other standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`,
//!   `OTEL_BSP_*`…) are read by the OpenTelemetry SDK itself. Unset, there is no
//!   exporter and no layer: nothing is recorded beyond what the logs need.
//! - `https://` endpoints: rustls with the ring provider (no OpenSSL), verifying the
//!   collector against the system roots, or only against `--otlp-ca-file` (else the
//!   standard `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE`) for a private CA.
//!
//! Spans are per connection (`session`) and per HTTP request (`http.request`), never
//! per delivered message. The batch exporter runs on its own thread with a blocking
//! HTTP client, so the export never runs on (or blocks) the async workers.

use std::env;
use std::path::{Path, PathBuf};
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithHttpConfig;
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

/// The CA file that verifies the collector, and the setting it came from (for errors):
/// the flag, else the standard variables, the traces one first.
fn ca_file(flag: Option<&Path>) -> Option<(&'static str, PathBuf)> {
    if let Some(p) = flag {
        return Some(("--otlp-ca-file", p.to_path_buf()));
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]
    .into_iter()
    .find_map(|var| {
        let v = env::var(var).ok()?;
        let v = v.trim();
        (!v.is_empty()).then(|| (var, PathBuf::from(v)))
    })
}

/// The export timeout, as the SDK reads it (milliseconds; default 10 s): the client we
/// hand the exporter must not cut requests the exporter itself would still wait for.
fn export_timeout() -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|var| env::var(var).ok()?.trim().parse::<u64>().ok())
    .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// The exporter's HTTP client: blocking (it runs on the exporter's own thread), TLS by
/// rustls with ring, trusting the system roots or only the CA file.
fn http_client(ca_flag: Option<&Path>) -> anyhow::Result<reqwest::blocking::Client> {
    // reqwest is built without a crypto provider of its own: it takes the process
    // default, which is this workspace's ring (a no-op when one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::blocking::Client::builder().timeout(export_timeout());
    if let Some((setting, path)) = ca_file(ca_flag) {
        let pem = std::fs::read(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {setting} {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("{setting} {}: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("{setting} {} holds no PEM certificate", path.display());
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| anyhow::anyhow!("OTLP HTTP client: {e}"))
}

fn provider(node_id: &str, ca_file: Option<&Path>) -> anyhow::Result<SdkTracerProvider> {
    check_protocol()?;
    // Protocol, endpoint, headers and timeout come from the OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http_client(ca_file)?)
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
/// `otlp_ca_file` is `--otlp-ca-file`.
///
/// # Errors
/// An invalid `level` filter, an unreadable CA file, or an OTLP configuration the
/// exporter refuses.
pub fn init(
    format: LogFormat,
    level: &str,
    node_id: &str,
    otlp_ca_file: Option<&Path>,
) -> anyhow::Result<Telemetry> {
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
        Some(provider(node_id, otlp_ca_file)?)
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
