//! rustls configuration for mutual TLS 1.3 between pinned identities.
//!
//! Certificates are self-signed; each side accepts the peer only if the
//! blake3 fingerprint of its certificate is pinned, and still checks the
//! handshake signature with the certificate's key (possession of the key,
//! not just of the certificate).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use s2n_quic::provider::tls as quic_tls;

use crate::identity::{Fingerprint, Identity};

/// The last peer certificate a verifier refused, for error messages.
pub type Refusals = Arc<Mutex<Option<Fingerprint>>>;

#[derive(Debug)]
struct Pinned {
    pins: Vec<Fingerprint>,
    provider: Arc<CryptoProvider>,
    refused: Refusals,
}

impl Pinned {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fp = Fingerprint::of(cert);
        if self.pins.contains(&fp) {
            return Ok(());
        }
        if let Ok(mut r) = self.refused.lock() {
            *r = Some(fp);
        }
        Err(rustls::Error::General(format!("peer certificate {fp} is not pinned")))
    }
}

/// The handshake-signature checks both verifiers share: the certificate's
/// own key must have signed the handshake.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider.signature_verification_algorithms.supported_schemes()
        }
    };
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ServerCertVerified::assertion())
    }
    signature_checks!();
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity).map(|()| ClientCertVerified::assertion())
    }
    signature_checks!();
}

fn provider() -> Arc<CryptoProvider> {
    // TLS 1.3 suites only (QUIC requires 1.3).
    let base = rustls::crypto::aws_lc_rs::default_provider();
    let suites = base.cipher_suites.iter().copied().filter(|s| s.tls13().is_some()).collect();
    Arc::new(CryptoProvider { cipher_suites: suites, ..base })
}

/// A server (destination) configuration accepting clients pinned in `pins`.
pub fn server(
    id: &Identity,
    pins: &[Fingerprint],
    alpn: &[u8],
    refused: Refusals,
) -> Result<quic_tls::rustls::Server, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(Pinned { pins: pins.to_vec(), provider: provider.clone(), refused });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![id.cert.clone()], id.clone_key())?;
    cfg.max_fragment_size = None;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg.into())
}

/// A client (source) configuration accepting a server pinned in `pins`.
pub fn client(
    id: &Identity,
    pins: &[Fingerprint],
    alpn: &[u8],
    refused: Refusals,
) -> Result<quic_tls::rustls::Client, rustls::Error> {
    let provider = provider();
    let verifier = Arc::new(Pinned { pins: pins.to_vec(), provider: provider.clone(), refused });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![id.cert.clone()], id.clone_key())?;
    cfg.max_fragment_size = None;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg.into())
}
