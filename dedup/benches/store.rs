//! Chunk store throughput: insert (64 KiB chunks, half compressible, with
//! commits), lookup (`contains_many` over 100k ids, half present) and get.
//!
//! `cargo bench -p wanmig-dedup --bench store`; prints a table, takes well
//! under 30 s.

use std::time::{Duration, Instant};

use wanmig_dedup::{ChunkId, ChunkStore, Put};

const CHUNK: usize = 64 << 10;
/// 128 MiB of 64 KiB chunks.
const INSERT_CHUNKS: usize = 2048;
/// Commit every 16 MiB, as a receiver might per batch.
const COMMIT_EVERY: usize = 256;
const LOOKUP_IDS: usize = 100_000;

/// 64 KiB: even seeds text-like (compresses ~3x), odd seeds random.
fn chunk(seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; CHUNK];
    if seed % 2 == 1 {
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
        return out;
    }
    let words: [&[u8]; 8] = [b"page ", b"disk ", b"chunk ", b"store ", b"kernel ", b"guest ", b"0000 ", b"\n"];
    let mut x = seed.wrapping_add(0x9e3779b97f4a7c15);
    let mut pos = 0;
    while pos < CHUNK {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x >> 61) as usize];
        let n = w.len().min(CHUNK - pos);
        out[pos..pos + n].copy_from_slice(&w[..n]);
        pos += n;
    }
    out
}

fn row(what: &str, count: usize, bytes: usize, t: Duration) {
    let s = t.as_secs_f64();
    let mb = if bytes > 0 { format!("{:>10.1}", bytes as f64 / s / 1e6) } else { format!("{:>10}", "-") };
    println!("{what:<44} {count:>8} {:>9.3} {:>12.0} {mb}", s, count as f64 / s);
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = ChunkStore::open(dir.path())?;
    println!("{:<44} {:>8} {:>9} {:>12} {:>10}", "operation", "count", "seconds", "per second", "MB/s");

    // Insert: data generated up front so only the store is timed.
    let data: Vec<Vec<u8>> = (0..INSERT_CHUNKS as u64).map(chunk).collect();
    let ids: Vec<ChunkId> = data.iter().map(|d| ChunkId::of(d)).collect();
    let t = Instant::now();
    for (i, (id, d)) in ids.iter().zip(&data).enumerate() {
        assert_eq!(store.put(id, d)?, Put::Stored);
        if (i + 1) % COMMIT_EVERY == 0 {
            store.commit()?;
        }
    }
    store.commit()?;
    row("put 64 KiB, half compressible, commit/16 MiB", INSERT_CHUNKS, INSERT_CHUNKS * CHUNK, t.elapsed());

    let t = Instant::now();
    for (id, d) in ids.iter().zip(&data).take(512) {
        assert_eq!(store.put(id, d)?, Put::Present);
    }
    row("put 64 KiB already present", 512, 512 * CHUNK, t.elapsed());

    let t = Instant::now();
    for (id, d) in ids.iter().zip(&data) {
        let got = store.get(id)?.ok_or("chunk missing")?;
        assert_eq!(got.len(), d.len());
    }
    row("get 64 KiB (read, decompress, verify)", INSERT_CHUNKS, INSERT_CHUNKS * CHUNK, t.elapsed());
    let st = store.stats();
    drop(store);

    // Lookups: 50k small chunks present, from SST files after a reopen.
    let store = ChunkStore::open(dir.path())?;
    let present: Vec<ChunkId> = (0..LOOKUP_IDS as u64 / 2)
        .map(|i| {
            let d = i.to_le_bytes();
            let id = ChunkId::of(&d);
            store.put(&id, &d).map(|_| id)
        })
        .collect::<Result<_, _>>()?;
    drop(store);
    let store = ChunkStore::open(dir.path())?;
    let mut ask: Vec<ChunkId> = Vec::with_capacity(LOOKUP_IDS);
    for (i, id) in present.iter().enumerate() {
        ask.push(*id);
        ask.push(ChunkId::of(&(i as u64 + (1 << 40)).to_le_bytes()));
    }
    let rounds = 5;
    let t = Instant::now();
    for _ in 0..rounds {
        let found = store.contains_many(&ask)?;
        assert_eq!(found.iter().filter(|&&f| f).count(), LOOKUP_IDS / 2);
    }
    row("contains_many, 100k ids, half present", rounds * LOOKUP_IDS, 0, t.elapsed());
    let t = Instant::now();
    for id in &ask[..20_000] {
        store.contains(id)?;
    }
    row("contains, one id at a time", 20_000, 0, t.elapsed());

    println!(
        "\nstore after insert: {} chunks, {:.1} MB raw, {:.1} MB stored ({:.0}%), {} packs",
        st.chunks,
        st.raw_bytes as f64 / 1e6,
        st.stored_bytes as f64 / 1e6,
        100.0 * st.stored_bytes as f64 / st.raw_bytes as f64,
        st.packs
    );
    Ok(())
}
