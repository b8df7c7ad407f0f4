//! How to receive: what `wanmig receive` asks for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// How long a source may send nothing at all (no whole message on
    /// either stream) while it transfers before the attempt is dropped and
    /// the slot freed ([`DEFAULT_IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// How long an attempt whose link failed before `Ready` waits for its
    /// source to reconnect and resume it (0: it is discarded at once).
    pub resume_window: Duration,
}

/// The default of [`ReceiveOptions::resume_window`]: the source's own
/// default, so that a source that comes back in time finds its attempt.
pub const DEFAULT_RESUME_WINDOW: Duration = Duration::from_secs(600);

/// The default of [`ReceiveOptions::idle_timeout`]: 4 times the source's
/// own shortest wait for an answer (30 s, `ANSWER_TIMEOUT`): a source that
/// works is never silent that long (it sends data continuously, and waits
/// only for this host's answers), while one that keeps a connection alive
/// and sends nothing frees the slot within minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[cfg(test)]
impl ReceiveOptions {
    /// Options with everything under `dir`, for tests.
    pub fn for_tests(dir: &std::path::Path) -> Self {
        let (identity, _, _) = Identity::generate("test").expect("an identity");
        ReceiveOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            identity,
            peers: Vec::new(),
            dir: dir.into(),
            shared_disks: None,
            disk_dir: dir.into(),
            store: dir.into(),
            paused: false,
            taps: Vec::new(),
            tuning: LinkTuning::default(),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            resume_window: DEFAULT_RESUME_WINDOW,
        }
    }
}
