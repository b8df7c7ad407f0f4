//! The source's half of disk migration (block-sync over the session).
//!
//! 1. The first copy: each image is cut into content-defined chunks, batch
//!    by batch; each batch's manifest goes out on the control stream and
//!    the destination answers with the chunks its store lacks, which go
//!    out (compressed) on the bulk stream. Up to [`WINDOW`] batches are in
//!    flight, so the round trip per batch overlaps the reading of the next.
//! 2. Rounds of written extents: the VMM's 4 KiB write log is taken, the
//!    written pages are read and sent. While the guest writes faster than
//!    the link carries, its disk writes are throttled step by step
//!    (Bradford et al., VEE'07), so the copy always converges.
//! 3. Inside the stop-and-copy, the last written extents and a `DiskDone`
//!    per disk carrying the image digest, which the destination checks
//!    before it says ready.
//!
//! A disk the destination starts from an earlier sync's replica (it holds
//! it, and the write tracking here knows every block written since: see
//! `features::DISK_BASE`) skips step 1: runs of those blocks of at least
//! [`RUN_AS_CHUNKS`] go as manifest parts of the chunks over them (the
//! destination's store may hold them: data an insert only shifted, a file
//! copied), the rest with the first round's written extents. Its digest
//! still covers the whole image, read here (no wire bytes), so a wrong
//! base can never pass the check.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use wanmig_block_sync::throttle::{DiskRound, MIN_WRITE_LIMIT, next_write_limit};
use wanmig_block_sync::{Batch, BlockDigest, DirtyReader, ImageChunker};
use wanmig_dedup::{ChunkId, ChunkStore};
use wanmig_vmm::devices::block::DiskWriteLog;
use wanmig_wire::{Chunk, ChunkParams, DiskDone, Message, SourceEvent};

use super::error::SendError;
use super::link::Link;
use super::options::DiskBase;
use super::progress::Reporter;
use super::vm::SourceVm;
use crate::report::{DiskProgress, DiskStats, WireBytes};
use crate::steer::Steering;

/// Image bytes read and cut per manifest part.
pub const BATCH_BYTES: usize = 8 << 20;
/// Manifest parts awaiting their answer at once: 64 MiB of image in flight,
/// about the bandwidth-delay product of 1 Gbit/s × 100 ms with margin.
pub const WINDOW: usize = 8;
/// On a disk started from its base, runs of written blocks at least this
/// long go as the content-defined chunks over them, shorter ones as
/// blocks: a chunk (64 KiB on average) costs more than a few scattered
/// blocks, but a long run may be data the destination holds elsewhere
/// (`cargo bench -p wanmig-block-sync --bench dedup_image`: 13.1% of the
/// first move's bytes with this cut against 19.3% for blocks alone).
pub const RUN_AS_CHUNKS: u64 = 256 << 10;

/// One disk being copied.
#[derive(Debug)]
struct SourceDisk {
    index: u8,
    file: File,
    size: u64,
    digest: BlockDigest,
    log: Arc<DiskWriteLog>,
    /// Write-log words taken but not yet sent.
    pending: Vec<u64>,
    /// The chunk ids of the first copy, for the local store's root.
    ids: Vec<ChunkId>,
    /// How many ids there were when each manifest part began.
    ids_at_part: Vec<usize>,
    /// Chunk bytes sent for each manifest part (sent again after a resume
    /// from an earlier part).
    sent_at_part: Vec<u64>,
    /// The next manifest part's number, and where it starts.
    next_seq: u32,
    next_offset: u64,
    /// The first copy has reached the end of the image.
    first_done: bool,
    /// Write-log words sent in the round in flight (sent again if the
    /// round is cut), and that round's number.
    round_words: Vec<u64>,
    words_round: Option<u32>,
    /// Started from the destination's base (its first copy is only the
    /// parts for long runs of written blocks).
    based: bool,
    /// Started from the destination's base: the digest must still be
    /// read from the whole image (`true` until it is).
    base_digest_due: bool,
    /// Where each manifest part started and how long it was.
    part_ranges: Vec<(u64, u64)>,
}

