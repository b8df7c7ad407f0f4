//! virtio-blk on a raw image file.
//!
//! Every guest write is recorded in a [`DiskWriteLog`] at 4 KiB granularity:
//! what block-sync re-sends during a live migration. Reads into guest memory
//! go through the `GuestMemory` API, so the VMM's own dirty bitmap sees them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, Bytes, GuestAddress};

pub use super::persist::BlockSnapshot;
use super::persist::DeviceSnapshot;
use super::virtio_mmio::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMem;

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Granularity of the write log (QEMU's mirror uses 64 KiB; see FIELD-NOTES).
pub const WRITE_LOG_GRANULE: usize = 4096;
/// Largest piece copied between guest memory and the file at once.
const IO_CHUNK: usize = 64 * 1024;

/// Extents of the image the guest wrote, one bit per 4 KiB, get-and-clear;
/// and the guest's disk write throttle, which a migration sets when the
/// guest writes faster than the link carries (Bradford et al., VEE'07).
#[derive(Debug)]
pub struct DiskWriteLog {
    bits: AtomicBitmap,
    limit: std::sync::Mutex<Option<Pacer>>,
    /// The disk's named, persistent maps ([`crate::tracking`]): each
    /// write is recorded there too.
    tracked: crate::tracking::NamedMaps,
}

/// A token bucket for guest writes.
#[derive(Debug)]
struct Pacer {
    bytes_per_sec: f64,
    /// Bytes that may still be written now (negative: owed).
    credit: f64,
    last: std::time::Instant,
}

/// Longest single sleep of a throttled write before the cap is looked at again.
const MAX_PACE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

impl DiskWriteLog {
    /// A log for an image of `bytes` bytes, nothing written yet. (The
    /// block device makes its own; a VM that does its own disk I/O, such as
    /// a test double, makes one and records into it.)
    pub fn new(bytes: u64) -> Self {
        let len = usize::try_from(bytes).expect("image sizes fit usize on 64-bit hosts");
        let granule = std::num::NonZeroUsize::new(WRITE_LOG_GRANULE).expect("non-zero");
        DiskWriteLog {
            bits: AtomicBitmap::new(len.max(1), granule),
            limit: std::sync::Mutex::new(None),
            tracked: crate::tracking::NamedMaps::new(bytes),
        }
    }

    /// Records that `len` bytes at `offset` were written (in the named
    /// maps too).
    pub fn record(&self, offset: u64, len: usize) {
        self.bits.set_addr_range(offset as usize, len);
        self.tracked.record(offset, len);
    }

    /// The disk's named, persistent write-tracking maps.
    pub fn tracking(&self) -> &crate::tracking::NamedMaps {
        &self.tracked
    }

    /// Takes the bitmap (bit i = bytes `[i * 4096, (i + 1) * 4096)` written)
    /// and clears it.
    pub fn take(&self) -> Vec<u64> {
        self.bits.get_and_reset()
    }

    /// Caps the guest's write rate to this disk (`None`: no cap).
    pub fn set_write_limit(&self, bytes_per_sec: Option<u64>) {
        let mut l = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        *l = bytes_per_sec.map(|r| Pacer {
            bytes_per_sec: r.max(4096) as f64,
            credit: 0.0,
            last: std::time::Instant::now(),
        });
    }

    /// The cap, bytes/s.
    pub fn write_limit(&self) -> Option<u64> {
        self.limit.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|p| p.bytes_per_sec as u64)
    }

    /// Charges a write of `n` bytes, then sleeps until the guest is back
    /// under its cap, in slices of at most [`MAX_PACE_WAIT`] that look at the
    /// cap again: lifting it (as a migration does before it pauses the
    /// guest) ends the wait.
    fn pace(&self, n: usize) {
        let mut charge = n as f64;
        loop {
            let wait = {
                let mut l = self.limit.lock().unwrap_or_else(|e| e.into_inner());
                let Some(p) = l.as_mut() else { return };
                let now = std::time::Instant::now();
                // At most a tenth of a second of credit banks up.
                p.credit =
                    (p.credit + now.duration_since(p.last).as_secs_f64() * p.bytes_per_sec).min(p.bytes_per_sec / 10.0);
                p.last = now;
                p.credit -= std::mem::take(&mut charge);
                if p.credit >= 0.0 {
                    return;
                }
                std::time::Duration::from_secs_f64(-p.credit / p.bytes_per_sec).min(MAX_PACE_WAIT)
            };
            std::thread::sleep(wait);
        }
    }
}

/// Errors of the block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image's size could not be read.
    #[error("cannot stat the disk image")]
    Stat(#[source] std::io::Error),
    /// The image is not what the saved state was taken with.
    #[error("disk image is {found} bytes{ro}, the saved VM had {expected} bytes", ro = if *.read_only_mismatch { " or its read-only flag differs" } else { "" })]
    Mismatch {
        /// Size now.
        found: u64,
        /// Size at save.
        expected: u64,
        /// Whether read_only differs.
        read_only_mismatch: bool,
    },
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Block {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; 20],
    log: Arc<DiskWriteLog>,
    buf: Vec<u8>,
}

#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
}

