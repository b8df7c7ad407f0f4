//! A VM snapshot on disk: a directory with two files.
//!
//! - `state.bin`: everything but RAM, in the checksummed container of
//!   [`crate::state`] (vCPUs, irqchip, PIT, clock, devices, memory layout).
//! - `memory.bin`: guest RAM, the regions of the layout back to back. Zero
//!   pages are holes (the file is sparse), and restore reads only the data
//!   extents (`SEEK_DATA`/`SEEK_HOLE`).
//!
//! Disk images are not copied: the snapshot names their sizes and expects
//! the same images, unmodified, at restore.
//!
//! A snapshot is written into a directory that holds none yet
//! ([`SnapshotDir`]): the directory itself may not be a symbolic link, and
//! every file is created relative to it with `O_EXCL | O_NOFOLLOW` and
//! renamed with `RENAME_NOREPLACE`, so whoever may ask for a snapshot (a
//! control-socket client) can neither overwrite a file nor write through a
//! link someone planted.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio_mmio::MmioSnapshot;
use crate::memory::GuestRam;
use crate::state::Pod;
use crate::vcpu::VcpuState;
use wanmig_types::PAGE_SIZE_U64 as PAGE_SIZE;

/// Name of the state file inside a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Name of the memory file inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";

/// Everything about a paused VM except its RAM contents.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct VmState {
    /// The VM's name at save time.
    pub name: String,
    /// RAM regions: (guest-physical start, length).
    pub memory: Vec<(u64, u64)>,
    /// One entry per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// The 8259 PICs and the IOAPIC: master, slave, IOAPIC.
    pub irqchips: Vec<Pod<kvm_irqchip>>,
    /// The i8254 PIT.
    pub pit: Pod<kvm_pit_state2>,
    /// kvmclock.
    pub clock: Pod<kvm_clock_data>,
    /// The serial console.
    pub serial: SerialSnapshot,
    /// virtio-mmio slots in order.
    pub virtio: Vec<MmioSnapshot>,
}

