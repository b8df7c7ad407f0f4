//! What a listener lets in before any handshake completes.
//!
//! s2n-quic's default endpoint limits admit every connection attempt. A
//! destination serves one migration at a time (and a few settle queries),
//! so [`HandshakeLimits`] bounds the work an unauthenticated sender can
//! cause: above [`RETRY_ABOVE`] handshakes in flight a new attempt gets a
//! QUIC Retry (it must prove it can receive at its address before the
//! server keeps any state for it), above [`DROP_ABOVE`] it is dropped, and
//! above [`MAX_CONNECTIONS`] open connections new ones are dropped too.

use s2n_quic::provider::endpoint_limits::{ConnectionAttempt, Limiter, Outcome};

/// Handshakes in flight above which a new attempt must answer a Retry.
pub const RETRY_ABOVE: usize = 8;
/// Handshakes in flight above which a new attempt is dropped.
pub const DROP_ABOVE: usize = 64;
/// Open connections above which a new attempt is dropped: one migration,
/// a settle query or two and refusals of busy sources need far fewer.
pub const MAX_CONNECTIONS: usize = 256;

/// The listener's admission rule (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct HandshakeLimits;

impl Limiter for HandshakeLimits {
    fn on_connection_attempt(&mut self, info: &ConnectionAttempt) -> Outcome {
        outcome(info.inflight_handshakes, info.connection_count)
    }
}

/// The rule, for `inflight` handshakes and `connections` open.
fn outcome(inflight: usize, connections: usize) -> Outcome {
    if inflight > DROP_ABOVE || connections > MAX_CONNECTIONS {
        Outcome::drop()
    } else if inflight > RETRY_ABOVE {
        Outcome::retry()
    } else {
        Outcome::allow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_beyond_the_bounds_are_retried_then_dropped() {
        assert_eq!(outcome(0, 0), Outcome::allow());
        assert_eq!(outcome(RETRY_ABOVE, 1), Outcome::allow());
        assert_eq!(outcome(RETRY_ABOVE + 1, 1), Outcome::retry());
        assert_eq!(outcome(DROP_ABOVE + 1, 1), Outcome::drop());
        assert_eq!(outcome(0, MAX_CONNECTIONS + 1), Outcome::drop());
    }
}
