//! Bounded fuzzing of everything in this crate that reads peer input: the
//! frame header, the message decoder (every message: migration, disk,
//! tunnel and settle), the body of a compressed frame, and both session
//! machines fed whatever decodes. Property tests with a fixed case count
//! (run on stable by `cargo nextest run`, about a second each); the
//! cargo-fuzz target (`wire/fuzz`, nightly) is for long runs.
//!
//! Inputs are valid frames with a few edits ([`wanmig_types::fuzz::mutate`]),
//! which reach the checks behind the first bytes, and plain random bytes.

use proptest::prelude::*;
use wanmig_types::fuzz::{Edit, mutate};
use wanmig_types::{ChunkId, MigrationId, features};

use crate::tests::{samples, shape};
use crate::*;

/// Cases per property: together well under ten seconds in a debug build.
const CASES: u32 = 3000;

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 1..6)
}

/// Every sample message's body (the frame without its length).
fn seeds() -> Vec<Vec<u8>> {
    samples().iter().map(|m| m.encode()[4..].to_vec()).collect()
}

/// A destination that accepted a VM with one 1 MiB disk and every feature.
fn destination() -> DestSession {
    let mut d = DestSession::new();
    let hello = Message::Hello {
        version: message::PROTOCOL_VERSION,
        features: features::ALL & !features::SYNC_ONLY,
        page_size: 4096,
        migration_id: MigrationId([1; 16]),
        shape: VmShape { disks: vec![DiskInfo { size: 1 << 20, path: "/d.img".into(), read_only: false }], ..shape() },
        chunking: ChunkParams::DEFAULT,
        resume_secret: [7; 32],
        bases: vec![None],
    };
    d.on_message(Stream::Control, &hello).expect("hello");
    d.accept(features::ALL, ChunkParams::DEFAULT, &[false]).expect("accept");
    d
}

/// A source that sent its hello and a manifest part.
fn source() -> SourceSession {
    let mut s = SourceSession::new();
    s.hello(
        MigrationId([1; 16]),
        shape(),
        features::ALL & !features::SYNC_ONLY,
        ChunkParams::DEFAULT,
        [7; 32],
        Vec::new(),
    )
    .expect("hello");
    s
}

/// What any body must do: decode or be refused, never panic; what decodes
/// encodes back to itself; the machines take it or refuse it.
fn check(body: &[u8]) {
    if body.len() >= 4 {
        let _ = frame_len(body[..4].try_into().expect("4 bytes"));
    }
    if let Ok(inner) = Message::decode_compressed_body(body) {
        let _ = destination().on_decompressed(&inner);
    }
    let Ok(m) = Message::decode(body) else { return };
    assert_eq!(Message::decode(&m.encode()[4..]).as_ref(), Ok(&m), "decode ∘ encode = id");
    if let Message::Pages(p) = &m {
        assert_eq!(p.iter().count(), p.len());
    }
    for stream in [Stream::Control, Stream::Bulk] {
        let mut d = destination();
        let _ = d.on_message(stream, &m);
        let _ = d.on_message(stream, &m);
        let _ = DestSession::new().on_message(stream, &m);
    }
    let mut s = source();
    let _ = s.on_message(Stream::Control, &m);
    let _ = s.on_message(Stream::Control, &m);
    if let Message::DiskManifest(part) = &m {
        let mut d = destination();
        if d.on_message(Stream::Control, &m).is_ok() {
            let all: Vec<u32> = (0..part.chunks.len() as u32).collect();
            let _ = d.need(part.disk, all);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_frames_decode_or_are_refused(which in any::<prop::sample::Index>(), edits in edits()) {
        let seeds = seeds();
        let seed: &Vec<u8> = which.get(&seeds);
        check(&mutate(seed, &edits));
    }

    #[test]
    fn random_bodies_decode_or_are_refused(tag in 0u8..32, rest in prop::collection::vec(any::<u8>(), 0..200)) {
        let mut body = vec![tag];
        body.extend(rest);
        check(&body);
    }

    #[test]
    fn chunk_and_manifest_edges(len in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), 0u32..(1 << 20)], id in any::<[u8; 32]>()) {
        let m = Message::DiskChunk(Chunk { disk: 0, offset: 0, id: ChunkId(id), data: vec![0; (len % 70_000) as usize] });
        check(&m.encode()[4..]);
        let part = Manifest { disk: 0, seq: 0, offset: 0, chunks: vec![ManifestChunk { len, id: Some(ChunkId(id)) }] };
        check(&Message::DiskManifest(part).encode()[4..]);
    }
}
