//! Ethernet II, ARP (IPv4 over Ethernet) and IPv4 headers: parsing that
//! checks every length and field it relies on, and the few frames the tunnel
//! builds (ARP replies and requests, gratuitous ARP, Ethernet around an IPv4
//! packet).
//!
//! Everything parsed here comes from a network segment or from the peer, so
//! every parser takes any bytes and returns an error rather than panic; a
//! property test holds them to that.

use std::net::Ipv4Addr;

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Length of an Ethernet II header (no VLAN tag).
pub const ETH_HEADER: usize = 14;
/// Length of an ARP packet for IPv4 over Ethernet.
pub const ARP_LEN: usize = 28;
/// Length of an IPv4 header without options.
pub const IPV4_MIN_HEADER: usize = 20;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Why bytes are not the packet they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than a header or a length field needs.
    #[error("{what} truncated: needs {need} bytes, has {have}")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there are.
        have: usize,
    },
    /// A field holds a value this parser does not accept.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The field.
        what: &'static str,
        /// Why.
        reason: &'static str,
    },
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), PacketError> {
    if buf.len() < n {
        return Err(PacketError::Truncated { what, need: n, have: buf.len() });
    }
    Ok(())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

fn mac_at(b: &[u8], at: usize) -> MacAddr {
    MacAddr([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5]])
}

pub use wanmig_types::MacAddr;

/// Whether a host may send unicast to `ip`: not unspecified, loopback,
/// multicast, limited broadcast or reserved (240/4). (A subnet's directed
/// broadcast cannot be told from here: the prefix is not known.)
pub fn is_unicast_ip(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast() || ip.octets()[0] >= 240)
}

/// A parsed Ethernet II frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ethernet<'a> {
    /// Destination address.
    pub dst: MacAddr,
    /// Source address.
    pub src: MacAddr,
    /// EtherType (a VLAN tag shows as 0x8100: the tunnel carries untagged
    /// frames only).
    pub ethertype: u16,
    /// What follows the header, padding included.
    pub payload: &'a [u8],
}

impl<'a> Ethernet<'a> {
    /// Parses the header of `frame`.
    pub fn parse(frame: &'a [u8]) -> Result<Self, PacketError> {
        need("Ethernet header", frame, ETH_HEADER)?;
        Ok(Ethernet {
            dst: mac_at(frame, 0),
            src: mac_at(frame, 6),
            ethertype: be16(frame, 12),
            payload: &frame[ETH_HEADER..],
        })
    }
}

/// An Ethernet II frame around `payload`.
pub fn ethernet_frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETH_HEADER + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// Who has `tpa`? Tell `spa`.
    Request,
    /// `spa` is at `sha`.
    Reply,
}

impl ArpOp {
    fn code(self) -> u16 {
        match self {
            ArpOp::Request => 1,
            ArpOp::Reply => 2,
        }
    }
}

/// An ARP packet for IPv4 over Ethernet (RFC 826).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Request or reply.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sha: MacAddr,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: MacAddr,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// Parses an ARP packet (the payload of an ARP frame; Ethernet padding
    /// after the 28 bytes is ignored). Anything but Ethernet/IPv4 requests
    /// and replies is refused.
    pub fn parse(b: &[u8]) -> Result<Self, PacketError> {
        need("ARP packet", b, ARP_LEN)?;
        if be16(b, 0) != 1 || be16(b, 2) != ETHERTYPE_IPV4 || b[4] != 6 || b[5] != 4 {
            return Err(PacketError::Invalid { what: "ARP packet", reason: "not IPv4 over Ethernet" });
        }
        let op = match be16(b, 6) {
            1 => ArpOp::Request,
            2 => ArpOp::Reply,
            _ => return Err(PacketError::Invalid { what: "ARP operation", reason: "neither request nor reply" }),
        };
        Ok(Arp { op, sha: mac_at(b, 8), spa: ip_at(b, 14), tha: mac_at(b, 18), tpa: ip_at(b, 24) })
    }

    /// The 28 bytes of the packet.
    pub fn to_bytes(&self) -> [u8; ARP_LEN] {
        let mut b = [0u8; ARP_LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes());
        b[2..4].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        b[4] = 6;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.code().to_be_bytes());
        b[8..14].copy_from_slice(&self.sha.0);
        b[14..18].copy_from_slice(&self.spa.octets());
        b[18..24].copy_from_slice(&self.tha.0);
        b[24..28].copy_from_slice(&self.tpa.octets());
        b
    }

    /// This packet in an Ethernet frame from `src` to `dst`.
    pub fn frame(&self, dst: MacAddr, src: MacAddr) -> Vec<u8> {
        ethernet_frame(dst, src, ETHERTYPE_ARP, &self.to_bytes())
    }
}

