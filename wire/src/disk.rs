//! The disk messages: chunking parameters, manifests, need lists, chunks,
//! dirty-extent batches and the final digest.
//!
//! A disk moves in two ways. Its image is cut into content-defined chunks
//! (fastcdc, with [`ChunkParams`] agreed in the hello so that every host
//! cuts the same way), announced in [`Manifest`]s of blake3 ids; the
//! destination answers each with a [`Need`] list of the ids its chunk store
//! lacks, and only those travel (`DiskChunk`). Then the extents the guest
//! writes during the copy travel as [`DiskWrites`] at 4 KiB granularity,
//! round after round and a last time inside the stop-and-copy, and a
//! `DiskDone` digest closes each disk.

use crate::codec::{DecodeError, Reader, Writer};
pub use wanmig_types::ChunkId;

/// Granularity of re-sent extents: the VMM logs guest writes per 4 KiB.
pub const EXTENT_GRANULE: u64 = 4096;
/// Most chunks in one manifest part.
pub const MAX_MANIFEST_CHUNKS: u32 = 16 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: u32 = 4 << 20;
/// Most extents in one `DiskWrites`.
pub const MAX_EXTENTS: u32 = 4096;
/// Most data bytes in one `DiskWrites`.
pub const MAX_EXTENT_BYTES: u32 = 8 << 20;

/// fastcdc (2020) parameters: minimum, average and maximum chunk sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Smallest chunk, bytes.
    pub min: u32,
    /// Average chunk, bytes.
    pub avg: u32,
    /// Largest chunk, bytes.
    pub max: u32,
}

impl ChunkParams {
    /// 16 / 64 / 256 KiB: a 64 KiB average keeps a 20 GiB manifest near
    /// 12 MB of ids while a 4 KiB guest write re-sends one chunk.
    pub const DEFAULT: ChunkParams = ChunkParams { min: 16 << 10, avg: 64 << 10, max: 256 << 10 };

    /// Whether fastcdc accepts these sizes and they fit the protocol.
    pub fn check(&self) -> Result<(), &'static str> {
        let ok = self.min >= 4096 && self.min <= 1 << 20 && self.min <= self.avg && self.avg <= self.max;
        if !(ok && self.max <= MAX_CHUNK) {
            return Err("chunk sizes must satisfy 4 KiB <= min <= 1 MiB, min <= avg <= max <= 4 MiB");
        }
        Ok(())
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u32(self.min);
        w.u32(self.avg);
        w.u32(self.max);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let p = ChunkParams { min: r.u32("chunk min")?, avg: r.u32("chunk avg")?, max: r.u32("chunk max")? };
        p.check().map_err(|reason| DecodeError::Invalid { field: "chunk parameters", reason })?;
        Ok(p)
    }
}

impl std::fmt::Display for ChunkParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fastcdc-2020 {}/{}/{} KiB", self.min >> 10, self.avg >> 10, self.max >> 10)
    }
}

/// One chunk of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestChunk {
    /// Length in bytes.
    pub len: u32,
    /// Its blake3 id, or `None` for an all-zero chunk (left a hole).
    pub id: Option<ChunkId>,
}

/// A run of consecutive chunks of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Disk index in the hello's shape.
    pub disk: u8,
    /// Sequence number, answered by the `Need` of the same number.
    pub seq: u32,
    /// Image offset of the first chunk.
    pub offset: u64,
    /// The chunks, back to back from `offset`.
    pub chunks: Vec<ManifestChunk>,
}

const CHUNK_DATA: u8 = 1;
const CHUNK_ZERO: u8 = 2;

impl Manifest {
    /// Bytes of image the part covers.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }

    /// Whether it holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.disk);
        w.u32(self.seq);
        w.u64(self.offset);
        w.u32(self.chunks.len() as u32);
        for c in &self.chunks {
            match &c.id {
                Some(id) => {
                    w.u8(CHUNK_DATA);
                    w.u32(c.len);
                    w.bytes(&id.0);
                }
                None => {
                    w.u8(CHUNK_ZERO);
                    w.u32(c.len);
                }
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (disk, seq, offset) = (r.u8("disk")?, r.u32("manifest seq")?, r.u64("manifest offset")?);
        let n = r.count("manifest chunks", MAX_MANIFEST_CHUNKS)?;
        // At least 5 bytes per chunk must follow: no allocation on a lie.
        if r.remaining() < n * 5 {
            return Err(DecodeError::Truncated { field: "manifest chunks", need: n * 5, have: r.remaining() });
        }
        let mut chunks = Vec::with_capacity(n);
        let mut end = offset;
        for _ in 0..n {
            let kind = r.u8("chunk kind")?;
            let len = r.u32("chunk length")?;
            if len == 0 || len > MAX_CHUNK {
                return Err(DecodeError::TooLarge {
                    field: "chunk length",
                    value: len.into(),
                    limit: MAX_CHUNK.into(),
                });
            }
            end = end
                .checked_add(len.into())
                .ok_or(DecodeError::Invalid { field: "manifest", reason: "offsets overflow" })?;
            let id = match kind {
                CHUNK_DATA => Some(ChunkId(r.bytes("chunk id", 32)?.try_into().expect("32 bytes"))),
                CHUNK_ZERO => None,
                tag => return Err(DecodeError::UnknownTag { what: "chunk kind", tag: tag.into() }),
            };
            chunks.push(ManifestChunk { len, id });
        }
        Ok(Manifest { disk, seq, offset, chunks })
    }
}

/// The chunks of a manifest part the destination lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Disk index.
    pub disk: u8,
    /// The manifest part answered.
    pub seq: u32,
    /// Indices into that part's chunks, ascending.
    pub chunks: Vec<u32>,
}

