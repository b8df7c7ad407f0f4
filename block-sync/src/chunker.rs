//! Content-defined chunking of an image, batch by batch.
//!
//! A batch is a run of whole chunks read in one go (about
//! [`ImageChunker::new`]'s `batch_bytes`): the unit of one manifest part,
//! kept in memory until the destination has said which of its chunks it
//! lacks. The chunker carries the tail of each read into the next, so the
//! cut points are exactly those of one pass over the whole image (a fastcdc
//! cut depends only on the bytes from the chunk's start).

use std::fs::File;
use std::io;

use fastcdc::v2020::FastCDC;
use wanmig_dedup::ChunkId;
use wanmig_wire::ChunkParams;

use crate::digest::BlockDigest;
use crate::io::read_exact_at_sparse;

/// One chunk of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutChunk {
    /// Start within the batch's data.
    pub start: usize,
    /// Length.
    pub len: u32,
    /// blake3 of the bytes; `None` when they are all zero.
    pub id: Option<ChunkId>,
}

/// A run of chunks and their bytes.
#[derive(Debug)]
pub struct Batch {
    /// Image offset of `data[0]`.
    pub offset: u64,
    /// The bytes of every chunk, back to back.
    pub data: Vec<u8>,
    /// The chunks.
    pub chunks: Vec<CutChunk>,
}

impl Batch {
    /// A chunk's bytes.
    pub fn bytes(&self, c: &CutChunk) -> &[u8] {
        &self.data[c.start..c.start + c.len as usize]
    }
}

/// Reads an image and cuts it into chunks.
#[derive(Debug)]
pub struct ImageChunker<'a> {
    file: &'a File,
    size: u64,
    params: ChunkParams,
    batch_bytes: usize,
    /// Next image offset to read.
    read_at: u64,
    /// Bytes read but not yet cut (a tail shorter than a maximal chunk).
    carry: Vec<u8>,
    /// Image offset of `carry[0]`.
    carry_at: u64,
}

impl<'a> ImageChunker<'a> {
    /// A chunker over the first `size` bytes of `file`, reading about
    /// `batch_bytes` (at least two maximal chunks) at a time.
    pub fn new(file: &'a File, size: u64, params: ChunkParams, batch_bytes: usize) -> Self {
        Self::starting_at(file, size, params, batch_bytes, 0)
    }

    /// Like [`ImageChunker::new`], from `offset` on (a chunk boundary of an
    /// earlier pass: fastcdc's cuts depend only on the bytes from a chunk's
    /// start, so the cuts after it are those a whole pass would make).
    pub fn starting_at(file: &'a File, size: u64, params: ChunkParams, batch_bytes: usize, offset: u64) -> Self {
        let batch_bytes = batch_bytes.max(2 * params.max as usize);
        let at = offset.min(size);
        ImageChunker { file, size, params, batch_bytes, read_at: at, carry: Vec::new(), carry_at: at }
    }

    /// The next batch, or `None` at the end. Every byte read is also fed to
    /// `digest`, in order.
    pub fn next_batch(&mut self, digest: &mut BlockDigest) -> io::Result<Option<Batch>> {
        self.read_batch(Some(digest))
    }

    /// The next batch of a pass over part of an image (a chunker whose
    /// `size` is where the part ends), whose digest is kept elsewhere.
    pub fn next_batch_unhashed(&mut self) -> io::Result<Option<Batch>> {
        self.read_batch(None)
    }

    fn read_batch(&mut self, digest: Option<&mut BlockDigest>) -> io::Result<Option<Batch>> {
        if self.carry_at >= self.size {
            return Ok(None);
        }
        let mut data = std::mem::take(&mut self.carry);
        let want = (self.batch_bytes as u64).min(self.size - self.read_at) as usize;
        let old = data.len();
        data.resize(old + want, 0);
        read_exact_at_sparse(self.file, &mut data[old..], self.read_at)?;
        if let Some(digest) = digest {
            digest.feed(self.read_at, &data[old..]);
        }
        self.read_at += want as u64;
        let at_end = self.read_at >= self.size;

        let p = self.params;
        let mut chunks: Vec<CutChunk> = FastCDC::new(&data, p.min, p.avg, p.max)
            .map(|c| CutChunk { start: c.offset, len: c.length as u32, id: None })
            .collect();
        // The last cut of a read that is not the image's end only ends
        // because the read did: cut it again with the next read.
        if !at_end && chunks.len() > 1 {
            chunks.pop();
        }
        let used = chunks.last().map_or(0, |c| c.start + c.len as usize);
        let offset = self.carry_at;
        self.carry = data[used..].to_vec();
        self.carry_at = offset + used as u64;
        data.truncate(used);
        for c in &mut chunks {
            let bytes = &data[c.start..c.start + c.len as usize];
            c.id = (!is_zero(bytes)).then(|| ChunkId::of(bytes));
        }
        Ok(Some(Batch { offset, data, chunks }))
    }
}

