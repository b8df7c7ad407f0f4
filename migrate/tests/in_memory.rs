//! A whole migration driven in memory: the real source and destination
//! drivers and session machines, over an in-memory connection pair, with a
//! fake VM (guest RAM, a disk image and a writer that dirties both) and a
//! fake host at the destination. No KVM, no network. The link is cut at
//! points spread over the whole exchange, the destination refuses, the
//! operator cancels; each time exactly one side may run the VM, the source
//! runs on with nothing lost whenever the commit did not go out, and what
//! the destination holds after a commit is byte for byte what the source
//! had at the pause.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use wanmig_migrate::destination::{ReceiveOptions, VmHost, receive_on, receive_on_with};
use wanmig_migrate::journal::{DestJournal, DestPhase, SourceJournal, SourcePhase};
use wanmig_migrate::report::Outcome;
use wanmig_migrate::source::{Connector, PostcopyMode, SendOptions, SourceVm, send_on};
use wanmig_migrate::steer::{Steering, Tunables};
use wanmig_transport::{Conn, Identity, LinkTuning};
use wanmig_types::{MigrationId, PAGE_SIZE, PageRange};
use wanmig_vmm::VmError;
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::devices::block::DiskWriteLog;
use wanmig_vmm::memory::{DirtyPages, GuestRam, RegionDirty};

const MIB: u64 = 1 << 20;
const DISK: u64 = 4 * MIB;

/// What the guest did, shared with its writer thread.
struct Guest {
    ram: GuestRam,
    disk: File,
    log: Arc<DiskWriteLog>,
    dirty: Mutex<Vec<u64>>,
    paused: AtomicBool,
    stop: AtomicBool,
    writes: AtomicU64,
    /// Steps taken at each harvest instead of by a thread (a guest whose
    /// writes, and so the whole exchange, are the same on every run).
    per_harvest: Option<u64>,
}

