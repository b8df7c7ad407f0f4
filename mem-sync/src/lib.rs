//! Memory pre-copy logic, pure and testable without KVM.
//!
//! - [`bitmap`]: dirty bitmaps (KVM's layout): merge, and runs of pages.
//! - [`xbzrle`]: delta encoding of re-sent pages against their last version.
//! - [`encode`]: per page, zero marker / delta / raw, with a bounded cache.
//! - [`compress`]: one zstd stream for all page batches, capped on decompression.
//! - [`policy`]: the convergence policy (downtime budget, auto-converge,
//!   giving up with numbers) and rate limiting.
//! - [`postcopy`]: the post-copy send order (pre-paging with bubbling around
//!   faults, requested pages first) and when a hybrid migration switches
//!   from pre-copy to post-copy.

pub mod bitmap;
pub mod compress;
pub mod encode;
pub mod policy;
pub mod postcopy;
pub mod xbzrle;

#[cfg(test)]
mod fuzz_tests;

pub use bitmap::{merge_into, to_ranges};
pub use wanmig_types::{PAGE_SIZE, PageRange};
