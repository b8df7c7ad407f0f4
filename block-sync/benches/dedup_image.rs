//! Dedup ratio and bytes on the wire for a disk image of real files, on a
//! first move (empty destination) and a re-move after the guest changed a
//! little (the destination holds the first move's chunks), and what a
//! re-move sends with change tracking: the 4 KiB blocks the guest wrote (a
//! write-tracking map, `wanmig_vmm::tracking`) instead of the chunks that
//! hold them, or the hybrid `sync` uses onto the destination's epoch
//! (`features::DISK_BASE`; `wanmig_migrate`'s `RUN_AS_CHUNKS`): short runs
//! of written blocks as blocks, long ones as the chunks over them
//! (content-defined chunking finds what an insert only shifted). The rows
//! model the wire (zstd-1 batches, 16 bytes per extent, 37 per chunk); the
//! migration's own figures for the test guest are in the tests
//! `dr::a_sync_after_a_sync_*` and `in_memory::a_sync_from_*`.
//!
//! Measured (this machine, release): re-move 22.3% of the first move's
//! 71.0 MiB; tracked blocks alone 19.3% (the 100-byte insert rewrites a
//! whole file, which a block map sees as all new); the hybrid 13.1%. The
//! scenario's 8 MiB new file is random, so 11.3% is the floor whatever is
//! sent; the 300 scattered 4 KiB writes cost 1.6% as blocks.
//!
//! The image stands in for the sample data disk of the Linux-guest work: a
//! filesystem-like layout of real files from this host (`/usr/lib`,
//! `/usr/share`), some duplicated, the free space zero.
//!
//! `cargo bench -p wanmig-block-sync --bench dedup_image`

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use wanmig_block_sync::{BlockDigest, ImageChunker};
use wanmig_wire::ChunkParams;

const IMAGE: u64 = 384 << 20;
const FILES: u64 = 224 << 20;

/// Real files under `dir`, up to `budget` bytes.
fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>, budget: &mut u64) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        if *budget == 0 {
            return;
        }
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            collect(&e.path(), out, budget);
        } else if ft.is_file() {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            if len > 0 && len <= 16 << 20 && len <= *budget {
                *budget -= len;
                out.push(e.path());
            }
        }
    }
}

/// Lays files out 4 KiB-aligned; every tenth file is stored twice (a copy
/// elsewhere on the disk). Returns the (offset, len) of each file.
fn build_image(f: &File) -> Vec<(u64, u64)> {
    let mut paths = Vec::new();
    let mut budget = FILES;
    collect(Path::new("/usr/lib"), &mut paths, &mut budget);
    collect(Path::new("/usr/share"), &mut paths, &mut budget);
    f.set_len(IMAGE).expect("size");
    let (mut at, mut placed) = (1u64 << 20, Vec::new());
    for (i, p) in paths.iter().enumerate() {
        let Ok(data) = std::fs::read(p) else { continue };
        let copies = if i % 10 == 0 { 2 } else { 1 };
        for _ in 0..copies {
            if at + data.len() as u64 > IMAGE {
                return placed;
            }
            f.write_all_at(&data, at).expect("write");
            placed.push((at, data.len() as u64));
            at = (at + data.len() as u64).div_ceil(4096) * 4096;
        }
    }
    placed
}

#[derive(Default)]
struct Move {
    chunks: u64,
    zero: u64,
    data_bytes: u64,
    sent_chunks: u64,
    sent_raw: u64,
    sent_wire: u64,
    manifest: u64,
    secs: f64,
    /// Each chunk sent: (offset, len, bytes on the wire).
    sent: Vec<(u64, u64, u64)>,
}

