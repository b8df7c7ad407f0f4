//! On-disk layouts: the index's keys and values, and the pack file and record
//! headers.
//!
//! All integers are little-endian except in keys, where they are big-endian so
//! that RocksDB's byte order is numeric order. Every value starts with a
//! version byte and has a fixed size (root segments: a checked multiple of
//! 32); every decoder checks length, version and ranges and returns why it
//! refused, never panics. Lengths read from disk are capped at
//! [`MAX_CHUNK`] before anything is allocated from them.
//!
//! # Index keys (one column family)
//!
//! | key | value |
//! |---|---|
//! | `c` + id (32) | [`ChunkEntry`] (30 bytes) |
//! | `r` + name | [`RootHeader`] (29 bytes; version 1: 17) |
//! | `R` + name length (u32) + name + segment (u32) | up to [`ROOT_SEGMENT`] ids, 32 bytes each |
//! | `m` + key | a UTF-8 string ([`crate::ChunkStore::meta`]) |
//! | `p` + pack number (u32) | [`PackState`] (10 bytes): committed length |
//! | `s` | [`Totals`] (25 bytes): chunks, raw and stored bytes |
//! | `v` | format version (u32), [`FORMAT_VERSION`] |
//!
//! # Pack files
//!
//! `packs/NNNNNNNN.pack`: a [`PACK_HEADER_LEN`]-byte header (magic
//! `WMPACK\0\0`, version, pack number), then records, each a
//! [`RECORD_HEADER_LEN`]-byte [`RecordHeader`] (magic `WMCK`, codec, raw and
//! stored length, id) followed by the stored bytes. A pack can be read without
//! the index; the index says where each chunk is and how long the pack was at
//! the last commit.

use crate::{ChunkId, MAX_CHUNK};

/// The store format this build reads and writes (index key `v`).
pub(crate) const FORMAT_VERSION: u32 = 1;

/// Key prefix of chunk entries.
pub(crate) const K_CHUNK: u8 = b'c';
/// Key prefix of root headers.
pub(crate) const K_ROOT: u8 = b'r';
/// Key prefix of root segments.
pub(crate) const K_ROOT_SEG: u8 = b'R';
/// Key prefix of meta strings.
pub(crate) const K_META: u8 = b'm';
/// Key prefix of pack states.
pub(crate) const K_PACK: u8 = b'p';
/// Key of the persistent totals.
pub(crate) const K_TOTALS: &[u8] = b"s";
/// Key of the format version.
pub(crate) const K_VERSION: &[u8] = b"v";

/// Ids per root segment value (2 MiB of ids).
pub(crate) const ROOT_SEGMENT: usize = 1 << 16;

/// Version byte of every index value.
const VALUE_VERSION: u8 = 1;

/// `c` + id.
pub(crate) fn chunk_key(id: &ChunkId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = K_CHUNK;
    k[1..].copy_from_slice(&id.0);
    k
}

/// The id in a chunk key, if it is one.
pub(crate) fn chunk_key_id(key: &[u8]) -> Option<ChunkId> {
    match key {
        [K_CHUNK, rest @ ..] => rest.try_into().ok().map(ChunkId),
        _ => None,
    }
}

/// `p` + pack number.
pub(crate) fn pack_key(pack: u32) -> [u8; 5] {
    let mut k = [K_PACK; 5];
    k[1..].copy_from_slice(&pack.to_be_bytes());
    k
}

/// The pack number in a pack key, if it is one.
pub(crate) fn pack_key_no(key: &[u8]) -> Option<u32> {
    match key {
        [K_PACK, rest @ ..] => rest.try_into().ok().map(u32::from_be_bytes),
        _ => None,
    }
}

/// `r` + name.
pub(crate) fn root_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(K_ROOT);
    k.extend_from_slice(name.as_bytes());
    k
}

