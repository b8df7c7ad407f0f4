//! What the tunnel does with each frame and each peer packet, with no I/O:
//! a frame or packet in, a [`Verdict`] or a [`DropReason`] out. The engine
//! ([`crate::engine`]) does the sending and the counting.
//!
//! | end | from | accepted | answered / carried |
//! |---|---|---|---|
//! | source | segment A: ARP request for a guest address | from any unicast host | ARP reply: guest address at our MAC |
//! | source | segment A: IPv4 to a guest address, to our MAC | well-formed | → peer |
//! | source | peer | well-formed IPv4, from a guest address to a unicast non-guest address | → host routing on segment A |
//! | destination | guest: ARP request for another address | from the guest's MAC and address | ARP reply: at our MAC |
//! | destination | guest: IPv4 from its MAC | well-formed, from a guest address, to a unicast address | → peer |
//! | destination | peer | well-formed IPv4 to a guest address from a unicast non-guest address | → guest, to its MAC |
//!
//! Everything else on the segment is not the tunnel's business and is
//! ignored; everything else from the guest or the peer is dropped and
//! counted by reason.

use std::net::Ipv4Addr;

use wanmig_wire::message::MAX_TUNNEL_PACKET;

use crate::packet::{
    self, Arp, ArpOp, ETHERTYPE_ARP, ETHERTYPE_IPV4, Ethernet, Ipv4, MacAddr, arp_reply, gratuitous_reply,
    gratuitous_request, is_unicast_ip,
};

/// Which end of the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The old host: answers for the guest on its old segment.
    Source,
    /// The new host: runs the guest.
    Destination,
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// From the peer: not a well-formed IPv4 packet.
    PeerMalformed,
    /// From the peer: not to (at the destination) or from (at the source)
    /// a guest address, or to or from one where it should not be.
    PeerWrongAddress,
    /// From the peer: to or from an address no host may unicast to.
    PeerNotUnicast,
    /// From the guest: a malformed IPv4 packet.
    GuestMalformed,
    /// From the guest's MAC but not from one of its addresses.
    GuestSpoofedSource,
    /// From the guest: broadcast or multicast, which the tunnel does not carry.
    GuestNotUnicast,
    /// A captured packet whose offload metadata cannot be undone.
    Offload,
    /// Larger than a tunnel packet may be.
    TooLarge,
    /// The queue toward the peer was full (the peer or the WAN is slower
    /// than the traffic).
    QueueFull,
    /// Sending on the host's interface failed.
    SendFailed,
    /// Another host on the segment claims a guest address.
    AddressConflict,
}

impl DropReason {
    /// Every reason, in [`DropReason::index`] order.
    pub const ALL: [DropReason; 11] = [
        DropReason::PeerMalformed,
        DropReason::PeerWrongAddress,
        DropReason::PeerNotUnicast,
        DropReason::GuestMalformed,
        DropReason::GuestSpoofedSource,
        DropReason::GuestNotUnicast,
        DropReason::Offload,
        DropReason::TooLarge,
        DropReason::QueueFull,
        DropReason::SendFailed,
        DropReason::AddressConflict,
    ];

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// What to do with a frame captured on the host's interface.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Not the tunnel's business.
    Ignore,
    /// Send this frame back out on the interface.
    Reply(Vec<u8>),
    /// Carry this packet to the peer (after undoing offloads).
    Tunnel {
        /// The packet.
        packet: Ipv4<'a>,
        /// Destination end: the guest sent it to a MAC address that is not
        /// ours, learnt before the move; this is the address it was for
        /// (see [`Policy::steer`]).
        stale_neighbour: Option<Ipv4Addr>,
    },
    /// Dropped, for this reason.
    Drop(DropReason),
}

/// The rules of one end.
#[derive(Debug, Clone)]
pub struct Policy {
    end: End,
    guest_ips: Vec<Ipv4Addr>,
    guest_mac: MacAddr,
    our_mac: MacAddr,
}

