//! QUIC transport (not built yet).
//!
//! This crate will own: s2n-quic endpoints on tokio with mutual TLS and pinned
//! peer keys (ALPN `wanmig/1`), a control stream plus bulk streams, flow-control
//! windows sized from bandwidth x RTT, and bandwidth caps.
