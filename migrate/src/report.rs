//! What a migration reports while it runs ([`Progress`]) and when it ends
//! ([`Summary`]). Both cross the control socket as JSON and are read back
//! by the same types, so a field cannot be renamed on one side only.

use serde::{Deserialize, Serialize};

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Connecting and agreeing with the destination.
    #[default]
    Connecting,
    /// The first copy of the disks (chunks the destination lacks).
    DiskCopy,
    /// Rounds of blocks the guest wrote during the disk copy.
    DiskRounds,
    /// Iterative pre-copy of memory (with the disks' written blocks).
    Precopy,
    /// The guest is paused; the last pages, blocks and the device state go.
    StopAndCopy,
    /// Waiting for the destination to verify and commit.
    Committing,
    /// `Commit` sent: too late to cancel; waiting for the acknowledgement.
    Committed,
    /// The link failed before the commit: the guest runs on here while the
    /// source reconnects to resume.
    Reconnecting,
    /// The guest runs at the destination; its missing pages are served
    /// and pushed from here.
    Postcopy,
}

impl Phase {
    /// The phase as the progress line and `status` name it.
    pub fn label(&self) -> &'static str {
        match self {
            Phase::Connecting => "connecting",
            Phase::DiskCopy => "disk copy",
            Phase::DiskRounds => "disk rounds",
            Phase::Precopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Committing => "committing",
            Phase::Committed => "committed",
            Phase::Reconnecting => "link down, reconnecting",
            Phase::Postcopy => "post-copy",
        }
    }
}

/// A migration's live progress (QEMU's `query-migrate`): sent to `wanmig
/// send` after every round and disk batch, and answered by `wanmig status`
/// while the migration runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Where it is.
    pub phase: Phase,
    /// The destination, `host:port`.
    pub dest: String,
    /// The current round (rounds of disk blocks count too).
    pub round: u32,
    /// Bytes put on the wire so far.
    pub bytes_sent: u64,
    /// Bytes still to send, estimated: dirty pages at the last round's bytes
    /// per page, plus written disk blocks, plus (during the disk copy) the
    /// image not yet read.
    pub bytes_left: u64,
    /// Guest memory dirty rate, bytes/s (0 before the first memory round).
    pub dirty_rate: f64,
    /// Rate at which data landed at the destination, bytes/s.
    pub link_rate: f64,
    /// Predicted downtime if the guest stopped now, ms.
    pub predicted_downtime_ms: f64,
    /// vCPU throttle (auto-converge), percent.
    pub throttle: u8,
    /// Estimated seconds to the end (bytes left at the link rate).
    pub eta_s: f64,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// The downtime budget in force, ms (changed by `wanmig set`).
    pub downtime_budget_ms: f64,
    /// The bandwidth cap in force, bits/s (`None`: none).
    pub max_bandwidth_bps: Option<u64>,
    /// While reconnecting: the attempt, and the seconds left of the resume
    /// window.
    pub reconnect_attempt: u32,
    /// Seconds left of the resume window (while reconnecting).
    pub resume_left_s: f64,
    /// While reconnecting: the commit is out, so the guest stays paused
    /// here until the destination's decision is heard.
    #[serde(default)]
    pub awaiting_decision: bool,
    /// In post-copy: pages the destination still lacks.
    pub postcopy_pages_left: u64,
    /// In post-copy: page requests served so far.
    pub faults_served: u64,
    /// During the disk copy: image bytes read of all, chunks sent and
    /// already at the destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskProgress>,
}

/// The disk copy's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    /// Image bytes read and offered.
    pub bytes_done: u64,
    /// Image bytes in all.
    pub bytes_total: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Chunks the destination already held.
    pub chunks_present: u64,
}

/// Bytes on the wire, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Last dirty pages and disk blocks sent.
    pub last_pages_ms: f64,
    /// vCPU and device state captured and sent.
    pub state_ms: f64,
    /// Until the destination said Ready (it loads and verifies the state).
    pub ready_ms: f64,
    /// Until the destination acknowledged the commit (it runs the VM).
    pub commit_ack_ms: f64,
}

/// One round: what it sent and what the guest dirtied meanwhile (the
/// writable working set of Clark et al.).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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
    /// Bytes it put on the wire (pages and disk data, after compression).
    pub wire_bytes: u64,
    /// How long it took, ms.
    pub ms: f64,
}

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The destination runs the VM; the source's process stops.
    Migrated,
    /// Failed (or cancelled) before the commit: the VM runs at the source
    /// as before, and the destination discarded what it received.
    FailedSourceRunning,
    /// `Commit` sent, acknowledgement lost: the VM stays paused at the
    /// source until `wanmig settle` learns what the destination did.
    InDoubt,
    /// A `sync` completed: the destination holds a verified replica of the
    /// disks; the VM runs at the source as before.
    Synced,
    /// Post-copy lost: the guest ran at the destination, which ended
    /// before every page arrived; its state there is gone. The source
    /// holds the guest as it was at the switch and does NOT run it.
    PostcopyLost,
}

