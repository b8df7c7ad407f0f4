//! Disaster recovery: write tracking across restarts and crashes, epochs
//! and their retention at the DR site, the drill, the failover (refused
//! while the source answers) and the sync back (reprotect), and the
//! systemd units.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use wanmig_control::Request;
use wanmig_control::protocol::{DiskTracking, TestGuestProgress};
use wanmig_migrate::report::Outcome as MigrateOutcome;
use wanmig_vmm::testguest;

use crate::disk_migration::{disk_wire_bytes, move_vm, vm_with_data, vm_with_data_and};
use crate::harness::{Keys, Receiver, VmProcess, migrate_request, require_kvm, wanmig, wanmig_in};
use crate::network::{GUEST_IP, NetNs, TAP};

const GUEST: &str = "ws_mib = 4\nrate_mib = 4\ndisk_kib = 128\ndisk_mib = 1\ndisk_scatter = true";

fn tracking(vm: &VmProcess) -> Vec<DiskTracking> {
    let r = vm.request(&Request::Tracking { add: None, reset: None, remove: None });
    r.tracking.expect("tracking")
}

/// Map `name` of disk 0: (valid, blocks), and the disk's note.
fn map(vm: &VmProcess, name: &str) -> (Option<(bool, u64)>, Option<String>) {
    let t = tracking(vm);
    let d = &t[0];
    (d.maps.iter().find(|m| m.name == name).map(|m| (m.valid, m.blocks)), d.note.clone())
}

fn blocks(bits: &[u64]) -> Vec<u64> {
    (0..bits.len() as u64 * 64).filter(|b| bits[(b / 64) as usize] & (1 << (b % 64)) != 0).collect()
}

fn running(vm: &mut VmProcess) -> TestGuestProgress {
    vm.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 8)
}

/// The test guest's parameters (blocks, stride, pool) from a snapshot of
/// the running VM, for the prefix oracle.
fn guest_params(vm: &VmProcess, dir: &Path) -> testguest::GuestStatus {
    vm.snapshot(dir);
    assert!(vm.request(&Request::Resume).ok);
    let (_, ram) = wanmig_vmm::snapshot::load_for_inspection(dir).expect("snapshot");
    testguest::read_status(ram.mem()).expect("status")
}

/// The first MiB (the guest's disk region) of an image.
fn region(image: &Path) -> Vec<u8> {
    let mut b = std::fs::read(image).expect("image");
    b.truncate(1 << 20);
    b
}

