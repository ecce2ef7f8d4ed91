//! JWT authentication (docs/auth.md): which tokens are accepted, and what a verified
//! token allows.
//!
//! Each configured key is bound to exactly one algorithm (HS256 for `--jwt-secret`,
//! RS256 or ES256 for a PEM public key, the key's own `alg` in a JWKS). A token is
//! verified only with a key of its header's algorithm, so `alg: none` and algorithm
//! confusion (an HS256 token "signed" with the RSA public key) are refused: neither
//! names a configured (algorithm, key) pair.
//!
//! Keys come from `--jwt-secret`, `--jwt-public-key` (a PEM key or a JWKS file, read
//! once) and `--jwt-jwks-url` (fetched at start and kept fresh by [`jwks`]).

mod jwks;

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::security::acl::Acl;

/// The latest expiry honoured: the end of year 9999 (later `exp` values are clamped).
pub const MAX_EXP: u64 = 253_402_300_799;

/// Why a token was refused. The text is safe to show to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("a token is required (`?token=` or `Authorization: Bearer`)")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's algorithm or key is not accepted")]
    Algorithm,
    #[error("the token's signature is invalid")]
    Signature,
    #[error("the token's audience or issuer is not accepted")]
    Claims,
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's `topics` claim must be a list of valid topic names")]
    Topics,
}

/// A problem in the auth configuration (reported at start).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AuthConfigError(String);

/// The claims wsgate reads; others are ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    /// Topic patterns this client may subscribe to.
    #[serde(default)]
    subscribe: Vec<String>,
    /// Topic patterns this client may publish to.
    #[serde(default)]
    publish: Vec<String>,
    /// Topics the server subscribes the connection to at connect.
    #[serde(default)]
    topics: Vec<String>,
}

/// A verified client: who it is, what it may do, until when.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The token's `sub` (empty when absent).
    pub subject: String,
    /// The token's `exp`, as a time.
    pub expires: SystemTime,
    /// Topics it may subscribe to.
    pub subscribe: Acl,
    /// Topics it may publish to.
    pub publish: Acl,
    /// Topics the server subscribes it to right after `welcome` (the `topics`
    /// claim: server-side subscriptions, whatever the ACLs and namespace rules say).
    pub topics: Vec<Arc<str>>,
}

impl Identity {
    /// The anonymous client of a gateway without auth: may do anything, never expires.
    ///
    /// One identity that every such session shares (sessions hold identities behind
    /// an `Arc`, so an open gateway's idle connections carry 8 bytes for it, not the
    /// whole identity).
    pub fn anonymous() -> Arc<Self> {
        static ANONYMOUS: LazyLock<Arc<Identity>> = LazyLock::new(|| {
            Arc::new(Identity {
                subject: String::new(),
                expires: SystemTime::UNIX_EPOCH + Duration::from_secs(MAX_EXP),
                subscribe: Acl::any(),
                publish: Acl::any(),
                topics: Vec::new(),
            })
        });
        ANONYMOUS.clone()
    }
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Verifies client tokens against the configured keys.
pub struct Authenticator {
    /// Keys of the flags and files, fixed.
    keys: Vec<Key>,
    /// Keys of `--jwt-jwks-url`, refreshed in the background.
    remote: Option<jwks::RemoteKeys>,
    validation: Validation,
}

fn err(msg: impl Into<String>) -> AuthConfigError {
    AuthConfigError(msg.into())
}

fn jwk_alg(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    match jwk.common.key_algorithm {
        Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
        Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
        Some(KeyAlgorithm::HS256) => Some(Algorithm::HS256),
        Some(_) => None,
        // Without `alg`, the key type decides the one algorithm we accept for it.
        None => match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(_) => Some(Algorithm::ES256),
            _ => None,
        },
    }
}

/// The signature keys of a JWKS: those of an accepted algorithm (keys marked for
/// encryption, `"use":"enc"`, are skipped).
///
/// # Errors
/// A key that does not parse, or no usable key at all.
fn keys_from_jwks(set: &JwkSet) -> Result<Vec<Key>, String> {
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
            continue;
        }
        let Some(alg) = jwk_alg(jwk) else { continue };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            let kid = jwk.common.key_id.as_deref().unwrap_or("(no kid)");
            format!("bad key {kid}: {e}")
        })?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err("no RS256, ES256 or HS256 signature key".into());
    }
    Ok(keys)
}