impl Need {
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.disk);
        w.u32(self.seq);
        w.u32(self.chunks.len() as u32);
        let mut next = 0u64;
        for &i in &self.chunks {
            w.uleb(u64::from(i) - next);
            next = u64::from(i) + 1;
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (disk, seq) = (r.u8("disk")?, r.u32("need seq")?);
        let n = r.count("needed chunks", MAX_MANIFEST_CHUNKS)?;
        if r.remaining() < n {
            return Err(DecodeError::Truncated { field: "needed chunks", need: n, have: r.remaining() });
        }
        let mut chunks = Vec::with_capacity(n);
        let mut next = 0u64;
        for _ in 0..n {
            let i = next
                .checked_add(r.uleb("needed chunk gap")?)
                .filter(|&i| i < u64::from(MAX_MANIFEST_CHUNKS))
                .ok_or(DecodeError::Invalid { field: "needed chunk", reason: "index out of range" })?;
            chunks.push(i as u32);
            next = i + 1;
        }
        Ok(Need { disk, seq, chunks })
    }
}

/// One chunk's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Disk index.
    pub disk: u8,
    /// Image offset.
    pub offset: u64,
    /// blake3 of `data`, which the receiver checks.
    pub id: ChunkId,
    /// The bytes.
    pub data: Vec<u8>,
}

impl Chunk {
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.disk);
        w.u64(self.offset);
        w.bytes(&self.id.0);
        w.blob(&self.data);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let (disk, offset) = (r.u8("disk")?, r.u64("chunk offset")?);
        let id = ChunkId(r.bytes("chunk id", 32)?.try_into().expect("32 bytes"));
        let data = r.blob("chunk data", MAX_CHUNK)?.to_vec();
        if data.is_empty() || offset.checked_add(data.len() as u64).is_none() {
            return Err(DecodeError::Invalid { field: "chunk", reason: "empty or past the end of any image" });
        }
        Ok(Chunk { disk, offset, id, data })
    }
}

/// A batch of written extents of one disk, 4 KiB-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrites {
    /// Disk index.
    pub disk: u8,
    /// (offset, length) of each extent, ascending and disjoint, each a
    /// multiple of [`EXTENT_GRANULE`].
    pub extents: Vec<(u64, u32)>,
    /// The extents' bytes back to back.
    pub data: Vec<u8>,
}

impl DiskWrites {
    /// The extents with their bytes.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        let mut at = 0usize;
        self.extents.iter().map(move |&(off, len)| {
            let s = &self.data[at..at + len as usize];
            at += len as usize;
            (off, s)
        })
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.disk);
        w.u32(self.extents.len() as u32);
        let mut next = 0u64;
        for &(off, len) in &self.extents {
            w.uleb((off - next) / EXTENT_GRANULE);
            w.uleb(u64::from(len) / EXTENT_GRANULE);
            next = off + u64::from(len);
        }
        w.blob(&self.data);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let disk = r.u8("disk")?;
        let n = r.count("extent count", MAX_EXTENTS)?;
        if r.remaining() < n * 2 {
            return Err(DecodeError::Truncated { field: "extents", need: n * 2, have: r.remaining() });
        }
        let bad = |reason| DecodeError::Invalid { field: "extent", reason };
        let mut extents = Vec::with_capacity(n);
        let (mut next, mut total) = (0u64, 0u64);
        for _ in 0..n {
            let gap = r.uleb("extent gap")?.checked_mul(EXTENT_GRANULE).ok_or(bad("offset overflows"))?;
            let blocks = r.uleb("extent length")?;
            let len = blocks.checked_mul(EXTENT_GRANULE).filter(|&l| l > 0 && l <= MAX_EXTENT_BYTES.into());
            let len = len.ok_or(bad("empty or too long"))?;
            let off = next.checked_add(gap).ok_or(bad("offset overflows"))?;
            next = off.checked_add(len).ok_or(bad("offset overflows"))?;
            total += len;
            extents.push((off, len as u32));
        }
        let data = r.blob("extent data", MAX_EXTENT_BYTES)?;
        if data.len() as u64 != total {
            return Err(bad("data length differs from the extents' total"));
        }
        Ok(DiskWrites { disk, extents, data: data.to_vec() })
    }
}

/// Closes a disk: every byte of it has been sent (the source is paused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskDone {
    /// Disk index.
    pub disk: u8,
    /// Image size.
    pub size: u64,
    /// Digest of the image at pause: blake3 over the blake3 of each
    /// 64 KiB block (see `wanmig_block_sync::BlockDigest`).
    pub digest: [u8; 32],
}

impl DiskDone {
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.disk);
        w.u64(self.size);
        w.bytes(&self.digest);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(DiskDone {
            disk: r.u8("disk")?,
            size: r.u64("disk size")?,
            digest: r.bytes("disk digest", 32)?.try_into().expect("32 bytes"),
        })
    }
}
