//! An incrementally maintained digest of a disk image.
//!
//! The image is split into [`BLOCK`]-byte blocks; each block's blake3 is
//! kept, and the digest is blake3 over the size and the list. A side that
//! changes or sends bytes marks their blocks stale and re-hashes only those
//! ([`BlockDigest::refresh`]), so the final check of a migrated disk reads
//! the blocks written since the last check, not the whole image.
//!
//! Work never scales with the size an image declares, only with the data
//! it holds: an image created empty starts with every block known to be
//! zero ([`BlockDigest::zeroed`], nothing to read), and a refresh finds
//! holes with `SEEK_DATA`/`SEEK_HOLE` and hashes them without reading them.
//! A zero block's hash is kept as 32 zero bytes (which no blake3 output is
//! known to be) and stands for the hash of a block of zeros, so the list
//! costs no memory until blocks are written (it is allocated zeroed).

use std::fs::File;
use std::io;

use crate::io::{next_data, read_exact_at};

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

    /// The digest of an image of `size` bytes that holds only zeros (a file
    /// just created sparse), every block fresh: nothing needs reading.
    pub fn zeroed(size: u64) -> Self {
        let n = size.div_ceil(BLOCK) as usize;
        BlockDigest { size, hashes: vec![ZERO_BLOCK; n], stale: vec![false; n], partial: Vec::new() }
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

    /// Re-hashes every stale block from `file`; returns how many blocks
    /// it read (blocks that lie in a hole of the file are not read).
    pub fn refresh(&mut self, file: &File) -> io::Result<usize> {
        let mut buf = vec![0u8; BLOCK as usize];
        let mut n = 0;
        // The file's next data extent at or after the block being looked at.
        let mut data: Option<(u64, u64)> = None;
        for b in 0..self.hashes.len() {
            if !self.stale[b] {
                continue;
            }
            let (start, len) = (b as u64 * BLOCK, self.block_len(b));
            if data.is_none_or(|(_, end)| end <= start) {
                data = Some(next_data(file, start, self.size)?);
            }
            let (from, _) = data.expect("just set");
            if from >= start + len as u64 {
                // Wholly inside a hole: zeros, without reading them.
                self.hashes[b] = ZERO_BLOCK;
                self.stale[b] = false;
                continue;
            }
            read_exact_at(file, &mut buf[..len], start)?;
            self.set(b, &buf[..len]);
            n += 1;
        }
        Ok(n)
    }

    /// The digest. Every block must be fresh (a bug otherwise).
    pub fn digest(&self) -> [u8; 32] {
        assert!(self.stale.iter().all(|s| !s), "digest of an image with stale blocks");
        let mut h = blake3::Hasher::new();
        h.update(&self.size.to_le_bytes());
        let zero = *blake3::hash(&[0; BLOCK as usize]).as_bytes();
        for (i, b) in self.hashes.iter().enumerate() {
            match *b == ZERO_BLOCK {
                true if i + 1 == self.hashes.len() => {
                    h.update(blake3::hash(&vec![0; self.block_len(i)]).as_bytes());
                }
                true => {
                    h.update(&zero);
                }
                false => {
                    h.update(b);
                }
            }
        }
        *h.finalize().as_bytes()
    }
}

/// How a block of zeros is kept in the list (see the module docs).
const ZERO_BLOCK: [u8; 32] = [0; 32];

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
    fn holes_are_hashed_without_being_read() {
        // 64 GiB declared, three blocks written: the digest reads those only
        // (reading the holes took minutes before).
        let size = 64u64 << 30;
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(size).expect("sparse");
        let mut d = BlockDigest::zeroed(size);
        let t = std::time::Instant::now();
        let writes = [(0u64, 7u8), (40 << 30, 8), (size - 100, 9)];
        for &(at, v) in &writes {
            f.write_all_at(&[v; 100], at).expect("write");
            d.mark(at, 100);
        }
        assert_eq!(d.refresh(&f).expect("refresh"), 3, "only the written blocks are read");
        // Everything stale, as a digest of unknown content starts: holes are still skipped.
        let mut from_scratch = BlockDigest::new(size);
        assert_eq!(from_scratch.refresh(&f).expect("refresh"), 3);
        assert_eq!(d.digest(), from_scratch.digest());
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "took {:?}", t.elapsed());
        // The same as hashing every byte, on a small image with holes and an odd tail.
        let small = 5 * BLOCK + 1000;
        let mut bytes = vec![0u8; small as usize];
        bytes[(2 * BLOCK) as usize + 5] = 1;
        bytes[small as usize - 1] = 2;
        let g = tempfile::tempfile().expect("tmp");
        g.set_len(small).expect("sparse");
        g.write_all_at(&[1], 2 * BLOCK + 5).expect("write");
        g.write_all_at(&[2], small - 1).expect("write");
        let mut z = BlockDigest::zeroed(small);
        z.mark(2 * BLOCK + 5, 1);
        z.mark(small - 1, 1);
        z.refresh(&g).expect("refresh");
        assert_eq!(z.digest(), BlockDigest::of_bytes(&bytes));
        let mut n = BlockDigest::new(small);
        n.refresh(&g).expect("refresh");
        assert_eq!(n.digest(), BlockDigest::of_bytes(&bytes));
        assert_eq!(BlockDigest::zeroed(small).digest(), BlockDigest::of_bytes(&vec![0; small as usize]));
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
