//! `refresh` (a new token for a live session), and the task that closes a session
//! when its token expires.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use super::client::Client;
use super::outbox::Outbox;
use crate::close::Disconnect;
use crate::protocol::{self, CommandError, ErrorCode};
use crate::security::auth::Identity;

impl Client {
    /// `refresh`: a new token replaces the session's identity and moves its expiry.
    /// Topics the new token no longer allows are left.
    pub(super) fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<String, CommandError> {
        let Some(auth) = &self.gw.security.auth else {
            // Nothing expires without auth; accepting keeps clients that always
            // refresh working against an open gateway.
            return Ok(protocol::refreshed_reply(id));
        };
        let identity = auth
            .verify(token)
            .map_err(|e| CommandError::new(id, ErrorCode::Forbidden, e.to_string()))?;
        if identity.subject != self.identity.subject {
            return Err(CommandError::new(
                id,
                ErrorCode::Forbidden,
                "the new token is for another subject",
            ));
        }
        let revoked: Vec<Arc<str>> = self
            .topics
            .iter()
            .filter(|t| !identity.subscribe.allows(t))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            self.unsubscribe(None, revoked);
        }
        if let Some(expires) = &self.expires {
            set_deadline(expires, &identity, self.gw.config.jwt_leeway);
        }
        self.identity = Arc::new(identity);
        Ok(protocol::refreshed_reply(id))
    }
}

/// Stores the close deadline of `identity`'s token.
pub(super) fn set_deadline(
    expires: &tokio::sync::watch::Sender<u64>,
    identity: &Identity,
    leeway: Duration,
) {
    let exp = identity
        .expires
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let deadline = exp.saturating_add(leeway.as_secs());
    expires.send_replace(deadline.min(crate::security::auth::MAX_EXP));
}

/// Closes the session with 1008 when its token's deadline passes. A `refresh` moves
/// the deadline, later or earlier, and wakes the task to sleep again.
pub(super) async fn expiry(mut expires: tokio::sync::watch::Receiver<u64>, outbox: Arc<Outbox>) {
    loop {
        let deadline = UNIX_EPOCH + Duration::from_secs(*expires.borrow_and_update());
        let left = deadline
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left.is_zero() {
            outbox.close(Disconnect::TokenExpired);
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(left) => {}
            changed = expires.changed() => if changed.is_err() { return },
        }
    }
}
