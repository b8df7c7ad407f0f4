//! A VM: KVM objects, guest RAM, devices and vCPU threads, and the
//! operations on the whole — boot, pause, resume, save, restore, dirty
//! tracking.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY, kvm_irqchip,
    kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::{GuestConfig, SerialOutput, VmConfig};
use crate::devices::block::{Block, DiskWriteLog};
use crate::devices::net::{self, Net, RxPass, RxSignal, RxThread};
use crate::devices::serial::{ConsoleOut, SerialConsole};
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio_mmio::{DeviceSnapshot, MmioSnapshot, MmioTransport};
use crate::devices::{Devices, lock};
use crate::memory::{DirtyPages, GuestRam};
use crate::snapshot::{self, VmState};
use crate::state::Pod;
use crate::{acpi, boot, layout, linux, testguest, vcpu};

/// Errors of VM operations. Each variant names the operation; the cause is
/// its source.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened or a VM created.
    #[error("cannot use KVM ({what})")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory setup or dirty tracking failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// A vCPU operation failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Loading the guest failed.
    #[error("cannot load the guest")]
    Boot(#[from] boot::BootError),
    /// Loading a Linux kernel failed.
    #[error("cannot load the Linux guest")]
    Linux(#[from] linux::LinuxBootError),
    /// A disk image could not be opened.
    #[error("cannot open disk image {path}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A block device could not be set up.
    #[error("disk {path}")]
    Block {
        /// The image.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: crate::devices::block::BlockError,
    },
    /// A NIC's TAP could not be attached.
    #[error("cannot attach a NIC")]
    Tap(#[source] TapError),
    /// A NIC could not be set up or restored.
    #[error("NIC on TAP {tap}")]
    Net {
        /// The TAP.
        tap: String,
        /// The cause.
        #[source]
        source: net::NetError,
    },
    /// The serial output could not be opened.
    #[error("cannot open serial output {path}")]
    Serial {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Saved device state was refused.
    #[error("cannot restore device state: {0}")]
    DeviceState(String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The state file was refused.
    #[error("cannot read the VM state")]
    State(#[from] crate::state::StateError),
    /// The memory file was refused.
    #[error(transparent)]
    MemoryFile(#[from] snapshot::MemoryFileError),
    /// The snapshot does not fit the configured VM.
    #[error("the saved VM does not match the configuration: {0}")]
    Shape(String),
    /// The operation needs the VM in another run state.
    #[error("the VM is {0}")]
    WrongState(&'static str),
    /// The configuration has no guest to boot.
    #[error("no [guest] configured: nothing to boot")]
    NoGuest,
    /// vCPU threads did not stop within the deadline.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    /// The ACPI tables could not be built or written.
    #[error("cannot set up the ACPI tables")]
    Acpi(#[from] crate::acpi::AcpiError),
    /// A disk image is in use (or could not be locked).
    #[error(transparent)]
    DiskLock(#[from] crate::disklock::LockError),
    /// Pre-opened disk images do not match the configured disks.
    #[error("{given} pre-opened disk image(s) for {configured} configured disk(s)")]
    DiskFiles {
        /// Files given.
        given: usize,
        /// Disks configured.
        configured: usize,
    },
    /// The snapshot could not be written into its directory.
    #[error(transparent)]
    SnapshotDir(#[from] snapshot::SnapshotDirError),
    /// A disk's write-tracking maps could not be used or saved.
    #[error(transparent)]
    Tracking(#[from] crate::tracking::TrackingError),
}

/// A KVM VM with its in-kernel irqchip and PIT, `ram` registered with it.
fn shell_for(ram: &mut GuestRam) -> Result<(Kvm, VmFd), VmError> {
    let kvm_sys = Kvm::new().map_err(kvm("open /dev/kvm"))?;
    let vm_fd = kvm_sys.create_vm().map_err(kvm("create a VM"))?;
    vm_fd.set_tss_address(layout::KVM_TSS_ADDRESS).map_err(kvm("set the TSS address"))?;
    vm_fd.create_irq_chip().map_err(kvm("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm_fd.create_pit2(pit).map_err(kvm("create the in-kernel PIT"))?;
    ram.register(&vm_fd, false)?;
    Ok((kvm_sys, vm_fd))
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Whether the guest is executing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked; state can be saved.
    Paused,
}

/// Timings and sizes of a save.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SaveReport {
    /// Time to capture vCPU, irqchip and device state.
    pub state_ms: f64,
    /// Time to write RAM (into the page cache).
    pub memory_ms: f64,
    /// Time until state and RAM were on stable storage.
    pub sync_ms: f64,
    /// Bytes of RAM data written (zero pages excluded).
    pub memory_bytes: u64,
}

/// A running or paused VM.
pub struct Vm {
    config: VmConfig,
    // Field order matters for drop: threads are stopped in `Drop`, then the
    // VM fd goes before the memory it maps.
    threads: Vec<JoinHandle<()>>,
    /// Each vCPU thread's id (`gettid`), once it has started.
    vcpu_tids: Arc<[std::sync::atomic::AtomicU32]>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    ctl: Arc<vcpu::RunControl>,
    devices: Arc<Devices>,
    disk_logs: Vec<Arc<DiskWriteLog>>,
    /// One lock per disk image while this process owns the images.
    disk_locks: Vec<crate::disklock::DiskLock>,
    /// A descriptor of each disk image the devices use (sharing their open
    /// file description): locks and flushes go to the very files the guest
    /// writes, whatever their paths now name.
    disk_files: Vec<File>,
    /// Whether the disks' write-tracking maps are loaded from and saved to
    /// the files beside the images (while this process owns them).
    tracking_attached: bool,
    nics: Vec<Nic>,
    rx_threads: Vec<RxThread>,
    /// Set on a restored or received VM: its first resume announces its
    /// NICs on their new TAPs.
    announce: bool,
    stop_tx: Sender<(u8, vcpu::GuestStop)>,
    stop_rx: Receiver<(u8, vcpu::GuestStop)>,
    msr_indices: Vec<u32>,
    acpi_rsdp: Option<GuestAddress>,
    run_state: RunState,
    throttle: Option<Throttle>,
    vm_fd: VmFd,
    kvm: Kvm,
    ram: GuestRam,
}

/// A NIC's pieces its RX thread needs.
#[derive(Debug)]
struct Nic {
    slot: usize,
    tap: Arc<Tap>,
    signal: Arc<RxSignal>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("name", &self.config.name)
            .field("run_state", &self.run_state)
            .finish_non_exhaustive()
    }
}

fn open_console(out: &SerialOutput) -> Result<ConsoleOut, VmError> {
    Ok(match out {
        SerialOutput::Stdout => Box::new(std::io::stdout()),
        SerialOutput::None => Box::new(std::io::sink()),
        SerialOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmError::Serial { path: path.clone(), source })?,
        ),
    })
}

fn lock_all(config: &VmConfig) -> Result<Vec<crate::disklock::DiskLock>, VmError> {
    let locks = config.disks.iter().map(|d| crate::disklock::DiskLock::acquire(&d.path, !d.read_only));
    Ok(locks.collect::<Result<Vec<_>, _>>()?)
}

fn open_disks(config: &VmConfig, given: Option<Vec<File>>) -> Result<Vec<File>, VmError> {
    if let Some(files) = given {
        if files.len() != config.disks.len() {
            return Err(VmError::DiskFiles { given: files.len(), configured: config.disks.len() });
        }
        return Ok(files);
    }
    config
        .disks
        .iter()
        .map(|d| {
            OpenOptions::new()
                .read(true)
                .write(!d.read_only)
                .open(&d.path)
                .map_err(|source| VmError::Disk { path: d.path.clone(), source })
        })
        .collect()
}

impl Vm {
    /// Creates the KVM VM, its memory, vCPUs and (if `saved` is given, from
    /// its state) devices. Nothing runs yet.
    fn build(
        config: &VmConfig,
        saved: Option<&VmState>,
        ram: Option<GuestRam>,
        own_disks: bool,
        disk_files: Option<Vec<File>>,
    ) -> Result<Self, VmError> {
        // Before anything is built: a VM that cannot own its disks fails
        // here, naming who has them.
        let disk_locks = match own_disks {
            true => lock_all(config)?,
            false => Vec::new(),
        };
        let mut ram = match ram {
            Some(r) => r,
            None => GuestRam::new(config.memory_bytes())?,
        };
        let (kvm_sys, vm_fd) = match ram.take_shell() {
            Some(shell) => shell,
            None => shell_for(&mut ram)?,
        };

        let irqfd = |gsi: u32| -> Result<EventFd, VmError> {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(VmError::EventFd)?;
            vm_fd.register_irqfd(&evt, gsi).map_err(kvm("register an irqfd"))?;
            Ok(evt)
        };
        let console = open_console(&config.serial)?;
        let serial = match saved {
            None => SerialConsole::new(irqfd(layout::SERIAL_IRQ)?, console),
            Some(s) => SerialConsole::restore(irqfd(layout::SERIAL_IRQ)?, console, &s.serial)
                .map_err(|e| VmError::DeviceState(e.to_string()))?,
        };
        let mut virtio = Vec::new();
        let mut disk_logs = Vec::new();
        let mut kept = Vec::new();
        for (slot, (file, disk)) in open_disks(config, disk_files)?.into_iter().zip(&config.disks).enumerate() {
            let id = format!("{}-disk{slot}", config.name);
            let block_err = |source| VmError::Block { path: disk.path.clone(), source };
            kept.push(file.try_clone().map_err(|source| VmError::Disk { path: disk.path.clone(), source })?);
            let irq = irqfd(layout::VIRTIO_IRQ_BASE + slot as u32)?;
            let transport = match saved.map(|s| &s.virtio[slot]) {
                None => {
                    let block = Block::new(file, disk.read_only, &id).map_err(block_err)?;
                    disk_logs.push(block.write_log());
                    MmioTransport::new(Box::new(block), irq, ram.mem().clone())
                }
                Some(s) => {
                    let DeviceSnapshot::Block(b) = &s.device else {
                        return Err(VmError::Shape(format!("slot {slot}: no disk was saved there")));
                    };
                    let block = Block::restore(file, disk.read_only, &id, b).map_err(block_err)?;
                    disk_logs.push(block.write_log());
                    MmioTransport::restore(Box::new(block), irq, ram.mem().clone(), s)
                        .map_err(|e| VmError::DeviceState(e.to_string()))?
                }
            };
            virtio.push(Mutex::new(transport));
        }
        let mut nics = Vec::new();
        for (slot, nic) in (config.disks.len()..).zip(&config.nets) {
            let net_err = |source| VmError::Net { tap: nic.tap.clone(), source };
            let tap = Arc::new(Tap::open(&nic.tap).map_err(VmError::Tap)?);
            let irq = irqfd(layout::VIRTIO_IRQ_BASE + slot as u32)?;
            let (device, transport_state) = match saved.map(|s| &s.virtio[slot]) {
                None => (Net::new(tap.clone(), nic.mac).map_err(net_err)?, None),
                Some(s) => {
                    let DeviceSnapshot::Net(n) = &s.device else {
                        return Err(VmError::Shape(format!("slot {slot}: no NIC was saved there")));
                    };
                    (Net::restore(tap.clone(), nic.mac, n).map_err(net_err)?, Some(s))
                }
            };
            nics.push(Nic { slot, tap, signal: device.rx_signal() });
            let transport = match transport_state {
                None => MmioTransport::new(Box::new(device), irq, ram.mem().clone()),
                Some(s) => MmioTransport::restore(Box::new(device), irq, ram.mem().clone(), s)
                    .map_err(|e| VmError::DeviceState(e.to_string()))?,
            };
            virtio.push(Mutex::new(transport));
        }
        let ram_ranges = ram.regions().into_iter().map(|(s, l)| (s.0, l)).collect();
        let devices = Arc::new(Devices { serial: Mutex::new(serial), virtio, ram: ram_ranges });

        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm_fd.create_vcpu(u64::from(id)).map_err(kvm("create a vCPU"))?;
            if saved.is_none() {
                vcpu::configure(&kvm_sys, &fd, id, config.vcpus, &config.cpu_hide)?;
            }
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let (stop_tx, stop_rx) = channel();
        let mut vm = Vm {
            config: config.clone(),
            threads: Vec::new(),
            vcpu_tids: (0..config.vcpus).map(|_| std::sync::atomic::AtomicU32::new(0)).collect(),
            vcpus,
            ctl: Arc::new(vcpu::RunControl::new()),
            devices,
            disk_logs,
            disk_locks,
            disk_files: kept,
            tracking_attached: false,
            nics,
            rx_threads: Vec::new(),
            announce: saved.is_some(),
            stop_tx,
            stop_rx,
            msr_indices: Vec::new(),
            acpi_rsdp: None,
            run_state: RunState::Paused,
            throttle: None,
            vm_fd,
            kvm: kvm_sys,
            ram,
        };
        if let Some(s) = saved {
            vm.load_vm_state(s)?;
            for (fd, v) in vm.vcpus.iter().zip(&s.vcpus) {
                vcpu::restore(&lock(fd), v)?;
            }
        }
        // The CPUID decides which MSRs exist: probe after it is set.
        vm.msr_indices = vcpu::readable_msrs(&vm.kvm, &lock(&vm.vcpus[0]))?;
        if own_disks {
            vm.attach_tracking();
        }
        Ok(vm)
    }

    /// Makes the KVM VM that a VM built on `ram` will use, and registers
    /// `ram` with it, ahead of the state (a destination does this while
    /// the pages arrive): registering the slots of a large RAM costs KVM
    /// milliseconds, which would otherwise fall inside the downtime. The
    /// VM is kept with the RAM until [`Vm::from_incoming`] takes both.
    pub fn prepare(ram: &mut GuestRam) -> Result<(), VmError> {
        let (kvm_sys, vm_fd) = shell_for(ram)?;
        ram.keep_shell(kvm_sys, vm_fd);
        Ok(())
    }

    /// Creates a VM, writes its ACPI tables and loads its guest, ready to
    /// run (paused).
    pub fn boot(config: &VmConfig) -> Result<Self, VmError> {
        let mut vm = Self::build(config, None, None, true, None)?;
        // Every guest gets the tables: Linux finds its virtio-mmio devices
        // there, the test guest its power registers.
        let rsdp = acpi::write_tables(vm.ram.mem(), &vm.acpi_spec())?;
        vm.acpi_rsdp = Some(rsdp);
        let (mem, ram) = (vm.ram.mem(), vm.ram.regions());
        match &config.guest {
            None => return Err(VmError::NoGuest),
            Some(GuestConfig::Test(t)) => {
                let entry = boot::load_multiboot(mem, testguest::IMAGE, &testguest::cmdline(t, &config.nets), &ram)?;
                testguest::prestamp(mem, t, &ram).map_err(boot::BootError::Write)?;
                vcpu::set_multiboot_entry(&lock(&vm.vcpus[0]), entry, layout::MULTIBOOT_INFO as u32)?;
            }
            Some(GuestConfig::Linux(l)) => {
                let entry = linux::load(mem, &ram, &l.kernel, l.initrd.as_deref(), &l.cmdline, Some(rsdp.0))?;
                vcpu::set_linux_entry(&lock(&vm.vcpus[0]), &entry)?;
            }
        }
        vm.spawn_threads()
    }

    /// Creates a VM from a snapshot directory, paused. The configuration
    /// supplies host resources (disk paths, console, socket); the snapshot
    /// everything the guest sees, and the two must agree on its shape.
    pub fn restore(config: &VmConfig, dir: &Path) -> Result<Self, VmError> {
        let state: VmState = crate::state::read_file(&dir.join(snapshot::STATE_FILE))?;
        check_shape(config, &state)?;
        let vm = Self::build(config, Some(&state), None, true, None)?;
        snapshot::load_memory(&vm.ram, &dir.join(snapshot::MEMORY_FILE))?;
        vm.spawn_threads()
    }

    /// Creates a VM, paused, from RAM filled by a migration and the state
    /// that ended it. The configuration supplies host resources. With
    /// `disks`, the images are these already open files (one per configured
    /// disk, in order, opened with the access the disk needs) and their
    /// configured paths are only names: whoever checked the files when it
    /// opened them need not trust the paths again. Its disks are not locked
    /// until [`Vm::lock_disks`].
    pub fn from_incoming(
        config: &VmConfig,
        ram: GuestRam,
        state: &VmState,
        disks: Option<Vec<File>>,
    ) -> Result<Self, VmError> {
        check_shape(config, state)?;
        if ram.size() != config.memory_bytes() {
            return Err(VmError::Shape(format!(
                "{} bytes of RAM received, {} configured",
                ram.size(),
                config.memory_bytes()
            )));
        }
        Self::build(config, Some(state), Some(ram), false, disks)?.spawn_threads()
    }

    /// Takes this VM's disk images (an exclusive lock on each writable one,
    /// a shared one on each read-only one). A received VM does this after
    /// the commit, when the source has let go; a source after a migration
    /// that failed once it had let go.
    pub fn lock_disks(&mut self) -> Result<(), VmError> {
        if self.disk_locks.is_empty() {
            // The files the devices use, not whatever the paths name now.
            let mut locks = Vec::new();
            for (file, d) in self.disk_files.iter().zip(&self.config.disks) {
                let dup = file.try_clone().map_err(|source| VmError::Disk { path: d.path.clone(), source })?;
                locks.push(crate::disklock::DiskLock::on_file(dup, &d.path, !d.read_only)?);
            }
            self.disk_locks = locks;
        }
        self.attach_tracking();
        Ok(())
    }

    /// Lets go of the disk images (just before a migration's commit: the
    /// destination may open the same images on shared storage), saving
    /// their write-tracking maps first, while they are still ours.
    pub fn unlock_disks(&mut self) {
        if let Err(e) = self.save_tracking() {
            eprintln!("wanmig: {}", wanmig_types::error_chain(&e));
        }
        self.disk_locks.clear();
    }

    fn spawn_threads(mut self) -> Result<Self, VmError> {
        vcpu::install_kick_handler();
        for (id, fd) in (0u8..).zip(&self.vcpus) {
            let (fd, ctl, devices, tx) = (fd.clone(), self.ctl.clone(), self.devices.clone(), self.stop_tx.clone());
            let tids = self.vcpu_tids.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    tids[usize::from(id)].store(tid as u32, std::sync::atomic::Ordering::Release);
                    vcpu::run_thread(id, fd, ctl, devices, tx)
                })
                .map_err(VmError::Thread)?;
            self.threads.push(t);
        }
        for nic in &self.nics {
            let (devices, ctl, slot) = (self.devices.clone(), self.ctl.clone(), nic.slot);
            let deliver = move || {
                let mut transport = lock(&devices.virtio[slot]);
                // Read under the transport's lock: see `Vm::pause`.
                if ctl.wanted() != vcpu::Wanted::Run {
                    return RxPass::NotNow;
                }
                if transport.device_work(net::RX_QUEUE) { RxPass::Served } else { RxPass::NotNow }
            };
            let rx = net::spawn_rx_thread(nic.tap.clone(), nic.signal.clone(), deliver)
                .map_err(|source| VmError::Net { tap: nic.tap.name().into(), source })?;
            self.rx_threads.push(rx);
        }
        Ok(self)
    }

    fn load_vm_state(&self, s: &VmState) -> Result<(), VmError> {
        let [master, slave, ioapic] = s.irqchips.as_slice() else {
            return Err(VmError::Shape(format!("{} irqchips saved, expected 3", s.irqchips.len())));
        };
        for (chip, want) in
            [(master, KVM_IRQCHIP_PIC_MASTER), (slave, KVM_IRQCHIP_PIC_SLAVE), (ioapic, KVM_IRQCHIP_IOAPIC)]
        {
            if chip.0.chip_id != want {
                return Err(VmError::Shape(format!("irqchip {} saved where {want} belongs", chip.0.chip_id)));
            }
            self.vm_fd.set_irqchip(&chip.0).map_err(kvm("restore the irqchip"))?;
        }
        self.vm_fd.set_pit2(&s.pit.0).map_err(kvm("restore the PIT"))?;
        // Only the clock value is restored; flags describe the source host.
        let clock = kvm_bindings::kvm_clock_data { clock: s.clock.0.clock, ..Default::default() };
        self.vm_fd.set_clock(&clock).map_err(kvm("restore kvmclock"))?;
        Ok(())
    }

    /// What the ACPI tables declare: the vCPUs, and every attached
    /// virtio-mmio device (slot i of [`layout::virtio_mmio_addr`]).
    fn acpi_spec(&self) -> acpi::AcpiSpec {
        acpi::AcpiSpec::new(u32::from(self.config.vcpus), 0..self.devices.virtio.len())
    }

    /// Where [`Vm::boot`] put the ACPI RSDP ([`layout::ACPI_RSDP`]; a Linux
    /// loader passes it in `boot_params.acpi_rsdp_addr`). `None` for a VM
    /// from a snapshot or a migration: its tables came with its RAM.
    pub fn acpi_rsdp(&self) -> Option<GuestAddress> {
        self.acpi_rsdp
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Records that the disk images now live at `paths` (renamed while
    /// open, as a received VM's images are after the commit).
    pub fn set_disk_paths(&mut self, paths: &[std::path::PathBuf]) {
        for (d, p) in self.config.disks.iter_mut().zip(paths) {
            d.path = p.clone();
        }
        for (l, p) in self.disk_locks.iter_mut().zip(paths) {
            l.renamed(p);
        }
    }

    /// The host thread id (`gettid`) of each vCPU's thread, in vCPU order
    /// (0 for one that has not started yet): a userfaultfd fault names the
    /// thread that took it ([`crate::postcopy::Fault::tid`]).
    pub fn vcpu_thread_ids(&self) -> Vec<u32> {
        self.vcpu_tids.iter().map(|t| t.load(std::sync::atomic::Ordering::Acquire)).collect()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Whether the guest is running.
    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// Per-disk logs of guest writes, in disk order.
    pub fn disk_write_logs(&self) -> &[Arc<DiskWriteLog>] {
        &self.disk_logs
    }

    /// Starts or continues the guest.
    pub fn resume(&mut self) {
        self.ctl.set(vcpu::Wanted::Run);
        self.run_state = RunState::Running;
        if std::mem::take(&mut self.announce) {
            self.announce_nics();
        }
    }

    /// Announces every NIC on its TAP as if the guest did (a gratuitous ARP
    /// for its configured address, or a RARP), five times over half a
    /// second as QEMU does, on a thread of its own: after a restore or a
    /// migration, the switch learns where the guest's MAC went at once.
    fn announce_nics(&self) {
        const SCHEDULE_MS: [u64; 5] = [0, 50, 150, 300, 500];
        let frames: Vec<(Arc<Tap>, Vec<u8>)> = self
            .nics
            .iter()
            .zip(&self.config.nets)
            .map(|(nic, cfg)| (nic.tap.clone(), net::announcement(cfg.mac, cfg.ip.map(|c| c.addr))))
            .collect();
        if frames.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            let start = Instant::now();
            for at in SCHEDULE_MS.map(Duration::from_millis) {
                std::thread::sleep(at.saturating_sub(start.elapsed()));
                for (tap, frame) in &frames {
                    // Best effort: a TAP that is down now misses one announcement.
                    let _ = tap.send(frame);
                }
            }
        });
        // Without a thread the guest still runs; its first packet out teaches the switch.
        drop(spawned);
    }

    /// Stops every vCPU outside `KVM_RUN`, with pending I/O completed.
    /// Ends any throttling.
    pub fn pause(&mut self) -> Result<(), VmError> {
        self.set_throttle(0);
        if self.run_state == RunState::Paused {
            return Ok(());
        }
        self.ctl.set(vcpu::Wanted::Pause);
        self.wait_parked()?;
        // A barrier for the devices' own threads (NIC receive): they touch
        // guest memory and queue state only while holding their transport's
        // lock, and only after reading, under that lock, that the VM is
        // wanted running. `Pause` was stored before this loop. A thread that
        // held the lock when we asked for it has finished its pass once we
        // get it; a thread that takes the lock after we release it reads
        // `Pause` (the mutex orders our store before its read). So from here
        // until `resume` nothing but the caller writes guest memory or
        // queues, and a harvest or save now sees every device write.
        for transport in &self.devices.virtio {
            drop(lock(transport));
        }
        for fd in &self.vcpus {
            // Tells a kvmclock guest it was stopped (avoids soft-lockup
            // warnings); EINVAL when the guest does not use kvmclock.
            let _ = lock(fd).kvmclock_ctrl();
        }
        self.run_state = RunState::Paused;
        Ok(())
    }

    fn wait_parked(&self) -> Result<(), VmError> {
        const DEADLINE: Duration = Duration::from_secs(10);
        if kick_until_parked(&self.ctl, &self.pthreads(), DEADLINE) {
            Ok(())
        } else {
            Err(VmError::PauseTimeout(DEADLINE))
        }
    }

    fn pthreads(&self) -> Vec<libc::pthread_t> {
        use std::os::unix::thread::JoinHandleExt;
        self.threads.iter().map(|t| t.as_pthread_t()).collect()
    }

    /// Throttles a running guest: its vCPUs spend `percent` of every 10 ms
    /// paused (auto-converge). 0 stops throttling.
    pub fn set_throttle(&mut self, percent: u8) {
        if let Some(t) = self.throttle.take() {
            t.stop();
            if self.run_state == RunState::Running {
                self.ctl.set(vcpu::Wanted::Run);
            }
        }
        if percent == 0 || self.run_state != RunState::Running {
            return;
        }
        self.throttle = Some(Throttle::start(self.ctl.clone(), self.pthreads(), percent.min(99)));
    }

    /// Current throttle, percent.
    pub fn throttle_percent(&self) -> u8 {
        self.throttle.as_ref().map_or(0, |t| t.percent)
    }

    /// Waits up to `timeout` for the guest to stop by itself (shutdown,
    /// reset, or an error KVM cannot continue from).
    pub fn wait_guest_stop(&self, timeout: Duration) -> Option<vcpu::GuestStop> {
        match self.stop_rx.recv_timeout(timeout) {
            Ok((_, stop)) => Some(stop),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => None,
        }
    }

    /// Captures everything but RAM. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        if self.run_state != RunState::Paused {
            return Err(VmError::WrongState("running; pause it first"));
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (id, fd) in (0u8..).zip(&self.vcpus) {
            vcpus.push(vcpu::save(&lock(fd), id, &self.msr_indices)?);
        }
        let mut irqchips = Vec::with_capacity(3);
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut chip = kvm_irqchip { chip_id, ..Default::default() };
            self.vm_fd.get_irqchip(&mut chip).map_err(kvm("save the irqchip"))?;
            irqchips.push(Pod(chip));
        }
        Ok(VmState {
            name: self.config.name.clone(),
            memory: self.ram.regions().into_iter().map(|(s, l)| (s.0, l)).collect(),
            vcpus,
            irqchips,
            pit: Pod(self.vm_fd.get_pit2().map_err(kvm("save the PIT"))?),
            clock: Pod(self.vm_fd.get_clock().map_err(kvm("save kvmclock"))?),
            serial: lock(&self.devices.serial).save(),
            virtio: self.devices.virtio.iter().map(|d| lock(d).save()).collect(),
        })
    }

    /// Flushes every writable disk image to stable storage (before a
    /// snapshot, and before a migration hands the disks over).
    pub fn sync_disks(&self) -> Result<(), VmError> {
        for (file, d) in self.disk_files.iter().zip(&self.config.disks).filter(|(_, d)| !d.read_only) {
            file.sync_all().map_err(|source| VmError::Disk { path: d.path.clone(), source })?;
        }
        Ok(())
    }

    /// Saves the paused VM into `dir` (created if missing), which must be
    /// a directory, not a symbolic link, and hold no snapshot (nor the
    /// pieces of one) yet: a snapshot never replaces a file, and no file is
    /// created through a link (see [`snapshot::SnapshotDir`]). RAM goes
    /// first, to a temporary name, synced and renamed; the state file is
    /// written last and marks the snapshot complete, so a failure part-way
    /// never leaves a state file beside a partial memory file.
    pub fn save(&self, dir: &Path) -> Result<SaveReport, VmError> {
        let t0 = Instant::now();
        let state = self.save_state()?;
        lock(&self.devices.serial).flush();
        self.sync_disks()?;
        let d = snapshot::SnapshotDir::open(dir)?;
        let t1 = Instant::now();
        let partial = format!("{}.partial", snapshot::MEMORY_FILE);
        let file = d.create_file(&partial, true)?;
        let memory_bytes = snapshot::save_memory_to(&self.ram, &file)?;
        let t2 = Instant::now();
        file.sync_all().map_err(|source| snapshot::SnapshotDirError::Write { path: dir.join(&partial), source })?;
        d.rename(&partial, snapshot::MEMORY_FILE)?;
        let t3 = Instant::now();
        let tmp = format!("{}.tmp", snapshot::STATE_FILE);
        let mut file = d.create_file(&tmp, false)?;
        let write =
            |f: &mut File| std::io::Write::write_all(f, &crate::state::encode(&state)).and_then(|()| f.sync_all());
        write(&mut file).map_err(|source| snapshot::SnapshotDirError::Write { path: dir.join(&tmp), source })?;
        d.rename(&tmp, snapshot::STATE_FILE)?;
        d.sync()?;
        Ok(SaveReport {
            state_ms: ((t1 - t0) + t3.elapsed()).as_secs_f64() * 1e3,
            memory_ms: (t2 - t1).as_secs_f64() * 1e3,
            sync_ms: (t3 - t2).as_secs_f64() * 1e3,
            memory_bytes,
        })
    }

    /// Turns KVM dirty logging on (write-protecting all guest RAM) or off.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        self.ram.register(&self.vm_fd, on)?;
        Ok(())
    }

    /// Gets and clears the pages written since the last harvest, by vCPUs
    /// (when dirty logging is on) and by devices.
    pub fn harvest_dirty(&self) -> Result<DirtyPages, VmError> {
        Ok(self.ram.harvest_dirty(&self.vm_fd)?)
    }

    /// The test guest's status page, if it is running the test guest.
    pub fn test_guest_status(&self) -> Option<testguest::GuestStatus> {
        testguest::read_status(self.ram.mem()).ok()
    }
}

fn check_shape(config: &VmConfig, s: &VmState) -> Result<(), VmError> {
    let want: Vec<(u64, u64)> = layout::ram_regions(config.memory_bytes()).into_iter().map(|(a, l)| (a.0, l)).collect();
    if s.memory != want {
        return Err(VmError::Shape(format!(
            "memory layout {:x?} saved, {} MiB configured gives {:x?}",
            s.memory, config.memory_mib, want
        )));
    }
    if s.vcpus.len() != usize::from(config.vcpus) || s.vcpus.iter().zip(0u8..).any(|(v, i)| v.id != i) {
        return Err(VmError::Shape(format!("{} vCPUs saved, {} configured", s.vcpus.len(), config.vcpus)));
    }
    check_devices(config, &s.virtio)
}

/// The saved virtio devices must be the configured ones, slot for slot:
/// the disks, then the NICs with the same MACs.
fn check_devices(config: &VmConfig, saved: &[MmioSnapshot]) -> Result<(), VmError> {
    let describe = |d: &DeviceSnapshot| match d {
        DeviceSnapshot::Block(b) => format!("a disk of {} bytes", b.size),
        DeviceSnapshot::Net(n) => format!("a NIC with MAC {}", n.mac),
    };
    for (slot, s) in saved.iter().enumerate() {
        let problem = match (&s.device, slot.checked_sub(config.disks.len())) {
            (DeviceSnapshot::Block(_), None) => None,
            (DeviceSnapshot::Net(n), Some(i)) => match config.nets.get(i) {
                Some(c) if c.mac == n.mac => None,
                Some(c) => Some(format!("the NIC on TAP {} is configured with MAC {}", c.tap, c.mac)),
                None => Some("no NIC is configured for it (a [[net]] entry naming the TAP it attaches to here)".into()),
            },
            (DeviceSnapshot::Net(_), None) => {
                Some(format!("disk {} is configured there", config.disks[slot].path.display()))
            }
            (DeviceSnapshot::Block(_), Some(_)) => Some(format!("{} disks are configured", config.disks.len())),
        };
        if let Some(problem) = problem {
            return Err(VmError::Shape(format!("slot {slot}: the saved VM has {} but {problem}", describe(&s.device))));
        }
    }
    let configured = config.disks.len() + config.nets.len();
    if saved.len() != configured {
        return Err(VmError::Shape(format!(
            "{} virtio devices saved, {configured} configured ({} disks, {} NICs)",
            saved.len(),
            config.disks.len(),
            config.nets.len()
        )));
    }
    Ok(())
}

/// Kicks `threads` until all are parked or `deadline` passes.
fn kick_until_parked(ctl: &vcpu::RunControl, threads: &[libc::pthread_t], deadline: Duration) -> bool {
    let start = Instant::now();
    while !ctl.wait_parked(threads.len(), Duration::from_millis(1)) {
        if start.elapsed() > deadline {
            return false;
        }
        for &t in threads {
            // SAFETY: the threads are alive: the Vm holds their JoinHandles
            // and joins them only in Drop, after stopping the throttle; the
            // signal has a handler installed.
            unsafe { libc::pthread_kill(t, vcpu::kick_signal()) };
        }
    }
    true
}

/// A thread that pauses the vCPUs for part of every period.
#[derive(Debug)]
struct Throttle {
    percent: u8,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<()>,
}

impl Throttle {
    const PERIOD: Duration = Duration::from_millis(10);

    fn start(ctl: Arc<vcpu::RunControl>, threads: Vec<libc::pthread_t>, percent: u8) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let off = Self::PERIOD * u32::from(percent) / 100;
        let on = Self::PERIOD - off;
        let handle = std::thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                ctl.set(vcpu::Wanted::Pause);
                kick_until_parked(&ctl, &threads, Self::PERIOD);
                std::thread::sleep(off);
                ctl.set(vcpu::Wanted::Run);
                std::thread::sleep(on);
            }
        });
        Throttle { percent, stop, handle }
    }

    /// Stops the thread; the vCPUs are left wanted Running.
    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.handle.join();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stops and joins the NICs' receive threads.
        self.rx_threads.clear();
        if let Some(t) = self.throttle.take() {
            t.stop();
        }
        self.ctl.set(vcpu::Wanted::Exit);
        // Threads in KVM_RUN must be kicked out; parked ones wake on the condvar.
        let _ = self.wait_parked_or_exited();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        lock(&self.devices.serial).flush();
        // No vCPU runs: the maps hold every write. A crash never gets here,
        // and leaves them marked in use.
        if let Err(e) = self.save_tracking() {
            eprintln!("wanmig: {}", wanmig_types::error_chain(&e));
        }
    }
}