/// Errors reading or writing guest RAM files.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// An I/O error on the memory file.
    #[error("cannot {what} the memory file")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file does not have the size the layout needs.
    #[error("memory file is {found} bytes, the saved layout needs {expected}")]
    Size {
        /// Its size.
        found: u64,
        /// The layout's size.
        expected: u64,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MemoryFileError {
    move |source| MemoryFileError::Io { what, source }
}

/// Host view of a whole region as a byte slice.
///
/// # Safety
/// The caller must ensure nothing writes the region while the slice lives
/// (all vCPUs paused, no device activity) — or accept torn reads.
unsafe fn region_bytes(ram: &GuestRam, start: GuestAddress, len: u64) -> &[u8] {
    let host = ram.mem().get_host_address(start).expect("region start is mapped");
    // SAFETY: the region is `len` bytes mapped at `host` for the lifetime of
    // `ram`; the caller guarantees the absence of concurrent writers.
    unsafe { std::slice::from_raw_parts(host, len as usize) }
}

/// Writes guest RAM to `path`, skipping zero pages (left as holes), without
/// waiting for stable storage (see [`sync_file`]). Returns the number of
/// bytes of data written.
pub fn save_memory(ram: &GuestRam, path: &Path) -> Result<u64, MemoryFileError> {
    save_memory_to(ram, &create_direct(path)?)
}

/// Writes guest RAM to `file` (empty, open for writing) as [`save_memory`] does.
pub fn save_memory_to(ram: &GuestRam, file: &File) -> Result<u64, MemoryFileError> {
    let mut offset = 0u64;
    let mut written = 0u64;
    for (start, len) in ram.regions() {
        // SAFETY: snapshots are taken with every vCPU parked; devices only
        // run on vCPU threads.
        let bytes = unsafe { region_bytes(ram, start, len) };
        let mut run: Option<usize> = None; // start of a run of non-zero pages
        for (i, page) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
            let zero = is_zero(page);
            match (run, zero) {
                (None, false) => run = Some(i),
                (Some(r), true) => {
                    written += write_run(file, bytes, r, i, offset)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(r) = run {
            written += write_run(file, bytes, r, bytes.len().div_ceil(PAGE_SIZE as usize), offset)?;
        }
        offset += len;
    }
    file.set_len(offset).map_err(io("size"))?;
    Ok(written)
}

/// Waits until `path` is on stable storage.
pub fn sync_file(path: &Path) -> Result<(), MemoryFileError> {
    File::open(path).and_then(|f| f.sync_all()).map_err(io("sync"))
}

/// Creates `path` for O_DIRECT writes where the filesystem supports them:
/// guest RAM is page-aligned and written in whole pages, so it can bypass
/// the page cache (no double buffering of gigabytes, and nothing left to
/// write back at sync). Falls back to buffered I/O (tmpfs, for one).
fn create_direct(path: &Path) -> Result<File, MemoryFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    match opts.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => opts.open(path).map_err(io("create")),
        Err(e) => Err(io("create")(e)),
    }
}

/// Why a snapshot could not be written into its directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotDirError {
    /// The directory cannot take a new snapshot.
    #[error("cannot save a snapshot in {path}: {reason}")]
    Refused {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing a snapshot file failed.
    #[error("cannot write snapshot file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A directory being filled with one new snapshot: not a symbolic link,
/// holding no snapshot file yet; files are created in it exclusively and
/// renamed without replacing anything.
#[derive(Debug)]
pub struct SnapshotDir {
    dir: File,
    path: PathBuf,
}

/// Every name a snapshot (or an interrupted save) leaves in its directory.
const SNAPSHOT_NAMES: [&str; 4] = [STATE_FILE, MEMORY_FILE, "state.bin.tmp", "memory.bin.partial"];

impl SnapshotDir {
    /// Creates `path` if missing (its parents too) and opens it, refusing a
    /// symbolic link, a non-directory, and a directory that already holds a
    /// snapshot or part of one.
    pub fn open(path: &Path) -> Result<SnapshotDir, SnapshotDirError> {
        let refuse = |reason: String| SnapshotDirError::Refused { path: path.into(), reason };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| refuse(format!("cannot create its parent: {e}")))?;
        }
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(refuse(format!("cannot create it: {e}"))),
        }
        let dir = crate::files::open_dir_nofollow(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR)
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                refuse("it is a symbolic link".into())
            }
            Some(libc::ENOTDIR) => refuse("it is not a directory".into()),
            _ => refuse(e.to_string()),
        })?;
        for name in SNAPSHOT_NAMES {
            if crate::files::exists_at(&dir, name).map_err(|e| refuse(e.to_string()))? {
                return Err(refuse(format!("it already holds {name} (a snapshot is never overwritten)")));
            }
        }
        Ok(SnapshotDir { dir, path: path.into() })
    }

    /// Creates file `name` (owner-only), which must not exist; for O_DIRECT
    /// writes where the filesystem supports them when `direct` (guest RAM
    /// is page-aligned and written in whole pages: no double buffering of
    /// gigabytes, nothing left to write back at sync).
    pub fn create_file(&self, name: &str, direct: bool) -> Result<File, SnapshotDirError> {
        let err = |source| SnapshotDirError::Write { path: self.path.join(name), source };
        let file = crate::files::create_new_at(&self.dir, name, 0o600, 0).map_err(err)?;
        if direct {
            // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
            unsafe {
                let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                // Refused on tmpfs and others: buffered I/O then.
                let _ = libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT);
            }
        }
        Ok(file)
    }

    /// Renames `from` to `to` within the directory; `to` must not exist.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), SnapshotDirError> {
        let (d, f, t) = (Some(&self.dir), Path::new(from), Path::new(to));
        crate::files::rename_at(d, f, d, t, crate::files::Rename::NoReplace)
            .map_err(|source| SnapshotDirError::Write { path: self.path.join(to), source })
    }

    /// Makes the directory's entries durable.
    pub fn sync(&self) -> Result<(), SnapshotDirError> {
        self.dir.sync_all().map_err(|source| SnapshotDirError::Write { path: self.path.clone(), source })
    }
}

/// Opens `path` for O_DIRECT reads where supported (extents are
/// filesystem-block aligned and guest RAM page-aligned), else buffered.
fn open_direct(path: &Path) -> Result<File, MemoryFileError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => File::open(path).map_err(io("open")),
        Err(e) => Err(io("open")(e)),
    }
}

fn write_run(file: &File, bytes: &[u8], first: usize, end: usize, base: u64) -> Result<u64, MemoryFileError> {
    let p = PAGE_SIZE as usize;
    let data = &bytes[first * p..(end * p).min(bytes.len())];
    file.write_all_at(data, base + (first * p) as u64).map_err(io("write"))?;
    Ok(data.len() as u64)
}

