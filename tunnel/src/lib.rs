//! Network continuity across subnets after cutover (not built yet).
//!
//! This crate will own: the source host answering ARP for the migrated
//! guest's address and forwarding its packets through an authenticated
//! tunnel to the destination host, and the destination's gratuitous ARP.
