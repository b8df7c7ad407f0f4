//! Disk pre-copy for live migration without shared storage (not built yet).
//!
//! This crate will own: fastcdc chunking of each disk image, manifests of
//! blake3 chunk ids, the have/need exchange with the destination, iterative
//! re-send rounds driven by the dirty extents that `wanmig-vmm` records for
//! every guest write (4 KiB granularity), the final sync inside the
//! stop-and-copy, and assembling and verifying the destination image.
//! See `ARCHITECTURE.md` (step 2) and the block-sync issue.