fn is_zero(page: &[u8]) -> bool {
    // Word-wise: the compiler vectorises this loop.
    let (head, words, tail) = {
        // SAFETY: any byte pattern is a valid u64; align_to handles alignment.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().fold(0, |acc, &w| acc | w) == 0 && tail.iter().all(|&b| b == 0)
}

/// Fills guest RAM from `path`, which must match the RAM's layout exactly.
/// Reads only the file's data extents: holes are zero pages, already zero in
/// fresh guest memory. Returns the bytes read.
pub fn load_memory(ram: &GuestRam, path: &Path) -> Result<u64, MemoryFileError> {
    let file = open_direct(path)?;
    let expected = ram.size();
    let found = file.metadata().map_err(io("stat"))?.len();
    if found != expected {
        return Err(MemoryFileError::Size { found, expected });
    }
    let mut read = 0u64;
    let mut base = 0u64;
    for (start, len) in ram.regions() {
        let host = ram.mem().get_host_address(start).expect("region start is mapped");
        // SAFETY: the region is `len` bytes at `host`, alive as long as `ram`;
        // the guest is not running while it is restored.
        let dst = unsafe { std::slice::from_raw_parts_mut(host, len as usize) };
        let mut at = 0u64;
        while at < len {
            let Some((data, hole)) = next_extent(&file, base + at, base + len)? else { break };
            let (from, to) = ((data - base) as usize, (hole - base) as usize);
            file.read_exact_at(&mut dst[from..to], data).map_err(io("read"))?;
            read += (to - from) as u64;
            at = hole - base;
        }
        base += len;
    }
    Ok(read)
}

/// The next data extent `[data, hole)` at or after `from`, clipped to `end`.
fn next_extent(file: &File, from: u64, end: u64) -> Result<Option<(u64, u64)>, MemoryFileError> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an fd we own; no memory is passed.
    let data = unsafe { libc::lseek(fd, from as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `from`.
        return if e.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(io("seek")(e)) };
    }
    let data = data as u64;
    if data >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io("seek")(std::io::Error::last_os_error()));
    }
    Ok(Some((data, (hole as u64).min(end))))
}

/// Why a snapshot could not be loaded for inspection.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The state file was refused.
    #[error("cannot read the VM state")]
    State(#[from] crate::state::StateError),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// The memory file was refused.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// The memory layout is not one this VMM builds.
    #[error("memory layout {0:x?} is not one this VMM builds")]
    Layout(Vec<(u64, u64)>),
}

/// Reads a snapshot's state and memory into plain guest memory (no KVM):
/// for checking a snapshot with the test-guest oracle.
pub fn load_for_inspection(dir: &Path) -> Result<(VmState, GuestRam), InspectError> {
    let state: VmState = crate::state::read_file(&dir.join(STATE_FILE))?;
    let bytes = state.memory.iter().map(|(_, l)| l).sum();
    let ram = GuestRam::new(bytes)?;
    if ram.regions() != state.memory.iter().map(|&(s, l)| (GuestAddress(s), l)).collect::<Vec<_>>() {
        return Err(InspectError::Layout(state.memory.clone()));
    }
    load_memory(&ram, &dir.join(MEMORY_FILE))?;
    Ok((state, ram))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_round_trip_is_sparse() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(MEMORY_FILE);
        let ram = GuestRam::new(64 << 20).expect("map");
        ram.mem().write_obj(0xdead_beefu64, GuestAddress(0x1000)).expect("write");
        ram.mem().write_slice(&[7u8; 3 * 4096], GuestAddress(0x30_0000)).expect("write");
        ram.mem().write_obj(1u8, GuestAddress((64 << 20) - 1)).expect("write");
        let written = save_memory(&ram, &path).expect("save");
        assert_eq!(written, 5 * 4096);
        let copy = GuestRam::new(64 << 20).expect("map");
        let read = load_memory(&copy, &path).expect("load");
        assert!(read >= written);
        for addr in [0x1000u64, 0x30_0000, 0x30_2fff, (64 << 20) - 1, 0x50_0000] {
            let a: u8 = ram.mem().read_obj(GuestAddress(addr)).expect("read");
            let b: u8 = copy.mem().read_obj(GuestAddress(addr)).expect("read");
            assert_eq!(a, b, "{addr:#x}");
        }
        let small = GuestRam::new(32 << 20).expect("map");
        assert!(matches!(load_memory(&small, &path), Err(MemoryFileError::Size { .. })));
    }

    #[test]
    fn a_snapshot_never_goes_through_a_link_nor_over_a_file() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().expect("tmp");
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("mkdir");
        let linked = root.path().join("linked");
        symlink(&elsewhere, &linked).expect("link");
        let e = SnapshotDir::open(&linked).expect_err("a symlinked directory");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        // A directory with a state file (or a link where one would go) already.
        let used = root.path().join("used");
        std::fs::create_dir(&used).expect("mkdir");
        std::fs::write(used.join(STATE_FILE), b"old").expect("write");
        let e = SnapshotDir::open(&used).expect_err("holds a snapshot");
        assert!(e.to_string().contains("already holds state.bin"), "{e}");
        let planted = root.path().join("planted");
        std::fs::create_dir(&planted).expect("mkdir");
        symlink(root.path().join("victim"), planted.join(MEMORY_FILE)).expect("link");
        assert!(SnapshotDir::open(&planted).is_err(), "a planted link");
        assert!(!root.path().join("victim").exists());
        // A fresh directory: files are created once, renamed without replacing.
        let fresh = SnapshotDir::open(&root.path().join("a/b")).expect("fresh");
        fresh.create_file("x", true).expect("create");
        assert!(fresh.create_file("x", false).is_err(), "exclusive");
        fresh.create_file("y", false).expect("create");
        assert!(fresh.rename("x", "y").is_err(), "no replace");
        fresh.rename("x", "z").expect("rename");
    }
}
