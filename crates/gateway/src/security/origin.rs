//! The browser origin allow-list: refuses cross-site WebSocket hijacking.
//!
//! Browsers send `Origin` on every WebSocket handshake and scripts cannot forge it;
//! other clients usually send none. So a request without `Origin` is let through
//! (auth still applies), and one with an `Origin` not on the list is refused with 403.

/// Allowed origins, compared case-insensitively on `scheme://host[:port]`.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Exact origins, lowercased, without a trailing `/`.
    exact: Vec<String>,
    /// `(scheme://, .suffix)` of `scheme://*.suffix` entries.
    wildcard: Vec<(String, String)>,
    any: bool,
}

impl OriginPolicy {
    /// From `--allowed-origins` entries; an empty list or a `*` entry allows any.
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Self {
        let mut p = OriginPolicy::default();
        for e in entries {
            let e = e.as_ref().trim().trim_end_matches('/').to_ascii_lowercase();
            if e.is_empty() {
                continue;
            }
            if e == "*" {
                p.any = true;
            } else if let Some((scheme, rest)) = e.split_once("://*.") {
                p.wildcard
                    .push((format!("{scheme}://"), format!(".{rest}")));
            } else {
                p.exact.push(e);
            }
        }
        p.any |= p.exact.is_empty() && p.wildcard.is_empty();
        p
    }

    /// Whether any origin is allowed (no list configured).
    pub fn allows_any(&self) -> bool {
        self.any
    }

    /// Whether a request with this `Origin` header value (or none) may upgrade.
    pub fn allows(&self, origin: Option<&[u8]>) -> bool {
        let Some(origin) = origin else { return true };
        if self.any {
            return true;
        }
        let Ok(origin) = std::str::from_utf8(origin) else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        if self.exact.contains(&origin) {
            return true;
        }
        self.wildcard.iter().any(|(scheme, suffix)| {
            origin.strip_prefix(scheme.as_str()).is_some_and(|host| {
                // A subdomain of the suffix: non-empty label before it, no path.
                host.len() > suffix.len()
                    && host.ends_with(suffix.as_str())
                    && !host.contains('/')
                    && !host.contains('@')
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list() {
        let p = OriginPolicy::new(&["https://app.example.com/", "https://*.example.org"]);
        assert!(p.allows(None));
        assert!(p.allows(Some(b"https://app.example.com")));
        assert!(p.allows(Some(b"HTTPS://APP.example.com")));
        assert!(!p.allows(Some(b"http://app.example.com")));
        assert!(!p.allows(Some(b"https://app.example.com.evil.net")));
        assert!(!p.allows(Some(b"https://evil.net")));
        assert!(!p.allows(Some(b"null")));
        assert!(p.allows(Some(b"https://a.example.org")));
        assert!(p.allows(Some(b"https://a.b.example.org")));
        // The port is part of the origin: a wildcard entry names its port too.
        assert!(!p.allows(Some(b"https://a.example.org:8443")));
        let ported = OriginPolicy::new(&["https://*.example.org:8443"]);
        assert!(ported.allows(Some(b"https://a.example.org:8443")));
        assert!(!p.allows(Some(b"https://example.org")));
        assert!(!p.allows(Some(b"https://evilexample.org")));
        assert!(!p.allows(Some(b"http://a.example.org")));
        assert!(!p.allows(Some(&[0xff, 0xfe])));
    }

    #[test]
    fn empty_or_star_allows_all() {
        assert!(OriginPolicy::new::<&str>(&[]).allows(Some(b"https://x")));
        assert!(OriginPolicy::new(&["*"]).allows(Some(b"https://x")));
        assert!(!OriginPolicy::new(&["https://a"]).allows_any());
    }
}
