//! The node's security settings, and the checks every upgrade passes before it is
//! accepted: origin (403), token (401), per-IP limit (429) — in that order, so a
//! cross-site page learns nothing about tokens, and a refused client holds no slot.
//!
//! # Layout
//! - this file: [`Security`], built once from the configuration at start
//!   ([`Security::from_config`]), the upgrade checks ([`Security::admit`]) and the
//!   posture log ([`Security::log_posture`]: what is left open, said once at start).
//! - [`auth`]: JWT verification (HMAC, RSA/EC public keys, JWKS), identities.
//! - [`acl`]: topic permission patterns (`*`, `{sub}`).
//! - [`origin`]: the `Origin` allow-list.
//! - [`iplimit`]: connections per client IP.
//! - [`tls`]: the public listener's rustls config, reloaded on SIGHUP or file change.

pub mod acl;
pub mod auth;
pub mod iplimit;
pub mod origin;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, Request, StatusCode};
use tracing::warn;

use self::auth::{AuthError, Authenticator, Identity};
use self::iplimit::{IpSlot, PerIpLimit};
use self::origin::OriginPolicy;
use self::tls::Tls;
use crate::config::Config;

/// A security setting that cannot be used (reported at start).
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("auth: {0}")]
    Auth(#[from] self::auth::AuthConfigError),
    #[error("tls: {0}")]
    Tls(#[from] self::tls::TlsError),
}

/// Authentication, origin policy, per-IP limits and TLS of one node.
pub struct Security {
    /// `None`: clients are anonymous and may do anything.
    pub auth: Option<Authenticator>,
    pub origins: OriginPolicy,
    pub per_ip: Arc<PerIpLimit>,
    /// `None`: the public listener is plain TCP (`ws://`).
    pub tls: Option<Arc<Tls>>,
}

/// An upgrade request that passed every check.
pub(crate) struct Admitted {
    pub identity: Arc<Identity>,
    pub ip_slot: IpSlot,
}

/// Why an upgrade was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Origin,
    Auth(AuthError),
    PerIp,
}

impl Refusal {
    /// Status, bounded `wsgate_connections_refused_total` reason, message.
    pub(crate) fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Refusal::Origin => (
                StatusCode::FORBIDDEN,
                "origin",
                "this origin may not open WebSockets here".into(),
            ),
            Refusal::Auth(e) => (
                StatusCode::UNAUTHORIZED,
                match e {
                    AuthError::Missing => "auth_missing",
                    AuthError::Expired => "auth_expired",
                    _ => "auth_invalid",
                },
                e.to_string(),
            ),
            Refusal::PerIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "per_ip_limit",
                "too many connections from this address".into(),
            ),
        }
    }
}

impl Security {
    /// Loads keys and certificates named in the configuration.
    ///
    /// # Errors
    /// When a file is missing or unusable.
    pub fn from_config(cfg: &Config) -> Result<Self, SecurityError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => Some(Arc::new(Tls::new(c.clone(), k.clone())?)),
            _ => None,
        };
        Ok(Security {
            auth: Authenticator::from_config(cfg)?,
            origins: OriginPolicy::new(&cfg.allowed_origins),
            per_ip: PerIpLimit::new(cfg.max_connections_per_ip),
            tls,
        })
    }

    /// Says loudly, once at start, what is left open.
    pub fn log_posture(&self, cfg: &Config) {
        if self.auth.is_none() {
            warn!("AUTH IS OFF: any client may connect, subscribe to and publish on any topic (set --jwt-secret, --jwt-public-key or --jwt-jwks-url)");
        }
        if self.origins.allows_any() {
            warn!("no --allowed-origins: pages from any site may open WebSockets here");
        }
        if self.tls.is_none() {
            warn!(
                "no --tls-cert: serving plain ws:// (fine behind a TLS-terminating load balancer)"
            );
        }
        if cfg.api_key.is_none() {
            warn!("no --api-key: anyone who reaches the listener may POST /api/publish");
        }
        if cfg.echo {
            warn!("--echo is on: /echo echoes anything (conformance testing only)");
        }
    }

    /// The checks of an upgrade request, before anything is upgraded.
    pub(crate) fn admit<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<Admitted, Refusal> {
        let origin = req.headers().get(header::ORIGIN).map(|v| v.as_bytes());
        if !self.origins.allows(origin) {
            return Err(Refusal::Origin);
        }
        let identity = match &self.auth {
            None => Identity::anonymous(),
            Some(a) => {
                let token =
                    auth::token_from_request(req).ok_or(Refusal::Auth(AuthError::Missing))?;
                Arc::new(a.verify(&token).map_err(Refusal::Auth)?)
            }
        };
        let ip_slot = self.per_ip.try_acquire(peer.ip()).ok_or(Refusal::PerIp)?;
        Ok(Admitted { identity, ip_slot })
    }
}
