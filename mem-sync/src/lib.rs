//! Memory pre-copy logic, pure and testable without KVM.
//!
//! Today this crate holds the dirty-bitmap arithmetic that the VMM's harvest
//! uses ([`bitmap`]): merging KVM's dirty log with the VMM's own bitmap of
//! device writes, and turning a bitmap into page ranges. The page encoders
//! (zero, raw, XBZRLE-style delta, zstd), the convergence policy, rate
//! limiting and working-set statistics arrive with the live-migration issue.

pub mod bitmap;

pub use bitmap::{PageRange, merge_into, to_ranges};
