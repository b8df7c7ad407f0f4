//! Errors of the transport, and what a failed connection is taken to mean.

use std::net::SocketAddr;
use std::time::Duration;

use wanmig_wire::DecodeError;

use crate::identity::Fingerprint;

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Setting up TLS failed.
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Starting the endpoint failed.
    #[error("cannot start a QUIC endpoint on {addr}: {reason}")]
    Start {
        /// Local address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The peer's certificate is not pinned here.
    #[error("refused the peer: its certificate {0} is not pinned")]
    PeerNotPinned(Fingerprint),
    /// The connection could not be established.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// Why (a refusal by the peer shows as a TLS alert).
        reason: String,
    },
    /// The connection or a stream failed.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The peer sent a frame that does not decode.
    #[error("bad frame from the peer")]
    Decode(#[from] DecodeError),
    /// No frame arrived in time.
    #[error("the peer sent nothing for {0:?}")]
    Timeout(Duration),
}

/// The application close code of a migration its source cancelled.
pub const CLOSE_CANCELLED: u32 = 12;
/// What a side whose peer closed the connection with [`CLOSE_CANCELLED`] hears.
pub const PEER_CANCELLED: &str = "the peer cancelled the migration";

/// A connection or stream error. With TLS 1.3 the client finishes its
/// handshake before the server has checked the client's certificate, so a
/// source that is not pinned at the destination learns it here, from the
/// first stream operation, as a TLS alert: say so.
pub(crate) fn lost(e: impl std::fmt::Display) -> TransportError {
    let s = e.to_string();
    if s.contains(&format!("application::Error({CLOSE_CANCELLED})")) && s.contains("remote") {
        return TransportError::Lost(PEER_CANCELLED.into());
    }
    if s.contains("HANDSHAKE_FAILURE") || s.contains("certificate") || s.contains("crypto") || s.contains("alert") {
        TransportError::Lost(format!("{s} (the peer refused our certificate: is our fingerprint pinned there?)"))
    } else {
        TransportError::Lost(s)
    }
}
