//! The destination's half of disk migration: where the images are
//! assembled and what is written into them. What may arrive when (manifest
//! order, chunks asked for, nothing after a disk's digest) the session
//! machine has already checked.
//!
//! Each disk is assembled in `<disk-dir>/<name>.<attempt>.incoming`
//! (the attempt named by the migration id), created sparse:
//! chunks this host's store already holds are copied from it, the others
//! arrive from the source (checked against their id, then kept in the
//! store), written extents follow. Before `Ready`, every image must match
//! the digest the source sent at pause. Only after `Commit` does an image
//! take its final name; a failed attempt removes what it created.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wanmig_block_sync::ImageWriter;
use wanmig_dedup::{ChunkId, ChunkStore, Put, StoreError};
use wanmig_wire::{Chunk, DiskDone, DiskInfo, DiskWrites, Manifest};

use super::error::ReceiveError;

/// Suffix of an image being received.
pub const INCOMING: &str = "incoming";
/// Largest disk this host copies: the digest keeps 33 bytes per 64 KiB
/// (2.2 GB of memory for 4 TiB).
pub const MAX_DISK_BYTES: u64 = 4 << 40;

/// Where attempt `attempt` assembles the image that goes to `path`.
pub fn incoming(path: &Path, attempt: &str) -> PathBuf {
    with_suffix(&with_suffix(path, attempt), INCOMING)
}

/// What a replica marker of VM `vm` says.
fn marker_text(vm: &str) -> String {
    format!("a replica of VM {vm} kept by `wanmig sync`; a later sync or migration of that VM replaces it\n")
}
/// Suffix of the marker that says an image is a replica kept by `sync`
/// (which a later sync or migration may replace).
pub const REPLICA: &str = "replica";

/// One disk being received.
#[derive(Debug)]
struct DestDisk {
    image: ImageWriter,
    /// Where it goes once committed.
    path: PathBuf,
    /// The first copy's chunk ids, for the store's root.
    ids: Vec<ChunkId>,
    /// Digest checked (`DiskDone` received and matched).
    verified: bool,
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
    vm_name: String,
    /// What happened.
    pub stats: DestStats,
}

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
pub fn image_path(dir: &Path, disk: &DiskInfo, vm: &str) -> Result<PathBuf, String> {
    let name = Path::new(&disk.path).file_name().and_then(|n| n.to_str()).unwrap_or("");
    let plain = !name.is_empty() && name != "." && name != ".." && !name.starts_with('.');
    if !plain || name.ends_with(INCOMING) || name.ends_with(REPLICA) {
        return Err(format!("disk {:?} has no usable file name", disk.path));
    }
    let path = dir.join(name);
    if path.exists() {
        let marker = std::fs::read_to_string(with_suffix(&path, REPLICA)).unwrap_or_default();
        if marker != marker_text(vm) {
            return Err(format!(
                "disk image {} already exists here (and is not a replica of VM {vm} from `wanmig sync`)",
                path.display()
            ));
        }
    }
    Ok(path)
}

/// `path` with `.suffix` appended.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

impl DestDisks {
    /// Creates the incoming images (sparse) for `disks` at `paths`.
    pub fn create(
        vm_name: &str,
        disks: &[DiskInfo],
        paths: &[PathBuf],
        store: Arc<ChunkStore>,
        attempt: &str,
    ) -> Result<Self, ReceiveError> {
        let mut out = DestDisks { disks: Vec::new(), store, vm_name: vm_name.into(), stats: DestStats::default() };
        for (d, path) in disks.iter().zip(paths) {
            let incoming = incoming(path, attempt);
            let image = ImageWriter::create(&incoming, d.size).map_err(|e| disk_io(&incoming, "cannot create", e))?;
            out.disks.push(DestDisk { image, path: path.clone(), ids: Vec::new(), verified: false });
        }
        Ok(out)
    }

    fn disk(&mut self, index: u8) -> Result<&mut DestDisk, ReceiveError> {
        let n = self.disks.len();
        self.disks.get_mut(index as usize).ok_or_else(|| bad(format!("disk {index} of {n}")))
    }

