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

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use wanmig_block_sync::throttle::{DiskRound, MIN_WRITE_LIMIT, next_write_limit};
use wanmig_block_sync::{Batch, BlockDigest, DirtyReader, ImageChunker};
use wanmig_dedup::{ChunkId, ChunkStore};
use wanmig_transport::{FrameSender, TransportError};
use wanmig_vmm::Vm;
use wanmig_vmm::devices::block::DiskWriteLog;
use wanmig_wire::{Chunk, ChunkParams, DiskDone, Manifest, ManifestChunk, Message, Source};

use crate::report::{DiskStats, Event, WireBytes};
use crate::source::{BulkSender, SendError, next_answer, receive};

/// Image bytes read and cut per manifest part.
pub const BATCH_BYTES: usize = 8 << 20;
/// Manifest parts awaiting their answer at once: 64 MiB of image in flight,
/// about the bandwidth-delay product of 1 Gbit/s × 100 ms with margin.
pub const WINDOW: usize = 8;

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
}

/// The disks of a migrating VM.
#[derive(Debug)]
pub struct DiskCopy {
    disks: Vec<SourceDisk>,
    params: ChunkParams,
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

impl DiskCopy {
    /// Opens the images of `vm` for reading. Disks are copied in 4 KiB units:
    /// an image whose size is not a multiple is refused.
    pub fn new(vm: &Vm, params: ChunkParams, store: Option<Arc<ChunkStore>>) -> Result<Self, SendError> {
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
            disks.push(SourceDisk {
                index: i as u8,
                file,
                size,
                digest: BlockDigest::new(size),
                log: log.clone(),
                pending: Vec::new(),
                ids: Vec::new(),
            });
        }
        let stats = DiskStats {
            disks: disks.len() as u32,
            image_bytes: disks.iter().map(|d| d.size).sum(),
            ..DiskStats::default()
        };
        Ok(DiskCopy {
            disks,
            params,
            store,
            vm_name: vm.config().name.clone(),
            best_rate: 0.0,
            last_pending: None,
            stats,
        })
    }

