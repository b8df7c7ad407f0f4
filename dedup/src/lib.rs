//! Content-addressed chunk store (not built yet).
//!
//! This crate will own: blake3 chunk ids, a RocksDB index, chunk data packed
//! into segment files, an atomic put-if-absent that verifies the hash before
//! storing, statistics and garbage collection. It knows nothing about VMs.
