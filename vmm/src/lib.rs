//! wanmig's micro-VMM: a KVM virtual machine built on the rust-vmm crates,
//! with everything live migration needs from it.
//!
//! - [`config`]: the `vm.toml` format.
//! - [`vm::Vm`]: create, boot, pause/resume, save/restore a VM; harvest
//!   dirty pages.
//! - [`memory`]: guest RAM, KVM slots, dirty tracking (KVM's log OR the
//!   VMM's own bitmap of device writes).
//! - [`postcopy`]: guest RAM filled on demand (userfaultfd), for a VM
//!   that runs before all of its memory has arrived.
//! - [`vcpu`]: vCPU setup, run loop, register state.
//! - [`devices`]: the 8250 console; over virtio-mmio, virtio-blk (whose
//!   writes feed a per-disk write log) and virtio-net on a host TAP; and the
//!   power device (ACPI power off and reset).
//! - [`acpi`]: the ACPI tables that declare the devices to the guest.
//! - [`linux`]: the Linux 64-bit boot protocol; [`boot`]: the multiboot
//!   loader; [`testguest`]: the built-in guest and its oracle.
//! - [`cpuid`]: the CPU features a guest sees (and hiding some).
//! - [`state`] and [`snapshot`]: the on-disk format of saved VMs.
//! - [`disklock`]: one owner per disk image (OFD locks); [`files`]: opening,
//!   creating and renaming files without following planted links.
//! - [`tracking`]: named write-tracking bitmaps per disk that survive a
//!   clean restart (QEMU's persistent dirty bitmaps), for incremental syncs.
//! - [`layout`]: the guest's physical and port map.
//!
//! It knows nothing about migration: it exposes a VM to drive (memory,
//! dirty logs, pause and resume, state, disks); the control socket and
//! the migration drivers live above it (`wanmig-control`, `wanmig-migrate`).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod disklock;
pub mod files;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod postcopy;
pub mod snapshot;
pub mod state;
pub mod testguest;
pub mod tracking;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use vm::{Vm, VmError};
