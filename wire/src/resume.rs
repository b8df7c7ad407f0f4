//! Resuming a migration on a new connection after the link failed: what
//! the destination says it holds.
//!
//! The source opens a new connection (same pinned identities) and sends
//! `Resume` with the migration's id and the secret it chose in its hello
//! (known to the two ends alone, so no other pinned peer can take the
//! session over). The destination answers `Resumed` with a [`ResumePoint`]:
//! the round it is in and the pages of that round it applied, and per disk
//! the manifest parts that are complete there (every chunk asked for
//! arrived). Everything after that point the source sends again; the rest
//! it does not. The source checks the point against what it sent: it is
//! peer input like any other.

use wanmig_types::PageRange;

use crate::codec::{DecodeError, Reader, Writer};

/// Most runs of pages a resume point lists (a 64 GiB guest whose every
/// other page arrived is 8 Mi runs: far beyond any real cut, and at two
/// ULEB128 numbers a run still within a frame).
pub const MAX_RESUME_RUNS: u32 = 1 << 21;

/// Where a disk's first copy stands at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPoint {
    /// The first manifest part not (completely) there.
    pub next_seq: u32,
    /// Where that part starts: everything before is there.
    pub next_offset: u64,
}

/// What the destination holds when a migration resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// The round the destination is in: every round before it is applied.
    pub round: u32,
    /// Pages of that round it applied, as runs of guest page frame numbers
    /// (address / 4096), ascending and disjoint.
    pub received: Vec<PageRange>,
    /// Per disk of the hello, in order.
    pub disks: Vec<DiskPoint>,
}

impl ResumePoint {
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u32(self.round);
        crate::postcopy::write_runs(w, &self.received);
        w.u32(self.disks.len() as u32);
        for d in &self.disks {
            w.u32(d.next_seq);
            w.u64(d.next_offset);
        }
    }

    /// Reads a point of a VM with at most `max_disks` disks.
    pub(crate) fn read(r: &mut Reader<'_>, max_disks: u32) -> Result<Self, DecodeError> {
        let round = r.u32("resume round")?;
        let received = crate::postcopy::read_runs(r, "received runs", MAX_RESUME_RUNS)?;
        let n = r.count("disk points", max_disks)?;
        let mut disks = Vec::with_capacity(n);
        for _ in 0..n {
            disks.push(DiskPoint { next_seq: r.u32("next manifest part")?, next_offset: r.u64("next offset")? });
        }
        Ok(ResumePoint { round, received, disks })
    }
}