/// `R` + name length + name: what all of a root's segment keys start with.
/// The length makes it a prefix of no other root's segments.
pub(crate) fn root_seg_prefix(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + name.len());
    k.push(K_ROOT_SEG);
    // A name longer than 4 GiB cannot be a RocksDB key anyway.
    k.extend_from_slice(&(name.len() as u32).to_be_bytes());
    k.extend_from_slice(name);
    k
}

/// The key of segment `seg` of root `name`.
pub(crate) fn root_seg_key(name: &[u8], seg: u32) -> Vec<u8> {
    let mut k = root_seg_prefix(name);
    k.extend_from_slice(&seg.to_be_bytes());
    k
}

/// `m` + key.
pub(crate) fn meta_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(K_META);
    k.extend_from_slice(key.as_bytes());
    k
}

/// How a chunk's bytes are stored. 0 is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// As they are.
    Raw = 1,
    /// One zstd frame.
    Zstd = 2,
}

impl Codec {
    fn from_u8(b: u8) -> Result<Codec, String> {
        match b {
            1 => Ok(Codec::Raw),
            2 => Ok(Codec::Zstd),
            _ => Err(format!("unknown codec {b}")),
        }
    }
}

/// Checks the lengths of a stored chunk against each other and [`MAX_CHUNK`]:
/// data are compressed only when that makes them smaller.
fn check_lengths(codec: Codec, stored_len: u32, raw_len: u32) -> Result<(), String> {
    if raw_len as usize > MAX_CHUNK {
        return Err(format!("raw length {raw_len} is over the {MAX_CHUNK}-byte cap"));
    }
    let ok = match codec {
        Codec::Raw => stored_len == raw_len,
        Codec::Zstd => stored_len < raw_len,
    };
    if !ok {
        return Err(format!("stored length {stored_len} does not fit raw length {raw_len} with codec {codec:?}"));
    }
    Ok(())
}

/// Where a chunk is: the value of `c` + id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkEntry {
    /// Pack number.
    pub pack: u32,
    /// Offset of the record header in the pack.
    pub offset: u64,
    /// Bytes after the record header.
    pub stored_len: u32,
    /// Bytes of content.
    pub raw_len: u32,
    /// How the stored bytes encode the content.
    pub codec: Codec,
    /// Unix seconds when the chunk was first stored (kept on compaction).
    pub added: u64,
}

/// Encoded size of a [`ChunkEntry`].
pub(crate) const CHUNK_ENTRY_LEN: usize = 30;

impl ChunkEntry {
    /// Record header plus stored bytes: what the chunk takes in its pack.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.stored_len)
    }

    /// Offset just past the record.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.record_len())
    }

    /// version u8, pack u32, offset u64, stored u32, raw u32, codec u8, added u64.
    pub fn encode(&self) -> [u8; CHUNK_ENTRY_LEN] {
        let mut b = [0u8; CHUNK_ENTRY_LEN];
        b[0] = VALUE_VERSION;
        b[1..5].copy_from_slice(&self.pack.to_le_bytes());
        b[5..13].copy_from_slice(&self.offset.to_le_bytes());
        b[13..17].copy_from_slice(&self.stored_len.to_le_bytes());
        b[17..21].copy_from_slice(&self.raw_len.to_le_bytes());
        b[21] = self.codec as u8;
        b[22..30].copy_from_slice(&self.added.to_le_bytes());
        b
    }

    /// Checks length, version, codec and lengths.
    pub fn decode(v: &[u8]) -> Result<ChunkEntry, String> {
        let b: &[u8; CHUNK_ENTRY_LEN] =
            v.try_into().map_err(|_| format!("index entry is {} bytes, not {CHUNK_ENTRY_LEN}", v.len()))?;
        if b[0] != VALUE_VERSION {
            return Err(format!("index entry has version {}, not {VALUE_VERSION}", b[0]));
        }
        let e = ChunkEntry {
            pack: u32::from_le_bytes(arr(&b[1..5])),
            offset: u64::from_le_bytes(arr(&b[5..13])),
            stored_len: u32::from_le_bytes(arr(&b[13..17])),
            raw_len: u32::from_le_bytes(arr(&b[17..21])),
            codec: Codec::from_u8(b[21])?,
            added: u64::from_le_bytes(arr(&b[22..30])),
        };
        check_lengths(e.codec, e.stored_len, e.raw_len)?;
        if e.offset < PACK_HEADER_LEN {
            return Err(format!("offset {} is inside the pack header", e.offset));
        }
        Ok(e)
    }
}

