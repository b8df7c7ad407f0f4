//! How the source makes a connection to the destination: at the start, and
//! again to resume after the link failed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;
use wanmig_transport::{Conn, Fingerprint, Identity, LinkTuning, TransportError, mem};

/// Makes connections to one destination.
#[derive(Debug)]
pub enum Connector {
    /// QUIC to `dest`, with this host's identity (read from its directory
    /// at each connection) and the destination's pinned fingerprint.
    Quic {
        /// The destination.
        dest: SocketAddr,
        /// This host's identity directory.
        identity: PathBuf,
        /// The destination's fingerprint.
        peer: Fingerprint,
        /// Window sizing and connection behaviour.
        tuning: LinkTuning,
    },
    /// In-memory pairs (tests): each connection's far end goes to the
    /// destination through `to_destination`, and its cutter to `links`.
    Mem {
        /// Where the destination takes new connections from.
        to_destination: mpsc::UnboundedSender<Conn>,
        /// The cutters of the pairs made, newest last.
        links: Arc<Mutex<Vec<mem::Link>>>,
    },
}

impl Connector {
    /// A new connection.
    pub async fn connect(&mut self) -> Result<Conn, TransportError> {
        match self {
            Connector::Quic { dest, identity, peer, tuning } => {
                let id = Identity::load(identity).map_err(|e| TransportError::Tls(format!("identity: {e}")))?;
                wanmig_transport::connect(*dest, &id, &[*peer], *tuning).await
            }
            Connector::Mem { to_destination, links } => {
                let (src, dst, link) = Conn::mem_pair();
                to_destination
                    .send(dst)
                    .map_err(|_| TransportError::Lost("the in-memory destination is gone".into()))?;
                links.lock().unwrap_or_else(PoisonError::into_inner).push(link);
                Ok(src)
            }
        }
    }
}
