//! Undoing the kernel's offloads on captured packets.
//!
//! A packet socket sees a packet as the kernel holds it, which is not always
//! as it will leave a NIC: a TCP sender's segments may still be one 64 KiB
//! GSO super-packet whose checksum a NIC was to complete, and a bridge
//! passes such packets on unchanged. With `PACKET_VNET_HDR` the kernel says
//! so in a `virtio_net_hdr` before each frame. The tunnel carries ordinary
//! packets only, so [`split`] completes partial checksums and cuts TCP and
//! UDP GSO packets into the segments they stand for, as a NIC would.

use std::net::Ipv4Addr;

use crate::packet::{self, Ipv4, PROTO_TCP, PROTO_UDP};

/// Length of the `virtio_net_hdr` the kernel puts before each frame.
pub const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_UDP_L4: u8 = 5;
const GSO_ECN: u8 = 0x80;

/// Why a captured packet cannot be turned into ordinary packets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// A GSO type the tunnel does not segment (UDP fragmentation offload,
    /// IPv6).
    #[error("unsupported GSO type {0}")]
    Unsupported(u8),
    /// The header's offsets or the packet's own headers do not fit together.
    #[error("inconsistent offload metadata: {0}")]
    Inconsistent(&'static str),
}

/// The `virtio_net_hdr` of a captured frame (host byte order, as the kernel
/// writes it for packet sockets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (a hint; recomputed here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Reads the header from the first [`VNET_HDR_LEN`] bytes.
    pub fn parse(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        VnetHdr { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) }
    }

    /// Whether the packet is a single, complete packet (no checksum to
    /// finish, no segmentation).
    pub fn is_plain(&self) -> bool {
        self.flags & F_NEEDS_CSUM == 0 && self.gso_type & !GSO_ECN == GSO_NONE
    }
}

/// Turns the IPv4 packet `ip` (of a frame whose link header was `link_len`
/// bytes), as described by `vnet`, into the ordinary packets it stands for,
/// each handed to `emit`.
pub fn split(
    vnet: &VnetHdr,
    link_len: usize,
    ip: &Ipv4<'_>,
    mut emit: impl FnMut(Vec<u8>),
) -> Result<(), OffloadError> {
    match vnet.gso_type & !GSO_ECN {
        GSO_NONE => {
            let mut p = ip.bytes().to_vec();
            if vnet.flags & F_NEEDS_CSUM != 0 {
                let start = usize::from(vnet.csum_start)
                    .checked_sub(link_len)
                    .filter(|&s| s >= ip.header_len())
                    .ok_or(OffloadError::Inconsistent("checksum starts inside the IPv4 header"))?;
                let at = start + usize::from(vnet.csum_offset);
                if at + 2 > p.len() {
                    return Err(OffloadError::Inconsistent("checksum field past the packet"));
                }
                // The field holds the pseudo-header sum: summing over it
                // completes the checksum, as skb_checksum_help does.
                let mut c = packet::checksum(0, &p[start..]);
                if c == 0 && ip.protocol() == PROTO_UDP {
                    c = 0xffff;
                }
                p[at..at + 2].copy_from_slice(&c.to_be_bytes());
            }
            emit(p);
            Ok(())
        }
        GSO_TCPV4 => segment_tcp(vnet, ip, emit),
        GSO_UDP_L4 => segment_udp(vnet, ip, emit),
        other => Err(OffloadError::Unsupported(other)),
    }
}

fn gso_size(vnet: &VnetHdr, ip: &Ipv4<'_>) -> Result<usize, OffloadError> {
    if vnet.gso_size == 0 {
        return Err(OffloadError::Inconsistent("GSO packet with a segment size of 0"));
    }
    if ip.is_fragment() {
        return Err(OffloadError::Inconsistent("GSO packet that is a fragment"));
    }
    Ok(usize::from(vnet.gso_size))
}

/// The transport checksum of `segment` (transport header with its checksum
/// field at `field`, then data) from `src` to `dst`.
fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &mut [u8], field: usize) {
    segment[field..field + 2].fill(0);
    let sum = packet::pseudo_header_sum(src, dst, proto, segment.len());
    let mut c = packet::checksum(sum, segment);
    if c == 0 && proto == PROTO_UDP {
        c = 0xffff;
    }
    segment[field..field + 2].copy_from_slice(&c.to_be_bytes());
}