fn load_public_key(path: &Path, keys: &mut Vec<Key>) -> Result<(), AuthConfigError> {
    let bytes = std::fs::read(path).map_err(|e| {
        err(format!(
            "cannot read --jwt-public-key {}: {e}",
            path.display()
        ))
    })?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let set: JwkSet = serde_json::from_slice(&bytes)
            .map_err(|e| err(format!("{} is not a JWKS: {e}", path.display())))?;
        keys.extend(keys_from_jwks(&set).map_err(|e| err(format!("{}: {e}", path.display())))?);
        return Ok(());
    }
    let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(&bytes) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(&bytes) {
        (Algorithm::ES256, k)
    } else {
        return Err(err(format!(
            "{} is neither an RSA nor an EC (P-256) public key in PEM, nor a JWKS",
            path.display()
        )));
    };
    keys.push(Key {
        kid: None,
        alg,
        key,
    });
    Ok(())
}

/// The `--jwt-jwks-url` key set, fetched once before this returns.
fn remote_keys(cfg: &Config, url: &str) -> Result<jwks::RemoteKeys, AuthConfigError> {
    let https = url.starts_with("https://");
    if !(https || url.starts_with("http://")) {
        return Err(err("--jwt-jwks-url must start with http:// or https://"));
    }
    if cfg.jwt_jwks_refresh < Duration::from_secs(1) {
        return Err(err("--jwt-jwks-refresh must be at least 1s"));
    }
    let ca = match &cfg.jwt_jwks_ca_file {
        None => None,
        Some(_) if !https => {
            return Err(err("--jwt-jwks-ca-file needs an https:// --jwt-jwks-url"));
        }
        Some(path) => Some(std::fs::read(path).map_err(|e| {
            err(format!(
                "cannot read --jwt-jwks-ca-file {}: {e}",
                path.display()
            ))
        })?),
    };
    jwks::RemoteKeys::start(url, ca.as_deref(), cfg.jwt_jwks_refresh)
        .map_err(|e| err(format!("--jwt-jwks-url {url}: no key set at start: {e}")))
}

impl Authenticator {
    /// The authenticator the configuration asks for, `None` when auth is off.
    ///
    /// With `--jwt-jwks-url`, this fetches the key set before it returns (blocking the
    /// calling thread for up to about 15 s) and starts a thread that refreshes it
    /// until the authenticator is dropped.
    ///
    /// # Errors
    /// When a key file cannot be read or parsed, or the JWKS URL gave no key set.
    pub fn from_config(cfg: &Config) -> Result<Option<Self>, AuthConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = &cfg.jwt_secret {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(path) = &cfg.jwt_public_key {
            load_public_key(path, &mut keys)?;
        }
        let remote = match &cfg.jwt_jwks_url {
            Some(url) => Some(remote_keys(cfg, url)?),
            None => None,
        };
        if keys.is_empty() && remote.is_none() {
            return Ok(None);
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms.clear();
        validation.leeway = cfg.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_exp = true;
        validation.set_required_spec_claims(&["exp"]);
        match &cfg.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.jwt_issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(Some(Authenticator {
            keys,
            remote,
            validation,
        }))
    }

    /// Verifies a token and reads its permissions.
    ///
    /// # Errors
    /// Why the token is refused.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Algorithm)?;
        let remote = self.remote.as_ref().map(jwks::RemoteKeys::keys);
        let candidates = || {
            self.keys
                .iter()
                .chain(remote.iter().flat_map(|r| r.iter()))
                .filter(|k| k.alg == header.alg)
        };
        // The key with the token's `kid`; else one without a `kid` (or, for a token
        // without one, the first key of its algorithm).
        let by_kid = header
            .kid
            .as_ref()
            .and_then(|kid| candidates().find(|k| k.kid.as_ref() == Some(kid)));
        let unknown_kid = header.kid.is_some() && by_kid.is_none();
        let key = by_kid.or_else(|| match header.kid {
            Some(_) => candidates().find(|k| k.kid.is_none()),
            None => candidates().next(),
        });
        if unknown_kid || key.is_none() {
            if let Some(remote) = &self.remote {
                // Perhaps a key the provider published after our last fetch: fetched
                // in the background (rate limited), for the client's next attempt.
                remote.request_refresh();
            }
        }
        let key = key.ok_or(AuthError::Algorithm)?;
        let mut validation = self.validation.clone();
        validation.algorithms = vec![key.alg];
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::Signature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        AuthError::Algorithm
                    }
                    ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => AuthError::Claims,
                    _ => AuthError::Malformed,
                }
            })?;
        let c = data.claims;
        let subject = c.sub.unwrap_or_default();
        if c.topics
            .iter()
            .any(|t| wsgate_fanout::validate_topic(t).is_err())
        {
            return Err(AuthError::Topics);
        }
        let mut topics: Vec<Arc<str>> = Vec::with_capacity(c.topics.len());
        for t in c.topics {
            if !topics.iter().any(|x| **x == *t) {
                topics.push(t.into());
            }
        }
        Ok(Identity {
            topics,
            subscribe: Acl::new(&c.subscribe, &subject),
            publish: Acl::new(&c.publish, &subject),
            subject,
            // Clamped: `SystemTime + Duration` panics on overflow, and a token with
            // an absurd `exp` must not crash anything.
            expires: UNIX_EPOCH + Duration::from_secs(c.exp.min(MAX_EXP)),
        })
    }
}

