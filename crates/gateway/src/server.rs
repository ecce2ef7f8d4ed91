//! Listeners, routing and the accept loop.
//!
//! Every TCP connection is served by hyper's HTTP/1 server; `GET /ws` upgrades to a
//! WebSocket session (see [`crate::session`]); `GET /sse` streams the same session as
//! Server-Sent Events (see [`crate::sse`]). The accept loop survives running out
//! of file descriptors: it counts, logs and backs off instead of dying.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::upgrade::UpgradeFut;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn, Instrument};

use crate::gateway::Gateway;
use crate::http_api::{self, Body};
use crate::server_api;
use crate::session::{self, Mode, Start};

/// `EMFILE` and `ENFILE`: out of file descriptors (per process, system-wide).
const OUT_OF_FDS: [i32; 2] = [24, 23];
/// Pending connections the kernel may queue for us (capped by `somaxconn`).
const BACKLOG: u32 = 4096;
/// Largest HTTP request head we read (hyper's minimum is 8 KiB).
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long the end of a drain waits for sessions to finish their close handshakes.
const FINISH_GRACE: Duration = Duration::from_secs(5);

/// Which endpoints a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `/ws` and the HTTP API.
    Public,
    /// Health, readiness, metrics, drain.
    Admin,
    /// Both (`--admin-listen` equal to `--listen`).
    Both,
}

/// A bound gateway, ready to run.
pub struct Server {
    gw: Arc<Gateway>,
    public: TcpListener,
    admin: Option<TcpListener>,
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

impl Server {
    /// Binds the listeners named in the gateway's configuration.
    ///
    /// # Errors
    /// When an address cannot be bound.
    pub async fn bind(gw: Arc<Gateway>) -> io::Result<Server> {
        let cfg = &gw.config;
        let public = bind(cfg.listen).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", cfg.listen))
        })?;
        let shared = cfg.admin_listen == cfg.listen && cfg.listen.port() != 0;
        let admin = if shared {
            None
        } else {
            Some(bind(cfg.admin_listen).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {}: {e}", cfg.admin_listen),
                )
            })?)
        };
        Ok(Server { gw, public, admin })
    }

    /// Where WebSocket clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.public.local_addr().expect("bound")
    }

    /// Where health and metrics are served.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .as_ref()
            .unwrap_or(&self.public)
            .local_addr()
            .expect("bound")
    }

    /// Serves until the drain has finished (or [`Gateway::shutdown`] is cancelled).
    pub async fn run(self) {
        let gw = self.gw;
        info!(listen = %self.public.local_addr().expect("bound"), node = %gw.node_id, broker = gw.node.broker_kind(), "wsgate serving");
        let role = if self.admin.is_some() {
            Role::Public
        } else {
            Role::Both
        };
        let mut loops = vec![
            tokio::spawn(accept_loop(gw.clone(), self.public, role)),
            tokio::spawn(crate::session::registry::run(gw.clone())),
        ];
        if let Some(admin) = self.admin {
            info!(listen = %admin.local_addr().expect("bound"), "admin endpoints serving");
            loops.push(tokio::spawn(accept_loop(gw.clone(), admin, Role::Admin)));
        }
        tokio::select! {
            _ = gw.drain_started.cancelled() => {
                gw.drain_sessions().await;
                let deadline = tokio::time::Instant::now() + FINISH_GRACE;
                while gw.connections() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                info!(left = gw.connections(), "drain finished");
                // Out of the cluster's node list now rather than when the lease ends.
                match tokio::time::timeout(FINISH_GRACE, gw.node.leave()).await {
                    Ok(Ok(())) => debug!("left the cluster's node list"),
                    Ok(Err(e)) => warn!(error = %e, "could not leave the node list"),
                    Err(_) => warn!("leaving the node list timed out"),
                }
            }
            _ = gw.shutdown.cancelled() => {}
        }
        gw.shutdown.cancel();
        for l in loops {
            let _ = l.await;
        }
        gw.tracker.close();
        if tokio::time::timeout(FINISH_GRACE, gw.tracker.wait())
            .await
            .is_err()
        {
            warn!("some connection tasks did not finish in time");
        }
    }
}