/// One segment: the IPv4 header of `ip` with the `n`-th identification, then
/// `l4_header`, then `data`.
fn build(ip: &Ipv4<'_>, n: usize, l4_header: &[u8], data: &[u8]) -> Vec<u8> {
    let h = &ip.bytes()[..ip.header_len()];
    let mut p = Vec::with_capacity(h.len() + l4_header.len() + data.len());
    p.extend_from_slice(h);
    let id = u16::from_be_bytes([h[4], h[5]]).wrapping_add(n as u16);
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p.extend_from_slice(l4_header);
    p.extend_from_slice(data);
    packet::ipv4_fix_header(&mut p);
    p
}

fn segment_tcp(vnet: &VnetHdr, ip: &Ipv4<'_>, mut emit: impl FnMut(Vec<u8>)) -> Result<(), OffloadError> {
    let mss = gso_size(vnet, ip)?;
    if ip.protocol() != PROTO_TCP {
        return Err(OffloadError::Inconsistent("TCP GSO packet that is not TCP"));
    }
    let l4 = ip.payload();
    let thl = l4.get(12).map(|b| usize::from(b >> 4) * 4).filter(|&n| n >= 20 && n <= l4.len());
    let thl = thl.ok_or(OffloadError::Inconsistent("TCP header length"))?;
    let (th, data) = l4.split_at(thl);
    let seq0 = u32::from_be_bytes([th[4], th[5], th[6], th[7]]);
    let flags = th[13];
    let count = data.len().div_ceil(mss).max(1);
    for (i, chunk) in data.chunks(mss).chain(data.is_empty().then_some(&[][..])).enumerate() {
        let mut h = th.to_vec();
        h[4..8].copy_from_slice(&seq0.wrapping_add((i * mss) as u32).to_be_bytes());
        // FIN and PSH belong to the last segment; CWR to the first.
        let (fin_psh, cwr) = (0x01 | 0x08, 0x80);
        let mut f = flags;
        if i + 1 < count {
            f &= !fin_psh;
        }
        if i > 0 {
            f &= !cwr;
        }
        h[13] = f;
        let mut p = build(ip, i, &h, chunk);
        let at = ip.header_len();
        transport_checksum(ip.src(), ip.dst(), PROTO_TCP, &mut p[at..], 16);
        emit(p);
    }
    Ok(())
}

