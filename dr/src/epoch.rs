//! Epochs: named, verified points in time of a VM's replica, kept in the
//! destination's chunk store.
//!
//! An epoch is made after a successful sync, from the replica images the
//! destination has just verified against the source's digests. For each
//! disk it holds:
//!
//! - a **root** `epoch/VM/ID/diskN` ([`root_name`]): the ids of the chunks
//!   of the image's *layout* (see below), then the ids of its data chunks
//!   in order — so gc keeps every chunk the epoch needs;
//! - the layout: the image as a list of pieces, data (a chunk, whose id is
//!   the next in the root) or zeros (a hole), in order, encoded
//!   (`"WMEL"`, version, count, then a kind byte and a u64 length per
//!   piece) and stored as chunks of at most [`LAYOUT_CHUNK`] bytes;
//!
//! and the epoch as a whole a JSON record in the store's meta
//! `epoch/VM/ID` ([`EpochRecord`]: the time, the sync's migration id, the
//! source, each disk's size and [`wanmig_block_sync::BlockDigest`], and
//! what the VM looked like). The roots are set first and the record last:
//! an epoch exists once its record does; [`prune`] removes the record
//! first, then the roots, and roots left without a record by a crash.
//!
//! An epoch's id is its unix time in seconds (made unique: one more than
//! the previous epoch's if a second had not passed). Everything read back
//! is verified: each chunk against its id, each layout against its length,
//! each image against the epoch's digest.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use wanmig_block_sync::{BlockDigest, ImageChunker, chunker::is_zero};
use wanmig_dedup::{ChunkId, ChunkSource, ChunkStore};
use wanmig_wire::ChunkParams;

use crate::DrError;
use crate::retention::{self, KeepRules};

/// What every epoch's roots and records are named under; gc must be told
/// to keep roots under it ([`wanmig_dedup::Retention::keep_prefixes`]):
/// epochs go by their own rules, not by age.
pub const PREFIX: &str = "epoch/";
/// Largest layout chunk.
pub const LAYOUT_CHUNK: usize = 1 << 20;
/// Bytes per layout piece.
const PIECE_BYTES: usize = 9;
const LAYOUT_MAGIC: [u8; 4] = *b"WMEL";
const LAYOUT_VERSION: u8 = 1;
/// Image bytes the chunker reads at a time.
const BATCH: usize = 8 << 20;

/// One piece of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// This many zero bytes (a hole).
    Zero(u64),
    /// A data chunk of this many bytes; its id is the next in the root.
    Data(u32),
}

impl Piece {
    fn len(&self) -> u64 {
        match *self {
            Piece::Zero(n) => n,
            Piece::Data(n) => u64::from(n),
        }
    }
}

/// What the VM looked like at the epoch (for a failover's configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFacts {
    /// RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// NICs: MAC and IPv4 address (`a.b.c.d/len`) if it had one.
    pub nics: Vec<NicFact>,
}

/// A NIC of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicFact {
    /// Its MAC.
    pub mac: String,
    /// Its IPv4 address and prefix, if configured.
    pub ip: Option<String>,
}

/// A file's identity: where it is and what it was when recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Path.
    pub path: PathBuf,
    /// Device and inode.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size.
    pub size: u64,
    /// Modification time (s, ns).
    pub mtime: (i64, i64),
}

impl FileIdentity {
    /// The file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            path: path.into(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// One disk of an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochDisk {
    /// The image's file name.
    pub name: String,
    /// Size, bytes.
    pub size: u64,
    /// Its digest ([`BlockDigest`]), hex.
    pub digest: String,
    /// Its root.
    pub root: String,
    /// How many of the root's ids are layout chunks (the rest are data).
    pub layout_chunks: u32,
    /// Pieces in the layout.
    pub pieces: u64,
    /// Bytes in data pieces (the rest are holes).
    pub data_bytes: u64,
    /// The replica image the epoch was made from, as it was then: while it
    /// is still that file, unchanged, it holds the epoch's content.
    pub replica: Option<FileIdentity>,
}

/// An epoch, as its record in the store says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The VM.
    pub vm: String,
    /// Its id: unix seconds when it was made.
    pub id: u64,
    /// The sync that made it.
    pub migration_id: String,
    /// Where that sync came from.
    pub source: String,
    /// The VM's shape.
    pub facts: VmFacts,
    /// Its disks, in the VM's order.
    pub disks: Vec<EpochDisk>,
}

impl EpochRecord {
    /// The epoch's time as ISO 8601 (UTC).
    pub fn time(&self) -> String {
        crate::time::iso8601(self.id as i64)
    }
}

/// The record's meta key.
pub fn record_key(vm: &str, id: u64) -> String {
    format!("{PREFIX}{vm}/{id:020}")
}