/// The token of an upgrade request: `?token=` first, else `Authorization: Bearer`.
pub fn token_from_request<B>(req: &http::Request<B>) -> Option<String> {
    if let Some(q) = req.uri().query() {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("token=") {
                return Some(percent_decode(v));
            }
        }
    }
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|v| v.trim().to_owned())
}

/// Decodes `%XX` escapes (JWTs are base64url and need none, but clients may escape).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Bytes, not `&str` slices: a `%` before a multi-byte character must not
        // slice inside it.
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A JWKS of HS256 keys: (kid, base64url secret, use).
    fn oct_jwks(keys: &[(&str, &str, Option<&str>)]) -> JwkSet {
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|(kid, k, usage)| {
                let mut v = serde_json::json!({"kty":"oct","alg":"HS256","kid":kid,"k":k});
                if let Some(u) = usage {
                    v["use"] = (*u).into();
                }
                v
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "keys": keys })).unwrap()
    }

    #[test]
    fn jwks_signature_keys_only() {
        let set = oct_jwks(&[
            ("enc", "c2VjcmV0LWE", Some("enc")),
            ("sig", "c2VjcmV0LWI", Some("sig")),
        ]);
        let keys = keys_from_jwks(&set).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("sig"));
        let only_enc = oct_jwks(&[("enc", "c2VjcmV0LWE", Some("enc"))]);
        assert!(keys_from_jwks(&only_enc).is_err_and(|e| e.contains("no RS256")));
    }

    #[test]
    fn the_tokens_kid_wins_over_a_key_without_kid() {
        // `--jwt-secret` (no kid) and a JWKS file with an HS256 key "k" of another secret:
        // a token with kid "k" is verified with the JWKS key, not the first HS256 key.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        // base64url("jwks-secret")
        let set = oct_jwks(&[("k", "andrcy1zZWNyZXQ", None)]);
        std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
        let cfg = Config::parse_from([
            "wsgate",
            "--jwt-secret",
            "flag-secret",
            "--jwt-public-key",
            path.to_str().unwrap(),
        ]);
        let auth = Authenticator::from_config(&cfg).unwrap().unwrap();
        let claims = serde_json::json!({"sub":"a","exp": MAX_EXP});
        let token = |kid: Option<&str>, secret: &[u8]| {
            let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
            h.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(secret))
                .unwrap()
        };
        assert!(auth.verify(&token(Some("k"), b"jwks-secret")).is_ok());
        // Without kid, or with an unknown one: the key without kid.
        assert!(auth.verify(&token(None, b"flag-secret")).is_ok());
        assert!(auth.verify(&token(Some("other"), b"flag-secret")).is_ok());
        assert_eq!(
            auth.verify(&token(Some("k"), b"flag-secret")).unwrap_err(),
            AuthError::Signature
        );
    }

    #[test]
    fn token_sources() {
        let r = http::Request::get("/ws?a=1&token=abc.d%2De")
            .body(())
            .unwrap();
        assert_eq!(token_from_request(&r).as_deref(), Some("abc.d-e"));
        let r = http::Request::get("/ws")
            .header("authorization", "Bearer xyz")
            .body(())
            .unwrap();
        assert_eq!(token_from_request(&r).as_deref(), Some("xyz"));
        let r = http::Request::get("/ws?token=%").body(()).unwrap();
        assert_eq!(token_from_request(&r).as_deref(), Some("%"));
        let r = http::Request::get("/ws?token=%C3%A9%").body(()).unwrap();
        assert_eq!(token_from_request(&r).as_deref(), Some("é%"));
        // A `%` before a multi-byte character (not reachable through `http::Uri`,
        // which refuses raw non-ASCII, but the decoder must not panic on it).
        assert_eq!(percent_decode("%éa%z"), "%éa%z");
        assert_eq!(
            token_from_request(&http::Request::get("/ws").body(()).unwrap()),
            None
        );
    }
}
