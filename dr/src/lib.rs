//! Disaster recovery for wanmig: what a DR site keeps of a VM that is
//! synced to it, and what the source keeps of its syncs.
//!
//! - [`epoch`]: each successful sync leaves a named, verified point in time
//!   (an *epoch*) of the replica in the destination's chunk store; epochs
//!   are listed, pruned by [`retention`] rules (Proxmox Backup's), written
//!   back out as images (for a drill or a failover), and serve as the base
//!   of the next incoming image.
//! - [`status`]: the source's record of its last good sync, and its age
//!   against a recovery point objective.
//! - [`probe`]: whether a source site still answers (before a failover).
//! - [`time`]: calendar periods in UTC.
//!
//! It knows chunk stores and images (`wanmig-dedup`, `wanmig-block-sync`),
//! not VMs or migrations: the destination driver calls [`epoch::record`]
//! after a sync, the CLI does the rest.

pub mod epoch;
pub mod probe;
pub mod retention;
pub mod status;
pub mod time;

/// Why a DR operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DrError {
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What was done, naming the file.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The chunk store failed.
    #[error("chunk store: {what}")]
    Store {
        /// What was done.
        what: String,
        /// The cause.
        #[source]
        source: wanmig_dedup::StoreError,
    },
    /// Something read back is not what it must be.
    #[error("{0}")]
    Invalid(String),
    /// No such epoch, disk or record.
    #[error("{0}")]
    NotFound(String),
}

/// The write-tracking map (`wanmig_vmm::tracking`) that syncs to the
/// destination with fingerprint `peer` keep on each disk: one per
/// destination, so that each knows what changed since its own last sync.
pub fn sync_map_name(peer: &str) -> String {
    format!("sync:{peer}")
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
