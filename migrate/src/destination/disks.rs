//! The destination's half of disk migration: where the images are
//! assembled and what is written into them. What may arrive when (manifest
//! order, chunks asked for, nothing after a disk's digest, the chunk quota)
//! the session machine has already checked.
//!
//! Each disk is assembled in `<disk-dir>/<name>.<attempt>.incoming`
//! (the attempt named by the migration id), created sparse:
//! chunks this host's store already holds are copied from it, the others
//! arrive from the source (checked against their id, then kept in the
//! store), written extents follow. Before `Ready`, every image must match
//! the digest the source sent at pause. Only after `Commit` does an image
//! take its final name; a failed attempt removes what it created.
//!
//! # The final name
//!
//! Admission reserves each final name before anything moves: it creates
//! an empty file there (`O_EXCL`, so a second `receive` sharing the
//! directory, or anyone else, finds it taken), or, for a replica a `sync`
//! left, takes the existing image. Either way it holds an exclusive lock on
//! that file and remembers its identity (device, inode). The commit
//! installs with `renameat2(RENAME_EXCHANGE)` of the incoming image and the
//! reservation, checks that what came out is the reservation it made (or
//! swaps back and fails), and removes it: the final name is never free in
//! between, so nothing that appeared there meanwhile can be replaced, and
//! the name never shows anything but the reservation or the new image.
//!
//! # Replicas
//!
//! A replica left by `sync` carries a marker `NAME.replica` that binds it to
//! the VM's name and the fingerprint of the source key that sent it: only
//! that VM, from that source, may replace it. A crash may leave a replica
//! without its marker (it is then refused like any foreign image, never
//! overwritten: an operator removes it), never a marker on something else:
//! a sync writes the new marker under a temporary name, exchanges the
//! image, then renames the marker into place (the old marker, if any, said
//! the same); a migration onto a replica removes the marker first and then
//! exchanges the image.
//!
//! # Bases
//!
//! A sync (or migration) onto a replica of this VM from this source may
//! start an image from an earlier sync's epoch (`wanmig_dr::epoch`) instead
//! of empty, when the source's write tracking knows every block written
//! since that sync: the incoming image is that epoch's image (a copy of the
//! replica while it is still the file the epoch was made from, else written
//! from the store and checked against the epoch's digest), and only written
//! blocks arrive. The digest check before `Ready` covers the whole image,
//! as for any other.
//!
//! # Chunks
//!
//! Every manifest's chunk ids go under an expiring root of the attempt
//! (`attempt/VM/ID`, 24 hours) before they are answered, so that gc keeps
//! them (those the store had and those that arrive) while the attempt runs
//! and, if it fails, for a retry to reuse; the commit replaces that root
//! with each image's own (`VM/diskN`). The store's chunking parameters are
//! recorded with the first chunk kept, not at the hello.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wanmig_block_sync::ImageWriter;
use wanmig_dedup::{ChunkId, ChunkStore, Put, StoreError};
use wanmig_vmm::disklock::DiskLock;
use wanmig_vmm::files::{self, Rename};
use wanmig_wire::{Chunk, ChunkParams, DiskDone, DiskInfo, DiskPoint, DiskWrites, Manifest};

use super::error::ReceiveError;
use crate::journal::{FileId, ImageRecord};

/// Suffix of an image being received.
pub const INCOMING: &str = "incoming";
/// Largest disk this host copies: the digest keeps 33 bytes per 64 KiB
/// (2.2 GB of memory for 4 TiB).
pub const MAX_DISK_BYTES: u64 = 4 << 40;
/// Suffix of the marker that says an image is a replica kept by `sync`
/// (which a later sync or migration of the same VM from the same source
/// may replace).
pub const REPLICA: &str = "replica";
/// How long the chunks of an attempt stay in the store under its own root
/// if it never completes: a retry within this reuses them.
pub const ATTEMPT_ROOT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where attempt `attempt` assembles the image that goes to `path`.
pub fn incoming(path: &Path, attempt: &str) -> PathBuf {
    with_suffix(&with_suffix(path, attempt), INCOMING)
}

/// Whom a replica belongs to: a VM, as sent by one source key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The VM's name.
    pub vm: String,
    /// The fingerprint of the source's key ("unknown" without one).
    pub source: String,
}

impl Binding {
    /// What a replica marker of this VM from this source says.
    fn marker_text(&self) -> String {
        format!(
            "a replica of VM {} from the source whose key is {}, kept by `wanmig sync`; \
             a later sync or migration of that VM from that source replaces it\n",
            self.vm, self.source
        )
    }