/// A fixed-size array from a slice of exactly that size (the callers slice
/// fixed-size arrays with constant bounds).
fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    s.try_into().expect("constant-bounds slice of a fixed-size array")
}

/// State of a pack: the value of `p` + pack number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackState {
    /// In use; every index entry pointing into it lies within `len` bytes,
    /// the pack's length at the last commit.
    Live {
        /// Committed length.
        len: u64,
    },
    /// Compacted away: its chunks live elsewhere, the file is to be deleted.
    Retired,
}

/// Encoded size of a [`PackState`].
pub(crate) const PACK_STATE_LEN: usize = 10;

impl PackState {
    /// version u8, state u8 (1 live, 2 retired), committed length u64.
    pub fn encode(&self) -> [u8; PACK_STATE_LEN] {
        let mut b = [0u8; PACK_STATE_LEN];
        b[0] = VALUE_VERSION;
        match self {
            PackState::Live { len } => {
                b[1] = 1;
                b[2..].copy_from_slice(&len.to_le_bytes());
            }
            PackState::Retired => b[1] = 2,
        }
        b
    }

    /// Checks length, version and state.
    pub fn decode(v: &[u8]) -> Result<PackState, String> {
        let b: &[u8; PACK_STATE_LEN] =
            v.try_into().map_err(|_| format!("pack state is {} bytes, not {PACK_STATE_LEN}", v.len()))?;
        if b[0] != VALUE_VERSION {
            return Err(format!("pack state has version {}, not {VALUE_VERSION}", b[0]));
        }
        match b[1] {
            1 => Ok(PackState::Live { len: u64::from_le_bytes(arr(&b[2..])) }),
            2 => Ok(PackState::Retired),
            s => Err(format!("unknown pack state {s}")),
        }
    }
}

/// A root's header: the value of `r` + name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RootHeader {
    /// Unix seconds when the root was set (or last extended).
    pub set_secs: u64,
    /// Number of ids in its segments.
    pub count: u64,
    /// Unix seconds after which gc drops it whatever its age (0: never).
    pub expires_secs: u64,
    /// Number of its segments (the next one appended gets this number).
    pub segments: u32,
}

/// Encoded size of a version 1 [`RootHeader`] (no expiry, full segments).
pub(crate) const ROOT_HEADER_V1_LEN: usize = 17;
/// Encoded size of a [`RootHeader`] as this build writes it (version 2).
pub(crate) const ROOT_HEADER_LEN: usize = 29;
/// The root header version this build writes.
const ROOT_VERSION: u8 = 2;

impl RootHeader {
    /// version u8 (2), set time u64, count u64, expiry u64, segments u32.
    /// Version 1 (17 bytes: version, set time, count) is still read: its
    /// segments are all full but the last and it never expires.
    pub fn encode(&self) -> [u8; ROOT_HEADER_LEN] {
        let mut b = [0u8; ROOT_HEADER_LEN];
        b[0] = ROOT_VERSION;
        b[1..9].copy_from_slice(&self.set_secs.to_le_bytes());
        b[9..17].copy_from_slice(&self.count.to_le_bytes());
        b[17..25].copy_from_slice(&self.expires_secs.to_le_bytes());
        b[25..29].copy_from_slice(&self.segments.to_le_bytes());
        b
    }

