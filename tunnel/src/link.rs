//! The tunnel's sockets on a host: a raw `AF_PACKET` socket bound to one
//! interface ([`Link`]), and a raw IPv4 socket that hands packets to the
//! host's own routing ([`RawIpv4`]). Both are non-blocking and driven by
//! tokio's `AsyncFd`.
//!
//! The packet socket is set up so that it sees what the tunnel needs and no
//! more: untagged ARP and IPv4 frames only (a classic BPF filter in the
//! kernel), none of its own sends (`PACKET_IGNORE_OUTGOING`), and each frame
//! with the kernel's offload metadata (`PACKET_VNET_HDR`, see
//! [`crate::offload`]). It is bound before it can receive anything, so no
//! frame of another interface slips in first.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::offload::{VNET_HDR_LEN, VnetHdr};
use crate::packet::MacAddr;

/// Largest frame a capture can return: a 64 KiB GSO packet and its header.
pub const MAX_CAPTURE: usize = 65536 + 64;

const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_ushort = 1;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const ETH_P_ALL: u16 = 0x0003;
const ARPHRD_ETHER: u16 = 1;

/// Errors of the tunnel's sockets.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// An interface name that cannot be one.
    #[error("`{0}` is not an interface name (1 to 15 bytes, no NUL or '/')")]
    BadName(String),
    /// No such interface in this network namespace.
    #[error("no interface named {0}")]
    NoInterface(String),
    /// The interface is not Ethernet.
    #[error("{0} is not an Ethernet interface")]
    NotEthernet(String),
    /// A system call failed.
    #[error("{op} on {interface} failed")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

pub(crate) fn check_name(name: &str) -> Result<CString, LinkError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') {
        return Err(LinkError::BadName(name.into()));
    }
    CString::new(name).map_err(|_| LinkError::BadName(name.into()))
}

/// `struct ifreq`: a name and a 24-byte union, of which we use the
/// hardware address (a `sockaddr`), the MTU (an int) and the flags (a short).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &CString) -> Self {
        let mut r = IfReq { name: [0; 16], data: [0; 24] };
        let b = name.as_bytes();
        r.name[..b.len()].copy_from_slice(b);
        r
    }
}