    /// Whether the image at `path` is a replica of this VM from this source.
    fn owns_replica(&self, path: &Path) -> bool {
        std::fs::read_to_string(with_suffix(path, REPLICA)).is_ok_and(|m| m == self.marker_text())
    }
}

/// What holds an image's final name until the commit.
#[derive(Debug)]
struct Reservation {
    /// The exclusive lock on it (on its own open file).
    _lock: DiskLock,
    id: FileId,
    /// An existing replica (kept if the attempt fails), not an empty file
    /// of ours.
    replica: bool,
}

/// One disk being received.
#[derive(Debug)]
struct DestDisk {
    image: ImageWriter,
    /// Where it goes once committed.
    path: PathBuf,
    reservation: Reservation,
    /// The first copy's chunk ids, for the store's root.
    ids: Vec<ChunkId>,
    /// Where each manifest part started, and how many ids came before it
    /// (to go back to a part after a resume).
    parts: Vec<(u64, usize)>,
    /// The digest the source sent, once the image matched it.
    verified: Option<[u8; 32]>,
    /// The epoch the image started from (none: it started empty).
    base: Option<u64>,
    /// The 4 KiB blocks written extents touched (bit i = bytes
    /// `[4096 i, 4096 (i + 1))`): what differs from the base.
    written: Vec<u64>,
}

/// How a sync changed the epoch its images all started from: for
/// `wanmig_dr::epoch::record_incremental`.
#[derive(Debug, Clone)]
pub struct SinceBase {
    /// The epoch.
    pub epoch: u64,
    /// Per disk, the blocks written on it.
    pub written: Vec<Vec<u64>>,
    /// Per disk, the digest verified.
    pub digests: Vec<[u8; 32]>,
}

/// What the destination counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct DestStats {
    /// Chunks copied from the local store.
    pub from_store: u64,
    /// Chunks received.
    pub received: u64,
    /// Chunks in the store found corrupt and asked for again.
    pub corrupt: u64,
}

/// The disks of an incoming VM.
#[derive(Debug)]
pub struct DestDisks {
    disks: Vec<DestDisk>,
    store: Arc<ChunkStore>,
    binding: Binding,
    attempt: String,
    /// The chunking parameters to record with the first chunk kept (a
    /// store filled for the first time).
    record_chunking: Option<ChunkParams>,
    /// Chunk bytes received since the store last committed.
    uncommitted: u64,
    /// What happened.
    pub stats: DestStats,
}

/// Chunk bytes received between two commits of the store during the first
/// copy: what a crash of this process (or of the host) loses, and a retry
/// sends again.
pub const COMMIT_EVERY: u64 = 4 << 20;

fn bad(msg: String) -> ReceiveError {
    ReceiveError::BadInput(msg)
}

fn disk_io(path: &Path, what: &str, e: std::io::Error) -> ReceiveError {
    ReceiveError::Disk(format!("{what} {}: {e}", path.display()))
}

fn store_err(e: StoreError) -> ReceiveError {
    ReceiveError::Disk(format!("chunk store: {e}"))
}

/// Where the image of a source disk goes under `dir`: its file name, which
/// must be a plain name (no path of the source's choosing is honoured).
/// Whether the name is free is decided when it is reserved.
pub fn image_path(dir: &Path, disk: &DiskInfo) -> Result<PathBuf, String> {
    let name = Path::new(&disk.path).file_name().and_then(|n| n.to_str()).unwrap_or("");
    let plain = !name.is_empty() && name != "." && name != ".." && !name.starts_with('.');
    if !plain || name.ends_with(INCOMING) || name.ends_with(REPLICA) || name.ends_with(".tmp") {
        return Err(format!("disk {:?} has no usable file name", disk.path));
    }
    Ok(dir.join(name))
}

/// `path` with `.suffix` appended.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

