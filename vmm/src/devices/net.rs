//! virtio-net on a TAP interface.
//!
//! Queue 0 receives (host → guest), queue 1 transmits. The device offers
//! `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` and `VIRTIO_NET_F_STATUS` (link
//! always up) and no offloads, so every buffer is the 12-byte
//! `virtio_net_hdr_v1` — all zeros but `num_buffers = 1` — followed by one
//! whole Ethernet frame, the layout the TAP uses too ([`super::tap`]).
//!
//! - **Transmit** runs on the vCPU thread that wrote `QueueNotify`, like
//!   virtio-blk: each chain is gathered and written to the TAP. A chain that
//!   is not a header plus 14 ..= [`MAX_FRAME`] bytes, has a device-writable
//!   descriptor, or points outside guest memory is completed unsent and
//!   counted in `tx_dropped`.
//! - **Receive** runs wherever the transport's lock is held with RX work
//!   to do: on the NIC's RX thread ([`spawn_rx_thread`]) when the TAP has
//!   frames, and on the vCPU thread when the guest notifies queue 0 (it
//!   posted buffers). Each pass reads frames from the TAP into guest buffers
//!   (at most [`RX_BUDGET`] of them, so the lock is not held for long). A
//!   frame for which the guest has no buffer is held — one frame — and
//!   offered again when the guest notifies queue 0 or [`RX_RETRY`] later;
//!   held longer than [`RX_STALE`], it is dropped and counted. While a frame
//!   is held the RX thread stops reading the TAP, so the TAP's own queue
//!   absorbs bursts, as a NIC's ring would. Every write into guest memory
//!   goes through the `GuestMemory` API, so the VMM's dirty bitmap sees it.
//!
//! **Pause.** The RX thread touches guest memory and queue state only while
//! holding the transport's lock, and only after seeing, under that lock,
//! that the VM is wanted running (the closure given to
//! [`spawn_rx_thread`]; see `Vm::pause` for the barrier that makes this
//! enough). Frames arriving while the VM is paused stay in the TAP; the one
//! held frame, if any, is part of the device's saved state.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::persist::DeviceSnapshot;
pub use super::persist::{NetCounters, NetSnapshot};
use super::tap::{Tap, VNET_HDR_LEN};
use super::virtio_mmio::{VIRTIO_F_VERSION_1, VirtioDevice};
use crate::memory::GuestMem;
use wanmig_types::MacAddr;

/// Virtio device id of a network card.
pub const DEVICE_ID: u32 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue.
pub const RX_QUEUE: usize = 0;
/// The transmit queue.
pub const TX_QUEUE: usize = 1;
/// The device's config space holds the MAC.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// The device's config space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// `virtio_net_hdr.flags`: the checksum is partial (an offload we never offer).
const HDR_F_NEEDS_CSUM: u8 = 1;
/// Largest Ethernet frame either way, without the virtio header: 64 KiB.
pub const MAX_FRAME: usize = 64 * 1024;
/// Shortest Ethernet frame passed on: a header.
pub const MIN_FRAME: usize = 14;
/// Most frames one pass over the receive queue delivers.
pub const RX_BUDGET: usize = 64;
/// How long the RX thread waits before offering a held frame again (when
/// the guest does not notify queue 0 first).
pub const RX_RETRY: Duration = Duration::from_millis(10);
/// A frame held this long for want of a guest buffer is dropped.
pub const RX_STALE: Duration = Duration::from_millis(500);
/// The RX thread's longest sleep when there is nothing to do (how soon it
/// sees that it must stop, should its wake-up be lost).
const RX_IDLE: Duration = Duration::from_millis(200);

/// Errors of the network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The saved NIC is not the configured one.
    #[error("the saved NIC has MAC {saved}, the configured one {configured}")]
    MacMismatch {
        /// MAC in the saved state.
        saved: MacAddr,
        /// MAC configured.
        configured: MacAddr,
    },
    /// The saved held frame cannot be a frame.
    #[error("the saved NIC holds a frame of {0} bytes, outside {min}..={max}", min = VNET_HDR_LEN + MIN_FRAME, max = VNET_HDR_LEN + MAX_FRAME)]
    BadHeldFrame(usize),
    /// An eventfd could not be created.
    #[error("cannot create the RX wake-up eventfd")]
    EventFd(#[source] std::io::Error),
    /// The RX thread could not be started.
    #[error("cannot start the RX thread of {tap}")]
    Thread {
        /// The TAP.
        tap: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Shared between a NIC and its RX thread.
#[derive(Debug)]
pub struct RxSignal {
    /// The device holds a frame it could not deliver (no guest buffer, or
    /// its pass ran out of budget): the RX thread should stop reading the
    /// TAP and offer it again after [`RX_RETRY`].
    starved: AtomicBool,
    /// Wakes the RX thread: the guest posted buffers, or it must stop.
    wake: EventFd,
}

impl RxSignal {
    fn new() -> Result<Self, NetError> {
        Ok(RxSignal { starved: AtomicBool::new(false), wake: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)? })
    }

    fn wake(&self) {
        // A full counter already means "wake up".
        let _ = self.wake.write(1);
    }
}

/// A frame read from the TAP and not yet delivered.
#[derive(Debug)]
struct Held {
    len: usize,
    since: Instant,
}

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write_only: bool,
}

