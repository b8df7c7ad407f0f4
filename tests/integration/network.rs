//! virtio-net end to end, in a network namespace of the test's own: the test
//! guest on a TAP answers ARP, ping and its UDP sequence service; junk frames
//! get no answer and do not hurt it; a migration to a destination that has no
//! NIC configuration is refused and the source goes on; a paused VM takes in
//! nothing (frames wait in the TAP until it resumes); and the sequence
//! continues — no gap, no duplicate — in another process restored from a
//! snapshot on the same TAP.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use wanmig_control::{self as control, Request};
use wanmig_migrate::report::Outcome as MigrateOutcome;
use wanmig_vmm::snapshot;
use wanmig_vmm::testguest::{UDP_SEQ_MAX_ECHO, UDP_SEQ_PORT};

use crate::harness::{Keys, Receiver, VmDir, VmProcess, migrate_request, require_kvm};

pub(crate) const TAP: &str = "wmtap0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub(crate) const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A network namespace with a persistent TAP holding the host's address;
/// deleted on drop (also when the test fails).
pub(crate) struct NetNs {
    pub(crate) name: String,
}

impl NetNs {
    pub(crate) fn new(tag: &str) -> Self {
        let name = format!("wanmig-{tag}-{}", std::process::id());
        run_ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        ns.ip(&["link", "set", TAP, "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all);
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets made
    /// there stay in it wherever they are used afterwards.
    pub(crate) fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on a descriptor we hold open; it changes only
                // this thread's network namespace.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run_ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// The Internet checksum of `data`.
fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn socket(domain: i32, kind: i32, protocol: i32) -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor we just created and own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    }
}

/// One ICMP echo to `dst` from a raw socket; the round-trip time, or
/// `None` if no matching reply came within `REPLY_TIMEOUT`.
fn ping(sock: &OwnedFd, dst: Ipv4Addr, seq: u16) -> Option<Duration> {
    let id = std::process::id() as u16;
    let mut req = vec![8u8, 0, 0, 0];
    req.extend_from_slice(&id.to_be_bytes());
    req.extend_from_slice(&seq.to_be_bytes());
    req.extend((0..56u8).map(|i| i ^ seq as u8));
    let sum = inet_csum(&req);
    req[2..4].copy_from_slice(&sum.to_be_bytes());
    let to = sockaddr_in(dst);
    let start = Instant::now();
    // SAFETY: `req` and `to` are live for the call, with the lengths given.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(n, req.len() as isize, "send ICMP: {}", std::io::Error::last_os_error());
    let mut buf = [0u8; 2048];
    while start.elapsed() < REPLY_TIMEOUT {
        // SAFETY: `buf` is live and writable for its length. The socket has
        // a receive timeout, so this returns.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        let got = &buf[..n as usize];
        let ihl = usize::from(got[0] & 15) * 4;
        let Some(icmp) = got.get(ihl..) else { continue };
        let from = Ipv4Addr::new(got[12], got[13], got[14], got[15]);
        if from == dst && icmp.len() == req.len() && icmp[0] == 0 && icmp[4..] == req[4..] {
            assert_eq!(inet_csum(icmp), 0, "the echo reply's checksum is wrong");
            return Some(start.elapsed());
        }
    }
    None
}

/// Sends `payload` to the sequence service; returns the reply's sequence
/// number after checking the echo.
fn exchange(sock: &UdpSocket, payload: &[u8]) -> u64 {
    sock.send(payload).expect("send UDP");
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no UDP reply to {} bytes: {e}", payload.len()));
    let echoed = payload.len().min(UDP_SEQ_MAX_ECHO);
    assert_eq!(n, 8 + echoed, "reply length");
    assert_eq!(&buf[8..n], &payload[..echoed], "the payload is not echoed");
    u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"))
}

/// Exchanges `count` datagrams; the sequence numbers must go up by one from
/// `last + 1`. Returns the last one.
fn sequence(sock: &UdpSocket, last: u64, count: usize, tag: &str) -> u64 {
    let mut seen = last;
    for i in 0..count {
        let payload = format!("{tag} datagram {i}: {}", "x".repeat(i * 37));
        let seq = exchange(sock, payload.as_bytes());
        assert_eq!(seq, seen + 1, "{tag}: reply {i} has sequence {seq} after {seen}");
        seen = seq;
    }
    seen
}

/// Frames the guest must ignore, sent straight onto the TAP.
fn junk_frames() -> Vec<Vec<u8>> {
    let eth = |kind: u16| -> Vec<u8> {
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&kind.to_be_bytes());
        f
    };
    // A well-formed UDP datagram to the sequence service, to be spoiled.
    let udp = |payload: &[u8]| -> Vec<u8> {
        let ulen = 8 + payload.len() as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&(20 + ulen).to_be_bytes());
        ip.extend_from_slice(&HOST_IP.octets());
        ip.extend_from_slice(&GUEST_IP.octets());
        let sum = inet_csum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&40000u16.to_be_bytes());
        ip.extend_from_slice(&UDP_SEQ_PORT.to_be_bytes());
        ip.extend_from_slice(&ulen.to_be_bytes());
        ip.extend_from_slice(&[0, 0]); // no checksum
        ip.extend_from_slice(payload);
        [eth(0x0800), ip].concat()
    };
    let refix_ip_sum = |f: &mut Vec<u8>| {
        f[24..26].fill(0);
        let sum = inet_csum(&f[14..34]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
    };
    let good = udp(b"junk");
    let mut frames = vec![eth(0x0800), eth(0x0806), eth(0x86dd)];
    let mut bad_ip_sum = good.clone();
    bad_ip_sum[24] ^= 0xff;
    let mut long_total = good.clone();
    long_total[16..18].copy_from_slice(&1500u16.to_be_bytes());
    refix_ip_sum(&mut long_total);
    let mut long_udp = good.clone();
    long_udp[38..40].copy_from_slice(&900u16.to_be_bytes());
    let mut bad_udp_sum = good.clone();
    bad_udp_sum[40..42].copy_from_slice(&[0x12, 0x34]);
    let mut fragment = good.clone();
    fragment[20] |= 0x20; // more fragments
    refix_ip_sum(&mut fragment);
    let mut big_ihl = good[..40].to_vec();
    big_ihl[14] = 0x4f;
    refix_ip_sum(&mut big_ihl);
    let mut short_arp = eth(0x0806);
    short_arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 0, 0]);
    let mut bad_icmp = eth(0x0800);
    bad_icmp.extend_from_slice(&good[14..34]);
    bad_icmp[23] = 1; // ICMP
    bad_icmp[16..18].copy_from_slice(&28u16.to_be_bytes());
    refix_ip_sum(&mut bad_icmp);
    bad_icmp.extend_from_slice(&[8, 0, 0xde, 0xad, 0, 1, 0, 1]);
    let mut not_for_us = good.clone();
    not_for_us[30..34].copy_from_slice(&[10, 77, 0, 9]);
    refix_ip_sum(&mut not_for_us);
    let mut other_mac = good.clone();
    other_mac[5] ^= 1;
    frames.extend([bad_ip_sum, long_total, long_udp, bad_udp_sum, fragment, big_ihl, short_arp, bad_icmp, not_for_us]);
    frames.push(other_mac);
    frames
}