    /// The first copy of every disk: manifests, the chunks the destination
    /// lacks, and (with a local store) every chunk kept here.
    #[allow(clippy::too_many_arguments)]
    pub async fn first_copy(
        &mut self,
        ctl: &mut FrameSender,
        bulk: &mut BulkSender,
        wire: &mut WireBytes,
        msgs: &mut mpsc::Receiver<Result<Message, TransportError>>,
        session: &mut Source,
        deadline: Instant,
        progress: &mut dyn FnMut(&Event),
    ) -> Result<(), SendError> {
        let started = Instant::now();
        let total = self.stats.image_bytes;
        let mut done = 0u64;
        for disk in &mut self.disks {
            // Track writes from before the first byte is read.
            disk.log.take();
            let mut chunker = ImageChunker::new(&disk.file, disk.size, self.params, BATCH_BYTES);
            let mut window: VecDeque<(u32, Batch)> = VecDeque::new();
            let mut seq = 0u32;
            loop {
                while window.len() < WINDOW {
                    let Some(batch) = chunker.next_batch(&mut disk.digest).map_err(|e| disk_err(disk.index, e))? else {
                        break;
                    };
                    let manifest = Manifest {
                        disk: disk.index,
                        seq,
                        offset: batch.offset,
                        chunks: batch.chunks.iter().map(|c| ManifestChunk { len: c.len, id: c.id }).collect(),
                    };
                    let n = ctl.send(&Message::DiskManifest(manifest)).await? as u64;
                    self.stats.manifest_bytes += n;
                    wire.disk += n;
                    wire.total += n;
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
                    window.push_back((seq, batch));
                    seq += 1;
                }
                let Some((seq, batch)) = window.pop_front() else { break };
                let m = next_answer(msgs, deadline).await?;
                receive(session, &m)?;
                let need = match m {
                    Message::DiskNeed(n) => n,
                    Message::Abort { reason } => {
                        return Err(SendError::Peer(format!("destination aborted: {reason}")));
                    }
                    m => return Err(SendError::Peer(format!("unexpected {} during the disk copy", m.name()))),
                };
                if need.disk != disk.index || need.seq != seq {
                    return Err(SendError::Peer(format!(
                        "the destination answered manifest {}/{} while {}/{seq} was due",
                        need.disk, need.seq, disk.index
                    )));
                }
                for &i in &need.chunks {
                    let c = batch.chunks.get(i as usize).filter(|c| c.id.is_some()).ok_or_else(|| {
                        SendError::Peer(format!("the destination needs chunk {i} of manifest {seq}, which it lacks"))
                    })?;
                    let id = c.id.expect("filtered");
                    let msg = Message::DiskChunk(Chunk {
                        disk: disk.index,
                        offset: batch.offset + c.start as u64,
                        id,
                        data: batch.bytes(c).to_vec(),
                    });
                    bulk.send_message(&msg, wire).await?;
                    self.stats.chunks_sent += 1;
                    self.stats.chunk_bytes_sent += u64::from(c.len);
                }
                // Every index named a distinct chunk with an id (checked above).
                let with_id = batch.chunks.iter().filter(|c| c.id.is_some()).count();
                self.stats.chunks_present += (with_id - need.chunks.len()) as u64;
                done += batch.data.len() as u64;
                progress(&Event::Disk {
                    phase: "copy".into(),
                    bytes_done: done,
                    bytes_total: total,
                    chunks_sent: self.stats.chunks_sent,
                    chunks_present: self.stats.chunks_present,
                    elapsed_s: started.elapsed().as_secs_f64(),
                });
            }
        }
        if let Some(store) = &self.store {
            for d in &self.disks {
                store
                    .set_root(&format!("{}/disk{}", self.vm_name, d.index), &d.ids)
                    .map_err(|e| SendError::Disk(format!("{e}")))?;
            }
            store.commit().map_err(|e| SendError::Disk(format!("{e}")))?;
        }
        self.stats.first_copy_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Takes the write logs into the pending set; returns the pending bytes.
    pub fn harvest(&mut self) -> u64 {
        for d in &mut self.disks {
            let words = d.log.take();
            if d.pending.len() < words.len() {
                d.pending.resize(words.len(), 0);
            }
            for (p, w) in d.pending.iter_mut().zip(words) {
                *p |= w;
            }
        }
        self.pending_bytes()
    }

    /// Written bytes not yet sent.
    pub fn pending_bytes(&self) -> u64 {
        let pages: u64 = self.disks.iter().flat_map(|d| &d.pending).map(|w| u64::from(w.count_ones())).sum();
        pages * wanmig_wire::disk::EXTENT_GRANULE
    }

    /// Sends every pending extent; returns the bytes of disk data sent.
    pub async fn send_pending(&mut self, bulk: &mut BulkSender, wire: &mut WireBytes) -> Result<u64, SendError> {
        let mut sent = 0u64;
        for d in &mut self.disks {
            let words = std::mem::take(&mut d.pending);
            let mut reader = DirtyReader::new(&d.file, d.size, &words);
            while let Some(w) = reader.next_batch(d.index, &mut d.digest).map_err(|e| disk_err(d.index, e))? {
                sent += w.data.len() as u64;
                bulk.send_message(&Message::DiskWrites(w), wire).await?;
            }
        }
        self.stats.extent_bytes += sent;
        Ok(sent)
    }

    /// After a round that put `sent` bytes of extents on the wire in `secs`:
    /// learns the rate at which
    /// extents land and, when the guest's writes no longer shrink from
    /// round to round while it writes at half the link's capacity or more
    /// (`pending` is what it wrote meanwhile; `link_rate` the expected
    /// capacity, bytes/s), tightens its write cap one step.
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
    pub fn unthrottle(vm: &Vm) {
        for l in vm.disk_write_logs() {
            l.set_write_limit(None);
        }
    }

    /// Inside the stop-and-copy (disks synced, guest paused): the last
    /// written extents and each disk's `DiskDone`.
    pub async fn finish(&mut self, bulk: &mut BulkSender, wire: &mut WireBytes) -> Result<u64, SendError> {
        self.harvest();
        let sent = self.send_pending(bulk, wire).await?;
        self.stats.final_bytes = sent;
        for d in &self.disks {
            let done = DiskDone { disk: d.index, size: d.size, digest: d.digest.digest() };
            bulk.send_message(&Message::DiskDone(done), wire).await?;
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

fn disk_err(index: u8, e: std::io::Error) -> SendError {
    SendError::Disk(format!("disk {index}: {e}"))
}
