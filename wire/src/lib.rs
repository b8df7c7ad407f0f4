//! The migration protocol vocabulary, with no I/O: message types and their
//! bounded codec ([`message`], [`codec`]) and the sans-IO session state
//! machines of both ends ([`session`]).
//!
//! Everything a peer sends is decoded here first, so everything here treats
//! its input as hostile: every length is checked before it is used, every
//! count against a protocol limit, nothing panics on any input (a property
//! test and the cargo-fuzz target in `wire/fuzz` hold it to that).

pub mod codec;
pub mod disk;
pub mod message;
pub mod resume;
pub mod session;

pub use codec::DecodeError;
pub use disk::{Chunk, ChunkParams, DiskDone, DiskWrites, Manifest, ManifestChunk, Need};
pub use message::{DiskInfo, Message, NicInfo, PageData, PageRef, Pages, PagesBuilder, VmShape, features, frame_len};
pub use resume::{DiskPoint, ResumePoint};
pub use session::{
    DestAction, DestSession, FailureOutcome, ProtocolError, Rewind, Settlement, SourceEvent, SourceSession, Stream,
    stream_of,
};

/// ALPN protocol id of this protocol version on QUIC.
pub const ALPN: &[u8] = b"wanmig/1";

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
