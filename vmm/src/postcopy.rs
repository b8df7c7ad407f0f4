//! Guest RAM filled on demand: userfaultfd over every RAM region, so that a
//! VM can run while some of its pages are still missing.
//!
//! [`PostcopyRam::register`] registers all regions of a [`GuestRam`] with a
//! userfaultfd in `MISSING` mode and discards the pages the caller does not
//! say are present. From then on, any access to a missing page blocks the
//! thread that made it until the page is placed:
//!
//! - a vCPU (KVM's own access, inside `KVM_RUN`, or its instruction
//!   emulator's), a device thread (virtio reading a descriptor through
//!   vm-memory, a user-mode access), and a syscall that reads or writes guest
//!   memory (`write(2)` from it, `read(2)` into it: kernel-mode accesses).
//!   The userfaultfd is created **without** `UFFD_USER_MODE_ONLY`, so the
//!   kernel-mode faults are delivered like the others instead of failing
//!   with `EFAULT` (a unit test shows the difference);
//! - [`PostcopyRam::read_faults`] reports each faulting page once, as a
//!   guest-physical address with the faulting thread's id. It reads only the
//!   userfaultfd and its own bitmaps, never guest memory, so it cannot fault
//!   itself;
//! - [`PostcopyRam::place`] places a batch: `UFFDIO_COPY` per run of pages
//!   (`UFFDIO_ZEROPAGE` for runs of zero pages), all with `DONTWAKE`, then
//!   **one** `UFFDIO_WAKE` per RAM region the batch touched, over the span
//!   it covered. A page that is already there (`EEXIST`: pushed and
//!   requested both) counts as placed; `EAGAIN` (the mapping is changing)
//!   is retried;
//! - a bitmap of present pages tells the caller what is still missing
//!   ([`PostcopyRam::missing_pages`], [`PostcopyRam::present_bitmap`],
//!   [`PostcopyRam::pending_requests`]); [`PostcopyRam::finish`] ends it
//!   once every page is present (unregisters, transparent huge pages back
//!   on).
//!
//! Transparent huge pages are off (`MADV_NOHUGEPAGE`) while registered: a
//! huge-page fault would ask for 2 MiB where the source sends 4 KiB pages.
//!
//! # Use
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # use vm_memory::GuestAddress;
//! # use wanmig_vmm::memory::GuestRam;
//! # use wanmig_vmm::postcopy::{PageData, Placement, PostcopyRam};
//! # fn fetch(_: &[GuestAddress]) -> Vec<(GuestAddress, Vec<u8>)> { Vec::new() }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ram = GuestRam::new(256 << 20)?;
//! // Pages received by pre-copy (and not dirtied again) stay; all else is missing.
//! let received: Vec<(GuestAddress, u64)> = vec![(GuestAddress(0), 1 << 20)];
//! let pc = Arc::new(PostcopyRam::register(&ram, &received)?);
//! // A thread serves faults from here on; only then is the VM built from
//! // `ram` (loading device state may touch guest memory) and resumed.
//! let mut faults = Vec::new();
//! while pc.missing_pages() > 0 {
//!     faults.clear();
//!     pc.read_faults(Some(Duration::from_millis(10)), &mut faults)?;
//!     let wanted: Vec<GuestAddress> = faults.iter().map(|f| f.gpa).collect();
//!     let pages = fetch(&wanted); // from the source: requested pages first, then pushed ones
//!     let batch: Vec<Placement> =
//!         pages.iter().map(|(gpa, data)| Placement { gpa: *gpa, data: PageData::Bytes(data) }).collect();
//!     pc.place(&batch)?; // one wake-up for the batch
//! }
//! pc.finish()?;
//! # Ok(()) }
//! ```
//!
//! # Ending early
//!
//! Dropping a `PostcopyRam` before every page is present closes the
//! userfaultfd, after which the kernel would hand out zero-filled pages for
//! the missing ones: a guest would run on from zeros. So `Drop` first makes
//! every region that still has missing pages inaccessible (`PROT_NONE`):
//! from then on a syscall gets `EFAULT`, a VMM thread touching that memory
//! crashes the process, and a vCPU gets `EFAULT` from `KVM_RUN` on KVM's
//! page-fault path; in KVM's instruction emulator (all guest code on PVM)
//! the access it cannot make comes out as an MMIO exit at the RAM address
//! instead (`tests/postcopy_kvm.rs` shows it), which the VMM must treat as
//! fatal. Drop the VM (or end the process) rather than rely on this.
//!
//! # Measured here
//!
//! `cargo bench -p wanmig-vmm --bench postcopy` (release) on this project's
//! machine: PVM (software KVM), kernel 6.18, 2 cores shared with other
//! builds (load 2–3); two runs, both figures given where they differ.
//!
//! | what | figure |
//! |---|---|
//! | fault service in-process, 10 000 faults (a thread's load of a missing page → fault read → `UFFDIO_COPY` → `UFFDIO_WAKE` → load done) | p50 5.2–5.4 µs, p99 18–41 µs, max 0.45–3.6 ms; 140–170 k faults/s from one thread |
//! | the same from a vCPU (real-mode guest in PVM's emulator; time between port exits, 4 780 accesses) | p50 11.5 µs present vs. 26.5 µs missing (+15 µs), p99 15 vs. 76 µs |
//! | `UFFDIO_COPY`, 1 page a batch (1 copy + 1 wake) | 1.9 GiB/s, 0.50 M pages/s, 2.0 µs a batch |
//! | `UFFDIO_COPY`, runs of 16 pages | 2.3–2.5 GiB/s, 0.60–0.65 M pages/s |
//! | `UFFDIO_COPY`, runs of 256 pages | 2.0–2.6 GiB/s, 0.52–0.67 M pages/s |
//! | `UFFDIO_COPY`, 256 scattered pages a batch (256 copies, 1 wake) | 1.5–1.7 GiB/s, 0.39–0.45 M pages/s |
//! | `UFFDIO_ZEROPAGE`, runs of 256 pages | 82–83 GiB/s, 21 M pages/s |
//!
//! So placing is not what limits a WAN post-copy: 1.9 GiB/s is 16 Gbit/s
//! even one page at a time, on one core. The copy itself (4 KiB memcpy
//! plus page allocation) dominates beyond 16 pages a run.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use wanmig_types::{PAGE_SIZE, PAGE_SIZE_U64};

use crate::memory::{GuestMem, GuestRam};

/// The kernel ABI (`linux/userfaultfd.h`), which the libc crate does not
/// carry for glibc targets.
mod sys {
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

    pub const UFFD_API: u64 = 0xAA;
    #[cfg(test)]
    pub const UFFD_USER_MODE_ONLY: i32 = 1;
    pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
    pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
    pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
    /// Bits of `uffdio_register.ioctls`: the range ioctls we need.
    pub const NEEDED_RANGE_IOCTLS: u64 = (1 << 0x02) | (1 << 0x03) | (1 << 0x04);
    /// Size of one `struct uffd_msg`.
    pub const MSG_SIZE: usize = 32;

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioCopy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        pub copy: i64,
    }

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioZeropage {
        pub range: UffdioRange,
        pub mode: u64,
        pub zeropage: i64,
    }

    const UFFDIO: u32 = 0xAA;
    ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
    ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
}

