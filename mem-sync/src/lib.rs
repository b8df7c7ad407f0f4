//! Memory pre-copy logic, pure and testable without KVM.
//!
//! - [`bitmap`]: dirty bitmaps (KVM's layout): merge, and runs of pages.
//! - [`xbzrle`]: delta encoding of re-sent pages against their last version.
//! - [`encode`]: per page, zero marker / delta / raw, with a bounded cache.
//! - [`compress`]: one zstd stream for all page batches, capped on decompression.
//! - [`policy`]: the convergence policy (downtime budget, auto-converge,
//!   giving up with numbers) and rate limiting.

pub mod bitmap;
pub mod compress;
pub mod encode;
pub mod policy;
pub mod xbzrle;

#[cfg(test)]
mod fuzz_tests;

pub use bitmap::{merge_into, to_ranges};
pub use wanmig_types::{PAGE_SIZE, PageRange};
