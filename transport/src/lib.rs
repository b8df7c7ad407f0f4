//! QUIC transport between migration hosts: s2n-quic on tokio, mutual TLS
//! 1.3 between self-signed identities pinned by fingerprint, ALPN
//! `wanmig/1`, framed streams carrying `wanmig-wire` messages, and tuning
//! for long fat pipes ([`LinkTuning`]): flow-control windows and UDP socket
//! buffers sized from bandwidth × RTT, BBR or Cubic congestion control
//! (BBR by default, by measurement: `benches/wan.rs`), keep-alives, and a
//! configurable idle timeout.
//!
//! - [`identity`]: host keys (`wanmig keygen`) and fingerprints.
//! - [`tls`]: the pinned-peer verifiers.
//! - [`endpoint`]: listener, connect, control and bulk streams.
//! - [`mem`]: an in-memory connection pair with a link that can be cut, for
//!   tests that drive both ends of a migration in one process.

pub mod endpoint;
pub mod identity;
pub mod mem;
pub mod tls;

pub use endpoint::{
    CLOSE_CANCELLED, CongestionControl, Conn, FrameReceiver, FrameSender, LinkTuning, Listener, PEER_CANCELLED,
    TransportError, connect,
};
pub use identity::{Fingerprint, Identity, IdentityError};

#[cfg(test)]
mod tests;