fn parent(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Reserves `path` for an attempt of `binding` (see the module docs); the
/// error is the refusal's reason.
fn reserve(path: &Path, binding: &Binding) -> Result<Reservation, String> {
    let dir = files::open_dir_nofollow(parent(path)).map_err(|e| format!("{}: {e}", parent(path).display()))?;
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| format!("{}: no file name", path.display()))?;
    let taken = |why: &str| format!("disk image {} already exists here ({why})", path.display());
    match files::create_new_at(&dir, name, 0o600, 0) {
        Ok(file) => {
            let id = FileId::of(&file).map_err(|e| format!("{}: {e}", path.display()))?;
            // Open for reading too: an OFD write lock needs a writable file only.
            let lock = DiskLock::on_file(file, path, true).map_err(|e| e.to_string())?;
            let _ = dir.sync_all();
            Ok(Reservation { _lock: lock, id, replica: false })
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            if !binding.owns_replica(path) {
                return Err(taken(&format!(
                    "and is not a replica of VM {} from this source left by `wanmig sync`",
                    binding.vm
                )));
            }
            let file = files::open_beneath(&dir, Path::new(name), true).map_err(|e| taken(&e.to_string()))?;
            let id = FileId::of(&file).map_err(|e| format!("{}: {e}", path.display()))?;
            // A replica something runs (`dr test`, say) is not replaced.
            let lock = DiskLock::on_file(file, path, true).map_err(|e| e.to_string())?;
            Ok(Reservation { _lock: lock, id, replica: true })
        }
        Err(e) => Err(format!("cannot reserve {}: {e}", path.display())),
    }
}

impl DestDisks {
    /// Reserves the final names `paths` of `disks` for `binding` and
    /// creates their incoming images (sparse). `record_chunking`: the
    /// parameters to record in the store with the first chunk (a new store).
    /// An error is a reason to refuse the VM.
    pub fn create(
        disks: &[DiskInfo],
        paths: &[PathBuf],
        store: Arc<ChunkStore>,
        attempt: &str,
        binding: Binding,
        record_chunking: Option<ChunkParams>,
    ) -> Result<Self, String> {
        let mut out = DestDisks {
            disks: Vec::new(),
            store,
            attempt: attempt.into(),
            binding,
            record_chunking,
            uncommitted: 0,
            stats: DestStats::default(),
        };
        for (d, path) in disks.iter().zip(paths) {
            // What this attempt creates is removed (on drop) if a later one fails.
            let reservation = reserve(path, &out.binding)?;
            let incoming = incoming(path, attempt);
            let image = match ImageWriter::create(&incoming, d.size) {
                Ok(i) => i,
                Err(e) => {
                    unreserve(path, &reservation);
                    return Err(format!("cannot create {}: {e}", incoming.display()));
                }
            };
            out.disks.push(DestDisk {
                image,
                path: path.clone(),
                reservation,
                ids: Vec::new(),
                parts: Vec::new(),
                verified: None,
                base: None,
                written: vec![0; d.size.div_ceil(4096 * 64) as usize],
            });
        }
        Ok(out)
    }

    /// The images as the journal records them.
    pub fn records(&self) -> Vec<ImageRecord> {
        self.disks
            .iter()
            .map(|d| ImageRecord {
                incoming: d.image.path().into(),
                path: d.path.clone(),
                reservation: Some(d.reservation.id),
                replica: d.reservation.replica,
            })
            .collect()
    }

