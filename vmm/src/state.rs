//! The versioned, checksummed container that VM state is saved in.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "WANMIGST"
//! 8       4     format version (little-endian u32), currently 1
//! 12      8     payload length (little-endian u64), at most MAX_STATE_BYTES
//! 20      n     payload: postcard-encoded `VmState`
//! 20+n    32    blake3 of bytes 0..20+n
//! ```
//!
//! The loader checks, in this order and before allocating anything sized by
//! the file: the total length against [`MAX_STATE_BYTES`], the magic, the
//! version, that the declared payload length is exactly what the file
//! holds, and the checksum; only then does it decode. KVM structures inside
//! the payload are raw bytes whose length must match the structure exactly
//! ([`Pod`]).

use std::marker::PhantomData;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// First bytes of every state file.
pub const STATE_MAGIC: [u8; 8] = *b"WANMIGST";
/// The format version this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Largest payload a loader accepts (a VM's state is tens of KiB per vCPU).
pub const MAX_STATE_BYTES: u64 = 16 << 20;
const HEADER: usize = 20;
const CHECKSUM: usize = 32;

/// Why a state file was refused.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("cannot access the state file")]
    Io(#[source] std::io::Error),
    /// Shorter than its header, checksum or declared payload.
    #[error("state file is truncated: {have} bytes, at least {need} needed")]
    Truncated {
        /// Bytes present.
        have: u64,
        /// Bytes needed.
        need: u64,
    },
    /// Not a wanmig state file.
    #[error("not a wanmig state file (bad magic)")]
    BadMagic,
    /// Written by a format this build does not read.
    #[error("state format version {0} is not supported (this build reads version {STATE_VERSION})")]
    UnsupportedVersion(u32),
    /// Declares or has more than [`MAX_STATE_BYTES`].
    #[error("state payload of {0} bytes exceeds the limit of {MAX_STATE_BYTES}")]
    TooLarge(u64),
    /// Bytes after the checksum.
    #[error("state file has {0} bytes after its checksum")]
    TrailingBytes(u64),
    /// Content does not match the checksum.
    #[error("state file checksum mismatch (corrupted)")]
    BadChecksum,
    /// The checksum matched but the payload does not decode.
    #[error("state payload does not decode")]
    Decode(#[source] postcard::Error),
}

/// Encodes `value` into a complete container.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let payload = postcard::to_stdvec(value).expect("encoding plain data into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER + payload.len() + CHECKSUM);
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Checks and decodes a complete container.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StateError> {
    let have = bytes.len() as u64;
    if have < (HEADER + CHECKSUM) as u64 {
        // A short file with the wrong magic is still just "not ours".
        if bytes.len() >= 8 && bytes[..8] != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        return Err(StateError::Truncated { have, need: (HEADER + CHECKSUM) as u64 });
    }
    if bytes[..8] != STATE_MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(StateError::UnsupportedVersion(version));
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    if len > MAX_STATE_BYTES {
        return Err(StateError::TooLarge(len));
    }
    let need = HEADER as u64 + len + CHECKSUM as u64;
    if have < need {
        return Err(StateError::Truncated { have, need });
    }
    if have > need {
        return Err(StateError::TrailingBytes(have - need));
    }
    let body_end = HEADER + len as usize;
    if blake3::hash(&bytes[..body_end]).as_bytes() != &bytes[body_end..] {
        return Err(StateError::BadChecksum);
    }
    postcard::from_bytes(&bytes[HEADER..body_end]).map_err(StateError::Decode)
}

/// Writes `value` to `path` durably: a temporary file, fsync, then rename,
/// so a crash never leaves a half-written state file under the final name.
pub fn write_file<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(StateError::Io)?;
    f.write_all(&encode(value)).and_then(|()| f.sync_all()).map_err(StateError::Io)?;
    std::fs::rename(&tmp, path).map_err(StateError::Io)
}