/// The root of disk `disk` of epoch `id` of `vm`.
pub fn root_name(vm: &str, id: u64, disk: usize) -> String {
    format!("{}/disk{disk}", record_key(vm, id))
}

/// What a new epoch is made of.
#[derive(Debug, Clone)]
pub struct NewEpoch<'a> {
    /// The VM.
    pub vm: &'a str,
    /// The sync that made it.
    pub migration_id: String,
    /// Where the sync came from.
    pub source: String,
    /// The VM's shape.
    pub facts: VmFacts,
    /// The verified replica images, in disk order.
    pub images: &'a [PathBuf],
    /// Unix seconds now.
    pub now: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> DrError {
    let context = format!("{what} {}", path.display());
    move |source| DrError::Io { context, source }
}

fn store_err(what: &str) -> impl FnOnce(wanmig_dedup::StoreError) -> DrError {
    let what = what.to_string();
    move |source| DrError::Store { what, source }
}

/// The chunking parameters the store was filled with (its `chunking` meta,
/// as the destination records it), or the default.
pub fn store_chunking(src: &impl ChunkSource) -> Result<ChunkParams, DrError> {
    let Some(v) = src.meta("chunking").map_err(store_err("reading the chunking"))? else {
        return Ok(ChunkParams::DEFAULT);
    };
    let n: Vec<u32> = v.split('/').filter_map(|x| x.parse().ok()).collect();
    match n[..] {
        [min, avg, max] if (ChunkParams { min, avg, max }).check().is_ok() => Ok(ChunkParams { min, avg, max }),
        _ => Err(DrError::Invalid(format!("the store's chunking parameters {v:?} are unreadable"))),
    }
}

