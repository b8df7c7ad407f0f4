//! Host identities: a self-signed certificate and its key, named by the
//! blake3 fingerprint of the certificate. Peers pin fingerprints; there is
//! no CA and no trust on first use.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of identity handling.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Generating the key or certificate failed.
    #[error("cannot generate a host identity")]
    Generate(#[source] rcgen::Error),
    /// Reading or writing an identity file failed.
    #[error("cannot access {path}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a PEM certificate or key.
    #[error("{path} holds no PEM {what}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// A fingerprint is not 64 hex digits.
    #[error("`{0}` is not a fingerprint (64 hex digits)")]
    BadFingerprint(String),
}

/// blake3 of a certificate's DER bytes: what peers pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert` (DER).
    pub fn of(cert: &[u8]) -> Self {
        Fingerprint(*blake3::hash(cert).as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let s = s.trim();
        let bad = || IdentityError::BadFingerprint(s.chars().take(80).collect());
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

/// A host's certificate and private key.
pub struct Identity {
    /// The certificate, DER.
    pub cert: CertificateDer<'static>,
    /// The private key, DER.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint()).finish_non_exhaustive()
    }
}

/// File names inside an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// The private key file (mode 0600).
pub const KEY_FILE: &str = "key.pem";

impl Identity {
    /// A new ECDSA P-256 key and a self-signed certificate for `name`.
    pub fn generate(name: &str) -> Result<(Identity, String, String), IdentityError> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).map_err(IdentityError::Generate)?;
        let cert_pem = ck.cert.pem();
        let key_pem = ck.signing_key.serialize_pem();
        let id = Identity {
            cert: ck.cert.der().clone(),
            key: PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                .map_err(|_| IdentityError::Pem { path: "(generated)".into(), what: "private key" })?,
        };
        Ok((id, cert_pem, key_pem))
    }

    /// Generates an identity into `dir` (created if missing); refuses to
    /// overwrite an existing key.
    pub fn create(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (id, cert_pem, key_pem) = Self::generate(name)?;
        let key_path = dir.join(KEY_FILE);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(io(&key_path))?;
        f.write_all(key_pem.as_bytes()).map_err(io(&key_path))?;
        let cert_path = dir.join(CERT_FILE);
        std::fs::write(&cert_path, cert_pem).map_err(io(&cert_path))?;
        Ok(id)
    }

    /// Loads the identity in `dir`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map(|b| (path.clone(), b)).map_err(|source| IdentityError::Io { path, source })
        };
        let (cert_path, cert) = read(CERT_FILE)?;
        let (key_path, key) = read(KEY_FILE)?;
        Ok(Identity {
            cert: CertificateDer::from_pem_slice(&cert)
                .map_err(|_| IdentityError::Pem { path: cert_path, what: "certificate" })?,
            key: PrivateKeyDer::from_pem_slice(&key)
                .map_err(|_| IdentityError::Pem { path: key_path, what: "private key" })?,
        })
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    pub(crate) fn clone_key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}
