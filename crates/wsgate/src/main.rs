//! `wsgate`: parses the configuration, sets up logging and wires the node together.
//!
//! # Layout
//! - `main`: settings → logging/tracing → file-descriptor limit → broker (in-memory, or
//!   Redis with `--redis-url` / `--redis-sentinel`), its topics made streams as the
//!   configured namespaces say → server → signals. Composition happens here and
//!   nowhere else; the crates hold the behaviour.
//! - [`settings`]: the command line (each crate's clap section), the `--config` file
//!   under it, and their checks.
//! - [`check_config`]: `wsgate check-config`, which checks the settings and exits.
//! - [`demo`]: the `--demo` ticker, and its chat room's `chat:*` stream.
//! - [`drain_cmd`]: `wsgate drain`, which asks a running node to drain (preStop hook).
//! - [`telemetry`]: the `tracing` subscriber: logs (human/JSON) and, when the
//!   `OTEL_*` variables ask for it, OTLP trace export.

mod check_config;
mod demo;
mod drain_cmd;
mod rebalance_cmd;
mod settings;
mod telemetry;

use std::process::ExitCode;
use std::time::Duration;

use tracing::{error, info, warn};
use wsgate_fanout::Node;
use wsgate_gateway::namespaces::describe;
use wsgate_gateway::security::Security;
use wsgate_gateway::{Gateway, Server};
use wsgate_metrics::Metrics;

use settings::Settings;

/// Raises the soft open-files limit to the hard limit: every connection is a file.
fn raise_nofile() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => info!(limit = n, "open files limit"),
        Err(e) => warn!(error = %e, "could not raise the open files limit"),
    }
}

async fn wait_for_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn run(settings: Settings, security: Security) -> anyhow::Result<()> {
    raise_nofile();
    let Settings {
        gateway: cfg,
        redis,
        namespaces,
    } = settings;
    let namespaces = if cfg.demo {
        demo::with_chat_stream(namespaces)
    } else {
        namespaces
    }
    .with_compression(cfg.compression);
    for ns in describe(&namespaces) {
        info!("namespace {ns}");
    }
    let metrics = Metrics::default();
    let max_publication = cfg.max_publication_size();
    // Automatic rebalancing checks the fleet as often as the node list is refreshed.
    let rebalance_every = match (cfg.rebalance_auto, &redis) {
        (Some(false), _) | (None, None) => None,
        (_, Some(redis)) => Some(redis.presence_timeout() / 6),
        (Some(true), None) => Some(Duration::from_secs(5)),
    };
    let node = match redis {
        None => Node::in_memory_with(metrics, max_publication, namespaces, cfg.history_memory),
        Some(redis) => redis
            .node_with(metrics, max_publication, namespaces)
            .map_err(|e| anyhow::anyhow!("redis: {e}"))?,
    };
    let gw = Gateway::new(cfg, node, security);
    gw.security.log_posture(&gw.config);
    if let Some(every) = rebalance_every {
        tokio::spawn(wsgate_gateway::rebalance::run_auto(gw.clone(), every));
    }
    if gw.config.demo {
        info!("demo mode: page at / and a ticker on demo.ticker");
        tokio::spawn(demo::run_ticker(gw.clone()));
    }
    if let Some(tls) = &gw.security.tls {
        // Certificate rotation without restart: SIGHUP or a change of the files.
        tokio::spawn(tls.clone().watch(gw.shutdown.clone()));
    } else if let Ok(mut hup) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    {
        // SIGHUP must not kill a node that has nothing to reload.
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                info!("SIGHUP ignored: no TLS certificate to reload");
            }
        });
    }
    let server = Server::bind(gw.clone()).await?;
    let signals = {
        let gw = gw.clone();
        tokio::spawn(async move {
            match wait_for_signal().await {
                Ok(sig) => {
                    info!(signal = sig, "starting graceful drain");
                    gw.start_drain();
                    // A second signal stops at once.
                    if let Ok(sig) = wait_for_signal().await {
                        warn!(signal = sig, "second signal: stopping now");
                        gw.shutdown.cancel();
                    }
                }
                Err(e) => error!(error = %e, "cannot listen for signals"),
            }
        })
    };
    server.run().await;
    signals.abort();
    info!("bye");
    Ok(())
}

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    match argv.next().as_deref() {
        Some("drain") => return drain_cmd::run(argv),
        Some("rebalance") => return rebalance_cmd::run(argv),
        Some("check-config") => return check_config::run(argv),
        _ => {}
    }
    let settings = match settings::load(std::env::args_os().collect()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = &settings.gateway;
    let telemetry = match telemetry::init(
        cfg.log_format,
        &cfg.log_level,
        cfg.node_id.as_deref().unwrap_or(""),
        cfg.otlp_ca_file.as_deref(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wsgate: {e}");
            return ExitCode::from(2);
        }
    };
    // Keys and certificates are read here, once, so a bad one is a clear exit 2 (and a
    // JWKS URL is fetched with logging already on).
    let security = match Security::from_config(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wsgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(settings, security)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("wsgate: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    // After the runtime: the exporter's blocking HTTP client must not run on it.
    telemetry.shutdown();
    code
}