#[test]
fn write_tracking_survives_a_clean_restart_and_is_not_trusted_after_a_crash_or_a_change() {
    require_kvm();
    let vm = vm_with_data(GUEST, 1);
    let bitmaps = vm.path("disk.img.wanmig-bitmaps");
    let mut p = VmProcess::run(&vm);
    let g = running(&mut p);
    // A map declared valid while the guest is paused: the image then is
    // its baseline.
    assert!(p.request(&Request::Pause).ok);
    let base = std::fs::read(&vm.disk).expect("image");
    assert!(p.request(&Request::Tracking { add: Some("t".into()), reset: None, remove: None }).ok);
    assert_eq!(map(&p, "t").0, Some((false, 0)), "a new map cannot vouch for the past");
    assert!(p.request(&Request::Tracking { add: None, reset: Some("t".into()), remove: None }).ok);
    assert!(p.request(&Request::Resume).ok);
    p.wait_for("more writes", Duration::from_secs(60), |x| x.disk_done > g.disk_done + 100);
    let (live, note) = map(&p, "t");
    let (valid, live_blocks) = live.expect("map t");
    assert!(valid && live_blocks > 0, "{live:?} {note:?}");
    assert!(p.shutdown().success());

    // Saved at the clean stop: valid, not in use, and every block that
    // changed since the baseline is marked (nothing missed).
    let after = std::fs::read(&vm.disk).expect("image");
    let (in_use, maps) = wanmig_vmm::tracking::inspect(&vm.disk).expect("inspect").expect("a bitmap file");
    assert!(!in_use);
    let (_, saved_valid, bits) = maps.iter().find(|m| m.0 == "t").expect("map t saved");
    assert!(*saved_valid);
    let marked = blocks(bits);
    let changed: Vec<u64> = (0..after.len() / 4096)
        .filter(|&b| base[b * 4096..][..4096] != after[b * 4096..][..4096])
        .map(|b| b as u64)
        .collect();
    assert!(!changed.is_empty() && changed.iter().all(|b| marked.contains(b)), "a changed block is not marked");
    assert!(marked.iter().all(|&b| b < 256), "only the guest's 1 MiB region was written");
    eprintln!("tracking: {} blocks marked, {} changed since the baseline", marked.len(), changed.len());

    // A clean restart of `wanmig run`: the map is back, valid, with its blocks.
    let mut p = VmProcess::run(&vm);
    running(&mut p);
    let (back, note) = map(&p, "t");
    let (valid, n) = back.expect("map t after the restart");
    assert!(valid && n >= marked.len() as u64, "{back:?} {note:?}");
    assert_eq!(note, None);
    assert!(wanmig_vmm::tracking::inspect(&vm.disk).expect("inspect").expect("file").0, "in use while it runs");

    // A crash (SIGKILL): the file still says in use; the next start trusts nothing.
    drop(p);
    let mut p = VmProcess::run(&vm);
    // Past one lap of its 256-block region, the restarted guest has
    // overwritten every block the run before left (a cold boot starts its
    // writes again from 0): the region is its writes alone.
    let g = p.wait_for("a lap of the region", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 300);
    let (crashed, note) = map(&p, "t");
    assert_eq!(crashed.map(|c| c.0), Some(false), "{note:?}");
    assert!(note.as_deref().is_some_and(|n| n.contains("did not stop cleanly")), "{note:?}");

    // ... and the next sync is still right: it compares digests (the map it
    // keeps for its destination starts invalid and is valid after it).
    let keys = Keys::new(vm.dir.path());
    let dr_dir = vm.path("dr");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dr_dir, &[]);
    let params = guest_params(&p, &vm.path("snap"));
    let synced = move_vm(&p, &migrate_request(&dst.addr, &keys, None, true), MigrateOutcome::Synced);
    let sync_map = wanmig_control::protocol::sync_map_name(&keys.dst_fp);
    assert_eq!(map(&p, &sync_map).0.map(|m| m.0), Some(true), "valid once the sync succeeded");
    let held =
        testguest::check_disk_prefix(&region(&dr_dir.join("disk.img")), &params).expect("the replica is a prefix");
    assert!(held >= g.disk_done, "the replica holds {held} writes, the guest had done {} before the sync", g.disk_done);
    eprintln!(
        "sync after a crash: {} disk bytes on the wire; the replica holds the first {held} writes",
        disk_wire_bytes(&synced)
    );
    // The source records it for `dr status`.
    let out =
        wanmig().args(["dr", "status"]).arg(&vm.config).args(["--json", "--rpo", "1h"]).output().expect("dr status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["last_sync"]["migration_id"], synced["migration_id"], "{report}");
    assert_eq!(report["rpo_met"], true);
    std::thread::sleep(Duration::from_millis(2100));
    let late = wanmig().args(["dr", "status"]).arg(&vm.config).args(["--rpo", "1s"]).output().expect("dr status");
    assert_eq!(
        late.status.code(),
        Some(1),
        "an RPO exceeded fails the check: {}",
        String::from_utf8_lossy(&late.stdout)
    );
    assert!(String::from_utf8_lossy(&late.stdout).contains("EXCEEDED"));

    // Valid again after a reset and a clean stop; then the image is written
    // while no VM runs it: the next start trusts nothing.
    assert!(p.request(&Request::Tracking { add: None, reset: Some("t".into()), remove: None }).ok);
    assert!(p.shutdown().success());
    std::thread::sleep(Duration::from_millis(20));
    {
        let f = std::fs::OpenOptions::new().write(true).open(&vm.disk).expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"edited offline", 5 << 20).expect("write");
    }
    let mut p = VmProcess::run(&vm);
    running(&mut p);
    let (stale, note) = map(&p, "t");
    assert_eq!(stale.map(|s| s.0), Some(false));
    assert!(note.as_deref().is_some_and(|n| n.contains("image changed")), "{note:?}");
    assert!(p.shutdown().success());

    // The file gone: nothing is known, nothing trusted.
    std::fs::remove_file(&bitmaps).expect("rm");
    let mut p = VmProcess::run(&vm);
    running(&mut p);
    let (gone, note) = map(&p, "t");
    assert_eq!(gone, None);
    assert!(note.as_deref().is_some_and(|n| n.contains("no bitmap file")), "{note:?}");
    assert!(p.shutdown().success());
}