    /// A manifest part (in its place, within the image: checked by the
    /// session): copies what the store holds; returns the indices of the
    /// chunks to ask the source for.
    pub fn on_manifest(&mut self, m: &Manifest) -> Result<Vec<u32>, ReceiveError> {
        let store = self.store.clone();
        let d = self.disk(m.disk)?;
        let ids: Vec<ChunkId> = m.chunks.iter().filter_map(|c| c.id).collect();
        let have = store.contains_many(&ids).map_err(store_err)?;
        let mut have = have.into_iter();
        let (mut need, mut offset) = (Vec::new(), m.offset);
        let (mut from_store, mut corrupt) = (0, 0);
        for (i, c) in m.chunks.iter().enumerate() {
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

    /// A chunk from the source: checked against its id, kept, written.
    pub fn on_chunk(&mut self, c: &Chunk) -> Result<(), ReceiveError> {
        let store = self.store.clone();
        match store.put(&c.id, &c.data) {
            Ok(Put::Stored | Put::Present) => {}
            Err(e @ StoreError::HashMismatch { .. }) => {
                return Err(bad(format!("chunk at offset {} of disk {}: {e}", c.offset, c.disk)));
            }
            Err(e) => return Err(store_err(e)),
        }
        self.stats.received += 1;
        let d = self.disk(c.disk)?;
        d.image.write(c.offset, &c.data).map_err(|e| disk_io(d.image.path(), "writing", e))
    }

    /// Extents the guest wrote.
    pub fn on_writes(&mut self, w: &DiskWrites) -> Result<(), ReceiveError> {
        let d = self.disk(w.disk)?;
        for (offset, data) in w.iter() {
            d.image.write(offset, data).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidInput => bad(format!("disk {}: {e}", w.disk)),
                _ => disk_io(d.image.path(), "writing", e),
            })?;
        }
        Ok(())
    }

    /// Between rounds: hash what was written, so little is left for the end.
    pub fn refresh(&mut self) -> Result<(), ReceiveError> {
        for d in &mut self.disks {
            d.image.refresh_digest().map_err(|e| disk_io(d.image.path(), "reading", e))?;
        }
        Ok(())
    }

    /// The source's last word on a disk: its image must match.
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
        d.verified = true;
        Ok(())
    }

    /// Every disk verified; the chunks kept durable under a root per disk.
    pub fn check_complete(&self) -> Result<(), ReceiveError> {
        if let Some(i) = self.disks.iter().position(|d| !d.verified) {
            return Err(bad(format!("disk {i} was never completed")));
        }
        for (i, d) in self.disks.iter().enumerate() {
            self.store.set_root(&format!("{}/disk{i}", self.vm_name), &d.ids).map_err(store_err)?;
        }
        self.store.commit().map_err(store_err)
    }

    /// After the commit: the images take their final names (replacing a
    /// replica there). With `replica`, each is marked as a sync replica.
    pub fn install(mut self, replica: bool) -> Result<Vec<PathBuf>, ReceiveError> {
        let mut paths = Vec::new();
        for d in std::mem::take(&mut self.disks) {
            std::fs::rename(d.image.path(), &d.path).map_err(|e| disk_io(&d.path, "cannot install", e))?;
            let marker = with_suffix(&d.path, REPLICA);
            if replica {
                std::fs::write(&marker, marker_text(&self.vm_name)).map_err(|e| disk_io(&marker, "cannot write", e))?;
            } else {
                let _ = std::fs::remove_file(&marker);
            }
            // The renames must survive a crash: the source has let go.
            if let Some(dir) = d.path.parent() {
                let synced = File::open(dir).and_then(|f| f.sync_all());
                synced.map_err(|e| disk_io(dir, "cannot sync", e))?;
            }
            paths.push(d.path.clone());
        }
        Ok(paths)
    }
}

impl Drop for DestDisks {
    fn drop(&mut self) {
        for d in &self.disks {
            let _ = std::fs::remove_file(d.image.path());
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

    fn setup(dir: &Path) -> (DestDisks, Arc<ChunkStore>) {
        let store = Arc::new(ChunkStore::open(&dir.join("chunks")).expect("store"));
        let info = DiskInfo { size: 1 << 20, path: "/elsewhere/disk.img".into(), read_only: false };
        let path = image_path(dir, &info, "vm").expect("path");
        let disks = DestDisks::create("vm", &[info], &[path], store.clone(), "0a0b").expect("create");
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
        drop(disks);
        assert!(!dir.path().join("disk.img.0a0b.incoming").exists());
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
        assert_eq!(store.roots().expect("roots").len(), 1);
    }
}
