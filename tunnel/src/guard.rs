//! Keeping the host's own IP stack out of the tunnel's way, over rtnetlink.
//!
//! Frames the tunnel takes are addressed to the host's interface MAC (that
//! is what its ARP answers say), so the host's kernel receives them too. A
//! host that forwards IPv4 would then route them itself: the source host
//! toward the guest's old segment (ARP for an address nobody holds there,
//! then ICMP "host unreachable" back to the sender), the destination host
//! out its own default route (a duplicate of every packet the tunnel
//! carries, on a path that bypasses the old one). A [`KernelGuard`] adds one
//! FIB rule per guest address that discards, silently, exactly those
//! packets the tunnel takes, and removes the rules when dropped:
//!
//! ```text
//! source:      ip rule add to   GUEST iif IF pref 9000 blackhole
//! destination: ip rule add from GUEST iif IF pref 9000 blackhole
//! ```
//!
//! `iif` rules match packets received on that interface only: the host's
//! own traffic, and what the tunnel itself emits, is untouched.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Priority of the guard rules: before the main table (32766), after the
/// local one (0).
pub const RULE_PRIORITY: u32 = 9000;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FRA_DST: u16 = 1;
const FRA_SRC: u16 = 2;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FR_ACT_BLACKHOLE: u8 = 6;
const IFLA_MASTER: u16 = 10;
const NLMSG_HDR: usize = 16;

/// Errors of rtnetlink requests.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The netlink socket could not be used.
    #[error("rtnetlink {op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("the kernel refused to {op}")]
    Refused {
        /// The request.
        op: String,
        /// The errno it returned.
        #[source]
        source: io::Error,
    },
    /// The kernel's answer did not parse.
    #[error("malformed rtnetlink answer to {0}")]
    Malformed(&'static str),
}

/// Which packets a rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Packets to this address (`to`)...
    pub to: Option<Ipv4Addr>,
    /// ...or from it (`from`)...
    pub from: Option<Ipv4Addr>,
    /// ...received on this interface.
    pub iif: String,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(a) = self.to {
            write!(f, "to {a} ")?;
        }
        if let Some(a) = self.from {
            write!(f, "from {a} ")?;
        }
        write!(f, "iif {} pref {RULE_PRIORITY} blackhole", self.iif)
    }
}

struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    while buf.len() % 4 != 0 {
        buf.push(0);
    }
}