/// Sends `frames` out of the TAP (to the guest) from a packet socket made
/// inside the namespace.
fn send_frames(ns: &NetNs, frames: &[Vec<u8>]) {
    ns.enter(|| {
        let sock = socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        let name = std::ffi::CString::new(TAP).expect("no NUL");
        // SAFETY: a NUL-terminated name, live for the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(index, 0, "no {TAP} in the namespace");
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&GUEST_MAC);
        for f in frames {
            // SAFETY: `f` and `addr` are live for the call, with the lengths given.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(n, f.len() as isize, "send a frame: {}", std::io::Error::last_os_error());
        }
    });
}

#[test]
fn guest_answers_on_its_tap_and_its_udp_sequence_survives_restore() {
    require_kvm();
    let ns = NetNs::new("net");
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let nic = format!("[[net]]\ntap = \"{TAP}\"\nmac = \"{mac}\"\nip = \"{GUEST_IP}/24\"\ngateway = \"{HOST_IP}\"\n");
    let vm = VmDir::with_extra(64, 1, "ws_mib = 4\nrate_mib = 4", &nic);
    let mut src = VmProcess::run_in(&vm, &ns.name);
    src.wait_for("the guest to bring its NIC up", Duration::from_secs(120), |g| g.phase == 2 && g.net_up);

    // Sockets made in the namespace; used from this thread.
    let (icmp, udp) = ns.enter(|| {
        let icmp = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
        // SAFETY: a timeval, live for the call, of the size given.
        let r = unsafe {
            libc::setsockopt(
                icmp.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let udp = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).expect("bind UDP in the namespace");
        udp.connect(SocketAddrV4::new(GUEST_IP, UDP_SEQ_PORT)).expect("connect");
        udp.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
        (icmp, udp)
    });

    // ARP (the kernel resolves the guest first), then three echoes.
    let rtts: Vec<Duration> = (1..=3)
        .map(|seq| ping(&icmp, GUEST_IP, seq).unwrap_or_else(|| panic!("no echo reply to ping {seq}")))
        .collect();
    eprintln!("ping {GUEST_IP}: {rtts:?}");

    // The sequence service: 1, 2, 3, ... with the payloads echoed, also
    // one longer than the echo limit.
    let mut last = sequence(&udp, 0, 5, "boot");
    let long = vec![0xa5u8; UDP_SEQ_MAX_ECHO + 300];
    let seq = exchange(&udp, &long);
    assert_eq!(seq, last + 1);
    last = seq;

    // Junk: no answer (the sequence does not move), no harm.
    let before = src.progress().expect("status");
    let junk = junk_frames();
    send_frames(&ns, &junk);
    src.wait_for("the guest to take in the junk", Duration::from_secs(30), |g| {
        g.net_rx >= before.net_rx + junk.len() as u64
    });
    last = sequence(&udp, last, 3, "after junk");

    // A migration to a destination that offers no TAP for the NIC is
    // refused at its hello, and the source goes on answering.
    let keys = Keys::new(vm.dir.path());
    let dst = Receiver::start_in(&ns.name, &keys, &keys.src_fp, &vm.path("dst"));
    let req = migrate_request(&dst.addr, &keys, None, false);
    let resp = control::request_with_progress(src.socket(), &req, &mut |_| {}).expect("the VM process answers");
    assert_eq!(resp.outcome, Some(MigrateOutcome::FailedSourceRunning), "{resp:?}");
    dst.wait_log("receive --tap NAME", Duration::from_secs(10));
    drop(dst);
    last = sequence(&udp, last, 3, "after the refused migration");
    assert!(ping(&icmp, GUEST_IP, 4).is_some(), "no echo reply after the refused migration");

    // Paused means paused: datagrams that arrive wait in the TAP, and
    // neither guest memory nor device state changes (a second save is
    // identical to the first).
    let snap1 = vm.path("snap1");
    src.snapshot(&snap1);
    let waiting: Vec<String> = (0..2).map(|i| format!("sent while paused {i}")).collect();
    for w in &waiting {
        udp.send(w.as_bytes()).expect("send UDP");
    }
    udp.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let mut buf = [0u8; 2048];
    assert!(udp.recv(&mut buf).is_err(), "a paused guest answered");
    udp.set_read_timeout(Some(REPLY_TIMEOUT)).expect("timeout");
    let snap2 = vm.path("snap2");
    src.snapshot(&snap2);
    let memory = |dir: &std::path::Path| std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory file");
    assert!(memory(&snap1) == memory(&snap2), "guest memory changed while the VM was paused");
    let (s1, _) = snapshot::load_for_inspection(&snap1).expect("snapshot");
    let (s2, _) = snapshot::load_for_inspection(&snap2).expect("snapshot");
    assert_eq!(s1.virtio, s2.virtio, "device state changed while the VM was paused");
    // Resumed, the guest gets them and answers, in order.
    src.request(&Request::Resume);
    for w in &waiting {
        let n = udp.recv(&mut buf).expect("the datagrams sent while paused are answered after resume");
        assert_eq!((u64::from_be_bytes(buf[..8].try_into().expect("8")), &buf[8..n]), (last + 1, w.as_bytes()));
        last += 1;
    }

    // Snapshot; the source process ends and lets go of the TAP.
    let snap = vm.path("snap");
    src.snapshot(&snap);
    let at_snapshot = src.progress().expect("status");
    assert_eq!(at_snapshot.udp_seq, last, "the guest counted replies we did not get");
    assert!(src.shutdown().success());

    // Restored in another process on the same TAP: the sequence goes on
    // from where it stopped, and nothing else arrives.
    let mut restored = VmProcess::restore_in(&vm, &snap, &ns.name);
    restored.wait_for("the restored guest to run", Duration::from_secs(60), |g| g.ticks > at_snapshot.ticks + 20);
    last = sequence(&udp, last, 5, "restored");
    assert!(ping(&icmp, GUEST_IP, 5).is_some(), "no echo reply after restore");
    udp.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut stray = [0u8; 2048];
    assert!(udp.recv(&mut stray).is_err(), "a duplicate or stray reply arrived");

    let end = restored.progress().expect("status");
    assert_eq!((end.udp_seq, end.errors), (last, 0));
    assert!(restored.shutdown().success());
    let serial = vm.serial();
    assert!(serial.contains("virtio-net at") && !serial.contains("unexpected exception"), "{serial}");
}
