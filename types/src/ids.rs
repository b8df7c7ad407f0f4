//! Content and migration identifiers.

use std::fmt;
use std::str::FromStr;

/// A chunk's id: the blake3 hash of its content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`: its blake3 hash.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Display for ChunkId {
    /// All 64 hex digits, lowercase.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(f, &self.0)
    }
}

impl fmt::Debug for ChunkId {
    /// The first 16 hex digits, enough to tell chunks apart in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChunkId(")?;
        hex(f, &self.0[..8])?;
        f.write_str(")")
    }
}

/// One migration (or sync) attempt: chosen at random by the source,
/// carried in its hello, journalled by both ends and asked about by
/// `wanmig settle`. Written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MigrationId(pub [u8; 16]);

impl MigrationId {
    /// A fresh id: blake3 of the process id, the time and a stack address,
    /// which differ between any two attempts (uniqueness, not secrecy, is
    /// what an id needs; the pinned TLS identities authenticate).
    pub fn new() -> MigrationId {
        let mut h = blake3::Hasher::new();
        h.update(&std::process::id().to_le_bytes());
        h.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
        let here = 0u8;
        h.update(&(std::ptr::addr_of!(here) as usize).to_le_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.finalize().as_bytes()[..16]);
        MigrationId(id)
    }

    /// The first 8 hex digits: short enough for file names and logs.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex(f, &self.0)
    }
}

impl fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationId({self})")
    }
}

/// Why a text is not a migration id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMigrationId;

impl fmt::Display for BadMigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a migration id is 32 hex digits")
    }
}

impl std::error::Error for BadMigrationId {}

impl FromStr for MigrationId {
    type Err = BadMigrationId;

    fn from_str(s: &str) -> Result<Self, BadMigrationId> {
        if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(BadMigrationId);
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| BadMigrationId)?;
        }
        Ok(MigrationId(id))
    }
}

impl serde::Serialize for MigrationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MigrationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_are_fresh_and_round_trip() {
        let (a, b) = (MigrationId::new(), MigrationId::new());
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<MigrationId>(), Ok(a));
        assert_eq!(a.short().len(), 8);
        for bad in ["", "00", &"g".repeat(32), &"0".repeat(33), "é0000000000000000000000000000000"] {
            assert!(bad.parse::<MigrationId>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(serde_json::from_str::<MigrationId>(&json).expect("back"), a);
    }

    #[test]
    fn chunk_ids_are_blake3_and_print_in_hex() {
        let id = ChunkId::of(b"abc");
        assert_eq!(id.0, *blake3::hash(b"abc").as_bytes());
        assert_eq!(id.to_string().len(), 64);
        assert!(format!("{id:?}").starts_with("ChunkId(6437b3ac"));
    }
}
