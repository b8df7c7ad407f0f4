//! vCPUs: boot setup, the run loop with pause/resume, and state save/restore.
//!
//! Each vCPU runs on its own thread, holding its `VcpuFd` lock while in
//! `KVM_RUN`. Pausing sets the wanted state and kicks the threads with a
//! signal (repeatedly, so a kick that lands just before `KVM_RUN` is not
//! lost) until every thread is parked; a parking thread first re-enters
//! `KVM_RUN` once with `immediate_exit` set, which completes any pending
//! port or MMIO read without running guest code, so the saved registers
//! never miss the result of an instruction in flight.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::devices::power::PowerEvent;
use crate::devices::{Devices, lock};
use crate::state::Pod;

/// Errors of vCPU setup and state transfer, each naming the ioctl's purpose.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: cannot {what}")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than were given.
    #[error("vCPU {id}: KVM set {set} of {total} MSRs (first refused: {first_refused:#x})")]
    Msrs {
        /// The vCPU.
        id: u8,
        /// MSRs set.
        set: usize,
        /// MSRs given.
        total: usize,
        /// Index of the first one KVM refused.
        first_refused: u32,
    },
    /// The saved state does not fit this vCPU.
    #[error("vCPU {id}: saved state is invalid: {reason}")]
    BadState {
        /// The vCPU.
        id: u8,
        /// What is wrong.
        reason: String,
    },
}

fn kvm_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { id, what, source }
}

/// Saved state of one vCPU.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC id).
    pub id: u8,
    /// The CPUID the guest saw.
    pub cpuid: Vec<Pod<kvm_cpuid_entry2>>,
    /// Model-specific registers: (index, value).
    pub msrs: Vec<(u32, u64)>,
    regs: Pod<kvm_regs>,
    sregs: Pod<kvm_sregs>,
    xsave: Pod<kvm_xsave>,
    xcrs: Pod<kvm_xcrs>,
    debugregs: Pod<kvm_debugregs>,
    lapic: Pod<kvm_lapic_state>,
    mp_state: Pod<kvm_mp_state>,
    events: Pod<kvm_vcpu_events>,
    /// TSC frequency the guest ran at, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

#[cfg(test)]
impl VcpuState {
    /// A vCPU with zeroed registers and a little of everything else, for
    /// tests of the state file's decoder.
    pub(crate) fn for_tests(id: u8) -> Self {
        VcpuState {
            id,
            cpuid: (0..3).map(|f| Pod(kvm_cpuid_entry2 { function: f, eax: 0x806f8, ..Default::default() })).collect(),
            msrs: vec![(0x10, 12345), (0xc000_0080, 0xd01)],
            regs: Pod(kvm_regs { rip: 0x10_0000, ..Default::default() }),
            sregs: Pod(kvm_sregs::default()),
            xsave: Pod(kvm_xsave::default()),
            xcrs: Pod(kvm_xcrs::default()),
            debugregs: Pod(kvm_debugregs::default()),
            lapic: Pod(kvm_lapic_state::default()),
            mp_state: Pod(kvm_mp_state::default()),
            events: Pod(kvm_vcpu_events::default()),
            tsc_khz: Some(2_000_000),
        }
    }
}

/// MSRs that change with wall-clock time while a vCPU is stopped.
const TIME_MSRS: [u32; 1] = [0x10 /* IA32_TSC */];
/// LAPIC timer current-count register: computed from the host clock.
const APIC_TMCCT: usize = 0x390;

impl VcpuState {
    /// Whether `other` is the same vCPU at the same point of execution:
    /// every register equal, except those that track wall-clock time.
    pub fn same_execution_state(&self, other: &VcpuState) -> bool {
        let msrs = |s: &VcpuState| -> Vec<(u32, u64)> {
            s.msrs.iter().copied().filter(|(i, _)| !TIME_MSRS.contains(i)).collect()
        };
        let lapic = |s: &VcpuState| {
            let mut r = s.lapic.0.regs;
            r[APIC_TMCCT..APIC_TMCCT + 4].fill(0);
            r
        };
        self.id == other.id
            && self.cpuid == other.cpuid
            && msrs(self) == msrs(other)
            && self.regs == other.regs
            && self.sregs == other.sregs
            && self.xsave == other.xsave
            && self.xcrs == other.xcrs
            && self.debugregs == other.debugregs
            && lapic(self) == lapic(other)
            && self.mp_state == other.mp_state
            && self.events == other.events
    }
}

