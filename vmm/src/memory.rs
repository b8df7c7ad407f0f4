//! Guest RAM, its KVM memory slots, and dirty-page tracking.
//!
//! Two writers dirty guest memory: the vCPUs, which KVM tracks per slot when
//! dirty logging is on, and the VMM itself (virtio DMA), which vm-memory
//! records in each region's [`AtomicBitmap`] on every write through the
//! `GuestMemory` API. [`GuestRam::harvest_dirty`] takes both (get-and-clear)
//! and returns their union as page ranges.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use wanmig_mem_sync::bitmap::{PageRange, merge_into, to_ranges};

use crate::layout;

/// Guest memory whose regions carry the VMM's own dirty bitmap.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Errors of guest memory setup and dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Mapping the guest's RAM failed.
    #[error("cannot map {bytes} bytes of guest memory")]
    Map {
        /// Size asked for.
        bytes: u64,
        /// The cause.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register memory slot {slot} with KVM")]
    SetRegion {
        /// The slot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("cannot read the dirty log of slot {slot}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Dirty pages of one RAM region, as runs of page indices relative to its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDirty {
    /// Guest-physical start of the region.
    pub start: GuestAddress,
    /// Dirty runs, ascending.
    pub ranges: Vec<PageRange>,
}

/// All dirty pages found by one harvest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// One entry per RAM region, in address order.
    pub regions: Vec<RegionDirty>,
}

impl DirtyPages {
    /// Number of dirty pages.
    pub fn pages(&self) -> u64 {
        self.regions.iter().flat_map(|r| &r.ranges).map(|r| r.count).sum()
    }
}

/// Guest RAM and its registration with KVM.
#[derive(Debug)]
pub struct GuestRam {
    /// A KVM VM made ahead of its state, this RAM registered with it
    /// ([`crate::vm::Vm::prepare`]). Declared before `mem`: dropped first,
    /// so KVM never holds a slot whose mapping is gone.
    shell: Option<(Kvm, VmFd)>,
    mem: GuestMem,
    dirty_logging: bool,
}

impl GuestRam {
    /// Maps `bytes` of zeroed guest RAM laid out by [`layout::ram_regions`].
    pub fn new(bytes: u64) -> Result<Self, MemoryError> {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(bytes)
            .into_iter()
            .map(|(start, len)| (start, usize::try_from(len).expect("guest memory is capped far below usize::MAX")))
            .collect();
        let mem = GuestMem::from_ranges(&ranges).map_err(|source| MemoryError::Map { bytes, source })?;
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).expect("region start is mapped");
            // Transparent huge pages where the host allows them: 512x fewer
            // faults when RAM is first touched (boot, restore, migration).
            // SAFETY: advice on a mapping we own, for its exact length; it
            // changes no contents. A refusal (THP disabled) is harmless.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        }
        Ok(GuestRam { shell: None, mem, dirty_logging: false })
    }

    /// Keeps `vm` (this RAM registered with it) until a VM is built on it.
    pub(crate) fn keep_shell(&mut self, kvm: Kvm, vm: VmFd) {
        self.shell = Some((kvm, vm));
    }

    /// The VM made ahead for this RAM, if any (its slots registered).
    pub(crate) fn take_shell(&mut self) -> Option<(Kvm, VmFd)> {
        self.shell.take()
    }

    /// The memory, for devices and loaders.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// `(start, length)` of every region, in address order.
    pub fn regions(&self) -> Vec<(GuestAddress, u64)> {
        self.mem.iter().map(|r| (r.start_addr(), r.len())).collect()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
    }

    /// Registers (or re-registers) every region as a KVM slot, with dirty
    /// logging on or off. Turning it on write-protects all guest pages, so
    /// the first harvest after it reports only pages written since.
    pub fn register(&mut self, vm: &VmFd, dirty_logging: bool) -> Result<(), MemoryError> {
        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let host = self.mem.get_host_address(region.start_addr()).expect("region start is inside the region");
            let desc = kvm_userspace_memory_region {
                slot,
                flags: if dirty_logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `host` lives as long as `self.mem`,
            // which outlives the VM fd in every owner of a GuestRam (Vm drops
            // the VmFd first), and it is `memory_size` bytes long.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::SetRegion { slot, source })?;
        }
        self.dirty_logging = dirty_logging;
        Ok(())
    }

    /// Gets and clears the dirty pages since the last harvest: KVM's log
    /// (empty while dirty logging is off) OR the VMM's own bitmap.
    pub fn harvest_dirty(&self, vm: &VmFd) -> Result<DirtyPages, MemoryError> {
        let mut regions = Vec::new();
        for (slot, region) in (0u32..).zip(self.mem.iter()) {
            let len = region.len();
            let mut bitmap = region.get_mmap().bitmap().get_and_reset();
            if self.dirty_logging {
                let kvm = vm
                    .get_dirty_log(slot, usize::try_from(len).expect("region length fits usize"))
                    .map_err(|source| MemoryError::DirtyLog { slot, source })?;
                if bitmap.len() < kvm.len() {
                    bitmap.resize(kvm.len(), 0);
                }
                merge_into(&mut bitmap, &kvm);
            }
            regions.push(RegionDirty {
                start: region.start_addr(),
                ranges: to_ranges(&bitmap, len / wanmig_types::PAGE_SIZE_U64),
            });
        }
        Ok(DirtyPages { regions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn device_writes_are_harvested_and_cleared() {
        let ram = GuestRam::new(64 << 20).expect("map 64 MiB");
        // No KVM here: only the VMM's own bitmap is consulted.
        let mem = ram.mem();
        mem.write_obj(7u64, GuestAddress(0x5000)).expect("in range");
        mem.write_slice(&[1u8; 8192], GuestAddress(0x10_0ff8)).expect("in range");
        let bitmaps: Vec<Vec<u64>> = mem.iter().map(|r| r.get_mmap().bitmap().get_and_reset()).collect();
        let ranges = to_ranges(&bitmaps[0], (64 << 20) / 4096);
        assert_eq!(ranges, vec![PageRange { first: 5, count: 1 }, PageRange { first: 0x100, count: 3 }]);
        assert!(mem.iter().all(|r| r.get_mmap().bitmap().get_and_reset().iter().all(|w| *w == 0)));
    }
}