    /// Starts disk `i` from disk `i` of `epoch` instead of empty (see the
    /// module docs): only a replica of this VM from this source, reserved
    /// here, is ever continued, and only from an epoch of the same size.
    /// Slow (a copy of the image): run it off the connection's task. On an
    /// error the disk is as it was, empty, for a first copy.
    pub fn start_from(&mut self, i: usize, epoch: &wanmig_dr::epoch::EpochRecord) -> Result<String, String> {
        let store = self.store.clone();
        let d = self.disks.get_mut(i).ok_or_else(|| format!("no disk {i}"))?;
        let size = d.image.size();
        if !d.reservation.replica || epoch.vm != self.binding.vm {
            return Err(format!("{} is not a replica of VM {} from this source", d.path.display(), self.binding.vm));
        }
        if epoch.disks.get(i).is_none_or(|e| e.size != size) {
            return Err(format!("epoch {} has no disk {i} of {size} bytes", epoch.id));
        }
        let path = d.image.path().to_owned();
        std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let made = wanmig_dr::epoch::base_image(&*store, epoch, i, &path)
            .map_err(|e| wanmig_types::error_chain(&e))
            .and_then(|from| {
                let image = ImageWriter::open_existing(&path, size).map_err(|e| format!("{}: {e}", path.display()))?;
                Ok((from, image))
            });
        match made {
            Ok((from, image)) => {
                (d.image, d.base) = (image, Some(epoch.id));
                Ok(match from {
                    wanmig_dr::epoch::BaseFrom::Replica => "a copy of the replica".into(),
                    wanmig_dr::epoch::BaseFrom::Store => "written from the chunk store".into(),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                d.image = ImageWriter::create(&path, size).map_err(|c| format!("{e}; and {}: {c}", path.display()))?;
                Err(e)
            }
        }
    }

    /// When every image started from the same epoch: what changed since,
    /// for the next epoch. (After every disk was verified.)
    pub fn since_base(&self) -> Option<SinceBase> {
        let epoch = self.disks.first()?.base?;
        if self.disks.iter().any(|d| d.base != Some(epoch) || d.verified.is_none()) {
            return None;
        }
        Some(SinceBase {
            epoch,
            written: self.disks.iter().map(|d| d.written.clone()).collect(),
            digests: self.disks.iter().filter_map(|d| d.verified).collect(),
        })
    }

    fn root(&self) -> String {
        format!("attempt/{}/{}", self.binding.vm, self.attempt)
    }

    fn disk(&mut self, index: u8) -> Result<&mut DestDisk, ReceiveError> {
        let n = self.disks.len();
        self.disks.get_mut(index as usize).ok_or_else(|| bad(format!("disk {index} of {n}")))
    }

    /// A manifest part (in its place, within the image: checked by the
    /// session): puts its ids under the attempt's root, copies what the
    /// store holds; returns the indices of the chunks to ask the source for.
    pub fn on_manifest(&mut self, m: &Manifest) -> Result<Vec<u32>, ReceiveError> {
        let store = self.store.clone();
        let ids: Vec<ChunkId> = m.chunks.iter().filter_map(|c| c.id).collect();
        // Before answering "I have it": gc must not take it meanwhile.
        store.extend_root(&self.root(), &ids, ATTEMPT_ROOT_TTL).map_err(store_err)?;
        let d = self.disk(m.disk)?;
        d.parts.push((m.offset, d.ids.len()));
        let have = store.contains_many(&ids).map_err(store_err)?;
        let mut have = have.into_iter();
        let (mut need, mut offset) = (Vec::new(), m.offset);
        let (mut from_store, mut corrupt) = (0, 0);
        for (i, c) in m.chunks.iter().enumerate() {
            if d.base.is_some() {
                // A run of written blocks on a base: it differs from the
                // base, and a hole in it must be made one.
                mark_blocks(&mut d.written, offset, u64::from(c.len));
                if c.id.is_none() {
                    d.image.write_zeros(offset, u64::from(c.len)).map_err(|e| disk_io(d.image.path(), "writing", e))?;
                }
            }
            if let Some(id) = c.id {
                d.ids.push(id);
                let mut wanted = !have.next().unwrap_or(false);
                if !wanted {
                    match store.get(&id) {
                        Ok(Some(data)) if data.len() == c.len as usize => {
                            d.image.write(offset, &data).map_err(|e| disk_io(d.image.path(), "writing", e))?;
                            from_store += 1;
                        }
                        // A chunk the store cannot vouch for is fetched again.
                        Ok(_) | Err(StoreError::Corrupt(_)) => {
                            corrupt += 1;
                            wanted = true;
                        }
                        Err(e) => return Err(store_err(e)),
                    }
                }
                if wanted {
                    need.push(i as u32);
                }
            }
            offset += u64::from(c.len);
        }
        self.stats.from_store += from_store;
        self.stats.corrupt += corrupt;
        Ok(need)
    }

    /// A chunk from the source (asked for, within the quota: checked by the
    /// session): checked against its id, kept, written.
    pub fn on_chunk(&mut self, c: &Chunk) -> Result<(), ReceiveError> {
        let store = self.store.clone();
        match store.put(&c.id, &c.data) {
            Ok(Put::Stored | Put::Present) => {}
            Err(e @ StoreError::HashMismatch { .. }) => {
                return Err(bad(format!("chunk at offset {} of disk {}: {e}", c.offset, c.disk)));
            }
            Err(e) => return Err(store_err(e)),
        }
        // A new store keeps the parameters of its first chunk (not those of
        // a hello that was refused, or of an attempt that sent nothing).
        if let Some(p) = self.record_chunking.take() {
            store.set_meta("chunking", &format!("{}/{}/{}", p.min, p.avg, p.max)).map_err(store_err)?;
        }
        self.stats.received += 1;
        self.uncommitted += c.data.len() as u64;
        let d = self.disk(c.disk)?;
        mark_blocks(&mut d.written, c.offset, c.data.len() as u64);
        d.image.write(c.offset, &c.data).map_err(|e| disk_io(d.image.path(), "writing", e))
    }

    /// After a resume: each disk's first copy goes on from its part at
    /// `points` (what came of later parts is data in the image and chunks
    /// in the store, both sent again as they were); its digest comes again.
    pub fn rewind(&mut self, points: &[DiskPoint]) {
        for (d, at) in self.disks.iter_mut().zip(points) {
            let keep = d.parts.iter().position(|&(offset, _)| offset >= at.next_offset).unwrap_or(d.parts.len());
            if let Some(&(_, ids)) = d.parts.get(keep) {
                d.ids.truncate(ids);
            }
            d.parts.truncate(keep);
            d.verified = None;
        }
    }

    /// Whether [`COMMIT_EVERY`] chunk bytes arrived since the last commit.
    pub fn commit_due(&self) -> bool {
        self.uncommitted >= COMMIT_EVERY
    }

    /// Makes what arrived so far durable: after a crash, a retry finds it
    /// (under the attempt's root) and does not ask for it again. (An fsync:
    /// run it off the connection's task.)
    pub fn commit(&mut self) -> Result<(), ReceiveError> {
        self.store.commit().map_err(store_err)?;
        self.uncommitted = 0;
        Ok(())
    }

    /// Extents the guest wrote.
    pub fn on_writes(&mut self, w: &DiskWrites) -> Result<(), ReceiveError> {
        let d = self.disk(w.disk)?;
        for &(offset, len) in &w.extents {
            mark_blocks(&mut d.written, offset, u64::from(len));
        }
        for (offset, data) in w.iter() {
            d.image.write(offset, data).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => bad(format!("disk {}: {e}", w.disk)),
                _ => disk_io(d.image.path(), "writing", e),
            })?;
        }
        Ok(())
    }