/// Errors of post-copy memory. Variants name the operation.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// No userfaultfd could be created (`/dev/userfaultfd` nor the syscall).
    #[error("cannot create a userfaultfd")]
    Create(#[source] io::Error),
    /// The `UFFDIO_API` handshake failed.
    #[error("userfaultfd API handshake refused")]
    Api(#[source] io::Error),
    /// The kernel lacks a feature or ioctl post-copy needs.
    #[error("userfaultfd lacks {0}")]
    Unsupported(&'static str),
    /// `UFFDIO_REGISTER` failed.
    #[error("cannot register guest RAM at {gpa:#x} (+{len:#x}) with userfaultfd")]
    Register {
        /// Start of the region.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("cannot unregister guest RAM at {gpa:#x}")]
    Unregister {
        /// Start of the region.
        gpa: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `madvise` or `mprotect` on guest RAM failed.
    #[error("cannot {what} guest RAM at {gpa:#x} (+{len:#x})")]
    Advise {
        /// What was asked.
        what: &'static str,
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A range is not page-aligned or not inside guest RAM.
    #[error("guest range {gpa:#x} (+{len:#x}) is not page-aligned RAM")]
    BadRange {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
    },
    /// `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` failed.
    #[error("cannot place {pages} pages at {gpa:#x}")]
    Place {
        /// First page that was not placed.
        gpa: u64,
        /// Pages not placed from there.
        pages: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_WAKE` failed.
    #[error("cannot wake threads waiting on {gpa:#x} (+{len:#x})")]
    Wake {
        /// Start of the range.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading fault messages failed.
    #[error("cannot read page faults")]
    Read(#[source] io::Error),
    /// Post-copy cannot end with pages missing.
    #[error("{missing} pages are still missing")]
    Incomplete {
        /// How many.
        missing: u64,
    },
    /// Post-copy has ended; nothing can be placed any more.
    #[error("post-copy has already ended")]
    Finished,
}

/// The contents of a run of pages to place.
#[derive(Debug, Clone, Copy)]
pub enum PageData<'a> {
    /// The pages' bytes, a whole number of pages. They must not be guest
    /// memory registered here (the copy would fault on it).
    Bytes(&'a [u8]),
    /// This many zero pages (mapped to the shared zero page until written).
    Zero(u64),
}

impl PageData<'_> {
    fn pages(&self) -> Option<u64> {
        match self {
            PageData::Bytes(b) => (b.len() % PAGE_SIZE == 0).then_some((b.len() / PAGE_SIZE) as u64),
            PageData::Zero(n) => Some(*n),
        }
    }
}

/// A run of pages to place, starting at `gpa`.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    /// Guest-physical address of the first page (page-aligned).
    pub gpa: GuestAddress,
    /// What goes there.
    pub data: PageData<'a>,
}

/// What a [`PostcopyRam::place`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaceReport {
    /// Pages placed by this call.
    pub placed: u64,
    /// Pages that were already there (`EEXIST`), left as they were.
    pub already: u64,
    /// `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` calls made.
    pub fill_ioctls: u64,
    /// `UFFDIO_WAKE` calls made (one per RAM region touched).
    pub wakes: u64,
}

/// A page some thread is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Guest-physical address of the page (page-aligned).
    pub gpa: GuestAddress,
    /// Whether the access was a write.
    pub write: bool,
    /// The faulting thread's id (`gettid`), as the kernel reported it.
    pub tid: u32,
}

/// Counters since registration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// Pages placed with `UFFDIO_COPY`.
    pub copied: u64,
    /// Pages placed with `UFFDIO_ZEROPAGE`.
    pub zeroed: u64,
    /// Pages found already placed (`EEXIST`).
    pub already: u64,
    /// `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` calls.
    pub fill_ioctls: u64,
    /// `UFFDIO_WAKE` calls.
    pub wakes: u64,
    /// `EAGAIN` retries.
    pub retries: u64,
    /// Fault messages read.
    pub messages: u64,
    /// Faults reported (each missing page at most once).
    pub faults: u64,
}

#[derive(Debug, Default)]
struct Counters {
    copied: AtomicU64,
    zeroed: AtomicU64,
    already: AtomicU64,
    fill_ioctls: AtomicU64,
    wakes: AtomicU64,
    retries: AtomicU64,
    messages: AtomicU64,
    faults: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One RAM region under post-copy.
#[derive(Debug)]
struct Region {
    gpa: u64,
    host: u64,
    len: u64,
    /// Bit set: the page is there (placed, or present at registration).
    present: Box<[AtomicU64]>,
    /// Bit set: a fault on the page was reported.
    reported: Box<[AtomicU64]>,
}

impl Region {
    fn pages(&self) -> u64 {
        self.len / PAGE_SIZE_U64
    }

    fn contains_gpa(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa.checked_add(len).is_some_and(|end| end <= self.gpa + self.len)
    }

    /// Sets the present bit of page `i`; whether it was clear.
    fn set_present(&self, i: u64) -> bool {
        let bit = 1u64 << (i % 64);
        self.present[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn clear_present(&self, i: u64) -> bool {
        let bit = 1u64 << (i % 64);
        self.reported[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel);
        self.present[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    fn is_present(&self, i: u64) -> bool {
        self.present[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
}

fn bitmap(pages: u64) -> Box<[AtomicU64]> {
    (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()
}

/// Guest RAM registered with userfaultfd: pages not yet present fault and
/// wait until placed. Share it between threads (`Arc`): every method takes
/// `&self`.
#[derive(Debug)]
pub struct PostcopyRam {
    uffd: OwnedFd,
    /// Keeps the mappings alive as long as they are registered.
    _mem: GuestMem,
    regions: Vec<Region>,
    missing: AtomicU64,
    finished: AtomicBool,
    counters: Counters,
}

fn errno() -> io::Error {
    io::Error::last_os_error()
}

/// Creates a userfaultfd with `flags` (`O_CLOEXEC | O_NONBLOCK`, and
/// `UFFD_USER_MODE_ONLY` only in a test): through `/dev/userfaultfd`
/// (Linux 6.1+, governed by its file permissions), else the syscall (which
/// needs `CAP_SYS_PTRACE` for kernel-mode faults unless
/// `vm.unprivileged_userfaultfd` is 1).
fn create_uffd(flags: i32) -> Result<OwnedFd, PostcopyError> {
    let via_dev = OpenOptions::new().read(true).write(true).open("/dev/userfaultfd").and_then(|dev| {
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value and returns a
        // new file descriptor or -1; `dev` is an open file.
        let fd = unsafe { libc::ioctl(dev.as_raw_fd(), sys::USERFAULTFD_IOC_NEW(), flags) };
        if fd < 0 { Err(errno()) } else { Ok(fd) }
    });
    let fd = match via_dev {
        Ok(fd) => fd,
        Err(_) => {
            // SAFETY: the userfaultfd syscall takes its flags by value and
            // returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if fd < 0 {
                return Err(PostcopyError::Create(errno()));
            }
            fd as i32
        }
    };
    // SAFETY: `fd` was just returned to us by the kernel and nothing else owns it.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = sys::UffdioApi { api: sys::UFFD_API, features: sys::UFFD_FEATURE_THREAD_ID, ..Default::default() };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
    // `api` is (repr(C), same layout), for the duration of the call.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, sys::UFFDIO_API(), &mut api) } < 0 {
        return Err(PostcopyError::Api(errno()));
    }
    if api.features & sys::UFFD_FEATURE_THREAD_ID == 0 {
        return Err(PostcopyError::Unsupported("UFFD_FEATURE_THREAD_ID"));
    }
    Ok(uffd)
}

fn madvise(region: &Region, offset: u64, len: u64, advice: i32, what: &'static str) -> Result<(), PostcopyError> {
    // SAFETY: the range lies inside a mapping we own (kept alive by
    // `PostcopyRam::_mem`). The advice given here changes no contents
    // except MADV_DONTNEED, which callers use only on pages they declare
    // missing (their contents are not wanted).
    let r = unsafe { libc::madvise((region.host + offset) as *mut libc::c_void, len as usize, advice) };
    if r < 0 {
        return Err(PostcopyError::Advise { what, gpa: region.gpa + offset, len, source: errno() });
    }
    Ok(())
}

/// How one `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` call ended (the kernel's ABI:
/// the ioctl fails with `EAGAIN` when it placed only part of the range, and
/// the struct's result field holds the bytes placed, or `-errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// All pages asked for.
    Done,
    /// This many pages, then it stopped (at a page already there, or to
    /// let a signal through).
    Partial(u64),
    /// Nothing placed; the errno.
    Failed(i32),
}

impl Fill {
    fn from_ioctl(ret: i32, result: i64, errno: i32) -> Fill {
        match (ret, result) {
            (0, _) => Fill::Done,
            (_, n) if n >= PAGE_SIZE as i64 => Fill::Partial(n as u64 / PAGE_SIZE_U64),
            (_, n) if n < 0 => Fill::Failed(i32::try_from(-n).unwrap_or(errno)),
            _ => Fill::Failed(errno),
        }
    }
}

/// How many `EAGAIN`s in a row before a placement gives up.
const MAX_RETRIES: u32 = 10_000;

/// Fills `pages` pages with `op(first, count)` (offsets in pages), going on
/// past pages already there and retrying `EAGAIN`. Calls `done(first,
/// count, existed)` for each run that is now present. On an error, returns
/// the page it stopped at and the errno.
fn fill_pages(
    pages: u64,
    mut op: impl FnMut(u64, u64) -> Fill,
    mut done: impl FnMut(u64, u64, bool),
    mut on_retry: impl FnMut(),
) -> Result<(), (u64, i32)> {
    let (mut at, mut retries) = (0u64, 0u32);
    while at < pages {
        match op(at, pages - at) {
            Fill::Done => {
                done(at, pages - at, false);
                at = pages;
            }
            Fill::Partial(n) => {
                let n = n.min(pages - at);
                done(at, n, false);
                at += n;
                retries = 0;
            }
            Fill::Failed(libc::EEXIST) => {
                done(at, 1, true);
                at += 1;
                retries = 0;
            }
            Fill::Failed(libc::EAGAIN) if retries < MAX_RETRIES => {
                retries += 1;
                on_retry();
                std::thread::yield_now();
            }
            Fill::Failed(e) => return Err((at, e)),
        }
    }
    Ok(())
}

impl PostcopyRam {
    /// Registers every region of `ram` with a new userfaultfd (`MISSING`
    /// mode, kernel-mode faults included), turns transparent huge pages off
    /// on them, and discards every page outside `present` (ranges of
    /// guest-physical addresses, page-aligned), which is then missing.
    /// Pages inside `present` keep their contents.
    ///
    /// Call it before the guest runs; from then on a thread must serve
    /// faults ([`PostcopyRam::read_faults`], [`PostcopyRam::place`]) before
    /// anything touches a missing page, including building the VM from
    /// saved device state.
    pub fn register(ram: &GuestRam, present: &[(GuestAddress, u64)]) -> Result<Self, PostcopyError> {
        Self::register_with(ram, present, 0)
    }

    fn register_with(ram: &GuestRam, present: &[(GuestAddress, u64)], extra: i32) -> Result<Self, PostcopyError> {
        let uffd = create_uffd(libc::O_CLOEXEC | libc::O_NONBLOCK | extra)?;
        let mem = ram.mem().clone();
        let mut regions = Vec::new();
        for r in mem.iter() {
            let gpa = r.start_addr().raw_value();
            let host = mem.get_host_address(r.start_addr()).expect("a region's start is mapped") as u64;
            let len = r.len();
            let pages = len / PAGE_SIZE_U64;
            regions.push(Region { gpa, host, len, present: bitmap(pages), reported: bitmap(pages) });
        }
        // Mark what stays, refusing anything that is not RAM.
        for &(start, len) in present {
            let gpa = start.raw_value();
            let region = regions
                .iter()
                .find(|r| r.contains_gpa(gpa, len))
                .filter(|_| gpa % PAGE_SIZE_U64 == 0 && len % PAGE_SIZE_U64 == 0)
                .ok_or(PostcopyError::BadRange { gpa, len })?;
            let first = (gpa - region.gpa) / PAGE_SIZE_U64;
            for i in first..first + len / PAGE_SIZE_U64 {
                region.set_present(i);
            }
        }
        let pc = PostcopyRam {
            uffd,
            _mem: mem,
            regions,
            missing: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            counters: Counters::default(),
        };
        let mut missing = 0;
        for region in &pc.regions {
            madvise(region, 0, region.len, libc::MADV_NOHUGEPAGE, "turn huge pages off on")?;
            let mut reg = sys::UffdioRegister {
                range: sys::UffdioRange { start: region.host, len: region.len },
                mode: sys::UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads and writes a `struct
            // uffdio_register`, which `reg` is, during the call; the range
            // is a mapping of ours.
            if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&pc.uffd, sys::UFFDIO_REGISTER(), &mut reg) } < 0 {
                return Err(PostcopyError::Register { gpa: region.gpa, len: region.len, source: errno() });
            }
            if reg.ioctls & sys::NEEDED_RANGE_IOCTLS != sys::NEEDED_RANGE_IOCTLS {
                return Err(PostcopyError::Unsupported("UFFDIO_COPY, UFFDIO_ZEROPAGE or UFFDIO_WAKE on guest RAM"));
            }
            // Discard every run of pages not present, so that it faults.
            let mut i = 0;
            while i < region.pages() {
                if region.is_present(i) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < region.pages() && !region.is_present(i) {
                    i += 1;
                }
                let (off, len) = (start * PAGE_SIZE_U64, (i - start) * PAGE_SIZE_U64);
                madvise(region, off, len, libc::MADV_DONTNEED, "discard")?;
                missing += i - start;
            }
        }
        pc.missing.store(missing, Ordering::Release);
        Ok(pc)
    }

    /// Pages not present yet.
    pub fn missing_pages(&self) -> u64 {
        self.missing.load(Ordering::Acquire)
    }

    /// Whether the page holding `gpa` is present.
    pub fn is_present(&self, gpa: GuestAddress) -> bool {
        self.locate(gpa.raw_value(), 1).is_some_and(|(r, i)| r.is_present(i))
    }

    /// The present pages of each region as `(start, bitmap)`, bit `i % 64`
    /// of word `i / 64` for page `i` of the region (`KVM_GET_DIRTY_LOG`'s
    /// layout): what a resumed transfer needs to know was received.
    pub fn present_bitmap(&self) -> Vec<(GuestAddress, Vec<u64>)> {
        self.regions
            .iter()
            .map(|r| (GuestAddress(r.gpa), r.present.iter().map(|w| w.load(Ordering::Acquire)).collect()))
            .collect()
    }

    /// Pages reported by [`PostcopyRam::read_faults`] and still missing:
    /// what to ask for again after the requests were lost.
    pub fn pending_requests(&self) -> Vec<GuestAddress> {
        let mut out = Vec::new();
        for r in &self.regions {
            for (w, (p, q)) in r.present.iter().zip(r.reported.iter()).enumerate() {
                let mut bits = q.load(Ordering::Acquire) & !p.load(Ordering::Acquire);
                while bits != 0 {
                    let b = u64::from(bits.trailing_zeros());
                    out.push(GuestAddress(r.gpa + (w as u64 * 64 + b) * PAGE_SIZE_U64));
                    bits &= bits - 1;
                }
            }
        }
        out
    }

    /// Counters since registration.
    pub fn stats(&self) -> PostcopyStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PostcopyStats {
            copied: get(&c.copied),
            zeroed: get(&c.zeroed),
            already: get(&c.already),
            fill_ioctls: get(&c.fill_ioctls),
            wakes: get(&c.wakes),
            retries: get(&c.retries),
            messages: get(&c.messages),
            faults: get(&c.faults),
        }
    }

    /// The region and page index of `[gpa, gpa + len)`, if page-aligned RAM.
    fn locate(&self, gpa: u64, len: u64) -> Option<(&Region, u64)> {
        let gpa_page = gpa & !(PAGE_SIZE_U64 - 1);
        let r = self.regions.iter().find(|r| r.contains_gpa(gpa_page, len.max(1)))?;
        Some((r, (gpa_page - r.gpa) / PAGE_SIZE_U64))
    }

    /// Places a batch of runs of pages, then wakes the threads waiting on
    /// them: one `UFFDIO_COPY` (or `UFFDIO_ZEROPAGE`) per run, each with
    /// `DONTWAKE`, and one `UFFDIO_WAKE` per RAM region the batch touched,
    /// over the span from its first to its last page there. Pages already
    /// there are left alone and counted in [`PlaceReport::already`].
    ///
    /// The span may include pages the batch did not place: a thread waiting
    /// on one of those wakes, finds it still missing and faults again (its
    /// second fault is not reported again). That costs the thread a retry,
    /// where waking run by run would cost an ioctl per run.
    ///
    /// Every run is checked before anything is placed: a run outside RAM,
    /// not page-aligned or with a partial page fails the whole batch.
    pub fn place(&self, batch: &[Placement<'_>]) -> Result<PlaceReport, PostcopyError> {
        if self.finished.load(Ordering::Acquire) {
            return Err(PostcopyError::Finished);
        }
        let mut runs = Vec::with_capacity(batch.len());
        for p in batch {
            let gpa = p.gpa.raw_value();
            let bad = |pages: u64| PostcopyError::BadRange { gpa, len: pages.saturating_mul(PAGE_SIZE_U64) };
            let pages = p.data.pages().ok_or_else(|| bad(0))?;
            let len = pages.checked_mul(PAGE_SIZE_U64).ok_or_else(|| bad(pages))?;
            match self.locate(gpa, len) {
                Some((r, first)) if gpa % PAGE_SIZE_U64 == 0 && pages > 0 => runs.push((r, first, pages, p.data)),
                _ if pages == 0 && gpa % PAGE_SIZE_U64 == 0 => {}
                _ => return Err(PostcopyError::BadRange { gpa, len }),
            }
        }
        // (first, end) page span per region touched, by region index.
        let mut spans: Vec<Option<(u64, u64)>> = vec![None; self.regions.len()];
        let mut report = PlaceReport::default();
        let mut result = Ok(());
        for &(region, first, pages, data) in &runs {
            let idx = self.regions.iter().position(|r| std::ptr::eq(r, region)).expect("located in self.regions");
            let span = spans[idx].get_or_insert((first, first + pages));
            *span = (span.0.min(first), span.1.max(first + pages));
            if let Err(e) = self.fill(region, first, pages, data, &mut report) {
                result = Err(e);
                break;
            }
        }
        // Wake even after a failure: what was placed must not stay asleep.
        for (region, span) in self.regions.iter().zip(&spans) {
            let Some((first, end)) = *span else { continue };
            let range =
                sys::UffdioRange { start: region.host + first * PAGE_SIZE_U64, len: (end - first) * PAGE_SIZE_U64 };
            // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range` during the call.
            let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.uffd, sys::UFFDIO_WAKE(), &range) };
            report.wakes += 1;
            bump(&self.counters.wakes, 1);
            if r < 0 && result.is_ok() {
                result = Err(PostcopyError::Wake {
                    gpa: region.gpa + first * PAGE_SIZE_U64,
                    len: range.len,
                    source: errno(),
                });
            }
        }
        result.map(|()| report)
    }

    /// Places `pages` pages at page `first` of `region`, without waking.
    fn fill(
        &self,
        region: &Region,
        first: u64,
        pages: u64,
        data: PageData<'_>,
        report: &mut PlaceReport,
    ) -> Result<(), PostcopyError> {
        let host = |page: u64| region.host + (first + page) * PAGE_SIZE_U64;
        let op = |at: u64, count: u64| -> Fill {
            report.fill_ioctls += 1;
            bump(&self.counters.fill_ioctls, 1);
            let len = count * PAGE_SIZE_U64;
            match data {
                PageData::Bytes(bytes) => {
                    let mut copy = sys::UffdioCopy {
                        dst: host(at),
                        src: bytes[(at * PAGE_SIZE_U64) as usize..].as_ptr() as u64,
                        len,
                        mode: sys::UFFDIO_COPY_MODE_DONTWAKE,
                        copy: 0,
                    };
                    // SAFETY: UFFDIO_COPY reads and writes a `struct
                    // uffdio_copy` during the call; it reads `len` bytes
                    // from `src`, which are inside `bytes` (the caller
                    // checked it holds `pages` pages), and writes only to
                    // missing pages of the registered range.
                    let r =
                        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.uffd, sys::UFFDIO_COPY(), &mut copy) };
                    Fill::from_ioctl(r, copy.copy, errno().raw_os_error().unwrap_or(0))
                }
                PageData::Zero(_) => {
                    let mut zero = sys::UffdioZeropage {
                        range: sys::UffdioRange { start: host(at), len },
                        mode: sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE,
                        zeropage: 0,
                    };
                    // SAFETY: UFFDIO_ZEROPAGE reads and writes a `struct
                    // uffdio_zeropage` during the call and maps the zero
                    // page only where pages of the registered range are missing.
                    let r = unsafe {
                        vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.uffd, sys::UFFDIO_ZEROPAGE(), &mut zero)
                    };
                    Fill::from_ioctl(r, zero.zeropage, errno().raw_os_error().unwrap_or(0))
                }
            }
        };
        let placed_counter = match data {
            PageData::Bytes(_) => &self.counters.copied,
            PageData::Zero(_) => &self.counters.zeroed,
        };
        let mut placed = 0;
        let mut already = 0;
        let done = |at: u64, count: u64, existed: bool| {
            for i in first + at..first + at + count {
                if region.set_present(i) {
                    self.missing.fetch_sub(1, Ordering::AcqRel);
                }
            }
            if existed {
                already += count;
            } else {
                placed += count;
            }
        };
        let result = fill_pages(pages, op, done, || bump(&self.counters.retries, 1));
        report.placed += placed;
        report.already += already;
        bump(placed_counter, placed);
        bump(&self.counters.already, already);
        result.map_err(|(at, e)| PostcopyError::Place {
            gpa: region.gpa + (first + at) * PAGE_SIZE_U64,
            pages: pages - at,
            source: io::Error::from_raw_os_error(e),
        })
    }

    /// Appends the pages threads are now waiting for to `out`, each missing
    /// page once (a page already reported, or present by now, is not
    /// reported again); returns how many it appended. Waits up to `timeout`
    /// for the first fault (`None`: until one comes), then takes whatever
    /// else is queued. Reads only the userfaultfd, never guest memory.
    pub fn read_faults(&self, timeout: Option<Duration>, out: &mut Vec<Fault>) -> Result<usize, PostcopyError> {
        let before = out.len();
        let mut pfd = libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        // SAFETY: poll reads and writes one `pollfd`, which `pfd` is.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = errno();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(0) } else { Err(PostcopyError::Read(e)) };
        }
        if r == 0 {
            return Ok(0);
        }
        const BATCH: usize = 128;
        let mut buf = [0u8; sys::MSG_SIZE * BATCH];
        loop {
            // SAFETY: read writes at most `buf.len()` bytes into `buf`.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = errno();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(PostcopyError::Read(e)),
                }
            }
            let n = n as usize;
            for msg in buf[..n].chunks_exact(sys::MSG_SIZE) {
                bump(&self.counters.messages, 1);
                if let Some(f) = self.decode(msg) {
                    out.push(f);
                }
            }
            if n < buf.len() {
                break;
            }
        }
        bump(&self.counters.faults, (out.len() - before) as u64);
        Ok(out.len() - before)
    }

    /// The fault a `struct uffd_msg` reports, unless it is not news.
    fn decode(&self, msg: &[u8]) -> Option<Fault> {
        let word = |at: usize| u64::from_ne_bytes(msg[at..at + 8].try_into().expect("8 bytes"));
        if msg[0] != sys::UFFD_EVENT_PAGEFAULT {
            return None;
        }
        let (flags, address) = (word(8), word(16));
        let tid = u32::from_ne_bytes(msg[24..28].try_into().expect("4 bytes"));
        let r = self.regions.iter().find(|r| address >= r.host && address < r.host + r.len)?;
        let i = (address - r.host) / PAGE_SIZE_U64;
        let bit = 1u64 << (i % 64);
        if r.is_present(i) || r.reported[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return None;
        }
        Some(Fault {
            gpa: GuestAddress(r.gpa + i * PAGE_SIZE_U64),
            write: flags & sys::UFFD_PAGEFAULT_FLAG_WRITE != 0,
            tid,
        })
    }

    /// Makes `[gpa, gpa + len)` missing again (`MADV_DONTNEED`): its
    /// contents are dropped and the next access faults. Only for pages no
    /// running guest relies on (before it runs, or in a benchmark).
    pub fn discard(&self, gpa: GuestAddress, len: u64) -> Result<(), PostcopyError> {
        let bad = PostcopyError::BadRange { gpa: gpa.raw_value(), len };
        let (r, first) = self.locate(gpa.raw_value(), len).ok_or(bad)?;
        if gpa.raw_value() % PAGE_SIZE_U64 != 0 || len % PAGE_SIZE_U64 != 0 {
            return Err(PostcopyError::BadRange { gpa: gpa.raw_value(), len });
        }
        madvise(r, first * PAGE_SIZE_U64, len, libc::MADV_DONTNEED, "discard")?;
        for i in first..first + len / PAGE_SIZE_U64 {
            if r.clear_present(i) {
                self.missing.fetch_add(1, Ordering::AcqRel);
            }
        }
        Ok(())
    }

    /// Ends post-copy once every page is present: unregisters the RAM and
    /// turns transparent huge pages back on. Afterwards nothing can be
    /// placed and no fault is reported.
    pub fn finish(&self) -> Result<(), PostcopyError> {
        let missing = self.missing_pages();
        if missing > 0 {
            return Err(PostcopyError::Incomplete { missing });
        }
        if self.finished.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for r in &self.regions {
            let range = sys::UffdioRange { start: r.host, len: r.len };
            // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range` during the call.
            if unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.uffd, sys::UFFDIO_UNREGISTER(), &range) } < 0 {
                return Err(PostcopyError::Unregister { gpa: r.gpa, source: errno() });
            }
            madvise(r, 0, r.len, libc::MADV_HUGEPAGE, "turn huge pages back on for")?;
        }
        Ok(())
    }
}

