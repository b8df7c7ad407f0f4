//! Benchmark: post-copy memory (userfaultfd) on this host.
//!
//! Run with `cargo bench -p wanmig-vmm --bench postcopy` (release build).
//! Prints:
//!
//! - fault service latency in-process: a thread reads 10 000 missing pages
//!   one after the other; a server thread reads each fault, places the page
//!   (`UFFDIO_COPY`, `DONTWAKE`) and wakes it. Latency is what the reading
//!   thread sees: from just before its load to just after (fault → read by
//!   the server → placed → woken → load completes). p50, p99, max;
//! - placement throughput: 256 MiB of missing pages placed in batches of 1,
//!   16 and 256 contiguous pages (one `UFFDIO_COPY` and one `UFFDIO_WAKE`
//!   a batch), 256 scattered single pages a batch (256 copies, one wake),
//!   and zero pages (`UFFDIO_ZEROPAGE`), in GiB/s and pages/s. Each row runs
//!   three times over the same RAM (discarded in between); the best is
//!   printed.
//!
//! - the same seen from a KVM vCPU: a real-mode guest reads 240 pages one
//!   after the other with a port write after each; the time between port
//!   exits with the pages present and with them missing (served by a fault
//!   thread), 20 runs each. On PVM the guest runs in KVM's instruction
//!   emulator, so the access itself is slow: compare the two rows.
//!
//! `WANMIG_BENCH_FAULTS` changes the number of faults (default 10 000).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend};
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::postcopy::{PageData, Placement, PostcopyRam};

const PAGE: usize = 4096;
const MIB: u64 = 1 << 20;

/// Pseudo-random bytes (not zero pages, not one repeated pattern).
fn source(bytes: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..bytes / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn fault_latency(faults: usize) {
    let bytes = (faults * PAGE) as u64 + 2 * MIB;
    let ram = GuestRam::new(bytes).expect("map");
    let pc = Arc::new(PostcopyRam::register(&ram, &[]).expect("register"));
    let src = Arc::new(source(bytes as usize));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (pc, src, stop) = (pc.clone(), src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut faults = Vec::new();
            while !stop.load(Ordering::Acquire) {
                faults.clear();
                pc.read_faults(Some(Duration::from_millis(20)), &mut faults).expect("read faults");
                let batch: Vec<Placement> = faults
                    .iter()
                    .map(|f| {
                        let at = f.gpa.0 as usize;
                        Placement { gpa: f.gpa, data: PageData::Bytes(&src[at..at + PAGE]) }
                    })
                    .collect();
                pc.place(&batch).expect("place");
            }
        })
    };
    let base = ram.mem().get_host_address(GuestAddress(0)).expect("mapped") as usize;
    let mut lat = Vec::with_capacity(faults);
    let mut sum = 0u64;
    let all = Instant::now();
    for i in 0..faults {
        let p = (base + i * PAGE + 8) as *const u64;
        let t = Instant::now();
        // SAFETY: a page of guest RAM, which lives until `ram` drops after this loop.
        sum = sum.wrapping_add(unsafe { std::ptr::read_volatile(p) });
        lat.push(t.elapsed());
    }
    let total = all.elapsed();
    stop.store(true, Ordering::Release);
    server.join().expect("server");
    // The pages hold what was placed.
    let want = (0..faults).map(|i| u64::from_le_bytes(src[i * PAGE + 8..i * PAGE + 16].try_into().expect("8")));
    assert_eq!(sum, want.fold(0u64, u64::wrapping_add), "a page read other bytes than were placed");
    let s = pc.stats();
    assert_eq!(s.faults, faults as u64, "{s:?}");
    lat.sort();
    println!(
        "fault service (thread load -> fault read -> UFFDIO_COPY -> UFFDIO_WAKE -> load done), {faults} faults: \
         p50 {:.1} us, p99 {:.1} us, max {:.1} us, mean {:.1} us ({:.0} faults/s); {} wakes, {} fault messages",
        us(percentile(&lat, 0.5)),
        us(percentile(&lat, 0.99)),
        us(lat[lat.len() - 1]),
        us(total) / faults as f64,
        faults as f64 / total.as_secs_f64(),
        s.wakes,
        s.messages,
    );
}

