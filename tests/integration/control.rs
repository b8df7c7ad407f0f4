//! The control plane while a migration runs, under KVM, between real
//! processes: `status` answered in every phase, `cancel` in every phase
//! (the source runs on, the oracle passes, the destination keeps nothing),
//! `set` of the bandwidth cap taking effect from the next round, Ctrl-C on
//! `send`, a VM moved A→B→A→B with only the configurations each destination
//! wrote, `settle` after the source process is killed right after (or
//! just before) its commit, and a second `wanmig run` on a locked image.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wanmig_control::{self as control, Request};
use wanmig_migrate::report::Phase;

use crate::harness::*;

/// A busy guest (memory and disk) with a 64 MiB disk of incompressible
/// data, so that every phase of a capped migration lasts long enough to
/// be seen.
fn busy_vm() -> VmDir {
    let vm = VmDir::new(128, 1, "ws_mib = 32\nrate_mib = 16\ndisk_kib = 256\ndisk_mib = 4");
    let f = std::fs::OpenOptions::new().write(true).open(&vm.disk).expect("disk");
    f.set_len(64 << 20).expect("size");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // The guest writes its first 4 MiB; the rest is data that must travel.
    for i in 4..64u64 {
        let mut b = block.clone();
        b[0] = i as u8;
        f.write_all_at(&b, i << 20).expect("fill");
    }
    vm
}

/// The migration's phase as `wanmig status` reports it, if one runs.
fn phase(socket: &Path) -> Option<Phase> {
    control::request(socket, &Request::Status).ok()?.migration.map(|p| p.phase)
}

/// Waits until the source's migration is in `want` (polling `status`).
fn wait_phase(socket: &Path, want: Phase, timeout: Duration) {
    let start = Instant::now();
    while phase(socket) != Some(want) {
        assert!(start.elapsed() < timeout, "no {want:?} within {timeout:?} (now {:?})", phase(socket));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn incoming(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".incoming"))
                .collect()
        })
        .unwrap_or_default()
}

/// After a failed or cancelled migration: the source runs on with its
/// oracle passing, and the destination holds no VM and no incoming image.
fn assert_nothing_moved(src: &mut VmProcess, vm: &VmDir, dst: &mut Receiver, dst_dir: &Path, tag: &str) {
    let p = src.progress().expect("the source answers");
    src.wait_for("the source guest to run on", Duration::from_secs(20), |g| g.steps > p.steps + 100);
    assert_eq!(src.progress().expect("status").errors, 0, "{tag}");
    assert!(dst.is_running(), "{tag}: the destination waits for the next VM");
    dst.wait_log("failed, discarded", Duration::from_secs(20));
    assert!(!dst_dir.join("wanmig-it.sock").exists(), "{tag}: the destination serves no VM");
    let left = incoming(dst_dir);
    assert!(left.is_empty(), "{tag}: incoming images left at the destination: {left:?}");
    check_guest(src, &vm.path(&format!("snap-{tag}")), &vm.disk);
    src.request(&Request::Resume);
}