fn encode_layout(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + pieces.len() * PIECE_BYTES);
    out.extend_from_slice(&LAYOUT_MAGIC);
    out.push(LAYOUT_VERSION);
    out.extend_from_slice(&(pieces.len() as u64).to_le_bytes());
    for p in pieces {
        let (kind, len) = match *p {
            Piece::Zero(n) => (0u8, n),
            Piece::Data(n) => (1u8, u64::from(n)),
        };
        out.push(kind);
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

fn decode_layout(bytes: &[u8], size: u64) -> Result<Vec<Piece>, String> {
    if bytes.len() < 13 || bytes[..4] != LAYOUT_MAGIC || bytes[4] != LAYOUT_VERSION {
        return Err("not a layout of this version".into());
    }
    let n = u64::from_le_bytes(bytes[5..13].try_into().expect("8 bytes"));
    let body = &bytes[13..];
    if (body.len() / PIECE_BYTES) as u64 != n || body.len() % PIECE_BYTES != 0 {
        return Err(format!("{n} pieces declared, {} bytes of them", body.len()));
    }
    let mut pieces = Vec::with_capacity(n as usize);
    let mut total = 0u64;
    for p in body.chunks_exact(PIECE_BYTES) {
        let len = u64::from_le_bytes(p[1..9].try_into().expect("8 bytes"));
        let piece = match p[0] {
            0 if len > 0 => Piece::Zero(len),
            1 if len > 0 && len <= wanmig_dedup::MAX_CHUNK as u64 => Piece::Data(len as u32),
            k => return Err(format!("a piece of kind {k} and {len} bytes")),
        };
        total = total.checked_add(len).ok_or("pieces overflow")?;
        pieces.push(piece);
    }
    if total != size {
        return Err(format!("pieces cover {total} bytes of a {size}-byte image"));
    }
    Ok(pieces)
}

/// Pushes a piece, merging adjacent holes.
fn push(pieces: &mut Vec<Piece>, p: Piece) {
    match (pieces.last_mut(), p) {
        (Some(Piece::Zero(a)), Piece::Zero(b)) => *a += b,
        _ => pieces.push(p),
    }
}

/// Stores `chunks` (id, bytes) that the store lacks.
fn put_missing(store: &ChunkStore, chunks: &[(ChunkId, &[u8])]) -> Result<(), DrError> {
    let ids: Vec<ChunkId> = chunks.iter().map(|(id, _)| *id).collect();
    let have = store.contains_many(&ids).map_err(store_err("looking up chunks"))?;
    for ((id, data), have) in chunks.iter().zip(have) {
        if !have {
            store.put(id, data).map_err(store_err("storing a chunk"))?;
        }
    }
    Ok(())
}

/// An image cut into pieces: the layout, the data ids, its digest and size.
type Chunked = (Vec<Piece>, Vec<ChunkId>, [u8; 32], u64);

/// The layout and data ids of an image, chunked as the store's chunks are.
fn chunk_image(store: &ChunkStore, params: ChunkParams, path: &Path) -> Result<Chunked, DrError> {
    let file = File::open(path).map_err(io_err(path, "cannot open"))?;
    let size = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
    let mut chunker = ImageChunker::new(&file, size, params, BATCH);
    let mut digest = BlockDigest::new(size);
    let (mut pieces, mut ids) = (Vec::new(), Vec::new());
    while let Some(batch) = chunker.next_batch(&mut digest).map_err(io_err(path, "cannot read"))? {
        let mut data = Vec::new();
        for c in &batch.chunks {
            match c.id {
                None => push(&mut pieces, Piece::Zero(u64::from(c.len))),
                Some(id) => {
                    pieces.push(Piece::Data(c.len));
                    ids.push(id);
                    data.push((id, batch.bytes(c)));
                }
            }
        }
        put_missing(store, &data)?;
    }
    Ok((pieces, ids, digest.digest(), size))
}

/// Stores a disk's layout and sets its root; returns its record.
fn store_disk(
    store: &ChunkStore,
    root: String,
    path: &Path,
    (pieces, ids, digest, size): Chunked,
) -> Result<EpochDisk, DrError> {
    let layout = encode_layout(&pieces);
    let mut all: Vec<ChunkId> = Vec::with_capacity(layout.len() / LAYOUT_CHUNK + 1 + ids.len());
    let parts: Vec<(ChunkId, &[u8])> = layout.chunks(LAYOUT_CHUNK).map(|c| (ChunkId::of(c), c)).collect();
    put_missing(store, &parts)?;
    all.extend(parts.iter().map(|(id, _)| *id));
    all.extend(&ids);
    store.set_root(&root, &all).map_err(store_err("setting an epoch's root"))?;
    Ok(EpochDisk {
        name: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        size,
        digest: hex(&digest),
        root,
        layout_chunks: parts.len() as u32,
        pieces: pieces.len() as u64,
        data_bytes: pieces.iter().filter(|p| matches!(p, Piece::Data(_))).map(Piece::len).sum(),
        replica: FileIdentity::of(path).ok(),
    })
}

fn next_id(store: &ChunkStore, vm: &str, now: u64) -> Result<u64, DrError> {
    let latest = list(store, Some(vm))?.last().map_or(0, |e| e.id);
    Ok(now.max(latest + 1))
}

fn finish(store: &ChunkStore, rec: &EpochRecord) -> Result<(), DrError> {
    store.commit().map_err(store_err("committing"))?;
    let json = serde_json::to_string(rec).expect("a record serializes");
    store.set_meta(&record_key(&rec.vm, rec.id), &json).map_err(store_err("recording an epoch"))
}

/// Makes an epoch of the replica images in `e` (each chunked whole as the
/// store's chunks are: the new chunks go into the store) and records it.
/// Its digests are of the images as read now.
pub fn record(store: &ChunkStore, e: &NewEpoch<'_>) -> Result<EpochRecord, DrError> {
    let params = store_chunking(store)?;
    let id = next_id(store, e.vm, e.now)?;
    let mut disks = Vec::new();
    for (i, path) in e.images.iter().enumerate() {
        let chunked = chunk_image(store, params, path)?;
        disks.push(store_disk(store, root_name(e.vm, id, i), path, chunked)?);
    }
    let rec = EpochRecord {
        vm: e.vm.into(),
        id,
        migration_id: e.migration_id.clone(),
        source: e.source.clone(),
        facts: e.facts.clone(),
        disks,
    };
    finish(store, &rec)?;
    Ok(rec)
}

/// Makes an epoch of images that differ from epoch `prev`'s only in the
/// 4 KiB blocks marked in `written` (one bitmap per disk, bit i = bytes
/// `[4096 i, 4096 (i + 1))`), whose digests the caller has verified
/// (`digests`): only the pieces those blocks touch are read and hashed, so
/// the work follows what was written, not the image's size. This is for a
/// destination that received written blocks on top of the previous epoch.
pub fn record_incremental(
    store: &ChunkStore,
    e: &NewEpoch<'_>,
    prev: &EpochRecord,
    written: &[Vec<u64>],
    digests: &[[u8; 32]],
) -> Result<EpochRecord, DrError> {
    if prev.disks.len() != e.images.len() || written.len() != e.images.len() || digests.len() != e.images.len() {
        return Err(DrError::Invalid("one written map and digest per disk of the previous epoch".into()));
    }
    let id = next_id(store, e.vm, e.now)?;
    let mut disks = Vec::new();
    for (i, path) in e.images.iter().enumerate() {
        let (pieces, ids) = load_layout(store, &prev.disks[i])?;
        let file = File::open(path).map_err(io_err(path, "cannot open"))?;
        let size = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
        if size != prev.disks[i].size {
            return Err(DrError::Invalid(format!("{} changed size since epoch {}", path.display(), prev.id)));
        }
        let (pieces, ids) = rebase(store, &file, path, &pieces, &ids, &written[i])?;
        disks.push(store_disk(store, root_name(e.vm, id, i), path, (pieces, ids, digests[i], size))?);
    }
    let rec = EpochRecord {
        vm: e.vm.into(),
        id,
        migration_id: e.migration_id.clone(),
        source: e.source.clone(),
        facts: e.facts.clone(),
        disks,
    };
    finish(store, &rec)?;
    Ok(rec)
}

/// Whether any block of `[start, start + len)` is marked in `bits`.
fn touched(bits: &[u64], start: u64, len: u64) -> bool {
    let (first, last) = (start / 4096, (start + len - 1) / 4096);
    (first..=last).any(|b| bits.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0))
}