impl Guest {
    /// One step: a page of RAM and a block of the disk rewritten.
    fn step(&self, n: u64) {
        let pages = self.ram.size() / PAGE_SIZE as u64;
        // A working set in the upper half, the lower half written once.
        let page = pages / 2 + (n * 7919) % (pages / 2);
        let data = [(n % 251) as u8 + 1; PAGE_SIZE];
        self.ram.mem().write_slice(&data, GuestAddress(page * PAGE_SIZE as u64)).expect("in RAM");
        self.dirty.lock().expect("lock")[(page / 64) as usize] |= 1 << (page % 64);
        let block = (n * 104_729) % (DISK / 4096);
        let bytes = [(n % 253) as u8 + 2; 4096];
        self.disk.write_all_at(&bytes, block * 4096).expect("disk");
        self.log.record(block * 4096, 4096);
        self.writes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A VM without KVM: RAM, a disk, and a thread that writes both while it runs.
struct FakeVm {
    config: VmConfig,
    guest: Arc<Guest>,
    logs: Vec<Arc<DiskWriteLog>>,
    thread: Option<std::thread::JoinHandle<()>>,
    logging: bool,
    throttle: u8,
    disks_owned: bool,
    /// RAM and disk as they were at the last pause.
    at_pause: Option<(Vec<u8>, Vec<u8>)>,
    /// Run once, when the device state is first taken (inside the
    /// stop-and-copy, the bulk stream just ended).
    on_state: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl FakeVm {
    /// A guest that writes on its own, in a thread, while it runs.
    fn new(dir: &Path) -> Self {
        Self::with_writer(dir, None)
    }

    /// A guest that writes `steps` at every dirty-log harvest while it runs.
    fn deterministic(dir: &Path, steps: u64) -> Self {
        Self::with_writer(dir, Some(steps))
    }

    fn with_writer(dir: &Path, per_harvest: Option<u64>) -> Self {
        let disk_path = dir.join("disk.img");
        let disk =
            OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&disk_path).expect("disk");
        disk.set_len(DISK).expect("size");
        let toml = format!("name = \"fake\"\nmemory_mib = 16\n[[disk]]\npath = \"{}\"\n", disk_path.display());
        let config = VmConfig::parse(&toml, &dir.join("vm.toml")).expect("config");
        let ram = GuestRam::new(16 * MIB).expect("ram");
        let pages = 16 * MIB / PAGE_SIZE as u64;
        // The lower half holds data that never changes (and some zeros).
        for p in 0..pages / 2 {
            if p % 3 != 0 {
                let data = [(p % 199) as u8 + 1; PAGE_SIZE];
                ram.mem().write_slice(&data, GuestAddress(p * PAGE_SIZE as u64)).expect("in RAM");
            }
        }
        let log = Arc::new(DiskWriteLog::new(DISK));
        let guest = Arc::new(Guest {
            ram,
            disk,
            log: log.clone(),
            dirty: Mutex::new(vec![0; (pages / 64) as usize]),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            per_harvest,
        });
        let mut vm = FakeVm {
            config,
            guest,
            logs: vec![log],
            thread: None,
            logging: false,
            throttle: 0,
            disks_owned: true,
            at_pause: None,
            on_state: Mutex::new(None),
        };
        vm.resume();
        vm
    }

    fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        let mut ram = vec![0u8; self.guest.ram.size() as usize];
        self.guest.ram.mem().read_slice(&mut ram, GuestAddress(0)).expect("read");
        let mut disk = vec![0u8; DISK as usize];
        self.guest.disk.read_exact_at(&mut disk, 0).expect("read");
        (ram, disk)
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        let _ = self.pause();
    }
}

impl SourceVm for FakeVm {
    fn config(&self) -> &VmConfig {
        &self.config
    }
    fn ram(&self) -> &GuestRam {
        &self.guest.ram
    }
    fn disk_write_logs(&self) -> &[Arc<DiskWriteLog>] {
        &self.logs
    }
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), VmError> {
        self.logging = on;
        Ok(())
    }
    fn harvest_dirty(&self) -> Result<DirtyPages, VmError> {
        if let Some(steps) = self.guest.per_harvest.filter(|_| !self.guest.paused.load(Ordering::SeqCst)) {
            let n = self.guest.writes.load(Ordering::SeqCst);
            for i in 0..steps {
                self.guest.step(n + i);
            }
        }
        let words = std::mem::replace(
            &mut *self.guest.dirty.lock().expect("lock"),
            vec![0; 16 * MIB as usize / PAGE_SIZE / 64],
        );
        let ranges: Vec<PageRange> = wanmig_mem_sync::to_ranges(&words, words.len() as u64 * 64);
        Ok(DirtyPages { regions: vec![RegionDirty { start: GuestAddress(0), ranges }] })
    }
    fn pause(&mut self) -> Result<(), VmError> {
        self.guest.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if !self.guest.paused.swap(true, Ordering::SeqCst) {
            self.at_pause = Some(self.snapshot());
        }
        Ok(())
    }
    fn resume(&mut self) {
        self.guest.paused.store(false, Ordering::SeqCst);
        self.guest.stop.store(false, Ordering::SeqCst);
        if self.guest.per_harvest.is_some() {
            return;
        }
        let g = self.guest.clone();
        self.thread = Some(std::thread::spawn(move || {
            let mut n = g.writes.load(Ordering::SeqCst);
            while !g.stop.load(Ordering::SeqCst) {
                g.step(n);
                n += 1;
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    fn sync_disks(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn device_state(&self) -> Result<Vec<u8>, VmError> {
        if let Some(hook) = self.on_state.lock().expect("lock").take() {
            hook();
        }
        Ok(format!("fake device state after {} writes", self.guest.writes.load(Ordering::SeqCst)).into_bytes())
    }
    fn set_throttle(&mut self, percent: u8) {
        self.throttle = percent;
    }
    fn throttle_percent(&self) -> u8 {
        self.throttle
    }
    fn release_disks(&mut self) {
        self.disks_owned = false;
    }
    fn reclaim_disks(&mut self) -> Result<(), VmError> {
        self.disks_owned = true;
        Ok(())
    }
}

/// What the fake destination host got.
#[derive(Debug)]
struct Built {
    ram: Vec<u8>,
    state: Vec<u8>,
    disks: Vec<PathBuf>,
    running: bool,
    /// The RAM itself, kept (by [`LazyHost`]) instead of read at build.
    kept: Option<GuestRam>,
}

/// Builds nothing real: keeps the RAM's bytes and the state.
struct FakeHost {
    refuse: bool,
}

impl VmHost for FakeHost {
    type Vm = Built;

    fn build(
        &mut self,
        _config: &VmConfig,
        ram: GuestRam,
        state: &[u8],
        _disks: Option<Vec<std::fs::File>>,
    ) -> Result<Built, String> {
        if self.refuse {
            return Err("this fake host refuses to build the VM".into());
        }
        let mut bytes = vec![0u8; ram.size() as usize];
        ram.mem().read_slice(&mut bytes, GuestAddress(0)).expect("read");
        Ok(Built { ram: bytes, state: state.to_vec(), disks: Vec::new(), running: false, kept: None })
    }

    fn start(&mut self, vm: &mut Built, disks: &[PathBuf], paused: bool) -> Result<(), String> {
        vm.disks = disks.to_vec();
        vm.running = !paused;
        Ok(())
    }
}

/// Both ends' directories and options.
struct Setup {
    _dir: tempfile::TempDir,
    src_dir: PathBuf,
    dst_dir: PathBuf,
    send: SendOptions,
    receive: ReceiveOptions,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tmp");
    let (src_dir, dst_dir) = (dir.path().join("src"), dir.path().join("dst"));
    std::fs::create_dir_all(&src_dir).expect("src");
    std::fs::create_dir_all(&dst_dir).expect("dst");
    let src_id = Identity::create(&dir.path().join("src-id"), "source").expect("identity");
    let dst_id = Identity::create(&dir.path().join("dst-id"), "destination").expect("identity");
    let addr = "127.0.0.1:9".parse().expect("addr");
    let mut send = SendOptions::new(addr, src_id, dir.path().join("src-id"), dst_id.fingerprint(), src_dir.clone());
    send.downtime = Duration::from_millis(200);
    // These tests hold a cut link to be a failure; resuming has tests of its own.
    send.resume_window = Duration::ZERO;
    // Pre-copy only; post-copy has tests of its own.
    send.postcopy = PostcopyMode::Off;
    send.timeout = Duration::from_secs(60);
    let receive = ReceiveOptions {
        listen: addr,
        identity: dst_id,
        peers: Vec::new(),
        dir: dst_dir.clone(),
        shared_disks: None,
        disk_dir: dst_dir.clone(),
        store: dst_dir.join("chunks"),
        paused: false,
        taps: Vec::new(),
        tuning: LinkTuning::default(),
        idle_timeout: wanmig_migrate::destination::DEFAULT_IDLE_TIMEOUT,
        resume_window: wanmig_migrate::destination::DEFAULT_RESUME_WINDOW,
    };
    Setup { _dir: dir, src_dir, dst_dir, send, receive }
}

/// How a run ended at both ends.
struct Ends {
    outcome: Outcome,
    error: Option<String>,
    postcopy: Option<wanmig_migrate::report::PostcopyStats>,
    received: Option<Built>,
    dest_error: Option<String>,
}

/// Runs one migration of `vm`; `before` may cut the link or cancel.
async fn migrate(s: &Setup, vm: &mut FakeVm, host: &mut FakeHost, steer: &Steering, cut_after: Option<u64>) -> Ends {
    let (src, dst, link) = Conn::mem_pair();
    if let Some(n) = cut_after {
        link.cut_after(n);
    }
    let (mut quiet_src, mut quiet_dst) = (|_: &wanmig_migrate::report::Progress| {}, |_: String| {});
    let mut connector = no_resume();
    let sending = send_on(src, &mut connector, vm, &s.send, steer, &mut quiet_src);
    let receiving = receive_on(dst, &s.receive, host, &mut quiet_dst);
    let ((outcome, summary, _), received) = tokio::join!(sending, receiving);
    let (received, dest_error) = match received {
        Ok(r) => (r.map(|(vm, _)| vm), None),
        Err(e) => (None, Some(wanmig_types::error_chain(&e))),
    };
    Ends { outcome, error: summary.error, postcopy: summary.postcopy, received, dest_error }
}

/// A connector for runs that never resume (its connections go nowhere).
fn no_resume() -> Connector {
    let (to_destination, _) = tokio::sync::mpsc::unbounded_channel();
    Connector::Mem { to_destination, links: Default::default() }
}

fn tunables() -> Steering {
    Steering::new(Tunables { downtime: Duration::from_millis(200), max_bandwidth: None })
}

fn incoming_images(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incoming"))
        .collect()
}

/// The source must run on with nothing lost (the writer moves on), and
/// the destination must hold nothing.
fn assert_source_runs_on(s: &Setup, vm: &FakeVm, ends: &Ends, why: &str) {
    assert_eq!(ends.outcome, Outcome::FailedSourceRunning, "{why}: {:?} / {:?}", ends.error, ends.dest_error);
    assert!(ends.received.is_none(), "{why}: both ends own the VM");
    assert!(!vm.guest.paused.load(Ordering::SeqCst) && vm.disks_owned && vm.throttle == 0, "{why}: the source runs on");
    let before = vm.guest.writes.load(Ordering::SeqCst);
    // Polled: on a loaded machine the writer may not run for a while.
    let moved = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        vm.harvest_dirty().expect("harvest");
        vm.guest.writes.load(Ordering::SeqCst) > before
    });
    assert!(moved, "{why}: the guest writes again");
    assert!(incoming_images(&s.dst_dir).is_empty(), "{why}: incoming images left: {:?}", incoming_images(&s.dst_dir));
    assert_eq!(SourceJournal::new(&s.src_dir, "fake").read().expect("journal"), None, "{why}: the journal is cleared");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

#[test]
fn a_whole_migration_arrives_byte_for_byte() {
    let s = setup();
    let mut vm = FakeVm::new(&s.src_dir);
    std::thread::sleep(Duration::from_millis(100));
    let ends = runtime().block_on(migrate(&s, &mut vm, &mut FakeHost { refuse: false }, &tunables(), None));
    assert_eq!(ends.outcome, Outcome::Migrated, "{:?} / {:?}", ends.error, ends.dest_error);
    let got = ends.received.expect("the destination owns the VM");
    let (ram, disk) = vm.at_pause.clone().expect("paused once");
    assert!(got.ram == ram, "the destination's RAM is the source's at the pause");
    assert_eq!(got.disks.len(), 1);
    assert!(std::fs::read(&got.disks[0]).expect("image") == disk, "the disk image is the source's at the pause");
    assert!(got.running && got.state.starts_with(b"fake device state"));
    assert!(vm.guest.paused.load(Ordering::SeqCst) && !vm.disks_owned, "the source never runs it again");
    let rec = SourceJournal::new(&s.src_dir, "fake").read().expect("journal").expect("a record");
    assert_eq!(rec.phase, SourcePhase::Migrated);
    let dest = DestJournal::new(&s.dst_dir).read(rec.migration_id).expect("journal").expect("a record");
    assert_eq!(dest.phase, DestPhase::Committed);
    assert!(DestJournal::new(&s.dst_dir).read(MigrationId::new()).expect("journal").is_none());
}

/// A setup whose runs are the same byte for byte whatever the machine's
/// load: a budget so large that the first memory round always ends it
/// (run with [`steady`], which steers with that budget).
fn setup_deterministic() -> Setup {
    let mut s = setup();
    s.send.downtime = Duration::from_secs(30);
    s
}

/// Steering with `s`'s downtime budget (the steering's budget is the one
/// the rounds obey).
fn steady(s: &Setup) -> Steering {
    Steering::new(Tunables { downtime: s.send.downtime, max_bandwidth: None })
}

/// One run whose link is cut after `cut` bytes: checks that exactly one
/// side may own the VM and the source's state matches its outcome.
fn one_cut(cut: u64) -> Outcome {
    let s = setup_deterministic();
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    let ends = runtime().block_on(migrate(&s, &mut vm, &mut FakeHost { refuse: false }, &steady(&s), Some(cut)));
    match ends.outcome {
        Outcome::FailedSourceRunning => assert_source_runs_on(&s, &vm, &ends, &format!("cut at {cut}")),
        Outcome::InDoubt => {
            // The commit went out; the source stays paused, owning nothing.
            assert!(vm.guest.paused.load(Ordering::SeqCst) && !vm.disks_owned, "cut at {cut}: in doubt yet running");
            let rec = SourceJournal::new(&s.src_dir, "fake").read().expect("journal").expect("record");
            assert_eq!(rec.phase, SourcePhase::CommitSent);
            // Whatever the destination did, its journal says it.
            let dest = DestJournal::new(&s.dst_dir).read(rec.migration_id).expect("journal").expect("record");
            assert_eq!(dest.phase == DestPhase::Committed, ends.received.is_some(), "cut at {cut}");
        }
        Outcome::Migrated => assert!(ends.received.is_some(), "cut at {cut}: migrated, yet nobody runs it"),
        Outcome::Synced | Outcome::PostcopyLost => panic!("not a sync, nor a post-copy"),
    }
    ends.outcome
}

#[test]
fn a_cut_anywhere_leaves_exactly_one_owner() {
    // Bytes of a whole run, to spread the cuts over it.
    let total = {
        let s = setup_deterministic();
        let mut vm = FakeVm::deterministic(&s.src_dir, 300);
        let (src, dst, link) = Conn::mem_pair();
        let rt = runtime();
        let ends = rt.block_on(async {
            let steer = steady(&s);
            let mut host = FakeHost { refuse: false };
            let (mut quiet_src, mut quiet_dst) = (|_: &wanmig_migrate::report::Progress| {}, |_: String| {});
            let mut connector = no_resume();
            let sending = send_on(src, &mut connector, &mut vm, &s.send, &steer, &mut quiet_src);
            let receiving = receive_on(dst, &s.receive, &mut host, &mut quiet_dst);
            tokio::join!(sending, receiving)
        });
        assert_eq!(ends.0.0, Outcome::Migrated);
        link.crossed()
    };
    // Cuts spread over the whole exchange, and at every byte of its last
    // frames (Ready, Commit, CommitAck and what surrounds them). Eight at a
    // time: a failed run spends most of its time waiting for a reason from
    // the destination that a cut link never brings.
    let mut cuts: Vec<u64> = (0..16).map(|i| total * i / 16).collect();
    cuts.extend(total.saturating_sub(120)..=total);
    let outcomes: Vec<Outcome> = cuts
        .chunks(cuts.len().div_ceil(8))
        .map(|part| {
            std::thread::spawn({
                let part = part.to_vec();
                move || part.into_iter().map(one_cut).collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().expect("a cut run"))
        .collect();
    eprintln!("{total} bytes in a whole run; outcomes of the cuts: {outcomes:?}");
    assert!(outcomes.contains(&Outcome::FailedSourceRunning), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::InDoubt), "{outcomes:?}");
    assert!(outcomes.contains(&Outcome::Migrated), "{outcomes:?}");
}

#[test]
fn a_destination_that_cannot_build_the_vm_resumes_the_source() {
    // In post-copy the commit went with the device state (the early
    // commit): the destination's abort gives the guest, and its disks,
    // back to the source.
    for mode in [PostcopyMode::Off, PostcopyMode::Now] {
        let mut s = setup();
        s.send.postcopy = mode;
        let mut vm = FakeVm::new(&s.src_dir);
        let ends = runtime().block_on(migrate(&s, &mut vm, &mut FakeHost { refuse: true }, &tunables(), None));
        assert_source_runs_on(&s, &vm, &ends, &format!("host refused ({mode:?})"));
        let error = ends.error.unwrap_or_default();
        assert!(error.contains("this fake host refuses to build the VM"), "the source says why: {error}");
        assert_eq!(ends.postcopy.is_some(), mode == PostcopyMode::Now, "post-copy {mode:?}");
    }
}

#[test]
fn a_cancel_before_the_commit_resumes_the_source_at_any_point() {
    for delay_ms in [0u64, 5, 20, 60, 150] {
        let s = setup();
        let mut vm = FakeVm::new(&s.src_dir);
        let steer = tunables();
        let rt = runtime();
        let ends = rt.block_on(async {
            let canceller = steer.clone();
            let cancel = async move {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                canceller.cancel("cancelled by the test")
            };
            let mut host = FakeHost { refuse: false };
            let (ends, cancelled) = tokio::join!(migrate(&s, &mut vm, &mut host, &steer, None), cancel);
            (ends, cancelled)
        });
        let (ends, cancelled) = ends;
        eprintln!("cancel after {delay_ms} ms: {:?}, outcome {:?}", cancelled, ends.outcome);
        match cancelled {
            // Accepted: the migration must not commit.
            Ok(()) => {
                assert_source_runs_on(&s, &vm, &ends, &format!("cancel after {delay_ms} ms"));
                assert!(ends.error.as_deref().unwrap_or("").contains("cancelled by the test"), "{:?}", ends.error);
            }
            // Too late: the commit had gone out; it completes.
            Err(_) => assert_eq!(ends.outcome, Outcome::Migrated, "cancel refused after {delay_ms} ms"),
        }
    }
}

#[test]
fn a_lowered_bandwidth_cap_applies_from_the_next_round() {
    let s = setup();
    let mut vm = FakeVm::new(&s.src_dir);
    // A budget the capped rounds can meet on a loaded machine (the
    // switch-over's own cost alone is counted at 125 ms): the test is about
    // the cap, not about converging.
    let steer = Steering::new(Tunables { downtime: Duration::from_secs(2), max_bandwidth: None });
    let rt = runtime();
    let mut rates = Vec::new();
    let ends = rt.block_on(async {
        let (src, dst, _link) = Conn::mem_pair();
        let mut host = FakeHost { refuse: false };
        let setter = steer.clone();
        let mut seen = 0;
        let mut progress = |p: &wanmig_migrate::report::Progress| {
            if p.phase == wanmig_migrate::report::Phase::Precopy {
                rates.push((p.round, p.max_bandwidth_bps));
                seen += 1;
                if seen == 1 {
                    setter.set(None, Some(Some(2e6)));
                }
            }
        };
        let mut connector = no_resume();
        let sending = send_on(src, &mut connector, &mut vm, &s.send, &steer, &mut progress);
        let mut quiet = |_: String| {};
        let receiving = receive_on(dst, &s.receive, &mut host, &mut quiet);
        tokio::join!(sending, receiving)
    });
    assert_eq!(ends.0.0, Outcome::Migrated, "{:?}", ends.0.1.error);
    // The cap shows in the progress from the round after the change on.
    assert!(rates.len() >= 2, "the change was seen in a later round: {rates:?}");
    assert!(rates.iter().skip(1).all(|(_, cap)| *cap == Some(16_000_000)), "{rates:?}");
}

#[test]
fn a_cancel_after_the_commit_is_refused_and_the_migration_completes() {
    let s = setup();
    let mut vm = FakeVm::new(&s.src_dir);
    let steer = tunables();
    let mut refused = None;
    let ends = runtime().block_on(async {
        let (src, dst, _link) = Conn::mem_pair();
        let mut host = FakeHost { refuse: false };
        let canceller = steer.clone();
        let mut progress = |p: &wanmig_migrate::report::Progress| {
            if p.phase == wanmig_migrate::report::Phase::Committed && refused.is_none() {
                refused = Some(canceller.cancel("too late"));
            }
        };
        let mut quiet = |_: String| {};
        let mut connector = no_resume();
        let sending = send_on(src, &mut connector, &mut vm, &s.send, &steer, &mut progress);
        let receiving = receive_on(dst, &s.receive, &mut host, &mut quiet);
        tokio::join!(sending, receiving)
    });
    assert_eq!(refused, Some(Err(wanmig_migrate::steer::TooLate)), "a cancel after the commit is refused");
    assert_eq!(ends.0.0, Outcome::Migrated, "{:?}", ends.0.1.error);
    assert!(ends.1.expect("received").is_some());
}

/// How a run with resuming on ended: the source's outcome and summary,
/// what the destination received, and the bytes that crossed all links.
struct ResumableRun {
    outcome: Outcome,
    summary: wanmig_migrate::report::Summary,
    received: Result<Option<(Built, VmConfig)>, wanmig_migrate::destination::ReceiveError>,
    crossed: u64,
}

/// One migration of `vm` to `host` over `src`/`dst` (whose cutter is
/// `link`), with resuming on: the source reconnects in memory, and the
/// destination hears those connections.
fn run_resumable<H: VmHost<Vm = Built>>(
    s: &Setup,
    vm: &mut FakeVm,
    host: &mut H,
    steer: &Steering,
    (src, dst, link): (Conn, Conn, wanmig_transport::mem::Link),
) -> ResumableRun {
    let (to_destination, more) = tokio::sync::mpsc::unbounded_channel();
    let links: Arc<Mutex<Vec<wanmig_transport::mem::Link>>> = Arc::new(Mutex::new(vec![link]));
    let mut connector = Connector::Mem { to_destination, links: links.clone() };
    let ((outcome, summary, _), received) = runtime().block_on(async {
        let (mut quiet_src, mut quiet_dst) = (|_: &wanmig_migrate::report::Progress| {}, |_: String| {});
        let sending = send_on(src, &mut connector, vm, &s.send, steer, &mut quiet_src);
        let receiving = receive_on_with(dst, Some(more), &s.receive, host, &mut quiet_dst);
        tokio::join!(sending, receiving)
    });
    let crossed = links.lock().expect("links").iter().map(wanmig_transport::mem::Link::crossed).sum();
    ResumableRun { outcome, summary, received, crossed }
}

/// Checks that the destination holds, byte for byte, what the source had
/// at its (only) pause.
fn assert_arrived_whole(vm: &FakeVm, got: &Built, why: &str) {
    let (ram, disk) = vm.at_pause.clone().expect("paused once");
    assert!(got.ram == ram, "{why}: the destination's RAM is the source's at the pause");
    assert!(std::fs::read(&got.disks[0]).expect("image") == disk, "{why}: the image is the source's at the pause");
}

/// One run whose first link is cut after `cut` bytes, with resuming on:
/// the source reconnects (in memory) and the migration goes on. Returns
/// the outcome, the outages counted, the bytes that crossed all links and
/// the error if any.
type Resumed = (Outcome, u64, u64, Option<String>);

fn one_resumed_cut(cut: u64) -> Resumed {
    let mut s = setup_deterministic();
    s.send.resume_window = Duration::from_secs(30);
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    let (src, dst, link) = Conn::mem_pair();
    link.cut_after(cut);
    let mut host = FakeHost { refuse: false };
    let r = run_resumable(&s, &mut vm, &mut host, &steady(&s), (src, dst, link));
    let why = format!("cut at {cut}: {:?}", r.summary.error);
    if r.outcome == Outcome::Migrated {
        let got = r.received.as_ref().expect(&why).as_ref().expect("the destination owns the VM");
        assert_arrived_whole(&vm, &got.0, &why);
    }
    let dest = r.received.err().map(|e| wanmig_types::error_chain(&e));
    (r.outcome, r.summary.outages.into(), r.crossed, r.summary.error.map(|e| format!("{e}; destination: {dest:?}")))
}

/// Builds as [`FakeHost`] does, and cuts the link when told to start the
/// VM: the destination has committed (its journal says so), and its
/// acknowledgement never leaves.
struct CutOnStart {
    host: FakeHost,
    link: wanmig_transport::mem::Link,
}

impl VmHost for CutOnStart {
    type Vm = Built;

    fn build(
        &mut self,
        config: &VmConfig,
        ram: GuestRam,
        state: &[u8],
        disks: Option<Vec<std::fs::File>>,
    ) -> Result<Built, String> {
        self.host.build(config, ram, state, disks)
    }

    fn start(&mut self, vm: &mut Built, disks: &[PathBuf], paused: bool) -> Result<(), String> {
        self.link.cut();
        self.host.start(vm, disks, paused)
    }
}

/// A migration with an early commit (the default) and resuming on, whose
/// link fails after the device state left: the outcome must be the
/// migration's (never in doubt, the destination being reachable again),
/// with the destination's answer to the resume `decided`, the guest
/// paused since the stop-and-copy (never run here again), and the
/// destination holding what the source had at that pause.
fn assert_decided_on_resume(s: &Setup, vm: &FakeVm, r: ResumableRun, decided: &str, writes_at_pause: u64) {
    let dest_error = r.received.as_ref().err().map(|e| wanmig_types::error_chain(e));
    assert_eq!(r.outcome, Outcome::Migrated, "{:?} / {dest_error:?}", r.summary.error);
    assert_eq!((r.summary.outages, r.summary.decided_on_resume.as_deref()), (1, Some(decided)), "{:?}", r.summary);
    let (got, _) = r.received.expect("received").expect("the destination owns the VM");
    assert_arrived_whole(vm, &got, decided);
    assert!(got.running && got.state.starts_with(b"fake device state"));
    assert!(vm.guest.paused.load(Ordering::SeqCst) && !vm.disks_owned, "the source never runs it again");
    assert_eq!(vm.guest.writes.load(Ordering::SeqCst), writes_at_pause, "the guest ran here after the pause");
    let rec = SourceJournal::new(&s.src_dir, "fake").read().expect("journal").expect("a record");
    assert_eq!(rec.phase, SourcePhase::Migrated);
    let dest = DestJournal::new(&s.dst_dir).read(rec.migration_id).expect("journal").expect("a record");
    assert_eq!(dest.phase, DestPhase::Committed);
}

/// An early commit (the default), resuming on, the guest's writes the
/// same on every run.
fn setup_early_resumable() -> Setup {
    let mut s = setup_deterministic();
    s.send.resume_window = Duration::from_secs(30);
    assert!(s.send.early_commit, "the early commit is the default");
    s
}

#[test]
fn a_link_lost_after_an_early_commit_the_destination_decided_is_settled_by_the_resume() {
    let s = setup_early_resumable();
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    let (src, dst, link) = Conn::mem_pair();
    let mut host = CutOnStart { host: FakeHost { refuse: false }, link: link.clone() };
    let r = run_resumable(&s, &mut vm, &mut host, &steady(&s), (src, dst, link));
    let writes = vm.guest.writes.load(Ordering::SeqCst);
    assert_decided_on_resume(&s, &vm, r, "Committed", writes);
}

/// An outage from the moment the source reads the device state: the link
/// stalls (what is sent from then on never arrives) and is cut 200 ms
/// later. Returns where the guest's write count will be kept at that moment.
fn outage_from_the_state(vm: &FakeVm, link: &wanmig_transport::mem::Link) -> Arc<AtomicU64> {
    let (outage, at_pause) = (link.clone(), Arc::new(AtomicU64::new(u64::MAX)));
    let (guest, seen) = (vm.guest.clone(), at_pause.clone());
    *vm.on_state.lock().expect("lock") = Some(Box::new(move || {
        seen.store(guest.writes.load(Ordering::SeqCst), Ordering::SeqCst);
        outage.stall();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            outage.cut();
        });
    }));
    at_pause
}

#[test]
fn a_link_lost_before_the_destination_decided_an_early_commit_sends_the_rest_again() {
    let s = setup_early_resumable();
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    let (src, dst, link) = Conn::mem_pair();
    // An outage from the moment the bulk stream ended: the device state and
    // the early Commit leave this side and never arrive; the connection
    // dies a little later.
    let at_pause = outage_from_the_state(&vm, &link);
    let mut host = FakeHost { refuse: false };
    let r = run_resumable(&s, &mut vm, &mut host, &steady(&s), (src, dst, link));
    assert_decided_on_resume(&s, &vm, r, wanmig_migrate::source::TAKEN_UP_AGAIN, at_pause.load(Ordering::SeqCst));
}

#[test]
fn a_link_lost_before_the_destination_decided_a_postcopy_gives_the_guest_back_on_the_resume() {
    let mut s = setup_early_resumable();
    s.send.postcopy = PostcopyMode::Now;
    // The attempt parks undecided; this in-memory listener answers the
    // settle query from the journal but lets the attempt wait its window out.
    s.receive.resume_window = Duration::from_secs(2);
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    let (src, dst, link) = Conn::mem_pair();
    // The device state and the early Commit never arrive, nor (here) the
    // start of post-copy: the destination parks undecided, where it would
    // resume at the point a committed post-copy gives. So the source asks
    // for the decision first (a settle query) and hears "not committed".
    outage_from_the_state(&vm, &link);
    let mut host = FakeHost { refuse: false };
    let r = run_resumable(&s, &mut vm, &mut host, &steady(&s), (src, dst, link));
    let ends = Ends {
        outcome: r.outcome,
        error: r.summary.error.clone(),
        postcopy: r.summary.postcopy.clone(),
        received: None,
        dest_error: r.received.as_ref().err().map(|e| wanmig_types::error_chain(e)),
    };
    assert!(r.received.is_err(), "the destination holds no VM");
    assert_eq!(r.summary.decided_on_resume.as_deref(), Some("NotCommitted"), "{:?}", r.summary);
    assert!(ends.postcopy.is_some(), "it moved in post-copy");
    assert_source_runs_on(&s, &vm, &ends, "a post-copy the destination never committed");
}

#[test]
fn a_link_cut_before_the_commit_is_resumed_and_nothing_is_lost() {
    let (outcome, outages, total, _) = one_resumed_cut(u64::MAX);
    assert_eq!((outcome, outages), (Outcome::Migrated, 0));
    // Cuts spread over the exchange up to the last round: each is resumed
    // (the hello has been heard), and what crosses in all is the whole run
    // and a little more: the reconnection (a few KiB of handshake and
    // resume point) and what was in flight at the cut. (This guest's memory
    // compresses ~1000:1, so a run is only ~10 KiB: the fixed costs
    // dominate here; tests/integration/wan.rs measures the ratio on a real
    // guest.)
    let cuts: Vec<u64> = (1..12).map(|i| total * i / 13).collect();
    let runs: Vec<(u64, Resumed)> = cuts
        .chunks(cuts.len().div_ceil(4))
        .map(|part| {
            std::thread::spawn({
                let part = part.to_vec();
                move || part.into_iter().map(|c| (c, one_resumed_cut(c))).collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .flat_map(|t| t.join().expect("a cut run"))
        .collect();
    for (cut, (outcome, outages, crossed, error)) in runs {
        eprintln!(
            "cut at {cut}: {outcome:?} after {outages} outage(s), {crossed} bytes ({:.3}x)",
            crossed as f64 / total as f64
        );
        assert_eq!((outcome, outages), (Outcome::Migrated, 1), "cut at {cut}: {error:?}");
        assert!(
            crossed <= total + total / 4 + 16 * 1024,
            "cut at {cut}: {crossed} bytes crossed, {total} in a run without a cut"
        );
    }
}

/// Pages read at the destination during a post-copy: (frame, bytes).
type Touched = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

/// Builds nothing real and touches no guest memory: keeps the RAM (read
/// once the migration is over), so a post-copy's pages arrive after the
/// guest "runs". With `cut`, the link is cut `after` the start.
struct LazyHost {
    cut: Option<(wanmig_transport::mem::Link, Duration)>,
    /// Once started, a thread reads every 5th page from the top down (as
    /// a vCPU would, faulting on what is missing); what it read comes here.
    touched: Option<Touched>,
}

impl VmHost for LazyHost {
    type Vm = Built;

    fn build(
        &mut self,
        _config: &VmConfig,
        ram: GuestRam,
        state: &[u8],
        _disks: Option<Vec<std::fs::File>>,
    ) -> Result<Built, String> {
        Ok(Built { ram: Vec::new(), state: state.to_vec(), disks: Vec::new(), running: false, kept: Some(ram) })
    }

    fn start(&mut self, vm: &mut Built, disks: &[PathBuf], paused: bool) -> Result<(), String> {
        vm.disks = disks.to_vec();
        vm.running = !paused;
        if let (Some(out), Some(ram)) = (self.touched.clone(), vm.kept.as_ref()) {
            let mem = ram.mem().clone();
            let pages = ram.size() / PAGE_SIZE as u64;
            // Named as the VMM names a vCPU thread: its blocked time is vCPU 0's.
            let reader = std::thread::Builder::new().name("vcpu0".into());
            reader
                .spawn(move || {
                    for p in (0..pages).rev().step_by(5) {
                        let mut b = vec![0u8; PAGE_SIZE];
                        mem.read_slice(&mut b, GuestAddress(p * PAGE_SIZE as u64)).expect("in RAM");
                        out.lock().expect("lock").push((p, b));
                        // A guest that works a while on each page.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
                .expect("reader thread");
        }
        if let Some((link, after)) = self.cut.take() {
            std::thread::spawn(move || {
                std::thread::sleep(after);
                link.cut();
            });
        }
        Ok(())
    }
}

/// One migration to a [`LazyHost`]; the link is cut `cut` after the guest
/// starts at the destination.
async fn migrate_lazy(
    s: &Setup,
    vm: &mut FakeVm,
    steer: &Steering,
    cut: Option<Duration>,
    touched: Option<Touched>,
) -> Ends {
    let (src, dst, link) = Conn::mem_pair();
    let mut host = LazyHost { cut: cut.map(|d| (link, d)), touched };
    let (mut quiet_src, mut quiet_dst) = (|_: &wanmig_migrate::report::Progress| {}, |_: String| {});
    let mut connector = no_resume();
    let sending = send_on(src, &mut connector, vm, &s.send, steer, &mut quiet_src);
    let receiving = receive_on(dst, &s.receive, &mut host, &mut quiet_dst);
    let ((outcome, summary, _), received) = tokio::join!(sending, receiving);
    let (received, dest_error) = match received {
        Ok(r) => (r.map(|(vm, _)| vm), None),
        Err(e) => (None, Some(wanmig_types::error_chain(&e))),
    };
    Ends { outcome, error: summary.error, postcopy: summary.postcopy, received, dest_error }
}

#[test]
fn postcopy_now_moves_the_guest_first_and_every_page_follows() {
    let mut s = setup();
    s.send.postcopy = PostcopyMode::Now;
    let mut vm = FakeVm::new(&s.src_dir);
    std::thread::sleep(Duration::from_millis(100));
    let touched = Arc::new(Mutex::new(Vec::new()));
    // Uncompressed and capped (16 MiB in about a second): the reader
    // faults on pages the push has not reached.
    s.send.compress = false;
    let steer =
        Steering::new(Tunables { downtime: Duration::from_millis(200), max_bandwidth: Some(16.0 * MIB as f64) });
    let ends = runtime().block_on(migrate_lazy(&s, &mut vm, &steer, None, Some(touched.clone())));
    assert_eq!(ends.outcome, Outcome::Migrated, "{:?} / {:?}", ends.error, ends.dest_error);
    let got = ends.received.expect("the destination owns the VM");
    let kept = got.kept.as_ref().expect("the RAM");
    let mut ram = vec![0u8; kept.size() as usize];
    kept.mem().read_slice(&mut ram, GuestAddress(0)).expect("read");
    let (at_pause, disk) = vm.at_pause.clone().expect("paused once");
    assert!(ram == at_pause, "the destination's RAM is the source's at the pause");
    assert!(std::fs::read(&got.disks[0]).expect("image") == disk, "the disk was copied whole before the switch");
    assert!(vm.guest.paused.load(Ordering::SeqCst) && !vm.disks_owned, "the source never runs it again");
    let pc = ends.postcopy.expect("post-copy figures");
    assert_eq!(pc.missing_pages, 16 * MIB / PAGE_SIZE as u64, "with `now` every page moves after the guest");
    let dest = pc.dest.clone().expect("the destination's report");
    assert_eq!(dest.requested + dest.pushed, pc.missing_pages, "each page placed once: {dest:?}");
    assert!(dest.faults > 0 && dest.requested > 0 && pc.requests_served > 0, "the reader faulted: {pc:?}");
    assert!(dest.service_p50_us > 0 && dest.service_max_us >= dest.service_p99_us, "{dest:?}");
    assert!(dest.vcpu_blocked_us.len() == 1 && dest.vcpu_blocked_us[0] > 0, "vCPU 0 waited: {dest:?}");
    // What the reader saw while pages were missing is what the source had.
    let all = (16 * MIB / PAGE_SIZE as u64).div_ceil(5) as usize;
    let finished = (0..1000).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        touched.lock().expect("lock").len() == all
    });
    assert!(finished, "the reader finished");
    let touched = touched.lock().expect("lock");
    for (p, b) in touched.iter() {
        let at = *p as usize * PAGE_SIZE;
        assert!(b[..] == at_pause[at..at + PAGE_SIZE], "page {p} as read during post-copy");
    }
    eprintln!("post-copy in memory: {pc:?}");
    let rec = SourceJournal::new(&s.src_dir, "fake").read().expect("journal").expect("a record");
    assert_eq!(rec.phase, SourcePhase::Migrated);
    let dest = DestJournal::new(&s.dst_dir).read(rec.migration_id).expect("journal").expect("a record");
    assert_eq!(dest.phase, DestPhase::Committed);
}

#[test]
fn a_destination_lost_in_postcopy_leaves_the_guest_paused_at_the_source() {
    let mut s = setup();
    s.send.postcopy = PostcopyMode::Now;
    // Uncompressed (the fake guest's pages compress to nothing).
    s.send.compress = false;
    // A guest that writes only when harvested: its disk writes do not keep
    // the capped disk rounds going.
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    // 16 MiB pushed at 4 MiB/s: the cut comes long before the last page.
    let steer = Steering::new(Tunables { downtime: Duration::from_millis(200), max_bandwidth: Some(4.0 * MIB as f64) });
    let ends = runtime().block_on(migrate_lazy(&s, &mut vm, &steer, Some(Duration::from_millis(300)), None));
    assert_eq!(ends.outcome, Outcome::PostcopyLost, "{:?} / {:?}", ends.error, ends.dest_error);
    let error = ends.error.unwrap_or_default();
    assert!(error.contains("post-copy lost") && error.contains("NOT resumed"), "{error}");
    assert!(ends.received.is_none() && ends.dest_error.is_some(), "the destination lost the guest");
    assert!(vm.guest.paused.load(Ordering::SeqCst) && !vm.disks_owned, "the source must not run the guest");
    let rec = SourceJournal::new(&s.src_dir, "fake").read().expect("journal").expect("a record");
    assert_eq!(rec.phase, SourcePhase::CommitSent, "not migrated, not taken back");
    let pc = ends.postcopy.expect("post-copy figures");
    assert!(pc.dest.is_none() && pc.pages_pushed < pc.missing_pages, "{pc:?}");
}

#[test]
fn a_link_cut_during_postcopy_is_resumed_and_every_page_arrives() {
    let mut s = setup();
    s.send.postcopy = PostcopyMode::Now;
    s.send.compress = false;
    s.send.resume_window = Duration::from_secs(30);
    let mut vm = FakeVm::deterministic(&s.src_dir, 300);
    // 16 MiB at 4 MiB/s; the link is cut 300 ms after the guest started there.
    let steer = Steering::new(Tunables { downtime: Duration::from_millis(200), max_bandwidth: Some(4.0 * MIB as f64) });
    let touched: Touched = Arc::new(Mutex::new(Vec::new()));
    let (src, dst, link) = Conn::mem_pair();
    let mut host = LazyHost { cut: Some((link.clone(), Duration::from_millis(300))), touched: Some(touched.clone()) };
    let ResumableRun { outcome, summary, received, .. } =
        run_resumable(&s, &mut vm, &mut host, &steer, (src, dst, link));
    let dest_error = received.as_ref().err().map(|e| wanmig_types::error_chain(e));
    assert_eq!(outcome, Outcome::Migrated, "{:?} / {dest_error:?}", summary.error);
    assert_eq!(summary.outages, 1, "one outage, ridden out");
    let (got, _) = received.expect("received").expect("the destination owns the VM");
    let kept = got.kept.as_ref().expect("the RAM");
    let mut ram = vec![0u8; kept.size() as usize];
    kept.mem().read_slice(&mut ram, GuestAddress(0)).expect("read");
    let (at_pause, _) = vm.at_pause.clone().expect("paused once");
    assert!(ram == at_pause, "the destination's RAM is the source's at the pause");
    for (p, b) in touched.lock().expect("lock").iter() {
        let at = *p as usize * PAGE_SIZE;
        assert!(b[..] == at_pause[at..at + PAGE_SIZE], "page {p} as read during post-copy");
    }
    let pc = summary.postcopy.expect("figures");
    eprintln!("resumed post-copy: {pc:?}, {} bytes sent again", summary.resent_bytes);
    assert!(pc.dest.is_some_and(|d| d.requested + d.pushed >= pc.missing_pages));
}

/// A pseudo-random MiB (incompressible, no zero chunk).
fn noise(seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One sync of `vm` over a fresh in-memory link: its outcome and summary.
fn sync_once(s: &Setup, vm: &mut FakeVm) -> (Outcome, wanmig_migrate::report::Summary, Option<String>) {
    runtime().block_on(async {
        let (src, dst, _link) = Conn::mem_pair();
        let (mut quiet_src, mut quiet_dst) = (|_: &wanmig_migrate::report::Progress| {}, |_: String| {});
        let mut connector = no_resume();
        let (mut host, steer) = (FakeHost { refuse: false }, tunables());
        let sending = send_on(src, &mut connector, vm, &s.send, &steer, &mut quiet_src);
        let receiving = receive_on(dst, &s.receive, &mut host, &mut quiet_dst);
        let ((outcome, summary, _), received) = tokio::join!(sending, receiving);
        (outcome, summary, received.err().map(|e| wanmig_types::error_chain(&e)))
    })
}

#[test]
fn a_sync_from_the_destinations_epoch_sends_written_blocks_and_long_runs_as_chunks_it_may_hold() {
    let mut s = setup();
    s.send.sync = true;
    let mut vm = FakeVm::deterministic(&s.src_dir, 4);
    // A file the first sync carries (its chunks go into the destination's store).
    let file = noise(7);
    vm.guest.disk.write_all_at(&file, 0).expect("write");
    vm.guest.log.record(0, file.len());
    let (outcome, first, err) = sync_once(&s, &mut vm);
    assert_eq!(outcome, Outcome::Synced, "{:?} / {err:?}", first.error);
    let since: MigrationId = first.migration_id.parse().expect("an id");

    // Then the guest copies that file elsewhere (a long run the store may
    // hold) and writes a few scattered blocks; the write tracking knows both.
    let mut written = vec![0u64; (DISK / 4096 / 64) as usize];
    let mut write = |vm: &FakeVm, at: u64, data: &[u8]| {
        vm.guest.disk.write_all_at(data, at).expect("write");
        vm.guest.log.record(at, data.len());
        for b in at / 4096..(at + data.len() as u64).div_ceil(4096) {
            written[(b / 64) as usize] |= 1 << (b % 64);
        }
    };
    write(&vm, 2 * MIB, &file);
    for b in [5u64, 300, 301, 900] {
        write(&vm, b * 4096, &[0xa5; 4096]);
    }
    s.send.disk_bases = vec![Some(wanmig_migrate::source::DiskBase { since, written })];
    let (outcome, second, err) = sync_once(&s, &mut vm);
    assert_eq!(outcome, Outcome::Synced, "{:?} / {err:?}", second.error);
    let d = second.disk.as_ref().expect("disk stats");
    assert_eq!(d.from_base, 1, "{d:?}");
    assert!(d.chunks > 0 && d.chunks_present > 0, "the copied file went as chunks, some already there: {d:?}");
    assert!(d.chunk_bytes_sent < MIB, "{d:?}");
    let (_, at_pause) = vm.at_pause.clone().expect("paused");
    assert!(
        std::fs::read(s.dst_dir.join("disk.img")).expect("replica") == at_pause,
        "the replica is the source's image"
    );
    let first_disk = first.bytes.disk;
    eprintln!(
        "first sync {first_disk} disk bytes; from its epoch {} ({} chunks, {} already there, {} bytes of chunks, {} of blocks)",
        second.bytes.disk, d.chunks, d.chunks_present, d.chunk_bytes_sent, d.extent_bytes
    );
    assert!(second.bytes.disk < first_disk / 2, "{} of {first_disk}", second.bytes.disk);

    // A base the destination does not hold: a first copy, still right.
    s.send.disk_bases = vec![Some(wanmig_migrate::source::DiskBase { since: MigrationId::new(), written: Vec::new() })];
    let (outcome, third, err) = sync_once(&s, &mut vm);
    assert_eq!(outcome, Outcome::Synced, "{:?} / {err:?}", third.error);
    assert_eq!(third.disk.as_ref().expect("disk stats").from_base, 0);
    let (_, at_pause) = vm.at_pause.clone().expect("paused");
    assert!(
        std::fs::read(s.dst_dir.join("disk.img")).expect("replica") == at_pause,
        "the replica is the source's image"
    );
}
