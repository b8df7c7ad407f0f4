//! Choosing how each page travels: zero marker, XBZRLE delta, or raw — and
//! applying what arrives.

use crate::PAGE_SIZE;
use crate::xbzrle;

/// Default XBZRLE cache size (QEMU's `DEFAULT_MIGRATE_XBZRLE_CACHE_SIZE`).
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// The versions of pages sent last, for delta encoding: direct-mapped by
/// page number (like QEMU's), bounded, allocated once.
#[derive(Debug)]
pub struct XbzrleCache {
    tags: Vec<u64>,
    data: Vec<u8>,
}

const EMPTY: u64 = u64::MAX;

impl XbzrleCache {
    /// A cache of `bytes` (rounded down to whole pages, at least one).
    pub fn new(bytes: usize) -> Self {
        let slots = (bytes / PAGE_SIZE).max(1);
        XbzrleCache { tags: vec![EMPTY; slots], data: vec![0; slots * PAGE_SIZE] }
    }

    fn slot(&self, gpa: u64) -> usize {
        ((gpa / PAGE_SIZE as u64) % self.tags.len() as u64) as usize
    }

    fn get(&self, gpa: u64) -> Option<&[u8; PAGE_SIZE]> {
        let s = self.slot(gpa);
        (self.tags[s] == gpa).then(|| self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].try_into().expect("one page"))
    }

    fn put(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) {
        let s = self.slot(gpa);
        self.tags[s] = gpa;
        self.data[s * PAGE_SIZE..(s + 1) * PAGE_SIZE].copy_from_slice(page);
    }
}

/// How a page was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// All zero: send the marker.
    Zero,
    /// Send the delta now in the encoder's buffer.
    Delta,
    /// Send the page as it is.
    Raw,
}

/// Per-kind page and byte counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    /// Zero pages (sent as markers, never as data).
    pub zero_pages: u64,
    /// Pages sent whole.
    pub raw_pages: u64,
    /// Pages sent as deltas.
    pub delta_pages: u64,
    /// Bytes of deltas.
    pub delta_bytes: u64,
    /// Re-sent pages that were in the cache.
    pub cache_hits: u64,
}

/// Encodes pages for the wire, keeping the last sent version of each.
#[derive(Debug)]
pub struct PageEncoder {
    cache: Option<XbzrleCache>,
    delta: Vec<u8>,
    /// Running counts.
    pub stats: EncodeStats,
}

impl PageEncoder {
    /// An encoder; `cache_bytes` of 0 disables delta encoding.
    pub fn new(cache_bytes: usize) -> Self {
        PageEncoder {
            cache: (cache_bytes > 0).then(|| XbzrleCache::new(cache_bytes)),
            delta: Vec::with_capacity(PAGE_SIZE),
            stats: EncodeStats::default(),
        }
    }

    /// Decides how `page` at `gpa` travels. For [`Encoded::Delta`], the
    /// delta is in [`PageEncoder::delta`] until the next call.
    pub fn encode(&mut self, gpa: u64, page: &[u8; PAGE_SIZE]) -> Encoded {
        if is_zero(page) {
            self.stats.zero_pages += 1;
            // The destination now holds zeros: a later delta must be taken
            // against zeros, not against what was sent before.
            if let Some(cache) = &mut self.cache
                && cache.get(gpa).is_some()
            {
                cache.put(gpa, page);
            }
            return Encoded::Zero;
        }
        if let Some(cache) = &mut self.cache {
            if let Some(old) = cache.get(gpa) {
                self.stats.cache_hits += 1;
                // Worth it only if clearly smaller than the page.
                if xbzrle::encode(old, page, PAGE_SIZE - PAGE_SIZE / 8, &mut self.delta) {
                    cache.put(gpa, page);
                    self.stats.delta_pages += 1;
                    self.stats.delta_bytes += self.delta.len() as u64;
                    return Encoded::Delta;
                }
            }
            cache.put(gpa, page);
        }
        self.stats.raw_pages += 1;
        Encoded::Raw
    }

    /// The delta of the last [`Encoded::Delta`].
    pub fn delta(&self) -> &[u8] {
        &self.delta
    }
}

/// Whether a page is all zero (word-wise).
pub fn is_zero(page: &[u8; PAGE_SIZE]) -> bool {
    page.chunks_exact(8).fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().expect("8 bytes"))) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_raw_then_delta() {
        let mut e = PageEncoder::new(1 << 20);
        let zero = [0u8; PAGE_SIZE];
        assert_eq!(e.encode(0x1000, &zero), Encoded::Zero);
        let mut p = [5u8; PAGE_SIZE];
        assert_eq!(e.encode(0x2000, &p), Encoded::Raw);
        p[100] = 6;
        assert_eq!(e.encode(0x2000, &p), Encoded::Delta);
        let mut back = [5u8; PAGE_SIZE];
        xbzrle::decode(e.delta(), &mut back).expect("decodes");
        assert_eq!(back, p);
        // Rewritten entirely: raw again, and the cache follows.
        let q = [9u8; PAGE_SIZE];
        assert_eq!(e.encode(0x2000, &q), Encoded::Raw);
        assert_eq!(e.stats, EncodeStats { zero_pages: 1, raw_pages: 2, delta_pages: 1, delta_bytes: 3, cache_hits: 2 });
    }

    /// What the destination holds after applying each encoding.
    fn apply(dest: &mut [u8; PAGE_SIZE], e: &PageEncoder, kind: Encoded, page: &[u8; PAGE_SIZE]) {
        match kind {
            Encoded::Zero => *dest = [0; PAGE_SIZE],
            Encoded::Raw => *dest = *page,
            Encoded::Delta => xbzrle::decode(e.delta(), dest).expect("own delta"),
        }
    }

    #[test]
    fn a_page_zeroed_then_restored_arrives_restored() {
        let mut e = PageEncoder::new(1 << 20);
        let mut dest = [0u8; PAGE_SIZE];
        let x = [7u8; PAGE_SIZE];
        let mut x2 = x;
        x2[9] = 8;
        for page in [x, [0u8; PAGE_SIZE], x, x2, [0u8; PAGE_SIZE], x2] {
            let kind = e.encode(0x5000, &page);
            apply(&mut dest, &e, kind, &page);
            assert_eq!(dest, page, "after {kind:?}");
        }
    }

    #[test]
    fn cache_is_bounded_and_direct_mapped() {
        let mut c = XbzrleCache::new(2 * PAGE_SIZE);
        c.put(0, &[1; PAGE_SIZE]);
        c.put(2 * PAGE_SIZE as u64, &[2; PAGE_SIZE]); // same slot: evicts page 0
        assert!(c.get(0).is_none());
        assert_eq!(c.get(2 * PAGE_SIZE as u64).map(|p| p[0]), Some(2));
        assert_eq!(c.data.len(), 2 * PAGE_SIZE);
    }
}
