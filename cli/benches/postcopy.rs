//! Benchmark: post-copy. Prints, for a 128 MiB test guest whose pages do
//! not compress (`mem_entropy = 100`):
//!
//! - `--postcopy now` through the link emulator (`wanmig-linkem`, two
//!   network namespaces, 200 Mbit/s, no loss) at 1 ms and at 50 ms RTT:
//!   total time, post-copy time, faults, fault service time p50/p99/max at
//!   the destination, time the vCPU spent blocked, pages requested vs.
//!   pushed;
//! - on loopback capped at 40 Mbit/s, the same flat-out guest with
//!   `--postcopy auto` (hybrid) and `--postcopy off` (pre-copy with
//!   auto-converge): total time, downtime, rounds, highest throttle.
//!
//! `cargo bench -p wanmig --bench postcopy` (needs root for the network
//! namespaces, and /dev/kvm; `WANMIG_BENCH_ONLY=wan|hybrid` runs half). On a shared 2-core machine a release build
//! is long; `--profile dev` runs the same scenarios with the debug binary.

#[allow(dead_code)]
#[path = "../../tests/integration/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Keys, Receiver, VmDir, VmProcess, wanmig_in};
use wanmig_linkem::{LinkConfig, LinkParams, WanPair};

/// Runs `send` with `args`; returns the JSON answer.
fn send(netns: Option<&str>, vm: &VmDir, dest: &str, keys: &Keys, args: &[&str]) -> serde_json::Value {
    let out = wanmig_in(netns)
        .arg("send")
        .arg(&vm.config)
        .arg(dest)
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--json"])
        .args(args)
        .output()
        .expect("send");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("send printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// `--postcopy now` across the emulated WAN at `rtt`.
fn across(tag: &str, rtt: Duration) {
    let params = LinkParams::wan(200_000_000, rtt);
    let wan = WanPair::new(tag, LinkConfig::symmetric(params).with_seed(7)).expect("the emulated WAN (root)");
    let vm = VmDir::new(128, 1, "ws_mib = 32\nrate_mib = 16\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run_in(&vm, wan.a().name());
    src.wait_for("the guest to run", Duration::from_secs(300), |g| g.phase == 2 && g.steps > 1000);
    let listen = format!("{}:0", wan.addr_b());
    let shared = vm.dir.path().to_path_buf();
    let args = [std::ffi::OsStr::new("--shared-disks"), shared.as_os_str()];
    let dst = Receiver::start_at(wan.b().name(), &listen, &keys, &keys.src_fp, &vm.path("dst"), &args);
    let rtt_ms = format!("{}ms", rtt.as_millis());
    let v = send(
        Some(wan.a().name()),
        &vm,
        &dst.addr,
        &keys,
        &["--postcopy", "now", "--link-bandwidth", "200Mbit", "--rtt", &rtt_ms],
    );
    let s = &v["summary"];
    let pc = &s["postcopy"];
    let d = &pc["dest"];
    let blocked: f64 = d["vcpu_blocked_us"].as_array().map_or(0.0, |a| a.iter().map(f).sum());
    println!(
        "{:<22} {:>9} {:>8.2} {:>9.2} {:>8.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8} {:>8}",
        format!("now, RTT {rtt_ms}"),
        v["outcome"].as_str().unwrap_or("?"),
        f(&s["total_ms"]) / 1e3,
        f(&pc["postcopy_ms"]) / 1e3,
        f(&s["downtime_ms"]),
        d["faults"],
        f(&d["service_p50_us"]) / 1e3,
        f(&d["service_p99_us"]) / 1e3,
        f(&d["service_max_us"]) / 1e3,
        blocked / 1e6,
        d["requested"],
        d["pushed"],
    );
    drop(dst);
}

/// The flat-out guest over loopback capped at 40 Mbit/s, with `mode`.
fn flat_out(mode: &str) {
    let vm = VmDir::new(128, 1, "ws_mib = 32\nflat_out = true\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(300), |g| g.phase == 2 && g.steps > 10_000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let v = send(None, &vm, &dst.addr, &keys, &["--postcopy", mode, "--max-bandwidth", "40Mbit", "--timeout", "300s"]);
    let s = &v["summary"];
    let pc = &s["postcopy"];
    println!(
        "{:<22} {:>9} {:>8.2} {:>9.2} {:>8.1} {:>7} {:>9}%  wire {:.1} MiB{}",
        format!("{mode}, 40 Mbit"),
        v["outcome"].as_str().unwrap_or("?"),
        f(&s["total_ms"]) / 1e3,
        f(&pc["postcopy_ms"]) / 1e3,
        f(&s["downtime_ms"]),
        s["rounds"],
        s["max_throttle"],
        f(&s["bytes"]["total"]) / 1048576.0,
        match pc["reason"].as_str() {
            Some(r) => format!("; switched: {r}"),
            None => String::new(),
        }
    );
}

fn main() {
    harness::require_kvm();
    println!(
        "{:<22} {:>9} {:>8} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "scenario",
        "outcome",
        "total s",
        "postcopy",
        "down ms",
        "faults",
        "p50 ms",
        "p99 ms",
        "max ms",
        "blocked s",
        "asked",
        "pushed"
    );
    // `WANMIG_BENCH_ONLY=wan` or `=hybrid` runs one half.
    let only = std::env::var("WANMIG_BENCH_ONLY").unwrap_or_default();
    if only != "hybrid" {
        across("pcb1", Duration::from_millis(1));
        across("pcb50", Duration::from_millis(50));
    }
    if only == "wan" {
        return;
    }
    println!(
        "{:<22} {:>9} {:>8} {:>9} {:>8} {:>7} {:>10}",
        "scenario", "outcome", "total s", "postcopy", "down ms", "rounds", "throttle"
    );
    flat_out("auto");
    flat_out("off");
}
