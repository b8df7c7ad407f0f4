//! Post-copy between real processes under KVM: a guest that writes faster
//! than the link moves with `--postcopy auto` where pre-copy alone must
//! throttle it hard or give up; a destination killed during post-copy
//! leaves the guest paused at the source, reported as lost.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use wanmig_control::{self as control, Request};

use crate::harness::{Keys, Receiver, VmDir, VmProcess, check_guest, require_kvm};

/// A flat-out guest whose pages do not compress: it rewrites its 32 MiB
/// working set faster than 20 Mbit/s carries it (at 40 Mbit/s a 50%
/// throttle sometimes lets pre-copy converge: then `auto` rightly does not
/// switch).
const FLAT_OUT: &str = "ws_mib = 32\nflat_out = true\nmem_entropy = 100";

/// `wanmig send ... --json` with `extra` arguments; returns (exit code,
/// the JSON answer).
fn send(vm: &VmDir, to: &Receiver, keys: &Keys, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("send"),
        vm.config.as_os_str(),
        OsStr::new(&to.addr),
        OsStr::new("--identity"),
        keys.src.as_os_str(),
        OsStr::new("--peer"),
        OsStr::new(&keys.dst_fp),
        OsStr::new("--json"),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let out = crate::harness::wanmig().args(&args).output().expect("send");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn a_guest_faster_than_the_link_moves_in_postcopy_where_precopy_must_throttle() {
    require_kvm();
    let link = ["--max-bandwidth", "20Mbit", "--downtime", "300ms", "--timeout", "300s"];

    // Pre-copy alone: throttled hard, or given up.
    let vm = VmDir::new(64, 1, FLAT_OUT);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 10_000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst-off"), &[]);
    let (code, v) = send(&vm, &dst, &keys, &[&link[..], &["--postcopy", "off"]].concat());
    let s = &v["summary"];
    eprintln!(
        "pre-copy only: {} in {:.1} s, throttle up to {}%, downtime {:.0} ms, {} rounds",
        v["outcome"],
        s["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
        s["max_throttle"],
        s["downtime_ms"],
        s["rounds"]
    );
    let throttled = s["max_throttle"].as_u64().unwrap_or(0);
    match v["outcome"].as_str() {
        Some("migrated") => assert!(throttled >= 50, "pre-copy converged without a heavy throttle: {v}"),
        Some("failed_source_running") => assert_eq!(code, 1, "{v}"),
        other => panic!("pre-copy only: unexpected outcome {other:?}: {v}"),
    }
    assert!(s["postcopy"].is_null(), "--postcopy off never switches: {v}");
    drop((src, dst));

    // Hybrid: pre-copy, then the switch; the same guest, booted afresh.
    let vm = VmDir::new(64, 1, FLAT_OUT);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 10_000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let (code, v) = send(&vm, &dst, &keys, &[&link[..], &["--postcopy", "auto"]].concat());
    assert_eq!((code, v["outcome"].as_str()), (0, Some("migrated")), "{v}");
    let s = &v["summary"];
    let pc = &s["postcopy"];
    eprintln!("hybrid: {s}");
    assert!(pc["reason"].as_str().is_some_and(|r| r.contains("throttle")), "switched for the policy's reason: {v}");
    assert!(pc["missing_pages"].as_u64().unwrap_or(0) > 0, "{v}");
    let downtime = s["downtime_ms"].as_f64().expect("downtime");
    assert!(downtime <= 300.0, "downtime {downtime} ms over the 300 ms budget: {v}");
    assert!(s["max_throttle"].as_u64().unwrap_or(100) <= 50, "the hybrid never throttles past 50%: {v}");
    let d = &pc["dest"];
    assert!(d["faults"].as_u64().is_some() && d["service_max_us"].as_u64().is_some(), "the destination reported: {v}");
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    dst.wait_log("post-copy complete", Duration::from_secs(30));

    // The oracle, at the destination.
    let moved = VmProcess::at_socket(vm.path("dst").join("wanmig-it.sock"));
    let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 1000);
    assert_eq!(p.errors, 0, "the guest found a stale or lost page after the move");
    check_guest(&moved, &vm.path("after"), &vm.disk);
    moved.shutdown();
}

#[test]
fn a_destination_killed_during_postcopy_leaves_the_guest_paused_and_reported_lost() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 32\nrate_mib = 16\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 1000);
    let mut dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    // 64 MiB at 8 Mbit/s: a minute of post-copy, killed a second in.
    let sending = {
        let (vm_cfg, addr, id, fp) = (vm.config.clone(), dst.addr.clone(), keys.src.clone(), keys.dst_fp.clone());
        std::thread::spawn(move || {
            let out = crate::harness::wanmig()
                .arg("send")
                .arg(&vm_cfg)
                .arg(&addr)
                .arg("--identity")
                .arg(&id)
                .args(["--peer", &fp, "--json", "--postcopy", "now", "--max-bandwidth", "8Mbit"])
                .args(["--resume-window", "0s"])
                .output()
                .expect("send");
            (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
        })
    };
    dst.wait_log("post-copy: the guest runs here", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    dst.kill();
    let (code, out) = sending.join().expect("send thread");
    eprintln!("the source noticed after {:?}: {out}", killed.elapsed());
    assert_eq!(code, 4, "a distinct exit code for a lost post-copy: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["outcome"], "postcopy_lost", "{v}");
    let error = v["summary"]["error"].as_str().unwrap_or("");
    assert!(error.contains("post-copy lost") && error.contains("NOT resumed"), "{error}");
    // Paused, and it stays so.
    let status = control::request(src.socket(), &Request::Status).expect("status").status.expect("status");
    assert_eq!(status.state, "in-doubt");
    let a = src.progress().expect("progress");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(src.progress().expect("progress"), a, "the source ran a guest that ran at the destination");
    let refused = control::request(src.socket(), &Request::Resume).expect_err("resume must be refused");
    assert!(refused.to_string().contains("in doubt"), "{refused}");
}
