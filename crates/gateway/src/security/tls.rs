//! Native TLS for the public listener, with certificate reload without restart.
//!
//! The current `rustls::ServerConfig` sits behind a lock and each new connection takes
//! a clone of its `Arc`: a reload (SIGHUP, or the files' modification time changing —
//! cert-manager rewrites its secret volume) affects new connections only, and a bad
//! new certificate is logged and ignored, so the node keeps serving with the old one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// A certificate or key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The public listener's TLS settings, reloadable.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    /// Modification times of (cert, key) when last loaded.
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Reads a PEM chain and key into a server configuration.
///
/// # Errors
/// When a file cannot be read or holds no usable certificate or key.
pub fn load(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError(format!("cannot read --tls-cert {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("bad PEM in {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError(format!("no usable private key in {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError(format!("certificate and key do not fit: {e}")))?;
    // WebSocket upgrades are HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Tls {
    /// Loads the certificate and key.
    ///
    /// # Errors
    /// See [`load`].
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, TlsError> {
        let stamps = (mtime(&cert), mtime(&key));
        let config = load(&cert, &key)?;
        Ok(Tls {
            cert,
            key,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }

    /// Reloads the files now.
    ///
    /// # Errors
    /// When the new files are unusable; the old certificate stays in force.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = (mtime(&self.cert), mtime(&self.key));
        let config = load(&self.cert, &self.key)?;
        *self.current.write() = Arc::new(config);
        *self.stamps.lock() = stamps;
        info!(cert = %self.cert.display(), "TLS certificate reloaded");
        Ok(())
    }

    /// Reloads when either file's modification time changed since the last load.
    pub fn reload_if_changed(&self) {
        let now = (mtime(&self.cert), mtime(&self.key));
        if *self.stamps.lock() == now {
            return;
        }
        if let Err(e) = self.reload() {
            // Mid-rotation the key may not match the cert yet: keep the old pair and
            // try again at the next tick (the stamps were not updated).
            warn!(error = %e, "TLS reload failed; keeping the current certificate");
        }
    }

    /// Watches the files (every [`WATCH_INTERVAL`]) and reloads on SIGHUP, until
    /// `stop` is cancelled. The SIGHUP handler is installed before this returns, so a
    /// SIGHUP right after start cannot hit the default action (terminate).
    pub fn watch(
        self: Arc<Self>,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGHUP; file watching only");
                None
            }
        };
        async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => self.reload_if_changed(),
                    Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => {
                        info!("SIGHUP: reloading the TLS certificate");
                        if let Err(e) = self.reload() {
                            warn!(error = %e, "TLS reload failed; keeping the current certificate");
                        }
                    }
                }
            }
        }
    }
}