/// Most MSRs a saved vCPU may carry (KVM lists a few hundred at most).
const MAX_MSRS: usize = 1024;

/// The CPUID for vCPU `id`: what KVM supports, with the APIC id filled in
/// and the features named in `hide` cleared ([`crate::cpuid::hide`]).
pub fn cpuid_for(kvm: &Kvm, id: u8, count: u8, hide: &[String]) -> Result<CpuId, VcpuError> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err(id, "get supported CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                e.ecx |= 1 << 31; // hypervisor present
            }
            0xb => e.edx = u32::from(id),
            _ => {}
        }
    }
    crate::cpuid::hide(cpuid.as_mut_slice(), hide);
    Ok(cpuid)
}

/// Which MSRs of `kvm`'s list can be read on `vcpu` (some listed ones fail
/// on some hosts; KVM stops at the first failure and says how far it got).
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuError> {
    let list = kvm.get_msr_index_list().map_err(kvm_err(0, "list MSRs"))?;
    let mut candidates: Vec<u32> = list.as_slice().to_vec();
    let mut good = Vec::with_capacity(candidates.len());
    while !candidates.is_empty() {
        let chunk: Vec<u32> = candidates.iter().copied().take(kvm_bindings::KVM_MAX_MSR_ENTRIES).collect();
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).expect("chunk is within KVM_MAX_MSR_ENTRIES");
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err(0, "read MSRs"))?;
        good.extend_from_slice(&chunk[..n]);
        // Skip the one that failed (if any) and go on after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        candidates.drain(..consumed);
    }
    Ok(good)
}

/// Sets up vCPU `id` for a fresh boot: CPUID, FPU, and LAPIC virtual-wire mode.
pub fn configure(kvm: &Kvm, vcpu: &VcpuFd, id: u8, count: u8, hide: &[String]) -> Result<(), VcpuError> {
    vcpu.set_cpuid2(&cpuid_for(kvm, id, count, hide)?).map_err(kvm_err(id, "set CPUID"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(kvm_err(id, "set FPU"))?;
    // LINT0 = ExtINT (the 8259 reaches the CPU), LINT1 = NMI, as a BIOS leaves them.
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(id, "get LAPIC"))?;
    let set_lvt = |lapic: &mut kvm_lapic_state, reg: usize, mode: u32| {
        let bytes: [u8; 4] =
            lapic.regs[reg..reg + 4].iter().map(|&b| b as u8).collect::<Vec<_>>().try_into().expect("4");
        let v = (u32::from_le_bytes(bytes) & !0x700 & !(1 << 16)) | (mode << 8);
        for (d, s) in lapic.regs[reg..reg + 4].iter_mut().zip(v.to_le_bytes()) {
            *d = s as _;
        }
    };
    set_lvt(&mut lapic, 0x350, 0b111); // ExtINT
    set_lvt(&mut lapic, 0x360, 0b100); // NMI
    vcpu.set_lapic(&lapic).map_err(kvm_err(id, "set LAPIC"))?;
    Ok(())
}

/// Loads flat 4 GiB segments: code at selector `code`, data (all the others)
/// at the next one; the code segment is 64-bit when `long`, else 32-bit.
fn set_flat_segments(sregs: &mut kvm_sregs, code: u16, long: bool) {
    let cs = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: code,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment { selector: code + 8, type_: 0x3, l: 0, db: 1, ..cs };
    sregs.cs = cs;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
}

/// Puts the boot vCPU at a multiboot entry point: 32-bit protected mode,
/// flat segments, paging off, EAX = magic, EBX = boot information.
pub fn set_multiboot_entry(vcpu: &VcpuFd, entry: u32, info: u32) -> Result<(), VcpuError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(0, "get special registers"))?;
    set_flat_segments(&mut sregs, 0x08, false);
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err(0, "set special registers"))?;
    let regs = kvm_regs {
        rip: u64::from(entry),
        rax: u64::from(crate::boot::BOOTLOADER_MAGIC),
        rbx: u64::from(info),
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(0, "set registers"))
}

