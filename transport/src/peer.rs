//! Which pinned identity a connection's peer proved it holds.
//!
//! The pinned verifiers ([`crate::tls`]) refuse any certificate whose
//! fingerprint is not pinned; this event subscriber records, per
//! connection, the fingerprint of the certificate the peer presented once
//! the handshake is complete (the TLS exporter is ready only after the
//! peer's certificate was verified and its handshake signature checked).
//! [`crate::Conn::peer_fingerprint`] reads it, so a destination knows which
//! of its pinned sources it is talking to.

use s2n_quic::provider::event::{ConnectionInfo, ConnectionMeta, Subscriber, events};

use crate::identity::Fingerprint;

/// The event subscriber that records each connection's peer certificate.
#[derive(Debug, Default, Clone, Copy)]
pub struct PeerCert;

/// Per connection: the peer's fingerprint, once the handshake is done.
#[derive(Debug, Default, Clone, Copy)]
pub struct PeerFingerprint(pub Option<Fingerprint>);

impl Subscriber for PeerCert {
    type ConnectionContext = PeerFingerprint;

    fn create_connection_context(&mut self, _meta: &ConnectionMeta, _info: &ConnectionInfo) -> PeerFingerprint {
        PeerFingerprint(None)
    }

    fn on_tls_exporter_ready(
        &mut self,
        context: &mut PeerFingerprint,
        _meta: &ConnectionMeta,
        event: &events::TlsExporterReady,
    ) {
        // The first certificate of the chain is the peer's own (the only
        // one a wanmig identity presents).
        if let Some(cert) = event.session.peer_cert_chain_der().ok().and_then(|c| c.into_iter().next()) {
            context.0 = Some(Fingerprint::of(&cert));
        }
    }
}
