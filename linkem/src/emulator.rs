//! The running emulator: two TAP devices, one thread per direction, a
//! control handle and counters.
//!
//! Each direction is one thread that loops over three steps: write out
//! every frame whose delivery instant has come (a delay line in arrival
//! order, which is delivery order since the link keeps order), wait in
//! `ppoll` with a nanosecond timeout until the next such instant or until
//! the input TAP is readable, then read up to [`BATCH`] frames without
//! blocking and ask the [`DirectionModel`] about each. No timer wheel is
//! involved (tokio's timers have 1 ms granularity): the thread's own
//! `ppoll` wakes it, within the kernel's timer slack (50 µs by default),
//! and everything due by then leaves in one go. Pacing is exact on average
//! whatever the wake-up latency, because each frame's instant comes from
//! the model, not from when the thread got to it; a late wake-up shows as
//! a small burst.
//!
//! A TAP hands over one frame per `read` (there is no `recvmmsg` for
//! character devices); batching here means draining everything readable
//! before sleeping again.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::model::{DirectionModel, LinkParams, OutageSchedule, ParamsError, Verdict};
use crate::netns::{NetnsError, in_netns};

/// Frames read in one go before the due ones are written again.
pub const BATCH: usize = 64;

/// Longest sleep of an idle direction (it checks for stop then).
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// Length the TAP devices' transmit rings are set to (frames the kernel
/// holds for the emulator to read; tun's default is 500). Frames the
/// kernel drops there are counted by [`LinkEmulator::kernel_drops`].
pub const TAP_QUEUE_FRAMES: i32 = 4096;

