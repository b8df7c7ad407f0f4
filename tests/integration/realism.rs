//! The test guest's memory is as compressible as `mem_entropy` says, and no
//! more: its pages, compressed with zstd level 1 in 4 MiB batches (the
//! migration's own stream settings), shrink about 100/e to 1; with an 8 MiB
//! window (the most a receiver accepts) hardly better; and a page rewritten
//! by the next generation differs from its old copy in its whole random
//! part, so an XBZRLE delta cannot be smaller than that.

use std::path::Path;
use std::time::Duration;

use wanmig_vmm::snapshot;
use wanmig_vmm::testguest::{self, MemoryReport};

use crate::harness::{VmDir, VmProcess, require_kvm};

const BATCH: usize = 4 << 20;

/// RAM above the pool (the guest's stamped pages), from a snapshot, with
/// what the oracle found there. Below 3 GiB, memory.bin is RAM from 0.
fn guest_pages(dir: &Path) -> (MemoryReport, Vec<u8>) {
    let (_, ram) = snapshot::load_for_inspection(dir).expect("snapshot");
    let report = testguest::check_memory(ram.mem(), &ram.regions()).expect("memory oracle");
    let mut image = std::fs::read(dir.join(snapshot::MEMORY_FILE)).expect("memory.bin");
    (report, image.split_off(report.status.ws_start as usize))
}

/// Bytes after compressing `data` in 4 MiB batches through one zstd stream
/// at level 1, flushed after each batch (mem-sync's StreamCompressor), with
/// the window `window_log` if given, zstd's level-1 default otherwise.
fn zstd_stream(data: &[u8], window_log: Option<u32>) -> usize {
    use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
    let mut enc = Encoder::new(1).expect("encoder");
    if let Some(w) = window_log {
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(w)).expect("window");
    }
    let mut chunk = vec![0u8; 1 << 17];
    let mut total = 0;
    for batch in data.chunks(BATCH) {
        let mut input = InBuffer::around(batch);
        while input.pos() < batch.len() {
            let mut o = OutBuffer::around(&mut chunk[..]);
            enc.run(&mut input, &mut o).expect("compress");
            total += o.pos();
        }
        loop {
            let mut o = OutBuffer::around(&mut chunk[..]);
            let left = enc.flush(&mut o).expect("flush");
            total += o.pos();
            if left == 0 {
                break;
            }
        }
    }
    total
}

#[test]
fn guest_memory_compresses_as_its_entropy_says() {
    require_kvm();
    for entropy in [0u64, 35, 100] {
        let vm = VmDir::new(128, 1, &format!("ws_mib = 16\nflat_out = true\nmem_entropy = {entropy}"));
        let mut src = VmProcess::run(&vm);
        let p = src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
        // A full pass and more: every working-set page has been rewritten.
        let ws_pages = 16 * 256;
        let p = src.wait_for("a pass", Duration::from_secs(60), |g| g.steps > p.steps + ws_pages + 100);
        let (a, b) = (vm.path("a"), vm.path("b"));
        src.snapshot(&a);
        assert!(src.request(&wanmig_control::Request::Resume).ok);
        src.wait_for("another pass", Duration::from_secs(60), |g| g.steps > p.steps + 2 * ws_pages + 200);
        src.snapshot(&b);
        assert!(src.shutdown().success());

        let (ra, old) = guest_pages(&a);
        let (rb, new) = guest_pages(&b);
        assert_eq!(ra.status.mem_entropy, entropy);
        let (z1, z8) = (zstd_stream(&new, None), zstd_stream(&new, Some(23)));
        let (ratio, ratio8) = (new.len() as f64 / z1 as f64, new.len() as f64 / z8 as f64);

        // Pages of the working set that moved on by a generation or more
        // between the snapshots: the bytes that differ from the old copy.
        let ws_bytes = (rb.status.ws_pages * 4096) as usize;
        let (mut changed_pages, mut changed_bytes) = (0usize, 0usize);
        for (o, n) in old[..ws_bytes].chunks_exact(4096).zip(new[..ws_bytes].chunks_exact(4096)) {
            if o[8..16] != n[8..16] {
                changed_pages += 1;
                changed_bytes += o.iter().zip(n).filter(|(x, y)| x != y).count();
            }
        }
        let per_page = changed_bytes as f64 / changed_pages.max(1) as f64;
        eprintln!(
            "mem_entropy {entropy}: {} MiB of guest pages -> zstd -1 in 4 MiB batches {z1} bytes ({ratio:.2}:1), \
             with an 8 MiB window {z8} ({ratio8:.2}:1), predicted {}; a rewritten page differs from its \
             previous generation in {per_page:.0} of 4096 bytes ({changed_pages} pages)",
            new.len() >> 20,
            if entropy == 0 { "-".to_string() } else { format!("{:.2}:1", 100.0 / entropy as f64) },
        );
        assert!(changed_pages > ws_pages as usize / 2, "{changed_pages} pages rewritten");
        let random = (testguest::mem_words(entropy) * 8) as f64;
        if entropy == 0 {
            assert!(ratio > 100.0, "{ratio}");
            assert!(per_page < 9.0, "only the generation word changes: {per_page}");
        } else {
            let predicted = 100.0 / entropy as f64;
            for r in [ratio, ratio8] {
                assert!(r > predicted * 0.85 && r < predicted * 1.1, "ratio {r:.3}, predicted {predicted:.3}");
            }
            // Each random word differs (but for 1 in 256 bytes by chance).
            assert!(per_page > random * 0.98, "{per_page} of {random} random bytes changed");
        }
    }
}
