//! QUIC transport between migration hosts: s2n-quic on tokio, mutual TLS
//! 1.3 between self-signed identities pinned by fingerprint, ALPN
//! `wanmig/1`, flow-control windows sized from bandwidth × RTT, and framed
//! streams carrying `wanmig-wire` messages.
//!
//! - [`identity`]: host keys (`wanmig keygen`) and fingerprints.
//! - [`tls`]: the pinned-peer verifiers; [`peer`]: which pin a
//!   connection's peer matched.
//! - [`limits`]: what a listener admits before handshakes complete.
//! - [`endpoint`]: listener, connect, control and bulk streams.
//! - [`mem`]: an in-memory connection pair with a link that can be cut, for
//!   tests that drive both ends of a migration in one process.

pub mod endpoint;
pub mod identity;
pub mod limits;
pub mod mem;
pub mod peer;
pub mod tls;

pub use endpoint::{
    CLOSE_CANCELLED, Conn, FrameReceiver, FrameSender, LinkTuning, Listener, PEER_CANCELLED, TransportError, connect,
};
pub use identity::{Fingerprint, Identity, IdentityError};

#[cfg(test)]
mod tests;
