//! Disk migration without shared storage: the image moves with the VM,
//! deduplicated against the destination's chunk store.

use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use wanmig_control::{self as control, Request};
use wanmig_migrate::report::Outcome as MigrateOutcome;

use crate::harness::{Keys, Receiver, VmDir, VmProcess, check_guest, migrate_request, require_kvm, run_to_end};

/// A VM whose disk holds, past the `region_mib` the guest writes, 16 MiB
/// of files (pseudo-random, some duplicated) and zeros, like a filesystem.
pub(crate) fn vm_with_data(guest: &str, region_mib: u64) -> VmDir {
    vm_with_data_and(guest, region_mib, "")
}

/// As [`vm_with_data`], with `extra` (e.g. a `[[net]]`) in its vm.toml.
pub(crate) fn vm_with_data_and(guest: &str, region_mib: u64, extra: &str) -> VmDir {
    let vm = VmDir::with_extra(64, 1, guest, extra);
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&vm.disk).expect("disk");
    let start = region_mib + 2;
    f.set_len((start + 20) << 20).expect("size");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for mib in start..start + 16 {
        if mib % 5 == 0 {
            continue; // free space
        }
        if mib % 7 == 3 && mib >= start + 2 {
            // A duplicate of an earlier file.
            let mut again = vec![0u8; 1 << 20];
            f.read_exact_at(&mut again, (mib - 2) << 20).expect("read");
            f.write_all_at(&again, mib << 20).expect("write");
            continue;
        }
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        f.write_all_at(&block, mib << 20).expect("write");
    }
    vm
}

/// Migrates (or syncs) through the VM's control socket; returns the summary.
pub(crate) fn move_vm(vm: &VmProcess, req: &Request, want: MigrateOutcome) -> Value {
    let resp = control::request_with_progress(vm.socket(), req, &mut |_| {}).expect("the VM process answers");
    assert_eq!(resp.outcome, Some(want), "{resp:?}");
    serde_json::to_value(resp.summary.expect("summary")).expect("a summary serializes")
}

/// Images still being received in `dir`.
fn incoming_images(dir: &Path) -> Vec<std::path::PathBuf> {
    let entries = std::fs::read_dir(dir).expect("read dir").filter_map(Result::ok);
    entries.map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "incoming")).collect()
}

pub(crate) fn disk_wire_bytes(summary: &Value) -> u64 {
    summary["bytes"]["disk"].as_u64().expect("disk bytes")
}

#[test]
fn the_disk_moves_with_the_guest_writing_and_arrives_byte_identical() {
    require_kvm();
    let vm = vm_with_data("ws_mib = 4\nrate_mib = 8\ndisk_kib = 512\ndisk_mib = 2\ndisk_scatter = true", 2);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    let p0 =
        src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 50);
    let dst_dir = vm.path("dst");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[OsStr::new("--paused")]);

    let mut args: Vec<&OsStr> = ["send".as_ref(), vm.config.as_os_str(), dst.addr.as_ref()].into();
    args.extend([OsStr::new("--identity"), keys.src.as_os_str(), OsStr::new("--peer"), OsStr::new(&keys.dst_fp)]);
    args.push(OsStr::new("--json"));
    let out = crate::harness::wanmig().args(&args).output().expect("send");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("\"migrated\""), "send failed: {out}");
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    dst.wait_log("committed and running", Duration::from_secs(10));
    let summary: Value = serde_json::from_str(out.lines().last().expect("json"))
        .map(|v: Value| v["summary"].clone())
        .expect("summary json");
    let disk = &summary["disk"];
    assert!(disk["chunks_sent"].as_u64() > Some(0), "{summary}");
    assert!(disk["zero_chunks"].as_u64() > Some(0), "free space travels as holes: {summary}");
    assert!(disk["extent_bytes"].as_u64() > Some(0), "the guest's writes during the copy were re-sent: {summary}");

    // The destination holds the image exactly as it was at the source's
    // pause (the source process stopped there; the destination is paused).
    let copied = dst_dir.join("disk.img");
    let (a, b) = (std::fs::read(&vm.disk).expect("source image"), std::fs::read(&copied).expect("copied image"));
    assert_eq!(a.len(), b.len());
    let first_diff = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "the copied image differs from the source's at pause");
    assert!(incoming_images(&dst_dir).is_empty());

    // And the guest goes on using it.
    let moved = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
    assert!(moved.request(&Request::Resume).ok);
    let p1 = moved.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > p0.disk_done + 200);
    assert_eq!(p1.errors, 0);
    check_guest(&moved, &vm.path("after"), &copied);
    moved.shutdown();
}