/// The pieces of the image in `file` given the previous pieces and the
/// blocks written since: untouched pieces stay; a touched one is read
/// again and becomes a data chunk (stored if new) or a hole. Boundaries
/// stay where they were.
fn rebase(
    store: &ChunkStore,
    file: &File,
    path: &Path,
    prev: &[Piece],
    prev_ids: &[ChunkId],
    written: &[u64],
) -> Result<(Vec<Piece>, Vec<ChunkId>), DrError> {
    let (mut pieces, mut ids) = (Vec::with_capacity(prev.len()), Vec::with_capacity(prev_ids.len()));
    let mut next_id = prev_ids.iter();
    let mut offset = 0u64;
    let mut buf = Vec::new();
    for &p in prev {
        let id = match p {
            Piece::Data(_) => Some(
                *next_id.next().ok_or_else(|| DrError::Invalid("a layout with more data pieces than ids".into()))?,
            ),
            Piece::Zero(_) => None,
        };
        let len = p.len();
        if !touched(written, offset, len) {
            match id {
                Some(id) => {
                    pieces.push(p);
                    ids.push(id);
                }
                None => push(&mut pieces, p),
            }
            offset += len;
            continue;
        }
        // A touched hole may be large: re-read it a chunk at a time.
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(wanmig_dedup::MAX_CHUNK as u64) as usize;
            buf.resize(n, 0);
            file.read_exact_at(&mut buf, at).map_err(io_err(path, "cannot read"))?;
            if is_zero(&buf) {
                push(&mut pieces, Piece::Zero(n as u64));
            } else {
                let new = ChunkId::of(&buf);
                put_missing(store, &[(new, &buf)])?;
                pieces.push(Piece::Data(n as u32));
                ids.push(new);
            }
            at += n as u64;
        }
        offset += len;
    }
    Ok((pieces, ids))
}

/// A disk's layout and data ids, checked against each other and its size.
pub fn load_layout(src: &impl ChunkSource, d: &EpochDisk) -> Result<(Vec<Piece>, Vec<ChunkId>), DrError> {
    let bad = |why: String| DrError::Invalid(format!("epoch root {}: {why}", d.root));
    let ids = src.root(&d.root).map_err(store_err("reading an epoch's root"))?.ok_or_else(|| bad("missing".into()))?;
    let n = d.layout_chunks as usize;
    if ids.len() < n {
        return Err(bad(format!("{} ids, {n} layout chunks declared", ids.len())));
    }
    let mut layout = Vec::new();
    for id in &ids[..n] {
        let part = src.get(id).map_err(store_err("reading a layout chunk"))?;
        layout.extend(part.ok_or_else(|| bad(format!("layout chunk {id} is not in the store")))?);
    }
    let pieces = decode_layout(&layout, d.size).map_err(bad)?;
    let data = pieces.iter().filter(|p| matches!(p, Piece::Data(_))).count();
    if data != ids.len() - n {
        return Err(bad(format!("{data} data pieces, {} data ids", ids.len() - n)));
    }
    Ok((pieces, ids[n..].to_vec()))
}

/// Every epoch in the store (of `vm` only, if given), oldest first per VM.
pub fn list(src: &impl ChunkSource, vm: Option<&str>) -> Result<Vec<EpochRecord>, DrError> {
    let prefix = match vm {
        Some(vm) => format!("{PREFIX}{vm}/"),
        None => PREFIX.into(),
    };
    let mut out = Vec::new();
    for (key, value) in src.metas(&prefix).map_err(store_err("listing epochs"))? {
        let rec: EpochRecord =
            serde_json::from_str(&value).map_err(|e| DrError::Invalid(format!("epoch record {key}: {e}")))?;
        if record_key(&rec.vm, rec.id) != key {
            return Err(DrError::Invalid(format!("epoch record {key} names VM {} epoch {}", rec.vm, rec.id)));
        }
        out.push(rec);
    }
    Ok(out)
}

