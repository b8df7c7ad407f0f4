//! Benchmark: live migration of a 2 GiB test guest between two processes on
//! loopback QUIC — idle, and with 256 MiB written at 50 MiB/s. Prints total
//! time, downtime, effective rate and bytes on the wire, next to the zstd
//! size of the guest's non-zero pages (what an ideal copy would send).
//!
//! `cargo bench -p wanmig --bench migrate` (release). `WANMIG_BENCH_GIB`
//! changes the guest size; each scenario runs twice (the first run also pays
//! for the host backing fresh memory on the destination).

#[allow(dead_code)]
#[path = "../../tests/integration/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Keys, Receiver, VmDir, VmProcess, wanmig};

/// zstd-1 size of the non-zero pages of a snapshot's memory, compressed in
/// batches of the migration's size.
fn compressed_nonzero(memory: &std::path::Path) -> (u64, u64) {
    let data = std::fs::read(memory).expect("read memory file");
    let batch_bytes = wanmig_migrate::source::BATCH_BYTES;
    let (mut nonzero, mut compressed, mut batch) = (0u64, 0u64, Vec::with_capacity(batch_bytes));
    for page in data.chunks(4096) {
        if page.iter().any(|&b| b != 0) {
            nonzero += 1;
            batch.extend_from_slice(page);
            if batch.len() >= batch_bytes {
                compressed += zstd::bulk::compress(&batch, 1).expect("zstd").len() as u64;
                batch.clear();
            }
        }
    }
    if !batch.is_empty() {
        compressed += zstd::bulk::compress(&batch, 1).expect("zstd").len() as u64;
    }
    (nonzero, compressed)
}

fn scenario(name: &str, gib: u64, guest: &str) {
    let vm = VmDir::new(gib << 10, 1, guest);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to stamp its memory", Duration::from_secs(600), |g| g.phase == 2);
    std::thread::sleep(Duration::from_secs(1));
    // Reference: the guest's non-zero pages, compressed.
    let snap = vm.path("ref");
    src.request(&wanmig_control::Request::Snapshot { dir: snap.clone(), resume: true });
    let (nonzero, ideal) = compressed_nonzero(&snap.join(wanmig_vmm::snapshot::MEMORY_FILE));
    std::fs::remove_dir_all(&snap).expect("clean up");

    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let out = wanmig()
        .arg("send")
        .arg(&vm.config)
        .arg(&dst.addr)
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--json"])
        .output()
        .expect("send");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("send printed no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    let s = &v["summary"];
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let b = |k: &str| s["bytes"][k].as_f64().unwrap_or(0.0);
    println!(
        "{name:<30} {:>8} {:>8.2} {:>11.1} {:>6} {:>9.3} {:>9.1} {:>14.1} {:>7.0}",
        v["outcome"].as_str().unwrap_or("?"),
        f("total_ms") / 1e3,
        f("downtime_ms"),
        f("rounds"),
        f("effective_rate") / 1e9,
        b("total") / 1024.0,
        ideal as f64 / 1024.0,
        f("compression_ratio"),
    );
    let d = &s["downtime_breakdown"];
    println!(
        "{:<30} {nonzero} non-zero pages; downtime: last pages {:.1} ms, state {:.1} ms, ready {:.1} ms, ack {:.1} ms; \
         {} raw / {} delta / {} zero pages",
        "",
        d["last_pages_ms"].as_f64().unwrap_or(0.0),
        d["state_ms"].as_f64().unwrap_or(0.0),
        d["ready_ms"].as_f64().unwrap_or(0.0),
        d["commit_ack_ms"].as_f64().unwrap_or(0.0),
        b("raw_pages"),
        b("delta_pages"),
        b("zero_pages"),
    );
    if v["outcome"] == "migrated" {
        // The destination serves its control socket moments after the ack.
        let moved = VmProcess::at_socket(vm.path("dst").join("wanmig-it.sock"));
        moved.wait_for_progress(Duration::from_secs(30), |_| true);
        moved.shutdown();
    }
}

fn main() {
    let gib: u64 = std::env::var("WANMIG_BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    println!(
        "{:<30} {:>8} {:>8} {:>11} {:>6} {:>9} {:>9} {:>14} {:>7}",
        "scenario", "outcome", "total_s", "downtime_ms", "rounds", "eff_GB/s", "wire_KiB", "ideal_zstd_KiB", "ratio"
    );
    for run in ["cold", "warm"] {
        scenario(&format!("{gib} GiB idle ({run})"), gib, "ws_mib = 16\nrate_mib = 0");
        scenario(&format!("{gib} GiB 256 MiB@50 MiB/s ({run})"), gib, "ws_mib = 256\nrate_mib = 50");
    }
    println!("eff_GB/s: guest RAM / total time; wire_KiB: every byte the migration put on the wire;");
    println!("ideal_zstd_KiB: the guest's non-zero pages alone, zstd-1 in batches of the migration's size;");
    println!("downtime: pause to CommitAck");
}
