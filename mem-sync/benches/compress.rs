//! Benchmark: the page stream's zstd compression on one thread and spread
//! over zstd's worker threads, on 256 MiB of pages like the test guest's
//! defaults (35% of each page pseudo-random, the rest a per-page stamp),
//! in the 4 MiB batches the source sends. Prints MB/s of input and the
//! ratio per worker count; the machine's core count bounds what helps.
//!
//! `cargo bench -p wanmig-mem-sync --bench compress`

use std::time::Instant;

use wanmig_mem_sync::compress::{DEFAULT_LEVEL, StreamCompressor, default_workers};

const BATCH: usize = 4 << 20;
const TOTAL: usize = 256 << 20;

/// One 4 MiB batch of pages, `batch` making each different.
fn batch(n: usize, x: &mut u64) -> Vec<u8> {
    (0..BATCH)
        .map(|i| {
            if i % 4096 < 1434 {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                *x as u8
            } else {
                ((i / 4096) ^ n) as u8
            }
        })
        .collect()
}

fn main() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let batches: Vec<Vec<u8>> = (0..TOTAL / BATCH).map(|n| batch(n, &mut x)).collect();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    println!("{cores} cores; the source uses {} worker(s) by default", default_workers());
    println!("{:>8} {:>10} {:>8}", "workers", "MB/s", "ratio");
    for workers in [0u32, 1, 2, 3] {
        let mut c = StreamCompressor::with_workers(DEFAULT_LEVEL, workers).expect("encoder");
        let t = Instant::now();
        let out: usize = batches.iter().map(|b| c.compress(b).expect("compress").len()).sum();
        let secs = t.elapsed().as_secs_f64();
        println!("{workers:>8} {:>10.0} {:>8.2}", TOTAL as f64 / secs / 1e6, TOTAL as f64 / out as f64);
    }
}
