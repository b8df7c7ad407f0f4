//! The control socket's requests and answers: one JSON request per
//! connection, one JSON answer line back (a `migrate` streams progress
//! lines, `{"progress": {...}}`, before its answer).
//!
//! ```text
//! → {"op":"status"}                          ← {"ok":true,"status":{...},"migration":{...}}
//! → {"op":"pause"} / {"op":"resume"}         ← {"ok":true}
//! → {"op":"snapshot","dir":"/x","resume":false}   ← {"ok":true,"save":{...}}
//! → {"op":"migrate","migration":{...}}       ← {"progress":{...}}* then {"ok":true,"outcome":"migrated","summary":{...}}
//! → {"op":"cancel"}                          ← {"ok":true} (or too late: the commit was sent)
//! → {"op":"set","downtime_ms":50,"max_bandwidth_bps":100000000}   ← {"ok":true,"migration":{...}}
//! → {"op":"settle","force_resume":false}     ← {"ok":true,"settled":{...}}
//! → {"op":"routes_converged"}                ← {"ok":true}
//! → {"op":"shutdown","force":false}          ← {"ok":true}
//! → {"op":"tracking","add":"dr1"}            ← {"ok":true,"tracking":[{"disk":0,"maps":[...]}]}
//! ```
//!
//! Every type here is read back by the same code that wrote it: a field
//! renamed on one side fails to parse on the other instead of reading 0.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use wanmig_migrate::report::{Outcome, Progress, Summary};
use wanmig_migrate::source::TunnelRequest;
use wanmig_tunnel::TunnelStatus;
use wanmig_vmm::testguest::GuestStatus;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's state, and its migration's progress while one runs.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Pause and save to `dir`.
    Snapshot {
        /// Snapshot directory (created if missing; must hold no snapshot).
        dir: PathBuf,
        /// Resume after saving.
        #[serde(default)]
        resume: bool,
    },
    /// Stop the VM and the serving process.
    Shutdown {
        /// Even while a migration is in doubt (the VM may run elsewhere).
        #[serde(default)]
        force: bool,
    },
    /// Live-migrate the VM (or sync its disks); progress lines stream back
    /// before the answer.
    Migrate {
        /// What to do.
        migration: MigrateRequest,
    },
    /// Cancel the running migration (before its commit).
    Cancel,
    /// Change the running migration's downtime budget and bandwidth cap;
    /// they take effect in its next round.
    Set {
        /// New downtime budget, ms.
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// New bandwidth cap, bits/s.
        #[serde(default)]
        max_bandwidth_bps: Option<u64>,
        /// Lift the bandwidth cap.
        #[serde(default)]
        no_bandwidth_cap: bool,
    },
    /// Ask the destination of an in-doubt migration what became of it, and
    /// act on the answer.
    Settle {
        /// Resume here even if the destination has no record of the
        /// migration (never if it says it committed).
        #[serde(default)]
        force_resume: bool,
    },
    /// The routes to the guest's address have converged: end the network
    /// tunnel of the last migration (at either end).
    RoutesConverged,
    /// The disks' named write-tracking maps: add, reset or remove one
    /// (on every disk), then report them all.
    Tracking {
        /// Add this map (invalid until reset or a sync succeeds).
        #[serde(default)]
        add: Option<String>,
        /// Clear this map and declare it valid.
        #[serde(default)]
        reset: Option<String>,
        /// Remove this map.
        #[serde(default)]
        remove: Option<String>,
    },
}

pub use wanmig_dr::sync_map_name;