/// Errors of the emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The parameters do not make a link.
    #[error("invalid parameters for the {0} direction")]
    Params(Direction, #[source] ParamsError),
    /// A namespace could not be entered.
    #[error("namespace")]
    Netns(#[from] NetnsError),
    /// A TAP device could not be created.
    #[error("cannot create TAP device `{name}`")]
    OpenTap {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the emulator's thread")]
    Thread(#[source] io::Error),
    /// The kernel's interface counters could not be read.
    #[error("cannot read the kernel's counters of `{name}`")]
    KernelCounters {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the first TAP (side A) to the second.
    AtoB,
    /// From the second TAP (side B) to the first.
    BtoA,
}

impl Direction {
    /// Both, A to B first.
    pub const BOTH: [Direction; 2] = [Direction::AtoB, Direction::BtoA];

    fn index(self) -> usize {
        match self {
            Direction::AtoB => 0,
            Direction::BtoA => 1,
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Direction::AtoB => "A→B",
            Direction::BtoA => "B→A",
        })
    }
}

/// The whole link: both directions' parameters, the seed, the scripted
/// outages.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Side A to side B.
    pub a_to_b: LinkParams,
    /// Side B to side A.
    pub b_to_a: LinkParams,
    /// Seed of the loss and jitter generators (each direction derives its
    /// own from it).
    pub seed: u64,
    /// Scripted outages, from the emulator's start.
    pub outages: OutageSchedule,
}

impl LinkConfig {
    /// The same parameters both ways, seed 1, no outages.
    pub fn symmetric(params: LinkParams) -> Self {
        LinkConfig { a_to_b: params, b_to_a: params, seed: 1, outages: OutageSchedule::none() }
    }

    /// Different parameters each way, seed 1, no outages.
    pub fn asymmetric(a_to_b: LinkParams, b_to_a: LinkParams) -> Self {
        LinkConfig { a_to_b, b_to_a, seed: 1, outages: OutageSchedule::none() }
    }

    /// The same with another seed.
    pub fn with_seed(self, seed: u64) -> Self {
        LinkConfig { seed, ..self }
    }

    /// The same with scripted outages.
    pub fn with_outages(self, outages: OutageSchedule) -> Self {
        LinkConfig { outages, ..self }
    }

    fn params(&self, d: Direction) -> LinkParams {
        match d {
            Direction::AtoB => self.a_to_b,
            Direction::BtoA => self.b_to_a,
        }
    }
}

impl Default for LinkConfig {
    /// A perfect link: no delay, no rate limit, no loss.
    fn default() -> Self {
        LinkConfig::symmetric(LinkParams::default())
    }
}

#[derive(Debug, Default)]
struct DirectionStats {
    forwarded: AtomicU64,
    forwarded_bytes: AtomicU64,
    lost: AtomicU64,
    lost_bytes: AtomicU64,
    overflowed: AtomicU64,
    overflowed_bytes: AtomicU64,
    dropped_down: AtomicU64,
    dropped_down_bytes: AtomicU64,
    write_errors: AtomicU64,
    /// Nanoseconds since the start, plus one (0: none yet).
    first_forward: AtomicU64,
    last_forward: AtomicU64,
}

fn add(c: &AtomicU64, frames: &AtomicU64, len: usize) {
    frames.fetch_add(1, Ordering::Relaxed);
    c.fetch_add(len as u64, Ordering::Relaxed);
}

/// What one direction did so far (a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Frames delivered.
    pub forwarded: u64,
    /// Their bytes.
    pub forwarded_bytes: u64,
    /// Frames lost at random.
    pub lost: u64,
    /// Their bytes.
    pub lost_bytes: u64,
    /// Frames dropped by the full queue.
    pub overflowed: u64,
    /// Their bytes.
    pub overflowed_bytes: u64,
    /// Frames dropped because the link was down when they entered it or
    /// when they were due.
    pub dropped_down: u64,
    /// Their bytes.
    pub dropped_down_bytes: u64,
    /// Frames the output TAP refused (its interface down, say).
    pub write_errors: u64,
    /// When the first frame was delivered, from the emulator's start.
    pub first_forward: Option<Duration>,
    /// When the last frame was delivered, from the emulator's start.
    pub last_forward: Option<Duration>,
    /// When this snapshot was taken.
    pub at: Instant,
}

impl Counters {
    /// Bits/s delivered between `earlier` (a snapshot of the same
    /// direction) and this one.
    pub fn rate_bps_since(&self, earlier: &Counters) -> f64 {
        let secs = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        if secs == 0.0 {
            return 0.0;
        }
        self.forwarded_bytes.saturating_sub(earlier.forwarded_bytes) as f64 * 8.0 / secs
    }

    /// Bits/s delivered between the first and the last delivered frame:
    /// the achieved rate of a direction that was kept busy.
    pub fn achieved_bps(&self) -> f64 {
        match (self.first_forward, self.last_forward) {
            (Some(a), Some(b)) if b > a => self.forwarded_bytes as f64 * 8.0 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

#[derive(Debug)]
struct Shared {
    start: Instant,
    manual_down: AtomicBool,
    /// End of the current `outage_for`, nanoseconds since the start.
    outage_until: AtomicU64,
    schedule: OutageSchedule,
    params: Mutex<[LinkParams; 2]>,
    params_gen: AtomicU64,
    stats: [DirectionStats; 2],
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn since_start(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.start)
    }

    fn is_down(&self, now: Instant) -> bool {
        if self.manual_down.load(Ordering::Relaxed) {
            return true;
        }
        let t = self.since_start(now);
        (t.as_nanos() as u64) < self.outage_until.load(Ordering::Relaxed) || self.schedule.is_down(t)
    }

    fn params(&self, d: Direction) -> LinkParams {
        self.params.lock().map(|p| p[d.index()]).unwrap_or_else(|p| p.into_inner()[d.index()])
    }

    fn counters(&self, d: Direction) -> Counters {
        let s = &self.stats[d.index()];
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let t = |c: &AtomicU64| match c.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns - 1)),
        };
        Counters {
            forwarded: r(&s.forwarded),
            forwarded_bytes: r(&s.forwarded_bytes),
            lost: r(&s.lost),
            lost_bytes: r(&s.lost_bytes),
            overflowed: r(&s.overflowed),
            overflowed_bytes: r(&s.overflowed_bytes),
            dropped_down: r(&s.dropped_down),
            dropped_down_bytes: r(&s.dropped_down_bytes),
            write_errors: r(&s.write_errors),
            first_forward: t(&s.first_forward),
            last_forward: t(&s.last_forward),
            at: Instant::now(),
        }
    }
}

/// Controls a running emulator from any thread: cut the link, restore it,
/// change its parameters. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LinkControl {
    shared: Arc<Shared>,
}

