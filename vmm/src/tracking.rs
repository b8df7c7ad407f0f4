//! Named, persistent write-tracking bitmaps per disk image, after QEMU's
//! persistent dirty bitmaps (`docs/interop/bitmaps.rst`): each names the
//! 4 KiB blocks of an image written since some point its owner chose (for
//! wanmig, the last successful sync to one destination), and it survives a
//! clean restart of the VM. The VMM knows nothing of syncs: a map is a name,
//! a bitmap and a verdict on whether it can be trusted.
//!
//! # Life of a map
//!
//! - [`NamedMaps::add`] creates one, **invalid**: writes before it are
//!   unknown. Every guest write is then recorded in every map of its disk
//!   (besides the migration's own [`crate::devices::block::DiskWriteLog`]).
//! - [`NamedMaps::take`] starts a sync: it hands over the blocks written so
//!   far (`None` when the map is invalid: compare digests instead) and the
//!   map starts afresh. [`NamedMaps::finish`] ends it: after a success the
//!   map is valid (it holds every write since the take, a superset of what
//!   changed since the replica, which was read after the take); after a
//!   failure the handed-over blocks are merged back and the map is as
//!   trustworthy as before. The take happens before the sync reads
//!   anything, so no write can fall between the replica and the map.
//!   A success names the sync (its *base*, for wanmig the migration id):
//!   a later sync to a destination that still holds that sync's replica
//!   sends only the map's blocks ([`NamedMaps::taken_since`]).
//! - [`NamedMaps::reset`] clears a map and declares it valid (the owner
//!   knows the other side matches the image now).
//!
//! # On disk
//!
//! Beside the image, as `IMAGE.wanmig-bitmaps` ([`file_for`]): written with
//! "in use" set when a VM takes the image ([`attach`]), and again, with the
//! image's identity and "in use" clear, when it lets go cleanly ([`save`]:
//! shutdown, or a migration away just before its commit). At the next
//! start a map is trusted only if the file says it was valid, "in use" is
//! clear (a crash leaves it set), and the image is still the one it
//! describes: same device, inode, size and modification time (anything
//! that wrote the image while no VM tracked it changes the time). Anything
//! else — no file, a damaged one, another format — makes every map invalid
//! or unknown, never trusted.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "WMBITMAP"
//! 8       4     format version (le u32), currently 2
//! 12      8     payload length (le u64), at most max_file_bytes(image size)
//! 20      n     payload: postcard-encoded `SavedMaps`
//! 20+n    32    blake3 of bytes 0..20+n
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// Bytes per bit.
pub const GRANULE: u64 = 4096;
/// Suffix of the file beside an image.
pub const SUFFIX: &str = "wanmig-bitmaps";
/// Most maps one disk keeps (one per destination it syncs to).
pub const MAX_MAPS: usize = 64;
/// Longest map name, bytes.
pub const MAX_NAME: usize = 255;

const MAGIC: [u8; 8] = *b"WMBITMAP";
/// Version 2 added each map's base; a version 1 file is not trusted.
const VERSION: u32 = 2;
const HEADER: usize = 20;
const CHECKSUM: usize = 32;

/// Why a map operation or the bitmap file failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// The file could not be read or written.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a bitmap file this build reads, or is damaged.
    #[error("bitmap file {path}: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A name that is empty, too long, or one map too many.
    #[error("{0}")]
    Refused(String),
}

/// The blocks of an image written, one bit per [`GRANULE`], words in the
/// layout of the migration's write log (bit i of word w = block 64w + i).
#[derive(Debug)]
struct WordMap {
    words: Vec<AtomicU64>,
}

impl WordMap {
    fn new(words: usize) -> Self {
        WordMap { words: (0..words).map(|_| AtomicU64::new(0)).collect() }
    }