/// The frame answering `request` with "`request.tpa` is at `mac`", sent
/// from `mac` to the requester.
pub fn arp_reply(request: &Arp, mac: MacAddr) -> Vec<u8> {
    Arp { op: ArpOp::Reply, sha: mac, spa: request.tpa, tha: request.sha, tpa: request.spa }.frame(request.sha, mac)
}

/// A gratuitous ARP request announcing "`ip` is at `mac`", broadcast from
/// `mac`, as `arping -U` sends it (target hardware address broadcast,
/// target protocol address the announced one).
pub fn gratuitous_request(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    Arp { op: ArpOp::Request, sha: mac, spa: ip, tha: MacAddr::BROADCAST, tpa: ip }.frame(MacAddr::BROADCAST, mac)
}

/// A gratuitous ARP reply announcing "`ip` is at `mac`", broadcast from
/// `mac`, as `arping -A` sends it (target hardware address the sender's).
pub fn gratuitous_reply(mac: MacAddr, ip: Ipv4Addr) -> Vec<u8> {
    Arp { op: ArpOp::Reply, sha: mac, spa: ip, tha: mac, tpa: ip }.frame(MacAddr::BROADCAST, mac)
}

/// A unicast ARP request to `to`: "who has `target` (at `to`)? tell
/// `sender_ip` at `sender_mac`". A Linux host that receives a request for
/// one of its addresses updates (or creates) its neighbour entry of the
/// sender: this is how a host is told that `sender_ip` has moved.
pub fn arp_request(to: MacAddr, target: Ipv4Addr, sender_mac: MacAddr, sender_ip: Ipv4Addr) -> Vec<u8> {
    Arp { op: ArpOp::Request, sha: sender_mac, spa: sender_ip, tha: MacAddr::ZERO, tpa: target }.frame(to, sender_mac)
}

/// The Internet checksum (RFC 1071) of `data` with `initial` (a partial
/// one's-complement sum, e.g. of a pseudo-header) added in.
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    !fold(ones_sum(initial, data))
}

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd
/// last byte padded with zero), added to `sum`, not yet folded.
pub fn ones_sum(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum = add_folding(sum, u32::from(u16::from_be_bytes([w[0], w[1]])));
    }
    if let [last] = words.remainder() {
        sum = add_folding(sum, u32::from(*last) << 8);
    }
    sum
}

fn add_folding(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    // A carry out of 32 bits is worth 2^32 ≡ 1 (mod 2^16 - 1).
    s + u32::from(carry)
}

/// Folds a 32-bit one's-complement sum into 16 bits.
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A well-formed IPv4 packet: version 4, a header length of at least 20
/// bytes within the packet, a total length covering the header, and a
/// correct header checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4<'a> {
    bytes: &'a [u8],
    header_len: usize,
}

impl<'a> Ipv4<'a> {
    /// Parses a packet that must be exactly `total length` bytes long (a
    /// packet from the peer: no trailing bytes are carried).
    pub fn parse(b: &'a [u8]) -> Result<Self, PacketError> {
        let p = Self::parse_padded(b)?;
        if p.bytes.len() != b.len() {
            return Err(PacketError::Invalid { what: "IPv4 total length", reason: "shorter than the packet" });
        }
        Ok(p)
    }

    /// Parses a packet that may be followed by link-layer padding (the
    /// payload of an Ethernet frame); the packet ends at its total length.
    pub fn parse_padded(b: &'a [u8]) -> Result<Self, PacketError> {
        need("IPv4 header", b, IPV4_MIN_HEADER)?;
        if b[0] >> 4 != 4 {
            return Err(PacketError::Invalid { what: "IP version", reason: "not 4" });
        }
        let header_len = usize::from(b[0] & 0x0f) * 4;
        if header_len < IPV4_MIN_HEADER {
            return Err(PacketError::Invalid { what: "IPv4 header length", reason: "below 20 bytes" });
        }
        need("IPv4 header with options", b, header_len)?;
        let total = usize::from(be16(b, 2));
        if total < header_len {
            return Err(PacketError::Invalid { what: "IPv4 total length", reason: "shorter than the header" });
        }
        need("IPv4 packet", b, total)?;
        if checksum(0, &b[..header_len]) != 0 {
            return Err(PacketError::Invalid { what: "IPv4 header checksum", reason: "does not match" });
        }
        Ok(Ipv4 { bytes: &b[..total], header_len })
    }

