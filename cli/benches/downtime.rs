//! Benchmark: downtime of a migration that copies a disk. A test guest of
//! `WANMIG_BENCH_GIB` GiB (default 2) writing 256 MiB of memory at 32 MiB/s
//! (default entropy: pages compress like a server's) and 256 KiB/s of
//! scattered 4 KiB blocks to a 1 GiB disk holding 256 MiB of data that
//! does not compress; copied to a `receive` with its own chunk store, on
//! loopback and across the user-space WAN emulator (200 Mbit/s, 50 ms RTT).
//! Prints the downtime and its breakdown (pause → last pages sent → device
//! state sent → Ready → CommitAck) per run, and the goal:
//! max(50 ms, RTT + 30 ms).
//!
//! `cargo bench -p wanmig --bench downtime` (release; root for the WAN
//! runs); `WANMIG_BENCH_BASELINE=PATH` runs another `wanmig` binary (an
//! earlier build) in turn with this one, for a side-by-side comparison;
//! `WANMIG_BENCH_WAN=0` skips the WAN runs; `WANMIG_BENCH_BUDGET_MS`
//! gives every run that downtime budget instead of the goal;
//! `WANMIG_BENCH_POSTCOPY=off|auto|now` passes `--postcopy`. Each guest pays first touch of its fresh memory at both ends
//! (~3.7 s/GiB on this VM) before the figures start; that is not in them.

#[allow(dead_code)]
#[path = "../../tests/integration/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::Duration;

use harness::{Keys, Receiver, VmDir, VmProcess, wanmig};
use wanmig_linkem::{LinkConfig, LinkParams, WanPair};

const GUEST: &str = "ws_mib = 256\nrate_mib = 32\ndisk_kib = 256\ndisk_mib = 512\ndisk_scatter = true";

/// The guest's disk: 1 GiB, of which the 256 MiB past the guest's own
/// region are pseudo-random.
fn fill_disk(vm: &VmDir) {
    harness::fill_incompressible(&vm.disk, 1 << 30, 512..768, 0x9e37_79b9_7f4a_7c15);
}

