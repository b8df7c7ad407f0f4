//! A user-space WAN link emulator: test and benchmark infrastructure, not
//! part of the tunnel.
//!
//! Where netem is missing, [`LinkEmulator`] stands in for a routed WAN link
//! between two network namespaces: it opens a TAP device in each (in a
//! thread that entered that namespace) and forwards every Ethernet frame
//! between them with a one-way delay, a rate limit (frames leave at the
//! link's rate, behind a bounded queue that drops its tail when full, as a
//! router's would), and random loss from a seeded generator, so a run can
//! be repeated. The TAP devices exist as long as the emulator; the caller
//! gives them addresses and brings them up (`ip -n NS addr add … dev TAP`).
//!
//! Each direction is two threads: one reads frames and stamps each with the
//! time it is due, one sleeps until then and writes it out.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The emulated link, the same both ways.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub delay: Duration,
    /// Rate in bits/s; 0 for no limit.
    pub rate_bps: u64,
    /// Probability that a frame is lost, 0.0 to 1.0.
    pub loss: f64,
    /// Seed of the loss generator.
    pub seed: u64,
    /// Bytes the queue before the rate limit holds before it drops.
    pub queue_bytes: usize,
}

impl Default for LinkParams {
    /// No delay, no rate limit, no loss, a 1 MiB queue.
    fn default() -> Self {
        LinkParams { delay: Duration::ZERO, rate_bps: 0, loss: 0.0, seed: 1, queue_bytes: 1 << 20 }
    }
}

/// Frames one direction of the link handled.
#[derive(Debug, Default)]
pub struct DirectionStats {
    /// Delivered.
    pub forwarded: AtomicU64,
    /// Lost at random.
    pub lost: AtomicU64,
    /// Dropped by a full queue.
    pub overflowed: AtomicU64,
}

/// A running emulated link between two TAP devices.
#[derive(Debug)]
pub struct LinkEmulator {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// A to B, then B to A.
    pub stats: [Arc<DirectionStats>; 2],
}

/// Makes the calling thread enter network namespace `ns` (as created by
/// `ip netns add`).
pub fn enter_netns(ns: &str) -> io::Result<()> {
    if ns.is_empty() || ns.contains('/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{ns}` is not a namespace name")));
    }
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: `f` is an open namespace file for the duration of the call;
    // setns changes only the calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread inside network namespace `ns`, and returns what
/// it returns: sockets it opens belong to that namespace, and threads it
/// starts begin there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        Ok(f())
    })
    .join()
    .map_err(|_| io::Error::other("the thread inside the namespace panicked"))?
}

/// Opens (creating) TAP device `name` in the calling thread's namespace.
fn open_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > 15 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not an interface name")));
    }
    let path = CString::new("/dev/net/tun").expect("no NUL");
    // SAFETY: `path` is NUL-terminated and outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // struct ifreq: the name, then the flags (a short) in the union.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: `ifr` is a 40-byte struct ifreq the kernel reads and may
    // write back (the name), exclusively borrowed for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF as _, ifr.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// xorshift64*: small, fast, and the same sequence for the same seed.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// When frames leave a rate-limited queue, and whether they fit in it.
#[derive(Debug)]
struct Shaper {
    params: LinkParams,
    free_at: Instant,
}

impl Shaper {
    /// The time a frame of `len` bytes arriving `now` is delivered, or
    /// `None` if the queue is full.
    fn admit(&mut self, now: Instant, len: usize) -> Option<Instant> {
        if self.params.rate_bps == 0 {
            return Some(now + self.params.delay);
        }
        let rate = u128::from(self.params.rate_bps);
        let start = self.free_at.max(now);
        let backlog = start.duration_since(now).as_nanos() * rate / 8 / 1_000_000_000;
        if backlog + len as u128 > self.params.queue_bytes as u128 {
            return None;
        }
        let ns = (len as u128 * 8 * 1_000_000_000).div_ceil(rate);
        self.free_at = start + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        Some(self.free_at + self.params.delay)
    }
}

