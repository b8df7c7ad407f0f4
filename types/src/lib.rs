//! The small types every wanmig crate speaks, defined once: the guest page
//! size and runs of pages, MAC addresses, chunk and migration ids, the
//! protocol's feature bits, and how an error and its causes are printed;
//! and [`fuzz`], the input mutations of the bounded fuzz tests.
//!
//! This crate is the bottom of the workspace: it depends on no other
//! wanmig crate, and every other may depend on it.

pub mod fuzz;
mod ids;
pub mod mac;

use std::fmt;

pub use ids::{ChunkId, MigrationId};
pub use mac::{MacAddr, as_bytes as mac_as_bytes};

/// Guest page size, bytes.
pub const PAGE_SIZE: usize = 4096;
/// [`PAGE_SIZE`] as a `u64`, for guest-physical arithmetic.
pub const PAGE_SIZE_U64: u64 = PAGE_SIZE as u64;

/// A run of consecutive pages: `count` pages starting at page index `first`
/// (relative to the start of a memory region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// Index of the first page of the run.
    pub first: u64,
    /// Number of pages in the run (never 0).
    pub count: u64,
}

impl PageRange {
    /// One past the last page of the run.
    pub fn end(&self) -> u64 {
        self.first + self.count
    }
}

/// Feature bits the two ends of a migration negotiate in the hello.
pub mod features {
    /// Re-sent pages may be XBZRLE-style deltas.
    pub const XBZRLE: u64 = 1 << 0;
    /// `Pages` bodies may arrive zstd-compressed.
    pub const ZSTD: u64 = 1 << 1;
    /// Disk images travel (block-sync); without it both hosts must see
    /// the same images.
    pub const DISK_COPY: u64 = 1 << 2;
    /// A disk-only session (`wanmig sync`): no memory, an empty device
    /// state, and the source's VM keeps running after the commit.
    pub const SYNC_ONLY: u64 = 1 << 3;
    /// After the commit, the source opens a second two-way stream and both
    /// hosts run the network tunnel on it (`wanmig-tunnel`).
    pub const TUNNEL: u64 = 1 << 4;
    /// A migration whose link fails before its commit may go on over a new
    /// connection (`Resume`), from what the destination holds.
    pub const RESUME: u64 = 1 << 5;
    /// The guest may resume at the destination before all its pages are
    /// there (post-copy): missing pages are requested on a stream of their
    /// own while the rest are pushed.
    pub const POSTCOPY: u64 = 1 << 6;
    /// The source may send `Commit` right behind the device state, before
    /// the destination's `Ready`: the destination then decides (commits, or
    /// aborts and the source runs on), a round trip less of downtime.
    pub const EARLY_COMMIT: u64 = 1 << 7;
    /// With `RESUME`: a migration whose link fails after the source's
    /// `Commit` (sent early, or after `Ready`) and before it heard the
    /// destination's decision is resumed too. The source, paused, sends
    /// `Resume`; the destination answers `Resumed` while it has not
    /// decided (it parked before `Ready`: the source sends again what it
    /// lacks, the device state and the `Commit` last), or, once it has, its
    /// journal's `SettleAnswer` (committed: the VM is the destination's;
    /// not committed: the source's). Without it such a source is in doubt
    /// at once, until `wanmig settle`.
    pub const SETTLE_ON_RESUME: u64 = 1 << 8;
    /// A disk may start from an earlier sync's replica the destination
    /// holds: the hello names the sync each disk's write tracking counts
    /// from, the accept says which disks start from it, and those get only
    /// the blocks written since, no first copy.
    pub const DISK_BASE: u64 = 1 << 9;
    /// Everything this build speaks.
    pub const ALL: u64 = XBZRLE
        | ZSTD
        | DISK_COPY
        | SYNC_ONLY
        | TUNNEL
        | RESUME
        | POSTCOPY
        | EARLY_COMMIT
        | SETTLE_ON_RESUME
        | DISK_BASE;
}

/// An error and its causes (its `source()` chain), joined with ": ", as
/// every wanmig command and log prints them.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ErrorChain(e).to_string()
}

/// Displays an error and its causes, joined with ": ".
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(c) = cur {
            write!(f, ": {c}")?;
            cur = c.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl fmt::Display for E {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chains_name_every_cause_in_order() {
        let e = E("cannot install g.img", Some(Box::new(E("writing", Some(Box::new(E("no space left", None)))))));
        assert_eq!(error_chain(&e), "cannot install g.img: writing: no space left");
        assert_eq!(error_chain(&E("alone", None)), "alone");
    }

    #[test]
    fn features_are_distinct_bits() {
        let all = [
            features::XBZRLE,
            features::ZSTD,
            features::DISK_COPY,
            features::SYNC_ONLY,
            features::TUNNEL,
            features::RESUME,
            features::POSTCOPY,
            features::EARLY_COMMIT,
            features::SETTLE_ON_RESUME,
            features::DISK_BASE,
        ];
        assert_eq!(all.iter().fold(0, |a, b| a | b), features::ALL);
        assert!(all.iter().all(|f| f.count_ones() == 1));
        assert_eq!(all.iter().map(|f| f.count_ones()).sum::<u32>(), features::ALL.count_ones());
    }
}