    fn set_range(&self, offset: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = offset / GRANULE;
        let last = (offset + len as u64 - 1) / GRANULE;
        for block in first..=last {
            let (w, bit) = ((block / 64) as usize, block % 64);
            // A write past the end cannot happen (the device checks); ignore it.
            if let Some(word) = self.words.get(w) {
                word.fetch_or(1 << bit, Ordering::AcqRel);
            }
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    fn or_in(&self, bits: &[u64]) {
        for (w, &b) in self.words.iter().zip(bits) {
            if b != 0 {
                w.fetch_or(b, Ordering::AcqRel);
            }
        }
    }

    fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }
}

/// Blocks handed over by a take, until the sync's outcome is known.
#[derive(Debug)]
struct Pending {
    bits: Vec<u64>,
    was_valid: bool,
    was_base: Option<String>,
}

#[derive(Debug)]
struct Named {
    name: String,
    map: WordMap,
    valid: bool,
    /// The sync the map counts from, as its owner named it at
    /// [`NamedMaps::finish`] (none after a reset): what the other side
    /// must hold for the map's blocks to be all it lacks.
    base: Option<String>,
    pending: Option<Pending>,
}

/// What [`NamedMaps::status`] says of one map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    /// Its name.
    pub name: String,
    /// Whether its blocks can be trusted.
    pub valid: bool,
    /// Blocks marked written.
    pub blocks: u64,
    /// Whether a sync has taken it and not finished.
    pub syncing: bool,
}

/// The named maps of one disk: every guest write is recorded in each.
#[derive(Debug)]
pub struct NamedMaps {
    words: usize,
    maps: RwLock<Vec<Named>>,
    /// What loading the file found, when it was not a clean, valid state.
    note: RwLock<Option<String>>,
}

fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl NamedMaps {
    /// No maps, for an image of `bytes` bytes.
    pub fn new(bytes: u64) -> Self {
        let words = usize::try_from(bytes.div_ceil(GRANULE).div_ceil(64)).expect("image sizes fit usize");
        NamedMaps { words, maps: RwLock::new(Vec::new()), note: RwLock::new(None) }
    }

    /// Records a write of `len` bytes at `offset` in every map.
    pub fn record(&self, offset: u64, len: usize) {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        for m in maps.iter() {
            m.map.set_range(offset, len);
        }
    }

    /// Adds map `name`, invalid (what was written before is unknown);
    /// nothing if it exists.
    pub fn add(&self, name: &str) -> Result<(), TrackingError> {
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(TrackingError::Refused(format!("a map name has 1 to {MAX_NAME} bytes: {name:?}")));
        }
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        if maps.iter().any(|m| m.name == name) {
            return Ok(());
        }
        if maps.len() >= MAX_MAPS {
            return Err(TrackingError::Refused(format!("a disk keeps at most {MAX_MAPS} maps")));
        }
        maps.push(Named { name: name.into(), map: WordMap::new(self.words), valid: false, base: None, pending: None });
        Ok(())
    }

    /// Removes map `name`; whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        let before = maps.len();
        maps.retain(|m| m.name != name);
        maps.len() != before
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Named) -> T) -> Option<T> {
        let mut maps = self.maps.write().unwrap_or_else(PoisonError::into_inner);
        maps.iter_mut().find(|m| m.name == name).map(f)
    }

    /// The blocks written since the map's last reset or successful sync
    /// (a sync in progress included): `None` when there is no such map or
    /// it is invalid — never a map that may miss a write.
    pub fn tracked_writes(&self, name: &str) -> Option<Vec<u64>> {
        self.with(name, |m| {
            // During a sync the map counts as what it was before the take.
            let valid = m.pending.as_ref().map_or(m.valid, |p| p.was_valid);
            valid.then(|| {
                let mut bits = m.map.snapshot();
                if let Some(p) = &m.pending {
                    bits.iter_mut().zip(&p.bits).for_each(|(a, b)| *a |= b);
                }
                bits
            })
        })
        .flatten()
    }

    /// Starts a sync on map `name` (adding it, invalid, if missing): hands
    /// over the blocks written since the last successful sync (`None`:
    /// unknown, the map is invalid) and starts the map afresh. A take still
    /// pending (a sync that never finished) is merged in first.
    pub fn take(&self, name: &str) -> Result<Option<Vec<u64>>, TrackingError> {
        self.add(name)?;
        Ok(self
            .with(name, |m| {
                if let Some(p) = m.pending.take() {
                    m.map.or_in(&p.bits);
                    (m.valid, m.base) = (p.was_valid, p.was_base);
                }
                let bits = m.map.take();
                let was_valid = m.valid;
                let out = was_valid.then(|| bits.clone());
                m.pending = Some(Pending { bits, was_valid, was_base: m.base.take() });
                // Valid again only once the sync has succeeded.
                m.valid = false;
                out
            })
            .flatten())
    }

    /// The blocks the take in progress on map `name` handed over (what a
    /// sync started then must send besides what is written during it);
    /// `None` when none is in progress or the map was invalid.
    pub fn taken(&self, name: &str) -> Option<Vec<u64>> {
        self.with(name, |m| m.pending.as_ref().filter(|p| p.was_valid).map(|p| p.bits.clone())).flatten()
    }

    /// Like [`NamedMaps::taken`], with the sync the blocks count from:
    /// `None` also when that sync was not named.
    pub fn taken_since(&self, name: &str) -> Option<(Vec<u64>, String)> {
        self.with(name, |m| {
            let p = m.pending.as_ref().filter(|p| p.was_valid)?;
            Some((p.bits.clone(), p.was_base.clone()?))
        })
        .flatten()
    }

    /// Like [`NamedMaps::tracked_writes`], with the sync the blocks count
    /// from: `None` also when that sync was not named.
    pub fn tracked_since(&self, name: &str) -> Option<(Vec<u64>, String)> {
        let base = self.with(name, |m| m.pending.as_ref().map_or(m.base.clone(), |p| p.was_base.clone())).flatten()?;
        Some((self.tracked_writes(name)?, base))
    }

    /// Ends the sync that [`NamedMaps::take`] started. After a success
    /// (`synced`: the name of that sync, which the other side keeps) the
    /// map is valid from the take on and counts from that sync; after a
    /// failure (`None`) the blocks handed over are merged back. Whether a
    /// take was pending.
    pub fn finish(&self, name: &str, synced: Option<&str>) -> bool {
        self.with(name, |m| {
            let Some(p) = m.pending.take() else { return false };
            match synced {
                Some(base) => (m.valid, m.base) = (true, Some(base.into())),
                None => {
                    m.map.or_in(&p.bits);
                    (m.valid, m.base) = (p.was_valid, p.was_base);
                }
            }
            true
        })
        .unwrap_or(false)
    }

    /// Clears map `name` and declares it valid; whether it exists.
    pub fn reset(&self, name: &str) -> bool {
        self.with(name, |m| {
            m.map.clear();
            m.pending = None;
            // Valid, but from no sync the other side could name.
            (m.valid, m.base) = (true, None);
        })
        .is_some()
    }

    /// Every map, by name.
    pub fn status(&self) -> Vec<MapStatus> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<MapStatus> = maps
            .iter()
            .map(|m| {
                let pending = m.pending.as_ref().map_or(0, |p| count(&p.bits));
                MapStatus {
                    name: m.name.clone(),
                    valid: m.pending.as_ref().map_or(m.valid, |p| p.was_valid),
                    blocks: count(&m.map.snapshot()) + pending,
                    syncing: m.pending.is_some(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// What loading the file beside the image found, when the maps could
    /// not all be trusted (or there was no file).
    pub fn note(&self) -> Option<String> {
        self.note.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Adds to the note (a problem with the file beside the image).
    pub fn add_note(&self, more: String) {
        let mut note = self.note.write().unwrap_or_else(PoisonError::into_inner);
        *note = Some(match note.take() {
            Some(n) => format!("{n}; {more}"),
            None => more,
        });
    }

    /// The maps as the file keeps them. A take still pending is merged
    /// back first (as if its sync failed: a superset is always safe).
    fn saved(&self) -> Vec<SavedMap> {
        let maps = self.maps.read().unwrap_or_else(PoisonError::into_inner);
        maps.iter()
            .map(|m| {
                let mut bits = m.map.snapshot();
                let (mut valid, mut base) = (m.valid, &m.base);
                if let Some(p) = &m.pending {
                    bits.iter_mut().zip(&p.bits).for_each(|(a, b)| *a |= b);
                    (valid, base) = (p.was_valid, &p.was_base);
                }
                SavedMap { name: m.name.clone(), valid, base: base.clone(), runs: runs(&bits) }
            })
            .collect()
    }

    /// Replaces the maps with those loaded from the file.
    fn install(&self, loaded: Vec<Loaded>, note: Option<String>) {
        let maps = loaded
            .into_iter()
            .map(|Loaded { name, valid, base, bits }| {
                let map = WordMap::new(self.words);
                if valid {
                    map.or_in(&bits);
                }
                Named { name, map, valid, base: base.filter(|_| valid), pending: None }
            })
            .collect();
        *self.maps.write().unwrap_or_else(PoisonError::into_inner) = maps;
        *self.note.write().unwrap_or_else(PoisonError::into_inner) = note;
    }
}

/// What identifies an image between a save and the next load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageIdentity {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size, bytes.
    pub size: u64,
    /// Modification time: seconds and nanoseconds.
    pub mtime: (i64, i64),
}

impl ImageIdentity {
    /// The identity of the file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    /// The identity of the open file `file` now (whatever its path names).
    pub fn of_file(file: &File) -> std::io::Result<Self> {
        Ok(Self::from_metadata(&file.metadata()?))
    }

    fn from_metadata(m: &std::fs::Metadata) -> Self {
        ImageIdentity { dev: m.dev(), ino: m.ino(), size: m.len(), mtime: (m.mtime(), m.mtime_nsec()) }
    }
}

/// A run of non-zero words: the index of its first word, and the words.
type Run = (u64, Vec<u64>);

/// One map as the file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedMap {
    name: String,
    valid: bool,
    /// The sync it counts from (format version 2 on).
    base: Option<String>,
    runs: Vec<Run>,
}

/// A map as loaded, before it is trusted or not.
#[derive(Debug)]
struct Loaded {
    name: String,
    valid: bool,
    base: Option<String>,
    bits: Vec<u64>,
}

/// The file's payload (separate from the runtime maps).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedMaps {
    /// Set while a VM runs the image.
    in_use: bool,
    /// The image when the maps were saved.
    image: ImageIdentity,
    /// Bytes per bit.
    granule: u64,
    maps: Vec<SavedMap>,
}

fn runs(bits: &[u64]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (i, &w) in bits.iter().enumerate() {
        if w == 0 {
            continue;
        }
        match out.last_mut() {
            Some((start, words)) if *start + words.len() as u64 == i as u64 => words.push(w),
            _ => out.push((i as u64, vec![w])),
        }
    }
    out
}

/// The bitmap file of the image at `image`.
pub fn file_for(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".");
    s.push(SUFFIX);
    PathBuf::from(s)
}