/// Which epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// The newest.
    Latest,
    /// By id.
    Id(u64),
}

impl std::str::FromStr for Which {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "latest" => Ok(Which::Latest),
            n => n.parse().map(Which::Id).map_err(|_| format!("`{s}` is not an epoch id or `latest`")),
        }
    }
}

/// The epoch of `vm` that `which` names.
pub fn find(src: &impl ChunkSource, vm: &str, which: Which) -> Result<EpochRecord, DrError> {
    let all = list(src, Some(vm))?;
    let found = match which {
        Which::Latest => all.last().cloned(),
        Which::Id(id) => all.into_iter().find(|e| e.id == id),
    };
    found.ok_or_else(|| DrError::NotFound(format!("no epoch {which:?} of VM {vm} in the store")))
}

/// What [`materialize`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Materialized {
    /// Bytes of data written (holes are not).
    pub data_bytes: u64,
    /// Time taken, seconds.
    pub secs: f64,
}

/// Writes disk `disk` of epoch `rec` to `out` (which must not exist),
/// sparse (holes stay holes), and checks it against the epoch's digest
/// before returning; a mismatch removes the file.
pub fn materialize(
    src: &impl ChunkSource,
    rec: &EpochRecord,
    disk: usize,
    out: &Path,
) -> Result<Materialized, DrError> {
    let t = Instant::now();
    let d = rec.disks.get(disk).ok_or_else(|| DrError::NotFound(format!("epoch {} has no disk {disk}", rec.id)))?;
    let (pieces, ids) = load_layout(src, d)?;
    let file = OpenOptions::new().write(true).create_new(true).open(out).map_err(io_err(out, "cannot create"))?;
    let written = write_pieces(src, d, &pieces, &ids, &file, out);
    let result = written.and_then(|digest| {
        file.sync_all().map_err(io_err(out, "cannot flush"))?;
        if hex(&digest) != d.digest {
            return Err(DrError::Invalid(format!(
                "{} does not match epoch {}'s digest ({} written, {} recorded)",
                out.display(),
                rec.id,
                hex(&digest),
                d.digest
            )));
        }
        Ok(Materialized { data_bytes: d.data_bytes, secs: t.elapsed().as_secs_f64() })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(out);
    }
    result
}

fn write_pieces(
    src: &impl ChunkSource,
    d: &EpochDisk,
    pieces: &[Piece],
    ids: &[ChunkId],
    file: &File,
    out: &Path,
) -> Result<[u8; 32], DrError> {
    file.set_len(d.size).map_err(io_err(out, "cannot size"))?;
    let mut digest = BlockDigest::new(d.size);
    let zeros = vec![0u8; 1 << 20];
    let (mut offset, mut next) = (0u64, ids.iter());
    for p in pieces {
        match *p {
            Piece::Zero(mut n) => {
                while n > 0 {
                    let k = n.min(zeros.len() as u64) as usize;
                    digest.feed(offset, &zeros[..k]);
                    offset += k as u64;
                    n -= k as u64;
                }
            }
            Piece::Data(len) => {
                let id = next.next().ok_or_else(|| DrError::Invalid("fewer ids than data pieces".into()))?;
                let data = src.get(id).map_err(store_err("reading a chunk"))?.ok_or_else(|| {
                    DrError::Invalid(format!("chunk {id} of epoch root {} is not in the store", d.root))
                })?;
                if data.len() != len as usize {
                    return Err(DrError::Invalid(format!("chunk {id} has {} bytes, its piece {len}", data.len())));
                }
                file.write_all_at(&data, offset).map_err(io_err(out, "cannot write"))?;
                digest.feed(offset, &data);
                offset += u64::from(len);
            }
        }
    }
    Ok(digest.digest())
}

/// How [`base_image`] made the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseFrom {
    /// A copy of the replica, which is still the file the epoch was made
    /// from, unchanged since.
    Replica,
    /// Written from the store (the replica changed or is gone).
    Store,
}

/// Makes `out` (which must not exist) hold disk `disk` of epoch `prev`:
/// the base an incoming image of the next sync starts from, so that only
/// the blocks written since need to arrive. From the replica image when it
/// is still the file the epoch recorded (same device, inode, size and
/// modification time: a copy in the kernel, reflinked where the file
/// system can), else from the store, verified against the epoch's digest.
pub fn base_image(src: &impl ChunkSource, prev: &EpochRecord, disk: usize, out: &Path) -> Result<BaseFrom, DrError> {
    let d = prev.disks.get(disk).ok_or_else(|| DrError::NotFound(format!("epoch {} has no disk {disk}", prev.id)))?;
    if let Some(r) = &d.replica
        && FileIdentity::of(&r.path).is_ok_and(|now| now == *r)
    {
        copy_file(&r.path, out)?;
        // The copy must still be the epoch's: the replica could have
        // changed in between (it is only replaced by renames, which the
        // identity check before sees; this closes the window).
        if FileIdentity::of(&r.path).is_ok_and(|now| now == *r) {
            return Ok(BaseFrom::Replica);
        }
        let _ = std::fs::remove_file(out);
    }
    materialize(src, prev, disk, out).map(|_| BaseFrom::Store)
}