/// The disks of a migrating VM.
#[derive(Debug)]
pub struct DiskCopy {
    disks: Vec<SourceDisk>,
    /// This host's chunk store, which keeps every chunk read (`--store`).
    store: Option<Arc<ChunkStore>>,
    vm_name: String,
    /// Best rate at which written extents have landed, bytes/s.
    best_rate: f64,
    /// Pending bytes after the previous round, to see whether rounds shrink.
    last_pending: Option<u64>,
    /// What happened, for the summary.
    pub stats: DiskStats,
}

/// `into |= words`, growing `into` as needed.
fn merge_words(into: &mut Vec<u64>, words: &[u64]) {
    if into.len() < words.len() {
        into.resize(words.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(words) {
        *a |= b;
    }
}

/// Marks the 4 KiB blocks of `[at, at + len)` in `words`.
fn mark_range(words: &mut Vec<u64>, at: u64, len: u64) {
    let g = wanmig_wire::disk::EXTENT_GRANULE;
    for b in at / g..(at + len).div_ceil(g) {
        let w = (b / 64) as usize;
        if words.len() <= w {
            words.resize(w + 1, 0);
        }
        words[w] |= 1 << (b % 64);
    }
}

/// Takes the runs of at least [`RUN_AS_CHUNKS`] out of the blocks marked
/// in `words`: (offset, length) in bytes, ascending.
fn take_long_runs(words: &mut [u64]) -> Vec<(u64, u64)> {
    let g = wanmig_wire::disk::EXTENT_GRANULE;
    let set = |words: &[u64], b: u64| words[(b / 64) as usize] & (1 << (b % 64)) != 0;
    let (blocks, mut runs, mut b) = (words.len() as u64 * 64, Vec::new(), 0);
    while b < blocks {
        if !set(words, b) {
            b += 1;
            continue;
        }
        let start = b;
        while b < blocks && set(words, b) {
            b += 1;
        }
        if (b - start) * g >= RUN_AS_CHUNKS {
            runs.push((start * g, (b - start) * g));
            for x in start..b {
                words[(x / 64) as usize] &= !(1 << (x % 64));
            }
        }
    }
    runs
}

/// The batches of content-defined chunks over runs of an image, run after
/// run (each cut afresh from its start: fastcdc finds the cuts of data
/// the destination holds again within a chunk or two).
struct Runs<'f> {
    file: &'f File,
    params: ChunkParams,
    runs: VecDeque<(u64, u64)>,
    current: Option<ImageChunker<'f>>,
}

impl<'f> Runs<'f> {
    fn new(file: &'f File, params: ChunkParams, runs: Vec<(u64, u64)>) -> Self {
        Runs { file, params, runs: runs.into(), current: None }
    }

    fn next_batch(&mut self) -> std::io::Result<Option<Batch>> {
        loop {
            if let Some(c) = &mut self.current {
                if let Some(b) = c.next_batch_unhashed()? {
                    return Ok(Some(b));
                }
                self.current = None;
            }
            let Some((at, len)) = self.runs.pop_front() else { return Ok(None) };
            self.current = Some(ImageChunker::starting_at(self.file, at + len, self.params, BATCH_BYTES, at));
        }
    }
}

/// Bits set in `words`.
fn count_words(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn disk_err(index: u8, e: std::io::Error) -> SendError {
    SendError::Disk(format!("disk {index}: {e}"))
}

impl DiskCopy {
    /// Opens the images of `vm` for reading. Disks are copied in 4 KiB units:
    /// an image whose size is not a multiple is refused.
    pub fn new(vm: &dyn SourceVm, store: Option<Arc<ChunkStore>>) -> Result<Self, SendError> {
        let mut disks = Vec::new();
        for (i, (d, log)) in vm.config().disks.iter().zip(vm.disk_write_logs()).enumerate() {
            let file = File::open(&d.path).map_err(|e| SendError::Disk(format!("{}: {e}", d.path.display())))?;
            let size = file.metadata().map_err(|e| SendError::Disk(format!("{}: {e}", d.path.display())))?.len();
            if size % wanmig_wire::disk::EXTENT_GRANULE != 0 {
                return Err(SendError::Disk(format!(
                    "{}: {size} bytes is not a multiple of 4 KiB, which disk migration needs",
                    d.path.display()
                )));
            }
            let digest = BlockDigest::new(size);
            let (pending, ids) = (Vec::new(), Vec::new());
            disks.push(SourceDisk {
                index: i as u8,
                file,
                size,
                digest,
                log: log.clone(),
                pending,
                ids,
                ids_at_part: Vec::new(),
                sent_at_part: Vec::new(),
                next_seq: 0,
                next_offset: 0,
                first_done: size == 0,
                round_words: Vec::new(),
                words_round: None,
                based: false,
                base_digest_due: false,
                part_ranges: Vec::new(),
            });
        }
        let image_bytes = disks.iter().map(|d| d.size).sum();
        let stats = DiskStats { disks: disks.len() as u32, image_bytes, ..DiskStats::default() };
        let vm_name = vm.config().name.clone();
        Ok(DiskCopy { disks, store, vm_name, best_rate: 0.0, last_pending: None, stats })
    }

    /// The disks the destination starts from their bases (`based`, as
    /// agreed): no first copy; the blocks written since the base
    /// (`bases`) go with the first round's written extents.
    pub fn start_from_bases(&mut self, based: &[bool], bases: &[Option<DiskBase>]) {
        for ((d, &b), base) in self.disks.iter_mut().zip(based).zip(bases) {
            let (true, Some(base)) = (b, base) else { continue };
            merge_words(&mut d.pending, &base.written);
            (d.first_done, d.based, d.base_digest_due) = (true, true, true);
            self.stats.from_base += 1;
            self.stats.base_written_bytes += count_words(&base.written) * wanmig_wire::disk::EXTENT_GRANULE;
        }
    }

    /// A disk started from its base: the guest's writes so far join the
    /// pending blocks (the write log is a superset of what the tracking
    /// handed over after it), then the whole image is hashed. Writes from
    /// now on are in the log again and re-hashed when sent.
    fn hash_based(&mut self, i: usize) -> Result<(), SendError> {
        let d = &mut self.disks[i];
        let words = d.log.take();
        merge_words(&mut d.pending, &words);
        d.digest.refresh(&d.file).map_err(|e| disk_err(d.index, e))?;
        d.base_digest_due = false;
        Ok(())
    }

    /// The first copy of every disk (or, after a resume, what is left of
    /// it): manifests, the chunks the destination lacks, and (with a local
    /// store) every chunk kept here.
    pub async fn first_copy(
        &mut self,
        link: &mut Link,
        wire: &mut WireBytes,
        chunking: ChunkParams,
        report: &mut Reporter<'_>,
        steer: &Steering,
    ) -> Result<(), SendError> {
        let started = Instant::now();
        for i in 0..self.disks.len() {
            if self.disks[i].base_digest_due {
                self.hash_based(i)?;
                let file = self.disks[i].file.try_clone().map_err(|e| disk_err(i as u8, e))?;
                let mut runs = Runs::new(&file, chunking, take_long_runs(&mut self.disks[i].pending));
                self.pipeline(i, |_| runs.next_batch(), link, wire, report, steer, started).await?;
            }
            if self.disks[i].first_done {
                continue;
            }
            if self.disks[i].next_offset == 0 {
                // Track writes from before the first byte is read.
                self.disks[i].log.take();
            }
            let file = self.disks[i].file.try_clone().map_err(|e| disk_err(i as u8, e))?;
            let (size, from) = (self.disks[i].size, self.disks[i].next_offset);
            let mut chunker = ImageChunker::starting_at(&file, size, chunking, BATCH_BYTES, from);
            self.pipeline(i, |digest| chunker.next_batch(digest), link, wire, report, steer, started).await?;
            self.disks[i].first_done = true;
        }
        self.keep_roots()?;
        self.stats.first_copy_ms += started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Offers the batches `next` cuts (handed the disk's digest, to feed
    /// or not) as manifest parts of disk `i`, up to [`WINDOW`] awaiting
    /// their answer at once, and sends the chunks each answer asks for.
    #[allow(clippy::too_many_arguments)]
    async fn pipeline(
        &mut self,
        i: usize,
        mut next: impl FnMut(&mut BlockDigest) -> std::io::Result<Option<Batch>>,
        link: &mut Link,
        wire: &mut WireBytes,
        report: &mut Reporter<'_>,
        steer: &Steering,
        started: Instant,
    ) -> Result<(), SendError> {
        let mut window: VecDeque<Batch> = VecDeque::new();
        loop {
            while window.len() < WINDOW {
                let Some(batch) = next(&mut self.disks[i].digest).map_err(|e| disk_err(i as u8, e))? else { break };
                self.offer(i, &batch, link, wire).await?;
                window.push_back(batch);
            }
            let Some(batch) = window.pop_front() else { break };
            // A cap changed by an operator applies from the next batch.
            link.bulk.set_rate(steer.tunables().max_bandwidth);
            self.send_needed(i, &batch, link, wire).await?;
            let done = self.copied();
            let rate = wire.disk as f64 / started.elapsed().as_secs_f64().max(1e-3);
            report.disk(self.progress(done), wire.total, rate);
        }
        Ok(())
    }

    /// Image bytes the first copy has offered so far.
    fn copied(&self) -> u64 {
        self.disks.iter().map(|d| if d.first_done { d.size } else { d.next_offset }).sum()
    }

    /// After a resume: each disk's first copy goes on from where the
    /// destination has it (`points`, checked by the session machine), and
    /// the written blocks of the round that was cut go again. Returns the
    /// bytes that go again.
    pub fn rewind(&mut self, points: &[wanmig_wire::DiskPoint]) -> Result<u64, SendError> {
        let mut again = 0u64;
        for (d, p) in self.disks.iter_mut().zip(points) {
            let words = std::mem::take(&mut d.round_words);
            again += count_words(&words) * wanmig_wire::disk::EXTENT_GRANULE;
            merge_words(&mut d.pending, &words);
            d.words_round = None;
            if d.based {
                // Parts from the cut on go again as written blocks.
                let part = p.next_seq as usize;
                for &(at, len) in d.part_ranges.get(part..).unwrap_or_default() {
                    mark_range(&mut d.pending, at, len);
                }
                again += d.sent_at_part.get(part..).map_or(0, |s| s.iter().sum());
                d.part_ranges.truncate(part);
                d.sent_at_part.truncate(part);
                d.ids_at_part.truncate(part);
                (d.next_seq, d.next_offset) = (p.next_seq, p.next_offset);
                continue;
            }
            if p.next_offset >= d.size && d.first_done {
                continue;
            }
            let part = p.next_seq as usize;
            again += d.sent_at_part.get(part..).map_or(0, |s| s.iter().sum());
            d.sent_at_part.truncate(part);
            d.part_ranges.truncate(part);
            d.ids.truncate(d.ids_at_part.get(part).copied().unwrap_or(d.ids.len()));
            d.ids_at_part.truncate(part);
            (d.next_seq, d.next_offset, d.first_done) = (p.next_seq, p.next_offset, p.next_offset >= d.size);
            // The digest is fed again from there: it needs the start of
            // that offset's block.
            let block_start = p.next_offset - p.next_offset % wanmig_block_sync::BLOCK;
            let mut prefix = vec![0u8; (p.next_offset - block_start) as usize];
            wanmig_block_sync::io::read_exact_at(&d.file, &mut prefix, block_start)
                .map_err(|e| disk_err(d.index, e))?;
            d.digest.refeed_at(p.next_offset, prefix);
        }
        Ok(again)
    }

    /// Whether every disk's first copy is complete.
    pub fn first_copy_done(&self) -> bool {
        self.disks.iter().all(|d| d.first_done)
    }

    fn progress(&self, done: u64) -> DiskProgress {
        DiskProgress {
            bytes_done: done,
            bytes_total: self.stats.image_bytes,
            chunks_sent: self.stats.chunks_sent,
            chunks_present: self.stats.chunks_present,
        }
    }

    /// Sends a batch's manifest (and keeps its chunks in the local store).
    async fn offer(&mut self, i: usize, batch: &Batch, link: &mut Link, wire: &mut WireBytes) -> Result<(), SendError> {
        let (index, seq) = (self.disks[i].index, self.disks[i].next_seq);
        let chunks: Vec<(u32, Option<ChunkId>)> = batch.chunks.iter().map(|c| (c.len, c.id)).collect();
        let msg = link.session.manifest(index, seq, batch.offset, &chunks)?;
        let ids = self.disks[i].ids.len();
        self.disks[i].ids_at_part.push(ids);
        self.disks[i].sent_at_part.push(0);
        self.disks[i].part_ranges.push((batch.offset, batch.data.len() as u64));
        self.disks[i].next_seq += 1;
        self.disks[i].next_offset = batch.offset + batch.data.len() as u64;
        let n = link.send_ctl(&msg, wire).await? as u64;
        self.stats.manifest_bytes += n;
        wire.disk += n;
        let disk = &mut self.disks[i];
        for c in &batch.chunks {
            self.stats.chunks += 1;
            match c.id {
                None => self.stats.zero_chunks += 1,
                Some(id) => {
                    self.stats.data_bytes += u64::from(c.len);
                    disk.ids.push(id);
                    if let Some(store) = &self.store {
                        store.put(&id, batch.bytes(c)).map_err(|e| SendError::Disk(format!("{e}")))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits for the answer to a batch's manifest and sends what it asks for.
    async fn send_needed(
        &mut self,
        i: usize,
        batch: &Batch,
        link: &mut Link,
        wire: &mut WireBytes,
    ) -> Result<(), SendError> {
        let index = self.disks[i].index;
        let (seq, chunks) = match link.next_event().await? {
            SourceEvent::Need { disk, seq, chunks } if disk == index => (seq, chunks),
            e => return Err(SendError::Peer(format!("{e:?} during the disk copy"))),
        };
        for &k in &chunks {
            // The machine checked that each index names a chunk with data.
            let c = &batch.chunks[k as usize];
            let id = c.id.ok_or_else(|| SendError::Peer(format!("chunk {k} has no data")))?;
            let data = batch.bytes(c).to_vec();
            let msg = Message::DiskChunk(Chunk { disk: index, offset: batch.offset + c.start as u64, id, data });
            link.bulk.send(&msg, wire).await?;
            self.stats.chunks_sent += 1;
            self.stats.chunk_bytes_sent += u64::from(c.len);
            if let Some(sent) = self.disks[i].sent_at_part.get_mut(seq as usize) {
                *sent += u64::from(c.len);
            }
        }
        let with_id = batch.chunks.iter().filter(|c| c.id.is_some()).count();
        self.stats.chunks_present += (with_id - chunks.len()) as u64;
        Ok(())
    }

    /// Keeps the first copy's chunks durable in the local store.
    fn keep_roots(&self) -> Result<(), SendError> {
        let Some(store) = &self.store else { return Ok(()) };
        // A disk started from its base was read only in runs: its root
        // stays what the last whole copy made it.
        for d in self.disks.iter().filter(|d| !d.based) {
            store
                .set_root(&format!("{}/disk{}", self.vm_name, d.index), &d.ids)
                .map_err(|e| SendError::Disk(format!("{e}")))?;
        }
        store.commit().map_err(|e| SendError::Disk(format!("{e}")))
    }

    /// Takes the write logs into the pending set; returns the pending bytes.
    pub fn harvest(&mut self) -> u64 {
        for d in &mut self.disks {
            let words = d.log.take();
            merge_words(&mut d.pending, &words);
        }
        self.pending_bytes()
    }

    /// Written bytes not yet sent.
    pub fn pending_bytes(&self) -> u64 {
        let pages: u64 = self.disks.iter().map(|d| count_words(&d.pending)).sum();
        pages * wanmig_wire::disk::EXTENT_GRANULE
    }

    /// Sends every pending extent; returns the bytes of disk data sent.
    pub async fn send_pending(&mut self, link: &mut Link, wire: &mut WireBytes) -> Result<u64, SendError> {
        let mut sent = 0u64;
        let round = link.session.round();
        for d in &mut self.disks {
            let words = std::mem::take(&mut d.pending);
            // What a round that is cut carried goes again after a resume.
            if d.words_round != Some(round) {
                (d.round_words, d.words_round) = (Vec::new(), Some(round));
            }
            merge_words(&mut d.round_words, &words);
            let mut reader = DirtyReader::new(&d.file, d.size, &words);
            while let Some(w) = reader.next_batch(d.index, &mut d.digest).map_err(|e| disk_err(d.index, e))? {
                sent += w.data.len() as u64;
                link.bulk.send(&Message::DiskWrites(w), wire).await?;
            }
        }
        self.stats.extent_bytes += sent;
        Ok(sent)
    }

    /// After a round that put `sent` bytes of extents on the wire in `secs`:
    /// learns the rate at which extents land and, when the guest's writes
    /// no longer shrink from round to round while it writes at half the
    /// link's capacity or more (`pending` is what it wrote meanwhile;
    /// `link_rate` the expected capacity, bytes/s), tightens its write cap
    /// one step.
    pub fn after_round(&mut self, sent: u64, secs: f64, pending: u64, link_rate: f64) {
        if sent > 0 {
            self.best_rate = self.best_rate.max(sent as f64 / secs.max(1e-6));
        }
        let round =
            DiskRound { pending, last_pending: self.last_pending, secs, capacity: self.best_rate.max(link_rate) };
        self.last_pending = Some(pending);
        // The cap stays until the migration ends, so the last one set is in force.
        let current = self.stats.write_limit;
        let Some(next) = next_write_limit(current, &round).filter(|&n| Some(n) != current) else { return };
        // The cap is for all disks together.
        let each = (next / self.disks.len().max(1) as u64).max(MIN_WRITE_LIMIT / 4);
        for d in &self.disks {
            d.log.set_write_limit(Some(each));
        }
        self.stats.write_limit = Some(next);
    }

    /// Rate at which extents have landed, bytes/s (0 before any round).
    pub fn rate(&self) -> f64 {
        self.best_rate
    }

    /// Lifts the write caps (after the migration, or when it fails).
    pub fn unthrottle(vm: &dyn SourceVm) {
        for l in vm.disk_write_logs() {
            l.set_write_limit(None);
        }
    }

    /// Inside the stop-and-copy (disks synced, guest paused): the last
    /// written extents and each disk's `DiskDone`.
    pub async fn finish(&mut self, link: &mut Link, wire: &mut WireBytes) -> Result<u64, SendError> {
        self.harvest();
        let sent = self.send_pending(link, wire).await?;
        self.stats.final_bytes = sent;
        for d in &self.disks {
            let done = link.session.disk_done(DiskDone { disk: d.index, size: d.size, digest: d.digest.digest() })?;
            link.bulk.send(&done, wire).await?;
        }
        // With nothing sent the ratio is unbounded: reported as 0, and the
        // summary says every chunk was already there.
        self.stats.dedup_ratio = if self.stats.chunk_bytes_sent > 0 {
            self.stats.data_bytes as f64 / self.stats.chunk_bytes_sent as f64
        } else {
            0.0
        };
        Ok(sent)
    }
}