async fn accept_loop(gw: Arc<Gateway>, listener: TcpListener, role: Role) {
    loop {
        let accepted = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let sndbuf = gw.config.socket_send_buffer;
                if sndbuf > 0 && role != Role::Admin {
                    if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf) {
                        debug!(error = %e, "could not set SO_SNDBUF");
                    }
                }
                let gw2 = gw.clone();
                match (&gw.security.tls, role) {
                    // The admin listener stays plain: probes and scrapers are local.
                    (Some(_), Role::Public | Role::Both) => {
                        gw.tracker.spawn(serve_tls(gw2, stream, peer, role));
                    }
                    _ => {
                        gw.tracker.spawn(serve_connection(gw2, stream, peer, role));
                    }
                }
            }
            Err(e) => {
                gw.metrics.accept_errors.inc();
                if e.raw_os_error().is_some_and(|c| OUT_OF_FDS.contains(&c)) {
                    // Sessions closing will free descriptors; retrying at once would
                    // spin. The pending connections wait in the backlog meanwhile.
                    warn!(error = %e, "out of file descriptors; pausing accept for 100ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } else {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// The TLS handshake (bounded by the handshake timeout, like the HTTP headers), then
/// HTTP as usual.
async fn serve_tls(gw: Arc<Gateway>, stream: TcpStream, peer: SocketAddr, role: Role) {
    let acceptor = gw.security.tls.as_ref().expect("tls configured").acceptor();
    let handshake = tokio::time::timeout(gw.config.handshake_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        r = handshake => r,
        _ = gw.shutdown.cancelled() => return,
    };
    match tls {
        Ok(Ok(tls)) => serve_connection(gw, tls, peer, role).await,
        Ok(Err(e)) => debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => debug!(%peer, "TLS handshake timed out"),
    }
}

async fn serve_connection<I>(gw: Arc<Gateway>, stream: I, peer: SocketAddr, role: Role)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let gw = gw.clone();
        service_fn(move |req| {
            let gw = gw.clone();
            async move {
                // `/sse` answers a streaming body; everything else a whole one.
                if role != Role::Admin && req.uri().path() == "/sse" {
                    return Ok::<_, Infallible>(crate::sse::serve(gw, req, peer));
                }
                Ok(route(gw, req, peer, role).await.map(Either::Left))
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(gw.config.handshake_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                debug!(error = %e, %peer, "http connection ended with an error");
            }
        }
        _ = gw.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}

fn not_found() -> Response<Body> {
    http_api::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// The bounded route name of a request path, for spans (never the raw path, which a
/// client chooses).
fn route_name(path: &str) -> &'static str {
    match path {
        "/ws" => "/ws",
        "/api/publish" => "/api/publish",
        "/api/history" => "/api/history",
        "/api/presence" => "/api/presence",
        "/api/presence_stats" => "/api/presence_stats",
        "/api/disconnect" => "/api/disconnect",
        "/api/subscribe" => "/api/subscribe",
        "/api/unsubscribe" => "/api/unsubscribe",
        "/api/info" => "/api/info",
        "/api/rebalance" => "/api/rebalance",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        "/drain" => "/drain",
        "/wsgate.js" => "/wsgate.js",
        "/" => "/",
        _ => "other",
    }
}

/// Serves one HTTP request inside an `http.request` span (exported over OTLP when
/// tracing export is on); the WebSocket session that may follow has its own span.
async fn route(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    role: Role,
) -> Response<Body> {
    let route = route_name(req.uri().path());
    // Probes and scrapes come every few seconds: their spans are at debug, so they
    // are neither logged nor exported at the default levels.
    let span = if matches!(route, "/healthz" | "/readyz" | "/metrics") {
        tracing::debug_span!(
            "http.request",
            otel.name = %format_args!("{} {route}", req.method()),
            otel.kind = "server",
            http.request.method = %req.method(),
            http.route = route,
            client.address = %peer.ip(),
            http.response.status_code = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            "http.request",
            otel.name = %format_args!("{} {route}", req.method()),
            otel.kind = "server",
            http.request.method = %req.method(),
            http.route = route,
            client.address = %peer.ip(),
            http.response.status_code = tracing::field::Empty,
        )
    };
    let metrics = gw.metrics.clone();
    let response = route_inner(gw, req, peer, role)
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    if let Some(endpoint) = route.strip_prefix("/api/") {
        metrics
            .api_requests
            .with_label_values(&[endpoint, response.status().as_str()])
            .inc();
    }
    response
}

async fn route_inner(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
    role: Role,
) -> Response<Body> {
    let public = role != Role::Admin;
    let admin = role != Role::Public;
    match (req.method(), req.uri().path()) {
        (_, "/ws") if public => upgrade(gw, req, peer, Mode::PubSub),
        (_, "/echo") if public && gw.config.echo => upgrade(gw, req, peer, Mode::Echo),
        (_, "/api/publish") if public => http_api::publish(gw, req).await,
        (_, "/api/history") if public => http_api::history(gw, req).await,
        (_, "/api/presence") if public => server_api::presence(gw, req, false).await,
        (_, "/api/presence_stats") if public => server_api::presence(gw, req, true).await,
        (_, "/api/disconnect") if public => server_api::command(gw, req, "disconnect").await,
        (_, "/api/subscribe") if public => server_api::command(gw, req, "subscribe").await,
        (_, "/api/unsubscribe") if public => server_api::command(gw, req, "unsubscribe").await,
        (_, "/api/info") if public => server_api::info(gw, req).await,
        (_, "/api/rebalance") if public => server_api::rebalance(gw, req).await,
        (&Method::GET, "/wsgate.js") if public => crate::assets::client_js(),
        (&Method::GET, "/") if public && gw.config.demo => crate::assets::page(),
        (&Method::GET, "/healthz") if admin => http_api::healthz(),
        (&Method::GET, "/readyz") if admin => http_api::readyz(&gw),
        (&Method::GET, "/metrics") if admin => http_api::metrics(&gw),
        (&Method::POST, "/drain") if admin => http_api::drain(&gw),
        _ => not_found(),
    }
}

pub(crate) fn refuse(
    gw: &Gateway,
    status: StatusCode,
    reason: &str,
    message: &str,
) -> Response<Body> {
    gw.metrics
        .connections_refused
        .with_label_values(&[reason])
        .inc();
    http_api::error(status, reason, message)
}

/// 503 `overloaded`: the upgrade bucket is empty; come back in `retry_ms`.
pub(crate) fn overloaded(gw: &Gateway, retry_ms: u64) -> Response<Body> {
    gw.metrics
        .connections_refused
        .with_label_values(&["overloaded"])
        .inc();
    let mut r = http_api::json(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "{{\"error\":\"overloaded\",\"message\":\"node is admitting connections at its \
             upgrade rate: retry later\",\"retry_after_ms\":{retry_ms}}}"
        ),
    );
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(retry_ms.div_ceil(1000).max(1)),
    );
    // The client comes back later on a new connection: during a storm, refused
    // clients must not hold the node's sockets in between.
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    r
}

/// The first refusals of a request for a long-lived connection (`/ws`, `/sse`), before
/// any work is done for it: a draining node sends it elsewhere, and — token checks
/// cost CPU — a storm of reconnects is admitted at the configured rate, the rest told
/// when to retry.
pub(crate) fn turn_away(gw: &Gateway) -> Option<Response<Body>> {
    if gw.is_draining() {
        return Some(refuse(
            gw,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is draining: connect to another node",
        ));
    }
    if let Some(bucket) = &gw.upgrades {
        if let Err(wait) = bucket.try_acquire() {
            return Some(overloaded(gw, crate::admission::with_jitter(wait)));
        }
    }
    None
}

/// `GET /ws`: checks, then upgrades and hands the connection to a session task.
fn upgrade(
    gw: Arc<Gateway>,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    mode: Mode,
) -> Response<Body> {
    if req.method() != Method::GET || !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = refuse(
            &gw,
            StatusCode::UPGRADE_REQUIRED,
            "not_websocket",
            "this endpoint speaks WebSocket",
        );
        r.headers_mut().insert(
            http::header::UPGRADE,
            "websocket".parse().expect("valid header"),
        );
        return r;
    }
    if let Some(r) = turn_away(&gw) {
        return r;
    }
    let admitted = match gw.security.admit(&req, peer) {
        Ok(a) => a,
        Err(refusal) => {
            let (status, reason, message) = refusal.parts();
            let mut r = refuse(&gw, status, reason, &message);
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    "Bearer".parse().expect("valid header"),
                );
            }
            return r;
        }
    };
    let Some(slot) = gw.try_reserve_connection() else {
        return refuse(
            &gw,
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections",
            "node is at its connection limit",
        );
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(x) => x,
        Err(e) => {
            return refuse(
                &gw,
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                &e.to_string(),
            )
        }
    };
    // permessage-deflate, when enabled and offered (declined offers: served plain).
    let accepted = gw
        .config
        .compression
        .then(|| crate::ws::deflate::negotiate(req.headers()))
        .flatten();
    let gw2 = gw.clone();
    let start = Start {
        peer,
        slot,
        admitted,
        mode,
        deflate: accepted.as_ref().map(|a| a.deflate).unwrap_or_default(),
        prefix: Bytes::new(),
    };
    gw.tracker.spawn(run_upgraded(gw2, fut, Box::new(start)));
    let (mut parts, _) = response.into_parts();
    if let Some(a) = accepted {
        parts
            .headers
            .insert(http::header::SEC_WEBSOCKET_EXTENSIONS, a.response);
    }
    Response::from_parts(parts, Full::default())
}