impl Netlink {
    fn open() -> Result<Netlink, GuardError> {
        // SAFETY: plain system call; no pointers.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(GuardError::Io { op: "socket", source: io::Error::last_os_error() });
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Answers never take long; never hang on one that does not come.
        let tv = libc::timeval { tv_sec: 2, tv_usec: 0 };
        // SAFETY: `tv` is a live timeval of the size passed.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(GuardError::Io { op: "SO_RCVTIMEO", source: io::Error::last_os_error() });
        }
        Ok(Netlink { fd, seq: 1 })
    }

    /// Sends one request (header filled in here) and returns the first
    /// answer with its sequence number: an error/ack or a data message.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8]) -> Result<(u16, Vec<u8>), GuardError> {
        self.seq += 1;
        let mut msg = Vec::with_capacity(NLMSG_HDR + body.len());
        msg.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: sockaddr_nl is plain old data; zeroes (pid 0: the kernel) are valid.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` and `kernel` are live and of the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(GuardError::Io { op: "sendto", source: io::Error::last_os_error() });
        }
        let mut buf = vec![0u8; 32 << 10];
        loop {
            // SAFETY: `buf` is a live, exclusively borrowed buffer of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(GuardError::Io { op: "recv", source: io::Error::last_os_error() });
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= NLMSG_HDR {
                let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                if len < NLMSG_HDR || len > rest.len() {
                    return Err(GuardError::Malformed("netlink message length"));
                }
                let mty = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                if seq == self.seq {
                    return Ok((mty, rest[NLMSG_HDR..len].to_vec()));
                }
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
            }
        }
    }

    /// Sends a request that is answered by an acknowledgement.
    fn acked(&mut self, ty: u16, flags: u16, body: &[u8], op: impl Fn() -> String) -> Result<(), GuardError> {
        let (mty, answer) = self.request(ty, flags | NLM_F_ACK, body)?;
        if mty != NLMSG_ERROR || answer.len() < 4 {
            return Err(GuardError::Malformed("acknowledgement"));
        }
        match i32::from_ne_bytes(answer[0..4].try_into().expect("4 bytes")) {
            0 => Ok(()),
            e => Err(GuardError::Refused { op: op(), source: io::Error::from_raw_os_error(-e) }),
        }
    }

    fn rule(&mut self, add: bool, rule: &Rule) -> Result<(), GuardError> {
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action; u32 flags.
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, FR_ACT_BLACKHOLE, 0, 0, 0, 0];
        if let Some(a) = rule.to {
            body[1] = 32;
            attr(&mut body, FRA_DST, &a.octets());
        }
        if let Some(a) = rule.from {
            body[2] = 32;
            attr(&mut body, FRA_SRC, &a.octets());
        }
        let mut name = rule.iif.as_bytes().to_vec();
        name.push(0);
        attr(&mut body, FRA_IIFNAME, &name);
        attr(&mut body, FRA_PRIORITY, &RULE_PRIORITY.to_ne_bytes());
        let (ty, flags, verb) =
            if add { (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, "add") } else { (RTM_DELRULE, 0, "delete") };
        self.acked(ty, flags, &body, || format!("{verb} the rule `{rule}`"))
    }

    fn master(&mut self, index: u32) -> Result<Option<u32>, GuardError> {
        // struct ifinfomsg: family, pad, type u16, index i32, flags u32, change u32.
        let mut body = vec![0u8; 16];
        body[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        let (mty, answer) = self.request(RTM_GETLINK, 0, &body)?;
        if mty == NLMSG_ERROR {
            let e = answer.get(0..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
            return Err(GuardError::Refused {
                op: format!("describe interface {index}"),
                source: io::Error::from_raw_os_error(-e),
            });
        }
        if mty != RTM_NEWLINK || answer.len() < 16 {
            return Err(GuardError::Malformed("RTM_GETLINK"));
        }
        let mut attrs = &answer[16..];
        while attrs.len() >= 4 {
            let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
            let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if len < 4 || len > attrs.len() {
                return Err(GuardError::Malformed("interface attribute"));
            }
            if ty == IFLA_MASTER && len == 8 {
                return Ok(Some(u32::from_ne_bytes(attrs[4..8].try_into().expect("4 bytes"))));
            }
            attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
        }
        Ok(None)
    }
}

/// The index of the master (bridge) of interface `index`, if it has one.
pub fn master_of(index: u32) -> Result<Option<u32>, GuardError> {
    Netlink::open()?.master(index)
}

/// FIB rules that keep the host's kernel from acting on the packets the
/// tunnel takes; removed on drop.
#[derive(Debug)]
pub struct KernelGuard {
    rules: Vec<Rule>,
}

impl KernelGuard {
    /// Adds `rules` (all or none: a failure removes those already added).
    pub fn install(rules: Vec<Rule>) -> Result<KernelGuard, GuardError> {
        let mut nl = Netlink::open()?;
        let mut guard = KernelGuard { rules: Vec::with_capacity(rules.len()) };
        for r in rules {
            nl.rule(true, &r)?;
            guard.rules.push(r);
        }
        Ok(guard)
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
}

impl Drop for KernelGuard {
    fn drop(&mut self) {
        if self.rules.is_empty() {
            return;
        }
        // Best effort: a rule that cannot be removed is left behind, and said so.
        match Netlink::open() {
            Ok(mut nl) => {
                for r in &self.rules {
                    if let Err(e) = nl.rule(false, r) {
                        eprintln!("wanmig-tunnel: {e}: {}", e.source_text());
                    }
                }
            }
            Err(e) => eprintln!("wanmig-tunnel: cannot remove the rules {:?}: {e}", self.rules),
        }
    }
}

impl GuardError {
    fn source_text(&self) -> String {
        std::error::Error::source(self).map(|s| s.to_string()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut b = Vec::new();
        attr(&mut b, FRA_IIFNAME, b"br0\0");
        attr(&mut b, FRA_IIFNAME, b"eth10\0");
        assert_eq!(b.len(), 8 + 12);
        assert_eq!(u16::from_ne_bytes([b[8], b[9]]), 10, "the length excludes the padding");
        let r = Rule { to: Some(Ipv4Addr::new(10, 0, 0, 5)), from: None, iif: "br0".into() };
        assert_eq!(r.to_string(), "to 10.0.0.5 iif br0 pref 9000 blackhole");
    }

    #[test]
    fn loopback_has_no_master() {
        let lo = crate::link::if_index("lo").expect("lo");
        assert_eq!(master_of(lo).expect("RTM_GETLINK"), None);
    }
}