/// Puts the boot vCPU at a Linux 64-bit entry point: long mode with the
/// loader's GDT and identity page tables ([`crate::linux`]), flat segments
/// with the selectors the boot protocol names (code 0x10, data 0x18),
/// interrupts off, RSI = the zero page.
pub fn set_linux_entry(vcpu: &VcpuFd, entry: &crate::linux::LinuxEntry) -> Result<(), VcpuError> {
    use crate::layout;
    let mut sregs = vcpu.get_sregs().map_err(kvm_err(0, "get special registers"))?;
    set_flat_segments(&mut sregs, 0x10, true);
    sregs.gdt.base = layout::LINUX_GDT;
    sregs.gdt.limit = (std::mem::size_of_val(&crate::linux::BOOT_GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = layout::LINUX_PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0011; // PG | ET | PE
    sregs.efer = (1 << 8) | (1 << 10); // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm_err(0, "set special registers"))?;
    let regs = kvm_regs {
        rip: entry.entry,
        rsi: entry.boot_params,
        rsp: layout::LINUX_BOOT_STACK,
        rbp: layout::LINUX_BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err(0, "set registers"))
}

/// Captures the state of a vCPU that is not running.
pub fn save(vcpu: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err(id, "get CPUID"))?;
    let mp_state = vcpu.get_mp_state().map_err(kvm_err(id, "get MP state"))?;
    let regs = vcpu.get_regs().map_err(kvm_err(id, "get registers"))?;
    let sregs = vcpu.get_sregs().map_err(kvm_err(id, "get special registers"))?;
    let xsave = vcpu.get_xsave().map_err(kvm_err(id, "get XSAVE state"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm_err(id, "get XCRs"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm_err(id, "get debug registers"))?;
    let lapic = vcpu.get_lapic().map_err(kvm_err(id, "get LAPIC"))?;
    let mut msrs = Vec::with_capacity(msr_indices.len());
    for chunk in msr_indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut buf = Msrs::from_entries(&entries).expect("chunk is within KVM_MAX_MSR_ENTRIES");
        let n = vcpu.get_msrs(&mut buf).map_err(kvm_err(id, "get MSRs"))?;
        if n != chunk.len() {
            return Err(VcpuError::Msrs { id, set: n, total: chunk.len(), first_refused: chunk[n] });
        }
        msrs.extend(buf.as_slice().iter().map(|e| (e.index, e.data)));
    }
    let events = vcpu.get_vcpu_events().map_err(kvm_err(id, "get vCPU events"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().iter().map(|e| Pod(*e)).collect(),
        msrs,
        regs: Pod(regs),
        sregs: Pod(sregs),
        xsave: Pod(xsave),
        xcrs: Pod(xcrs),
        debugregs: Pod(debugregs),
        lapic: Pod(lapic),
        mp_state: Pod(mp_state),
        events: Pod(events),
        tsc_khz,
    })
}

/// Loads a saved state into a fresh vCPU. The order follows KVM's
/// dependencies: CPUID before anything that depends on features, special
/// registers (APIC base) before the LAPIC, the LAPIC before MSRs (the TSC
/// deadline timer), events last.
pub fn restore(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), VcpuError> {
    let id = s.id;
    if s.cpuid.len() > KVM_MAX_CPUID_ENTRIES || s.msrs.len() > MAX_MSRS {
        return Err(VcpuError::BadState {
            id,
            reason: format!("{} CPUID entries, {} MSRs", s.cpuid.len(), s.msrs.len()),
        });
    }
    let entries: Vec<kvm_cpuid_entry2> = s.cpuid.iter().map(|p| p.0).collect();
    let cpuid =
        CpuId::from_entries(&entries).map_err(|e| VcpuError::BadState { id, reason: format!("CPUID: {e:?}") })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err(id, "set CPUID"))?;
    if let Some(khz) = s.tsc_khz {
        // Same-host restores need nothing; a different TSC rate is scaled
        // where the host supports it. Either way a failure here is not fatal
        // to correctness of the state, only to the guest's clock rate.
        let _ = vcpu.set_tsc_khz(khz);
    }
    vcpu.set_mp_state(s.mp_state.0).map_err(kvm_err(id, "set MP state"))?;
    vcpu.set_regs(&s.regs.0).map_err(kvm_err(id, "set registers"))?;
    vcpu.set_sregs(&s.sregs.0).map_err(kvm_err(id, "set special registers"))?;
    // SAFETY: KVM_SET_XSAVE reads the kernel's XSAVE size for this vCPU,
    // which exceeds the 4096-byte `kvm_xsave` only when dynamically enabled
    // XSTATE features (AMX) were granted to the guest with
    // ARCH_REQ_XCOMP_GUEST_PERM; this VMM never requests them.
    unsafe { vcpu.set_xsave(&s.xsave.0) }.map_err(kvm_err(id, "set XSAVE state"))?;
    vcpu.set_xcrs(&s.xcrs.0).map_err(kvm_err(id, "set XCRs"))?;
    vcpu.set_debug_regs(&s.debugregs.0).map_err(kvm_err(id, "set debug registers"))?;
    vcpu.set_lapic(&s.lapic.0).map_err(kvm_err(id, "set LAPIC"))?;
    for chunk in s.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> =
            chunk.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).expect("chunk is within KVM_MAX_MSR_ENTRIES");
        let n = vcpu.set_msrs(&msrs).map_err(kvm_err(id, "set MSRs"))?;
        if n != chunk.len() {
            return Err(VcpuError::Msrs { id, set: n, total: chunk.len(), first_refused: chunk[n].0 });
        }
    }
    vcpu.set_vcpu_events(&s.events.0).map_err(kvm_err(id, "set vCPU events"))?;
    Ok(())
}

