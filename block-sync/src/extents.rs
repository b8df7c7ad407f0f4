//! From the VMM's write log to `DiskWrites` batches.
//!
//! The log has one bit per 4 KiB of image ([`EXTENT_GRANULE`]), bit `i` of
//! word `w` standing for bytes `[(64w + i) * 4096, …)`. [`DirtyReader`]
//! reads each [`BLOCK`] holding a written page once, whole:
//! the written pages go out, and the block's hash in the sender's
//! [`BlockDigest`] is updated from the same read, so digest and data always
//! describe the same bytes.

use std::fs::File;
use std::io;

use wanmig_wire::DiskWrites;
use wanmig_wire::disk::{EXTENT_GRANULE, MAX_EXTENT_BYTES, MAX_EXTENTS};

use crate::digest::{BLOCK, BlockDigest};
use crate::io::read_exact_at;

const PAGES_PER_BLOCK: u64 = BLOCK / EXTENT_GRANULE;

/// Reads the pages a write log marks, a batch at a time.
#[derive(Debug)]
pub struct DirtyReader<'a> {
    file: &'a File,
    size: u64,
    /// (digest block, mask of its written pages), ascending.
    blocks: Vec<(u64, u16)>,
    next: usize,
    buf: Vec<u8>,
}

impl<'a> DirtyReader<'a> {
    /// A reader of the pages `words` marks in the first `size` bytes of
    /// `file` (a multiple of 4 KiB).
    pub fn new(file: &'a File, size: u64, words: &[u64]) -> Self {
        let mut blocks = Vec::new();
        for (w, &word) in words.iter().enumerate() {
            for q in 0..4u64 {
                let mask = (word >> (q * 16)) as u16;
                let block = w as u64 * 4 + q;
                if mask != 0 && block * BLOCK < size {
                    blocks.push((block, mask));
                }
            }
        }
        DirtyReader { file, size, blocks, next: 0, buf: vec![0; BLOCK as usize] }
    }

    /// Written bytes not yet returned.
    pub fn remaining_bytes(&self) -> u64 {
        self.blocks[self.next..].iter().map(|(_, m)| u64::from(m.count_ones()) * EXTENT_GRANULE).sum()
    }

    /// The next batch of written extents of disk `disk` (at most
    /// [`MAX_EXTENT_BYTES`]), updating `digest` from the same reads; `None`
    /// when all are out.
    pub fn next_batch(&mut self, disk: u8, digest: &mut BlockDigest) -> io::Result<Option<DiskWrites>> {
        if self.next >= self.blocks.len() {
            return Ok(None);
        }
        let mut w = DiskWrites { disk, extents: Vec::new(), data: Vec::new() };
        while let Some(&(block, mask)) = self.blocks.get(self.next) {
            let bytes = u64::from(mask.count_ones()) * EXTENT_GRANULE;
            let full = w.data.len() as u64 + bytes > u64::from(MAX_EXTENT_BYTES)
                || w.extents.len() + PAGES_PER_BLOCK as usize > MAX_EXTENTS as usize;
            if full && !w.extents.is_empty() {
                break;
            }
            self.next += 1;
            let start = block * BLOCK;
            let len = (self.size - start).min(BLOCK) as usize;
            read_exact_at(self.file, &mut self.buf[..len], start)?;
            digest.set(block as usize, &self.buf[..len]);
            for p in 0..PAGES_PER_BLOCK {
                let off = start + p * EXTENT_GRANULE;
                if mask & (1 << p) == 0 || off >= self.size {
                    continue;
                }
                let page = &self.buf[(p * EXTENT_GRANULE) as usize..][..EXTENT_GRANULE as usize];
                match w.extents.last_mut() {
                    Some((o, l)) if *o + u64::from(*l) == off => *l += EXTENT_GRANULE as u32,
                    _ => w.extents.push((off, EXTENT_GRANULE as u32)),
                }
                w.data.extend_from_slice(page);
            }
        }
        Ok(Some(w))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    #[test]
    fn batches_carry_exactly_the_written_pages_and_fresh_block_hashes() {
        let size = 64u64 << 20;
        let f = tempfile::tempfile().expect("tmp");
        let data: Vec<u8> = (0..size as usize).map(|i| (i / 4096 % 251) as u8).collect();
        f.write_all_at(&data, 0).expect("write");
        // Every other page of the first 40 MiB: more than one batch.
        let mut words = vec![0u64; (size / 4096 / 64) as usize];
        for page in (0..10240).step_by(2) {
            words[page / 64] |= 1 << (page % 64);
        }
        let mut r = DirtyReader::new(&f, size, &words);
        assert_eq!(r.remaining_bytes(), 5120 * 4096);
        let mut digest = BlockDigest::new(size);
        let mut pages = 0;
        let mut batches = 0;
        while let Some(w) = r.next_batch(2, &mut digest).expect("read") {
            assert!(w.data.len() <= MAX_EXTENT_BYTES as usize && w.disk == 2);
            for (off, bytes) in w.iter() {
                assert_eq!(bytes, &data[off as usize..][..bytes.len()]);
                assert_eq!(off / 4096 % 2, 0);
                pages += bytes.len() / 4096;
            }
            batches += 1;
        }
        assert_eq!((pages, r.remaining_bytes()), (5120, 0));
        assert!(batches >= 3, "{batches} batches");
        // The 640 touched blocks are fresh and hash what is in the file.
        assert_eq!(digest.stale_blocks(), 1024 - 640);
        let mut reference = BlockDigest::new(size);
        reference.feed(0, &data);
        digest.refresh(&f).expect("refresh");
        assert_eq!(digest.digest(), reference.digest());
    }
}