fn poll_readable(fd: &OwnedFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, exclusively borrowed for the call.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
    }
    Ok(r > 0)
}

fn direction(
    from: Arc<OwnedFd>,
    to: Arc<OwnedFd>,
    params: LinkParams,
    seed: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<DirectionStats>,
) -> [JoinHandle<()>; 2] {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let reader = {
        let (stop, stats) = (stop.clone(), stats.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut shaper = Shaper { params, free_at: Instant::now() };
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match poll_readable(&from, 50) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => return,
                }
                // SAFETY: `buf` is a live, exclusively borrowed buffer of its length.
                let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    continue;
                }
                let now = Instant::now();
                if params.loss > 0.0 && rng.next_f64() < params.loss {
                    stats.lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match shaper.admit(now, n as usize) {
                    Some(due) => {
                        if tx.send((due, buf[..n as usize].to_vec())).is_err() {
                            return;
                        }
                    }
                    None => {
                        stats.overflowed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let writer = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let (due, frame) = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(f) => f,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let wait = due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            // SAFETY: `frame` is a live buffer of its length, only read.
            let n = unsafe { libc::write(to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n > 0 {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    [reader, writer]
}

impl LinkEmulator {
    /// Creates TAP device `tap_a` in namespace `ns_a` and `tap_b` in `ns_b`
    /// and forwards frames between them as `params` says.
    pub fn start(ns_a: &str, tap_a: &str, ns_b: &str, tap_b: &str, params: LinkParams) -> io::Result<LinkEmulator> {
        if !(0.0..=1.0).contains(&params.loss) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "loss must be within 0.0..=1.0"));
        }
        let name = tap_a.to_string();
        let a = Arc::new(in_netns(ns_a, move || open_tap(&name))??);
        let name = tap_b.to_string();
        let b = Arc::new(in_netns(ns_b, move || open_tap(&name))??);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = [Arc::new(DirectionStats::default()), Arc::new(DirectionStats::default())];
        let mut threads = Vec::new();
        threads.extend(direction(a.clone(), b.clone(), params, params.seed, stop.clone(), stats[0].clone()));
        threads.extend(direction(b, a, params, params.seed ^ 0x9e37_79b9_7f4a_7c15, stop.clone(), stats[1].clone()));
        Ok(LinkEmulator { stop, threads, stats })
    }
}

impl Drop for LinkEmulator {
    /// Stops the threads; the TAP devices go with their last descriptor.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_seeded_and_near_its_rate() {
        let draw = |seed| {
            let mut r = Rng::new(seed);
            (0..10_000).filter(|_| r.next_f64() < 0.1).count()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        assert!((800..1200).contains(&draw(7)), "{}", draw(7));
    }

    #[test]
    fn the_shaper_paces_and_drops_its_tail() {
        let t0 = Instant::now();
        let params = LinkParams {
            delay: Duration::from_millis(20),
            rate_bps: 8_000_000, // 1 byte/µs
            queue_bytes: 3000,
            ..LinkParams::default()
        };
        let mut s = Shaper { params, free_at: t0 };
        // Back to back: each 1000-byte frame leaves 1 ms after the last.
        let due: Vec<_> = (0..3).map(|_| s.admit(t0, 1000).expect("fits")).collect();
        let ms: Vec<_> = due.iter().map(|d| d.duration_since(t0).as_micros()).collect();
        assert_eq!(ms, vec![21_000, 22_000, 23_000]);
        // The queue holds 3000 bytes: a fourth does not fit, until it drains.
        assert_eq!(s.admit(t0, 1000), None);
        assert!(s.admit(t0 + Duration::from_millis(2), 1000).is_some());
        // No rate: only the delay.
        let mut free = Shaper { params: LinkParams { rate_bps: 0, ..params }, free_at: t0 };
        assert_eq!(free.admit(t0, 9000), Some(t0 + Duration::from_millis(20)));
    }
}