/// Copies `from` to the new file `to` in the kernel (`FICLONE` where the
/// file system shares extents, else `copy_file_range`), keeping holes
/// where it can.
fn copy_file(from: &Path, to: &Path) -> Result<(), DrError> {
    use std::os::fd::AsRawFd;
    let src = File::open(from).map_err(io_err(from, "cannot open"))?;
    let dst = OpenOptions::new().write(true).create_new(true).open(to).map_err(io_err(to, "cannot create"))?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
    if !cloned {
        let size = src.metadata().map_err(io_err(from, "cannot stat"))?.len();
        dst.set_len(size).map_err(io_err(to, "cannot size"))?;
        let mut off = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        while off < size {
            let n = ((size - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off).map_err(io_err(from, "cannot read"))?;
            if !is_zero(&buf[..n]) {
                dst.write_all_at(&buf[..n], off).map_err(io_err(to, "cannot write"))?;
            }
            off += n as u64;
        }
    }
    dst.sync_all().map_err(io_err(to, "cannot flush"))
}

/// The retention rules of `vm`: its own (`dr/retention/VM` in the store's
/// meta), else the store's (`dr/retention`), else [`KeepRules::DEFAULT`].
pub fn rules_for(src: &impl ChunkSource, vm: &str) -> Result<KeepRules, DrError> {
    for key in [format!("dr/retention/{vm}"), "dr/retention".into()] {
        if let Some(v) = src.meta(&key).map_err(store_err("reading retention rules"))? {
            return KeepRules::parse(&v).map_err(|e| DrError::Invalid(format!("retention rules {key}: {e}")));
        }
    }
    Ok(KeepRules::DEFAULT)
}

/// Sets the retention rules of `vm` (or, with `None`, of every VM without
/// rules of its own).
pub fn set_rules(store: &ChunkStore, vm: Option<&str>, rules: &KeepRules) -> Result<(), DrError> {
    let key = vm.map_or_else(|| "dr/retention".to_string(), |vm| format!("dr/retention/{vm}"));
    store.set_meta(&key, &rules.to_string()).map_err(store_err("writing retention rules"))
}

/// What [`prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Epochs kept, oldest first.
    pub kept: Vec<u64>,
    /// Epochs removed.
    pub removed: Vec<u64>,
    /// Roots removed that no record named (a crash between the two).
    pub orphan_roots: u64,
}

