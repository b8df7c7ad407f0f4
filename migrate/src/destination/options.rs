//! How to receive: what `wanmig receive` asks for.

use std::net::SocketAddr;
use std::path::PathBuf;

use wanmig_transport::{Fingerprint, Identity, LinkTuning};

/// How to receive.
#[derive(Debug)]
pub struct ReceiveOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// This host's identity.
    pub identity: Identity,
    /// Sources allowed to migrate here.
    pub peers: Vec<Fingerprint>,
    /// Where the received VM's control socket, console log, configuration
    /// and journal go.
    pub dir: PathBuf,
    /// Use the source's disk images at their paths, which must lie under
    /// this directory (storage both hosts see) instead of copying them.
    pub shared_disks: Option<PathBuf>,
    /// Where copied disk images go.
    pub disk_dir: PathBuf,
    /// This host's chunk store (created if missing).
    pub store: PathBuf,
    /// Leave the VM paused after the commit.
    pub paused: bool,
    /// This host's TAP interfaces for the VM's NICs, in the VM's NIC order.
    pub taps: Vec<String>,
    /// Window sizing.
    pub tuning: LinkTuning,
}
