//! What a migration reports while it runs and when it ends.

use serde::Serialize;

/// A progress event (sent to `wanmig send` as JSON).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Connected and agreed with the destination.
    Connected {
        /// Peer address.
        peer: String,
    },
    /// A pre-copy round ended.
    Round {
        /// Round number.
        round: u32,
        /// Pages sent in it.
        pages: u64,
        /// Pages still dirty.
        dirty_pages: u64,
        /// Bytes left to send (dirty pages at the round's bytes per page).
        bytes_left: u64,
        /// Guest dirty rate, bytes/s.
        dirty_rate: f64,
        /// Link rate, bytes/s.
        link_rate: f64,
        /// Predicted downtime if stopping now, ms.
        predicted_downtime_ms: f64,
        /// vCPU throttle, percent.
        throttle: u8,
        /// Seconds since the start.
        elapsed_s: f64,
    },
    /// Disk copy progress.
    Disk {
        /// "copy" (the first copy) or "round" (written extents).
        phase: String,
        /// Image bytes copied (or extent bytes sent).
        bytes_done: u64,
        /// Image bytes in all (or extent bytes still pending).
        bytes_total: u64,
        /// Chunks sent so far.
        chunks_sent: u64,
        /// Chunks the destination already held.
        chunks_present: u64,
        /// Seconds since the disk copy began.
        elapsed_s: f64,
    },
    /// The guest is paused for the final copy.
    StopAndCopy {
        /// Pages to send.
        dirty_pages: u64,
    },
    /// Waiting for the destination to verify and commit.
    Committing,
}

/// Bytes on the wire, by kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct WireBytes {
    /// Frames carrying pages, after compression.
    pub pages: u64,
    /// Pages sent whole, before compression.
    pub raw_pages: u64,
    /// Delta-encoded pages.
    pub delta_pages: u64,
    /// Zero pages (markers only).
    pub zero_pages: u64,
    /// Page-batch bytes before compression.
    pub pages_uncompressed: u64,
    /// vCPU and device state.
    pub state: u64,
    /// Disk manifests, chunks, written extents and digests.
    pub disk: u64,
    /// Everything, including control messages.
    pub total: u64,
}

/// The downtime, phase by phase (ms from the pause).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct DowntimeBreakdown {
    /// Last dirty pages sent and acknowledged.
    pub last_pages_ms: f64,
    /// vCPU and device state captured and sent.
    pub state_ms: f64,
    /// Until the destination said Ready (it loads and verifies the state).
    pub ready_ms: f64,
    /// Until the destination acknowledged the commit (it runs the VM).
    pub commit_ack_ms: f64,
}

/// One pre-copy round: what it sent and what the guest dirtied meanwhile
/// (the writable working set of Clark et al.).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RoundStat {
    /// Round number.
    pub round: u32,
    /// Pages sent.
    pub pages_sent: u64,
    /// Pages dirtied while it ran.
    pub dirty_pages: u64,
    /// Disk bytes (written extents) sent.
    pub disk_bytes: u64,
    /// Disk bytes the guest wrote while it ran.
    pub disk_dirty_bytes: u64,
    /// How long it took, ms.
    pub ms: f64,
}

/// The final summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Wall time from connect to the end, ms.
    pub total_ms: f64,
    /// Guest paused (source pause to destination's acknowledgement), ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Bytes on the wire.
    pub bytes: WireBytes,
    /// Uncompressed page-batch bytes / compressed.
    pub compression_ratio: f64,
    /// Guest RAM, bytes.
    pub memory_bytes: u64,
    /// Guest RAM per second of total time, bytes/s.
    pub effective_rate: f64,
    /// Highest throttle applied, percent.
    pub max_throttle: u8,
    /// Where the downtime went.
    pub downtime_breakdown: DowntimeBreakdown,
    /// The writable working set, round by round.
    pub per_round: Vec<RoundStat>,
    /// The disks, when they were copied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskStats>,
    /// Set when the migration failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The network tunnel left running after the commit, or why it failed to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
}

/// What the disk copy did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskStats {
    /// Disks copied.
    pub disks: u32,
    /// Their total size, bytes.
    pub image_bytes: u64,
    /// Chunks in the first copy.
    pub chunks: u64,
    /// All-zero chunks among them (never sent, left as holes).
    pub zero_chunks: u64,
    /// Non-zero chunk bytes.
    pub data_bytes: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunks the destination already held.
    pub chunks_present: u64,
    /// Bytes of the chunks sent (before compression).
    pub chunk_bytes_sent: u64,
    /// Manifest bytes on the wire.
    pub manifest_bytes: u64,
    /// Written extents sent in later rounds and the final sync.
    pub extent_bytes: u64,
    /// Of those, sent inside the stop-and-copy.
    pub final_bytes: u64,
    /// Non-zero image bytes / chunk bytes sent (0 when no chunk was sent).
    pub dedup_ratio: f64,
    /// The first copy, ms.
    pub first_copy_ms: f64,
    /// The lowest guest write cap applied, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_limit: Option<u64>,
}
