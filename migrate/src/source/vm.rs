//! What the source needs of the VM it migrates: [`SourceVm`], implemented
//! for the VMM's [`Vm`] here and by a fake in the in-memory tests.

use std::sync::Arc;

use wanmig_types::PageRange;
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::devices::block::DiskWriteLog;
use wanmig_vmm::memory::{DirtyPages, GuestRam, RegionDirty};
use wanmig_vmm::{Vm, VmError};
use wanmig_wire::{DiskInfo, NicInfo, VmShape};

/// A VM the source can migrate: its memory, dirty log, disks and state.
pub trait SourceVm {
    /// Its configuration (name, disks, NICs).
    fn config(&self) -> &VmConfig;
    /// Its RAM.
    fn ram(&self) -> &GuestRam;
    /// The write log of each disk, in the configuration's order.
    fn disk_write_logs(&self) -> &[Arc<DiskWriteLog>];
    /// Starts or stops dirty logging.
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError>;
    /// Pages written since the last harvest (or since logging started).
    fn harvest_dirty(&self) -> Result<DirtyPages, VmError>;
    /// Stops the vCPUs (and device I/O).
    fn pause(&mut self) -> Result<(), VmError>;
    /// Runs the vCPUs again.
    fn resume(&mut self);
    /// Makes completed guest disk writes durable.
    fn sync_disks(&self) -> Result<(), VmError>;
    /// The vCPU and device state, encoded (the VM is paused).
    fn device_state(&self) -> Result<Vec<u8>, VmError>;
    /// Throttles the vCPUs to `percent` of their time (0: none).
    fn set_throttle(&mut self, percent: u8);
    /// The throttle in force.
    fn throttle_percent(&self) -> u8;
    /// Lets go of the disk images (just before `Commit`: the destination
    /// may open the same ones).
    fn release_disks(&mut self);
    /// Takes the disk images back (the migration failed before the commit).
    fn reclaim_disks(&mut self) -> Result<(), VmError>;
}

impl SourceVm for Vm {
    fn config(&self) -> &VmConfig {
        Vm::config(self)
    }
    fn ram(&self) -> &GuestRam {
        Vm::ram(self)
    }
    fn disk_write_logs(&self) -> &[Arc<DiskWriteLog>] {
        Vm::disk_write_logs(self)
    }
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        Vm::set_dirty_logging(self, on)
    }
    fn harvest_dirty(&self) -> Result<DirtyPages, VmError> {
        Vm::harvest_dirty(self)
    }
    fn pause(&mut self) -> Result<(), VmError> {
        Vm::pause(self)
    }
    fn resume(&mut self) {
        Vm::resume(self);
    }
    fn sync_disks(&self) -> Result<(), VmError> {
        Vm::sync_disks(self)
    }
    fn device_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(wanmig_vmm::state::encode(&self.save_state()?))
    }
    fn set_throttle(&mut self, percent: u8) {
        Vm::set_throttle(self, percent);
    }
    fn throttle_percent(&self) -> u8 {
        Vm::throttle_percent(self)
    }
    fn release_disks(&mut self) {
        self.unlock_disks();
    }
    fn reclaim_disks(&mut self) -> Result<(), VmError> {
        self.lock_disks()
    }
}

/// What the destination must host.
pub fn shape_of(vm: &dyn SourceVm) -> VmShape {
    let c = vm.config();
    VmShape {
        name: c.name.clone(),
        memory: vm.ram().regions().into_iter().map(|(s, l)| (s.0, l)).collect(),
        vcpus: c.vcpus,
        disks: c
            .disks
            .iter()
            .map(|d| DiskInfo {
                size: std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0),
                path: d.path.to_string_lossy().into_owned(),
                read_only: d.read_only,
            })
            .collect(),
        nics: c
            .nets
            .iter()
            .map(|n| NicInfo { mac: n.mac.0, ipv4: n.ip.map(|ip| (ip.addr.octets(), ip.prefix)) })
            .collect(),
    }
}

/// Every page of the VM's RAM (round 0).
pub fn all_pages(vm: &dyn SourceVm) -> DirtyPages {
    let regions = vm
        .ram()
        .regions()
        .into_iter()
        .map(|(start, len)| RegionDirty {
            start,
            ranges: vec![PageRange { first: 0, count: len / wanmig_types::PAGE_SIZE_U64 }],
        })
        .collect();
    DirtyPages { regions }
}