impl Vm {
    fn wait_parked_or_exited(&self) -> Result<(), VmError> {
        use std::os::unix::thread::JoinHandleExt;
        let start = Instant::now();
        while self.threads.iter().any(|t| !t.is_finished()) && start.elapsed() < Duration::from_secs(10) {
            for t in self.threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread has not finished and we hold its handle.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// Write tracking: named maps of the blocks each disk's guest wrote
/// ([`crate::tracking`]), kept beside the images while this process owns
/// them.
impl Vm {
    /// Loads each writable disk's maps from beside its image and marks the
    /// file in use. A file that cannot be written leaves the maps loaded
    /// (as the file vouched for them) and a note on the disk.
    fn attach_tracking(&mut self) {
        if self.tracking_attached {
            return;
        }
        for ((d, log), file) in self.config.disks.iter().zip(&self.disk_logs).zip(&self.disk_files) {
            if d.read_only {
                continue;
            }
            if let Err(e) = crate::tracking::attach(&d.path, file, log.tracking()) {
                log.tracking()
                    .add_note(format!("cannot keep the maps beside the image: {}", wanmig_types::error_chain(&e)));
            }
        }
        self.tracking_attached = true;
    }

    /// Saves each writable disk's maps beside its image, "in use" clear
    /// (the VM must not be writing: paused, or stopped). Done when the
    /// process lets go of its disks (a migration's commit) and when the
    /// VM is dropped; afterwards nothing is saved again until the disks
    /// are taken back.
    pub fn save_tracking(&mut self) -> Result<(), VmError> {
        if !std::mem::take(&mut self.tracking_attached) {
            return Ok(());
        }
        let mut first = Ok(());
        for ((d, log), file) in self.config.disks.iter().zip(&self.disk_logs).zip(&self.disk_files) {
            if !d.read_only
                && let Err(e) = crate::tracking::save(&d.path, file, log.tracking())
                && first.is_ok()
            {
                first = Err(e.into());
            }
        }
        first
    }

    /// The named write-tracking maps of disk `disk` (in configuration order).
    pub fn disk_tracking(&self, disk: usize) -> Option<&crate::tracking::NamedMaps> {
        self.disk_logs.get(disk).map(|l| l.tracking())
    }

    /// The blocks of disk `disk` written since map `name` was last reset
    /// or synced (bit i = bytes `[4096 i, 4096 (i + 1))`); `None` when
    /// unknown or invalid: compare digests instead.
    pub fn tracked_writes(&self, disk: usize, name: &str) -> Option<Vec<u64>> {
        self.disk_tracking(disk)?.tracked_writes(name)
    }

    /// Adds map `name` to disk `disk` (invalid until reset or synced).
    pub fn add_tracking(&self, disk: usize, name: &str) -> Result<(), VmError> {
        let maps = self.disk_tracking(disk).ok_or(VmError::WrongState("without that disk"))?;
        Ok(maps.add(name)?)
    }

    /// Clears map `name` of disk `disk` and declares it valid (the other
    /// side holds the image as it is now); whether it exists.
    pub fn reset_tracking(&self, disk: usize, name: &str) -> bool {
        self.disk_tracking(disk).is_some_and(|m| m.reset(name))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;

    use super::*;
    use crate::config::{DiskConfig, MacAddr, NetConfig};

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);

    fn config(disks: usize, macs: &[MacAddr]) -> VmConfig {
        let text = "name = \"t\"\nmemory_mib = 16\n";
        let mut c = VmConfig::parse(text, Path::new("/tmp/vm.toml")).expect("valid");
        c.disks = (0..disks).map(|i| DiskConfig { path: format!("/d{i}.img").into(), read_only: false }).collect();
        c.nets = macs
            .iter()
            .enumerate()
            .map(|(i, &mac)| NetConfig { tap: format!("tap{i}"), mac, ip: None, gateway: None })
            .collect();
        c
    }

    /// Saved transports: `d` for a disk, a MAC for a NIC.
    fn saved(devices: &[Option<MacAddr>]) -> Vec<MmioSnapshot> {
        let ram = GuestRam::new(16 << 20).expect("ram");
        let irq = || EventFd::new(EFD_NONBLOCK).expect("eventfd");
        devices
            .iter()
            .map(|d| {
                let device: Box<dyn crate::devices::virtio_mmio::VirtioDevice> = match d {
                    None => Box::new(Block::new(tempfile::tempfile().expect("file"), false, "d").expect("block")),
                    Some(mac) => {
                        let (a, _) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
                        let tap = Arc::new(Tap::from_fd(OwnedFd::from(a), "t").expect("tap"));
                        Box::new(Net::new(tap, *mac).expect("net"))
                    }
                };
                MmioTransport::new(device, irq(), ram.mem().clone()).save()
            })
            .collect()
    }

    /// A VM's state with two vCPUs, a disk and a NIC.
    fn sample_state() -> VmState {
        use kvm_bindings::{kvm_clock_data, kvm_pit_state2};
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        VmState {
            name: "t".into(),
            memory: layout::ram_regions(16 << 20).into_iter().map(|(a, l)| (a.0, l)).collect(),
            vcpus: vec![vcpu::VcpuState::for_tests(0), vcpu::VcpuState::for_tests(1)],
            irqchips: (0..3).map(|_| Pod(kvm_irqchip::default())).collect(),
            pit: Pod(kvm_pit_state2::default()),
            clock: Pod(kvm_clock_data::default()),
            serial: SerialConsole::new(irq, Box::new(std::io::sink())).save(),
            virtio: saved(&[None, Some(MAC)]),
        }
    }

    /// A state container around `payload`, with a right checksum.
    fn seal(payload: &[u8]) -> Vec<u8> {
        let mut out = crate::state::STATE_MAGIC.to_vec();
        out.extend_from_slice(&crate::state::STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]

        /// Bounded fuzzing of the state file decoder on stable: a real
        /// state's payload with a few edits and a right checksum (so the
        /// edits reach the payload decoder: every vCPU, chip, device and
        /// queue field, and the exact-length KVM structures), and the whole
        /// container with edits. It decodes or is refused; never a panic.
        #[test]
        fn edited_state_files_decode_or_are_refused(
            edits in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::prelude::any::<u32>(), proptest::prelude::any::<u8>()), 1..6),
        ) {
            let good = crate::state::encode(&sample_state());
            let payload = &good[20..good.len() - 32];
            let edited = wanmig_types::fuzz::mutate(payload, &edits);
            if let Ok(s) = crate::state::decode::<VmState>(&seal(&edited)) {
                // What decodes is checked against a VM before it is used.
                let _ = check_shape(&config(1, &[MAC]), &s);
                let _ = check_devices(&config(1, &[MAC]), &s.virtio);
            }
            let _ = crate::state::decode::<VmState>(&wanmig_types::fuzz::mutate(&good, &edits));
        }
    }

    #[test]
    fn the_sample_state_round_trips() {
        let s = sample_state();
        let back: VmState = crate::state::decode(&crate::state::encode(&s)).expect("decode");
        assert_eq!(back, s);
        let good = crate::state::encode(&s);
        let payload = &good[20..good.len() - 32];
        assert_eq!(seal(payload), good, "seal() frames a payload as encode() does");
        assert!(crate::state::decode::<VmState>(&seal(&payload[..payload.len() - 1])).is_err(), "a payload cut short");
    }

    fn refusal(config: &VmConfig, saved: &[MmioSnapshot]) -> String {
        match check_devices(config, saved) {
            Err(VmError::Shape(m)) => m,
            other => panic!("not refused for its shape: {other:?}"),
        }
    }

    #[test]
    fn saved_devices_must_be_the_configured_ones() {
        let other = MacAddr([0x52, 0x54, 0, 0, 0, 9]);
        assert!(check_devices(&config(1, &[MAC]), &saved(&[None, Some(MAC)])).is_ok());
        assert!(check_devices(&config(0, &[]), &[]).is_ok());
        // A migrated or restored VM with a NIC where nothing is configured:
        // the message names the NIC and the missing [[net]].
        let m = refusal(&config(1, &[]), &saved(&[None, Some(MAC)]));
        assert!(m.contains("slot 1") && m.contains("52:54:00:12:34:56") && m.contains("[[net]]"), "{m}");
        let m = refusal(&config(1, &[other]), &saved(&[None, Some(MAC)]));
        assert!(m.contains("52:54:00:00:00:09") && m.contains("tap0"), "{m}");
        let m = refusal(&config(2, &[MAC]), &saved(&[None, Some(MAC)]));
        assert!(m.contains("/d1.img"), "{m}");
        let m = refusal(&config(0, &[MAC]), &saved(&[None]));
        assert!(m.contains("disk"), "{m}");
        let m = refusal(&config(1, &[MAC]), &saved(&[None]));
        assert!(m.contains("1 virtio devices saved, 2 configured (1 disks, 1 NICs)"), "{m}");
        let m = refusal(&config(1, &[MAC, other]), &saved(&[None, Some(MAC)]));
        assert!(m.contains("2 virtio devices saved, 3 configured"), "{m}");
    }
}
