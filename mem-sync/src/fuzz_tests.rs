//! Bounded fuzzing of what this crate decodes from a peer: XBZRLE page
//! deltas, pieces of the zstd stream, and the compressed device state.
//! Property tests with a fixed case count (stable, `cargo nextest run`);
//! inputs are valid deltas and compressed pieces with a few edits.

use proptest::prelude::*;
use wanmig_types::PAGE_SIZE;
use wanmig_types::fuzz::{Edit, mutate};

use crate::compress::{StreamCompressor, StreamDecompressor, compress_blob, decompress_blob};
use crate::xbzrle;

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec((any::<u8>(), any::<u32>(), any::<u8>()), 1..6)
}

/// A page and a delta from it to a page with a few runs changed.
fn delta(seed: u8) -> ([u8; PAGE_SIZE], Vec<u8>) {
    let old = [seed; PAGE_SIZE];
    let mut new = old;
    for i in (0..PAGE_SIZE).step_by(97 + seed as usize % 50) {
        new[i] = new[i].wrapping_add(seed.wrapping_add(1) | 1);
    }
    let mut out = Vec::new();
    assert!(xbzrle::encode(&old, &new, PAGE_SIZE, &mut out), "a small change encodes");
    (old, out)
}

/// Data, its first piece of a zstd stream, and it as a blob.
type Pieces = [(Vec<u8>, Vec<u8>, Vec<u8>); 4];

/// [`Pieces`] of four kinds of data, made once.
fn pieces() -> &'static Pieces {
    static PIECES: std::sync::OnceLock<Pieces> = std::sync::OnceLock::new();
    PIECES.get_or_init(|| {
        std::array::from_fn(|seed| {
            let data: Vec<u8> = (0..20_000u32).map(|i| (i / 7) as u8 ^ (seed as u8 * 61)).collect();
            let piece = StreamCompressor::new(1).expect("compressor").compress(&data).expect("compress");
            let blob = compress_blob(&data).expect("compress");
            (data, piece, blob)
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn edited_deltas_apply_or_are_refused(seed in any::<u8>(), edits in edits()) {
        let (old, d) = delta(seed);
        let mut page = old;
        let _ = xbzrle::decode(&mutate(&d, &edits), &mut page);
    }

    #[test]
    fn edited_stream_pieces_decode_or_are_refused(seed in 0usize..4, edits in edits(), raw_slack in 0usize..3) {
        let (data, piece, blob) = &pieces()[seed];
        let edited = mutate(piece, &edits);
        let mut d = StreamDecompressor::new().expect("decompressor");
        // The length the peer announces may be wrong too.
        let raw_len = data.len() + raw_slack - 1;
        if let Ok(out) = d.decompress(&edited, raw_len) {
            prop_assert_eq!(out.len(), raw_len);
        }
        if let Ok(out) = decompress_blob(&mutate(blob, &edits), 30_000) {
            prop_assert!(out.len() <= 30_000);
        }
    }
}
