//! How to migrate: what `wanmig send` and `wanmig sync` ask for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use wanmig_transport::{Fingerprint, Identity, LinkTuning};
use wanmig_types::MigrationId;
use wanmig_wire::ChunkParams;

use crate::handover::TunnelRequest;

/// How to migrate.
#[derive(Debug)]
pub struct SendOptions {
    /// Destination.
    pub dest: SocketAddr,
    /// This host's identity.
    pub identity: Identity,
    /// Its directory (journalled, so `wanmig settle` can ask again).
    pub identity_dir: PathBuf,
    /// The destination's pinned fingerprint.
    pub peer: Fingerprint,
    /// Downtime budget (an operator may change it while the migration runs).
    pub downtime: Duration,
    /// Bandwidth cap, bytes/s (likewise).
    pub max_bandwidth: Option<f64>,
    /// With a cap: Clark et al.'s dynamic rate, starting here (bytes/s) and
    /// running each round at the last round's dirty rate plus this much.
    pub min_bandwidth: Option<f64>,
    /// Give up after this long (before commit).
    pub timeout: Duration,
    /// Window sizing.
    pub tuning: LinkTuning,
    /// XBZRLE cache size, bytes (0 disables delta encoding).
    pub xbzrle_cache: usize,
    /// zstd-compress page batches.
    pub compress: bool,
    /// How to cut disk images (the destination may answer with its own).
    pub chunking: ChunkParams,
    /// This host's chunk store: keep every chunk of the disks there, so a
    /// later move back here sends only what changed.
    pub store: Option<PathBuf>,
    /// Per disk, the earlier sync to this destination since which every
    /// block the guest wrote is known (the disk's write tracking): a
    /// destination that still holds that sync's replica gets only those
    /// blocks. Empty: every disk has a first copy.
    pub disk_bases: Vec<Option<DiskBase>>,
    /// Only copy the disks (`wanmig sync`); the VM keeps running here.
    pub sync: bool,
    /// Leave the network tunnel running after the commit ([`crate::handover`]).
    pub tunnel: Option<TunnelRequest>,
    /// Where the migration's journal goes (the VM's state directory).
    pub state_dir: PathBuf,
    /// How long a link that fails before the commit may stay down before
    /// the migration gives up (0: it fails at once).
    pub resume_window: Duration,
    /// Whether the guest may move before all its pages ([`PostcopyMode`]).
    pub postcopy: PostcopyMode,
    /// Send `Commit` right behind the device state, before the
    /// destination's `Ready`, and let it decide: a round trip less of
    /// downtime (the default). The source is paused and in doubt from the
    /// device state on, not only from the commit on; an outage there is
    /// resumed like one before the commit (the destination's answer to the
    /// `Resume` says whether it committed), and only a destination that
    /// stays unreachable for the resume window leaves it for `wanmig
    /// settle`. `false`: commit after `Ready` (the classic order).
    pub early_commit: bool,
}

/// What a disk's write tracking knows since an earlier sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskBase {
    /// The sync (its migration id).
    pub since: MigrationId,
    /// The blocks written since, one bit per 4 KiB (bit i = bytes
    /// `[4096 i, 4096 (i + 1))`).
    pub written: Vec<u64>,
}

/// When the guest moves in post-copy (`send --postcopy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostcopyMode {
    /// Pre-copy only: throttle, or give up, when it does not converge.
    Off,
    /// Pre-copy first; switch when converging would need the guest
    /// throttled past half its CPU (`wanmig_mem_sync::postcopy::HybridPolicy`).
    #[default]
    Auto,
    /// No memory pre-copy: the guest moves as soon as the disks are copied.
    Now,
}

impl std::str::FromStr for PostcopyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(PostcopyMode::Off),
            "auto" => Ok(PostcopyMode::Auto),
            "now" => Ok(PostcopyMode::Now),
            other => Err(format!("{other:?}: expected off, auto or now")),
        }
    }
}

impl SendOptions {
    /// Options with the defaults for everything but where, who and the
    /// state directory.
    pub fn new(
        dest: SocketAddr,
        identity: Identity,
        identity_dir: PathBuf,
        peer: Fingerprint,
        state_dir: PathBuf,
    ) -> Self {
        SendOptions {
            dest,
            identity,
            identity_dir,
            peer,
            downtime: Duration::from_millis(300),
            max_bandwidth: None,
            min_bandwidth: None,
            timeout: Duration::from_secs(600),
            tuning: LinkTuning::default(),
            xbzrle_cache: wanmig_mem_sync::encode::DEFAULT_CACHE_BYTES,
            compress: true,
            chunking: ChunkParams::DEFAULT,
            store: None,
            disk_bases: Vec::new(),
            sync: false,
            tunnel: None,
            state_dir,
            resume_window: Duration::from_secs(600),
            postcopy: PostcopyMode::default(),
            early_commit: true,
        }
    }
}