    /// The whole packet (up to its total length).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Header length in bytes.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// What follows the header.
    pub fn payload(&self) -> &'a [u8] {
        &self.bytes[self.header_len..]
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        ip_at(self.bytes, 12)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        ip_at(self.bytes, 16)
    }

    /// The transport protocol number.
    pub fn protocol(&self) -> u8 {
        self.bytes[9]
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.bytes[8]
    }

    /// Whether this is a fragment (more fragments follow, or not the first).
    pub fn is_fragment(&self) -> bool {
        be16(self.bytes, 6) & 0x3fff != 0
    }
}

/// Sets the total length and recomputes the header checksum of the IPv4
/// header at the start of `packet` (whose header length field is trusted:
/// only for headers this crate checked or built).
pub fn ipv4_fix_header(packet: &mut [u8]) {
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total = u16::try_from(packet.len()).expect("IPv4 packets are below 64 KiB");
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    packet[10..12].fill(0);
    let c = checksum(0, &packet[..header_len]);
    packet[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The one's-complement sum of the IPv4 pseudo-header of a transport
/// segment of `len` bytes.
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = protocol;
    p[10..12].copy_from_slice(&(len as u16).to_be_bytes());
    ones_sum(0, &p)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const A: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0a]);
    const B: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x0b]);

    /// A minimal UDP packet from `src` to `dst` with a correct header checksum.
    pub(crate) fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_UDP, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0x30, 0x39, 0x00, 0x07]);
        p.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        ipv4_fix_header(&mut p);
        p
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3's worked example: the sum of these words is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(ones_sum(0, &data)), 0xddf2);
        assert_eq!(checksum(0, &data), !0xddf2);
        // An odd length pads with zero.
        assert_eq!(fold(ones_sum(0, &[0xab])), 0xab00);
        // A known IPv4 header (from Wikipedia's checksum article): b861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(checksum(0, &h), 0xb861);
    }

    #[test]
    fn ipv4_checks_every_field_it_relies_on() {
        let (s, d) = (Ipv4Addr::new(10, 0, 1, 5), Ipv4Addr::new(10, 0, 1, 10));
        let p = udp_packet(s, d, b"hello");
        let ip = Ipv4::parse(&p).expect("valid");
        assert_eq!((ip.src(), ip.dst(), ip.protocol(), ip.ttl()), (s, d, PROTO_UDP, 64));
        assert_eq!(ip.payload().len(), 13);
        assert!(!ip.is_fragment());
        // Link-layer padding is allowed only where asked for.
        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(Ipv4::parse_padded(&padded).expect("padded").bytes(), &p[..]);
        assert!(Ipv4::parse(&padded).is_err());
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut q = p.clone();
            f(&mut q);
            Ipv4::parse(&q).expect_err("refused")
        };
        assert!(matches!(bad(&|q| q[0] = 0x65), PacketError::Invalid { what: "IP version", .. }));
        assert!(matches!(bad(&|q| q[0] = 0x44), PacketError::Invalid { what: "IPv4 header length", .. }));
        assert!(matches!(bad(&|q| q[0] = 0x4f), PacketError::Truncated { .. }));
        assert!(matches!(bad(&|q| q[2..4].copy_from_slice(&19u16.to_be_bytes())), PacketError::Invalid { .. }));
        assert!(matches!(bad(&|q| q[2..4].copy_from_slice(&100u16.to_be_bytes())), PacketError::Truncated { .. }));
        assert!(matches!(bad(&|q| q[8] ^= 1), PacketError::Invalid { what: "IPv4 header checksum", .. }));
        assert!(matches!(bad(&|q| q.truncate(19)), PacketError::Truncated { .. }));
        // Fragments parse and say so.
        let mut frag = p.clone();
        frag[6] = 0x20;
        ipv4_fix_header(&mut frag);
        assert!(Ipv4::parse(&frag).expect("fragment").is_fragment());
    }

    #[test]
    fn arp_builders_match_arping() {
        let ip = Ipv4Addr::new(10, 0, 1, 5);
        // arping -U: a broadcast request, target hardware broadcast.
        let f = gratuitous_request(A, ip);
        let e = Ethernet::parse(&f).expect("eth");
        assert_eq!((e.dst, e.src, e.ethertype), (MacAddr::BROADCAST, A, ETHERTYPE_ARP));
        assert_eq!(
            Arp::parse(e.payload).expect("arp"),
            Arp { op: ArpOp::Request, sha: A, spa: ip, tha: MacAddr::BROADCAST, tpa: ip }
        );
        assert_eq!(f.len(), ETH_HEADER + ARP_LEN);
        // arping -A: a broadcast reply, target hardware the sender's own.
        let f = gratuitous_reply(A, ip);
        let e = Ethernet::parse(&f).expect("eth");
        assert_eq!(e.dst, MacAddr::BROADCAST);
        assert_eq!(Arp::parse(e.payload).expect("arp"), Arp { op: ArpOp::Reply, sha: A, spa: ip, tha: A, tpa: ip });
        // A reply goes back to the requester, swapping the roles.
        let req = Arp { op: ArpOp::Request, sha: B, spa: Ipv4Addr::new(10, 0, 1, 10), tha: MacAddr::ZERO, tpa: ip };
        let f = arp_reply(&req, A);
        let e = Ethernet::parse(&f).expect("eth");
        assert_eq!((e.dst, e.src), (B, A));
        assert_eq!(
            Arp::parse(e.payload).expect("arp"),
            Arp { op: ArpOp::Reply, sha: A, spa: ip, tha: B, tpa: Ipv4Addr::new(10, 0, 1, 10) }
        );
        // Bytes on the wire, checked by hand against RFC 826's layout.
        assert_eq!(&f[12..22], &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    }

    #[test]
    fn arp_refuses_other_hardware_and_operations() {
        let ok = Arp { op: ArpOp::Request, sha: A, spa: Ipv4Addr::LOCALHOST, tha: B, tpa: Ipv4Addr::LOCALHOST };
        let mut b = ok.to_bytes();
        assert_eq!(Arp::parse(&b), Ok(ok));
        b[7] = 3; // RARP request
        assert!(Arp::parse(&b).is_err());
        let mut b = ok.to_bytes();
        b[4] = 8; // 8-byte hardware addresses
        assert!(Arp::parse(&b).is_err());
        assert!(matches!(Arp::parse(&b[..27]), Err(PacketError::Truncated { .. })));
        // Ethernet padding after the packet is fine.
        let mut padded = ok.to_bytes().to_vec();
        padded.resize(46, 0);
        assert_eq!(Arp::parse(&padded), Ok(ok));
    }

    #[test]
    fn addresses_parse_and_classify() {
        assert_eq!("02:00:00:00:00:0a".parse::<MacAddr>(), Ok(A));
        assert_eq!(A.to_string(), "02:00:00:00:00:0a");
        for bad in ["02:00:00:00:00", "02:00:00:00:00:0a:0b", "2:00:00:00:00:0a", "zz:00:00:00:00:0a", ""] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(A.is_unicast() && !MacAddr::BROADCAST.is_unicast() && !MacAddr::ZERO.is_unicast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(is_unicast_ip(Ipv4Addr::new(10, 1, 1, 5)));
        for ip in ["0.0.0.0", "127.0.0.1", "224.0.0.1", "255.255.255.255", "240.0.0.1"] {
            assert!(!is_unicast_ip(ip.parse().expect("ip")), "{ip}");
        }
        let json = serde_json::to_string(&A).expect("json");
        assert_eq!(json, "\"02:00:00:00:00:0a\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).expect("back"), A);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Ethernet::parse(&b);
            let _ = Arp::parse(&b);
            let _ = Ipv4::parse(&b);
            let _ = Ipv4::parse_padded(&b);
            // With a plausible first byte, deeper checks run too.
            let mut v = b.clone();
            if let Some(first) = v.first_mut() {
                *first = 0x45 | (*first & 0x0f);
            }
            if let Ok(p) = Ipv4::parse_padded(&v) {
                prop_assert!(p.bytes().len() <= v.len() && p.header_len() <= p.bytes().len());
                let _ = (p.payload(), p.src(), p.dst(), p.is_fragment());
            }
        }

        #[test]
        fn built_arp_frames_parse_back(sha in any::<[u8; 6]>(), spa in any::<u32>(), tpa in any::<u32>(), reply in any::<bool>()) {
            let a = Arp {
                op: if reply { ArpOp::Reply } else { ArpOp::Request },
                sha: MacAddr(sha),
                spa: Ipv4Addr::from(spa),
                tha: MacAddr::ZERO,
                tpa: Ipv4Addr::from(tpa),
            };
            let f = a.frame(MacAddr::BROADCAST, MacAddr(sha));
            let e = Ethernet::parse(&f).expect("eth");
            prop_assert_eq!(Arp::parse(e.payload), Ok(a));
        }

        #[test]
        fn any_corrupted_header_byte_is_caught(at in 0usize..20, flip in 1u8..=255, payload in prop::collection::vec(any::<u8>(), 0..64)) {
            let p = udp_packet(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), &payload);
            prop_assert!(Ipv4::parse(&p).is_ok());
            let mut q = p.clone();
            // In the first byte, change the version (a longer header length
            // would sum payload bytes too, which can match by chance).
            q[at] ^= if at == 0 { (flip & 0xf0).max(0x10) } else { flip };
            // One changed header byte: the checksum, or an earlier check, refuses it.
            prop_assert!(Ipv4::parse(&q).is_err());
        }
    }
}