impl LinkControl {
    /// Takes the link down (`true`) or brings it back (`false`), both
    /// directions at once, from the next frame on. While down, frames
    /// entering the link and frames falling due are dropped, as on a cut
    /// fibre; nothing is queued for later. A scripted outage or an
    /// [`LinkControl::outage_for`] still applies while this says up.
    pub fn set_down(&self, down: bool) {
        self.shared.manual_down.store(down, Ordering::Relaxed);
    }

    /// Takes the link down from now for `duration` (extending an outage
    /// in progress if that ends later).
    pub fn outage_for(&self, duration: Duration) {
        let until = self.shared.since_start(Instant::now()).saturating_add(duration);
        self.shared.outage_until.fetch_max(u64::try_from(until.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Ends an outage started by [`LinkControl::outage_for`] now.
    pub fn end_outage(&self) {
        self.shared.outage_until.store(0, Ordering::Relaxed);
    }

    /// Whether the link is down now (for any reason).
    pub fn is_down(&self) -> bool {
        self.shared.is_down(Instant::now())
    }

    /// Changes one direction's parameters from the next frame on.
    pub fn set_params(&self, d: Direction, params: LinkParams) -> Result<(), EmulatorError> {
        params.validate().map_err(|e| EmulatorError::Params(d, e))?;
        {
            let mut p = self.shared.params.lock().unwrap_or_else(|p| p.into_inner());
            p[d.index()] = params;
        }
        self.shared.params_gen.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Changes both directions' parameters to `params`.
    pub fn set_params_both(&self, params: LinkParams) -> Result<(), EmulatorError> {
        Direction::BOTH.iter().try_for_each(|&d| self.set_params(d, params))
    }

    /// One direction's parameters.
    pub fn params(&self, d: Direction) -> LinkParams {
        self.shared.params(d)
    }

    /// A snapshot of one direction's counters.
    pub fn counters(&self, d: Direction) -> Counters {
        self.shared.counters(d)
    }

    /// Time since the emulator started: the clock of its outage schedule.
    pub fn elapsed(&self) -> Duration {
        self.shared.start.elapsed()
    }

    /// Why a direction's thread stopped early (a TAP read failed), if one did.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.lock().ok()?.clone()
    }
}

/// Opens (creating) TAP device `name` in the calling thread's namespace,
/// non-blocking, and sets its transmit ring to [`TAP_QUEUE_FRAMES`].
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not an interface name")));
    }
    let path = CString::new("/dev/net/tun").expect("no NUL in a literal");
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then the union (flags: a short; qlen: an int).
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `ifr` is a 40-byte struct ifreq the kernel reads and may
    // write back (the name), exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    ifr[16..20].copy_from_slice(&TAP_QUEUE_FRAMES.to_ne_bytes());
    // SAFETY: as above; SIOCSIFTXQLEN reads the name and the int after it.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFTXQLEN as _, ifr.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Waits until `fd` is readable or `timeout` passed; `Ok(false)` on a
/// timeout or a signal.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: one valid pollfd and a valid timespec, borrowed for the call;
    // no signal mask is passed.
    let r = unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    if r > 0 && p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
        return Err(io::Error::other(format!("poll reported revents {:#x}", p.revents)));
    }
    Ok(r > 0)
}

/// One direction's thread.
struct Pump {
    d: Direction,
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    shared: Arc<Shared>,
    model: DirectionModel,
    line: VecDeque<(Instant, Vec<u8>)>,
    pool: Vec<Vec<u8>>,
}

impl Pump {
    fn stats(&self) -> &DirectionStats {
        &self.shared.stats[self.d.index()]
    }

