//! The common topology: two hosts joined by the emulated link.
//!
//! ```text
//!   namespace A                                     namespace B
//!   wan 10.200.0.1/30 ══ TAP ══ LinkEmulator ══ TAP ══ wan 10.200.0.2/30
//! ```
//!
//! Each side is a fresh network namespace holding one TAP device, `wan`,
//! with its address, up, IPv6 off (no router solicitations or DAD on the
//! link), and TCP buffers large enough for a 1 Gbit/s × 100 ms path.
//! Dropping the [`WanPair`] (also while a panic unwinds) stops the
//! emulator and deletes both namespaces with everything in them.

use std::net::Ipv4Addr;

use crate::emulator::{Counters, Direction, EmulatorError, LinkConfig, LinkControl, LinkEmulator};
use crate::netns::{Netns, NetnsError};

/// Errors building the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The tag cannot be part of a namespace name.
    #[error("`{0}` is not a usable tag (1 to 16 of [A-Za-z0-9])")]
    BadTag(String),
    /// The addresses do not make a subnet.
    #[error("{a} and {b} are not two host addresses of one /{prefix_len}")]
    BadAddresses {
        /// Side A's address.
        a: Ipv4Addr,
        /// Side B's address.
        b: Ipv4Addr,
        /// The prefix length.
        prefix_len: u8,
    },
    /// Setting up a namespace failed.
    #[error("namespace setup")]
    Netns(#[from] NetnsError),
    /// Starting the emulator failed.
    #[error("link emulator")]
    Emulator(#[from] EmulatorError),
}

/// Two namespaces joined by an emulated link; see the module doc.
#[derive(Debug)]
pub struct WanPair {
    // Field order is drop order: the emulator (and its TAPs) first.
    link: LinkEmulator,
    a: Netns,
    b: Netns,
    addr_a: Ipv4Addr,
    addr_b: Ipv4Addr,
}

/// Whether `a` and `b` are distinct host addresses (neither the network
/// nor the broadcast address) of the same /`len`.
fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, len: u8) -> bool {
    if !(1..=30).contains(&len) || a == b {
        return false;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    let host = |x: Ipv4Addr| {
        let h = u32::from(x) & !mask;
        h != 0 && h != !mask
    };
    (u32::from(a) & mask) == (u32::from(b) & mask) && host(a) && host(b)
}

impl WanPair {
    /// The name of the TAP device on each side.
    pub const TAP: &'static str = "wan";

    /// Namespaces `lk<pid><tag>a` and `…b`, addresses 10.200.0.1/30 (A)
    /// and 10.200.0.2/30 (B), the link as `config` says.
    pub fn new(tag: &str, config: LinkConfig) -> Result<Self, TopologyError> {
        Self::with_addresses(tag, config, Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 2), 30)
    }

    /// The same with the given addresses on a /`prefix_len`.
    pub fn with_addresses(
        tag: &str,
        config: LinkConfig,
        addr_a: Ipv4Addr,
        addr_b: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<Self, TopologyError> {
        if tag.is_empty() || tag.len() > 16 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(TopologyError::BadTag(tag.to_string()));
        }
        if !same_subnet(addr_a, addr_b, prefix_len) {
            return Err(TopologyError::BadAddresses { a: addr_a, b: addr_b, prefix_len });
        }
        let pid = std::process::id();
        // Each is deleted on drop if a later step fails.
        let a = Netns::new(&format!("lk{pid}{tag}a"))?;
        let b = Netns::new(&format!("lk{pid}{tag}b"))?;
        for ns in [&a, &b] {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
            // Room for 2 × 1 Gbit/s × 100 ms in flight.
            ns.sysctl("net.ipv4.tcp_rmem", "4096 131072 33554432")?;
            ns.sysctl("net.ipv4.tcp_wmem", "4096 131072 33554432")?;
        }
        let link = LinkEmulator::start(a.name(), Self::TAP, b.name(), Self::TAP, config)?;
        for (ns, addr) in [(&a, addr_a), (&b, addr_b)] {
            ns.ip(&format!("addr add {addr}/{prefix_len} dev {}", Self::TAP))?;
            ns.ip(&format!("link set {} up", Self::TAP))?;
        }
        Ok(WanPair { link, a, b, addr_a, addr_b })
    }

    /// Side A's namespace.
    pub fn a(&self) -> &Netns {
        &self.a
    }

    /// Side B's namespace.
    pub fn b(&self) -> &Netns {
        &self.b
    }

    /// Side A's address.
    pub fn addr_a(&self) -> Ipv4Addr {
        self.addr_a
    }

    /// Side B's address.
    pub fn addr_b(&self) -> Ipv4Addr {
        self.addr_b
    }

    /// The emulator.
    pub fn emulator(&self) -> &LinkEmulator {
        &self.link
    }

    /// A handle to control the link.
    pub fn control(&self) -> LinkControl {
        self.link.control()
    }

    /// One direction's counters.
    pub fn counters(&self, d: Direction) -> Counters {
        self.link.control().counters(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_checked() {
        let ip = |d| Ipv4Addr::new(10, 0, 0, d);
        assert!(same_subnet(ip(1), ip(2), 30));
        assert!(!same_subnet(ip(0), ip(1), 30), "network address");
        assert!(!same_subnet(ip(2), ip(3), 30), "broadcast address");
        assert!(!same_subnet(ip(2), ip(5), 30), "two /30s");
        assert!(!same_subnet(ip(1), ip(1), 24), "the same address");
        assert!(same_subnet(ip(1), ip(200), 24));
        assert!(!same_subnet(ip(1), ip(2), 31), "no broadcast-free /31 here");
        assert!(!same_subnet(ip(1), ip(2), 0));
    }

    #[test]
    fn bad_tags_are_refused_before_anything_is_created() {
        for tag in ["", "a/b", "x y", "much-too-long-a-tag", "é"] {
            let e = WanPair::new(tag, LinkConfig::default()).expect_err(tag);
            assert!(matches!(e, TopologyError::BadTag(_)), "{tag}: {e}");
        }
        let e = WanPair::with_addresses("t", LinkConfig::default(), Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 30)
            .expect_err("same address");
        assert!(matches!(e, TopologyError::BadAddresses { .. }), "{e}");
    }
}