fn throughput() {
    let bytes = 256 * MIB;
    let pages = (bytes as usize) / PAGE;
    let ram = GuestRam::new(bytes).expect("map");
    let pc = PostcopyRam::register(&ram, &[]).expect("register");
    let src = source(bytes as usize);
    println!(
        "{:<34} {:>8} {:>10} {:>12} {:>12} {:>8}",
        "placement (256 MiB)", "GiB/s", "pages/s", "fill ioctls", "wakes", "us/batch"
    );
    #[derive(Clone, Copy)]
    enum Shape {
        Run(usize),
        Scattered(usize),
        Zero(usize),
    }
    for shape in [Shape::Run(1), Shape::Run(16), Shape::Run(256), Shape::Scattered(256), Shape::Zero(256)] {
        let mut best: Option<(Duration, u64, u64, usize)> = None;
        for _ in 0..3 {
            pc.discard(GuestAddress(0), bytes).expect("discard");
            let before = pc.stats();
            let start = Instant::now();
            let mut batches = 0;
            match shape {
                Shape::Run(n) => {
                    for (i, chunk) in src.chunks(n * PAGE).enumerate() {
                        let gpa = GuestAddress((i * n * PAGE) as u64);
                        pc.place(&[Placement { gpa, data: PageData::Bytes(chunk) }]).expect("place");
                        batches += 1;
                    }
                }
                Shape::Scattered(n) => {
                    // Batch b holds pages b, b + B, b + 2B, ... (B = pages / n): no two adjacent.
                    let stride = pages / n;
                    for b in 0..stride {
                        let batch: Vec<Placement> = (0..n)
                            .map(|k| {
                                let p = b + k * stride;
                                Placement {
                                    gpa: GuestAddress((p * PAGE) as u64),
                                    data: PageData::Bytes(&src[p * PAGE..(p + 1) * PAGE]),
                                }
                            })
                            .collect();
                        pc.place(&batch).expect("place");
                        batches += 1;
                    }
                }
                Shape::Zero(n) => {
                    for b in 0..pages / n {
                        let gpa = GuestAddress((b * n * PAGE) as u64);
                        pc.place(&[Placement { gpa, data: PageData::Zero(n as u64) }]).expect("place");
                        batches += 1;
                    }
                }
            }
            let took = start.elapsed();
            assert_eq!(pc.missing_pages(), 0);
            let after = pc.stats();
            let run = (took, after.fill_ioctls - before.fill_ioctls, after.wakes - before.wakes, batches);
            if best.is_none_or(|b| run.0 < b.0) {
                best = Some(run);
            }
        }
        let (took, ioctls, wakes, batches) = best.expect("three runs");
        let name = match shape {
            Shape::Run(n) => format!("UFFDIO_COPY, runs of {n} pages"),
            Shape::Scattered(n) => format!("UFFDIO_COPY, {n} scattered pages"),
            Shape::Zero(n) => format!("UFFDIO_ZEROPAGE, runs of {n} pages"),
        };
        println!(
            "{name:<34} {:>8.2} {:>10.0} {ioctls:>12} {wakes:>12} {:>8.2}",
            bytes as f64 / took.as_secs_f64() / (1u64 << 30) as f64,
            pages as f64 / took.as_secs_f64(),
            us(took) / batches as f64,
        );
    }
    // A check that the copies placed the bytes.
    let mut back = vec![0u8; PAGE];
    vm_memory::Bytes::read_slice(ram.mem(), &mut back, GuestAddress(5 * PAGE as u64)).expect("read");
    assert!(back.iter().all(|&b| b == 0), "the last row placed zero pages");
}

