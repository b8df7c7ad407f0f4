//! Migrations across an emulated WAN (`wanmig-linkem`: 200 Mbit/s, 50 ms
//! RTT, 1% loss each way) between two network namespaces, the source VM's
//! process in one and `wanmig receive` in the other: link outages of 5 s
//! and 60 s in the disk copy, in pre-copy and in the stop-and-copy are
//! ridden out (the migration completes, the oracle passes, the bytes on the
//! wire stay within 1.15× of the same run without an outage); an outage
//! longer than the resume window fails cleanly at both ends; and a
//! destination killed mid-copy and restarted keeps what it had received.

use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_control::{self as control, Request};
use wanmig_linkem::{LinkConfig, LinkParams, WanPair};
use wanmig_migrate::report::{Phase, Summary};
use wanmig_transport::LinkTuning;

use crate::harness::*;

/// The link of the issue: 200 Mbit/s, 50 ms RTT, 1% loss each way.
fn link(tag: &str) -> WanPair {
    let params = LinkParams::wan(200_000_000, Duration::from_millis(50)).with_loss(0.01);
    WanPair::new(tag, LinkConfig::symmetric(params).with_seed(7)).expect("the emulated WAN (root)")
}

/// A guest with a small working set (memory and disk writes) and a 48 MiB
/// disk of data that does not compress: a migration of about 70 MB.
fn guest() -> VmDir {
    guest_with_disk(48)
}

/// The guest of [`guest`] with a disk of `mib` MiB, all but the guest's
/// own first 4 MiB pseudo-random (it does not compress or deduplicate).
fn guest_with_disk(mib: u64) -> VmDir {
    let vm = VmDir::new(128, 1, "ws_mib = 8\nrate_mib = 4\ndisk_kib = 64\ndisk_mib = 4");
    fill_incompressible(&vm.disk, mib << 20, 4..mib, 0x2545_f491_4f6c_dd1d);
    vm
}

/// Where to cut the link.
#[derive(Clone, Copy, Debug)]
enum At {
    Nowhere,
    DiskCopy,
    Precopy,
    StopAndCopy,
    /// After the guest moved in post-copy (`--postcopy now`).
    Postcopy,
}

/// One migration across the WAN with an outage of `outage` once the
/// source's status shows `at`; returns the summary and the exit code.
fn migrate_across(tag: &str, at: At, outage: Duration, window: &str) -> (i32, Summary, String) {
    require_kvm();
    let wan = link(tag);
    let vm = guest();
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run_in(&vm, wan.a().name());
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let listen = format!("{}:0", wan.addr_b());
    let dst_dir = vm.path("dst");
    let window_arg = [OsStr::new("--resume-window"), OsStr::new(window)];
    let dst = Receiver::start_at(wan.b().name(), &listen, &keys, &keys.src_fp, &dst_dir, &window_arg);
    let mut extra = vec!["--resume-window", window, "--downtime", "2s", "--link-bandwidth", "200Mbit", "--rtt", "50ms"];
    if matches!(at, At::Postcopy) {
        extra.extend(["--postcopy", "now"]);
    }
    let send = send_child(&vm.config, &dst.addr, &keys, &extra);
    let want = match at {
        At::Nowhere => None,
        At::DiskCopy => Some(Phase::DiskCopy),
        At::Precopy => Some(Phase::Precopy),
        At::StopAndCopy => Some(Phase::StopAndCopy),
        At::Postcopy => Some(Phase::Postcopy),
    };
    if let Some(phase) = want {
        wait_phase(src.socket(), phase, Duration::from_secs(120));
        wan.control().outage_for(outage);
        eprintln!("{tag}: link down for {outage:?} in {phase:?}");
    }
    let (code, summary, stderr) = finish_send(send);
    if code == 0 {
        let moved = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
        let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 0);
        moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > p.steps + 100);
        check_guest(&moved, &vm.path("snap"), &dst_dir.join("disk.img"));
    } else {
        // Failed: the source runs on, whole, and the destination keeps nothing.
        let p = src.progress().expect("the source answers");
        src.wait_for("the source guest to run on", Duration::from_secs(20), |g| g.steps > p.steps + 100);
        check_guest(&src, &vm.path("snap"), &vm.disk);
        dst.wait_log("failed, discarded", Duration::from_secs(60));
        let left: Vec<_> = std::fs::read_dir(&dst_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".incoming"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "incoming images left at the destination: {left:?}\n{}", dst.log());
    }
    let counters = [wan.counters(wanmig_linkem::Direction::AtoB), wan.counters(wanmig_linkem::Direction::BtoA)];
    eprintln!(
        "{tag}: exit {code}, {} bytes sent by the source, {} crossed the link A→B; outages {}, {:.1} s down, {} bytes sent again; decided on resume: {:?}",
        summary.bytes.total,
        counters[0].forwarded_bytes,
        summary.outages,
        summary.outage_ms / 1e3,
        summary.resent_bytes,
        summary.decided_on_resume
    );
    (code, summary, format!("{stderr}\n{}", dst.log()))
}

