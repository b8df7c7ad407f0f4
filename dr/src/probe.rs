//! Whether a source site still answers: probes of the guest's own network
//! identity, made before a failover.
//!
//! A failover must not start a second copy of a VM that still runs at the
//! source: two copies with one disk history and one address diverge. What
//! the DR site can observe is the guest itself: an ICMP echo to its
//! address, or a TCP connection to one of its services (a reset counts as
//! an answer: the address is alive). An answer means the source runs it;
//! silence means the site is gone *or cut off* — a probe cannot tell the
//! two apart, so silence is necessary, not sufficient: the operator who
//! fails over declares the disaster (and should fence the source: power,
//! storage, or its uplink), as with SRM or Zerto.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// ICMP echo to an IPv4 address (raw socket: root or CAP_NET_RAW; else
    /// an unprivileged ICMP socket if `ping_group_range` allows).
    Icmp(Ipv4Addr),
    /// A TCP connection to an address and port.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Icmp(a) => write!(f, "icmp:{a}"),
            Probe::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Probe {
    type Err = String;
    /// `icmp:10.0.0.2` or `tcp:10.0.0.2:22`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("icmp:") {
            return a.parse().map(Probe::Icmp).map_err(|_| format!("`{a}` is not an IPv4 address"));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(Probe::Tcp).map_err(|_| format!("`{a}` is not ADDRESS:PORT"));
        }
        Err(format!("`{s}` is not a probe (icmp:ADDRESS or tcp:ADDRESS:PORT)"))
    }
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Something answered: how.
    Alive(String),
    /// Nothing answered within the time.
    Silent,
    /// The probe could not be made (e.g. no permission): it says nothing.
    Unusable(String),
}

/// Runs `p` for at most `timeout`.
pub fn probe(p: &Probe, timeout: Duration) -> Answer {
    match p {
        Probe::Tcp(a) => match TcpStream::connect_timeout(a, timeout) {
            Ok(_) => Answer::Alive("accepted a TCP connection".into()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Answer::Alive("refused a TCP connection (the address answers)".into())
            }
            Err(_) => Answer::Silent,
        },
        Probe::Icmp(a) => icmp(*a, timeout),
    }
}

fn icmp_socket() -> Result<(OwnedFd, bool), String> {
    for (kind, raw) in [(libc::SOCK_RAW, true), (libc::SOCK_DGRAM, false)] {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, libc::IPPROTO_ICMP) };
        if fd >= 0 {
            // SAFETY: fd is a socket we just opened and own.
            return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, raw));
        }
    }
    Err(format!("no ICMP socket: {} (needs root, CAP_NET_RAW or ping_group_range)", std::io::Error::last_os_error()))
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ICMP echo, three requests spread over `timeout`; any matching reply
/// from `to` is an answer.
fn icmp(to: Ipv4Addr, timeout: Duration) -> Answer {
    let (fd, raw) = match icmp_socket() {
        Ok(s) => s,
        Err(e) => return Answer::Unusable(e),
    };
    let id = (std::process::id() & 0xffff) as u16;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(to).to_be() },
        sin_zero: [0; 8],
    };
    let start = Instant::now();
    let mut sent = 0u16;
    let mut next_send = start;
    while start.elapsed() < timeout {
        if sent < 3 && Instant::now() >= next_send {
            let mut pkt = [0u8; 16];
            pkt[0] = 8; // echo request
            pkt[4..6].copy_from_slice(&id.to_be_bytes());
            pkt[6..8].copy_from_slice(&sent.to_be_bytes());
            pkt[8..16].copy_from_slice(b"wanmigdr");
            let c = checksum(&pkt);
            pkt[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: pkt and addr are valid for the call; the fd is open.
            unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            sent += 1;
            next_send = Instant::now() + timeout / 3;
        }
        let left = timeout.saturating_sub(start.elapsed()).min(Duration::from_millis(100));
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
        if ready <= 0 {
            continue;
        }
        let mut buf = [0u8; 1500];
        let mut from: libc::sockaddr_in =
            libc::sockaddr_in { sin_family: 0, sin_port: 0, sin_addr: libc::in_addr { s_addr: 0 }, sin_zero: [0; 8] };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: buf and from are valid for the call.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                std::ptr::from_mut(&mut from).cast(),
                &mut len,
            )
        };
        if n <= 0 || u32::from_be(from.sin_addr.s_addr) != u32::from(to) {
            continue;
        }
        let pkt = &buf[..n as usize];
        // A raw socket hands over the IP header too.
        let icmp = if raw { pkt.get(usize::from(pkt[0] & 0x0f) * 4..).unwrap_or(&[]) } else { pkt };
        // An unprivileged socket rewrites the id: match on the type only.
        if icmp.len() >= 8 && icmp[0] == 0 && (!raw || icmp[4..6] == id.to_be_bytes()) {
            return Answer::Alive(format!("answered an ICMP echo in {:.0} ms", start.elapsed().as_secs_f64() * 1e3));
        }
    }
    Answer::Silent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse() {
        assert_eq!("icmp:10.0.0.2".parse(), Ok(Probe::Icmp(Ipv4Addr::new(10, 0, 0, 2))));
        assert_eq!("tcp:10.0.0.2:22".parse(), Ok(Probe::Tcp("10.0.0.2:22".parse().expect("addr"))));
        assert!("ping:x".parse::<Probe>().is_err() && "icmp:host".parse::<Probe>().is_err());
        assert_eq!(Probe::Icmp(Ipv4Addr::LOCALHOST).to_string(), "icmp:127.0.0.1");
    }

    #[test]
    fn a_listening_or_refusing_address_answers_and_an_address_without_a_host_does_not() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let open = Probe::Tcp(l.local_addr().expect("addr"));
        assert!(matches!(probe(&open, Duration::from_secs(1)), Answer::Alive(_)));
        drop(l);
        assert!(matches!(probe(&open, Duration::from_secs(1)), Answer::Alive(_)), "a reset is an answer");
        match probe(&Probe::Icmp(Ipv4Addr::LOCALHOST), Duration::from_secs(1)) {
            Answer::Alive(_) => {}
            Answer::Unusable(why) => eprintln!("ICMP probe not usable here (not root?): {why}"),
            Answer::Silent => panic!("the loopback address did not answer an echo"),
        }
        // TEST-NET-2 (RFC 5737) has no host to answer. (Silence over TCP
        // needs a black hole; the failover test gets one from a guest that
        // is gone.)
        let hole = Probe::Icmp(Ipv4Addr::new(198, 51, 100, 1));
        assert!(!matches!(probe(&hole, Duration::from_millis(300)), Answer::Alive(_)));
    }
}
