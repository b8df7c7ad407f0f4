//! Codec and session tests.

use proptest::prelude::*;

use crate::message::{
    MAX_BATCH_PAGES, MAX_FRAME, MAX_NICS, MAX_TUNNEL_PACKET, MIN_TUNNEL_PACKET, PAGE_SIZE, PROTOCOL_VERSION,
};
use crate::resume::{DiskPoint, ResumePoint};
use crate::*;
use wanmig_types::{ChunkId, MigrationId};

pub(crate) fn shape() -> VmShape {
    VmShape {
        name: "vm1".into(),
        memory: vec![(0, 3 << 30), (4 << 30, 1 << 30)],
        vcpus: 2,
        disks: vec![DiskInfo { size: 1 << 30, path: "/var/lib/vm1.img".into(), read_only: false }],
        nics: vec![NicInfo { mac: NIC_MAC, ipv4: Some(([10, 1, 0, 5], 24)) }, NicInfo { mac: [2; 6], ipv4: None }],
    }
}

const NIC_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

#[test]
fn hostile_nic_descriptions_are_refused() {
    let frame = hello(PROTOCOL_VERSION).encode();
    let body = &frame[4..];
    assert_eq!(Message::decode(body).expect("round trip"), hello(PROTOCOL_VERSION));
    let at = body.windows(6).position(|w| w == NIC_MAC).expect("the MAC is in the frame") + 6;
    let patched = |i: usize, v: u8| {
        let mut b = body.to_vec();
        b[i] = v;
        b
    };
    for (i, v, field) in
        [(at, 2, "NIC address flag"), (at + 5, 0, "NIC prefix length"), (at + 5, 33, "NIC prefix length")]
    {
        match Message::decode(&patched(i, v)) {
            Err(DecodeError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    // Too many NICs.
    let count_at = at - 6 - 4;
    let mut b = body.to_vec();
    b[count_at..count_at + 4].copy_from_slice(&(MAX_NICS + 1).to_le_bytes());
    assert!(matches!(Message::decode(&b), Err(DecodeError::TooLarge { .. })));
}

/// A minimal Hello of protocol `version`.
pub(crate) fn hello(version: u16) -> Message {
    Message::Hello {
        version,
        features: 0,
        page_size: 4096,
        migration_id: MigrationId([0; 16]),
        shape: shape(),
        chunking: ChunkParams::DEFAULT,
        resume_secret: [7; 32],
        bases: Vec::new(),
    }
}

pub(crate) fn pages() -> Pages {
    let raw = [7u8; PAGE_SIZE];
    let mut b = PagesBuilder::new(3);
    b.push(PageRef { gpa: 0x1000, data: PageData::Zero });
    b.push(PageRef { gpa: 0x2000, data: PageData::Raw(&raw) });
    b.push(PageRef { gpa: 0x3000, data: PageData::Delta(&[1, 2, 3]) });
    b.finish()
}

pub(crate) fn samples() -> Vec<Message> {
    vec![
        Message::Hello {
            version: PROTOCOL_VERSION,
            features: features::ALL,
            page_size: 4096,
            migration_id: MigrationId([9; 16]),
            shape: shape(),
            chunking: ChunkParams::DEFAULT,
            resume_secret: [7; 32],
            bases: vec![Some(MigrationId([4; 16]))],
        },
        Message::Accept { features: features::ZSTD, chunking: ChunkParams::DEFAULT, based: Vec::new() },
        Message::Accept {
            features: features::DISK_COPY | features::DISK_BASE,
            chunking: ChunkParams::DEFAULT,
            based: vec![true],
        },
        Message::Refuse { reason: "no room".into() },
        Message::Pages(pages()),
        Message::Compressed { raw_len: 100, data: vec![1, 2, 3] },
        Message::RoundDone { round: 4, pages: 1234 },
        Message::DeviceState { state: vec![5; 1000] },
        Message::Ready,
        Message::Commit,
        Message::CommitAck,
        Message::Abort { reason: "link lost".into() },
        Message::RoundApplied { round: 7 },
        Message::DiskManifest(manifest()),
        Message::DiskNeed(Need { disk: 0, seq: 5, chunks: vec![0, 2, 9] }),
        Message::DiskChunk(Chunk { disk: 1, offset: 1 << 20, id: ChunkId([3; 32]), data: vec![4; 5000] }),
        Message::DiskWrites(writes()),
        Message::DiskDone(DiskDone { disk: 0, size: 64 << 20, digest: [8; 32] }),
        Message::TunnelPacket { packet: (0..1500).map(|i| i as u8).collect() },
        Message::TunnelClose { reason: "routes converged".into() },
        Message::TunnelKeepalive,
        Message::SettleQuery { migration_id: MigrationId([4; 16]) },
        Message::SettleAnswer { migration_id: MigrationId([4; 16]), outcome: Settlement::NotCommitted },
        Message::Resume { migration_id: MigrationId([4; 16]), secret: [9; 32] },
        Message::Resumed(ResumePoint {
            round: 7,
            received: vec![
                wanmig_types::PageRange { first: 3, count: 2 },
                wanmig_types::PageRange { first: 900, count: 1 },
            ],
            disks: vec![DiskPoint { next_seq: 2, next_offset: 16 << 20 }],
        }),
        Message::PostcopyDiscard {
            pages: vec![
                wanmig_types::PageRange { first: 16, count: 300 },
                wanmig_types::PageRange { first: 1 << 20, count: 1 },
            ],
        },
        Message::PostcopyStart { missing: 301 },
        Message::PageRequest { pages: vec![77, 3, 1 << 20] },
        Message::PostcopyComplete(crate::postcopy::PostcopyReport {
            faults: 12,
            requested: 96,
            pushed: 4000,
            duplicates: 2,
            service_p50_us: 1100,
            service_p99_us: 52_000,
            service_max_us: 61_000,
            vcpu_blocked_us: vec![30_000, 0],
            placing_us: 9_000_000,
        }),
        Message::SettleAnswer { migration_id: MigrationId([4; 16]), outcome: Settlement::PostcopyLost },
    ]
}

pub(crate) fn manifest() -> Manifest {
    Manifest {
        disk: 0,
        seq: 5,
        offset: 1 << 30,
        chunks: vec![
            ManifestChunk { len: 65536, id: Some(ChunkId([1; 32])) },
            ManifestChunk { len: 262144, id: None },
            ManifestChunk { len: 20000, id: Some(ChunkId([2; 32])) },
        ],
    }
}

pub(crate) fn writes() -> DiskWrites {
    DiskWrites { disk: 0, extents: vec![(4096, 8192), (1 << 20, 4096)], data: (0..12288).map(|i| i as u8).collect() }
}

#[test]
fn disk_messages_refuse_what_cannot_be() {
    let decode = |m: &Message| Message::decode(&m.encode()[4..]);
    // Extents whose data is shorter than they claim.
    let mut w = writes();
    w.data.pop();
    assert!(decode(&Message::DiskWrites(w)).is_err());
    // A manifest announcing more chunks than follow allocates nothing and fails.
    let mut frame = Message::DiskManifest(manifest()).encode();
    frame[4 + 1 + 1 + 4 + 8..][..4].copy_from_slice(&16000u32.to_le_bytes());
    assert!(matches!(Message::decode(&frame[4..]), Err(DecodeError::Truncated { .. })));
    // A zero-length chunk, and chunk parameters fastcdc cannot use.
    let mut m = manifest();
    m.chunks[0].len = 0;
    assert!(decode(&Message::DiskManifest(m)).is_err());
    let bad = ChunkParams { min: 64 << 10, avg: 16 << 10, max: 256 << 10 };
    assert!(decode(&Message::Accept { features: 0, chunking: bad, based: Vec::new() }).is_err());
    // Only bulk data messages may hide inside a Compressed.
    assert!(Message::decode_compressed_body(&Message::Commit.encode()[4..]).is_err());
    let body = Message::DiskWrites(writes()).encode();
    assert_eq!(Message::decode_compressed_body(&body[4..]), Ok(Message::DiskWrites(writes())));
    let got: Vec<_> = writes().iter().map(|(o, d)| (o, d.len())).collect();
    assert_eq!(got, vec![(4096, 8192), (1 << 20, 4096)]);
}

#[test]
fn tunnel_packets_are_bounded() {
    let body = |n: usize| {
        let mut b = vec![18u8];
        b.resize(1 + n, 0x45);
        b
    };
    // Both bounds are inclusive, and the length is the frame's own.
    for n in [MIN_TUNNEL_PACKET as usize, 1500, MAX_TUNNEL_PACKET as usize] {
        assert_eq!(Message::decode(&body(n)), Ok(Message::TunnelPacket { packet: vec![0x45; n] }), "{n}");
    }
    assert!(matches!(
        Message::decode(&body(MAX_TUNNEL_PACKET as usize + 1)),
        Err(DecodeError::TooLarge { field: "tunnelled packet", .. })
    ));
    for n in [0, 1, MIN_TUNNEL_PACKET as usize - 1] {
        assert!(matches!(Message::decode(&body(n)), Err(DecodeError::Truncated { .. })), "{n}");
    }
    // A close reason longer than it says, or longer than any reason may be.
    let mut close = Message::TunnelClose { reason: "converged".into() }.encode();
    close[5..9].copy_from_slice(&100u32.to_le_bytes());
    assert!(matches!(Message::decode(&close[4..]), Err(DecodeError::Truncated { .. })));
    close[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(Message::decode(&close[4..]), Err(DecodeError::TooLarge { .. })));
    // A keepalive carries nothing.
    assert!(matches!(Message::decode(&[20, 0]), Err(DecodeError::Trailing(1))));
    // A long reason is cut at a character boundary, never refused by the peer.
    let long = "é".repeat(3000);
    let Ok(Message::TunnelClose { reason }) = round_trip(&Message::TunnelClose { reason: long }) else {
        panic!("close")
    };
    assert!(reason.len() <= 4096 && reason.chars().all(|c| c == 'é'));
}

fn round_trip(m: &Message) -> Result<Message, DecodeError> {
    let frame = m.encode();
    let len = frame_len(frame[..4].try_into().expect("header"))?;
    assert_eq!(len, frame.len() - 4);
    Message::decode(&frame[4..])
}

#[test]
fn every_message_round_trips() {
    for m in samples() {
        assert_eq!(round_trip(&m).as_ref(), Ok(&m), "{}", m.name());
    }
    let Ok(Message::Pages(p)) = round_trip(&Message::Pages(pages())) else { panic!("pages") };
    let got: Vec<_> = p.iter().collect();
    assert_eq!(got.len(), 3);
    assert_eq!(got[1], PageRef { gpa: 0x2000, data: PageData::Raw(&[7u8; PAGE_SIZE]) });
    assert_eq!(got[2].data, PageData::Delta(&[1, 2, 3]));
}

#[test]
fn every_truncation_is_an_error() {
    for m in samples() {
        let frame = m.encode();
        let body = &frame[4..];
        for n in 0..body.len() {
            // Some prefixes of variable-length messages are themselves valid
            // messages (a shorter reason); none may panic, and none may
            // decode to the original.
            if let Ok(d) = Message::decode(&body[..n]) {
                assert_ne!(d, m, "{} truncated to {n}", m.name());
            }
        }
    }
}

#[test]
fn hostile_lengths_are_refused_before_allocation() {
    assert!(frame_len((MAX_FRAME + 1).to_le_bytes()).is_err());
    assert!(frame_len(0u32.to_le_bytes()).is_err());
    // Pages frames are `type, payload, headers, round, count, headers_len`.
    let pages_body = |payload: &[u8], headers: &[u8], count: u32, headers_len: u32| {
        let mut body = vec![4u8];
        body.extend_from_slice(payload);
        body.extend_from_slice(headers);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&headers_len.to_le_bytes());
        body
    };
    // More pages than allowed.
    assert!(matches!(
        Message::decode(&pages_body(&[], &[], MAX_BATCH_PAGES + 1, 0)),
        Err(DecodeError::TooLarge { .. })
    ));
    // A page count larger than the pages present.
    assert!(matches!(Message::decode(&pages_body(&[], &[1, 1], 2, 2)), Err(DecodeError::Truncated { .. })));
    // Headers longer than the frame, and a frame shorter than its trailer.
    assert!(matches!(Message::decode(&pages_body(&[], &[0, 1], 1, 1000)), Err(DecodeError::Truncated { .. })));
    assert!(matches!(Message::decode(&[4, 0, 0]), Err(DecodeError::Truncated { .. })));
    // A raw page announced but its bytes missing.
    assert!(matches!(Message::decode(&pages_body(&[0; 100], &[0, 2], 1, 2)), Err(DecodeError::Truncated { .. })));
    // Overflowing and overlong gaps, unknown encoding, delta as large as a page.
    let huge_gap = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
    for (gap, tag, extra) in [
        (&huge_gap[..], 1u8, vec![]),
        (&[0x80, 0x00][..], 1, vec![]),
        (&[0][..], 9, vec![]),
        (&[0][..], 3, 4096u16.to_le_bytes().to_vec()),
    ] {
        let mut headers = gap.to_vec();
        headers.push(tag);
        headers.extend_from_slice(&extra);
        let body = pages_body(&[0; 4096], &headers, 1, headers.len() as u32);
        assert!(Message::decode(&body).is_err(), "{gap:?} {tag}");
    }
    // Type 0 and unknown types.
    assert!(matches!(Message::decode(&[0]), Err(DecodeError::UnknownTag { .. })));
    assert!(matches!(Message::decode(&[200]), Err(DecodeError::UnknownTag { .. })));
    // A Hello with a huge string length.
    let mut hello = hello(PROTOCOL_VERSION).encode();
    hello[4 + 1 + 2 + 8 + 4 + 16..4 + 1 + 2 + 8 + 4 + 16 + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(Message::decode(&hello[4..]), Err(DecodeError::TooLarge { .. })));
    // Trailing bytes.
    let mut ready = Message::Ready.encode();
    ready.push(0);
    assert!(matches!(Message::decode(&ready[4..]), Err(DecodeError::Trailing(1))));
}

proptest! {
    #[test]
    fn decode_never_panics(body in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Message::decode(&body);
    }

    #[test]
    fn mutated_frames_never_panic(i in 0usize..20, pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let frame = samples()[i].encode();
        let mut body = frame[4..].to_vec();
        let p = pos.index(body.len());
        body[p] = byte;
        let _ = Message::decode(&body);
    }

    #[test]
    fn page_batches_round_trip(entries in prop::collection::vec((0u64..1 << 30, 0u8..3, prop::collection::vec(any::<u8>(), 0..64)), 0..40)) {
        let raw = [3u8; PAGE_SIZE];
        let mut b = PagesBuilder::new(1);
        let mut entries = entries;
        entries.sort_by_key(|e| e.0);
        entries.dedup_by_key(|e| e.0);
        for (page, kind, delta) in &entries {
            let data = match kind { 0 => PageData::Zero, 1 => PageData::Raw(&raw), _ => PageData::Delta(delta) };
            b.push(PageRef { gpa: page * PAGE_SIZE as u64, data });
        }
        let p = b.finish();
        let Ok(Message::Pages(back)) = round_trip(&Message::Pages(p.clone())) else { panic!("decode") };
        prop_assert_eq!(back.iter().collect::<Vec<_>>(), p.iter().collect::<Vec<_>>());
        prop_assert_eq!(back.len(), entries.len());
    }
}
