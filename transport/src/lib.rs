//! QUIC transport between migration hosts: s2n-quic on tokio, mutual TLS
//! 1.3 between self-signed identities pinned by fingerprint, ALPN
//! `wanmig/1`, framed streams carrying `wanmig-wire` messages, and tuning
//! for long fat pipes ([`LinkTuning`]): flow-control windows and UDP socket
//! buffers sized from bandwidth × RTT, BBR or Cubic congestion control
//! (BBR by default, by measurement: `benches/wan.rs`), keep-alives, and a
//! configurable idle timeout.
//!
//! - [`identity`]: host keys (`wanmig keygen`) and fingerprints.
//! - [`tls`]: the pinned-peer verifiers; [`peer`]: which pin a
//!   connection's peer matched.
//! - [`limits`]: what a listener admits before handshakes complete.
//! - [`endpoint`]: listener, connect, connections and their streams.
//! - [`frames`]: framed streams of `wanmig-wire` messages; [`error`].
//! - [`mem`]: an in-memory connection pair with a link that can be cut, for
//!   tests that drive both ends of a migration in one process.

pub mod endpoint;
pub mod error;
pub mod frames;
pub mod identity;
pub mod limits;
pub mod mem;
pub mod peer;
pub mod tls;

pub use endpoint::{CongestionControl, Conn, LinkTuning, Listener, connect};
pub use error::{CLOSE_CANCELLED, PEER_CANCELLED, TransportError};
pub use frames::{FrameReceiver, FrameSender};
pub use identity::{Fingerprint, Identity, IdentityError};

#[cfg(test)]
mod tests;
