//! Network continuity across subnets after cutover (being built).
//!
//! - [`packet`]: Ethernet, ARP and IPv4 parsing and building.
//! - [`offload`]: undoing the kernel's checksum and segmentation offloads on
//!   captured packets.
//! - [`linkem`]: a user-space WAN link emulator (test and bench
//!   infrastructure).

pub mod linkem;
pub mod offload;
pub mod packet;