/// Applies `rules` to the epochs of `vm`: removes the records, then the
/// roots, of those the rules do not keep (a gc then frees the chunks no
/// other root holds), and roots under the VM's prefix that no record names.
pub fn prune(store: &ChunkStore, vm: &str, rules: &KeepRules) -> Result<PruneReport, DrError> {
    let epochs = list(store, Some(vm))?;
    let times: Vec<i64> = epochs.iter().map(|e| e.id as i64).collect();
    let keep = retention::select(&times, rules);
    let mut report = PruneReport::default();
    for (e, keep) in epochs.iter().zip(keep) {
        if keep {
            report.kept.push(e.id);
            continue;
        }
        store.remove_meta(&record_key(vm, e.id)).map_err(store_err("removing an epoch's record"))?;
        let roots: Vec<&str> = e.disks.iter().map(|d| d.root.as_str()).collect();
        store.remove_roots(&roots).map_err(store_err("removing an epoch's roots"))?;
        report.removed.push(e.id);
    }
    let named: std::collections::HashSet<String> = epochs
        .iter()
        .filter(|e| report.kept.contains(&e.id))
        .flat_map(|e| e.disks.iter().map(|d| d.root.clone()))
        .collect();
    let prefix = format!("{PREFIX}{vm}/");
    let orphans: Vec<String> = store
        .roots()
        .map_err(store_err("listing roots"))?
        .into_iter()
        .map(|r| r.name)
        .filter(|n| n.starts_with(&prefix) && !named.contains(n))
        .collect();
    if !orphans.is_empty() {
        let names: Vec<&str> = orphans.iter().map(String::as_str).collect();
        store.remove_roots(&names).map_err(store_err("removing orphan roots"))?;
        report.orphan_roots = orphans.len() as u64;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use wanmig_dedup::{Retention, StoreView};

    use super::*;

    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
        out
    }

    /// An image of 6 MiB: noise, a 2 MiB hole, noise, a repeated MiB.
    fn image(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).expect("create");
        f.set_len(6 << 20).expect("size");
        f.write_all_at(&noise(1, 2 << 20), 0).expect("write");
        f.write_all_at(&noise(2, 1 << 20), 4 << 20).expect("write");
        f.write_all_at(&noise(2, 1 << 20), 5 << 20).expect("write");
        p
    }

    fn new_epoch<'a>(images: &'a [PathBuf], now: u64) -> NewEpoch<'a> {
        NewEpoch {
            vm: "vm",
            migration_id: format!("m{now}"),
            source: "src:1".into(),
            facts: VmFacts { memory_mib: 64, vcpus: 1, nics: Vec::new() },
            images,
            now,
        }
    }

    fn digest_of(path: &Path) -> [u8; 32] {
        BlockDigest::of_bytes(&std::fs::read(path).expect("read"))
    }

    #[test]
    fn an_epoch_comes_back_out_byte_identical_sparse_and_verified() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ChunkStore::open(&dir.path().join("chunks")).expect("store");
        let img = image(dir.path(), "disk.img");
        let rec = record(&store, &new_epoch(std::slice::from_ref(&img), 1000)).expect("record");
        assert_eq!(rec.id, 1000);
        let d = &rec.disks[0];
        assert_eq!((d.name.as_str(), d.size), ("disk.img", 6 << 20));
        assert_eq!(d.digest, hex(&digest_of(&img)));
        assert!(d.data_bytes >= 4 << 20 && d.data_bytes < 5 << 20, "the hole is not data: {}", d.data_bytes);
        let out = dir.path().join("out.img");
        let m = materialize(&store, &rec, 0, &out).expect("materialize");
        assert_eq!(std::fs::read(&out).expect("read"), std::fs::read(&img).expect("read"));
        assert_eq!(m.data_bytes, d.data_bytes);
        let blocks = std::fs::metadata(&out).map(|m| m.blocks() * 512).expect("stat");
        assert!(blocks < 5 << 20, "holes stay holes: {blocks} bytes allocated");
        assert!(materialize(&store, &rec, 0, &out).is_err(), "never overwrites");
        assert!(matches!(materialize(&store, &rec, 1, &dir.path().join("x")), Err(DrError::NotFound(_))));

        // The same through a read-only view while the store is open.
        let view = StoreView::open(&dir.path().join("chunks")).expect("view");
        assert_eq!(find(&view, "vm", Which::Latest).expect("find"), rec);
        let out2 = dir.path().join("out2.img");
        materialize(&view, &rec, 0, &out2).expect("materialize from a view");
        assert_eq!(digest_of(&out2), digest_of(&img));

        // A chunk that went bad in the store: refused, nothing left behind.
        let (_, ids) = load_layout(&store, d).expect("layout");
        let mut bad = rec.clone();
        bad.disks[0].digest = "00".repeat(32);
        let out3 = dir.path().join("out3.img");
        assert!(matches!(materialize(&store, &bad, 0, &out3), Err(DrError::Invalid(_))));
        assert!(!out3.exists());
        assert!(!ids.is_empty());
    }

    #[test]
    fn epochs_are_listed_pruned_by_the_rules_and_gc_keeps_what_they_hold() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ChunkStore::open(&dir.path().join("chunks")).expect("store");
        let img = image(dir.path(), "disk.img");
        let f = OpenOptions::new().write(true).open(&img).expect("open");
        let mut made = Vec::new();
        // Five syncs an hour apart, each after a new MiB of data; two in
        // the same second get distinct ids.
        for i in 0..5u64 {
            f.write_all_at(&noise(100 + i, 1 << 20), 2 << 20).expect("write");
            made.push(
                record(&store, &new_epoch(std::slice::from_ref(&img), 1_704_067_200 + i * 3600)).expect("record"),
            );
        }
        let again = record(&store, &new_epoch(std::slice::from_ref(&img), 1_704_067_200 + 4 * 3600)).expect("record");
        assert_eq!(again.id, made[4].id + 1);
        made.push(again);
        assert_eq!(list(&store, Some("vm")).expect("list"), made);
        assert!(list(&store, Some("v")).expect("list").is_empty(), "a VM name is not a prefix of another");
        assert_eq!(find(&store, "vm", Which::Id(made[1].id)).expect("find"), made[1]);
        assert!(matches!(find(&store, "vm", Which::Id(7)), Err(DrError::NotFound(_))));

        // Rules: the store's default, then the VM's own.
        assert_eq!(rules_for(&store, "vm").expect("rules"), KeepRules::DEFAULT);
        set_rules(&store, None, &KeepRules { last: 2, ..KeepRules::default() }).expect("set");
        set_rules(&store, Some("vm"), &KeepRules { last: 1, hourly: 2, ..KeepRules::default() }).expect("set");
        let rules = rules_for(&store, "vm").expect("rules");
        assert_eq!(rules.to_string(), "last=1,hourly=2");
        let report = prune(&store, "vm", &rules).expect("prune");
        // last: the newest (hour 4, second 1); hourly: hour 4 covered,
        // hours 3 and 2.
        assert_eq!(report.kept, [made[2].id, made[3].id, made[5].id]);
        assert_eq!(report.removed, [made[0].id, made[1].id, made[4].id]);
        let roots: Vec<String> = store.roots().expect("roots").into_iter().map(|r| r.name).collect();
        assert_eq!(roots.len(), 3, "{roots:?}");

        // gc (epochs kept whatever their age) frees the removed epochs'
        // own chunks and keeps the others complete.
        let before = store.stats().chunks;
        let rule = Retention {
            max_root_age: std::time::Duration::ZERO,
            grace: std::time::Duration::ZERO,
            keep_prefixes: vec![PREFIX.into()],
            ..Retention::default()
        };
        let r = store.gc(&rule).expect("gc");
        assert!(r.chunks_deleted > 0 && store.stats().chunks < before, "{r:?}");
        for e in list(&store, Some("vm")).expect("list") {
            let out = dir.path().join(format!("e{}.img", e.id));
            materialize(&store, &e, 0, &out).expect("a kept epoch is complete");
        }
        // A crash between roots and record leaves a root that prune removes.
        store.set_root(&root_name("vm", 42, 0), &[]).expect("root");
        assert_eq!(prune(&store, "vm", &rules).expect("prune").orphan_roots, 1);
    }

    #[test]
    fn an_incremental_epoch_reads_only_what_was_written_and_comes_back_identical() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = ChunkStore::open(&dir.path().join("chunks")).expect("store");
        let img = image(dir.path(), "disk.img");
        let first = record(&store, &new_epoch(std::slice::from_ref(&img), 10)).expect("record");
        // Scattered 4 KiB writes, one into the hole, one zeroing data.
        let f = OpenOptions::new().write(true).open(&img).expect("open");
        let mut written = vec![0u64; (6 << 20) / 4096 / 64];
        for (block, byte) in [(3u64, 1u8), (700, 2), (900, 0), (1400, 3)] {
            f.write_all_at(&[byte; 4096], block * 4096).expect("write");
            written[(block / 64) as usize] |= 1 << (block % 64);
        }
        let next = record_incremental(
            &store,
            &new_epoch(std::slice::from_ref(&img), 11),
            &first,
            std::slice::from_ref(&written),
            &[digest_of(&img)],
        )
        .expect("incremental");
        let out = dir.path().join("next.img");
        materialize(&store, &next, 0, &out).expect("verified against the digest");
        assert_eq!(std::fs::read(&out).expect("read"), std::fs::read(&img).expect("read"));
        // The untouched pieces are the first epoch's.
        let (_, a) = load_layout(&store, &first.disks[0]).expect("layout");
        let (_, b) = load_layout(&store, &next.disks[0]).expect("layout");
        let shared = b.iter().filter(|id| a.contains(id)).count();
        assert!(shared + 4 >= a.len(), "{shared} of {} kept", a.len());
        // The base of the next image: the replica while it is unchanged.
        let base = dir.path().join("base.img");
        assert_eq!(base_image(&store, &next, 0, &base).expect("base"), BaseFrom::Replica);
        assert_eq!(digest_of(&base), digest_of(&img));
        f.write_all_at(&[9; 10], 0).expect("write");
        let base2 = dir.path().join("base2.img");
        assert_eq!(base_image(&store, &next, 0, &base2).expect("base"), BaseFrom::Store);
        assert_eq!(std::fs::read(&base2).expect("read"), std::fs::read(&out).expect("read"));
    }

    #[test]
    fn a_layout_is_checked_before_it_is_trusted() {
        let pieces = [Piece::Data(4096), Piece::Zero(1 << 30), Piece::Data(100)];
        let enc = encode_layout(&pieces);
        assert_eq!(decode_layout(&enc, 4196 + (1 << 30)), Ok(pieces.to_vec()));
        assert!(decode_layout(&enc, 4196).is_err(), "covers another size");
        assert!(decode_layout(&enc[..enc.len() - 1], 4196 + (1 << 30)).is_err());
        let mut big = enc.clone();
        big[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_layout(&big, 4196 + (1 << 30)).is_err(), "a count it does not hold");
        let mut kind = enc;
        kind[13] = 7;
        assert!(decode_layout(&kind, 4196 + (1 << 30)).is_err());
    }
}