fn ioctl(fd: RawFd, req: libc::c_ulong, ifr: &mut IfReq) -> io::Result<()> {
    // SAFETY: `ifr` is a valid, exclusively borrowed `struct ifreq` of the
    // kernel's size (40 bytes) for the duration of the call; the requests
    // used here read the name and write at most the union.
    let r = unsafe { libc::ioctl(fd, req as _, ifr as *mut IfReq) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the given size for the call;
    // the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(fd, level, opt, (value as *const T).cast(), std::mem::size_of::<T>() as libc::socklen_t)
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn socket(domain: libc::c_int, ty: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; no pointers.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers `fd` with the current tokio runtime.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` holds one open descriptor, always returns that
    // same one, and closes it only when dropped, which the `AsyncFd` owning
    // it does last.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

/// The index of interface `name` in this thread's network namespace.
pub fn if_index(name: &str) -> Result<u32, LinkError> {
    let c = check_name(name)?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 { Err(LinkError::NoInterface(name.into())) } else { Ok(i) }
}

/// The name of interface `index`.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// Options of a [`Link`].
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    /// Put the interface in promiscuous mode while the socket is open (needed
    /// to see frames for other hosts' addresses on an interface that filters
    /// them, e.g. a bridge device; not on a TAP or a bridge port).
    pub promiscuous: bool,
    /// Receive frames (false: a socket that only sends, whose kernel filter
    /// drops everything, so no receive buffer fills up unread).
    pub receive: bool,
}

impl Default for LinkOptions {
    /// Receives; not promiscuous.
    fn default() -> Self {
        LinkOptions { promiscuous: false, receive: true }
    }
}

/// A raw packet socket bound to one Ethernet interface.
#[derive(Debug)]
pub struct Link {
    fd: AsyncFd<OwnedFd>,
    name: String,
    index: u32,
    mac: MacAddr,
    mtu: u32,
}

/// Accepts untagged IPv4 and ARP frames, drops everything else:
/// ```text
/// ld vlan_avail; jne #0, drop; ldh [12]; jeq #0x0800, ok; jeq #0x0806, ok; drop: ret #0; ok: ret #-1
/// ```
fn filter() -> [libc::sock_filter; 7] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const SKF_AD_VLAN_TAG_PRESENT: u32 = 0xffff_f000 + 48;
    [
        op(0x20, 0, 0, SKF_AD_VLAN_TAG_PRESENT), // ld  [vlan_avail]
        op(0x15, 0, 3, 0),                       // jeq #0 ? next : drop
        op(0x28, 0, 0, 12),                      // ldh [12]
        op(0x15, 2, 0, 0x0800),                  // jeq IPv4 ? ok : next
        op(0x15, 1, 0, 0x0806),                  // jeq ARP ? ok : drop
        op(0x06, 0, 0, 0),                       // drop: ret #0
        op(0x06, 0, 0, u32::MAX),                // ok: ret all
    ]
}

impl Link {
    /// Opens a packet socket on interface `name` (in the calling thread's
    /// network namespace). Needs `CAP_NET_RAW`.
    pub fn open(name: &str, options: LinkOptions) -> Result<Link, LinkError> {
        let c = check_name(name)?;
        let sys = |op: &'static str| move |source: io::Error| LinkError::Sys { op, interface: name.into(), source };
        let index = if_index(name)?;
        // Protocol 0: receives nothing until bound below.
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, 0).map_err(sys("socket(AF_PACKET)"))?;
        let raw = fd.as_raw_fd();

        let mut ifr = IfReq::new(&c);
        ioctl(raw, libc::SIOCGIFHWADDR, &mut ifr).map_err(sys("SIOCGIFHWADDR"))?;
        if u16::from_ne_bytes([ifr.data[0], ifr.data[1]]) != ARPHRD_ETHER {
            return Err(LinkError::NotEthernet(name.into()));
        }
        let mac = MacAddr(ifr.data[2..8].try_into().expect("6 bytes"));
        let mut ifr = IfReq::new(&c);
        ioctl(raw, libc::SIOCGIFMTU, &mut ifr).map_err(sys("SIOCGIFMTU"))?;
        let mtu = u32::from_ne_bytes(ifr.data[..4].try_into().expect("4 bytes"));

        let one: libc::c_int = 1;
        setsockopt(raw, SOL_PACKET, PACKET_VNET_HDR, &one).map_err(sys("PACKET_VNET_HDR"))?;
        setsockopt(raw, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one).map_err(sys("PACKET_IGNORE_OUTGOING"))?;
        let prog = if options.receive {
            filter().to_vec()
        } else {
            vec![libc::sock_filter { code: 0x06, jt: 0, jf: 0, k: 0 }]
        };
        let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr().cast_mut() };
        setsockopt(raw, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog).map_err(sys("SO_ATTACH_FILTER"))?;
        // Room for bursts (a few 64 KiB GSO packets): forced past rmem_max
        // when allowed, else as much as it allows.
        let size: libc::c_int = 8 << 20;
        if setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size).is_err() {
            setsockopt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, &size).map_err(sys("SO_RCVBUF"))?;
        }

        // SAFETY: sockaddr_ll is plain old data; all zeroes is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_ALL.to_be();
        sll.sll_ifindex = index as i32;
        // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
        let r = unsafe {
            libc::bind(
                raw,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys("bind")(io::Error::last_os_error()));
        }
        if options.promiscuous {
            #[repr(C)]
            struct PacketMreq {
                ifindex: libc::c_int,
                ty: libc::c_ushort,
                alen: libc::c_ushort,
                address: [u8; 8],
            }
            let m = PacketMreq { ifindex: index as i32, ty: PACKET_MR_PROMISC, alen: 0, address: [0; 8] };
            setsockopt(raw, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &m).map_err(sys("PACKET_MR_PROMISC"))?;
        }
        let fd = register(fd, Interest::READABLE | Interest::WRITABLE).map_err(sys("registering with the runtime"))?;
        Ok(Link { fd, name: name.into(), index, mac, mtu })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The interface's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The interface's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The interface's MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    fn err(&self, op: &'static str) -> impl FnOnce(io::Error) -> LinkError + '_ {
        move |source| LinkError::Sys { op, interface: self.name.clone(), source }
    }

    /// The next frame: its offload header, and its length in `buf` (which
    /// should hold [`MAX_CAPTURE`] bytes). A frame longer than `buf` comes
    /// back cut, with its full length: the caller drops it.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<(VnetHdr, usize), LinkError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(self.err("waiting for frames"))?;
            let mut hdr = [0u8; VNET_HDR_LEN];
            let got = guard.try_io(|fd| {
                let mut iov = [
                    libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() },
                    libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() },
                ];
                // SAFETY: msghdr is plain old data; zeroes are valid.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = iov.len();
                // SAFETY: `msg` points at two iovecs over live, exclusively
                // borrowed buffers of the stated lengths.
                let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match got {
                Ok(Ok(n)) if n < VNET_HDR_LEN => continue,
                Ok(Ok(n)) => return Ok((VnetHdr::parse(&hdr), n - VNET_HDR_LEN)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(self.err("recvmsg")(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends one complete Ethernet frame (no offload) on the interface.
    pub async fn send(&self, frame: &[u8]) -> Result<(), LinkError> {
        let hdr = [0u8; VNET_HDR_LEN];
        loop {
            let mut guard = self.fd.writable().await.map_err(self.err("waiting to send"))?;
            let sent = guard.try_io(|fd| {
                let mut iov = [
                    libc::iovec { iov_base: hdr.as_ptr().cast_mut().cast(), iov_len: hdr.len() },
                    libc::iovec { iov_base: frame.as_ptr().cast_mut().cast(), iov_len: frame.len() },
                ];
                // SAFETY: msghdr is plain old data; zeroes are valid.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = iov.len();
                // SAFETY: `msg` points at two iovecs over live buffers the
                // kernel only reads; the socket is bound, so no address.
                let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            match sent {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return r.map_err(self.err("sendmsg")),
                Err(_would_block) => continue,
            }
        }
    }
}

/// A raw IPv4 socket (`IPPROTO_RAW`, so the caller writes the IP header)
/// bound to one interface: a packet sent here leaves through the host's own
/// routing on that interface, the kernel resolving the next hop's MAC
/// address (ARP, retries, its neighbour cache) as for its own packets.
#[derive(Debug)]
pub struct RawIpv4 {
    fd: AsyncFd<OwnedFd>,
    interface: String,
}

impl RawIpv4 {
    /// A raw socket sending through interface `name`.
    pub fn open(name: &str) -> Result<RawIpv4, LinkError> {
        let c = check_name(name)?;
        if_index(name)?;
        let sys = |op: &'static str| move |source: io::Error| LinkError::Sys { op, interface: name.into(), source };
        let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW).map_err(sys("socket(IPPROTO_RAW)"))?;
        let b = c.as_bytes_with_nul();
        // SAFETY: `b` is the NUL-terminated name, valid for its length.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                b.as_ptr().cast(),
                b.len() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(sys("SO_BINDTODEVICE")(io::Error::last_os_error()));
        }
        let fd = register(fd, Interest::WRITABLE).map_err(sys("registering with the runtime"))?;
        Ok(RawIpv4 { fd, interface: name.into() })
    }

    /// Sends `packet` (a complete IPv4 packet, header included) to `dst`.
    pub async fn send(&self, packet: &[u8], dst: Ipv4Addr) -> Result<(), LinkError> {
        // SAFETY: sockaddr_in is plain old data; zeroes are valid.
        let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sin.sin_family = libc::AF_INET as u16;
        sin.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        loop {
            let mut guard = self.fd.writable().await.map_err(|source| LinkError::Sys {
                op: "waiting to send",
                interface: self.interface.clone(),
                source,
            })?;
            let sent = guard.try_io(|fd| {
                // SAFETY: `packet` is a live buffer the kernel only reads;
                // `sin` is a valid sockaddr_in of the length passed.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&sin as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            match sent {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => {
                    return r.map_err(|source| LinkError::Sys {
                        op: "sendto",
                        interface: self.interface.clone(),
                        source,
                    });
                }
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_system_call() {
        for bad in ["", "a/b", "sixteen-chars-xx", "nul\0"] {
            assert!(matches!(Link::open(bad, LinkOptions::default()), Err(LinkError::BadName(_))), "{bad:?}");
        }
        assert!(matches!(if_index("wmt-no-such-if"), Err(LinkError::NoInterface(_))));
        assert_eq!(if_name(if_index("lo").expect("lo")).as_deref(), Some("lo"));
    }

    #[test]
    fn the_filter_jumps_stay_inside_the_program() {
        let f = filter();
        for (i, ins) in f.iter().enumerate() {
            if ins.code == 0x15 {
                assert!(i + 1 + usize::from(ins.jt) < f.len() && i + 1 + usize::from(ins.jf) < f.len());
            }
        }
        assert_eq!(f.last().map(|i| i.code), Some(0x06));
    }
}