    /// Between rounds: hash what was written and flush it (the images and
    /// the chunks kept), so little is left for the end, inside the guest's
    /// downtime. Reads only written blocks (never holes): the work follows
    /// the data received, not the sizes declared. Slow for big rounds: run
    /// it off the connection's task.
    pub fn refresh(&mut self) -> Result<(), ReceiveError> {
        for d in &mut self.disks {
            d.image.refresh_digest().map_err(|e| disk_io(d.image.path(), "reading", e))?;
        }
        self.store.commit().map_err(store_err)
    }

    /// The source's last word on a disk: its image must match. (As slow as
    /// [`DestDisks::refresh`].)
    pub fn on_done(&mut self, done: &DiskDone) -> Result<(), ReceiveError> {
        let d = self.disk(done.disk)?;
        if done.size != d.image.size() {
            return Err(bad(format!("disk {} closed at {} bytes, opened at {}", done.disk, done.size, d.image.size())));
        }
        let digest = d.image.finish().map_err(|e| disk_io(d.image.path(), "flushing", e))?;
        if digest != done.digest {
            return Err(ReceiveError::Disk(format!(
                "disk {} does not match the source's image at pause (digest {} here, {} there)",
                done.disk,
                hex(&digest),
                hex(&done.digest)
            )));
        }
        d.verified = Some(done.digest);
        Ok(())
    }

    /// Before `Ready`: every image, as it is now, has the digest its source
    /// sent (read from the image's block hashes, not from a flag: anything
    /// written since would show); the chunks received are durable.
    pub fn check_complete(&mut self) -> Result<(), ReceiveError> {
        for (i, d) in self.disks.iter_mut().enumerate() {
            let Some(want) = d.verified else { return Err(bad(format!("disk {i} was never completed"))) };
            let now = d.image.finish().map_err(|e| disk_io(d.image.path(), "flushing", e))?;
            if now != want {
                return Err(ReceiveError::Disk(format!("disk {i} changed after its digest was checked")));
            }
        }
        self.store.commit().map_err(store_err)
    }