/// The upgrade, then the session: a chain of futures rather than an async fn, so
/// that once the session runs the task holds the session's future and nothing else
/// (an async fn would keep its arguments and the taken-apart stream beside it, in
/// memory every idle connection keeps for its whole life). `start` is boxed: it is
/// needed only until the session is set up.
fn run_upgraded(
    gw: Arc<Gateway>,
    fut: UpgradeFut,
    start: Box<Start>,
) -> impl std::future::Future<Output = ()> + Send {
    use futures_util::future::{ready, Either, FutureExt as _};
    fut.then(move |upgraded| {
        let upgraded = match upgraded {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(e) => {
                debug!(error = %e, peer = %start.peer, "upgrade did not complete");
                return Either::Right(Either::Right(ready(())));
            }
        };
        // The stream is taken apart by a plain function: a TLS stream is kilobytes.
        // `unbox` frees the box now.
        let (prefix, halves) = into_halves(upgraded);
        let start = Start {
            prefix,
            ..unbox(start)
        };
        match halves {
            Halves::Tcp(read, write) => {
                Either::Left(Either::Left(session::run(gw, read, write, start)))
            }
            Halves::Tls(read, write) => {
                Either::Left(Either::Right(session::run(gw, read, write, start)))
            }
            Halves::Other(read, write) => {
                Either::Right(Either::Left(session::run(gw, read, write, start)))
            }
        }
    })
}