fn segment_udp(vnet: &VnetHdr, ip: &Ipv4<'_>, mut emit: impl FnMut(Vec<u8>)) -> Result<(), OffloadError> {
    let size = gso_size(vnet, ip)?;
    if ip.protocol() != PROTO_UDP || ip.payload().len() < 8 {
        return Err(OffloadError::Inconsistent("UDP GSO packet that is not UDP"));
    }
    let (uh, data) = ip.payload().split_at(8);
    for (i, chunk) in data.chunks(size).enumerate() {
        let mut h = uh.to_vec();
        h[4..6].copy_from_slice(&((8 + chunk.len()) as u16).to_be_bytes());
        let mut p = build(ip, i, &h, chunk);
        let at = ip.header_len();
        transport_checksum(ip.src(), ip.dst(), PROTO_UDP, &mut p[at..], 6);
        emit(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::{ETH_HEADER, ipv4_fix_header, pseudo_header_sum};

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
    const DST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);

    /// A TCP super-packet as a sender's stack leaves it for TSO: correct IP
    /// header, the pseudo-header sum (not complemented) in the TCP checksum.
    fn tcp_super(data: &[u8], flags: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0x10, 0x00, 0x40, 0, 64, PROTO_TCP, 0, 0];
        p.extend_from_slice(&SRC.octets());
        p.extend_from_slice(&DST.octets());
        // ports, seq 0xfffffff0 (to wrap), ack, offset 5, flags, window
        p.extend_from_slice(&[0x12, 0x34, 0x00, 0x07, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff]);
        p.extend_from_slice(&[0, 0, 0, 0]);
        p.extend_from_slice(data);
        ipv4_fix_header(&mut p);
        let partial = packet::fold(pseudo_header_sum(SRC, DST, PROTO_TCP, 20 + data.len()));
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        p
    }

    fn tso(mss: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: mss,
            csum_start: (ETH_HEADER + 20) as u16,
            csum_offset: 16,
        }
    }

    fn valid_tcp(p: &[u8]) -> (u32, u8, Vec<u8>) {
        let ip = Ipv4::parse(p).expect("a valid IPv4 segment");
        let l4 = ip.payload();
        assert_eq!(packet::checksum(pseudo_header_sum(ip.src(), ip.dst(), PROTO_TCP, l4.len()), l4), 0, "TCP checksum");
        (u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]), l4[13], l4[20..].to_vec())
    }

    fn run(vnet: &VnetHdr, p: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let ip = Ipv4::parse(p).expect("super-packet");
        let mut out = Vec::new();
        split(vnet, ETH_HEADER, &ip, |s| out.push(s))?;
        Ok(out)
    }

    #[test]
    fn tso_packets_become_the_segments_a_nic_would_send() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let segs = run(&tso(1000), &tcp_super(&data, 0x80 | 0x08 | 0x01 | 0x10)).expect("split");
        assert_eq!(segs.len(), 3);
        let got: Vec<_> = segs.iter().map(|s| valid_tcp(s)).collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0xfffffff0, 984, 1984]);
        // CWR only first; FIN and PSH only last; ACK everywhere.
        assert_eq!(got.iter().map(|g| g.1).collect::<Vec<_>>(), vec![0x90, 0x10, 0x19]);
        assert_eq!(got.iter().flat_map(|g| g.2.clone()).collect::<Vec<_>>(), data);
        // IP identification counts up.
        assert_eq!(segs.iter().map(|s| s[5]).collect::<Vec<_>>(), vec![0, 1, 2]);
    }

    #[test]
    fn partial_checksums_are_completed() {
        let p = tcp_super(b"abc", 0x18);
        let mut vnet = tso(0);
        vnet.gso_type = GSO_NONE;
        let out = run(&vnet, &p).expect("complete");
        assert_eq!(out.len(), 1);
        assert_eq!(valid_tcp(&out[0]).2, b"abc");
        // Without NEEDS_CSUM nothing changes.
        assert_eq!(run(&VnetHdr::default(), &p).expect("plain"), vec![p.clone()]);
        // Offsets outside the packet are refused, not followed.
        vnet.csum_offset = 60;
        assert!(run(&vnet, &p).is_err());
        vnet.csum_offset = 16;
        vnet.csum_start = 20;
        assert!(run(&vnet, &p).is_err());
    }

    #[test]
    fn udp_gso_and_unsupported_types() {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, PROTO_UDP, 0, 0];
        p.extend_from_slice(&SRC.octets());
        p.extend_from_slice(&DST.octets());
        p.extend_from_slice(&[0x30, 0x39, 0, 7, 0, 0, 0, 0]);
        p.extend((0..250u32).map(|i| i as u8));
        ipv4_fix_header(&mut p);
        let vnet = VnetHdr { gso_type: GSO_UDP_L4, gso_size: 100, ..VnetHdr::default() };
        let segs = run(&vnet, &p).expect("split");
        assert_eq!(segs.iter().map(|s| s.len()).collect::<Vec<_>>(), vec![128, 128, 78]);
        for s in &segs {
            let ip = Ipv4::parse(s).expect("valid");
            let l4 = ip.payload();
            assert_eq!(usize::from(u16::from_be_bytes([l4[4], l4[5]])), l4.len());
            assert_eq!(packet::checksum(pseudo_header_sum(SRC, DST, PROTO_UDP, l4.len()), l4), 0);
        }
        assert_eq!(run(&VnetHdr { gso_type: 3, gso_size: 100, ..vnet }, &p), Err(OffloadError::Unsupported(3)));
        assert!(run(&VnetHdr { gso_size: 0, ..vnet }, &p).is_err());
        // A TCP GSO header on a UDP packet.
        assert!(run(&tso(100), &p).is_err());
    }

    proptest! {
        #[test]
        fn segments_carry_exactly_the_stream(len in 0usize..5000, mss in 1u16..1500) {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let segs = run(&tso(mss), &tcp_super(&data, 0x18)).expect("split");
            prop_assert_eq!(segs.len(), len.div_ceil(usize::from(mss)).max(1));
            let mut next = 0xfffffff0u32;
            let mut all = Vec::new();
            for s in &segs {
                prop_assert!(s.len() <= 40 + usize::from(mss));
                let (seq, _, d) = valid_tcp(s);
                prop_assert_eq!(seq, next);
                next = next.wrapping_add(d.len() as u32);
                all.extend(d);
            }
            prop_assert_eq!(all, data);
        }

        #[test]
        fn any_metadata_never_panics(hdr in any::<[u8; VNET_HDR_LEN]>(), len in 0usize..300) {
            let p = tcp_super(&vec![1; len], 0x10);
            let vnet = VnetHdr::parse(&hdr);
            let ip = Ipv4::parse(&p).expect("valid");
            let _ = split(&vnet, ETH_HEADER, &ip, |s| assert!(s.len() <= p.len() + 60));
        }
    }
}
