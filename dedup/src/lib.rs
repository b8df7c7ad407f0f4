//! Content-addressed chunk store on local disk.
//!
//! A chunk is named by its [`ChunkId`], the blake3 hash of its content. The
//! store keeps chunk data in append-only pack files and an index of where each
//! chunk lives in RocksDB. It knows nothing about VMs: the destination of a
//! disk migration uses it to answer which chunks of a manifest it lacks
//! ([`ChunkStore::contains_many`]), to store the chunks it then receives
//! ([`ChunkStore::put`]) and to copy the ones it already had into the image it
//! assembles ([`ChunkStore::get`]).
//!
//! # Layout of a store directory
//!
//! ```text
//! DIR/index/               RocksDB: chunk entries, roots, meta, pack lengths, totals
//! DIR/packs/00000001.pack  pack header, then records: record header + chunk data
//! ```
//!
//! The on-disk formats are documented in `src/format.rs`. Every index value is versioned and
//! fixed-size, every pack record carries a header that repeats the chunk's id
//! and lengths, and every read checks the content against its id: corrupt data
//! is reported as [`StoreError::Corrupt`], never returned.
//!
//! # Durability
//!
//! [`ChunkStore::put`] appends to the active pack and keeps the chunk's index
//! entry in memory (visible to this process at once). [`ChunkStore::commit`]
//! first `fdatasync`s the pack, then writes the pending entries in one synced
//! RocksDB batch, so an index entry that survives a crash always points at
//! durable data. A crash loses only uncommitted puts; their bytes, past the
//! pack's committed length, are cut off at the next open. The store commits on
//! its own every [`StoreOptions::auto_commit_bytes`] and when dropped.
//!
//! # Retention
//!
//! Named roots ([`ChunkStore::set_root`]) list the chunks an image is made of
//! and keep them alive through [`ChunkStore::gc`]; chunks under no root are
//! deleted once older than [`Retention::grace`]. A root may expire
//! ([`ChunkStore::extend_root`]): gc drops it once past its expiry, whatever
//! its age. A receiver that answers "I have it" for a chunk relies on it
//! staying; so it extends an expiring root of its attempt with each
//! manifest's ids before answering, and replaces that root with the image's
//! own when the image is complete ([`ChunkStore::replace_roots`]). An
//! attempt that fails leaves its chunks under its expiring root only: a
//! retry within the expiry reuses them, the first gc after it drops them.
//! Roots under a [`Retention::keep_prefixes`] prefix never age out: their
//! owner removes them ([`ChunkStore::remove_roots`]), as `wanmig-dr` does
//! with the points in time it keeps by rules of its own.
//!
//! # Reading a store another process holds
//!
//! [`StoreView`] opens the index read-only (no lock) and reads what was
//! committed when it opened; [`ChunkSource`] is what both offer to code
//! that reads images back out.
//!
//! # Tunables
//!
//! | what | default | why |
//! |---|---|---|
//! | [`MAX_CHUNK`] | 4 MiB | cap on any chunk, checked before every allocation |
//! | [`StoreOptions::pack_target`] | 128 MiB | pack size at which a new pack starts: small enough that compaction copies little, large enough that a TiB store has few thousand files |
//! | [`StoreOptions::auto_commit_bytes`] | 64 MiB | bounds the memory of pending entries and the work a crash loses |
//! | zstd level | 1 | fast enough not to limit a WAN receiver; data are stored raw when zstd saves nothing |
//! | [`Retention`] | 30 days, 1 hour, 0.5 | roots age out after a month; an in-flight migration has an hour; a pack is rewritten when half of it is dead |

mod format;
mod gc;
mod manage;
mod pack;
mod store;
#[cfg(test)]
mod tests;
mod view;

pub use gc::{GcReport, Retention};
pub use store::{ChunkStore, RootInfo, Stats, StoreOptions, VerifyReport};
pub use view::{ChunkSource, StoreView};

/// The largest chunk the store accepts (4 MiB).
pub const MAX_CHUNK: usize = 4 << 20;

pub use wanmig_types::ChunkId;

/// The outcome of [`ChunkStore::put`], a put-if-absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The chunk was new and is now stored.
    Stored,
    /// The chunk was already in the store; nothing was written.
    Present,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// [`ChunkStore::put`] was given content that does not hash to the id it
    /// was offered under; nothing was stored.
    #[error("chunk content does not match its id: expected {expected}, content hashes to {actual}")]
    HashMismatch {
        /// The id the caller gave.
        expected: ChunkId,
        /// What the content hashes to.
        actual: ChunkId,
    },
    /// The data on disk are not what the index says: the message names the
    /// file or chunk and what is wrong.
    #[error("chunk store is corrupt: {0}")]
    Corrupt(String),
    /// A file operation failed.
    #[error("{context}")]
    Io {
        /// What the store was doing, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The RocksDB index failed, could not be opened (in use, unreadable,
    /// damaged) or holds a format version this build does not read. The
    /// message names the index directory.
    #[error("{0}")]
    Index(String),
    /// A chunk larger than [`MAX_CHUNK`].
    #[error("chunk of {0} bytes is larger than the {max} bytes a chunk may have", max = MAX_CHUNK)]
    TooLarge(usize),
}