/// A virtio-net device on a TAP.
#[derive(Debug)]
pub struct Net {
    mac: MacAddr,
    tap: Arc<Tap>,
    signal: Arc<RxSignal>,
    counters: NetCounters,
    /// `rx_buf[..held.len]` is the held frame, header included.
    held: Option<Held>,
    /// One byte longer than the longest accepted frame, to see truncation.
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    descs: Vec<Desc>,
}

impl Net {
    /// A NIC with address `mac` on `tap`.
    pub fn new(tap: Arc<Tap>, mac: MacAddr) -> Result<Self, NetError> {
        Ok(Net {
            mac,
            tap,
            signal: Arc::new(RxSignal::new()?),
            counters: NetCounters::default(),
            held: None,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME + 1],
            tx_buf: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME),
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
        })
    }

    /// A NIC on `tap` that must be the saved one (same MAC); it takes back
    /// the saved counters and held frame.
    pub fn restore(tap: Arc<Tap>, mac: MacAddr, s: &NetSnapshot) -> Result<Self, NetError> {
        if s.mac != mac {
            return Err(NetError::MacMismatch { saved: s.mac, configured: mac });
        }
        let mut net = Self::new(tap, mac)?;
        net.counters = s.counters;
        if let Some(frame) = &s.held {
            if !(VNET_HDR_LEN + MIN_FRAME..=VNET_HDR_LEN + MAX_FRAME).contains(&frame.len()) {
                return Err(NetError::BadHeldFrame(frame.len()));
            }
            net.rx_buf[..frame.len()].copy_from_slice(frame);
            net.held = Some(Held { len: frame.len(), since: Instant::now() });
        }
        Ok(net)
    }

    /// What its RX thread shares with it.
    pub fn rx_signal(&self) -> Arc<RxSignal> {
        self.signal.clone()
    }

    /// Its counters.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// Collects the descriptors of `chain` into `self.descs`. The chain
    /// iterator stops at the queue size and on loops, so this is bounded.
    fn collect_chain<I: Iterator<Item = virtio_queue::desc::split::Descriptor>>(&mut self, chain: I) {
        self.descs.clear();
        self.descs.extend(chain.map(|d| Desc { addr: d.addr(), len: d.len(), write_only: d.is_write_only() }));
    }

    /// Sends every chain the guest made available on the TX queue.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            self.collect_chain(chain);
            match self.gather(mem) {
                Some(()) => match self.tap.send(&self.tx_buf) {
                    Ok(()) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += (self.tx_buf.len() - VNET_HDR_LEN) as u64;
                    }
                    Err(_) => self.counters.tx_dropped += 1,
                },
                None => self.counters.tx_dropped += 1,
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Copies the chain in `self.descs` into `tx_buf`, header zeroed; `None`
    /// if it is not a frame we send.
    fn gather(&mut self, mem: &GuestMem) -> Option<()> {
        let total: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
        let frame_len = usize::try_from(total).ok()?.checked_sub(VNET_HDR_LEN)?;
        if self.descs.iter().any(|d| d.write_only) || !(MIN_FRAME..=MAX_FRAME).contains(&frame_len) {
            return None;
        }
        self.tx_buf.resize(VNET_HDR_LEN + frame_len, 0);
        let mut at = 0;
        for d in &self.descs {
            let n = d.len as usize;
            mem.read_slice(&mut self.tx_buf[at..at + n], d.addr).ok()?;
            at += n;
        }
        // Nothing was negotiated that a header could ask of the host (no
        // checksum or segmentation offload): send the plain header, so a
        // guest cannot make the host kernel do work it never agreed to.
        self.tx_buf[..VNET_HDR_LEN].fill(0);
        Some(())
    }

    /// Takes the next frame: the held one, or one from the TAP (dropping
    /// and counting frames that cannot be delivered). `None` when the TAP
    /// has nothing.
    fn next_frame(&mut self) -> Option<Held> {
        if let Some(h) = self.held.take() {
            return Some(h);
        }
        // Bounded, so a flood of bad frames does not hold the lock: what
        // is left is read on the next pass.
        for _ in 0..RX_BUDGET {
            let n = match self.tap.recv(&mut self.rx_buf) {
                // End of file (a backend whose other end closed): nothing to read.
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // WouldBlock: empty. Any other error: nothing to read now;
                // the RX thread's poll says when to try again.
                Err(_) => return None,
            };
            let header = &mut self.rx_buf[..n.min(VNET_HDR_LEN)];
            let frame_ok = (VNET_HDR_LEN + MIN_FRAME..=VNET_HDR_LEN + MAX_FRAME).contains(&n)
                // No offload is enabled on the TAP: neither GSO nor a partial checksum can come.
                && header[1] == 0
                && header[0] & HDR_F_NEEDS_CSUM == 0;
            if !frame_ok {
                self.counters.rx_dropped += 1;
                continue;
            }
            // What the guest negotiated (no GUEST_CSUM, no MRG_RXBUF) allows
            // only flags = 0, no GSO, num_buffers = 1.
            header.copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
            return Some(Held { len: n, since: Instant::now() });
        }
        None
    }

    /// Delivers frames into the guest's RX buffers; see the module doc.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        let was_starved = self.signal.starved.load(Ordering::Acquire);
        for _ in 0..RX_BUDGET {
            let Some(frame) = self.next_frame() else { break };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if frame.since.elapsed() > RX_STALE {
                    self.counters.rx_dropped += 1;
                    continue; // and hold a fresher one, if any
                }
                self.held = Some(frame);
                break;
            };
            let head = chain.head_index();
            self.collect_chain(chain);
            let capacity: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
            if self.descs.is_empty() || self.descs.iter().any(|d| !d.write_only) {
                // Not a receive buffer: give it back empty; the frame waits for the next one.
                self.held = Some(frame);
                if queue.add_used(mem, head, 0).is_err() {
                    break;
                }
                used = true;
                continue;
            }
            if capacity < frame.len as u64 {
                // Too long for the guest's buffers: the frame is dropped and
                // the buffer stays available for the next one.
                self.counters.rx_dropped += 1;
                queue.go_to_previous_position();
                continue;
            }
            let mut at = 0;
            let mut written = true;
            for d in &self.descs {
                if at == frame.len {
                    break;
                }
                let n = (d.len as usize).min(frame.len - at);
                if mem.write_slice(&self.rx_buf[at..at + n], d.addr).is_err() {
                    written = false;
                    break;
                }
                at += n;
            }
            let len = if written {
                self.counters.rx_frames += 1;
                self.counters.rx_bytes += (frame.len - VNET_HDR_LEN) as u64;
                frame.len as u32
            } else {
                // A buffer outside guest memory: the frame is lost with it.
                self.counters.rx_dropped += 1;
                0
            };
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        // A frame still held (no buffer for it, or the budget ran out):
        // the RX thread offers it again after RX_RETRY.
        let starved = self.held.is_some();
        self.signal.starved.store(starved, Ordering::Release);
        if was_starved && !starved {
            // Back to reading the TAP as soon as frames come.
            self.signal.wake();
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (le16); the rest
        // describes features we do not offer and reads as zero.
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u64).and_then(|o| config.get(usize::try_from(o).ok()?).copied()).unwrap_or(0);
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => false,
        }
    }

    fn save(&self) -> DeviceSnapshot {
        DeviceSnapshot::Net(NetSnapshot {
            mac: self.mac,
            counters: self.counters,
            held: self.held.as_ref().map(|h| self.rx_buf[..h.len].to_vec()),
        })
    }
}