// Taking the box by value is the point: it is freed on return.
#[allow(clippy::boxed_local)]
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// An upgraded connection's read and write halves.
enum Halves {
    Tcp(OwnedReadHalf, OwnedWriteHalf),
    Tls(
        ReadHalf<TlsStream<TcpStream>>,
        WriteHalf<TlsStream<TcpStream>>,
    ),
    Other(
        ReadHalf<TokioIo<hyper::upgrade::Upgraded>>,
        WriteHalf<TokioIo<hyper::upgrade::Upgraded>>,
    ),
}

/// Takes an upgraded connection apart: the bytes hyper read past the upgrade request
/// (the reader starts with them), and the halves.
fn into_halves(upgraded: hyper::upgrade::Upgraded) -> (Bytes, Halves) {
    // Plain TCP: take the socket back from hyper and split it without a lock.
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let (read, write) = parts.io.into_inner().into_split();
            (parts.read_buf, Halves::Tcp(read, write))
        }
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            // TLS: a TLS stream cannot be split without a lock; tokio's split
            // takes one only for the instant of each read or write call.
            Ok(parts) => {
                let (read, write) = tokio::io::split(parts.io.into_inner());
                (parts.read_buf, Halves::Tls(read, write))
            }
            Err(upgraded) => {
                let (read, write) = tokio::io::split(TokioIo::new(upgraded));
                (Bytes::new(), Halves::Other(read, write))
            }
        },
    }
}