/// Waits until the destination has logged `n` epochs.
fn wait_epochs(dst: &Receiver, n: usize) {
    let start = std::time::Instant::now();
    while dst.log().matches("recorded").count() < n {
        assert!(start.elapsed() < Duration::from_secs(30), "no epoch {n}: {}", dst.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_sync_after_a_sync_sends_only_the_blocks_written_since_and_never_trusts_a_map_after_a_crash() {
    require_kvm();
    let vm = vm_with_data(GUEST, 1);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    let g0 = running(&mut src);
    let dr_dir = vm.path("dr");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dr_dir, &[]);
    let req = migrate_request(&dst.addr, &keys, None, true);
    let first = move_vm(&src, &req, MigrateOutcome::Synced);
    assert_eq!(first["disk"]["from_base"], 0, "nothing to start from yet");
    wait_epochs(&dst, 1);

    // The guest writes on; the next sync starts from the epoch of the first
    // and sends the blocks written since, not the chunks around them.
    let g = src.wait_for("more writes", Duration::from_secs(60), |g| g.disk_done > g0.disk_done + 64);
    let params = guest_params(&src, &vm.path("snap"));
    let second = move_vm(&src, &req, MigrateOutcome::Synced);
    assert_eq!(second["disk"]["from_base"], 1, "{second:#}\n{}", dst.log());
    assert!(dst.log().contains("disk 0 starts from the epoch of sync"), "{}", dst.log());
    let written = second["disk"]["base_written_bytes"].as_u64().expect("bytes");
    assert!(written > 0 && written <= 1 << 20, "only the guest's 1 MiB region was written: {written}");
    assert_eq!(second["disk"]["chunks_sent"], 0, "no chunk: no first copy");
    let held =
        testguest::check_disk_prefix(&region(&dr_dir.join("disk.img")), &params).expect("the replica is a prefix");
    assert!(held >= g.disk_done, "the replica holds {held} writes, the guest had done {} before", g.disk_done);
    wait_epochs(&dst, 2);
    assert!(dst.log().contains("the blocks written since epoch"), "{}", dst.log());

    // A crash: the maps cannot vouch for anything; the next sync copies by
    // chunks against the store (the digest check holds it to the image).
    drop(src);
    let mut src = VmProcess::run(&vm);
    running(&mut src);
    let third = move_vm(&src, &req, MigrateOutcome::Synced);
    assert_eq!(third["disk"]["from_base"], 0, "{third:#}");
    assert!(third["disk"]["chunks"].as_u64().expect("chunks") > 0, "a first copy");
    wait_epochs(&dst, 3);
    // ... after which the map counts from that sync again.
    let fourth = move_vm(&src, &req, MigrateOutcome::Synced);
    assert_eq!(fourth["disk"]["from_base"], 1, "{fourth:#}");
    let (d1, d2, d3, d4) =
        (disk_wire_bytes(&first), disk_wire_bytes(&second), disk_wire_bytes(&third), disk_wire_bytes(&fourth));
    eprintln!(
        "syncs of a {} MiB image: first {d1} disk bytes on the wire; the next from its epoch {d2} ({:.1}%, {written} bytes written); after a crash by chunks {d3} ({:.1}%); then from that epoch {d4} ({:.1}%)",
        std::fs::metadata(&vm.disk).expect("image").len() >> 20,
        100.0 * d2 as f64 / d1 as f64,
        100.0 * d3 as f64 / d1 as f64,
        100.0 * d4 as f64 / d1 as f64,
    );
    assert!(d2 < d1 / 4, "{d2} of {d1}");
    assert!(src.shutdown().success());
}

/// `dir`'s files (recursively) with their sizes and modification times,
/// but for RocksDB's diagnostics log.
fn tree(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let m = e.metadata().expect("stat");
            // RocksDB's own diagnostics log (`LOG`) is not the store's
            // content: the receive holding the store appends statistics
            // to it at times of its own.
            if m.is_dir() {
                stack.push(e.path());
            } else if e.file_name() != "LOG" {
                out.push((e.path(), m.len(), m.modified().expect("mtime")));
            }
        }
    }
    out.sort();
    out
}

fn sha(path: &Path) -> [u8; 32] {
    wanmig_block_sync::BlockDigest::of_bytes(&std::fs::read(path).expect("read"))
}

/// A vm.toml for the VM at the DR site: the test guest, the replica's disk.
fn dr_config(dir: &Path, guest: &str) -> PathBuf {
    let p = dir.join("dr-vm.toml");
    let text = format!(
        "name = \"it\"\nmemory_mib = 64\nvcpus = 1\nserial = \"dr-serial.log\"\n[guest]\nkind = \"test\"\n{guest}\n[[disk]]\npath = \"disk.img\"\n"
    );
    std::fs::write(&p, text).expect("dr vm.toml");
    p
}