/// One move against a destination holding `have`; `have` gains what is sent.
fn one_move(f: &File, have: &mut HashSet<[u8; 32]>) -> Move {
    let t = Instant::now();
    let mut m = Move::default();
    let mut chunker = ImageChunker::new(f, IMAGE, ChunkParams::DEFAULT, 8 << 20);
    let mut digest = BlockDigest::new(IMAGE);
    let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
    while let Some(b) = chunker.next_batch(&mut digest).expect("read") {
        for c in &b.chunks {
            m.chunks += 1;
            m.manifest += 5;
            let Some(id) = c.id else {
                m.zero += 1;
                continue;
            };
            m.manifest += 32;
            m.data_bytes += u64::from(c.len);
            if have.insert(id.0) {
                m.sent_chunks += 1;
                m.sent_raw += u64::from(c.len);
                let wire = z.compress(b.bytes(c)).expect("compress").len() as u64 + 50;
                m.sent_wire += wire;
                m.sent.push((b.offset + c.start as u64, u64::from(c.len), wire));
            }
        }
    }
    m.secs = t.elapsed().as_secs_f64();
    m
}

/// Marks the 4 KiB blocks of `[at, at + len)` in `bits`.
fn mark(bits: &mut [u64], at: u64, len: u64) {
    for b in at / 4096..(at + len).div_ceil(4096) {
        bits[(b / 64) as usize] |= 1 << (b % 64);
    }
}

/// The runs of marked blocks, as (first block, blocks).
fn runs(bits: &[u64]) -> Vec<(u64, u64)> {
    let blocks = bits.len() as u64 * 64;
    let set = |b: u64| bits[(b / 64) as usize] & (1 << (b % 64)) != 0;
    let (mut out, mut b) = (Vec::new(), 0);
    while b < blocks {
        if !set(b) {
            b += 1;
            continue;
        }
        let start = b;
        while b < blocks && set(b) {
            b += 1;
        }
        out.push((start, b - start));
    }
    out
}

/// A hybrid: runs of marked blocks shorter than `cut` bytes go as blocks,
/// longer ones as the content-defined chunks over them that the
/// destination lacks (dedup finds what an insert only moved). Returns the
/// bytes on the wire.
fn hybrid(f: &File, bits: &[u64], sent: &[(u64, u64, u64)], cut: u64) -> u64 {
    let mut small = vec![0u64; bits.len()];
    let mut chunks = std::collections::BTreeSet::new();
    for (start, n) in runs(bits) {
        let (at, len) = (start * 4096, n * 4096);
        if len < cut {
            mark(&mut small, at, len);
        } else {
            for (i, &(o, l, _)) in sent.iter().enumerate() {
                if o < at + len && at < o + l {
                    chunks.insert(i);
                }
            }
        }
    }
    tracked_blocks(f, &small).1 + chunks.iter().map(|&i| sent[i].2 + 37).sum::<u64>()
}

