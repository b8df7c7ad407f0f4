//! Pack files: naming, creating, appending a record, reading one back with
//! every check between the index entry, the record header and the content.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{ChunkEntry, Codec, PACK_HEADER_LEN, RECORD_HEADER_LEN, RecordHeader};
use crate::{ChunkId, StoreError};

/// zstd level for chunk data.
pub(crate) const ZSTD_LEVEL: i32 = 1;

/// `packs/NNNNNNNN.pack`.
pub(crate) fn pack_path(packs_dir: &Path, pack: u32) -> PathBuf {
    packs_dir.join(format!("{pack:08}.pack"))
}

/// Whether a file name ends in `.pack`, and if so the pack number it spells
/// (`None` inside when it spells none: a stranger in the directory).
pub(crate) fn parse_pack_name(name: &OsStr) -> Option<Option<u32>> {
    let name = name.to_str()?;
    let stem = name.strip_suffix(".pack")?;
    if stem.len() != 8 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return Some(None);
    }
    Some(stem.parse().ok())
}

/// `data` compressed with zstd when that makes it smaller, else as it is.
pub(crate) fn encode(data: &[u8]) -> (Codec, Cow<'_, [u8]>) {
    match zstd::bulk::compress(data, ZSTD_LEVEL) {
        Ok(z) if z.len() < data.len() => (Codec::Zstd, Cow::Owned(z)),
        // Incompressible, or zstd failed on it: raw is always correct.
        _ => (Codec::Raw, Cow::Borrowed(data)),
    }
}

/// Writes a record (header and stored bytes, one write) at `offset`.
pub(crate) fn write_record(
    file: &File,
    offset: u64,
    id: &ChunkId,
    codec: Codec,
    raw_len: u32,
    stored: &[u8],
) -> io::Result<()> {
    // Callers cap chunks at MAX_CHUNK, far below u32::MAX.
    let stored_len = u32::try_from(stored.len()).map_err(io::Error::other)?;
    let header = RecordHeader { codec, raw_len, stored_len, id: *id };
    let mut buf = Vec::with_capacity(RECORD_HEADER_LEN + stored.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(stored);
    file.write_all_at(&buf, offset)
}

/// Reads the record of `id` that `e` points at and checks its header against
/// the entry; returns the stored bytes (not yet decoded).
pub(crate) fn read_stored(file: &File, path: &Path, id: &ChunkId, e: &ChunkEntry) -> Result<Vec<u8>, StoreError> {
    let where_ = || format!("pack {}: chunk {id} at offset {}", path.display(), e.offset);
    if e.offset < PACK_HEADER_LEN {
        return Err(corrupt(format!("{}: offset is inside the pack header", where_())));
    }
    // The entry's lengths were capped at MAX_CHUNK when it was decoded.
    let mut buf = vec![0u8; RECORD_HEADER_LEN + e.stored_len as usize];
    if let Err(err) = file.read_exact_at(&mut buf, e.offset) {
        return Err(if err.kind() == io::ErrorKind::UnexpectedEof {
            corrupt(format!("{}: the pack ends inside the {}-byte record", where_(), buf.len()))
        } else {
            StoreError::Io { context: format!("reading {}", where_()), source: err }
        });
    }
    let header_bytes: &[u8; RECORD_HEADER_LEN] =
        buf[..RECORD_HEADER_LEN].try_into().expect("buffer starts with a whole record header");
    let h = RecordHeader::decode(header_bytes).map_err(|why| corrupt(format!("{}: record header: {why}", where_())))?;
    if h.id != *id {
        return Err(corrupt(format!("{}: the record there is chunk {}", where_(), h.id)));
    }
    if (h.codec, h.raw_len, h.stored_len) != (e.codec, e.raw_len, e.stored_len) {
        return Err(corrupt(format!(
            "{}: record header says {:?} {} -> {} bytes, the index {:?} {} -> {}",
            where_(),
            h.codec,
            h.raw_len,
            h.stored_len,
            e.codec,
            e.raw_len,
            e.stored_len
        )));
    }
    buf.drain(..RECORD_HEADER_LEN);
    Ok(buf)
}

/// Decodes stored bytes to exactly `e.raw_len` bytes of content and checks
/// they hash to `id`.
pub(crate) fn decode(path: &Path, id: &ChunkId, e: &ChunkEntry, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    let where_ = || format!("pack {}: chunk {id} at offset {}", path.display(), e.offset);
    let raw = match e.codec {
        Codec::Raw => stored,
        Codec::Zstd => {
            // Decodes into a buffer of raw_len (capped at MAX_CHUNK): a frame
            // claiming more is an error, not an allocation.
            let raw = zstd::bulk::decompress(&stored, e.raw_len as usize)
                .map_err(|err| corrupt(format!("{}: zstd data do not decode: {err}", where_())))?;
            if raw.len() != e.raw_len as usize {
                return Err(corrupt(format!("{}: decodes to {} bytes, not {}", where_(), raw.len(), e.raw_len)));
            }
            raw
        }
    };
    let actual = ChunkId::of(&raw);
    if actual != *id {
        return Err(corrupt(format!("{}: content hashes to {actual}", where_())));
    }
    Ok(raw)
}

/// A [`StoreError::Corrupt`] saying the store is not to be trusted.
pub(crate) fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(format!("{what}; the store is not trusted"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_names() {
        assert_eq!(parse_pack_name(OsStr::new("00000012.pack")), Some(Some(12)));
        assert_eq!(parse_pack_name(OsStr::new("12.pack")), Some(None));
        assert_eq!(parse_pack_name(OsStr::new("0000001x.pack")), Some(None));
        assert_eq!(parse_pack_name(OsStr::new("00000012.tmp")), None);
        assert_eq!(pack_path(Path::new("/s/packs"), 3), Path::new("/s/packs/00000003.pack"));
    }

    #[test]
    fn encode_picks_raw_when_zstd_saves_nothing() {
        let zeros = vec![0u8; 4096];
        assert_eq!(encode(&zeros).0, Codec::Zstd);
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let (codec, stored) = encode(&noise);
        assert_eq!(codec, Codec::Raw);
        assert_eq!(&*stored, &noise[..]);
        assert_eq!(encode(&[]).0, Codec::Raw);
    }
}