fn epochs(store: &Path) -> Vec<Value> {
    let out = wanmig().arg("store").arg(store).args(["epochs", "it", "--json"]).output().expect("store epochs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("json")
}

#[test]
fn each_sync_leaves_an_epoch_kept_by_the_rules_and_a_drill_boots_a_copy_without_touching_the_replica() {
    require_kvm();
    let vm = vm_with_data(GUEST, 1);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    running(&mut src);
    let dr_dir = vm.path("dr");
    let store = dr_dir.join("chunks");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dr_dir, &[OsStr::new("--keep-last"), OsStr::new("2")]);
    let mut ids = Vec::new();
    for i in 1..=3 {
        move_vm(&src, &migrate_request(&dst.addr, &keys, None, true), MigrateOutcome::Synced);
        wait_epochs(&dst, i);
        ids.push(epochs(&store).last().expect("an epoch")["id"].as_u64().expect("id"));
        std::thread::sleep(Duration::from_millis(1100));
    }
    // keep-last 2: the first is gone, and its chunks with the gc after it.
    let kept: Vec<u64> = epochs(&store).iter().map(|e| e["id"].as_u64().expect("id")).collect();
    assert_eq!(kept, ids[1..], "{}", dst.log());
    assert!(dst.log().contains(&format!("removed [{}]", ids[0])), "{}", dst.log());
    eprintln!("{}", dst.log().lines().filter(|l| l.contains("epoch")).collect::<Vec<_>>().join("\n"));

    // The drill, while the DR site's receive still runs: a copy of the
    // latest epoch boots in isolation and is checked; nothing of the
    // replica or the store changes.
    let replica = dr_dir.join("disk.img");
    let (digest, files) = (sha(&replica), tree(&store));
    let cfg = dr_config(&dr_dir, GUEST);
    let work = vm.path("drill");
    std::fs::create_dir_all(&work).expect("mkdir");
    let out = wanmig()
        .args(["dr", "test"])
        .arg(&cfg)
        .arg("--store")
        .arg(&store)
        .arg("--work-dir")
        .arg(&work)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("dr test");
    assert!(out.status.success(), "drill failed: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    eprintln!("drill: {report:#}");
    assert_eq!(report["epoch"].as_u64(), ids.last().copied());
    assert_eq!(report["removed"], true);
    let checks: Vec<&str> = report["checks"].as_array().expect("checks").iter().filter_map(Value::as_str).collect();
    assert!(checks.iter().any(|c| c.contains("prefix") || c.contains("first")), "{checks:?}");
    assert!(report["recovery_time_s"].as_f64().expect("rto") > 0.0);
    assert_eq!(std::fs::read_dir(&work).expect("work dir").count(), 0, "the copy is removed");
    assert_eq!(sha(&replica), digest, "the replica is untouched");
    assert_eq!(tree(&store), files, "the store is untouched");
    assert!(!dr_dir.join("wanmig-it.sock").exists() && !dr_dir.join("dr-serial.log").exists(), "isolated");
    // An epoch that does not exist is an error, not a boot.
    let bad = wanmig()
        .args(["dr", "test"])
        .arg(&cfg)
        .arg("--store")
        .arg(&store)
        .args(["--epoch", "7"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    assert!(src.shutdown().success());
}

#[test]
fn failover_is_refused_while_the_source_answers_then_starts_the_epoch_and_reprotect_sends_only_the_difference() {
    require_kvm();
    let ns = NetNs::new("dr");
    let net = format!("[[net]]\ntap = \"{TAP}\"\nmac = \"52:54:00:12:34:56\"\nip = \"{GUEST_IP}/24\"\n");
    let vm = vm_with_data_and(GUEST, 1, &net);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run_in(&vm, &ns.name);
    running(&mut src);
    // The DR site (B), and A's own store of its chunks (sync --store).
    let dr_dir = vm.path("dr");
    let store_b = dr_dir.join("chunks");
    let store_a = vm.path("store-a");
    let dst = Receiver::start_at(
        &ns.name,
        "127.0.0.1:0",
        &keys,
        &keys.src_fp,
        &dr_dir,
        &[OsStr::new("--tap"), OsStr::new("tapB")],
    );
    let first = move_vm(&src, &migrate_request(&dst.addr, &keys, Some(&store_a), true), MigrateOutcome::Synced);
    dst.wait_log("recorded", Duration::from_secs(30));
    let epoch = epochs(&store_b).last().expect("an epoch")["id"].as_u64().expect("id");

    // The operator's plan for B: the test guest, the replica's path, no NIC.
    let cfg = dr_config(&dr_dir, GUEST);
    let failover = || {
        let mut c = wanmig_in(Some(&ns.name));
        c.args(["dr", "failover"])
            .arg(&cfg)
            .arg("--store")
            .arg(&store_b)
            .args(["--probe-timeout", "2s"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let refused = failover().output().expect("failover");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{why}");
    assert!(why.contains("still answers") && why.contains(&format!("icmp:{GUEST_IP}")), "{why}");
    assert!(dr_dir.join("disk.img.replica").exists(), "nothing was touched");

    // The source site dies.
    drop(src);
    let t = std::time::Instant::now();
    let mut child = failover().spawn().expect("failover");
    let b = VmProcess::at_socket(dr_dir.join("wanmig-it.sock"));
    let start = std::time::Instant::now();
    let g = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut e = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut e).expect("read");
            panic!("failover exited ({st}): {e}");
        }
        if let Some(g) = b.progress()
            && g.phase == 2
        {
            break g;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "the failed-over VM never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("failover: guest running {:.2} s after `dr failover` started (epoch {epoch})", t.elapsed().as_secs_f64());
    assert_eq!(g.errors, 0);
    assert!(!dr_dir.join("disk.img.replica").exists(), "the replica is the VM's disk now");
    let g = b.wait_for_progress(Duration::from_secs(60), |x| x.disk_done > 64);
    assert_eq!(g.errors, 0);

    // Reprotect: A comes back as the DR site of B, with its own store; the
    // first sync back sends only what changed since the failover epoch.
    let rev =
        Keys { src: keys.dst.clone(), dst: keys.src.clone(), src_fp: keys.dst_fp.clone(), dst_fp: keys.src_fp.clone() };
    let a_dir = vm.path("a-reprotect");
    let a = Receiver::start_at(
        &ns.name,
        "127.0.0.1:0",
        &rev,
        &rev.src_fp,
        &a_dir,
        &[OsStr::new("--store"), store_a.as_os_str()],
    );
    let back = move_vm(&b, &migrate_request(&a.addr, &rev, None, true), MigrateOutcome::Synced);
    a.wait_log("recorded", Duration::from_secs(30));
    let (d1, d2) = (disk_wire_bytes(&first), disk_wire_bytes(&back));
    let size = std::fs::metadata(dr_dir.join("disk.img")).expect("image").len();
    eprintln!(
        "reprotect: first sync A→B {d1} disk bytes on the wire, first sync back B→A {d2} ({:.1}% of it; image {size} bytes)",
        100.0 * d2 as f64 / d1 as f64
    );
    assert!(d2 * 4 < d1, "the sync back sent {d2} bytes, the first sync {d1}: {back}");
    assert!(back["disk"]["chunks_present"].as_u64() > Some(0), "{back}");
    let replica_a = a_dir.join("disk.img");
    assert!(replica_a.exists() && a_dir.join("disk.img.replica").exists());
    b.shutdown();
    let _ = child.wait();
}

#[test]
fn the_timer_units_install_and_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tmp");
    let vm = dir.path().join("vm.toml");
    std::fs::write(&vm, "name = \"web1\"\nmemory_mib = 64\n[guest]\nkind = \"test\"\n").expect("vm.toml");
    let keys = Keys::new(dir.path());
    let units = dir.path().join("units");
    let out = wanmig()
        .args(["dr", "install-timer"])
        .arg(&vm)
        .arg("dr.example:4750")
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--on-calendar", "*:0/15", "--sync-args", "--store /var/lib/wanmig/chunks"])
        .args(["--rpo", "1h"])
        .arg("--unit-dir")
        .arg(&units)
        .arg("--env-dir")
        .arg(dir.path().join("env"))
        .arg("--no-enable")
        .output()
        .expect("install-timer");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let env = std::fs::read_to_string(dir.path().join("env/web1.env")).expect("env file");
    assert!(
        env.contains("WANMIG_DEST=dr.example:4750") && env.contains("WANMIG_SYNC_ARGS=--store /var/lib/wanmig/chunks")
    );
    let schedule = std::fs::read_to_string(units.join("wanmig-sync@web1.timer.d/schedule.conf")).expect("drop-in");
    assert!(schedule.contains("OnCalendar=\nOnCalendar=*:0/15"), "{schedule}");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .args([
            "wanmig-sync@web1.timer",
            "wanmig-sync@web1.service",
            "wanmig-rpo@web1.timer",
            "wanmig-rpo@web1.service",
        ])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .expect("systemd-analyze (scripts/setup.sh installs it)");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
    // A calendar expression systemd does not take is refused at install.
    let bad = wanmig()
        .args(["dr", "install-timer"])
        .arg(&vm)
        .arg("dr.example:4750")
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--on-calendar", "every tuesday-ish", "--no-enable"])
        .arg("--unit-dir")
        .arg(dir.path().join("u2"))
        .output()
        .expect("install-timer");
    assert_eq!(bad.status.code(), Some(1));
}