#[test]
fn a_move_back_sends_only_what_changed() {
    require_kvm();
    let vm = vm_with_data("ws_mib = 4\nrate_mib = 4\ndisk_kib = 64\ndisk_mib = 1", 1);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 10);
    let store_a = vm.path("store-a");

    // A → B; A keeps its chunks.
    let b_dir = vm.path("b");
    let b = Receiver::copying(&keys, &keys.src_fp, &b_dir, &[]);
    let first = move_vm(&src, &migrate_request(&b.addr, &keys, Some(&store_a), false), MigrateOutcome::Migrated);
    b.wait_log("committed and running", Duration::from_secs(10));
    let at_b = VmProcess::at_socket(b_dir.join("wanmig-it.sock"));
    let pb = at_b.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > 100);

    // B → A, into another directory of host A, against A's store.
    let back_dir = vm.path("a-again");
    let a_again = Receiver::copying(&keys, &keys.src_fp, &back_dir, &[OsStr::new("--store"), store_a.as_os_str()]);
    let second = move_vm(&at_b, &migrate_request(&a_again.addr, &keys, None, false), MigrateOutcome::Migrated);
    a_again.wait_log("committed and running", Duration::from_secs(10));

    let (d1, d2) = (disk_wire_bytes(&first), disk_wire_bytes(&second));
    eprintln!("disk bytes on the wire: first move {d1}, move back {d2}");
    assert!(d2 * 10 < d1, "the move back sent {d2} disk bytes, the first {d1}: {second}");
    assert!(second["disk"]["chunks_present"].as_u64() > Some(0), "{second}");

    let home = VmProcess::at_socket(back_dir.join("wanmig-it.sock"));
    let p = home.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > pb.disk_done + 50);
    assert_eq!(p.errors, 0);
    check_guest(&home, &vm.path("after"), &back_dir.join("disk.img"));
    home.shutdown();
}

#[test]
fn a_sync_keeps_the_vm_here_and_seeds_the_destination() {
    require_kvm();
    let vm = vm_with_data("ws_mib = 4\nrate_mib = 4\ndisk_kib = 64\ndisk_mib = 1", 1);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 10);
    let dst_dir = vm.path("dr");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);

    let synced = move_vm(&src, &migrate_request(&dst.addr, &keys, None, true), MigrateOutcome::Synced);
    dst.wait_log("disks synced", Duration::from_secs(10));
    assert!(dst_dir.join("disk.img").exists() && dst_dir.join("disk.img.replica").exists());
    // The VM still runs here.
    let p = src.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > 100);
    assert_eq!(p.errors, 0);

    // The move itself sends only what changed since the sync.
    let moved = move_vm(&src, &migrate_request(&dst.addr, &keys, None, false), MigrateOutcome::Migrated);
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    dst.wait_log("committed and running", Duration::from_secs(10));
    let (d1, d2) = (disk_wire_bytes(&synced), disk_wire_bytes(&moved));
    eprintln!("disk bytes on the wire: sync {d1}, move after it {d2}");
    assert!(d2 * 10 < d1, "the move sent {d2} disk bytes, the sync {d1}: {moved}");
    assert!(!dst_dir.join("disk.img.replica").exists(), "the replica became the VM's disk");
    let at_dst = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
    check_guest(&at_dst, &vm.path("after"), &dst_dir.join("disk.img"));
    at_dst.shutdown();
}

/// A tmpfs mounted for the duration of a test.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "wanmig-test"])
            .arg(dir)
            .status()
            .expect("mount");
        assert!(st.success(), "mounting a tmpfs needs root");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_destination_disk_fails_cleanly_and_the_source_runs_on() {
    require_kvm();
    let vm = vm_with_data("ws_mib = 4\nrate_mib = 4\ndisk_kib = 64\ndisk_mib = 1", 1);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 10);
    let small = vm.path("small");
    let mount = Tmpfs::mount(&small, "4m");
    let dst = Receiver::copying(
        &keys,
        &keys.src_fp,
        &vm.path("dst"),
        &[OsStr::new("--disk-dir"), small.as_os_str(), OsStr::new("--store"), vm.path("store").as_os_str()],
    );
    let resp =
        control::request_with_progress(src.socket(), &migrate_request(&dst.addr, &keys, None, false), &mut |_| {})
            .expect("answer");
    assert_eq!(resp.outcome, Some(MigrateOutcome::FailedSourceRunning), "{resp:?}");
    let error = resp.summary.as_ref().and_then(|s| s.error.clone()).unwrap_or_default();
    // Refused at the hello, before anything moved, with the figures (a
    // 23 MiB image, a 4 MiB filesystem).
    assert!(
        error.contains("not enough disk space: the VM's disk images need 23 MiB under")
            && error.contains(", 4 MiB free"),
        "the source is told why: {error}"
    );
    dst.wait_log("failed, discarded", Duration::from_secs(10));
    assert!(incoming_images(&small).is_empty(), "the partial image is removed");
    // The source runs on, unharmed.
    let before = src.progress().expect("progress");
    let p = src.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > before.disk_done + 20);
    assert_eq!(p.errors, 0);
    check_guest(&src, &vm.path("snap"), &vm.disk);
    drop(mount);
}

