//! The host a destination builds received VMs in: the VMM's VM, its control
//! socket bound before `Ready` (so it never commits a VM it cannot serve),
//! and at the commit its disks taken and its configuration written.

use std::path::PathBuf;

use wanmig_migrate::destination::VmHost;
use wanmig_types::error_chain;
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::snapshot::VmState;
use wanmig_vmm::vm::Vm;

use crate::socket;

/// A received VM and its bound control socket.
#[derive(Debug)]
pub struct HostedVm {
    /// The VM.
    pub vm: Vm,
    /// Its control socket (removed if the VM never runs here).
    pub listener: socket::Bound,
    /// Where its configuration was written at the commit.
    pub config_file: Option<PathBuf>,
}

/// Builds received VMs with the VMM and writes `DIR/NAME.toml` for each.
#[derive(Debug)]
pub struct ServeHost {
    /// Where received configurations go (`receive --dir`).
    pub dir: PathBuf,
}

impl VmHost for ServeHost {
    type Vm = HostedVm;

    fn build(
        &mut self,
        config: &VmConfig,
        ram: GuestRam,
        state: &[u8],
        disks: Option<Vec<std::fs::File>>,
    ) -> Result<HostedVm, String> {
        let state: VmState =
            wanmig_vmm::state::decode(state).map_err(|e| format!("device state: {}", error_chain(&e)))?;
        let vm = Vm::from_incoming(config, ram, &state, disks).map_err(|e| error_chain(&e))?;
        let listener = socket::Bound::new(&config.control_socket)
            .map_err(|e| format!("cannot serve the VM: {}", error_chain(&e)))?;
        Ok(HostedVm { vm, listener, config_file: None })
    }

    fn start(&mut self, h: &mut HostedVm, disks: &[PathBuf], paused: bool) -> Result<(), String> {
        h.vm.set_disk_paths(disks);
        // The VM is here now: whatever this host's journal said of an earlier
        // move of it away from here is over.
        let journal = wanmig_migrate::journal::SourceJournal::new(&h.vm.config().state_dir, &h.vm.config().name);
        journal.clear().map_err(|e| format!("its old journal: {}", error_chain(&e)))?;
        let locked = h.vm.lock_disks().map_err(|e| format!("its disks: {}", error_chain(&e)));
        let written = write_config(&self.dir, h.vm.config());
        if !paused && locked.is_ok() {
            h.vm.resume();
        }
        h.config_file = written.as_ref().ok().cloned();
        locked?;
        written.map(|_| ())
    }
}

/// Writes `dir/NAME.toml` for a received VM, atomically (a temporary file,
/// synced, renamed into place).
pub fn write_config(dir: &std::path::Path, config: &VmConfig) -> Result<PathBuf, String> {
    use std::io::Write;
    let path = dir.join(format!("{}.toml", config.name));
    let tmp = dir.join(format!(".{}.toml.tmp", config.name));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(config.to_toml().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}