/// The final summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The migration's id (as both ends journal it).
    pub migration_id: String,
    /// Wall time from connect to the end, ms.
    pub total_ms: f64,
    /// Guest paused (source pause to destination's acknowledgement), ms.
    pub downtime_ms: f64,
    /// Pre-copy rounds of memory.
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
    pub disk: Option<DiskStats>,
    /// Why it failed, when it did: the cause and its chain.
    pub error: Option<String>,
    /// Whether an operator cancelled it.
    pub cancelled: bool,
    /// Link outages it rode out (resumed on a new connection).
    pub outages: u32,
    /// Time the link was down, ms.
    pub outage_ms: f64,
    /// After an outage past the commit, what the destination's answer to
    /// the resume decided: `Committed` (its journal: the VM runs there),
    /// `NotCommitted` (it never will), or `TakenUpAgain` (it had not
    /// decided: the stop-and-copy and the commit went again).
    #[serde(default)]
    pub decided_on_resume: Option<String>,
    /// Guest data put on the wire again because an outage cut it
    /// (uncompressed: the pages of the round that was cut that had not
    /// arrived, that round's written blocks, and the disks' first copy
    /// offered again from where the destination had it).
    pub resent_bytes: u64,
    /// The network tunnel left running after the commit, or why it failed to start.
    pub tunnel: Option<String>,
    /// Post-copy's figures, when the guest moved in post-copy.
    pub postcopy: Option<PostcopyStats>,
}

/// What a post-copy did: the source's counts and the destination's own
/// measurements (sent with `PostcopyComplete`; absent when it never came).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyStats {
    /// Why it switched (the hybrid policy's reason, or "asked for").
    pub reason: String,
    /// Pages the destination lacked at the switch.
    pub missing_pages: u64,
    /// From the switch (guest paused here) to the last page placed there, ms.
    pub postcopy_ms: f64,
    /// Page requests served (each a batch of faulted pages).
    pub requests_served: u64,
    /// Pages the destination asked for (faulted), as the source saw them.
    pub pages_faulted: u64,
    /// Pages sent on the urgent stream (asked for, with their neighbours).
    pub pages_requested: u64,
    /// Pages pushed on the bulk stream.
    pub pages_pushed: u64,
    /// The destination's figures, when it reported them.
    pub dest: Option<PostcopyDestStats>,
}

/// The destination's measurements of a post-copy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PostcopyDestStats {
    /// Faults on missing pages (each page once).
    pub faults: u64,
    /// Pages that arrived asked for.
    pub requested: u64,
    /// Pages that arrived pushed.
    pub pushed: u64,
    /// Pages that arrived twice.
    pub duplicates: u64,
    /// Fault service time (fault read to page placed), median, µs.
    pub service_p50_us: u64,
    /// 99th percentile, µs.
    pub service_p99_us: u64,
    /// Longest, µs.
    pub service_max_us: u64,
    /// Time each vCPU (by index) spent blocked on missing pages, µs.
    pub vcpu_blocked_us: Vec<u64>,
    /// From the first page placed to the last, µs.
    pub placing_us: u64,
}

impl From<&wanmig_wire::PostcopyReport> for PostcopyDestStats {
    fn from(r: &wanmig_wire::PostcopyReport) -> Self {
        PostcopyDestStats {
            faults: r.faults,
            requested: r.requested,
            pushed: r.pushed,
            duplicates: r.duplicates,
            service_p50_us: r.service_p50_us,
            service_p99_us: r.service_p99_us,
            service_max_us: r.service_max_us,
            vcpu_blocked_us: r.vcpu_blocked_us.clone(),
            placing_us: r.placing_us,
        }
    }
}

/// What the disk copy did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    pub write_limit: Option<u64>,
    /// Disks the destination started from the earlier sync it holds: no
    /// first copy, only the blocks written since that sync.
    #[serde(default)]
    pub from_base: u32,
    /// The bytes of those blocks (sent with the first round's writes).
    #[serde(default)]
    pub base_written_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_and_progress_read_back_what_was_written() {
        let s = Summary {
            migration_id: "00ff".into(),
            total_ms: 12.5,
            bytes: WireBytes { pages: 7, total: 9, ..WireBytes::default() },
            disk: Some(DiskStats { chunks_sent: 3, write_limit: Some(1 << 20), ..DiskStats::default() }),
            error: Some("the destination has no space left writing g.img".into()),
            per_round: vec![RoundStat { round: 2, ms: 1.0, ..RoundStat::default() }],
            ..Summary::default()
        };
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).expect("json")).expect("back");
        assert_eq!(back, s);
        let p = Progress { phase: Phase::StopAndCopy, disk: Some(DiskProgress::default()), ..Progress::default() };
        let back: Progress = serde_json::from_str(&serde_json::to_string(&p).expect("json")).expect("back");
        assert_eq!(back, p);
        // A field missing on one side is an error, not a silent zero.
        assert!(serde_json::from_str::<Summary>(r#"{"total_ms": 1.0}"#).is_err());
    }
}
