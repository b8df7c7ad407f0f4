//! Disk pre-copy for live migration without shared storage.
//!
//! The pieces, each usable and testable without a VM or a network:
//!
//! - [`chunker`]: cuts an image into content-defined chunks (fastcdc 2020)
//!   with blake3 ids, batch by batch, as manifests for the destination.
//! - [`digest`]: a [`BlockDigest`] of an image (blake3 per 64 KiB block,
//!   then over the list) that both sides keep up to date incrementally, so
//!   that checking the destination's image against the source's at pause
//!   costs only the blocks written since, not a read of the whole disk.
//! - [`extents`]: turns the VMM's 4 KiB write log into extents and reads
//!   them into `DiskWrites` batches.
//! - [`image`]: the destination's image, assembled sparse from chunks (its
//!   own or from the chunk store) and extents.
//! - [`io`]: reading images exactly.
//! - [`throttle`]: when and how hard to cap the guest's disk writes so that
//!   the copy converges.
//!
//! The protocol (manifest → need → chunks, then rounds of written extents,
//! then `DiskDone` with the digest inside the stop-and-copy) is described in
//! `wanmig_wire::disk`; `wanmig-migrate` drives it.

pub mod chunker;
pub mod digest;
pub mod extents;
pub mod image;
pub mod io;
pub mod throttle;

pub use chunker::{Batch, CutChunk, ImageChunker};
pub use digest::{BLOCK, BlockDigest};
pub use extents::DirtyReader;
pub use image::ImageWriter;