/// Real mode: touch 240 pages from 0x10000, one `out` after each.
/// ```text
///     mov cx, 240 ; mov ax, 0x1000
/// L:  mov ds, ax ; mov bl, [0] ; out 0x10, al ; add ax, 0x100 ; dec cx ; jnz L
///     hlt
/// ```
const WALK: [u8; 21] = [
    0xb9, 0xf0, 0x00, 0xb8, 0x00, 0x10, 0x8e, 0xd8, 0x8a, 0x1e, 0x00, 0x00, 0xe6, 0x10, 0x05, 0x00, 0x01, 0x49, 0x75,
    0xf2, 0xf4,
];
const WALK_PAGES: u64 = 240;

/// Time between consecutive `out`s of the walk, per access, over `runs`
/// runs; with `missing`, the 240 pages are discarded before each run and
/// a server thread places each on its fault.
fn vcpu_walk(runs: usize, missing: bool) -> Vec<Duration> {
    use kvm_ioctls::{Kvm, VcpuExit};
    let mut ram = GuestRam::new(16 * MIB).expect("map");
    vm_memory::Bytes::write_slice(ram.mem(), &WALK, GuestAddress(0x1000)).expect("code");
    let pc = Arc::new(PostcopyRam::register(&ram, &[(GuestAddress(0x1000), 0x1000)]).expect("register"));
    let kvm = Kvm::new().expect("/dev/kvm");
    let vm = kvm.create_vm().expect("VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS");
    ram.register(&vm, false).expect("slots");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    let src = source(PAGE);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (pc, stop) = (pc.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut faults = Vec::new();
            while !stop.load(Ordering::Acquire) {
                faults.clear();
                pc.read_faults(Some(Duration::from_millis(20)), &mut faults).expect("read faults");
                let batch: Vec<Placement> =
                    faults.iter().map(|f| Placement { gpa: f.gpa, data: PageData::Bytes(&src) }).collect();
                pc.place(&batch).expect("place");
            }
        })
    };
    let mut gaps = Vec::new();
    for _ in 0..runs {
        if missing {
            pc.discard(GuestAddress(0x10000), WALK_PAGES * PAGE as u64).expect("discard");
        } else {
            pc.place(&[Placement { gpa: GuestAddress(0x10000), data: PageData::Zero(WALK_PAGES) }]).expect("place");
        }
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("sregs");
        vcpu.set_regs(&kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() }).expect("regs");
        let mut last = Instant::now();
        let mut first = true;
        loop {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::IoOut(..) => {
                    let now = Instant::now();
                    // The first gap includes the entry from the top: skip it.
                    if !first {
                        gaps.push(now - last);
                    }
                    first = false;
                    last = now;
                }
                VcpuExit::Hlt => break,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }
    stop.store(true, Ordering::Release);
    server.join().expect("server");
    gaps.sort();
    gaps
}

fn vcpu_latency() {
    let present = vcpu_walk(20, false);
    let missing = vcpu_walk(20, true);
    let row = |name: &str, g: &[Duration]| {
        println!(
            "vCPU access + port exit, {name}: {} accesses, p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            g.len(),
            us(percentile(g, 0.5)),
            us(percentile(g, 0.99)),
            us(g[g.len() - 1])
        )
    };
    row("page present", &present);
    row("page missing (KVM_RUN waits, served by the fault thread)", &missing);
    println!(
        "vCPU fault service, p50 difference: {:.1} us",
        us(percentile(&missing, 0.5)) - us(percentile(&present, 0.5))
    );
}

fn main() {
    let faults =
        std::env::var("WANMIG_BENCH_FAULTS").map_or(10_000, |v| v.parse().expect("WANMIG_BENCH_FAULTS: a count"));
    fault_latency(faults);
    vcpu_latency();
    throughput();
}