    /// Checks length and version.
    pub fn decode(v: &[u8]) -> Result<RootHeader, String> {
        let (version, len) = match v.first() {
            Some(&VALUE_VERSION) => (VALUE_VERSION, ROOT_HEADER_V1_LEN),
            Some(&ROOT_VERSION) => (ROOT_VERSION, ROOT_HEADER_LEN),
            Some(other) => {
                return Err(format!("root header has version {other}, not {VALUE_VERSION} or {ROOT_VERSION}"));
            }
            None => return Err("root header is empty".into()),
        };
        if v.len() != len {
            return Err(format!("root header of version {version} is {} bytes, not {len}", v.len()));
        }
        let (set_secs, count) = (u64::from_le_bytes(arr(&v[1..9])), u64::from_le_bytes(arr(&v[9..17])));
        if version == VALUE_VERSION {
            let segments =
                u32::try_from(count.div_ceil(ROOT_SEGMENT as u64)).map_err(|_| "too many ids".to_string())?;
            return Ok(RootHeader { set_secs, count, expires_secs: 0, segments });
        }
        Ok(RootHeader {
            set_secs,
            count,
            expires_secs: u64::from_le_bytes(arr(&v[17..25])),
            segments: u32::from_le_bytes(arr(&v[25..29])),
        })
    }
}

/// The ids of one root segment value, checked to be whole ids and at most
/// [`ROOT_SEGMENT`] of them.
pub(crate) fn decode_root_segment(v: &[u8]) -> Result<impl Iterator<Item = ChunkId> + '_, String> {
    if v.len() % 32 != 0 || v.len() / 32 > ROOT_SEGMENT {
        return Err(format!("root segment of {} bytes is not a whole number of at most {ROOT_SEGMENT} ids", v.len()));
    }
    Ok(v.chunks_exact(32).map(|c| ChunkId(arr(c))))
}

/// Counters kept in the index so that [`crate::ChunkStore::stats`] is right
/// after a reopen: the value of `s`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    /// Indexed chunks.
    pub chunks: u64,
    /// Their content bytes.
    pub raw_bytes: u64,
    /// Their stored bytes (after compression, without record headers).
    pub stored_bytes: u64,
}

/// Encoded size of [`Totals`].
pub(crate) const TOTALS_LEN: usize = 25;

impl Totals {
    /// Adds one chunk.
    pub fn add(&mut self, e: &ChunkEntry) {
        self.chunks += 1;
        self.raw_bytes += u64::from(e.raw_len);
        self.stored_bytes += u64::from(e.stored_len);
    }

    /// Removes one chunk.
    pub fn remove(&mut self, e: &ChunkEntry) {
        self.chunks = self.chunks.saturating_sub(1);
        self.raw_bytes = self.raw_bytes.saturating_sub(u64::from(e.raw_len));
        self.stored_bytes = self.stored_bytes.saturating_sub(u64::from(e.stored_len));
    }

    /// Both added up.
    pub fn plus(&self, o: &Totals) -> Totals {
        Totals {
            chunks: self.chunks + o.chunks,
            raw_bytes: self.raw_bytes + o.raw_bytes,
            stored_bytes: self.stored_bytes + o.stored_bytes,
        }
    }

    /// version u8, chunks u64, raw bytes u64, stored bytes u64.
    pub fn encode(&self) -> [u8; TOTALS_LEN] {
        let mut b = [0u8; TOTALS_LEN];
        b[0] = VALUE_VERSION;
        b[1..9].copy_from_slice(&self.chunks.to_le_bytes());
        b[9..17].copy_from_slice(&self.raw_bytes.to_le_bytes());
        b[17..25].copy_from_slice(&self.stored_bytes.to_le_bytes());
        b
    }

    /// Checks length and version.
    pub fn decode(v: &[u8]) -> Result<Totals, String> {
        let b: &[u8; TOTALS_LEN] =
            v.try_into().map_err(|_| format!("totals are {} bytes, not {TOTALS_LEN}", v.len()))?;
        if b[0] != VALUE_VERSION {
            return Err(format!("totals have version {}, not {VALUE_VERSION}", b[0]));
        }
        Ok(Totals {
            chunks: u64::from_le_bytes(arr(&b[1..9])),
            raw_bytes: u64::from_le_bytes(arr(&b[9..17])),
            stored_bytes: u64::from_le_bytes(arr(&b[17..25])),
        })
    }
}