impl Policy {
    /// The rules of `end` for a guest with `guest_ips` and `guest_mac`, on an
    /// interface whose MAC is `our_mac`.
    pub fn new(end: End, guest_ips: Vec<Ipv4Addr>, guest_mac: MacAddr, our_mac: MacAddr) -> Self {
        Policy { end, guest_ips, guest_mac, our_mac }
    }

    fn is_guest(&self, ip: Ipv4Addr) -> bool {
        self.guest_ips.contains(&ip)
    }

    /// Decides what to do with a frame captured on the interface.
    pub fn on_frame<'a>(&self, frame: &'a [u8]) -> Verdict<'a> {
        let Ok(eth) = Ethernet::parse(frame) else { return Verdict::Ignore };
        if eth.src == self.our_mac {
            return Verdict::Ignore;
        }
        match (self.end, eth.ethertype) {
            (End::Source, ETHERTYPE_ARP) => self.source_arp(&eth),
            (End::Source, ETHERTYPE_IPV4) => self.source_ipv4(&eth),
            (End::Destination, _) if eth.src != self.guest_mac => Verdict::Ignore,
            (End::Destination, ETHERTYPE_ARP) => self.destination_arp(&eth),
            (End::Destination, ETHERTYPE_IPV4) => self.destination_ipv4(&eth),
            _ => Verdict::Ignore,
        }
    }

    fn source_arp(&self, eth: &Ethernet<'_>) -> Verdict<'static> {
        let Ok(arp) = Arp::parse(eth.payload) else { return Verdict::Ignore };
        if self.is_guest(arp.spa) && arp.sha != self.our_mac {
            // Someone on segment A uses a guest address: the guest is back,
            // or a conflict. Not answered for; counted.
            return Verdict::Drop(DropReason::AddressConflict);
        }
        if arp.op == ArpOp::Request && self.is_guest(arp.tpa) && arp.sha.is_unicast() && arp.spa != arp.tpa {
            return Verdict::Reply(arp_reply(&arp, self.our_mac));
        }
        Verdict::Ignore
    }

    fn source_ipv4<'a>(&self, eth: &Ethernet<'a>) -> Verdict<'a> {
        if eth.dst != self.our_mac {
            return Verdict::Ignore;
        }
        match Ipv4::parse_padded(eth.payload) {
            Ok(p) if self.is_guest(p.dst()) => Verdict::Tunnel { packet: p, stale_neighbour: None },
            // The host's own traffic, malformed or not, is its kernel's business.
            _ => Verdict::Ignore,
        }
    }

    fn destination_arp(&self, eth: &Ethernet<'_>) -> Verdict<'static> {
        let Ok(arp) = Arp::parse(eth.payload) else { return Verdict::Ignore };
        // The guest asking for a neighbour (its gateway, an on-link peer of
        // its old subnet): every one of them is at our MAC now. Not its own
        // announcements or probes (target one of its addresses, or 0).
        let asks_neighbour = arp.op == ArpOp::Request
            && arp.sha == self.guest_mac
            && self.is_guest(arp.spa)
            && !self.is_guest(arp.tpa)
            && is_unicast_ip(arp.tpa);
        if asks_neighbour { Verdict::Reply(arp_reply(&arp, self.our_mac)) } else { Verdict::Ignore }
    }

    fn destination_ipv4<'a>(&self, eth: &Ethernet<'a>) -> Verdict<'a> {
        let p = match Ipv4::parse_padded(eth.payload) {
            Ok(p) => p,
            Err(_) => return Verdict::Drop(DropReason::GuestMalformed),
        };
        if !self.is_guest(p.src()) {
            return Verdict::Drop(DropReason::GuestSpoofedSource);
        }
        if !eth.dst.is_unicast() || !is_unicast_ip(p.dst()) || self.is_guest(p.dst()) {
            return Verdict::Drop(DropReason::GuestNotUnicast);
        }
        let stale_neighbour = (eth.dst != self.our_mac).then_some(p.dst());
        Verdict::Tunnel { packet: p, stale_neighbour }
    }

    /// Checks a packet from the peer; the packet if it may be delivered.
    pub fn on_peer<'a>(&self, packet: &'a [u8]) -> Result<Ipv4<'a>, DropReason> {
        let p = Ipv4::parse(packet).map_err(|_| DropReason::PeerMalformed)?;
        let (guest_side, far_side) = match self.end {
            // Source: packets the guest sent, to emit on segment A.
            End::Source => (p.src(), p.dst()),
            // Destination: packets for the guest.
            End::Destination => (p.dst(), p.src()),
        };
        if !self.is_guest(guest_side) || self.is_guest(far_side) {
            return Err(DropReason::PeerWrongAddress);
        }
        if !is_unicast_ip(far_side) {
            return Err(DropReason::PeerNotUnicast);
        }
        if p.bytes().len() > MAX_TUNNEL_PACKET as usize {
            return Err(DropReason::TooLarge);
        }
        Ok(p)
    }

    /// Destination end: the frame delivering `packet` (checked by
    /// [`Policy::on_peer`]) to the guest.
    pub fn frame_for_guest(&self, packet: &Ipv4<'_>) -> Vec<u8> {
        packet::ethernet_frame(self.guest_mac, self.our_mac, ETHERTYPE_IPV4, packet.bytes())
    }

    /// The gratuitous ARP frames of one announcement, both forms for each
    /// guest address. The source announces each address at its own MAC (so
    /// that segment A's hosts send the guest's traffic to it); the
    /// destination at the guest's MAC (so that the switches of its segment
    /// learn where that MAC is now).
    pub fn announcement(&self) -> Vec<Vec<u8>> {
        let mac = match self.end {
            End::Source => self.our_mac,
            End::Destination => self.guest_mac,
        };
        self.guest_ips.iter().flat_map(|&ip| [gratuitous_request(mac, ip), gratuitous_reply(mac, ip)]).collect()
    }

    /// Destination end: the frame telling the guest that `neighbour` is at
    /// our MAC, for a guest that still sends to the MAC it learnt for it on
    /// its old segment: an ARP request for the guest's address from
    /// `neighbour` at our MAC, which makes Linux (and most stacks) replace
    /// the neighbour's entry. (For an address behind a gateway this adds a
    /// harmless entry and leaves the gateway's; its frames are carried all
    /// the same.)
    pub fn steer(&self, guest_ip: Ipv4Addr, neighbour: Ipv4Addr) -> Vec<u8> {
        packet::arp_request(self.guest_mac, guest_ip, self.our_mac, neighbour)
    }
}