#[test]
fn status_shows_progress_in_every_phase() {
    require_kvm();
    let vm = busy_vm();
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let dst = Receiver::copying(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let send = send_child(&vm.config, &dst.addr, &keys, &["--max-bandwidth", "100Mbit", "--downtime", "2s"]);
    let mut seen = BTreeSet::new();
    let mut rounds = BTreeSet::new();
    let start = Instant::now();
    wait_phase(src.socket(), Phase::DiskCopy, Duration::from_secs(30));
    // Until the migration ends (no progress) or the source process does.
    while let Ok(r) = control::request(src.socket(), &Request::Status) {
        let Some(m) = r.migration else { break };
        let status = r.status.expect("the VM's status too");
        assert_eq!(status.state, "migrating");
        assert!(status.guest.is_some(), "the guest's own progress is read during the migration");
        seen.insert(format!("{:?}", m.phase));
        if m.phase == Phase::Precopy {
            rounds.insert(m.round);
            assert!(m.bytes_sent > 0 && m.link_rate > 0.0, "{m:?}");
        }
        assert_eq!(m.max_bandwidth_bps, Some(100_000_000), "{m:?}");
        assert!(start.elapsed() < Duration::from_secs(120), "the migration never ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, summary, stderr) = finish_send(send);
    assert_eq!(code, 0, "{summary:?}\n{stderr}");
    for want in ["DiskCopy", "Precopy", "StopAndCopy"] {
        assert!(seen.contains(want), "status never showed {want}: saw {seen:?}");
    }
    assert!(!rounds.is_empty(), "{seen:?}");
}

/// Boots a busy guest, starts a capped migration, and cancels it once its
/// status shows `at`; checks that nothing moved.
fn cancel_in(at: Phase, with_ctrl_c: bool) {
    require_kvm();
    let vm = busy_vm();
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let dst_dir = vm.path("dst");
    let mut dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let send = send_child(&vm.config, &dst.addr, &keys, &["--max-bandwidth", "100Mbit", "--downtime", "2s"]);
    wait_phase(src.socket(), at, Duration::from_secs(60));
    if with_ctrl_c {
        // SAFETY: sends SIGINT to our own child.
        unsafe { libc::kill(send.id() as i32, libc::SIGINT) };
    } else {
        let (code, out) = run_to_end(&[OsStr::new("cancel"), vm.config.as_os_str()]);
        assert_eq!(code, 0, "wanmig cancel: {out}");
    }
    let (code, summary, stderr) = finish_send(send);
    assert_eq!(code, 1, "a cancelled send exits 1: {summary:?}\n{stderr}");
    assert!(summary.cancelled, "{summary:?}");
    assert!(summary.error.as_deref().unwrap_or("").contains("cancel"), "{summary:?}");
    if with_ctrl_c {
        assert!(stderr.contains("interrupted: cancelling the migration"), "{stderr}");
    }
    assert_nothing_moved(&mut src, &vm, &mut dst, &dst_dir, &format!("{at:?}"));
}

#[test]
fn cancel_during_the_disk_copy() {
    cancel_in(Phase::DiskCopy, false);
}

#[test]
fn cancel_during_pre_copy() {
    cancel_in(Phase::Precopy, false);
}

#[test]
fn cancel_during_the_stop_and_copy() {
    cancel_in(Phase::StopAndCopy, false);
}

#[test]
fn ctrl_c_on_send_cancels() {
    cancel_in(Phase::Precopy, true);
}

#[test]
fn set_lowers_the_bandwidth_cap_from_the_next_round() {
    require_kvm();
    // Memory only (no disk traffic) that does not compress, so the wire
    // carries what the guest writes.
    let vm = VmDir::new(64, 1, "ws_mib = 32\nrate_mib = 2\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let dst = Receiver::copying(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let send = send_child(&vm.config, &dst.addr, &keys, &["--max-bandwidth", "400Mbit"]);
    // Once a round is over, cap the link far below what it ran at.
    let start = Instant::now();
    let changed_after = loop {
        let r = control::request(src.socket(), &Request::Status).expect("status");
        if let Some(m) = r.migration.filter(|m| m.phase == Phase::Precopy) {
            break m.round;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no pre-copy round");
        std::thread::sleep(Duration::from_millis(10));
    };
    let (code, out) =
        run_to_end(&[OsStr::new("set"), vm.config.as_os_str(), OsStr::new("--max-bandwidth"), OsStr::new("24Mbit")]);
    assert_eq!(code, 0, "wanmig set: {out}");
    let (code, summary, stderr) = finish_send(send);
    assert_eq!(code, 0, "{summary:?}\n{stderr}");
    let cap = 24e6 / 8.0;
    // A round already started when the cap changed runs at the old one; the
    // rounds after it follow the new one (the pacer allows a 256 KiB burst).
    let rate = |r: &wanmig_migrate::report::RoundStat| (r.wire_bytes.saturating_sub(256 << 10)) as f64 / (r.ms / 1e3);
    let after: Vec<_> =
        summary.per_round.iter().filter(|r| r.round > changed_after + 1 && r.wire_bytes >= 512 << 10).collect();
    assert!(!after.is_empty(), "no measurable round after the change: {:?}\n{stderr}", summary.per_round);
    for r in &after {
        assert!(
            rate(r) <= cap * 1.2,
            "round {} ran at {:.1} Mbit/s after the cap went to 24: {:?}",
            r.round,
            rate(r) * 8e-6,
            summary.per_round
        );
    }
    let first = &summary.per_round[0];
    assert!(rate(first) > cap * 1.5, "the first round was no faster than the new cap: {:?}", summary.per_round);
}

/// Moves the VM served at `socket` (configuration `config`) to a new
/// destination in `dir`; checks it there; returns the configuration the
/// destination wrote and its process.
fn hop(config: &Path, keys: &Keys, dir: &Path) -> (PathBuf, Receiver) {
    let dst = Receiver::copying(keys, &keys.src_fp, dir, &[]);
    let (code, summary, stderr) = finish_send(send_child(config, &dst.addr, keys, &[]));
    assert_eq!(code, 0, "{summary:?}\n{stderr}\n{}", dst.log());
    let written = dir.join("it.toml");
    let cfg = wanmig_vmm::VmConfig::load(&written).unwrap_or_else(|e| panic!("the destination's config: {e}"));
    assert_eq!(cfg.control_socket, dir.join("wanmig-it.sock"));
    assert_eq!(cfg.disks.len(), 1);
    let moved = VmProcess::at_socket(cfg.control_socket.clone());
    let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 0);
    moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > p.steps + 200);
    let snap = dir.join("snap");
    check_guest(&moved, &snap, &cfg.disks[0].path);
    moved.request(&Request::Resume);
    (written, dst)
}

#[test]
fn a_vm_moves_a_b_a_b_with_the_configurations_its_destinations_wrote() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 8\nrate_mib = 8\ndisk_kib = 64");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let (at_b, _b1) = hop(&vm.config, &keys, &vm.path("b1"));
    assert!(src.wait_exit(Duration::from_secs(20)).success(), "the first source ends once the VM left");
    let (at_a, _a2) = hop(&at_b, &keys, &vm.path("a2"));
    let (at_b2, b2) = hop(&at_a, &keys, &vm.path("b2"));
    let status = control::request(&vm.path("b2").join("wanmig-it.sock"), &Request::Status).expect("status at B");
    assert_eq!(status.status.expect("status").state, "running");
    let (code, out) = run_to_end(&[OsStr::new("status"), at_b2.as_os_str()]);
    assert_eq!(code, 0, "`wanmig status` with the written config: {out}");
    drop(b2);
}

#[test]
fn a_second_run_on_a_locked_image_is_refused() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1");
    let mut first = VmProcess::run(&vm);
    first.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    let other = vm.path("other.toml");
    let text = std::fs::read_to_string(&vm.config).expect("vm.toml").replace("name = \"it\"", "name = \"it2\"");
    std::fs::write(&other, text).expect("other.toml");
    let (code, out) = run_to_end(&[OsStr::new("run"), other.as_os_str()]);
    assert_ne!(code, 0, "a second VM on the same image must not start: {out}");
    assert!(out.contains("disk.img is in use by pid") && out.contains(&first.pid().to_string()), "{out}");
    assert!(first.shutdown().success());
}

/// The source's `wanmig run`, killed at failpoint `failpoint` around its
/// commit; `wanmig settle` decides; returns (settle output, destination).
fn killed_at(failpoint: &str) -> (VmDir, Keys, Receiver, String) {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 4\ndisk_kib = 64");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run_with_env(&vm, &[("WANMIG_FAILPOINT", failpoint)]);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 100);
    let dst = Receiver::copying(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let send = send_child(&vm.config, &dst.addr, &keys, &[]);
    let status = src.wait_exit(Duration::from_secs(120));
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL), "killed at {failpoint}");
    let out = send.wait_with_output().expect("send ends");
    assert_ne!(out.status.code(), Some(0), "send cannot report success");
    // In doubt: the VM must not boot here again before it is settled.
    let (code, refused) = run_to_end(&[OsStr::new("run"), vm.config.as_os_str()]);
    assert_ne!(code, 0, "{refused}");
    assert!(refused.contains("is in doubt") && refused.contains("wanmig settle"), "{refused}");
    let out = wanmig().args(["settle"]).arg(&vm.config).output().expect("settle");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "settle: {text}\n{}", dst.log());
    (vm, keys, dst, text)
}