impl Block {
    /// A device on `file` (its current size is the capacity, rounded down to sectors).
    pub fn new(file: File, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let size = file.metadata().map_err(BlockError::Stat)?.len() / SECTOR * SECTOR;
        let mut id_bytes = [0u8; 20];
        let n = id.len().min(20);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            size,
            read_only,
            id: id_bytes,
            log: Arc::new(DiskWriteLog::new(size)),
            buf: vec![0; IO_CHUNK],
        })
    }

    /// A device on `file` that must match the saved state.
    pub fn restore(file: File, read_only: bool, id: &str, s: &BlockSnapshot) -> Result<Self, BlockError> {
        let b = Self::new(file, read_only, id)?;
        if b.size != s.size || b.read_only != s.read_only {
            return Err(BlockError::Mismatch {
                found: b.size,
                expected: s.size,
                read_only_mismatch: b.read_only != s.read_only,
            });
        }
        Ok(b)
    }

    /// The log of guest writes, shared with whoever migrates the disk.
    pub fn write_log(&self) -> Arc<DiskWriteLog> {
        self.log.clone()
    }

    /// Executes one request; returns its status and the bytes written into
    /// guest memory before the status byte.
    fn execute(&mut self, descs: &[Desc], mem: &GuestMem) -> (u8, u32) {
        let Some((header, data)) = descs.split_first() else { return (S_IOERR, 0) };
        if header.write_only || header.len < 16 {
            return (S_IOERR, 0);
        }
        let Ok(raw) = mem.read_obj::<[u8; 16]>(header.addr) else { return (S_IOERR, 0) };
        let kind = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let Some(start) = sector.checked_mul(SECTOR).filter(|s| s.checked_add(total).is_some_and(|e| e <= self.size))
        else {
            return (S_IOERR, 0);
        };
        match kind {
            T_IN if data.iter().all(|d| d.write_only) => match self.read(start, data, mem) {
                Ok(()) => (S_OK, total as u32),
                Err(()) => (S_IOERR, 0),
            },
            T_OUT if data.iter().all(|d| !d.write_only) => {
                if self.read_only {
                    return (S_IOERR, 0);
                }
                match self.write(start, data, mem) {
                    Ok(()) => (S_OK, 0),
                    Err(()) => (S_IOERR, 0),
                }
            }
            T_FLUSH => (if self.file.sync_data().is_ok() { S_OK } else { S_IOERR }, 0),
            T_GET_ID => match data.first() {
                Some(d) if d.write_only => {
                    let n = (d.len as usize).min(self.id.len());
                    match mem.write_slice(&self.id[..n], d.addr) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            T_IN | T_OUT => (S_IOERR, 0),
            _ => (S_UNSUPP, 0),
        }
    }

    fn read(&mut self, mut offset: u64, data: &[Desc], mem: &GuestMem) -> Result<(), ()> {
        for d in data {
            let mut done = 0usize;
            while done < d.len as usize {
                let n = (d.len as usize - done).min(IO_CHUNK);
                self.file.read_exact_at(&mut self.buf[..n], offset).map_err(|_| ())?;
                mem.write_slice(&self.buf[..n], d.addr.unchecked_add(done as u64)).map_err(|_| ())?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }

    fn write(&mut self, mut offset: u64, data: &[Desc], mem: &GuestMem) -> Result<(), ()> {
        for d in data {
            let mut done = 0usize;
            while done < d.len as usize {
                let n = (d.len as usize - done).min(IO_CHUNK);
                mem.read_slice(&mut self.buf[..n], d.addr.unchecked_add(done as u64)).map_err(|_| ())?;
                self.log.pace(n);
                let written = self.file.write_all_at(&self.buf[..n], offset);
                // Record after writing (even a write that failed part-way:
                // some bytes may have landed): a migration takes the log,
                // then reads what it marks. Taken between the write and this
                // record, the read already sees the new bytes and the next
                // round sends them again; recorded first, a take between the
                // two would read the old bytes and lose the write.
                self.log.record(offset, n);
                written.map_err(|_| ())?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (le64, sectors) first; the rest
        // describes features we do not offer and reads as zero.
        let cap = (self.size / SECTOR).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| cap.get(o as usize).copied()).unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The chain iterator stops at the queue size and on loops, so this
            // is bounded by QUEUE_SIZE descriptors.
            let descs: Vec<Desc> =
                chain.map(|d| Desc { addr: d.addr(), len: d.len(), write_only: d.is_write_only() }).collect();
            let written = match descs.split_last() {
                Some((status, body)) if status.write_only && status.len >= 1 => {
                    let (s, n) = self.execute(body, mem);
                    if mem.write_obj(s, status.addr).is_ok() { n + 1 } else { n }
                }
                _ => 0, // nowhere to put a status: complete it with nothing written
            };
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn save(&self) -> DeviceSnapshot {
        DeviceSnapshot::Block(BlockSnapshot { size: self.size, read_only: self.read_only })
    }
}

#[cfg(test)]
mod pacing_tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_capped_guest_is_held_back_and_lifting_the_cap_frees_it() {
        let log = Arc::new(DiskWriteLog::new(1 << 20));
        // No cap: no wait.
        let t = Instant::now();
        log.pace(8 << 20);
        assert!(t.elapsed() < Duration::from_millis(50));
        // 4 MiB/s: 2 MiB in 64 KiB writes takes at least ~0.4 s (at most
        // 0.1 s of credit banks up, and none at the start).
        log.set_write_limit(Some(4 << 20));
        let t = Instant::now();
        for _ in 0..32 {
            log.pace(64 << 10);
        }
        assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
        // A write owing 16 s at 64 KiB/s ends when the cap is lifted.
        log.set_write_limit(Some(64 << 10));
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                log.pace(1 << 20);
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        log.set_write_limit(None);
        let waited = writer.join().expect("writer");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(log.write_limit(), None);
    }
}