/// Magic at the start of every pack file.
pub(crate) const PACK_MAGIC: [u8; 8] = *b"WMPACK\0\0";
/// Version of the pack file format.
pub(crate) const PACK_VERSION: u32 = 1;
/// Size of a pack file's header: magic, version u32, pack number u32.
pub(crate) const PACK_HEADER_LEN: u64 = 16;

/// A pack file's header.
pub(crate) fn encode_pack_header(pack: u32) -> [u8; PACK_HEADER_LEN as usize] {
    let mut b = [0u8; PACK_HEADER_LEN as usize];
    b[..8].copy_from_slice(&PACK_MAGIC);
    b[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&pack.to_le_bytes());
    b
}

/// Checks a pack file's header: magic, version and that it names `pack`.
pub(crate) fn check_pack_header(b: &[u8; PACK_HEADER_LEN as usize], pack: u32) -> Result<(), String> {
    if b[..8] != PACK_MAGIC {
        return Err("no pack magic at its start".into());
    }
    let version = u32::from_le_bytes(arr(&b[8..12]));
    if version != PACK_VERSION {
        return Err(format!("pack format version {version}, this build reads {PACK_VERSION}"));
    }
    let no = u32::from_le_bytes(arr(&b[12..16]));
    if no != pack {
        return Err(format!("its header says it is pack {no}"));
    }
    Ok(())
}

/// Magic at the start of every record.
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"WMCK";
/// Size of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 48;

/// The header before a chunk's bytes in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    /// How the bytes after the header encode the content.
    pub codec: Codec,
    /// Content length.
    pub raw_len: u32,
    /// Bytes after the header.
    pub stored_len: u32,
    /// The chunk's id.
    pub id: ChunkId,
}