#[test]
fn settle_after_the_source_dies_right_after_commit_retires_it() {
    let (vm, _keys, dst, said) = killed_at("send-exit-after-commit");
    assert!(said.contains("committed: the VM runs at"), "{said}");
    // The destination runs it, whole.
    let moved = VmProcess::at_socket(vm.path("dst").join("wanmig-it.sock"));
    let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 0);
    moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > p.steps + 100);
    check_guest(&moved, &vm.path("snap"), &vm.path("dst").join("disk.img"));
    // And it never starts here again without --force.
    let (code, out) = run_to_end(&[OsStr::new("run"), vm.config.as_os_str()]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("migrated to") && out.contains("runs there"), "{out}");
    drop(dst);
}

#[test]
fn settle_after_the_source_dies_before_its_commit_leaves_the_vm_here() {
    let (vm, _keys, mut dst, said) = killed_at("send-exit-before-commit");
    assert!(said.contains("not committed"), "{said}");
    // Settled while the attempt there still waited for a commit that never
    // comes: it can no longer commit, and the destination ends it then and
    // there ("settled as not committed: discarded"; before, at the link's
    // timeout: "failed, discarded").
    dst.wait_log("discarded", Duration::from_secs(90));
    assert!(!vm.path("dst").join("wanmig-it.sock").exists(), "the destination runs nothing");
    assert!(dst.is_running() && incoming(&vm.path("dst")).is_empty(), "{}", dst.log());
    // The VM's memory died with the process; it boots again from its disk.
    let mut again = VmProcess::run(&vm);
    again.wait_for("the VM to boot again here", Duration::from_secs(120), |g| g.phase == 2);
    assert!(again.shutdown().success());
}