fn wait_phase(socket: &Path, want: Phase, timeout: Duration) {
    let start = Instant::now();
    loop {
        let now = control::request(socket, &Request::Status).ok().and_then(|r| r.migration).map(|m| m.phase);
        if now == Some(want) {
            return;
        }
        assert!(start.elapsed() < timeout, "no {want:?} within {timeout:?} (now {now:?})");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Rides out an outage at `at`: completes within 1.15× the bytes of the
/// same migration without one. An outage shorter than the connection's
/// idle timeout (10 s) is ridden out by QUIC itself (its retransmissions);
/// a longer one fails the connection and the migration is resumed on a
/// new one.
fn rides_out(tag: &str, at: At, outage: Duration) {
    let (code, base, log) = migrate_across(&format!("{tag}b"), At::Nowhere, Duration::ZERO, "10m");
    assert_eq!(code, 0, "the run without an outage: {log}");
    let (code, cut, log) = migrate_across(tag, at, outage, "10m");
    assert_eq!(code, 0, "{at:?}, {outage:?}: {:?}\n{log}", cut.error);
    let resumes = u32::from(outage > LinkTuning::default().idle_timeout);
    assert_eq!(cut.outages, resumes, "{cut:?}");
    let ratio = cut.bytes.total as f64 / base.bytes.total as f64;
    eprintln!("{tag}: {ratio:.3}× the bytes of the run without an outage ({} / {})", cut.bytes.total, base.bytes.total);
    assert!(ratio <= 1.15, "{ratio:.3}× the bytes: {} vs {}", cut.bytes.total, base.bytes.total);
}

#[test]
fn a_5s_outage_in_the_disk_copy_is_ridden_out() {
    rides_out("dc5", At::DiskCopy, Duration::from_secs(5));
}

#[test]
fn a_5s_outage_in_pre_copy_is_ridden_out() {
    rides_out("pc5", At::Precopy, Duration::from_secs(5));
}

#[test]
fn a_5s_outage_in_the_stop_and_copy_is_ridden_out() {
    rides_out("sc5", At::StopAndCopy, Duration::from_secs(5));
}

#[test]
fn a_10s_outage_in_postcopy_blocks_the_guest_then_completes() {
    // The guest runs at the destination when the link goes; its faulting
    // vCPU waits for the 10 s (QUIC's idle timeout: the connection may
    // survive it or be resumed on a new one), then every page arrives and
    // the oracle passes there (migrate_across checks it).
    let (code, s, log) = migrate_across("wanpc", At::Postcopy, Duration::from_secs(10), "10m");
    assert_eq!(code, 0, "{:?}\n{log}", s.error);
    let pc = s.postcopy.expect("post-copy figures");
    let d = pc.dest.clone().expect("the destination's report");
    let blocked: u64 = d.vcpu_blocked_us.iter().sum();
    eprintln!(
        "post-copy across the outage: {:.1} s, {} faults, service p50 {} µs p99 {} µs max {} µs, blocked {:.1} s, {} outage(s)",
        pc.postcopy_ms / 1e3,
        d.faults,
        d.service_p50_us,
        d.service_p99_us,
        d.service_max_us,
        blocked as f64 / 1e6,
        s.outages
    );
    assert!(pc.postcopy_ms >= 10_000.0, "the post-copy spanned the outage: {pc:?}");
    assert!(d.service_max_us >= 5_000_000, "a vCPU waited out the outage: {d:?}");
}

#[test]
fn a_60s_outage_in_the_disk_copy_is_ridden_out() {
    rides_out("dc60", At::DiskCopy, Duration::from_secs(60));
}

#[test]
fn a_60s_outage_in_pre_copy_is_ridden_out() {
    rides_out("pc60", At::Precopy, Duration::from_secs(60));
}

#[test]
fn a_60s_outage_in_the_stop_and_copy_is_ridden_out() {
    rides_out("sc60", At::StopAndCopy, Duration::from_secs(60));
}

/// `kill -9` of `receive` in the middle of the disk copy, a restart into
/// the same directory, and `send` again: the chunks the first attempt
/// delivered were kept (committed every 4 MiB, under the attempt's
/// expiring root), so the second sends little more than what the first
/// had not delivered; the first attempt's incoming image is removed.
#[test]
fn a_destination_killed_mid_copy_keeps_what_it_received() {
    require_kvm();
    let vm = guest_with_disk(192);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let dst_dir = vm.path("dst");
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let addr = dst.addr.clone();
    // Slow enough to kill it at a known point; a short window, so that the
    // source gives up on the first attempt (its destination forgot it).
    let first = send_child(&vm.config, &addr, &keys, &["--max-bandwidth", "200Mbit", "--resume-window", "20s"]);
    let status = || control::request(src.socket(), &Request::Status).ok().and_then(|r| r.migration);
    let start = Instant::now();
    while status().is_none_or(|p| p.bytes_sent < 80 << 20) {
        assert!(start.elapsed() < Duration::from_secs(120), "the disk copy never reached 80 MiB: {:?}", status());
        std::thread::sleep(Duration::from_millis(5));
    }
    dst.kill();
    std::thread::sleep(Duration::from_millis(500));
    let sent = status().expect("the source is still migrating").bytes_sent;
    let dst = Receiver::copying_at(&addr, &keys, &keys.src_fp, &dst_dir, &[]);
    let (code, failed, log) = finish_send(first);
    assert_eq!(code, 1, "the first attempt cannot be resumed: {log}");
    let (code, second, log) = finish_send(send_child(&vm.config, &dst.addr, &keys, &[]));
    assert_eq!(code, 0, "{:?}\n{log}\n{}", second.error, dst.log());
    let disk = second.disk.expect("disk stats");
    let undelivered = disk.data_bytes.saturating_sub(sent);
    eprintln!(
        "killed after {sent} bytes sent; the first attempt failed with {:?}; the second sent {} chunk bytes of {} ({} chunks the destination held), {:.3}x of {undelivered} bytes not delivered before",
        failed.error,
        disk.chunk_bytes_sent,
        disk.data_bytes,
        disk.chunks_present,
        disk.chunk_bytes_sent as f64 / undelivered as f64
    );
    assert!(
        disk.chunk_bytes_sent as f64 <= 1.1 * undelivered as f64,
        "{} chunk bytes sent again, {undelivered} not delivered before",
        disk.chunk_bytes_sent
    );
    let moved = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
    let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 0);
    moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > p.steps + 100);
    check_guest(&moved, &vm.path("snap"), &dst_dir.join("disk.img"));
    let left: Vec<String> = std::fs::read_dir(&dst_dir)
        .expect("dst")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".incoming"))
        .collect();
    assert!(left.is_empty(), "incoming images left: {left:?}");
}

#[test]
fn an_outage_longer_than_the_window_fails_cleanly() {
    let (code, summary, log) = migrate_across("long", At::Precopy, Duration::from_secs(25), "8s");
    assert_eq!(code, 1, "{summary:?}\n{log}");
    assert!(summary.error.as_deref().unwrap_or("").contains("resume window"), "{summary:?}");
}