/// Reads and decodes `path`, refusing files larger than the limit before
/// reading them.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(StateError::Io)?;
    let size = file.metadata().map_err(StateError::Io)?.len();
    let max = MAX_STATE_BYTES + (HEADER + CHECKSUM) as u64;
    if size > max {
        return Err(StateError::TooLarge(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(StateError::Io)?;
    decode(&bytes)
}

/// A plain-data KVM structure saved as its exact bytes.
///
/// Deserializing refuses any other length: unlike the bindings' own serde
/// support, which pads or truncates, a size mismatch here is an error.
pub struct Pod<T>(pub T);

impl<T> std::fmt::Debug for Pod<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pod<{}>", std::any::type_name::<T>())
    }
}

impl<T: IntoBytes + Immutable> PartialEq for Pod<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_bytes() == other.0.as_bytes()
    }
}

impl<T: IntoBytes + Immutable> Serialize for Pod<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.as_bytes())
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Pod<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<T: FromBytes> serde::de::Visitor<'_> for V<T> {
            type Value = Pod<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "exactly {} bytes of {}", std::mem::size_of::<T>(), std::any::type_name::<T>())
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Pod<T>, E> {
                T::read_from_bytes(b).map(Pod).map_err(|_| E::invalid_length(b.len(), &self))
            }
        }
        d.deserialize_bytes(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Pod<kvm_regs>,
        list: Vec<u32>,
    }

    fn sample() -> Sample {
        Sample { name: "vm".into(), regs: Pod(kvm_regs { rip: 0x1234, ..Default::default() }), list: vec![1, 2, 3] }
    }

    #[test]
    fn round_trip() {
        let s: Sample = decode(&encode(&sample())).expect("decodes");
        assert_eq!(s, sample());
    }

    fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
        body.truncate(body.len() - CHECKSUM);
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    #[test]
    fn every_truncation_is_refused() {
        let good = encode(&sample());
        for n in 0..good.len() {
            let e = decode::<Sample>(&good[..n]).expect_err("truncated");
            assert!(matches!(e, StateError::Truncated { .. } | StateError::BadMagic), "{n}: {e}");
        }
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let good = encode(&sample());
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(matches!(decode::<Sample>(&magic), Err(StateError::BadMagic)));
        let mut version = good.clone();
        version[8] = 2;
        assert!(matches!(decode::<Sample>(&version), Err(StateError::UnsupportedVersion(2))));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode::<Sample>(&huge), Err(StateError::TooLarge(u64::MAX))));
        let mut flipped = good.clone();
        flipped[HEADER + 2] ^= 0x40;
        assert!(matches!(decode::<Sample>(&flipped), Err(StateError::BadChecksum)));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(decode::<Sample>(&long), Err(StateError::TrailingBytes(1))));
    }

    #[test]
    fn valid_checksum_over_bad_payload_is_a_decode_error() {
        // A Pod of the wrong length, with a checksum that matches.
        let mut bytes = encode(&sample());
        let name_len = 1 + 2; // varint length + "vm"
        let pod_len_at = HEADER + name_len;
        // postcard writes 144 = size_of::<kvm_regs>() as the varint 0x90 0x01.
        assert_eq!(&bytes[pod_len_at..pod_len_at + 2], &[0x90, 0x01]);
        bytes[pod_len_at] = 0x10; // now claims 16 bytes
        let e = decode::<Sample>(&with_checksum(bytes)).expect_err("bad pod");
        assert!(matches!(e, StateError::Decode(_)), "{e}");
        let mut garbage = encode(&sample());
        for b in &mut garbage[HEADER..HEADER + 8] {
            *b = 0xff;
        }
        assert!(matches!(decode::<Sample>(&with_checksum(garbage)), Err(StateError::Decode(_))));
    }

    #[test]
    fn oversized_files_are_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.bin");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(MAX_STATE_BYTES + 4096).expect("sparse file");
        assert!(matches!(read_file::<Sample>(&path), Err(StateError::TooLarge(_))));
        write_file(&path, &sample()).expect("write");
        assert_eq!(read_file::<Sample>(&path).expect("read"), sample());
    }
}