/// What one RX pass found, as the RX thread's `deliver` closure reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxPass {
    /// The receive queue was served.
    Served,
    /// Not now: the VM is not running, or the driver has not set the
    /// queue up. The thread retries after [`RX_RETRY`].
    NotNow,
}

/// A NIC's RX thread; stopped and joined on drop.
#[derive(Debug)]
pub struct RxThread {
    stop: Arc<AtomicBool>,
    signal: Arc<RxSignal>,
    handle: Option<JoinHandle<()>>,
}

/// The frame a NIC sends, as if from the guest, to announce that the guest
/// now sits behind this TAP (after a restore or a migration): switches
/// learn the port its MAC is on, and neighbours refresh their ARP caches.
/// With the guest's IPv4 address known: a gratuitous ARP request (sender
/// and target address the guest's, as `arping -U` sends); without: a RARP
/// request, as QEMU's self-announce sends. The virtio-net header comes
/// first, as the TAP expects.
pub fn announcement(mac: MacAddr, ip: Option<std::net::Ipv4Addr>) -> Vec<u8> {
    const ETHERTYPE_ARP: u16 = 0x0806;
    const ETHERTYPE_RARP: u16 = 0x8035;
    let (ethertype, op, sender_ip, target_mac) = match ip {
        Some(ip) => (ETHERTYPE_ARP, 1u16, ip.octets(), [0u8; 6]),
        None => (ETHERTYPE_RARP, 3u16, [0u8; 4], mac.0),
    };
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&target_mac);
    f.extend_from_slice(&sender_ip);
    // Pad to the 60-byte Ethernet minimum.
    f.resize(VNET_HDR_LEN + 60, 0);
    f
}

