//! Keys from a JWKS URL (`--jwt-jwks-url`), kept fresh.
//!
//! The key set is fetched once at start (a failure is a configuration error: the node
//! would refuse every token), then on a thread of its own: every `--jwt-jwks-refresh`,
//! and early when a token names a key that is not in the set (an identity provider
//! rotating its keys publishes the new one before it signs with it). Early fetches are
//! rate limited (at most one per [`MIN_EARLY_INTERVAL`]; a request inside the window
//! waits for its end, it is not dropped), so random `kid`s cannot turn clients into a
//! flood against the provider. A fetch that fails (unreachable, HTTP error, not a JWKS,
//! no usable key) keeps the last good key set, logs a warning and is tried again after
//! at most [`RETRY_AFTER`].
//!
//! Verification never waits for the network: it reads the current set behind a lock
//! held for a pointer copy. The token that triggered an early fetch is refused; the
//! client's next attempt finds the key.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{keys_from_jwks, Key};

/// Time allowed for one fetch (connect, TLS, response).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The least time between two fetches asked for by unknown `kid`s.
pub const MIN_EARLY_INTERVAL: Duration = Duration::from_secs(30);
/// After a failed fetch, the next one comes after this (or the refresh interval, if
/// shorter).
pub const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The largest JWKS document accepted.
const MAX_BODY: usize = 1 << 20;

struct Shared {
    keys: RwLock<Arc<Vec<Key>>>,
    /// An early fetch is asked for and not done yet.
    wanted: AtomicBool,
    wake: Notify,
}

/// The key set of a JWKS URL, refreshed in the background until dropped.
pub(super) struct RemoteKeys {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for RemoteKeys {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RemoteKeys {
    /// Fetches the key set (waiting for it: at most [`FETCH_TIMEOUT`] and a little), then
    /// keeps refreshing it every `refresh`. `ca` (PEM) replaces the system roots.
    ///
    /// # Errors
    /// The first fetch failed, or the client cannot be built; the text says why.
    pub(super) fn start(
        url: &str,
        ca: Option<&[u8]>,
        refresh: Duration,
    ) -> Result<RemoteKeys, String> {
        let client = client(ca)?;
        let shared = Arc::new(Shared {
            keys: RwLock::new(Arc::new(Vec::new())),
            wanted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let stop = CancellationToken::new();
        let (first_tx, first) = std::sync::mpsc::sync_channel(1);
        let worker = Worker {
            shared: shared.clone(),
            client,
            url: url.to_owned(),
            refresh,
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("wsgate-jwks".into())
            .spawn(move || {
                // A runtime of its own: the caller may or may not be on one (`main`
                // loads keys before its runtime starts), and the refresh must not
                // depend on it.
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker.run(first_tx)),
                    Err(e) => {
                        let _ = first_tx.send(Err(format!("cannot start its runtime: {e}")));
                    }
                }
            })
            .map_err(|e| format!("cannot start the refresh thread: {e}"))?;
        let remote = RemoteKeys { shared, stop };
        match first.recv_timeout(FETCH_TIMEOUT + Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(remote),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("no answer in time".into()),
        }
    }

    /// The current key set.
    pub(super) fn keys(&self) -> Arc<Vec<Key>> {
        self.shared.keys.read().clone()
    }

    /// Asks for an early fetch (a token named a key that is not in the set).
    pub(super) fn request_refresh(&self) {
        if !self.shared.wanted.swap(true, Ordering::AcqRel) {
            self.shared.wake.notify_one();
        }
    }
}

fn client(ca: Option<&[u8]>) -> Result<reqwest::Client, String> {
    // reqwest is built without a crypto provider of its own: it takes the process
    // default, which is this workspace's ring (a no-op when one is installed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT / 2)
        .user_agent(concat!("wsgate/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = ca {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("bad --jwt-jwks-ca-file: {e}"))?;
        if certs.is_empty() {
            return Err("--jwt-jwks-ca-file holds no PEM certificate".into());
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))
}

/// An error and its causes, for the log (reqwest's own text is only the outermost).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let mut response = client
        .get(url)
        .header(
            http::header::ACCEPT,
            "application/jwk-set+json, application/json",
        )
        .send()
        .await
        .map_err(|e| chain(&e.without_url()))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("the server answered HTTP {status}"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| chain(&e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("the JWKS is larger than {MAX_BODY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse(body: &[u8]) -> Result<Vec<Key>, String> {
    let set: JwkSet =
        serde_json::from_slice(body).map_err(|e| format!("the answer is not a JWKS: {e}"))?;
    keys_from_jwks(&set)
}

struct Worker {
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: String,
    refresh: Duration,
    stop: CancellationToken,
}

impl Worker {
    /// One fetch, bounded, ending early when the owner is dropped (`None` then).
    async fn fetch(&self) -> Option<Result<(Vec<u8>, Vec<Key>), String>> {
        tokio::select! {
            () = self.stop.cancelled() => None,
            r = fetch(&self.client, &self.url) => Some(r.and_then(|body| {
                let keys = parse(&body)?;
                Ok((body, keys))
            })),
        }
    }

    async fn run(self, first: std::sync::mpsc::SyncSender<Result<(), String>>) {
        let mut last_body = match self.fetch().await {
            None => return,
            Some(Err(e)) => {
                let _ = first.send(Err(e));
                return;
            }
            Some(Ok((body, keys))) => {
                info!(url = %self.url, keys = keys.len(), refresh = ?self.refresh, "JWKS loaded");
                *self.shared.keys.write() = Arc::new(keys);
                let _ = first.send(Ok(()));
                body
            }
        };
        let mut next = Instant::now() + self.refresh;
        let mut last_early: Option<Instant> = None;
        let mut wanted = false;
        loop {
            let early_at =
                wanted.then(|| last_early.map_or_else(Instant::now, |t| t + MIN_EARLY_INTERVAL));
            let at = early_at.map_or(next, |e| e.min(next));
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = self.shared.wake.notified(), if !wanted => {
                    wanted = true;
                    continue;
                }
                () = tokio::time::sleep_until(at) => {}
            }
            let early = early_at.is_some_and(|e| e <= next);
            if early {
                last_early = Some(Instant::now());
            }
            match self.fetch().await {
                None => return,
                Some(Ok((body, keys))) => {
                    if body == last_body {
                        debug!(url = %self.url, early, "JWKS unchanged");
                    } else {
                        let kids: Vec<&str> =
                            keys.iter().filter_map(|k| k.kid.as_deref()).collect();
                        info!(url = %self.url, early, keys = keys.len(), kids = ?kids, "JWKS refreshed: the key set changed");
                        *self.shared.keys.write() = Arc::new(keys);
                        last_body = body;
                    }
                    next = Instant::now() + self.refresh;
                }
                Some(Err(e)) => {
                    warn!(url = %self.url, error = %e, "JWKS refresh failed: keeping the last good key set");
                    next = Instant::now() + self.refresh.min(RETRY_AFTER);
                }
            }
            wanted = false;
            self.shared.wanted.store(false, Ordering::Release);
        }
    }
}