impl RecordHeader {
    /// magic (4), codec u8, 3 zero bytes, raw length u32, stored length u32, id (32).
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = self.codec as u8;
        b[8..12].copy_from_slice(&self.raw_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.stored_len.to_le_bytes());
        b[16..48].copy_from_slice(&self.id.0);
        b
    }

    /// Checks magic, codec and lengths.
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<RecordHeader, String> {
        if b[..4] != RECORD_MAGIC || b[5..8] != [0, 0, 0] {
            return Err("no record magic".into());
        }
        let h = RecordHeader {
            codec: Codec::from_u8(b[4])?,
            raw_len: u32::from_le_bytes(arr(&b[8..12])),
            stored_len: u32::from_le_bytes(arr(&b[12..16])),
            id: ChunkId(arr(&b[16..48])),
        };
        check_lengths(h.codec, h.stored_len, h.raw_len)?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec() -> impl Strategy<Value = Codec> {
        prop_oneof![Just(Codec::Raw), Just(Codec::Zstd)]
    }

    fn entry() -> impl Strategy<Value = ChunkEntry> {
        (any::<u32>(), PACK_HEADER_LEN..u64::MAX, 1..=MAX_CHUNK as u32, codec(), any::<u64>()).prop_flat_map(
            |(pack, offset, raw_len, codec, added)| {
                let stored = if codec == Codec::Raw { (raw_len..=raw_len).boxed() } else { (0..raw_len).boxed() };
                stored.prop_map(move |stored_len| ChunkEntry { pack, offset, stored_len, raw_len, codec, added })
            },
        )
    }

    proptest! {
        #[test]
        fn chunk_entry_round_trips(e in entry()) {
            prop_assert_eq!(ChunkEntry::decode(&e.encode()), Ok(e));
        }

        #[test]
        fn decoders_never_panic(v in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ChunkEntry::decode(&v);
            let _ = PackState::decode(&v);
            let _ = RootHeader::decode(&v);
            let _ = Totals::decode(&v);
            let _ = decode_root_segment(&v).map(|i| i.count());
            if let Ok(b) = <[u8; RECORD_HEADER_LEN]>::try_from(&v[..v.len().min(RECORD_HEADER_LEN)]) {
                let _ = RecordHeader::decode(&b);
            }
        }

        #[test]
        fn record_header_round_trips(e in entry(), id in any::<[u8; 32]>()) {
            let h = RecordHeader { codec: e.codec, raw_len: e.raw_len, stored_len: e.stored_len, id: ChunkId(id) };
            prop_assert_eq!(RecordHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn small_values_round_trip(len in any::<u64>(), a in any::<u64>(), b in any::<u64>(), c in any::<u64>()) {
            let live = PackState::Live { len };
            prop_assert_eq!(PackState::decode(&live.encode()), Ok(live));
            prop_assert_eq!(PackState::decode(&PackState::Retired.encode()), Ok(PackState::Retired));
            let r = RootHeader { set_secs: a, count: b, expires_secs: c, segments: (c >> 7) as u32 };
            prop_assert_eq!(RootHeader::decode(&r.encode()), Ok(r));
            // A version 1 header (as older builds wrote it) still reads.
            let mut v1 = [0u8; ROOT_HEADER_V1_LEN];
            v1[0] = 1;
            v1[1..9].copy_from_slice(&a.to_le_bytes());
            v1[9..17].copy_from_slice(&(b >> 20).to_le_bytes());
            let old = RootHeader::decode(&v1).expect("version 1");
            prop_assert_eq!((old.set_secs, old.count, old.expires_secs), (a, b >> 20, 0));
            let t = Totals { chunks: a, raw_bytes: b, stored_bytes: c };
            prop_assert_eq!(Totals::decode(&t.encode()), Ok(t));
        }
    }

    #[test]
    fn entry_decode_refuses_wrong_length_version_codec_and_lengths() {
        let e = ChunkEntry { pack: 1, offset: 16, stored_len: 10, raw_len: 100, codec: Codec::Zstd, added: 5 };
        let good = e.encode();
        assert!(ChunkEntry::decode(&good[..29]).unwrap_err().contains("29 bytes"));
        let mut longer = good.to_vec();
        longer.push(0);
        assert!(ChunkEntry::decode(&longer).is_err());
        let mut v = good;
        v[0] = 2;
        assert!(ChunkEntry::decode(&v).unwrap_err().contains("version"));
        let mut v = good;
        v[21] = 0;
        assert!(ChunkEntry::decode(&v).unwrap_err().contains("codec"));
        let too_big = ChunkEntry { raw_len: MAX_CHUNK as u32 + 1, ..e };
        assert!(ChunkEntry::decode(&too_big.encode()).unwrap_err().contains("cap"));
        let raw_mismatch = ChunkEntry { codec: Codec::Raw, ..e };
        assert!(ChunkEntry::decode(&raw_mismatch.encode()).is_err());
        let in_header = ChunkEntry { offset: 3, ..e };
        assert!(ChunkEntry::decode(&in_header.encode()).is_err());
    }

    #[test]
    fn keys_sort_and_parse() {
        assert!(pack_key(1) < pack_key(256));
        assert_eq!(pack_key_no(&pack_key(77)), Some(77));
        assert_eq!(pack_key_no(b"p12"), None);
        let id = ChunkId::of(b"x");
        assert_eq!(chunk_key_id(&chunk_key(&id)), Some(id));
        assert_eq!(chunk_key_id(&chunk_key(&id)[..32]), None);
        // One root's segments never fall under another root's prefix.
        assert!(!root_seg_key(b"ab", 0).starts_with(&root_seg_prefix(b"a")));
    }

    #[test]
    fn pack_header_checked() {
        let h = encode_pack_header(9);
        assert!(check_pack_header(&h, 9).is_ok());
        assert!(check_pack_header(&h, 8).unwrap_err().contains("pack 9"));
        let mut bad = h;
        bad[0] = b'X';
        assert!(check_pack_header(&bad, 9).is_err());
    }
}