    /// Writes out every frame due at `now`.
    fn release(&mut self, now: Instant) {
        let down = self.shared.is_down(now);
        while let Some((due, _)) = self.line.front() {
            if *due > now {
                break;
            }
            let (_, frame) = self.line.pop_front().expect("front exists");
            let stats = &self.shared.stats[self.d.index()];
            if down {
                add(&stats.dropped_down_bytes, &stats.dropped_down, frame.len());
            } else {
                // SAFETY: `frame` is a live buffer of its length, only read.
                let n = unsafe { libc::write(self.to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
                if n == frame.len() as isize {
                    add(&stats.forwarded_bytes, &stats.forwarded, frame.len());
                    let t = self.shared.since_start(now).as_nanos() as u64 + 1;
                    let _ = stats.first_forward.compare_exchange(0, t, Ordering::Relaxed, Ordering::Relaxed);
                    stats.last_forward.store(t, Ordering::Relaxed);
                } else {
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.pool.push(frame);
        }
    }

    /// Reads up to BATCH frames; `Err` when the input TAP failed.
    fn read_batch(&mut self, scratch: &mut [u8]) -> io::Result<()> {
        for _ in 0..BATCH {
            // SAFETY: `scratch` is a live, exclusively borrowed buffer of its length.
            let n = unsafe { libc::read(self.from.as_raw_fd(), scratch.as_mut_ptr().cast(), scratch.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    _ => Err(e),
                };
            }
            let len = n as usize;
            if len == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if self.shared.is_down(now) {
                let s = self.stats();
                add(&s.dropped_down_bytes, &s.dropped_down, len);
                continue;
            }
            match self.model.admit(now, len) {
                Verdict::Deliver(due) => {
                    let mut buf = self.pool.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(&scratch[..len]);
                    self.line.push_back((due, buf));
                }
                Verdict::Lost => {
                    let s = self.stats();
                    add(&s.lost_bytes, &s.lost, len);
                }
                Verdict::Overflow => {
                    let s = self.stats();
                    add(&s.overflowed_bytes, &s.overflowed, len);
                }
            }
        }
        Ok(())
    }

    fn run(mut self) {
        let mut generation = self.shared.params_gen.load(Ordering::Acquire);
        let mut scratch = vec![0u8; 65536];
        while !self.shared.stop.load(Ordering::Relaxed) {
            let g = self.shared.params_gen.load(Ordering::Acquire);
            if g != generation {
                generation = g;
                // Validated by set_params.
                let _ = self.model.set_params(self.shared.params(self.d));
            }
            let now = Instant::now();
            self.release(now);
            let wait =
                self.line.front().map_or(IDLE_WAIT, |(due, _)| due.saturating_duration_since(now).min(IDLE_WAIT));
            let result = if wait.is_zero() { Ok(true) } else { wait_readable(&self.from, wait) };
            let result = result.and_then(|readable| if readable { self.read_batch(&mut scratch) } else { Ok(()) });
            if let Err(e) = result {
                if let Ok(mut f) = self.shared.failure.lock() {
                    f.get_or_insert_with(|| format!("{}: {e}", self.d));
                }
                return;
            }
        }
    }
}

/// A running emulated link between two TAP devices.
#[derive(Debug)]
pub struct LinkEmulator {
    control: LinkControl,
    threads: Vec<JoinHandle<()>>,
    taps: [(String, String); 2],
}

impl LinkEmulator {
    /// Creates TAP device `tap_a` in namespace `ns_a` and `tap_b` in
    /// `ns_b` (both must exist) and forwards frames between them as
    /// `config` says. The caller gives the devices addresses and brings
    /// them up (or uses [`crate::WanPair`], which does all of it). The
    /// devices exist as long as the emulator.
    pub fn start(ns_a: &str, tap_a: &str, ns_b: &str, tap_b: &str, config: LinkConfig) -> Result<Self, EmulatorError> {
        let mut models = Vec::new();
        for d in Direction::BOTH {
            let seed = config.seed ^ (d.index() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            models.push(DirectionModel::new(config.params(d), seed).map_err(|e| EmulatorError::Params(d, e))?);
        }
        let open = |ns: &str, tap: &str| -> Result<Arc<OwnedFd>, EmulatorError> {
            let name = tap.to_string();
            let fd = in_netns(ns, move || open_tap(&name))?
                .map_err(|source| EmulatorError::OpenTap { name: format!("{ns}/{tap}"), source })?;
            Ok(Arc::new(fd))
        };
        let a = open(ns_a, tap_a)?;
        let b = open(ns_b, tap_b)?;
        let shared = Arc::new(Shared {
            start: Instant::now(),
            manual_down: AtomicBool::new(false),
            outage_until: AtomicU64::new(0),
            schedule: config.outages.clone(),
            params: Mutex::new([config.a_to_b, config.b_to_a]),
            params_gen: AtomicU64::new(0),
            stats: Default::default(),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let mut emu = LinkEmulator {
            control: LinkControl { shared: shared.clone() },
            threads: Vec::new(),
            taps: [(ns_a.to_string(), tap_a.to_string()), (ns_b.to_string(), tap_b.to_string())],
        };
        for (d, model) in Direction::BOTH.into_iter().zip(models) {
            let (from, to) = match d {
                Direction::AtoB => (a.clone(), b.clone()),
                Direction::BtoA => (b.clone(), a.clone()),
            };
            let pump = Pump { d, from, to, shared: shared.clone(), model, line: VecDeque::new(), pool: Vec::new() };
            let name = match d {
                Direction::AtoB => "linkem-a2b",
                Direction::BtoA => "linkem-b2a",
            };
            // On failure, `emu` drops and stops the thread already started.
            let t = std::thread::Builder::new().name(name.into()).spawn(move || pump.run());
            emu.threads.push(t.map_err(EmulatorError::Thread)?);
        }
        Ok(emu)
    }

    /// A handle to control the link and read its counters.
    pub fn control(&self) -> LinkControl {
        self.control.clone()
    }

    /// Both directions' counters, A to B first.
    pub fn counters(&self) -> [Counters; 2] {
        Direction::BOTH.map(|d| self.control.counters(d))
    }

    /// Frames the kernel dropped before the emulator read them (the TAP's
    /// transmit ring was full: the emulator fell behind), A to B first.
    /// Non-zero means the link dropped more than its parameters say.
    pub fn kernel_drops(&self) -> Result<[u64; 2], EmulatorError> {
        let read = |(ns, tap): &(String, String)| -> Result<u64, EmulatorError> {
            let name = tap.clone();
            let err = |source| EmulatorError::KernelCounters { name: format!("{ns}/{tap}"), source };
            // /proc/thread-self/net is the calling thread's namespace.
            let text = in_netns(ns, || std::fs::read_to_string("/proc/thread-self/net/dev"))?.map_err(err)?;
            tx_dropped(&text, &name).ok_or_else(|| err(io::Error::other("no such interface in /proc/net/dev")))
        };
        Ok([read(&self.taps[0])?, read(&self.taps[1])?])
    }
}

/// The transmit drop count of interface `name` in a `/proc/net/dev` text.
fn tx_dropped(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.trim_start().split(':').next() == Some(name))?;
    let fields: Vec<u64> = line.split(':').nth(1)?.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop …
    fields.get(11).copied()
}

impl Drop for LinkEmulator {
    /// Stops the threads; the TAP devices go with their last descriptor.
    fn drop(&mut self) {
        self.control.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_dev_is_parsed() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
 lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n   \
 wan: 1000      10    0    0    0     0          0         0     2000      20    0   17    0     0       0          0\n";
        assert_eq!(tx_dropped(text, "wan"), Some(17));
        assert_eq!(tx_dropped(text, "lo"), Some(0));
        assert_eq!(tx_dropped(text, "eth0"), None);
    }

    #[test]
    fn counters_give_rates() {
        let t0 = Instant::now();
        let mut a = Counters {
            forwarded: 0,
            forwarded_bytes: 0,
            lost: 0,
            lost_bytes: 0,
            overflowed: 0,
            overflowed_bytes: 0,
            dropped_down: 0,
            dropped_down_bytes: 0,
            write_errors: 0,
            first_forward: None,
            last_forward: None,
            at: t0,
        };
        let b = Counters {
            forwarded_bytes: 125_000_000,
            first_forward: Some(Duration::from_millis(500)),
            last_forward: Some(Duration::from_millis(1500)),
            at: t0 + Duration::from_secs(2),
            ..a
        };
        assert_eq!(b.rate_bps_since(&a), 500e6);
        assert_eq!(b.achieved_bps(), 1e9);
        a.at = b.at;
        assert_eq!(b.rate_bps_since(&a), 0.0);
        assert_eq!(a.achieved_bps(), 0.0);
    }
}
