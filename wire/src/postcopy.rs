//! What post-copy adds to the protocol: the pages the destination must
//! treat as missing when the guest moves, the pages its vCPUs wait for, and
//! its report once every page is there.
//!
//! All page numbers here are guest page frame numbers (guest-physical
//! address / 4096).

use wanmig_types::PageRange;

use crate::codec::{DecodeError, Reader, Writer};

/// Most runs one `PostcopyDiscard` carries (two ULEB128 numbers each: at
/// most 40 bytes, far within a frame). A source with more sends several.
pub const MAX_DISCARD_RUNS: u32 = 1 << 18;
/// Most pages one `PageRequest` names.
pub const MAX_REQUEST_PAGES: u32 = 4096;
/// Most vCPUs a report describes (a VM's vCPU count is a `u8`).
pub const MAX_REPORT_VCPUS: u32 = 256;

/// Writes runs of page frame numbers: their count, then per run the gap
/// since the end of the previous one and its length (ULEB128).
pub(crate) fn write_runs(w: &mut Writer, runs: &[PageRange]) {
    w.u32(runs.len() as u32);
    let mut next = 0u64;
    for r in runs {
        w.uleb(r.first - next);
        w.uleb(r.count);
        next = r.first + r.count;
    }
}

/// Reads at most `limit` runs written by [`write_runs`]: ascending,
/// disjoint, none empty, none past any guest address.
pub(crate) fn read_runs(r: &mut Reader<'_>, field: &'static str, limit: u32) -> Result<Vec<PageRange>, DecodeError> {
    let n = r.count(field, limit)?;
    // Each run takes at least two bytes: refuse a count the frame cannot hold.
    if r.remaining() < 2 * n {
        return Err(DecodeError::Truncated { field, need: 2 * n, have: r.remaining() });
    }
    let bad = |reason| DecodeError::Invalid { field, reason };
    let mut runs = Vec::with_capacity(n);
    let mut next = 0u64;
    for _ in 0..n {
        let first = next.checked_add(r.uleb("run gap")?).ok_or(bad("page number overflows"))?;
        let count = r.uleb("run length")?;
        let end = first.checked_add(count).filter(|&e| count > 0 && e <= u64::MAX >> 12);
        next = end.ok_or(bad("empty, or past any guest address"))?;
        runs.push(PageRange { first, count });
    }
    Ok(runs)
}

/// Writes a page request: the count, then each page frame number (ULEB128),
/// in the order the vCPUs faulted.
pub(crate) fn write_request(w: &mut Writer, pages: &[u64]) {
    w.u32(pages.len() as u32);
    for &p in pages {
        w.uleb(p);
    }
}

/// Reads a page request of at most [`MAX_REQUEST_PAGES`] pages.
pub(crate) fn read_request(r: &mut Reader<'_>) -> Result<Vec<u64>, DecodeError> {
    let n = r.count("requested pages", MAX_REQUEST_PAGES)?;
    if r.remaining() < n {
        return Err(DecodeError::Truncated { field: "requested pages", need: n, have: r.remaining() });
    }
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let p = r.uleb("requested page")?;
        if p > u64::MAX >> 12 {
            return Err(DecodeError::Invalid { field: "requested page", reason: "past any guest address" });
        }
        pages.push(p);
    }
    Ok(pages)
}

/// What the destination measured of a post-copy, sent with
/// `PostcopyComplete` (the source's summary shows it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyReport {
    /// Faults on missing pages (each page counted once).
    pub faults: u64,
    /// Pages that arrived on the request stream (asked for, with the
    /// neighbours the source added).
    pub requested: u64,
    /// Pages that arrived on the bulk stream (pushed).
    pub pushed: u64,
    /// Pages that arrived twice (pushed and requested both).
    pub duplicates: u64,
    /// Fault service time, from the fault being read to its page placed:
    /// median, microseconds.
    pub service_p50_us: u64,
    /// 99th percentile, microseconds.
    pub service_p99_us: u64,
    /// Longest, microseconds.
    pub service_max_us: u64,
    /// Time each vCPU spent waiting for pages, microseconds, in vCPU order.
    pub vcpu_blocked_us: Vec<u64>,
    /// From the first page's placement to the last one's, microseconds.
    pub placing_us: u64,
}

impl PostcopyReport {
    pub(crate) fn write(&self, w: &mut Writer) {
        for v in [
            self.faults,
            self.requested,
            self.pushed,
            self.duplicates,
            self.service_p50_us,
            self.service_p99_us,
            self.service_max_us,
            self.placing_us,
        ] {
            w.u64(v);
        }
        w.u32(self.vcpu_blocked_us.len() as u32);
        for &b in &self.vcpu_blocked_us {
            w.u64(b);
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut v = [0u64; 8];
        for (x, field) in v.iter_mut().zip([
            "faults",
            "requested pages",
            "pushed pages",
            "duplicate pages",
            "fault service p50",
            "fault service p99",
            "fault service max",
            "placing time",
        ]) {
            *x = r.u64(field)?;
        }
        let n = r.count("vCPUs reported", MAX_REPORT_VCPUS)?;
        let mut vcpu_blocked_us = Vec::with_capacity(n);
        for _ in 0..n {
            vcpu_blocked_us.push(r.u64("vCPU blocked time")?);
        }
        let [faults, requested, pushed, duplicates, service_p50_us, service_p99_us, service_max_us, placing_us] = v;
        Ok(PostcopyReport {
            faults,
            requested,
            pushed,
            duplicates,
            service_p50_us,
            service_p99_us,
            service_max_us,
            vcpu_blocked_us,
            placing_us,
        })
    }
}