/// What sending the marked blocks costs: each run of blocks as one extent
/// (16 bytes of header: offset and length), the data zstd-1-compressed in
/// batches of up to 8 MiB as `DiskWrites` travel. Returns (raw, wire).
fn tracked_blocks(f: &File, bits: &[u64]) -> (u64, u64) {
    let mut z = zstd::bulk::Compressor::new(1).expect("zstd");
    let (mut raw, mut wire, mut batch) = (0u64, 0u64, Vec::new());
    let blocks = bits.len() as u64 * 64;
    let mut b = 0;
    while b < blocks {
        if bits[(b / 64) as usize] & (1 << (b % 64)) == 0 {
            b += 1;
            continue;
        }
        let start = b;
        while b < blocks && bits[(b / 64) as usize] & (1 << (b % 64)) != 0 {
            b += 1;
        }
        let mut data = vec![0u8; ((b - start) * 4096) as usize];
        f.read_exact_at(&mut data, start * 4096).expect("read");
        raw += data.len() as u64;
        wire += 16;
        batch.extend_from_slice(&data);
        if batch.len() >= 8 << 20 {
            wire += z.compress(&batch).expect("compress").len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        wire += z.compress(&batch).expect("compress").len() as u64;
    }
    (raw, wire)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn main() {
    let f = tempfile::tempfile().expect("tmp");
    let files = build_image(&f);
    let used: u64 = files.iter().map(|(_, l)| l).sum();
    println!(
        "image {} holding {} files ({} of data, every tenth stored twice); fastcdc {}",
        mib(IMAGE),
        files.len(),
        mib(used),
        ChunkParams::DEFAULT
    );
    let mut have = HashSet::new();
    let first = one_move(&f, &mut have);

    // The guest changes a little: 300 scattered 4 KiB writes inside files,
    // one file rewritten with a 100-byte insert near its start, 8 MiB of
    // new file in free space.
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut written = 0u64;
    let mut bits = vec![0u64; (IMAGE / 4096 / 64) as usize];
    for _ in 0..300 {
        let (off, len) = files[(rnd() % files.len() as u64) as usize];
        let at = (off + rnd() % len.max(1)) / 4096 * 4096;
        let block: Vec<u8> = (0..4096).map(|_| rnd() as u8).collect();
        f.write_all_at(&block, at).expect("write");
        mark(&mut bits, at, 4096);
        written += 4096;
    }
    let scattered_bits = bits.clone();
    let (off, len) = *files.iter().max_by_key(|(_, l)| *l).expect("a file");
    let mut data = vec![0u8; len as usize];
    f.read_exact_at(&mut data, off).expect("read");
    data.splice(4096..4096, [7u8; 100]);
    data.truncate(len as usize);
    f.write_all_at(&data, off).expect("write");
    mark(&mut bits, off, len);
    written += len;
    let fresh: Vec<u8> = (0..8 << 20).map(|_| rnd() as u8).collect();
    f.write_all_at(&fresh, IMAGE - (16 << 20)).expect("write");
    mark(&mut bits, IMAGE - (16 << 20), fresh.len() as u64);
    written += fresh.len() as u64;
    let second = one_move(&f, &mut have);
    let t = Instant::now();
    let (tracked_raw, tracked_wire) = tracked_blocks(&f, &bits);
    let tracked_secs = t.elapsed().as_secs_f64();
    let (scattered_raw, scattered_wire) = tracked_blocks(&f, &scattered_bits);
    let mixed = hybrid(&f, &bits, &second.sent, 256 << 10);

    println!(
        "| move | chunks (zero) | non-zero bytes | chunks sent | sent raw | on the wire (zstd-1 + manifest) | dedup ratio | chunk+hash+compress time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, m) in [("first move, empty destination", &first), ("re-move after the changes", &second)] {
        println!(
            "| {name} | {} ({}) | {} | {} | {} | {} | {:.2}x | {:.2} s |",
            m.chunks,
            m.zero,
            mib(m.data_bytes),
            m.sent_chunks,
            mib(m.sent_raw),
            mib(m.sent_wire + m.manifest),
            m.data_bytes as f64 / m.sent_raw.max(1) as f64,
            m.secs
        );
    }
    let first_bytes = (first.sent_wire + first.manifest) as f64;
    println!(
        "| re-move sending the tracked 4 KiB blocks | {} blocks | — | — | {} | {} | — | {:.2} s |",
        tracked_raw / 4096,
        mib(tracked_raw),
        mib(tracked_wire),
        tracked_secs
    );
    println!(
        "| re-move: runs under 256 KiB as blocks, longer ones as the chunks over them | — | — | — | — | {} | — | — |",
        mib(mixed)
    );
    println!(
        "the 8 MiB new file is random (incompressible): {:.1}% of the first move's bytes whatever is sent",
        100.0 * (8 << 20) as f64 / first_bytes
    );
    println!("hybrid: {:.1}% of the first move's bytes", 100.0 * mixed as f64 / first_bytes);
    println!(
        "guest wrote {} between the moves; the re-move sent {:.1}% of the first move's bytes; sending the tracked blocks would send {:.1}%",
        mib(written),
        100.0 * (second.sent_wire + second.manifest) as f64 / first_bytes,
        100.0 * tracked_wire as f64 / first_bytes
    );
    println!(
        "of which the 300 scattered 4 KiB writes alone: {} as blocks ({} on the wire, {:.2}% of the first move) — \
         the file rewritten after a 100-byte insert is all new blocks to a block map, few new chunks to content-defined chunking",
        mib(scattered_raw),
        mib(scattered_wire),
        100.0 * scattered_wire as f64 / first_bytes
    );
}
