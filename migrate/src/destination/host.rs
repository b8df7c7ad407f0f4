//! What the destination needs of the host that will run a received VM:
//! [`VmHost`], implemented by the control layer (which builds the VMM's VM
//! and binds its control socket) and by a fake in the in-memory tests.

use std::fs::File;
use std::path::PathBuf;

use wanmig_vmm::config::VmConfig;
use wanmig_vmm::memory::GuestRam;

/// Builds and starts the VMs a destination receives.
pub trait VmHost {
    /// A VM built and not yet running, with whatever the host keeps beside
    /// it (e.g. its bound control socket).
    type Vm;

    /// Builds the VM, paused, from the RAM the pages were written into and
    /// its device state, and prepares everything needed to serve it. Runs
    /// before `Ready`: whatever could keep this host from running the VM
    /// must fail here, while failing still resumes the source. With
    /// `disks`, the VM's images are these files, opened and checked at
    /// admission (shared storage): the VM must use them, not reopen the
    /// configured paths.
    fn build(
        &mut self,
        config: &VmConfig,
        ram: GuestRam,
        state: &[u8],
        disks: Option<Vec<File>>,
    ) -> Result<Self::Vm, String>;

    /// After the commit: the VM is this host's. Takes its disk images
    /// (now at `disks`) and runs it unless `paused`. An error here is
    /// reported, not undone: the source has let go.
    fn start(&mut self, vm: &mut Self::Vm, disks: &[PathBuf], paused: bool) -> Result<(), String>;
}