    /// After the commit: each image takes its final name, exchanged with
    /// its reservation (see the module docs); with `replica`, it is marked
    /// as a sync replica of this VM from this source. The attempt's root
    /// gives way to the images' own.
    pub fn install(mut self, replica: bool) -> Result<Vec<PathBuf>, ReceiveError> {
        // An image that started from a base had no first copy: its root
        // (the chunks a later move here dedups against) stays as it was.
        let roots: Vec<(String, Vec<ChunkId>)> = (self.disks.iter().enumerate())
            .filter(|(_, d)| d.base.is_none())
            .map(|(i, d)| (format!("{}/disk{i}", self.binding.vm), d.ids.clone()))
            .collect();
        let set: Vec<(&str, &[ChunkId])> = roots.iter().map(|(n, ids)| (n.as_str(), ids.as_slice())).collect();
        let dropped = self.store.replace_roots(&set, &[&self.root()]).map_err(store_err);
        let mut paths = Vec::new();
        for d in std::mem::take(&mut self.disks) {
            self.install_one(&d, replica)?;
            paths.push(d.path.clone());
        }
        dropped?;
        Ok(paths)
    }

    fn install_one(&self, d: &DestDisk, replica: bool) -> Result<(), ReceiveError> {
        let (path, incoming) = (&d.path, d.image.path());
        let dir = File::open(parent(path)).map_err(|e| disk_io(parent(path), "cannot open", e))?;
        let sync_dir = || dir.sync_all().map_err(|e| disk_io(parent(path), "cannot sync", e));
        let marker = with_suffix(path, REPLICA);
        let staged = with_suffix(&with_suffix(&marker, &self.attempt), "tmp");
        if replica {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&staged)
                .map_err(|e| disk_io(&staged, "cannot create", e))?;
            f.write_all(self.binding.marker_text().as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| disk_io(&staged, "cannot write", e))?;
        } else if d.reservation.replica {
            // A VM's own image is never marked as a replica, even for a moment.
            match std::fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(disk_io(&marker, "cannot remove", e));
                }
                _ => sync_dir()?,
            }
        }
        files::rename_at(None, incoming, None, path, Rename::Exchange)
            .map_err(|e| disk_io(path, "cannot install", e))?;
        if FileId::at(incoming) != Some(d.reservation.id) {
            // Not what we reserved: put it back, keep ours at its incoming name
            // (and the replica's marker, if this took it away).
            let _ = files::rename_at(None, incoming, None, path, Rename::Exchange);
            if d.reservation.replica && !replica {
                let _ = std::fs::write(&marker, self.binding.marker_text());
            }
            return Err(ReceiveError::Disk(format!(
                "{} is no longer the file this migration reserved; the image stays at {}",
                path.display(),
                incoming.display()
            )));
        }
        std::fs::remove_file(incoming).map_err(|e| disk_io(incoming, "cannot remove", e))?;
        if replica {
            std::fs::rename(&staged, &marker).map_err(|e| disk_io(&marker, "cannot write", e))?;
        }
        // The source has let go: the names must survive a crash.
        sync_dir()
    }
}

