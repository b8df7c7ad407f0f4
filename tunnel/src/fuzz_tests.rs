//! Bounded fuzzing of what the tunnel reads from others: packets from the
//! peer ([`Policy::on_peer`]) and frames from the segment (Ethernet, ARP,
//! IPv4, [`Policy::on_frame`] at either end), and the offload header and
//! segmentation of frames the kernel hands over. Property tests with a
//! fixed case count (stable, `cargo nextest run`); inputs are valid
//! packets and frames with a few edits, and random bytes.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use wanmig_types::MacAddr;
use wanmig_types::fuzz::{Edit, mutate};

use crate::offload::{self, VnetHdr};
use crate::packet::{Arp, ArpOp, Ethernet, Ipv4, ethernet_frame, ipv4_fix_header};
use crate::policy::{End, Policy, Verdict};

const GUEST: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 5);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const GMAC: MacAddr = MacAddr([0x52, 0x54, 0, 0, 0, 5]);
const OURS: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0xaa]);

fn ip(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: usize) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend((0..payload).map(|i| i as u8));
    ipv4_fix_header(&mut p);
    p
}

/// Valid packets and frames of every kind the tunnel handles.
fn seeds() -> Vec<Vec<u8>> {
    let mut s = vec![ip(OTHER, GUEST, 17, 8), ip(GUEST, OTHER, 6, 40), ip(OTHER, GUEST, 1, 1400)];
    s.push(ethernet_frame(OURS, MacAddr([2, 0, 0, 0, 0, 1]), 0x0800, &s[0].clone()));
    s.push(ethernet_frame(OURS, GMAC, 0x0800, &s[1].clone()));
    s.push(
        Arp { op: ArpOp::Request, sha: GMAC, spa: GUEST, tha: MacAddr::ZERO, tpa: OTHER }
            .frame(MacAddr::BROADCAST, GMAC),
    );
    s.push(
        Arp { op: ArpOp::Reply, sha: MacAddr([2, 0, 0, 0, 0, 1]), spa: OTHER, tha: GMAC, tpa: GUEST }.frame(GMAC, OURS),
    );
    s
}

/// Whatever comes in is taken, answered or dropped; never a panic.
fn check(b: &[u8]) {
    if let Ok(e) = Ethernet::parse(b) {
        let _ = Arp::parse(e.payload);
        if let Ok(p) = Ipv4::parse_padded(e.payload) {
            let _ = (p.payload(), p.src(), p.dst(), p.protocol(), p.is_fragment());
        }
    }
    if let Ok(p) = Ipv4::parse(b) {
        assert_eq!(p.bytes().len(), b.len());
        let _ = (p.payload(), p.header_len());
    }
    for end in [End::Source, End::Destination] {
        let policy = Policy::new(end, vec![GUEST], GMAC, OURS);
        if let Ok(p) = policy.on_peer(b) {
            let frame = policy.frame_for_guest(&p);
            assert_eq!(Ethernet::parse(&frame).map(|e| e.payload.len()).ok(), Some(p.bytes().len()));
        }
        match policy.on_frame(b) {
            Verdict::Reply(r) => assert!(Ethernet::parse(&r).is_ok()),
            Verdict::Tunnel { packet, .. } => assert!(packet.bytes().len() <= b.len()),
            Verdict::Ignore | Verdict::Drop(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_packets_and_frames_are_taken_or_dropped(which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 1..6)) {
        let seeds = seeds();
        let seed: &Vec<u8> = which.get(&seeds);
        let edits: Vec<Edit> = edits;
        let b = mutate(seed, &edits);
        check(&b);
        // With the IPv4 checksum made right again, the edits reach past it.
        let mut fixed = b.clone();
        if fixed.len() >= 20 && fixed[0] >> 4 == 4 && usize::from(fixed[0] & 15) * 4 <= fixed.len() {
            ipv4_fix_header(&mut fixed);
            check(&fixed);
        }
    }

    #[test]
    fn random_bytes_are_taken_or_dropped(b in prop::collection::vec(any::<u8>(), 0..120)) {
        check(&b);
    }

    #[test]
    fn offload_headers_never_split_past_the_packet(hdr in any::<[u8; offload::VNET_HDR_LEN]>(), len in 0usize..3000,
        protocol in prop_oneof![Just(6u8), Just(17u8), any::<u8>()]) {
        let vnet = VnetHdr::parse(&hdr);
        let packet = ip(OTHER, GUEST, protocol, len);
        let p = Ipv4::parse(&packet).expect("valid");
        let mut total = 0usize;
        let _ = offload::split(&vnet, 14, &p, |seg| {
            total += seg.len();
            assert!(Ipv4::parse(&seg).is_ok() || seg.len() >= 20);
        });
        prop_assert!(total <= 64 * (packet.len() + 60), "{total} bytes out of {}", packet.len());
    }
}
