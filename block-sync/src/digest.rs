//! An incrementally maintained digest of a disk image.
//!
//! The image is split into [`BLOCK`]-byte blocks; each block's blake3 is
//! kept, and the digest is blake3 over the size and the list. A side that
//! changes or sends bytes marks their blocks stale and re-hashes only those
//! ([`BlockDigest::refresh`]), so the final check of a migrated disk reads
//! the blocks written since the last check, not the whole image.

use std::fs::File;
use std::io;

use crate::io::read_exact_at;

/// Digest block size.
pub const BLOCK: u64 = 64 * 1024;

/// Per-block hashes of one image.
#[derive(Debug, Clone)]
pub struct BlockDigest {
    size: u64,
    hashes: Vec<[u8; 32]>,
    stale: Vec<bool>,
    /// A partial block being fed in order (see [`BlockDigest::feed`]).
    partial: Vec<u8>,
}

impl BlockDigest {
    /// The digest of an image of `size` bytes, every block stale.
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(BLOCK) as usize;
        BlockDigest { size, hashes: vec![[0; 32]; n], stale: vec![true; n], partial: Vec::new() }
    }

    /// The digest of `bytes` (tests, and small images).
    pub fn of_bytes(bytes: &[u8]) -> [u8; 32] {
        let mut d = BlockDigest::new(bytes.len() as u64);
        d.feed(0, bytes);
        d.digest()
    }

    /// Image size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hashes image bytes read in order from offset 0 (`offset` must be
    /// where the previous call stopped): how the source's first pass fills
    /// the digest without reading anything twice.
    pub fn feed(&mut self, offset: u64, mut data: &[u8]) {
        let mut block = (offset / BLOCK) as usize;
        debug_assert_eq!(offset % BLOCK, self.partial.len() as u64, "fed in order");
        while !data.is_empty() {
            let block_len = self.block_len(block);
            let take = (block_len - self.partial.len()).min(data.len());
            if self.partial.is_empty() && take == block_len {
                self.set(block, &data[..take]);
            } else {
                self.partial.extend_from_slice(&data[..take]);
                if self.partial.len() == block_len {
                    let p = std::mem::take(&mut self.partial);
                    self.set(block, &p);
                }
            }
            data = &data[take..];
            if self.partial.is_empty() {
                block += 1;
            }
        }
    }

    /// Goes back to feeding at `offset` (a first pass that starts over from
    /// there, e.g. after a resumed migration); `prefix` is the image's bytes
    /// from the start of `offset`'s block up to `offset`.
    pub fn refeed_at(&mut self, offset: u64, prefix: Vec<u8>) {
        debug_assert_eq!(offset % BLOCK, prefix.len() as u64, "the prefix of the block");
        self.partial = prefix;
    }

    fn block_len(&self, block: usize) -> usize {
        (self.size - block as u64 * BLOCK).min(BLOCK) as usize
    }

    /// Sets the hash of the block at `block` from its full contents.
    pub fn set(&mut self, block: usize, contents: &[u8]) {
        debug_assert_eq!(contents.len(), self.block_len(block));
        self.hashes[block] = *blake3::hash(contents).as_bytes();
        self.stale[block] = false;
    }

    /// Marks the blocks overlapping `[offset, offset + len)` stale.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let last = ((offset + len).min(self.size) - 1) / BLOCK;
        for b in offset / BLOCK..=last {
            self.stale[b as usize] = true;
        }
    }

    /// Stale blocks.
    pub fn stale_blocks(&self) -> usize {
        self.stale.iter().filter(|&&s| s).count()
    }

    /// Re-hashes every stale block from `file`; returns how many.
    pub fn refresh(&mut self, file: &File) -> io::Result<usize> {
        let mut buf = vec![0u8; BLOCK as usize];
        let mut n = 0;
        for b in 0..self.hashes.len() {
            if self.stale[b] {
                let len = self.block_len(b);
                read_exact_at(file, &mut buf[..len], b as u64 * BLOCK)?;
                self.set(b, &buf[..len]);
                n += 1;
            }
        }
        Ok(n)
    }

    /// The digest. Every block must be fresh (a bug otherwise).
    pub fn digest(&self) -> [u8; 32] {
        assert!(self.stale.iter().all(|s| !s), "digest of an image with stale blocks");
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        for b in &self.hashes {
            h.update(b);
        }
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Fed in any split, then updated by marked writes and a refresh,
        /// the digest equals that of the final bytes.
        #[test]
        fn incremental_equals_from_scratch(
            size in 1usize..400_000,
            splits in proptest::collection::vec(1usize..100_000, 1..8),
            writes in proptest::collection::vec((0usize..400_000, 1usize..70_000, any::<u8>()), 0..6),
        ) {
            let mut data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            let mut d = BlockDigest::new(size as u64);
            let mut at = 0;
            for s in splits.iter().cycle() {
                if at >= size { break; }
                let end = (at + s).min(size);
                d.feed(at as u64, &data[at..end]);
                at = end;
            }
            prop_assert_eq!(d.digest(), BlockDigest::of_bytes(&data));
            let f = tempfile::tempfile().expect("tmp");
            for (off, len, v) in writes {
                if off >= size { continue; }
                let end = (off + len).min(size);
                data[off..end].fill(v);
                d.mark(off as u64, (end - off) as u64);
            }
            f.write_all_at(&data, 0).expect("write");
            d.refresh(&f).expect("refresh");
            prop_assert_eq!(d.digest(), BlockDigest::of_bytes(&data));
        }
    }

    #[test]
    fn a_changed_byte_changes_the_digest() {
        let mut data = vec![5u8; 300_000];
        let before = BlockDigest::of_bytes(&data);
        data[299_999] ^= 1;
        assert_ne!(before, BlockDigest::of_bytes(&data));
        assert_ne!(BlockDigest::of_bytes(&[0; 10]), BlockDigest::of_bytes(&[0; 11]), "the size counts");
    }
}
