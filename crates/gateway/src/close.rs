//! Why a connection ended: one table for the close code a client sees, the reason
//! text in the close frame, and the `reason` label of `wsgate_disconnects_total`.

/// Every way a session can end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client sent a close frame.
    ClientClose,
    /// The connection ended without a close frame (reset, EOF).
    ClientGone,
    /// No frame of any kind from the client within the heartbeat timeout.
    HeartbeatTimeout,
    /// The outbound queue overflowed, or the socket took no bytes for too long.
    SlowConsumer,
    /// Sustained command rate over the limit.
    RateLimit,
    /// A message over the maximum size.
    TooBig,
    /// The node is draining.
    Drain,
    /// The client broke the WebSocket protocol (bad framing, bad close code…).
    ProtocolError,
    /// Text that is not UTF-8.
    InvalidUtf8,
    /// The client's token expired and was not refreshed in time.
    TokenExpired,
    /// `POST /api/disconnect` (4010 unless the call named another code; its close
    /// frame carries the call's code and reason).
    ServerApi,
    /// The node holds more than its share of the fleet's connections and asks the
    /// client to reconnect elsewhere now (`POST /api/rebalance`, or the automatic
    /// rebalancing after a scale-out).
    Rebalance,
    /// An I/O error on our side.
    Error,
}

impl Disconnect {
    /// The close code sent to the client (docs/protocol.md, "Close codes").
    pub fn code(self) -> u16 {
        match self {
            Disconnect::ClientClose | Disconnect::ClientGone => 1000,
            Disconnect::HeartbeatTimeout => 4000,
            Disconnect::SlowConsumer => 4008,
            Disconnect::RateLimit => 4029,
            Disconnect::TooBig => 1009,
            Disconnect::Drain => 1001,
            Disconnect::ProtocolError => 1002,
            Disconnect::InvalidUtf8 => 1007,
            Disconnect::TokenExpired => 1008,
            Disconnect::ServerApi => 4010,
            Disconnect::Rebalance => 1012,
            Disconnect::Error => 1011,
        }
    }

    /// The human-readable reason in the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            Disconnect::ClientClose | Disconnect::ClientGone => "bye",
            Disconnect::HeartbeatTimeout => "heartbeat timeout",
            Disconnect::SlowConsumer => "slow consumer: outbound queue overflowed",
            Disconnect::RateLimit => "rate limit abuse",
            Disconnect::TooBig => "message too big",
            Disconnect::Drain => "node draining: reconnect",
            Disconnect::ProtocolError => "protocol error",
            Disconnect::InvalidUtf8 => "invalid UTF-8",
            Disconnect::TokenExpired => "token expired",
            Disconnect::ServerApi => "disconnected by the server",
            Disconnect::Rebalance => "rebalancing: reconnect",
            Disconnect::Error => "internal error",
        }
    }

    /// The bounded `reason` label of `wsgate_disconnects_total`.
    pub fn label(self) -> &'static str {
        match self {
            Disconnect::ClientClose => "client_close",
            Disconnect::ClientGone => "client_gone",
            Disconnect::HeartbeatTimeout => "heartbeat_timeout",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::RateLimit => "rate_limit",
            Disconnect::TooBig => "too_big",
            Disconnect::Drain => "drain",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::TokenExpired => "token_expired",
            Disconnect::ServerApi => "server_disconnect",
            Disconnect::Rebalance => "rebalance",
            Disconnect::Error => "error",
        }
    }

    /// Whether queued messages are thrown away rather than written before the close
    /// frame (the client is not reading them anyway, or must not get more).
    pub fn discards_queue(self) -> bool {
        matches!(
            self,
            Disconnect::SlowConsumer
                | Disconnect::HeartbeatTimeout
                | Disconnect::ClientGone
                | Disconnect::TokenExpired
        )
    }

    /// Whether the server sends a close frame of its own (the client's close is
    /// echoed instead, and a vanished client gets nothing).
    pub fn sends_close(self) -> bool {
        !matches!(self, Disconnect::ClientClose | Disconnect::ClientGone)
    }
}

/// The longest reconnect hint a close reason carries.
pub const MAX_RETRY_HINT_MS: u64 = 60_000;

/// A close reason with a reconnect hint: `"<reason>; retry=<ms>"` (docs/protocol.md,
/// "Reconnecting"). The client waits `ms` (plus its own jitter) before reconnecting.
/// `ms` is capped at [`MAX_RETRY_HINT_MS`]; the result is at most 123 bytes when
/// `reason` is at most 100.
pub fn with_retry_hint(reason: &str, retry_ms: u64) -> String {
    format!("{reason}; retry={}", retry_ms.min(MAX_RETRY_HINT_MS))
}