impl AsFd for PostcopyRam {
    /// The userfaultfd (readable when a fault is queued), for an event loop.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

impl Drop for PostcopyRam {
    fn drop(&mut self) {
        if self.finished.load(Ordering::Acquire) || self.missing_pages() == 0 {
            return;
        }
        // Closing the userfaultfd would let missing pages read as zeros.
        for r in &self.regions {
            let incomplete = r.present.iter().enumerate().any(|(w, bits)| {
                let pages_here = (r.pages() - w as u64 * 64).min(64);
                let full = if pages_here == 64 { u64::MAX } else { (1u64 << pages_here) - 1 };
                bits.load(Ordering::Acquire) & full != full
            });
            if incomplete {
                // SAFETY: a mapping we own (`_mem` still holds it). It
                // becomes inaccessible: later accesses fault (EFAULT from
                // the kernel, SIGSEGV in user space) instead of reading
                // zeros where guest data is missing.
                unsafe { libc::mprotect(r.host as *mut libc::c_void, r.len as usize, libc::PROT_NONE) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // From a C program including <linux/userfaultfd.h> on this host.
        assert_eq!(sys::UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(sys::UFFDIO_REGISTER(), 0xc020_aa00);
        assert_eq!(sys::UFFDIO_UNREGISTER(), 0x8010_aa01);
        assert_eq!(sys::UFFDIO_WAKE(), 0x8010_aa02);
        assert_eq!(sys::UFFDIO_COPY(), 0xc028_aa03);
        assert_eq!(sys::UFFDIO_ZEROPAGE(), 0xc020_aa04);
        assert_eq!(sys::USERFAULTFD_IOC_NEW(), 0xaa00);
    }

    #[test]
    fn fill_result_follows_the_kernel_abi() {
        assert_eq!(Fill::from_ioctl(0, 8192, 0), Fill::Done);
        assert_eq!(Fill::from_ioctl(-1, 8192, libc::EAGAIN), Fill::Partial(2));
        assert_eq!(Fill::from_ioctl(-1, -i64::from(libc::EEXIST), libc::EEXIST), Fill::Failed(libc::EEXIST));
        assert_eq!(Fill::from_ioctl(-1, 0, libc::EFAULT), Fill::Failed(libc::EFAULT));
    }

    /// A fake kernel: pages in `existing` stop a copy with EEXIST (after a
    /// partial copy if it placed some), and the first `eagain` calls fail
    /// with EAGAIN.
    /// Runs placed as (first, count, existed), the outcome, the retries.
    type Faked = (Vec<(u64, u64, bool)>, Result<(), (u64, i32)>, u32);

    fn fake(pages: u64, existing: &[u64], mut eagain: u32) -> Faked {
        let mut runs = Vec::new();
        let mut retries = 0;
        let op = |at: u64, count: u64| {
            if eagain > 0 {
                eagain -= 1;
                return Fill::Failed(libc::EAGAIN);
            }
            match existing.iter().filter(|&&e| e >= at && e < at + count).min() {
                None => Fill::Done,
                Some(&e) if e == at => Fill::Failed(libc::EEXIST),
                Some(&e) => Fill::Partial(e - at),
            }
        };
        let r = fill_pages(pages, op, |a, c, e| runs.push((a, c, e)), || retries += 1);
        (runs, r, retries)
    }

    #[test]
    fn fill_goes_on_past_existing_pages_and_retries_eagain() {
        let (runs, r, retries) = fake(8, &[2, 3, 7], 3);
        assert_eq!(r, Ok(()));
        assert_eq!(retries, 3);
        assert_eq!(runs, vec![(0, 2, false), (2, 1, true), (3, 1, true), (4, 3, false), (7, 1, true)]);
        let (_, r, _) = fake(4, &[], MAX_RETRIES + 1);
        assert_eq!(r, Err((0, libc::EAGAIN)));
        let mut calls = 0;
        let r = fill_pages(
            4,
            |at, _| {
                calls += 1;
                if at == 0 { Fill::Partial(1) } else { Fill::Failed(libc::ENOMEM) }
            },
            |_, _, _| {},
            || {},
        );
        assert_eq!((r, calls), (Err((1, libc::ENOMEM)), 2));
    }

    // Tests against the kernel: guest RAM under a real userfaultfd.

    use std::sync::mpsc::{Receiver, channel};
    use std::thread::JoinHandle;
    use std::time::Instant;

    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const WAIT: Duration = Duration::from_secs(10);

    fn tid() -> u32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() as u32 }
    }

    fn host(ram: &GuestRam, gpa: u64) -> u64 {
        ram.mem().get_host_address(GuestAddress(gpa)).expect("inside RAM") as u64
    }

    /// A page of `byte`s with `word` in its second u64.
    fn page(byte: u8, word: u64) -> Vec<u8> {
        let mut p = vec![byte; PAGE_SIZE];
        p[8..16].copy_from_slice(&word.to_le_bytes());
        p
    }

    /// Reads faults until `n` are reported or `WAIT` passes.
    fn faults(pc: &PostcopyRam, n: usize) -> Vec<Fault> {
        let (start, mut out) = (Instant::now(), Vec::new());
        while out.len() < n && start.elapsed() < WAIT {
            pc.read_faults(Some(Duration::from_millis(50)), &mut out).expect("read faults");
        }
        out
    }

    /// A thread that reads the u64 at `gpa` through vm-memory (a user-mode
    /// access) after sending its tid.
    fn reader(ram: &GuestRam, gpa: u64) -> (JoinHandle<u64>, Receiver<u32>) {
        let (tx, rx) = channel();
        let mem = ram.mem().clone();
        let t = std::thread::spawn(move || {
            // The caller may not want it.
            let _ = tx.send(tid());
            mem.read_obj::<u64>(GuestAddress(gpa)).expect("inside RAM")
        });
        (t, rx)
    }

    fn blocked_for_a_while(t: &JoinHandle<u64>) -> bool {
        std::thread::sleep(Duration::from_millis(100));
        !t.is_finished()
    }

    #[test]
    fn a_reader_of_a_missing_page_waits_until_it_is_placed() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        ram.mem().write_obj(0x77u64, GuestAddress(0x3000)).expect("in RAM");
        let pc = PostcopyRam::register(&ram, &[(GuestAddress(0x3000), 0x1000)]).expect("register");
        assert_eq!(pc.missing_pages(), 16 * MIB / PAGE_SIZE_U64 - 1);
        // The present page kept its contents and does not fault.
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x3000)).expect("in RAM"), 0x77);
        let (t, tid_rx) = reader(&ram, 0x5008);
        let tid = tid_rx.recv().expect("reader started");
        let got = faults(&pc, 1);
        assert_eq!(got, vec![Fault { gpa: GuestAddress(0x5000), write: false, tid }]);
        assert!(blocked_for_a_while(&t), "the reader did not wait for its page");
        let data = page(1, 0x1122_3344_5566_7788);
        let report = pc.place(&[Placement { gpa: GuestAddress(0x5000), data: PageData::Bytes(&data) }]).expect("place");
        assert_eq!(report, PlaceReport { placed: 1, already: 0, fill_ioctls: 1, wakes: 1 });
        assert_eq!(t.join().expect("reader"), 0x1122_3344_5566_7788);
        assert!(pc.is_present(GuestAddress(0x5000)) && !pc.is_present(GuestAddress(0x6000)));
        assert_eq!(pc.missing_pages(), 16 * MIB / PAGE_SIZE_U64 - 2);
        assert_eq!(pc.pending_requests(), vec![]);
    }

    #[test]
    fn each_faulting_page_is_reported_once_and_a_batch_wakes_once() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        // Three threads on page 0x10000, one on 0x20000 and one on 0x7f000.
        let threads: Vec<_> =
            [0x10000, 0x10008, 0x10ff8, 0x20010, 0x7f000].iter().map(|&gpa| reader(&ram, gpa).0).collect();
        let mut got = faults(&pc, 3);
        // The duplicates come in too; none is reported.
        let start = Instant::now();
        while pc.stats().messages < 5 && start.elapsed() < WAIT {
            pc.read_faults(Some(Duration::from_millis(50)), &mut got).expect("read");
        }
        got.sort_by_key(|f| f.gpa);
        let gpas: Vec<u64> = got.iter().map(|f| f.gpa.0).collect();
        assert_eq!(gpas, vec![0x10000, 0x20000, 0x7f000]);
        let stats = pc.stats();
        assert_eq!((stats.messages, stats.faults), (5, 3), "{stats:?}");
        let mut pending = pc.pending_requests();
        pending.sort();
        assert_eq!(pending, gpas.iter().map(|&g| GuestAddress(g)).collect::<Vec<_>>());
        // One batch: the three pages (each as its own run) and 61 pages
        // between them, as a requested-pages-plus-neighbours answer would.
        let data: Vec<Vec<u8>> = (0..0x80u64).map(|i| page(i as u8, 0x1000 * i)).collect();
        let mut batch = Vec::new();
        for i in (0x10..0x11).chain(0x20..0x40).chain(0x60..0x80) {
            batch.push(Placement { gpa: GuestAddress(i * 0x1000), data: PageData::Bytes(&data[i as usize]) });
        }
        let report = pc.place(&batch).expect("place");
        assert_eq!(report, PlaceReport { placed: 65, already: 0, fill_ioctls: 65, wakes: 1 });
        let words: Vec<u64> = threads.into_iter().map(|t| t.join().expect("reader")).collect();
        // Each reader sees its page: word 1 is 0x1000 * page; word 0 and the last word are the fill byte.
        assert_eq!(
            words,
            vec![0x1010_1010_1010_1010, 0x10000, 0x1010_1010_1010_1010, 0x2020_2020_2020_2020, 0x7f7f_7f7f_7f7f_7f7f]
        );
        assert_eq!(pc.stats().wakes, 1);
        assert_eq!(pc.pending_requests(), vec![]);
    }

    #[test]
    fn pages_already_there_are_left_alone_and_zero_pages_read_as_zeros() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        ram.mem().write_obj(0xAAu64, GuestAddress(0x2000)).expect("in RAM");
        let pc = PostcopyRam::register(&ram, &[(GuestAddress(0x2000), 0x1000)]).expect("register");
        let first = page(9, 9);
        pc.place(&[Placement { gpa: GuestAddress(0x4000), data: PageData::Bytes(&first) }]).expect("place");
        // A run over 0x1000..0x6000: 0x2000 (present at registration) and
        // 0x4000 (placed) stay as they are, the other three are placed.
        let run: Vec<u8> = (1..6u8).flat_map(|i| page(0x10 + i, 0)).collect();
        let report = pc.place(&[Placement { gpa: GuestAddress(0x1000), data: PageData::Bytes(&run) }]).expect("place");
        assert_eq!((report.placed, report.already, report.wakes), (3, 2, 1), "{report:?}");
        // From 0x1000: one page, stopped by 0x2000; from 0x2000: EEXIST;
        // from 0x3000: one page, stopped by 0x4000; from 0x4000: EEXIST;
        // from 0x5000: the rest.
        assert_eq!(report.fill_ioctls, 5);
        let byte = |gpa| ram.mem().read_obj::<u8>(GuestAddress(gpa)).expect("in RAM");
        assert_eq!([byte(0x1000), byte(0x2000), byte(0x3000), byte(0x4000), byte(0x5000)], [0x11, 0xAA, 0x13, 9, 0x15]);
        // Zero pages: placed without data, read as zeros, writable afterwards.
        let report = pc.place(&[Placement { gpa: GuestAddress(0x10000), data: PageData::Zero(16) }]).expect("zero");
        assert_eq!((report.placed, report.fill_ioctls, report.wakes), (16, 1, 1));
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x1fff8)).expect("in RAM"), 0);
        ram.mem().write_obj(5u64, GuestAddress(0x10000)).expect("in RAM");
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x10000)).expect("in RAM"), 5);
        assert_eq!(pc.stats().already, 2);
        assert_eq!(pc.missing_pages(), 16 * MIB / PAGE_SIZE_U64 - 1 - 1 - 3 - 16);
    }

    #[test]
    fn a_batch_over_both_ram_regions_wakes_once_per_region() {
        // 3 GiB below the MMIO gap and 64 MiB above it (address space only).
        let ram = GuestRam::new((3 << 30) + 64 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        let high = crate::layout::MMIO_GAP_END;
        let (lo, hi) = (reader(&ram, 0x40000).0, reader(&ram, high + 0x8000).0);
        assert_eq!(faults(&pc, 2).len(), 2);
        let data = page(3, 3);
        let batch: Vec<Placement> = [0x40000, 0x90000, high, high + 0x8000]
            .iter()
            .map(|&g| Placement { gpa: GuestAddress(g), data: PageData::Bytes(&data) })
            .collect();
        assert_eq!(pc.place(&batch).expect("place").wakes, 2);
        assert_eq!((lo.join().expect("lo"), hi.join().expect("hi")), (0x0303_0303_0303_0303, 0x0303_0303_0303_0303));
    }

    #[test]
    fn bad_ranges_are_refused_before_anything_is_placed() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        assert!(matches!(
            PostcopyRam::register(&ram, &[(GuestAddress(16 * MIB), 0x1000)]),
            Err(PostcopyError::BadRange { .. })
        ));
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        let data = page(1, 1);
        let bad = [
            Placement { gpa: GuestAddress(0x1800), data: PageData::Bytes(&data) },
            Placement { gpa: GuestAddress(16 * MIB - 0x1000), data: PageData::Zero(2) },
            Placement { gpa: GuestAddress(0x1000), data: PageData::Bytes(&data[..100]) },
            Placement { gpa: GuestAddress(!0xfff), data: PageData::Zero(1) },
            Placement { gpa: GuestAddress(0), data: PageData::Zero(u64::MAX) },
        ];
        for p in bad {
            let good = Placement { gpa: GuestAddress(0x5000), data: PageData::Zero(1) };
            assert!(matches!(pc.place(&[good, p]), Err(PostcopyError::BadRange { .. })), "{p:?}");
        }
        assert!(!pc.is_present(GuestAddress(0x5000)));
        assert_eq!(pc.stats().fill_ioctls, 0);
    }

    /// `write(2)` from guest memory into a pipe: the kernel reads the page
    /// (copy_from_user), a kernel-mode access. Returns the thread and the
    /// pipe's read end.
    fn kernel_reader(ram: &GuestRam, gpa: u64) -> (JoinHandle<isize>, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let src = host(ram, gpa);
        let t = std::thread::spawn(move || {
            // SAFETY: `src` is a page of guest RAM that outlives this
            // thread (the test joins it before dropping the RAM).
            let n = unsafe { libc::write(wr.as_raw_fd(), src as *const libc::c_void, PAGE_SIZE) };
            if n < 0 { -(errno().raw_os_error().unwrap_or(0) as isize) } else { n }
        });
        (t, rd)
    }

    #[test]
    fn kernel_mode_accesses_fault_and_are_served() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        // The kernel reads a missing page (write(2) from it).
        let (t, rd) = kernel_reader(&ram, 0x7000);
        let got = faults(&pc, 1);
        assert_eq!(got.iter().map(|f| (f.gpa.0, f.write)).collect::<Vec<_>>(), vec![(0x7000, false)]);
        assert!(!t.is_finished());
        let data = page(0x42, 0xfeed);
        pc.place(&[Placement { gpa: GuestAddress(0x7000), data: PageData::Bytes(&data) }]).expect("place");
        assert_eq!(t.join().expect("writer"), PAGE_SIZE as isize);
        let mut back = vec![0u8; PAGE_SIZE];
        // SAFETY: reads at most PAGE_SIZE bytes into `back`.
        let n = unsafe { libc::read(rd.as_raw_fd(), back.as_mut_ptr().cast(), PAGE_SIZE) };
        assert_eq!((n, back), (PAGE_SIZE as isize, data));

        // The kernel writes a missing page (read(2) into it): a write fault.
        let mut fds = [0; 2];
        // SAFETY: pipe writes two descriptors into `fds`.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both were just created and are owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: writes 8 bytes from a local array.
        assert_eq!(unsafe { libc::write(wr.as_raw_fd(), [7u8; 8].as_ptr().cast(), 8) }, 8);
        let dst = host(&ram, 0x9000);
        // SAFETY: `dst` is guest RAM that outlives the thread (joined below).
        let t = std::thread::spawn(move || unsafe { libc::read(rd.as_raw_fd(), dst as *mut libc::c_void, 8) });
        let got = faults(&pc, 1);
        assert_eq!(got.iter().map(|f| (f.gpa.0, f.write)).collect::<Vec<_>>(), vec![(0x9000, true)]);
        pc.place(&[Placement { gpa: GuestAddress(0x9000), data: PageData::Bytes(&page(1, 1)) }]).expect("place");
        assert_eq!(t.join().expect("reader"), 8);
        // The read's bytes went over the placed page.
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x9000)).expect("in RAM"), 0x0707_0707_0707_0707);
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x9008)).expect("in RAM"), 1);
    }

    #[test]
    fn a_user_mode_only_userfaultfd_would_refuse_them() {
        // The control for the test above: the same kernel-mode access under
        // a UFFD_USER_MODE_ONLY userfaultfd fails at once with EFAULT.
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register_with(&ram, &[], sys::UFFD_USER_MODE_ONLY).expect("register");
        let (t, _rd) = kernel_reader(&ram, 0x7000);
        assert_eq!(t.join().expect("writer"), -(libc::EFAULT as isize));
        let mut got = Vec::new();
        assert_eq!(pc.read_faults(Some(Duration::from_millis(100)), &mut got).expect("read"), 0);
    }

    #[test]
    fn finish_needs_every_page_then_unregisters() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[(GuestAddress(0), 8 * MIB)]).expect("register");
        assert!(matches!(pc.finish(), Err(PostcopyError::Incomplete { missing: 2048 })));
        pc.place(&[Placement { gpa: GuestAddress(8 * MIB), data: PageData::Zero(2048) }]).expect("place");
        assert_eq!(pc.missing_pages(), 0);
        pc.finish().expect("finish");
        assert!(matches!(pc.place(&[]), Err(PostcopyError::Finished)));
        // No longer registered: a discarded page reads as zeros, no fault.
        let page_addr = host(&ram, 0x5000) as *mut libc::c_void;
        // SAFETY: advice on a page of the RAM mapping, whose contents we drop.
        let advised = unsafe { libc::madvise(page_addr, PAGE_SIZE, libc::MADV_DONTNEED) };
        assert_eq!(advised, 0);
        assert_eq!(ram.mem().read_obj::<u64>(GuestAddress(0x5000)).expect("in RAM"), 0);
        drop(pc);
        // Finished: RAM stays accessible after the drop.
        ram.mem().write_obj(1u64, GuestAddress(0x5000)).expect("in RAM");
    }

    #[test]
    fn dropping_it_incomplete_makes_missing_memory_fail_loudly_not_read_zeros() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        drop(pc);
        // Without the guard this would read a fresh zero page.
        let (t, _rd) = kernel_reader(&ram, 0x7000);
        assert_eq!(t.join().expect("writer"), -(libc::EFAULT as isize));
    }

    #[test]
    fn discard_makes_a_page_missing_again() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let pc = PostcopyRam::register(&ram, &[(GuestAddress(0), 16 * MIB)]).expect("register");
        assert_eq!(pc.missing_pages(), 0);
        pc.discard(GuestAddress(0x3000), 0x2000).expect("discard");
        assert_eq!(pc.missing_pages(), 2);
        let (t, _) = reader(&ram, 0x4000);
        assert_eq!(faults(&pc, 1)[0].gpa, GuestAddress(0x4000));
        pc.place(&[Placement { gpa: GuestAddress(0x3000), data: PageData::Zero(2) }]).expect("place");
        assert_eq!(t.join().expect("reader"), 0);
        assert!(pc.discard(GuestAddress(0x3800), 0x1000).is_err());
    }

    /// The `VmFlags` of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: u64) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.split_whitespace().map(String::from).collect();
            }
        }
        panic!("no mapping holds {addr:#x}");
    }

    #[test]
    fn huge_pages_are_off_while_registered_and_back_on_after() {
        let ram = GuestRam::new(16 * MIB).expect("map");
        let addr = host(&ram, 0x100000);
        let has = |f: &str| vm_flags(addr).iter().any(|x| x == f);
        assert!(has("hg"), "GuestRam::new asks for huge pages: {:?}", vm_flags(addr));
        let pc = PostcopyRam::register(&ram, &[]).expect("register");
        assert!(has("nh") && !has("hg") && has("um"), "{:?}", vm_flags(addr)); // um: userfaultfd missing
        pc.place(&[Placement { gpa: GuestAddress(0), data: PageData::Zero(16 * MIB / PAGE_SIZE_U64) }]).expect("place");
        pc.finish().expect("finish");
        assert!(has("hg") && !has("nh") && !has("um"), "{:?}", vm_flags(addr));
    }
}