#[test]
fn a_corrupt_chunk_store_is_refused_not_trusted() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("chunks");
    {
        let s = wanmig_dedup::ChunkStore::open(&store).expect("create");
        let data = vec![7u8; 100_000];
        s.put(&wanmig_dedup::ChunkId::of(&data), &data).expect("put");
        s.commit().expect("commit");
    }
    // Garble the index's CURRENT pointer.
    std::fs::write(store.join("index").join("CURRENT"), b"MANIFEST-999999\n").expect("garble");
    let keys = Keys::new(dir.path());
    let (code, err) = run_to_end(&[
        OsStr::new("receive"),
        OsStr::new("--listen"),
        OsStr::new("127.0.0.1:0"),
        OsStr::new("--identity"),
        keys.dst.as_os_str(),
        OsStr::new("--peer"),
        OsStr::new(&keys.src_fp),
        OsStr::new("--dir"),
        dir.path().as_os_str(),
        OsStr::new("--store"),
        store.as_os_str(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("chunk store"), "{err}");
}

/// The setting where QEMU 7.2's background mirror never became ready in
/// our measurement: a 200 Mbit/s cap, the guest writing 2 MiB/s of 4 KiB
/// blocks scattered over 64 MiB and dirtying memory. The migration must
/// converge; the figures are printed (`--nocapture`) for the issue notes.
#[test]
fn disk_writes_under_a_bandwidth_cap_converge() {
    require_kvm();
    let vm = vm_with_data("ws_mib = 16\nrate_mib = 8\ndisk_kib = 2048\ndisk_mib = 64\ndisk_scatter = true", 64);
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    let p0 =
        src.wait_for("the guest to write its disk", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 100);
    let t0 = std::time::Instant::now();
    let p1 = src.wait_for_progress(Duration::from_secs(60), |g| g.disk_done > p0.disk_done + 512);
    let write_rate = (p1.disk_done - p0.disk_done) as f64 * 4096.0 / t0.elapsed().as_secs_f64();
    let dst_dir = vm.path("dst");
    let dst = Receiver::copying(&keys, &keys.src_fp, &dst_dir, &[]);
    let mut req = migrate_request(&dst.addr, &keys, None, false);
    let Request::Migrate { migration } = &mut req else { unreachable!("built above") };
    migration.max_bandwidth_bps = Some(200_000_000);
    let s = move_vm(&src, &req, MigrateOutcome::Migrated);
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    dst.wait_log("committed and running", Duration::from_secs(10));
    let d = &s["disk"];
    eprintln!(
        "200 Mbit/s cap, guest writing {:.2} MiB/s of scattered 4 KiB blocks: total {:.2} s, downtime {:.1} ms, \
         wire {:.1} MiB (disk {:.1} MiB, pages {:.1} MiB), written blocks re-sent {:.1} MiB ({:.2} MiB in the downtime), \
         write cap {:?}",
        write_rate / 1048576.0,
        s["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
        s["downtime_ms"].as_f64().unwrap_or(0.0),
        s["bytes"]["total"].as_f64().unwrap_or(0.0) / 1048576.0,
        s["bytes"]["disk"].as_f64().unwrap_or(0.0) / 1048576.0,
        s["bytes"]["pages"].as_f64().unwrap_or(0.0) / 1048576.0,
        d["extent_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        d["final_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        d["write_limit"].as_u64(),
    );
    let moved = VmProcess::at_socket(dst_dir.join("wanmig-it.sock"));
    check_guest(&moved, &vm.path("after"), &dst_dir.join("disk.img"));
    moved.shutdown();
}

#[test]
fn the_store_command_reports_verifies_and_collects() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = dir.path().join("chunks");
    {
        let s = wanmig_dedup::ChunkStore::open(&store).expect("create");
        for i in 0..4u8 {
            let data = vec![i; 50_000];
            s.put(&wanmig_dedup::ChunkId::of(&data), &data).expect("put");
        }
        let kept = vec![0u8; 50_000];
        s.set_root("vm/disk0", &[wanmig_dedup::ChunkId::of(&kept)]).expect("root");
        s.commit().expect("commit");
    }
    let run = |args: &[&str]| {
        let out = crate::harness::wanmig().arg("store").arg(&store).args(args).output().expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = run(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("4 chunks") && out.contains("root vm/disk0: 1 chunks"), "{out}");
    assert_eq!(run(&["verify"]), (Some(0), "4 chunks checked, 0 bad\n".into()));
    let (code, out) = run(&["gc", "--grace", "0s"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("deleted 3 chunk(s)"), "{out}");
    assert!(run(&["stats"]).1.contains("1 chunks"));
}