/// Removes the empty file that reserved `path`, if it is still the one.
fn unreserve(path: &Path, r: &Reservation) {
    if !r.replica && FileId::at(path) == Some(r.id) {
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for DestDisks {
    fn drop(&mut self) {
        for d in &self.disks {
            let _ = std::fs::remove_file(d.image.path());
            unreserve(&d.path, &d.reservation);
        }
        // The attempt's root (its chunks, for a retry) survives a crash.
        let _ = self.store.commit();
    }
}

/// Marks the 4 KiB blocks of `[offset, offset + len)` in `bits` (checked
/// against the image's size by the session before).
fn mark_blocks(bits: &mut [u64], offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    for b in offset / 4096..=(offset + len - 1) / 4096 {
        if let Some(w) = bits.get_mut((b / 64) as usize) {
            *w |= 1 << (b % 64);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use wanmig_wire::ManifestChunk;

    use super::*;

    fn binding(source: &str) -> Binding {
        Binding { vm: "vm".into(), source: source.into() }
    }

    fn setup(dir: &Path) -> (DestDisks, Arc<ChunkStore>) {
        let store = Arc::new(ChunkStore::open(&dir.join("chunks")).expect("store"));
        let info = DiskInfo { size: 1 << 20, path: "/elsewhere/disk.img".into(), read_only: false };
        let path = image_path(dir, &info).expect("path");
        let disks = DestDisks::create(&[info], &[path], store.clone(), "0a0b", binding("fp"), None).expect("create");
        (disks, store)
    }

    #[test]
    fn a_chunk_that_does_not_match_its_id_is_refused_and_not_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut disks, store) = setup(dir.path());
        let good = vec![1u8; 8192];
        let id = ChunkId::of(&good);
        let mut bad = good.clone();
        bad[100] ^= 1;
        let e = disks.on_chunk(&Chunk { disk: 0, offset: 0, id, data: bad }).expect_err("refused");
        assert!(matches!(e, ReceiveError::BadInput(_)), "{e}");
        assert!(e.to_string().contains("does not match its id"), "{e}");
        assert!(!store.contains(&id).expect("lookup"));
        // Out of range: refused without writing.
        let e = disks.on_chunk(&Chunk { disk: 0, offset: (1 << 20) - 4096, id, data: good.clone() });
        assert!(e.is_err());
        assert!(disks.on_chunk(&Chunk { disk: 1, offset: 0, id, data: good }).is_err(), "no disk 1");
        assert!(dir.path().join("disk.img.0a0b.incoming").exists());
        assert!(dir.path().join("disk.img").exists(), "the final name is reserved");
        drop(disks);
        assert!(!dir.path().join("disk.img.0a0b.incoming").exists());
        assert!(!dir.path().join("disk.img").exists(), "and given back");
    }

    #[test]
    fn held_chunks_are_copied_and_only_missing_ones_asked_for() {
        let dir = tempfile::tempdir().expect("tmp");
        let (mut disks, store) = setup(dir.path());
        let (a, b) = (vec![3u8; 65536], vec![4u8; 65536]);
        store.put(&ChunkId::of(&a), &a).expect("put");
        let m = Manifest {
            disk: 0,
            seq: 0,
            offset: 0,
            chunks: vec![
                ManifestChunk { len: 65536, id: Some(ChunkId::of(&a)) },
                ManifestChunk { len: 65536, id: None },
                ManifestChunk { len: 65536, id: Some(ChunkId::of(&b)) },
            ],
        };
        assert_eq!(disks.on_manifest(&m).expect("manifest"), vec![2]);
        disks.on_chunk(&Chunk { disk: 0, offset: 131072, id: ChunkId::of(&b), data: b.clone() }).expect("chunk");
        let mut want = vec![0u8; 1 << 20];
        want[..65536].copy_from_slice(&a);
        want[131072..196608].copy_from_slice(&b);
        let digest = wanmig_block_sync::BlockDigest::of_bytes(&want);
        let wrong = DiskDone { disk: 0, size: 1 << 20, digest: [0; 32] };
        assert!(matches!(disks.on_done(&wrong), Err(ReceiveError::Disk(_))));
        disks.on_done(&DiskDone { disk: 0, size: 1 << 20, digest }).expect("digest matches");
        disks.check_complete().expect("complete");
        let paths = disks.install(false).expect("install");
        assert_eq!(std::fs::read(&paths[0]).expect("read"), want);
        let roots: Vec<String> = store.roots().expect("roots").into_iter().map(|r| r.name).collect();
        assert_eq!(roots, ["vm/disk0"], "the attempt's root gave way to the image's");
    }

    /// A complete, verified one-disk attempt of `binding` into `dir`, of an
    /// image of `byte`s.
    fn complete(dir: &Path, store: &Arc<ChunkStore>, attempt: &str, b: Binding, byte: u8) -> Result<DestDisks, String> {
        let info = DiskInfo { size: 65536, path: "/src/disk.img".into(), read_only: false };
        let path = image_path(dir, &info).expect("path");
        let mut disks = DestDisks::create(&[info], &[path], store.clone(), attempt, b, None)?;
        let data = vec![byte; 65536];
        let id = ChunkId::of(&data);
        let m = Manifest { disk: 0, seq: 0, offset: 0, chunks: vec![ManifestChunk { len: 65536, id: Some(id) }] };
        if disks.on_manifest(&m).expect("manifest") == [0] {
            disks.on_chunk(&Chunk { disk: 0, offset: 0, id, data: data.clone() }).expect("chunk");
        }
        let digest = wanmig_block_sync::BlockDigest::of_bytes(&data);
        disks.on_done(&DiskDone { disk: 0, size: 65536, digest }).expect("done");
        disks.check_complete().expect("complete");
        Ok(disks)
    }

    #[test]
    fn the_final_check_reads_the_images_digest_not_a_flag() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(ChunkStore::open(&dir.path().join("chunks")).expect("store"));
        let mut disks = complete(dir.path(), &store, "abab", binding("fp"), 1).expect("verified");
        // Were anything to write the image after its digest matched (the
        // session refuses such messages; this goes around it), the check
        // before Ready would see it.
        disks.on_writes(&DiskWrites { disk: 0, extents: vec![(4096, 4096)], data: vec![9; 4096] }).expect("write");
        let e = disks.check_complete().expect_err("changed");
        assert!(e.to_string().contains("changed after its digest was checked"), "{e}");
    }

    #[test]
    fn a_final_name_is_reserved_until_the_commit_and_replicas_are_bound_to_their_source() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(ChunkStore::open(&dir.path().join("chunks")).expect("store"));
        let img = dir.path().join("disk.img");
        // Two receives sharing the directory: the second is refused at its
        // hello while the first holds the name, and the first installs.
        let first = complete(dir.path(), &store, "1111", binding("fp-a"), 1).expect("first");
        let e = complete(dir.path(), &store, "2222", binding("fp-a"), 2).expect_err("the name is taken");
        assert!(e.contains("already exists"), "{e}");
        first.install(true).expect("install a replica");
        assert_eq!(std::fs::read(&img).expect("read"), vec![1; 65536]);
        let marker = std::fs::read_to_string(with_suffix(&img, REPLICA)).expect("marker");
        assert!(marker.contains("fp-a") && marker.contains("VM vm"), "{marker}");
        // Another source key may not replace that replica; its own may.
        let e = complete(dir.path(), &store, "3333", binding("fp-b"), 3).expect_err("another source");
        assert!(e.contains("not a replica of VM vm from this source"), "{e}");
        let again = complete(dir.path(), &store, "4444", binding("fp-a"), 4).expect("the same source");
        // Something that appears at the reserved name meanwhile is never
        // replaced: here the reservation (the replica) is swapped for another file.
        std::fs::rename(&img, dir.path().join("moved")).expect("move");
        std::fs::write(&img, b"someone else's").expect("write");
        let e = again.install(false).expect_err("not ours");
        assert!(e.to_string().contains("no longer the file this migration reserved"), "{e}");
        assert_eq!(std::fs::read(&img).expect("read"), b"someone else's");
        assert!(dir.path().join("disk.img.4444.incoming").exists(), "ours is kept");
        // A migration (not a sync) onto a replica leaves no marker behind.
        std::fs::remove_file(&img).expect("rm");
        std::fs::rename(dir.path().join("moved"), &img).expect("back");
        let m = complete(dir.path(), &store, "5555", binding("fp-a"), 5).expect("migration");
        m.install(false).expect("install");
        assert_eq!(std::fs::read(&img).expect("read"), vec![5; 65536]);
        assert!(!with_suffix(&img, REPLICA).exists(), "a VM's own image is no replica");
        let left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("disk.img"))
            .collect();
        let mut left = left;
        left.sort();
        assert_eq!(left, ["disk.img", "disk.img.4444.incoming"]);
    }

    #[test]
    fn a_failed_attempts_chunks_stay_under_its_expiring_root_and_the_chunking_waits_for_a_chunk() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Arc::new(ChunkStore::open(&dir.path().join("chunks")).expect("store"));
        let info = DiskInfo { size: 65536, path: "/src/disk.img".into(), read_only: false };
        let path = image_path(dir.path(), &info).expect("path");
        let params = ChunkParams::DEFAULT;
        let mut disks =
            DestDisks::create(&[info], &[path], store.clone(), "abcd", binding("fp"), Some(params)).expect("create");
        assert_eq!(store.meta("chunking").expect("meta"), None, "nothing recorded before a chunk is");
        let data = vec![7u8; 65536];
        let id = ChunkId::of(&data);
        let m = Manifest { disk: 0, seq: 0, offset: 0, chunks: vec![ManifestChunk { len: 65536, id: Some(id) }] };
        disks.on_manifest(&m).expect("manifest");
        disks.on_chunk(&Chunk { disk: 0, offset: 0, id, data }).expect("chunk");
        assert_eq!(store.meta("chunking").expect("meta").as_deref(), Some("16384/65536/262144"));
        drop(disks); // the attempt fails
        let roots = store.roots().expect("roots");
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].name, "attempt/vm/abcd");
        let ttl = roots[0].expires_unix_secs.expect("expires") - roots[0].set_unix_secs;
        assert!(ttl.abs_diff(ATTEMPT_ROOT_TTL.as_secs()) <= 1, "{ttl}");
        let no_grace = wanmig_dedup::Retention { grace: Duration::ZERO, ..Default::default() };
        store.gc(&no_grace).expect("gc");
        assert!(store.contains(&id).expect("lookup"), "kept for a retry until the root expires");
    }
}