/// The reconnect hint in a close reason made by [`with_retry_hint`], if any.
pub fn retry_hint(reason: &str) -> Option<u64> {
    let (_, ms) = reason.rsplit_once("; retry=")?;
    if ms.is_empty() || ms.len() > 7 || !ms.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ms.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_pre_created_in_the_metrics() {
        let all = [
            Disconnect::ClientClose,
            Disconnect::ClientGone,
            Disconnect::HeartbeatTimeout,
            Disconnect::SlowConsumer,
            Disconnect::RateLimit,
            Disconnect::TooBig,
            Disconnect::Drain,
            Disconnect::ProtocolError,
            Disconnect::InvalidUtf8,
            Disconnect::TokenExpired,
            Disconnect::ServerApi,
            Disconnect::Rebalance,
            Disconnect::Error,
        ];
        for d in all {
            assert!(
                wsgate_metrics::labels::DISCONNECT.contains(&d.label()),
                "{} missing from wsgate_metrics::labels::DISCONNECT",
                d.label()
            );
        }
    }

    const ALL: [Disconnect; 13] = [
        Disconnect::ClientClose,
        Disconnect::ClientGone,
        Disconnect::HeartbeatTimeout,
        Disconnect::SlowConsumer,
        Disconnect::RateLimit,
        Disconnect::TooBig,
        Disconnect::Drain,
        Disconnect::ProtocolError,
        Disconnect::InvalidUtf8,
        Disconnect::TokenExpired,
        Disconnect::ServerApi,
        Disconnect::Rebalance,
        Disconnect::Error,
    ];

    #[test]
    fn every_code_sent_is_in_the_protocol_documents_table() {
        let doc = include_str!("../../../docs/protocol.md");
        let table = doc
            .split("## Close codes")
            .nth(1)
            .expect("a close codes section");
        let documented: Vec<u16> = table
            .lines()
            .skip_while(|l| !l.starts_with("| code"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l[1..].split('|').next().unwrap().trim().parse().unwrap())
            .collect();
        assert!(documented.len() >= 10, "{documented:?}");
        for d in ALL {
            assert!(
                documented.contains(&d.code()),
                "{d:?} closes with {}",
                d.code()
            );
        }
    }

    #[test]
    fn close_frames_we_send_are_valid_on_the_wire() {
        for d in ALL.into_iter().filter(|d| d.sends_close()) {
            // Codes a peer may send (RFC 6455 §7.4): 1005, 1006 and 1015 are never
            // put in a frame; 1004 is reserved; 1012 (service restart) is in IANA's
            // registry of codes a peer may send.
            assert!(
                matches!(d.code(), 1000..=1003 | 1007..=1012 | 4000..=4999),
                "{d:?}: {}",
                d.code()
            );
            // The whole reason fits in a control frame beside the code.
            assert!(!d.reason().is_empty() && d.reason().len() <= 123, "{d:?}");
            assert_ne!(d.code(), 1000, "{d:?} is not a normal closure");
        }
    }

    #[test]
    fn a_client_that_left_gets_no_close_and_loses_its_queue() {
        assert!(!Disconnect::ClientClose.sends_close());
        assert!(!Disconnect::ClientGone.sends_close());
        // A client that closed still gets what was queued before its close;
        // one that vanished cannot.
        assert!(!Disconnect::ClientClose.discards_queue());
        assert!(Disconnect::ClientGone.discards_queue());
        // A draining node and a rejected message flush the queue first.
        for d in [
            Disconnect::Drain,
            Disconnect::Rebalance,
            Disconnect::TooBig,
            Disconnect::RateLimit,
        ] {
            assert!(d.sends_close() && !d.discards_queue(), "{d:?}");
        }
    }

    #[test]
    fn retry_hints_round_trip_and_fit_a_close_frame() {
        let r = with_retry_hint(Disconnect::Drain.reason(), 250);
        assert_eq!(r, "node draining: reconnect; retry=250");
        assert!(r.starts_with(Disconnect::Drain.reason()));
        assert_eq!(retry_hint(&r), Some(250));
        assert_eq!(retry_hint(&with_retry_hint("x", u64::MAX)), Some(60_000));
        assert!(with_retry_hint(&"r".repeat(100), u64::MAX).len() <= 123);
        for bad in [
            "node draining: reconnect",
            "a; retry=",
            "a; retry=1x",
            "a; retry=-1",
        ] {
            assert_eq!(retry_hint(bad), None, "{bad}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<&str> = ALL.iter().map(|d| d.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ALL.len());
    }
}