/// Whether `packet` may become one tunnel message.
pub fn fits(packet: &[u8]) -> bool {
    packet.len() <= MAX_TUNNEL_PACKET as usize
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::packet::{ethernet_frame, ipv4_fix_header};

    const GUEST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
    const GMAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 5]);
    const OURS: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xaa]);
    const CMAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x10]);

    fn policy(end: End) -> Policy {
        Policy::new(end, vec![GUEST], GMAC, OURS)
    }

    fn ip(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&[0, 1, 0, 2, 0, 8, 0, 0]);
        ipv4_fix_header(&mut p);
        p
    }

    fn arp(op: ArpOp, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        Arp { op, sha, spa, tha: MacAddr::ZERO, tpa }.frame(MacAddr::BROADCAST, sha)
    }

    #[test]
    fn source_answers_arp_for_the_guest_only() {
        let p = policy(End::Source);
        let Verdict::Reply(r) = p.on_frame(&arp(ArpOp::Request, CMAC, CLIENT, GUEST)) else { panic!("no reply") };
        let e = Ethernet::parse(&r).expect("eth");
        let a = Arp::parse(e.payload).expect("arp");
        assert_eq!((e.dst, a.op, a.sha, a.spa, a.tha, a.tpa), (CMAC, ArpOp::Reply, OURS, GUEST, CMAC, CLIENT));
        // Other targets, replies, announcements of others: not ours to answer.
        assert_eq!(p.on_frame(&arp(ArpOp::Request, CMAC, CLIENT, Ipv4Addr::new(10, 1, 1, 1))), Verdict::Ignore);
        assert_eq!(p.on_frame(&arp(ArpOp::Reply, CMAC, CLIENT, GUEST)), Verdict::Ignore);
        // Someone else claiming the guest's address is a conflict.
        assert_eq!(p.on_frame(&arp(ArpOp::Request, CMAC, GUEST, GUEST)), Verdict::Drop(DropReason::AddressConflict));
        // Our own frames (if the kernel ever shows them) are ignored.
        assert_eq!(p.on_frame(&arp(ArpOp::Request, OURS, CLIENT, GUEST)), Verdict::Ignore);
    }

    #[test]
    fn source_tunnels_unicast_ipv4_to_the_guest() {
        let p = policy(End::Source);
        let pkt = ip(CLIENT, GUEST);
        let mut frame = ethernet_frame(OURS, CMAC, ETHERTYPE_IPV4, &pkt);
        frame.extend_from_slice(&[0; 10]); // Ethernet padding
        match p.on_frame(&frame) {
            Verdict::Tunnel { packet, stale_neighbour: None } => assert_eq!(packet.bytes(), &pkt[..]),
            v => panic!("{v:?}"),
        }
        // To another address, or to another MAC: not ours.
        let other = ethernet_frame(OURS, CMAC, ETHERTYPE_IPV4, &ip(CLIENT, Ipv4Addr::new(10, 1, 1, 1)));
        assert_eq!(p.on_frame(&other), Verdict::Ignore);
        assert_eq!(p.on_frame(&ethernet_frame(MacAddr::BROADCAST, CMAC, ETHERTYPE_IPV4, &pkt)), Verdict::Ignore);
    }

    #[test]
    fn destination_carries_the_guests_packets_only() {
        let p = policy(End::Destination);
        let pkt = ip(GUEST, CLIENT);
        let to_us = ethernet_frame(OURS, GMAC, ETHERTYPE_IPV4, &pkt);
        assert!(matches!(p.on_frame(&to_us), Verdict::Tunnel { stale_neighbour: None, .. }));
        // Sent to the client's old MAC: carried, and the neighbour named for steering.
        let stale = ethernet_frame(CMAC, GMAC, ETHERTYPE_IPV4, &pkt);
        assert!(matches!(p.on_frame(&stale), Verdict::Tunnel { stale_neighbour: Some(CLIENT), .. }));
        // A spoofed source, broadcasts, a malformed header, other MACs.
        let spoof = ethernet_frame(OURS, GMAC, ETHERTYPE_IPV4, &ip(Ipv4Addr::new(10, 1, 1, 6), CLIENT));
        assert_eq!(p.on_frame(&spoof), Verdict::Drop(DropReason::GuestSpoofedSource));
        let bcast = ethernet_frame(MacAddr::BROADCAST, GMAC, ETHERTYPE_IPV4, &ip(GUEST, Ipv4Addr::BROADCAST));
        assert_eq!(p.on_frame(&bcast), Verdict::Drop(DropReason::GuestNotUnicast));
        let mut bad = pkt.clone();
        bad[10] ^= 0xff;
        assert_eq!(
            p.on_frame(&ethernet_frame(OURS, GMAC, ETHERTYPE_IPV4, &bad)),
            Verdict::Drop(DropReason::GuestMalformed)
        );
        assert_eq!(p.on_frame(&ethernet_frame(OURS, CMAC, ETHERTYPE_IPV4, &pkt)), Verdict::Ignore);
    }

    #[test]
    fn destination_answers_the_guests_arp_for_its_neighbours() {
        let p = policy(End::Destination);
        let gw = Ipv4Addr::new(10, 1, 1, 1);
        let Verdict::Reply(r) = p.on_frame(&arp(ArpOp::Request, GMAC, GUEST, gw)) else { panic!("no reply") };
        let a = Arp::parse(Ethernet::parse(&r).expect("eth").payload).expect("arp");
        assert_eq!((a.sha, a.spa, a.tha, a.tpa), (OURS, gw, GMAC, GUEST));
        // Its own announcements and probes, and ARP from others: unanswered.
        assert_eq!(p.on_frame(&arp(ArpOp::Request, GMAC, GUEST, GUEST)), Verdict::Ignore);
        assert_eq!(p.on_frame(&arp(ArpOp::Request, GMAC, Ipv4Addr::UNSPECIFIED, GUEST)), Verdict::Ignore);
        assert_eq!(p.on_frame(&arp(ArpOp::Request, CMAC, CLIENT, gw)), Verdict::Ignore);
        assert_eq!(p.on_frame(&arp(ArpOp::Request, GMAC, GUEST, Ipv4Addr::BROADCAST)), Verdict::Ignore);
    }

    #[test]
    fn peer_packets_are_checked_for_each_end() {
        let (src, dst) = (policy(End::Source), policy(End::Destination));
        // From the guest, to emit at the source; to the guest, to deliver at the destination.
        assert!(src.on_peer(&ip(GUEST, CLIENT)).is_ok());
        assert!(dst.on_peer(&ip(CLIENT, GUEST)).is_ok());
        // The wrong direction, another host's packet, a loop, non-unicast.
        assert_eq!(src.on_peer(&ip(CLIENT, GUEST)), Err(DropReason::PeerWrongAddress));
        assert_eq!(dst.on_peer(&ip(GUEST, CLIENT)), Err(DropReason::PeerWrongAddress));
        assert_eq!(dst.on_peer(&ip(CLIENT, Ipv4Addr::new(10, 1, 1, 6))), Err(DropReason::PeerWrongAddress));
        assert_eq!(dst.on_peer(&ip(GUEST, GUEST)), Err(DropReason::PeerWrongAddress));
        assert_eq!(src.on_peer(&ip(GUEST, Ipv4Addr::new(224, 0, 0, 1))), Err(DropReason::PeerNotUnicast));
        assert_eq!(dst.on_peer(&ip(Ipv4Addr::BROADCAST, GUEST)), Err(DropReason::PeerNotUnicast));
        // Malformed: bad checksum, trailing bytes.
        let mut bad = ip(CLIENT, GUEST);
        bad[8] = 1;
        assert_eq!(dst.on_peer(&bad), Err(DropReason::PeerMalformed));
        let mut long = ip(CLIENT, GUEST);
        long.push(0);
        assert_eq!(dst.on_peer(&long), Err(DropReason::PeerMalformed));
        // Delivered to the guest's MAC from ours.
        let frame = dst.frame_for_guest(&dst.on_peer(&ip(CLIENT, GUEST)).expect("ok"));
        let e = Ethernet::parse(&frame).expect("eth");
        assert_eq!((e.dst, e.src, e.ethertype), (GMAC, OURS, ETHERTYPE_IPV4));
    }

    #[test]
    fn announcements_and_steering() {
        let two = Policy::new(End::Source, vec![GUEST, Ipv4Addr::new(10, 1, 1, 6)], GMAC, OURS);
        let frames = two.announcement();
        assert_eq!(frames.len(), 4);
        for f in &frames {
            let e = Ethernet::parse(f).expect("eth");
            let a = Arp::parse(e.payload).expect("arp");
            assert_eq!((e.dst, e.src, a.sha, a.spa == a.tpa), (MacAddr::BROADCAST, OURS, OURS, true));
        }
        let f = &policy(End::Destination).announcement()[0];
        assert_eq!(Ethernet::parse(f).expect("eth").src, GMAC);
        let s = policy(End::Destination).steer(GUEST, CLIENT);
        let e = Ethernet::parse(&s).expect("eth");
        let a = Arp::parse(e.payload).expect("arp");
        assert_eq!((e.dst, a.op, a.sha, a.spa, a.tpa), (GMAC, ArpOp::Request, OURS, CLIENT, GUEST));
        assert_eq!(DropReason::ALL.iter().enumerate().filter(|(i, d)| d.index() != *i).count(), 0);
    }

    proptest! {
        #[test]
        fn any_frame_or_packet_is_decided_without_panic(b in prop::collection::vec(any::<u8>(), 0..200), ethertype in prop::sample::select(vec![ETHERTYPE_ARP, ETHERTYPE_IPV4])) {
            for end in [End::Source, End::Destination] {
                let p = policy(end);
                let _ = p.on_frame(&b);
                let _ = p.on_peer(&b);
                let f = ethernet_frame(OURS, GMAC, ethertype, &b);
                let _ = p.on_frame(&f);
            }
        }
    }
}