fn run(name: &str, gib: u64, wan: Option<&WanPair>, rtt_ms: f64) {
    let vm = VmDir::new(gib << 10, 1, GUEST);
    fill_disk(&vm);
    let keys = Keys::new(vm.dir.path());
    let mut src = match wan {
        Some(w) => VmProcess::run_in(&vm, w.a().name()),
        None => VmProcess::run(&vm),
    };
    src.wait_for("the guest to stamp its memory", Duration::from_secs(900), |g| g.phase == 2);
    std::thread::sleep(Duration::from_secs(2));
    let dst_dir = vm.path("dst");
    let dst = match wan {
        Some(w) => Receiver::start_at(w.b().name(), &format!("{}:0", w.addr_b()), &keys, &keys.src_fp, &dst_dir, &[]),
        None => Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]),
    };
    let mut cmd = wanmig();
    cmd.arg("send").arg(&vm.config).arg(&dst.addr).arg("--identity").arg(&keys.src);
    cmd.args(["--peer", &keys.dst_fp, "--json"]);
    // The budget is the goal: the policy must keep it (throttling the
    // guest if it has to, which the last column shows).
    let goal = 50f64.max(rtt_ms + 30.0);
    let budget = std::env::var("WANMIG_BENCH_BUDGET_MS").ok().and_then(|b| b.parse().ok()).unwrap_or(goal);
    // The early commit is the default now; the flag stays so that a
    // baseline binary from before (`WANMIG_BENCH_BASELINE`, whose default
    // was the classic order) is measured in the same order.
    cmd.args(["--downtime", &format!("{budget}ms"), "--early-commit"]);
    // Pre-copy alone (`off`) shows what the switch-over itself costs where
    // the hybrid policy would move the guest in post-copy instead.
    if let Ok(mode) = std::env::var("WANMIG_BENCH_POSTCOPY") {
        cmd.args(["--postcopy", &mode]);
    }
    if wan.is_some() {
        cmd.args(["--link-bandwidth", "200Mbit", "--rtt", "50ms"]);
    }
    let out = cmd.output().expect("send");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("send printed no JSON: {}", String::from_utf8_lossy(&out.stderr)));
    let s = &v["summary"];
    let d = &s["downtime_breakdown"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    if let Ok(dir) = std::env::var("WANMIG_BENCH_JSON") {
        let file = format!("{dir}/{}.json", name.replace([' ', ',', '#'], "_"));
        std::fs::write(&file, &out.stdout).expect("write the summary");
    }
    println!(
        "{name:<44} {:>9} {:>8.1} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.0} {:>7} {:>6}",
        v["outcome"].as_str().unwrap_or("?"),
        f(&s["total_ms"]) / 1e3,
        f(&s["downtime_ms"]),
        f(&d["last_pages_ms"]),
        f(&d["state_ms"]),
        f(&d["ready_ms"]),
        f(&d["commit_ack_ms"]),
        goal,
        f(&s["max_throttle"]),
        s["rounds"],
    );
    // Where the destination's part of the downtime goes.
    for line in dst.log().lines().filter(|l| l.contains(" ms") && (l.contains("VM built") || l.contains("committed:")))
    {
        println!("    {line}");
    }
    if v["outcome"] == "migrated" {
        let moved = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
        moved.wait_for_progress(Duration::from_secs(60), |_| true);
        moved.shutdown();
    } else {
        eprintln!("{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The builds to compare: a baseline (`WANMIG_BENCH_BASELINE`, the path
/// of another `wanmig` binary) first when given, then this one.
fn builds() -> Vec<(&'static str, Option<PathBuf>)> {
    let mut b = Vec::new();
    if let Some(p) = std::env::var_os("WANMIG_BENCH_BASELINE") {
        b.push(("baseline", Some(PathBuf::from(p))));
    }
    b.push(("this", None));
    b
}

/// Runs one scenario with `build`'s binary.
fn with_build(build: &(&str, Option<PathBuf>), f: impl FnOnce()) {
    *harness::BINARY.lock().expect("binary") = build.1.clone();
    f();
    *harness::BINARY.lock().expect("binary") = None;
}

fn main() {
    let gib: u64 = std::env::var("WANMIG_BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let runs: u32 = std::env::var("WANMIG_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    println!(
        "{:<44} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>6}",
        "scenario", "outcome", "total_s", "downtime", "pages", "state", "ready", "ack", "goal", "thr_%", "rounds"
    );
    // Builds alternate within each run, so that both see the same machine.
    for i in 1..=runs {
        for b in &builds() {
            with_build(b, || run(&format!("{} {gib} GiB, disk, loopback #{i}", b.0), gib, None, 0.0));
        }
    }
    if std::env::var("WANMIG_BENCH_WAN").is_ok_and(|v| v == "0") {
        return;
    }
    let params = LinkParams::wan(200_000_000, Duration::from_millis(50));
    match WanPair::new("dtb", LinkConfig::symmetric(params)) {
        Ok(wan) => {
            for i in 1..=runs {
                for b in &builds() {
                    let name = format!("{} {gib} GiB, disk, 200 Mbit 50 ms #{i}", b.0);
                    with_build(b, || run(&name, gib, Some(&wan), 50.0));
                }
            }
        }
        Err(e) => println!("(no WAN runs: {e})"),
    }
    println!("downtime and its breakdown in ms from the pause: pages = last pages sent, state = device state sent,");
    println!("ready = Ready received, ack = CommitAck received (= downtime); goal = max(50 ms, RTT + 30 ms), also the");
    println!("downtime budget given (WANMIG_BENCH_BUDGET_MS overrides it); thr_% = the guest's highest throttle");
    println!("(auto-converge). WANMIG_BENCH_JSON=DIR keeps each summary; WANMIG_BENCH_BASELINE=PATH runs that wanmig");
    println!("binary too, alternating with this build");
}