/// Starts the RX thread of the NIC on `tap`. It waits for frames on the
/// TAP (or, while the device holds a frame, for the guest to post buffers)
/// and then calls `deliver`, which must run the receive queue under the
/// transport's lock — and only while the VM is wanted running — and say
/// what it did.
pub fn spawn_rx_thread(
    tap: Arc<Tap>,
    signal: Arc<RxSignal>,
    mut deliver: impl FnMut() -> RxPass + Send + 'static,
) -> Result<RxThread, NetError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_stop, thread_signal, thread_tap) = (stop.clone(), signal.clone(), tap.clone());
    let handle = std::thread::Builder::new()
        .name(format!("rx-{}", tap.name()))
        .spawn(move || rx_loop(&thread_tap, &thread_signal, &thread_stop, &mut deliver))
        .map_err(|source| NetError::Thread { tap: tap.name().into(), source })?;
    Ok(RxThread { stop, signal, handle: Some(handle) })
}

fn rx_loop(tap: &Tap, signal: &RxSignal, stop: &AtomicBool, deliver: &mut dyn FnMut() -> RxPass) {
    // Some(d): wait up to d without watching the TAP, then run a pass.
    let mut hold_off: Option<Duration> = None;
    while !stop.load(Ordering::Acquire) {
        let watch_tap = hold_off.is_none() && !signal.starved.load(Ordering::Acquire);
        let mut fds = [
            libc::pollfd { fd: signal.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        let nfds = if watch_tap { 2 } else { 1 };
        let timeout = hold_off.unwrap_or(if watch_tap { RX_IDLE } else { RX_RETRY });
        // SAFETY: `fds` is an array of `nfds` (≤ 2) initialised pollfds that
        // outlives the call; both descriptors stay open (we hold the Tap and
        // the signal) for the whole call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout.as_millis() as libc::c_int) };
        if fds[0].revents & libc::POLLIN != 0 {
            let _ = signal.wake.read();
        }
        if stop.load(Ordering::Acquire) {
            break;
        }
        if watch_tap && ready <= 0 {
            continue; // idle (or EINTR): nothing arrived
        }
        // A TAP in error (its interface deleted) stays "ready": look at it
        // again only every RX_IDLE rather than spin.
        let broken = watch_tap && fds[1].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0;
        let pass = deliver();
        hold_off = if broken {
            Some(RX_IDLE)
        } else if pass == RxPass::NotNow {
            Some(RX_RETRY)
        } else {
            None
        };
    }
}

impl Drop for RxThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.signal.wake();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod announce_tests {
    use super::*;

    #[test]
    fn announcements_are_gratuitous_arp_or_rarp() {
        let mac = MacAddr([0x52, 0x54, 0, 1, 2, 3]);
        let g = announcement(mac, Some(std::net::Ipv4Addr::new(10, 1, 0, 5)));
        let f = &g[VNET_HDR_LEN..];
        assert_eq!(f.len(), 60);
        assert_eq!((&f[..6], &f[6..12], &f[12..14]), (&[0xff; 6][..], &mac.0[..], &[0x08, 0x06][..]));
        assert_eq!(&f[20..22], &[0, 1], "request");
        assert_eq!((&f[28..32], &f[38..42]), (&[10, 1, 0, 5][..], &[10, 1, 0, 5][..]), "sender = target = guest");
        let r = announcement(mac, None);
        assert_eq!(&r[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14], &[0x80, 0x35]);
        assert_eq!(&r[VNET_HDR_LEN + 20..VNET_HDR_LEN + 22], &[0, 3], "RARP request");
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;

    use vm_memory::{Address, GuestMemoryBackend};

    use super::*;
    use crate::devices::virtio_mmio::MmioTransport;
    use crate::memory::GuestRam;

    const SIZE: u16 = 16;
    const MAC: MacAddr = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    /// Rings of queue q at `RINGS + q * 0x1000`: descriptors, avail at +0x400, used at +0x800.
    const RINGS: u64 = 0x1_0000;
    const DATA: u64 = 0x10_0000;
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// Guest memory with a driver's view of both queues, and the peer end of the "TAP".
    struct Rig {
        ram: GuestRam,
        peer: UnixDatagram,
        tap: Arc<Tap>,
        /// Per queue: next free descriptor, avail idx.
        next: [(u16, u16); 2],
    }

    fn rings(q: usize) -> (u64, u64, u64) {
        let base = RINGS + q as u64 * 0x1000;
        (base, base + 0x400, base + 0x800)
    }

    impl Rig {
        fn new() -> Self {
            let (a, b) = UnixDatagram::pair().expect("socketpair");
            b.set_nonblocking(true).expect("nonblocking");
            let tap = Arc::new(Tap::from_fd(OwnedFd::from(a), "test").expect("tap"));
            Rig { ram: GuestRam::new(16 << 20).expect("ram"), peer: b, tap, next: [(0, 0); 2] }
        }

        fn mem(&self) -> &GuestMem {
            self.ram.mem()
        }

        fn net(&self) -> Net {
            Net::new(self.tap.clone(), MAC).expect("net")
        }

        fn queue(&self, q: usize) -> Queue {
            let (desc, avail, used) = rings(q);
            let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
            queue.set_size(SIZE);
            queue.set_desc_table_address(Some(desc as u32), Some(0));
            queue.set_avail_ring_address(Some(avail as u32), Some(0));
            queue.set_used_ring_address(Some(used as u32), Some(0));
            queue.set_ready(true);
            assert!(queue.is_valid(self.mem()));
            queue
        }

        /// Makes a chain of (address, length, device-writable) available on queue q; returns its head.
        fn post(&mut self, q: usize, chain: &[(u64, u32, bool)]) -> u16 {
            let (desc, avail, _) = rings(q);
            let (first, idx) = self.next[q];
            for (i, &(addr, len, write)) in chain.iter().enumerate() {
                let at = (first + i as u16) % SIZE;
                let last = i + 1 == chain.len();
                let flags = if write { WRITE } else { 0 } | if last { 0 } else { NEXT };
                let d = GuestAddress(desc + u64::from(at) * 16);
                self.mem().write_obj(addr, d).expect("desc");
                self.mem().write_obj(len, d.unchecked_add(8)).expect("desc");
                self.mem().write_obj(flags, d.unchecked_add(12)).expect("desc");
                self.mem().write_obj((at + 1) % SIZE, d.unchecked_add(14)).expect("desc");
            }
            self.mem().write_obj(first, GuestAddress(avail + 4 + u64::from(idx % SIZE) * 2)).expect("avail");
            self.mem().write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).expect("avail");
            self.next[q] = ((first + chain.len() as u16) % SIZE, idx.wrapping_add(1));
            first
        }

        /// The used ring of queue q: (head, length) entries.
        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let (_, _, used) = rings(q);
            let n: u16 = self.mem().read_obj(GuestAddress(used + 2)).expect("used idx");
            (0..n)
                .map(|i| {
                    let e = GuestAddress(used + 4 + u64::from(i % SIZE) * 8);
                    (self.mem().read_obj(e).expect("id"), self.mem().read_obj(e.unchecked_add(4)).expect("len"))
                })
                .collect()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.mem().read_slice(&mut v, GuestAddress(addr)).expect("read");
            v
        }

        fn write(&self, addr: u64, data: &[u8]) {
            self.mem().write_slice(data, GuestAddress(addr)).expect("write");
        }

        /// What the host side received, if anything.
        fn sent(&self) -> Option<Vec<u8>> {
            let mut buf = vec![0; 1 << 17];
            let n = self.peer.recv(&mut buf).ok()?;
            buf.truncate(n);
            Some(buf)
        }
    }

    /// A frame as the TAP gives it: a header (with `flags`) and `len` bytes of `fill`.
    fn from_tap(flags: u8, len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = flags;
        f.extend(std::iter::repeat_n(fill, len));
        f
    }

    fn pages_dirtied(ram: &GuestRam) -> Vec<u64> {
        let bits: Vec<u64> = ram.mem().iter().flat_map(|r| r.get_mmap().bitmap().get_and_reset()).collect();
        (0..bits.len() as u64 * 64).filter(|i| bits[(i / 64) as usize] & (1 << (i % 64)) != 0).collect()
    }

    #[test]
    fn transmit_sends_each_chain_with_a_plain_header() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut tx = rig.queue(TX_QUEUE);
        // A header asking for a checksum offload never negotiated, and a
        // frame split over two descriptors.
        rig.write(DATA, &[HDR_F_NEEDS_CSUM, 4, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        rig.write(DATA + 0x100, &[0xaa; 20]);
        rig.write(DATA + 0x200, &[0xbb; 40]);
        let head = rig.post(TX_QUEUE, &[(DATA, 12, false), (DATA + 0x100, 20, false), (DATA + 0x200, 40, false)]);
        assert!(net.process_queue(TX_QUEUE, &mut tx, rig.mem()));
        let sent = rig.sent().expect("a frame");
        assert_eq!(sent.len(), 72);
        assert_eq!(&sent[..12], &[0u8; 12]);
        assert!(sent[12..32].iter().all(|&b| b == 0xaa) && sent[32..].iter().all(|&b| b == 0xbb));
        assert_eq!(rig.used(TX_QUEUE), vec![(u32::from(head), 0)]);
        assert_eq!((net.counters().tx_frames, net.counters().tx_bytes, net.counters().tx_dropped), (1, 60, 0));
        assert!(rig.sent().is_none(), "one chain, one frame");
    }

    #[test]
    fn transmit_completes_bad_chains_unsent() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut tx = rig.queue(TX_QUEUE);
        let max = (VNET_HDR_LEN + MAX_FRAME) as u32;
        rig.post(TX_QUEUE, &[(DATA, max + 1, false)]); // too long
        rig.post(TX_QUEUE, &[(DATA, max - 100, false), (DATA, 101, false)]); // too long, in pieces
        rig.post(TX_QUEUE, &[(DATA, 12 + 13, false)]); // shorter than an Ethernet header
        rig.post(TX_QUEUE, &[(DATA, 8, false)]); // shorter than the virtio header
        rig.post(TX_QUEUE, &[(DATA, 12, false), (DATA, 60, true)]); // device-writable
        rig.post(TX_QUEUE, &[(DATA, 12, false), (0xF000_0000, 60, false)]); // outside guest memory
        rig.post(TX_QUEUE, &[(DATA, max, false)]); // the longest that goes
        assert!(net.process_queue(TX_QUEUE, &mut tx, rig.mem()));
        assert_eq!(rig.used(TX_QUEUE).len(), 7, "every chain is completed");
        assert_eq!(rig.sent().map(|f| f.len()), Some(max as usize));
        assert!(rig.sent().is_none());
        assert_eq!((net.counters().tx_frames, net.counters().tx_dropped), (1, 6));
    }

    #[test]
    fn receive_fills_the_guest_buffers_and_marks_them_dirty() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        // DATA_VALID (2) from the host is not for a guest that did not ask.
        rig.peer.send(&from_tap(2, 60, 0x5a)).expect("send");
        let _ = pages_dirtied(&rig.ram);
        let head = rig.post(RX_QUEUE, &[(DATA, 40, true), (DATA + 0x2000, 2000, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(head), 72)]);
        let got = [rig.read(DATA, 40), rig.read(DATA + 0x2000, 32)].concat();
        assert_eq!(&got[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert!(got[12..].iter().all(|&b| b == 0x5a));
        assert_eq!((net.counters().rx_frames, net.counters().rx_bytes), (1, 60));
        // Both buffers' pages, and the used ring's, are in the VMM's dirty bitmap.
        let dirty = pages_dirtied(&rig.ram);
        for page in [DATA / 4096, (DATA + 0x2000) / 4096, rings(RX_QUEUE).2 / 4096] {
            assert!(dirty.contains(&page), "page {page:#x} not dirty: {dirty:x?}");
        }
    }

    #[test]
    fn without_a_buffer_one_frame_is_held_and_the_rest_wait_in_the_tap() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        let signal = net.rx_signal();
        for fill in 1..=3u8 {
            rig.peer.send(&from_tap(0, 100, fill)).expect("send");
        }
        assert!(!net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert!(signal.starved.load(Ordering::Acquire));
        let held = match net.save() {
            DeviceSnapshot::Net(s) => s.held.expect("a held frame"),
            other => panic!("{other:?}"),
        };
        assert_eq!(held[12], 1, "the first frame is held");
        // One buffer: the held frame goes in, the next is held.
        rig.post(RX_QUEUE, &[(DATA, 2048, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!(rig.read(DATA + 12, 1), vec![1]);
        assert!(signal.starved.load(Ordering::Acquire));
        // Enough buffers: everything arrives, in order, and the thread is woken.
        rig.post(RX_QUEUE, &[(DATA + 0x1000, 2048, true)]);
        rig.post(RX_QUEUE, &[(DATA + 0x2000, 2048, true)]);
        rig.post(RX_QUEUE, &[(DATA + 0x3000, 2048, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!((rig.read(DATA + 0x1000 + 12, 1), rig.read(DATA + 0x2000 + 12, 1)), (vec![2], vec![3]));
        assert_eq!(rig.used(RX_QUEUE).len(), 3, "the fourth buffer stays available");
        assert!(!signal.starved.load(Ordering::Acquire));
        assert_eq!(signal.wake.read().expect("woken"), 1);
        assert_eq!((net.counters().rx_frames, net.counters().rx_dropped), (3, 0));
    }

    #[test]
    fn a_stale_held_frame_is_dropped() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        rig.peer.send(&from_tap(0, 100, 1)).expect("send");
        net.process_queue(RX_QUEUE, &mut rx, rig.mem());
        let h = net.held.as_mut().expect("held");
        h.since = Instant::now().checked_sub(RX_STALE * 2).expect("the clock is past boot");
        rig.peer.send(&from_tap(0, 100, 2)).expect("send");
        net.process_queue(RX_QUEUE, &mut rx, rig.mem());
        assert_eq!(net.counters().rx_dropped, 1);
        // The fresher frame is held instead, and delivered when a buffer comes.
        rig.post(RX_QUEUE, &[(DATA, 2048, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!(rig.read(DATA + 12, 1), vec![2]);
    }

    #[test]
    fn frames_and_buffers_that_do_not_fit_are_refused() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        rig.peer.send(&from_tap(0, 1000, 1)).expect("send"); // longer than the buffer
        rig.peer.send(&from_tap(0, 13, 2)).expect("send"); // shorter than an Ethernet header
        rig.peer.send(&[0u8; 5]).expect("send"); // shorter than the virtio header
        let mut gso = from_tap(0, 100, 3);
        gso[1] = 1; // GSO, never enabled
        rig.peer.send(&gso).expect("send");
        rig.peer.send(&from_tap(HDR_F_NEEDS_CSUM, 100, 4)).expect("send"); // partial checksum
        rig.peer.send(&vec![0u8; VNET_HDR_LEN + MAX_FRAME + 1]).expect("send"); // too long for any buffer
        rig.peer.send(&from_tap(0, 50, 5)).expect("send"); // fits
        let readable = rig.post(RX_QUEUE, &[(DATA, 12, false), (DATA + 0x100, 500, true)]);
        let small = rig.post(RX_QUEUE, &[(DATA + 0x1000, 200, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        // The chain with a device-readable part comes back empty; the small
        // buffer stays for the frame that fits.
        assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(readable), 0), (u32::from(small), 62)]);
        assert_eq!(rig.read(DATA + 0x1000 + 12, 1), vec![5]);
        assert_eq!((net.counters().rx_frames, net.counters().rx_dropped), (1, 6));
    }

    #[test]
    fn a_buffer_outside_guest_memory_loses_the_frame_not_the_device() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        rig.peer.send(&from_tap(0, 100, 1)).expect("send");
        rig.peer.send(&from_tap(0, 100, 2)).expect("send");
        let bad = rig.post(RX_QUEUE, &[(0xF000_0000, 2048, true)]);
        let good = rig.post(RX_QUEUE, &[(DATA, 2048, true)]);
        assert!(net.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!(rig.used(RX_QUEUE), vec![(u32::from(bad), 0), (u32::from(good), 112)]);
        assert_eq!(rig.read(DATA + 12, 1), vec![2]);
        assert_eq!((net.counters().rx_frames, net.counters().rx_dropped), (1, 1));
    }

    #[test]
    fn config_space_holds_the_mac_and_link_up() {
        let rig = Rig::new();
        let net = rig.net();
        let mut c = [0xffu8; 10];
        net.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 0, 0]);
        let mut b = [0u8; 1];
        net.read_config(5, &mut b);
        assert_eq!(b, [0x56]);
        net.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0]);
        assert_eq!(net.features(), VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS);
    }

    #[test]
    fn restore_takes_back_the_held_frame_and_checks_the_mac() {
        let mut rig = Rig::new();
        let mut net = rig.net();
        let mut rx = rig.queue(RX_QUEUE);
        rig.peer.send(&from_tap(0, 80, 7)).expect("send");
        net.process_queue(RX_QUEUE, &mut rx, rig.mem());
        let DeviceSnapshot::Net(saved) = net.save() else { panic!("not a NIC") };
        assert_eq!(saved.mac, MAC);
        drop(net);

        let other = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let e = Net::restore(rig.tap.clone(), other, &saved).expect_err("another MAC");
        assert!(matches!(e, NetError::MacMismatch { .. }) && e.to_string().contains("52:54:00:12:34:56"), "{e}");
        for len in [3, VNET_HDR_LEN + MAX_FRAME + 1] {
            let bad = NetSnapshot { held: Some(vec![0; len]), ..saved.clone() };
            assert!(matches!(Net::restore(rig.tap.clone(), MAC, &bad), Err(NetError::BadHeldFrame(n)) if n == len));
        }

        let mut restored = Net::restore(rig.tap.clone(), MAC, &saved).expect("restore");
        assert_eq!(restored.save(), DeviceSnapshot::Net(saved));
        rig.post(RX_QUEUE, &[(DATA, 2048, true)]);
        assert!(restored.process_queue(RX_QUEUE, &mut rx, rig.mem()));
        assert_eq!(rig.read(DATA + 12, 2), vec![7, 7]);
        assert_eq!(restored.counters().rx_frames, 1);
    }

    /// Drives the transport's registers as a driver does, up to DRIVER_OK.
    fn set_up(t: &mut MmioTransport) {
        let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        w(t, 0x070, 1 | 2);
        w(t, 0x024, 1);
        w(t, 0x020, 1);
        w(t, 0x024, 0);
        w(t, 0x020, 1 << 5);
        w(t, 0x070, 1 | 2 | 8);
        for q in 0..2 {
            let (desc, avail, used) = rings(q);
            w(t, 0x030, q as u32);
            w(t, 0x038, u32::from(SIZE));
            w(t, 0x080, desc as u32);
            w(t, 0x090, avail as u32);
            w(t, 0x0a0, used as u32);
            w(t, 0x044, 1);
        }
        w(t, 0x070, 1 | 2 | 8 | 4);
    }

    #[test]
    fn the_rx_thread_delivers_only_while_running() {
        let mut rig = Rig::new();
        let net = rig.net();
        let signal = net.rx_signal();
        let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let irq_seen = irq.try_clone().expect("clone");
        let transport = Arc::new(Mutex::new(MmioTransport::new(Box::new(net), irq, rig.mem().clone())));
        let running = Arc::new(AtomicBool::new(true));
        let deliver = {
            let (transport, running) = (transport.clone(), running.clone());
            move || {
                let mut t = crate::devices::lock(&transport);
                if !running.load(Ordering::Acquire) {
                    return RxPass::NotNow;
                }
                if t.device_work(RX_QUEUE) { RxPass::Served } else { RxPass::NotNow }
            }
        };
        let thread = spawn_rx_thread(rig.tap.clone(), signal, deliver).expect("spawn");
        let wait_used = |rig: &Rig, n: usize| {
            let start = Instant::now();
            while rig.used(RX_QUEUE).len() < n {
                assert!(start.elapsed() < Duration::from_secs(5), "frame {n} never delivered");
                std::thread::sleep(Duration::from_millis(5));
            }
        };

        // Before DRIVER_OK nothing is delivered: the frame waits in the TAP.
        rig.post(RX_QUEUE, &[(DATA, 2048, true)]);
        rig.peer.send(&from_tap(0, 60, 1)).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        assert!(rig.used(RX_QUEUE).is_empty());
        set_up(&mut crate::devices::lock(&transport));
        wait_used(&rig, 1);
        assert_eq!(irq_seen.read().expect("interrupt raised"), 1);

        // "Paused": taking the lock once is the barrier; afterwards nothing moves.
        running.store(false, Ordering::Release);
        drop(crate::devices::lock(&transport));
        rig.post(RX_QUEUE, &[(DATA + 0x1000, 2048, true)]);
        rig.peer.send(&from_tap(0, 60, 2)).expect("send");
        let _ = pages_dirtied(&rig.ram);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rig.used(RX_QUEUE).len(), 1, "delivered while paused");
        assert!(pages_dirtied(&rig.ram).is_empty(), "guest memory written while paused");

        // Resumed: the frame that waited arrives.
        running.store(true, Ordering::Release);
        wait_used(&rig, 2);
        assert_eq!(rig.read(DATA + 0x1000 + 12, 1), vec![2]);
        drop(thread); // joins
    }

    #[test]
    fn a_broken_backend_does_not_make_the_rx_thread_spin() {
        // A socket pair whose other end is closed: always "ready",
        // reads end of file — as a TAP whose interface was deleted is
        // always in error.
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        drop(b);
        let tap = Arc::new(Tap::from_fd(OwnedFd::from(a), "broken").expect("tap"));
        let net = Net::new(tap.clone(), MAC).expect("net");
        let passes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = passes.clone();
        let thread = spawn_rx_thread(tap, net.rx_signal(), move || {
            counted.fetch_add(1, Ordering::Relaxed);
            RxPass::Served
        })
        .expect("spawn");
        std::thread::sleep(Duration::from_millis(500));
        drop(thread);
        let n = passes.load(Ordering::Relaxed);
        assert!((1..=20).contains(&n), "{n} passes in 0.5 s");
    }
}
