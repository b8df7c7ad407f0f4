//! Chunking + hashing throughput per core, the cost of the first disk copy
//! before any byte leaves: fastcdc 2020 alone, blake3 alone, and both as
//! the source runs them (`ImageChunker`, reading from the page cache).
//!
//! `cargo bench -p wanmig-block-sync --bench chunking`

use std::os::unix::fs::FileExt;
use std::time::Instant;

use wanmig_block_sync::{BlockDigest, ImageChunker};
use wanmig_wire::ChunkParams;

const SIZE: usize = 512 << 20;

fn data() -> Vec<u8> {
    // Incompressible bytes with some repeats, as real disk data has.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut v: Vec<u8> = (0..SIZE / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    let (a, b) = v.split_at_mut(SIZE / 2);
    b[..SIZE / 8].copy_from_slice(&a[..SIZE / 8]);
    v
}

fn rate(bytes: usize, secs: f64) -> String {
    format!("{:7.0} MB/s", bytes as f64 / secs / 1e6)
}

fn main() {
    let data = data();
    let p = ChunkParams::DEFAULT;
    println!("{} MiB of data, {p}, one thread", SIZE >> 20);
    for round in 0..2 {
        let t = Instant::now();
        let n = fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max).count();
        let cdc = t.elapsed().as_secs_f64();

        let t = Instant::now();
        let mut h = 0u8;
        for c in data.chunks(64 << 10) {
            h ^= blake3::hash(c).as_bytes()[0];
        }
        let hash = t.elapsed().as_secs_f64();
        std::hint::black_box(h);

        // Chunking + hashing, what dedup itself needs: cut, then an id per chunk.
        let t = Instant::now();
        let mut ids = 0u8;
        for c in fastcdc::v2020::FastCDC::new(&data, p.min, p.avg, p.max) {
            ids ^= blake3::hash(&data[c.offset..c.offset + c.length]).as_bytes()[0];
        }
        let cut_and_id = t.elapsed().as_secs_f64();
        std::hint::black_box(ids);

        let f = tempfile::tempfile().expect("tmp");
        f.write_all_at(&data, 0).expect("write");
        let t = Instant::now();
        let mut chunker = ImageChunker::new(&f, SIZE as u64, p, 8 << 20);
        let mut digest = BlockDigest::new(SIZE as u64);
        let mut chunks = 0;
        while let Some(b) = chunker.next_batch(&mut digest).expect("read") {
            chunks += b.chunks.len();
        }
        let all = t.elapsed().as_secs_f64();
        println!(
            "run {round}: fastcdc {} ({n} chunks, avg {} KiB) | blake3 {} | cut + ids {} | ImageChunker (read + cut + ids + block digest) {} ({chunks} chunks)",
            rate(SIZE, cdc),
            SIZE / n / 1024,
            rate(SIZE, hash),
            rate(SIZE, cut_and_id),
            rate(SIZE, all),
        );
    }
}