/// What the VMM wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Wanted {
    /// Run the guest.
    Run = 0,
    /// Park, outside `KVM_RUN`.
    Pause = 1,
    /// Leave the thread.
    Exit = 2,
}

/// Shared between the VMM and its vCPU threads.
#[derive(Debug)]
pub struct RunControl {
    wanted: AtomicU8,
    /// Set when the guest stopped by itself: nothing may run it again.
    guest_stopped: std::sync::atomic::AtomicBool,
    parked: Mutex<usize>,
    changed: Condvar,
}

impl RunControl {
    /// Threads start parked until [`RunControl::set`]`(Run)`.
    pub fn new() -> Self {
        RunControl {
            wanted: AtomicU8::new(Wanted::Pause as u8),
            guest_stopped: std::sync::atomic::AtomicBool::new(false),
            parked: Mutex::new(0),
            changed: Condvar::new(),
        }
    }

    /// The wanted state.
    pub fn wanted(&self) -> Wanted {
        match self.wanted.load(Ordering::Acquire) {
            0 => Wanted::Run,
            1 => Wanted::Pause,
            _ => Wanted::Exit,
        }
    }

    /// Changes the wanted state and wakes parked threads. `Exit` always
    /// wins; `Run` is ignored once the guest has stopped by itself.
    pub fn set(&self, w: Wanted) {
        let _guard = lock(&self.parked);
        if w == Wanted::Run && self.guest_stopped.load(Ordering::Acquire) {
            return;
        }
        if self.wanted() == Wanted::Exit {
            return;
        }
        self.wanted.store(w as u8, Ordering::Release);
        self.changed.notify_all();
    }

    /// A vCPU saw the guest stop: pause everyone for good (unless the VM is
    /// already being torn down).
    fn guest_stopped(&self) {
        self.guest_stopped.store(true, Ordering::Release);
        self.set(Wanted::Pause);
    }

    /// Waits up to `timeout` for `n` threads to be parked; returns whether they are.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let guard = lock(&self.parked);
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |parked| *parked < n)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *guard >= n
    }

    /// Parks the calling vCPU thread until it is wanted elsewhere; returns
    /// what is wanted (never `Pause`).
    fn park(&self) -> Wanted {
        let mut parked = lock(&self.parked);
        *parked += 1;
        self.changed.notify_all();
        while self.wanted() == Wanted::Pause {
            parked = self.changed.wait(parked).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *parked -= 1;
        self.wanted()
    }
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process; without SA_RESTART,
/// so `KVM_RUN` returns `EINTR`.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .expect("registering a handler for a real-time signal cannot fail");
    });
}