/// Whether every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64; align_to only yields aligned words.
        unsafe { b.align_to::<u64>() }
    };
    head.iter().all(|&x| x == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cut_all(data: &[u8], batch: usize) -> Vec<(u64, u32, Option<ChunkId>)> {
        let f = tempfile::tempfile().expect("tmp");
        f.write_all_at(data, 0).expect("write");
        let mut c = ImageChunker::new(&f, data.len() as u64, ChunkParams::DEFAULT, batch);
        let mut d = BlockDigest::new(data.len() as u64);
        let mut out = Vec::new();
        while let Some(b) = c.next_batch(&mut d).expect("read") {
            for ch in &b.chunks {
                assert_eq!(b.bytes(ch), &data[(b.offset as usize + ch.start)..][..ch.len as usize]);
                out.push((b.offset + ch.start as u64, ch.len, ch.id));
            }
        }
        assert_eq!(d.digest(), BlockDigest::of_bytes(data), "the digest saw every byte once, in order");
        out
    }

    #[test]
    fn batches_cut_exactly_like_one_pass() {
        let mut data = pseudo_random(5 << 20, 7);
        data[1 << 20..2 << 20].fill(0);
        let p = ChunkParams::DEFAULT;
        let whole: Vec<_> =
            FastCDC::new(&data, p.min, p.avg, p.max).map(|c| (c.offset as u64, c.length as u32)).collect();
        for batch in [512 << 10, 1 << 20, 3 << 20, 16 << 20] {
            let got = cut_all(&data, batch);
            let cuts: Vec<_> = got.iter().map(|&(o, l, _)| (o, l)).collect();
            assert_eq!(cuts, whole, "batch {batch}");
            assert!(got.iter().any(|c| c.2.is_none()), "the zeroed MiB yields zero chunks");
        }
    }

    #[test]
    fn an_insert_changes_only_nearby_chunks() {
        let data = pseudo_random(4 << 20, 3);
        let mut shifted = data.clone();
        shifted.splice(2 << 20..2 << 20, [1u8, 2, 3]);
        let a: std::collections::HashSet<_> = cut_all(&data, 1 << 20).into_iter().map(|c| c.2).collect();
        let b = cut_all(&shifted, 1 << 20);
        let new = b.iter().filter(|c| !a.contains(&c.2)).count();
        assert!(new <= 3, "{new} of {} chunks changed after a 3-byte insert", b.len());
    }

    #[test]
    fn a_pass_started_over_at_a_cut_cuts_and_digests_like_one_pass() {
        let data = pseudo_random(3 << 20, 11);
        let f = tempfile::tempfile().expect("tmp");
        f.write_all_at(&data, 0).expect("write");
        let whole = cut_all(&data, 1 << 20);
        // Start over from the end of the 5th chunk (not block-aligned).
        let (at, len, _) = whole[4];
        let restart = at + u64::from(len);
        assert_ne!(restart % crate::BLOCK, 0);
        let mut d = BlockDigest::new(data.len() as u64);
        let mut first = ImageChunker::new(&f, data.len() as u64, ChunkParams::DEFAULT, 1 << 20);
        first.next_batch(&mut d).expect("a first batch");
        let block_start = restart - restart % crate::BLOCK;
        d.refeed_at(restart, data[block_start as usize..restart as usize].to_vec());
        let mut again = ImageChunker::starting_at(&f, data.len() as u64, ChunkParams::DEFAULT, 1 << 20, restart);
        let mut cuts = Vec::new();
        while let Some(b) = again.next_batch(&mut d).expect("read") {
            cuts.extend(b.chunks.iter().map(|c| (b.offset + c.start as u64, c.len, c.id)));
        }
        assert_eq!(cuts, whole[5..], "the cuts after the restart are one pass's");
        assert_eq!(d.digest(), BlockDigest::of_bytes(&data), "and the digest too");
    }
}