/// The largest file a loader reads for an image of `size` bytes: every
/// map full, with a run header per word, and the names.
fn max_file_bytes(size: u64) -> u64 {
    let words = size.div_ceil(GRANULE).div_ceil(64);
    (HEADER + CHECKSUM) as u64 + 64 + MAX_MAPS as u64 * (words * 20 + MAX_NAME as u64 + 32)
}

fn encode(maps: &SavedMaps) -> Vec<u8> {
    let payload = postcard::to_stdvec(maps).expect("encoding plain data into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER + payload.len() + CHECKSUM);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode(path: &Path, bytes: &[u8], image_size: u64) -> Result<SavedMaps, TrackingError> {
    let bad = |why: String| TrackingError::Corrupt { path: path.into(), why };
    if bytes.len() < HEADER + CHECKSUM {
        return Err(bad(format!("{} bytes, shorter than its header and checksum", bytes.len())));
    }
    if bytes[..8] != MAGIC {
        return Err(bad("not a wanmig bitmap file (bad magic)".into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(bad(format!("format version {version}; this build reads {VERSION}")));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len != (bytes.len() - HEADER - CHECKSUM) as u64 {
        return Err(bad(format!("declares {len} payload bytes, holds {}", bytes.len() - HEADER - CHECKSUM)));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("checksum mismatch".into()));
    }
    let maps: SavedMaps = postcard::from_bytes(&body[HEADER..]).map_err(|e| bad(format!("payload: {e}")))?;
    let words = image_size.div_ceil(GRANULE).div_ceil(64);
    if maps.maps.len() > MAX_MAPS {
        return Err(bad(format!("{} maps", maps.maps.len())));
    }
    for m in &maps.maps {
        if m.name.is_empty() || m.name.len() > MAX_NAME {
            return Err(bad(format!("a map name of {} bytes", m.name.len())));
        }
        for (start, w) in &m.runs {
            if start.checked_add(w.len() as u64).is_none_or(|end| end > words) {
                return Err(bad(format!("map {:?}: a run past the image's {words} words", m.name)));
            }
        }
    }
    Ok(maps)
}

/// Writes `bytes` to `path` atomically: a temporary file, synced, renamed
/// over it, the directory synced.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TrackingError> {
    let io = |what, source| TrackingError::Io { what, path: path.into(), source };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    // The image may sit in a directory others can write (shared storage):
    // a link planted at the temporary name is removed, never followed, and
    // one planted again in between makes the create fail, not write through.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("cannot remove the stale", e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| io("cannot create", e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io("cannot write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("cannot install", e))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync the directory of", e))
}

/// Loads the maps saved beside `image` into `maps` (each trusted only if
/// the file vouches for it, see the module docs), then marks the file "in
/// use": from now on a crash leaves every map invalid. Called when a VM
/// takes the image; `file` is the image the VM opened (its identity is
/// read from it, not from whatever `image` names now).
pub fn attach(image: &Path, file: &File, maps: &NamedMaps) -> Result<(), TrackingError> {
    let path = file_for(image);
    let now = ImageIdentity::of_file(file).map_err(|source| TrackingError::Io {
        what: "cannot stat",
        path: image.into(),
        source,
    })?;
    let (loaded, note) = match read(&path, now.size) {
        Ok(None) => (Vec::new(), Some("no bitmap file: nothing was tracked".to_string())),
        Err(e) => (Vec::new(), Some(format!("not trusted: {}", wanmig_types::error_chain(&e)))),
        Ok(Some(saved)) => {
            let why_not = if saved.in_use {
                Some("the VM that last used the image did not stop cleanly (crash or kill)".to_string())
            } else if saved.image != now {
                Some(format!("the image changed while no VM tracked it (saved {:?}, now {:?})", saved.image, now))
            } else if saved.granule != GRANULE {
                Some(format!("granule {} (this build tracks {GRANULE})", saved.granule))
            } else {
                None
            };
            let words = usize::try_from(now.size.div_ceil(GRANULE).div_ceil(64)).expect("fits");
            let loaded = saved
                .maps
                .into_iter()
                .map(|m| {
                    let mut bits = vec![0u64; words];
                    for (start, run) in &m.runs {
                        bits[*start as usize..*start as usize + run.len()].copy_from_slice(run);
                    }
                    Loaded { name: m.name, valid: m.valid && why_not.is_none(), base: m.base, bits }
                })
                .collect();
            (loaded, why_not.map(|w| format!("every map invalid: {w}")))
        }
    };
    maps.install(loaded, note);
    write_file(image, file, maps, true)
}

/// Saves the maps beside `image` with "in use" clear and the image's
/// identity after flushing it (`file`: the image the VM opened): called
/// when a VM lets go of the image cleanly, with no guest write in flight.
pub fn save(image: &Path, file: &File, maps: &NamedMaps) -> Result<(), TrackingError> {
    file.sync_all().map_err(|source| TrackingError::Io { what: "cannot flush", path: image.into(), source })?;
    write_file(image, file, maps, false)
}

fn write_file(image: &Path, file: &File, maps: &NamedMaps, in_use: bool) -> Result<(), TrackingError> {
    let identity = ImageIdentity::of_file(file).map_err(|source| TrackingError::Io {
        what: "cannot stat",
        path: image.into(),
        source,
    })?;
    let saved = SavedMaps { in_use, image: identity, granule: GRANULE, maps: maps.saved() };
    write_atomic(&file_for(image), &encode(&saved))
}

/// What the file beside an image says, for tools and tests: whether it is
/// marked in use, and each map's name, validity and blocks (bit i = bytes
/// `[4096 i, 4096 (i + 1))`). `None` when there is no file.
#[allow(clippy::type_complexity)] // (name, valid, bits): read once, printed.
pub fn inspect(image: &Path) -> Result<Option<(bool, Vec<(String, bool, Vec<u64>)>)>, TrackingError> {
    let size = std::fs::metadata(image)
        .map_err(|source| TrackingError::Io { what: "cannot stat", path: image.into(), source })?
        .len();
    let words = usize::try_from(size.div_ceil(GRANULE).div_ceil(64)).expect("fits");
    Ok(read(&file_for(image), size)?.map(|saved| {
        let maps = saved
            .maps
            .into_iter()
            .map(|m| {
                let mut bits = vec![0u64; words];
                for (start, run) in &m.runs {
                    bits[*start as usize..*start as usize + run.len()].copy_from_slice(run);
                }
                (m.name, m.valid, bits)
            })
            .collect();
        (saved.in_use, maps)
    }))
}

fn read(path: &Path, image_size: u64) -> Result<Option<SavedMaps>, TrackingError> {
    let io = |source| TrackingError::Io { what: "cannot read", path: path.into(), source };
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let len = file.metadata().map_err(io)?.len();
    let max = max_file_bytes(image_size);
    if len > max {
        return Err(TrackingError::Corrupt {
            path: path.into(),
            why: format!("{len} bytes, more than the {max} maps of this image can take"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut bytes).map_err(io)?;
    decode(path, &bytes, image_size).map(Some)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn image(dir: &Path, size: u64) -> PathBuf {
        let p = dir.join("disk.img");
        File::create(&p).and_then(|f| f.set_len(size)).expect("image");
        p
    }

    /// The image as a VM holds it open.
    fn open(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).expect("open the image")
    }

    fn blocks(bits: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, &word) in bits.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    out.push(w as u64 * 64 + b);
                }
            }
        }
        out
    }

    #[test]
    fn a_new_map_is_invalid_until_a_sync_succeeds_and_a_failed_sync_loses_nothing() {
        let maps = NamedMaps::new(1 << 20);
        maps.record(0, 4096); // before the map: unknown
        maps.add("dr").expect("add");
        assert_eq!(maps.tracked_writes("dr"), None, "a new map cannot vouch for the past");
        assert_eq!(maps.tracked_writes("other"), None);
        maps.record(8192, 100);
        // A sync of an invalid map: compare digests (None), then valid.
        assert_eq!(maps.take("dr").expect("take"), None);
        maps.record(3 * 4096, 4096); // during the sync
        assert!(maps.finish("dr", Some("s1")));
        assert_eq!(maps.tracked_writes("dr").map(|b| blocks(&b)), Some(vec![3]));
        assert_eq!(maps.tracked_since("dr").map(|(b, s)| (blocks(&b), s)), Some((vec![3], "s1".into())));
        // A failed sync merges back what it was handed, and still counts
        // from the sync before it.
        maps.record(5 * 4096, 8192);
        assert_eq!(maps.take("dr").expect("take").map(|b| blocks(&b)), Some(vec![3, 5, 6]));
        assert_eq!(maps.taken("dr").map(|b| blocks(&b)), Some(vec![3, 5, 6]));
        assert_eq!(maps.taken_since("dr").map(|(b, s)| (blocks(&b), s)), Some((vec![3, 5, 6], "s1".into())));
        maps.record(9 * 4096, 1);
        assert_eq!(maps.tracked_writes("dr").map(|b| blocks(&b)), Some(vec![3, 5, 6, 9]), "peek during a sync");
        assert_eq!(maps.tracked_since("dr").map(|(_, s)| s), Some("s1".into()));
        assert!(maps.finish("dr", None));
        assert_eq!(maps.tracked_since("dr").map(|(b, s)| (blocks(&b), s)), Some((vec![3, 5, 6, 9], "s1".into())));
        assert!(!maps.finish("dr", Some("s2")), "nothing pending");
        // A reset map is valid but counts from no sync the other side can name.
        assert!(maps.reset("dr"));
        assert_eq!(maps.tracked_writes("dr"), Some(vec![0; 4]));
        assert_eq!(maps.tracked_since("dr"), None);
        assert_eq!(maps.take("dr").expect("take"), Some(vec![0; 4]));
        assert_eq!(maps.taken_since("dr"), None);
        assert!(maps.remove("dr") && !maps.remove("dr"));
        assert!(maps.add("").is_err());
    }

    #[test]
    fn links_planted_beside_a_shared_image_are_never_written_through() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = image(dir.path(), 1 << 20);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("victim");
        let mut tmp = file_for(&img).into_os_string();
        tmp.push(".tmp");
        std::os::unix::fs::symlink(&victim, &tmp).expect("link at the temporary name");
        let maps = NamedMaps::new(1 << 20);
        maps.add("a").expect("add");
        save(&img, &open(&img), &maps).expect("save past the link");
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious", "written through a link");
        // A link at the maps' own name is replaced, not followed, and a
        // link there is never read as maps.
        std::fs::remove_file(file_for(&img)).expect("rm");
        std::os::unix::fs::symlink(&victim, file_for(&img)).expect("link at the name");
        let again = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &again).expect("attach");
        assert!(again.note().is_some_and(|n| n.contains("not trusted")), "{:?}", again.note());
        assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    }

    #[test]
    fn maps_survive_a_clean_stop_and_not_a_crash_or_a_change_of_the_image() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = image(dir.path(), 1 << 20);
        let maps = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &maps).expect("attach");
        assert!(maps.note().is_some_and(|n| n.contains("no bitmap file")));
        maps.add("a").expect("add");
        maps.add("b").expect("add");
        maps.take("a").expect("take");
        maps.finish("a", Some("sync-1"));
        maps.record(4096 * 7, 4096);
        save(&img, &open(&img), &maps).expect("save");

        // A clean restart: "a" valid with its block and its base, "b" still invalid.
        let again = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &again).expect("attach");
        assert_eq!(again.note(), None);
        assert_eq!(again.tracked_writes("a").map(|b| blocks(&b)), Some(vec![7]));
        assert_eq!(again.tracked_since("a").map(|(_, s)| s), Some("sync-1".into()));
        assert_eq!(again.tracked_writes("b"), None);
        assert_eq!(
            again.status().iter().map(|s| (s.name.as_str(), s.valid)).collect::<Vec<_>>(),
            [("a", true), ("b", false)]
        );

        // A crash: the file still says "in use".
        let crashed = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &crashed).expect("attach");
        assert_eq!(crashed.tracked_writes("a"), None);
        assert_eq!(crashed.tracked_since("a"), None);
        assert!(crashed.note().is_some_and(|n| n.contains("did not stop cleanly")), "{:?}", crashed.note());
        assert_eq!(crashed.status().len(), 2, "the names survive, invalid");

        // Valid again after a reset and a clean stop; then the image is
        // written while no VM tracks it.
        crashed.reset("a");
        save(&img, &open(&img), &crashed).expect("save");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"x", 0))
            .expect("write");
        let changed = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &changed).expect("attach");
        assert_eq!(changed.tracked_writes("a"), None);
        assert!(changed.note().is_some_and(|n| n.contains("image changed")), "{:?}", changed.note());

        // A damaged file, or none: nothing is trusted.
        save(&img, &open(&img), &changed).expect("save");
        let path = file_for(&img);
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let damaged = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &damaged).expect("attach");
        assert!(damaged.status().is_empty());
        assert!(damaged.note().is_some_and(|n| n.contains("checksum")), "{:?}", damaged.note());
        std::fs::remove_file(&path).expect("rm");
        let missing = NamedMaps::new(1 << 20);
        attach(&img, &open(&img), &missing).expect("attach");
        assert!(missing.status().is_empty() && missing.tracked_writes("a").is_none());
    }

    #[test]
    fn a_file_for_another_image_size_or_too_large_is_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = image(dir.path(), 1 << 30);
        let maps = NamedMaps::new(1 << 30);
        attach(&img, &open(&img), &maps).expect("attach");
        maps.add("x").expect("add");
        maps.reset("x");
        maps.record((1 << 30) - 4096, 4096);
        save(&img, &open(&img), &maps).expect("save");
        // The image shrinks: its last block is no longer in it.
        std::fs::OpenOptions::new().write(true).open(&img).and_then(|f| f.set_len(1 << 20)).expect("shrink");
        assert!(matches!(read(&file_for(&img), 1 << 20), Err(TrackingError::Corrupt { .. })));
        let bytes = std::fs::read(file_for(&img)).expect("read");
        assert!((bytes.len() as u64) < max_file_bytes(1 << 30));
        std::fs::write(file_for(&img), vec![0u8; max_file_bytes(1 << 20) as usize + 1]).expect("write");
        assert!(matches!(read(&file_for(&img), 1 << 20), Err(TrackingError::Corrupt { .. })));
    }

    proptest! {
        /// The maps against a model: every write lands in every map; a take
        /// followed by a failed finish loses nothing; the saved file reads
        /// back to the same maps.
        #[test]
        fn maps_match_a_model(ops in proptest::collection::vec((0u8..5, 0u64..(1 << 20), 1usize..20000), 1..60)) {
            let maps = NamedMaps::new(1 << 20);
            maps.add("m").unwrap();
            maps.reset("m");
            let mut model = std::collections::BTreeSet::new();
            let mut taken: Option<std::collections::BTreeSet<u64>> = None;
            for (op, offset, len) in ops {
                match op {
                    0 | 1 => {
                        let len = len.min(((1 << 20) - offset) as usize);
                        maps.record(offset, len);
                        if len > 0 {
                            for b in offset / GRANULE..=(offset + len as u64 - 1) / GRANULE {
                                model.insert(b);
                            }
                        }
                    }
                    2 if taken.is_none() => {
                        let got = maps.take("m").unwrap();
                        prop_assert_eq!(got.map(|b| blocks(&b).into_iter().collect()), Some(model.clone()));
                        taken = Some(std::mem::take(&mut model));
                    }
                    3 => if let Some(t) = taken.take() {
                        maps.finish("m", None);
                        model.extend(t);
                    },
                    _ => if taken.take().is_some() {
                        maps.finish("m", Some("s"));
                    },
                }
                let mut want = model.clone();
                if let Some(t) = &taken { want.extend(t.iter().copied()); }
                let peek = maps.tracked_writes("m").map(|b| blocks(&b).into_iter().collect::<std::collections::BTreeSet<_>>());
                prop_assert_eq!(peek, Some(want));
            }
            let saved = SavedMaps { in_use: false, image: ImageIdentity { dev: 1, ino: 2, size: 1 << 20, mtime: (3, 4) }, granule: GRANULE, maps: maps.saved() };
            let back = decode(Path::new("x"), &encode(&saved), 1 << 20).unwrap();
            prop_assert_eq!(back, saved);
        }
    }
}