/// Why the guest stopped on its own. wanmig does not reboot guests: every
/// stop ends the VM; only [`GuestStop::Failed`] is an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest powered itself off (ACPI S5 through the power device).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042 reset line,
    /// or KVM's reset event).
    Reset,
    /// A triple fault: on a PC, a reset. Linux's last-resort reboot; also
    /// what a guest that crashes early does.
    TripleFault,
    /// KVM could not run the guest.
    Failed(String),
}

/// What KVM says about an internal error: its sub-error, where the guest
/// was, and (for an emulation failure, when KVM reports them) the
/// instruction's bytes.
fn internal_error(vcpu: &mut VcpuFd) -> String {
    const EMULATION: u32 = 1; // KVM_INTERNAL_ERROR_EMULATION
    const FLAG_INSN_BYTES: u64 = 1; // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    let rip = vcpu.get_regs().map(|r| format!("{:#x}", r.rip)).unwrap_or_else(|_| "unknown".into());
    let run = vcpu.get_kvm_run();
    // SAFETY: KVM wrote the `internal` member of the exit union for this
    // exit; `emulation_failure` shares its first two fields and is read
    // only when KVM flags it, and every bit pattern is a valid integer.
    let (suberror, flags, insn) = unsafe {
        let e = run.__bindgen_anon_1.emulation_failure;
        let b = e.__bindgen_anon_1.__bindgen_anon_1;
        (e.suberror, e.flags, b.insn_bytes[..usize::from(b.insn_size).min(15)].to_vec())
    };
    let mut msg = format!("KVM internal error {suberror} at rip {rip}");
    if suberror == EMULATION {
        msg.push_str(": an instruction KVM cannot emulate");
        if flags & FLAG_INSN_BYTES != 0 && !insn.is_empty() {
            let hex: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
            msg.push_str(&format!(" (bytes {})", hex.join(" ")));
        }
    }
    msg
}

impl std::fmt::Display for GuestStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestStop::PowerOff => f.write_str("powered off"),
            GuestStop::Reset => f.write_str("reset"),
            GuestStop::TripleFault => f.write_str("reset by a triple fault"),
            GuestStop::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl From<PowerEvent> for GuestStop {
    fn from(e: PowerEvent) -> Self {
        match e {
            PowerEvent::PowerOff => GuestStop::PowerOff,
            PowerEvent::Reset => GuestStop::Reset,
        }
    }
}

/// The body of a vCPU thread.
pub fn run_thread(
    id: u8,
    fd: Arc<Mutex<VcpuFd>>,
    ctl: Arc<RunControl>,
    devices: Arc<Devices>,
    stopped: Sender<(u8, GuestStop)>,
) {
    loop {
        if ctl.park() == Wanted::Exit {
            return;
        }
        let mut vcpu = lock(&fd);
        let stop = loop {
            if ctl.wanted() != Wanted::Run {
                // Complete a pending port/MMIO read without running guest code.
                vcpu.set_kvm_immediate_exit(1);
                let _ = vcpu.run();
                vcpu.set_kvm_immediate_exit(0);
                break None;
            }
            match vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => devices.pio_read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => {
                    if let Some(event) = devices.pio_write(port, data) {
                        break Some(event.into());
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => devices.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => devices.mmio_write(addr, data),
                Ok(VcpuExit::Hlt | VcpuExit::Intr) => {}
                Ok(VcpuExit::Shutdown) => break Some(GuestStop::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    break Some(match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestStop::Reset,
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestStop::PowerOff,
                        k => GuestStop::Failed(format!("KVM system event {k} (a crash?)")),
                    });
                }
                Ok(VcpuExit::InternalError) => break Some(GuestStop::Failed(internal_error(&mut vcpu))),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    break Some(GuestStop::Failed(format!("VM entry failed (reason {reason:#x}, cpu {cpu})")));
                }
                Ok(other) => break Some(GuestStop::Failed(format!("unhandled exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => break Some(GuestStop::Failed(format!("KVM_RUN failed: {e}"))),
            }
        };
        drop(vcpu);
        if let Some(stop) = stop {
            let _ = stopped.send((id, stop));
            // Stay parked until the VMM decides (it will ask us to exit).
            ctl.guest_stopped();
        }
    }
}