/// One disk's write-tracking maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTracking {
    /// The disk, in configuration order.
    pub disk: usize,
    /// Its maps, by name.
    pub maps: Vec<wanmig_vmm::tracking::MapStatus>,
    /// What loading the maps from beside the image found, when they could
    /// not all be trusted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What `wanmig send` asks of the process running the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination `host:port`.
    pub dest: String,
    /// Directory of this host's identity (`wanmig keygen`).
    pub identity: PathBuf,
    /// The destination's fingerprint.
    pub peer: String,
    /// Downtime budget, ms.
    pub downtime_ms: u64,
    /// Bandwidth cap, bits/s.
    pub max_bandwidth_bps: Option<u64>,
    /// With a cap: start at this rate, bits/s, and run each round at the
    /// last round's dirty rate plus this much (Clark et al.'s dynamic rate).
    #[serde(default)]
    pub min_bandwidth_bps: Option<u64>,
    /// Give up (and resume here) after this long, s.
    pub timeout_s: u64,
    /// Expected link bandwidth for window sizing, bits/s.
    pub link_bandwidth_bps: Option<u64>,
    /// Expected round-trip time for window sizing, ms.
    pub rtt_ms: Option<u64>,
    /// Keep this host's disk chunks in the chunk store in this directory,
    /// so that a later move back here sends only what changed.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// Only copy the disks (`wanmig sync`): the VM keeps running here.
    #[serde(default)]
    pub sync: bool,
    /// Keep the guest's address reachable through this host after the
    /// commit (the network tunnel).
    #[serde(default)]
    pub tunnel: Option<TunnelRequest>,
    /// How long the link may stay down before the commit without the
    /// migration failing (it resumes on a new connection), s; 0: fail at once.
    #[serde(default = "default_resume_window_s")]
    pub resume_window_s: u64,
    /// Whether the guest may move before all its pages (post-copy).
    #[serde(default)]
    pub postcopy: wanmig_migrate::source::options::PostcopyMode,
    /// Commit only after the destination's Ready (the classic order, a
    /// round trip more of downtime), instead of right behind the device
    /// state, letting the destination decide (the default).
    #[serde(default)]
    pub commit_after_ready: bool,
}

fn default_resume_window_s() -> u64 {
    600
}

/// What `status` reports of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// "running", "paused", "migrating", "in-doubt" or "migrated-away".
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// The test guest's own status page, when it runs the test guest.
    pub guest: Option<TestGuestProgress>,
}

/// Progress of the test guest (a subset of its status page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestGuestProgress {
    /// 2 = running.
    pub phase: u64,
    /// Working-set steps.
    pub steps: u64,
    /// Disk writes completed.
    pub disk_done: u64,
    /// Mismatches it found.
    pub errors: u64,
    /// Timer ticks (10 ms).
    pub ticks: u64,
    /// Whether the guest drives a NIC.
    pub net_up: bool,
    /// Frames it received.
    pub net_rx: u64,
    /// Frames it sent.
    pub net_tx: u64,
    /// Replies of its UDP sequence service so far.
    pub udp_seq: u64,
}

impl From<GuestStatus> for TestGuestProgress {
    fn from(s: GuestStatus) -> Self {
        TestGuestProgress {
            phase: s.phase,
            steps: s.steps,
            disk_done: s.disk_done,
            errors: s.errors,
            ticks: s.ticks,
            net_up: s.net_base != 0,
            net_rx: s.net_rx,
            net_tx: s.net_tx,
            udp_seq: s.udp_seq,
        }
    }
}

/// Timings of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SaveSummary {
    /// Pause time.
    pub pause_ms: f64,
    /// State capture and write.
    pub state_ms: f64,
    /// RAM write.
    pub memory_ms: f64,
    /// Wait for stable storage.
    pub sync_ms: f64,
    /// RAM bytes written.
    pub memory_bytes: u64,
}

/// What settling found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleReport {
    /// The migration.
    pub migration_id: String,
    /// Its destination.
    pub dest: String,
    /// What the destination said.
    pub destination_says: wanmig_wire::Settlement,
    /// What was done here, in words.
    pub action: String,
}

/// The answer to a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// For `status` and `set` while a migration runs: its progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub migration: Option<Progress>,
    /// For `snapshot`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save: Option<SaveSummary>,
    /// For `migrate`: how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// For `migrate`: the summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// For `status`: the network tunnel a migration left running here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelStatus>,
    /// For `settle`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settled: Option<SettleReport>,
    /// For `status` and `tracking`: the disks' write-tracking maps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking: Option<Vec<DiskTracking>>,
}

impl Response {
    /// Done, with nothing to report.
    pub fn ok() -> Self {
        Response { ok: true, ..Response::default() }
    }

    /// Refused, for `e`.
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response { ok: false, error: Some(e.to_string()), ..Response::default() }
    }
}

/// A line the server streams before its answer to `migrate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressLine {
    /// The migration's progress.
    pub progress: Progress,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_read_back_what_was_written() {
        for r in [
            Request::Status,
            Request::Cancel,
            Request::Set { downtime_ms: Some(50), max_bandwidth_bps: Some(1_000_000), no_bandwidth_cap: false },
            Request::Settle { force_resume: true },
            Request::Shutdown { force: false },
            Request::Tracking { add: Some("x".into()), reset: None, remove: None },
        ] {
            let back: Request = serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("back");
            assert_eq!(back, r);
        }
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"set","downtim_ms":5}"#).is_err(),
            "a misspelt field is refused"
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
        let r = Response { migration: Some(Progress::default()), ..Response::ok() };
        let back: Response = serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("back");
        assert_eq!(back, r);
    }
}
