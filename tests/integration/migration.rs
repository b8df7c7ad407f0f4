//! Live migration between real processes over loopback QUIC, and what
//! happens when it fails.

use std::ffi::OsStr;
use std::time::Duration;

use wanmig_control::{self as control, Request};
use wanmig_migrate::report::Outcome as MigrateOutcome;

use crate::harness::{Keys, Receiver, VmDir, VmProcess, check_guest, migrate_request, require_kvm, run_to_end};

fn send_args<'a>(vm: &'a VmDir, to: &'a Receiver, keys: &'a Keys, peer: &'a str) -> Vec<&'a OsStr> {
    vec![
        OsStr::new("send"),
        vm.config.as_os_str(),
        OsStr::new(&to.addr),
        OsStr::new("--identity"),
        keys.src.as_os_str(),
        OsStr::new("--peer"),
        OsStr::new(peer),
        OsStr::new("--json"),
    ]
}

/// Migrates through the control socket, calling `on_event` with each progress event.
fn migrate(src: &VmProcess, dest: &str, keys: &Keys, on_event: &mut dyn FnMut(&str)) -> control::Response {
    migrate_with(src, migrate_request(dest, keys, None, false), on_event)
}

fn migrate_with(src: &VmProcess, req: Request, on_event: &mut dyn FnMut(&str)) -> control::Response {
    control::request_with_progress(src.socket(), &req, &mut |p| {
        let phase = serde_json::to_value(p.phase).expect("a phase serializes");
        on_event(phase.as_str().unwrap_or(""))
    })
    .expect("the VM process answers")
}

#[test]
fn test_guest_migrates_and_continues_at_the_destination() {
    require_kvm();
    let vm = VmDir::new(128, 1, "ws_mib = 8\nrate_mib = 32\ndisk_kib = 128");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    let p0 = src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 1000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);

    let (code, stderr) = run_to_end(&send_args(&vm, &dst, &keys, &keys.dst_fp));
    assert_eq!(code, 0, "send failed: {stderr}");
    // The source process hands the VM over and ends.
    assert!(src.wait_exit(Duration::from_secs(10)).success());
    dst.wait_log("committed and running", Duration::from_secs(10));

    let moved = VmProcess::at_socket(vm.path("dst").join("wanmig-it.sock"));
    let p1 =
        moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > p0.steps + 2000 && g.disk_done > p0.disk_done);
    assert_eq!(p1.errors, 0, "the guest found a stale or lost page after the move");
    let m = check_guest(&moved, &vm.path("after"), &vm.disk);
    assert!(m.status.steps >= p1.steps);
    moved.shutdown();
}

#[test]
fn destination_killed_mid_precopy_leaves_the_source_running() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 16");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    let mut dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    // Kill the destination as soon as pre-copy starts.
    let addr = dst.addr.clone();
    let resp = migrate(&src, &addr, &keys, &mut |event| {
        if event == "precopy" {
            dst.kill();
        }
    });
    assert_eq!(resp.outcome, Some(MigrateOutcome::FailedSourceRunning), "{resp:?}");
    let p = src.progress().expect("the source still answers");
    src.wait_for("the source guest to keep running", Duration::from_secs(10), |g| g.steps > p.steps + 100);
    assert_eq!(src.progress().expect("status").errors, 0);
    check_guest(&src, &vm.path("snap"), &vm.disk);
    assert!(src.shutdown().success());
}

#[test]
fn destination_lost_in_stop_and_copy_before_commit_resumes_the_source() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 16\ndisk_kib = 64");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    // The destination dies after receiving the device state, before Ready;
    // the source waits for Ready before it commits (--commit-after-ready).
    let dst =
        Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[("WANMIG_FAILPOINT", "receive-exit-before-ready")]);
    let mut req = migrate_request(&dst.addr, &keys, None, false);
    let Request::Migrate { migration } = &mut req else { unreachable!("a migrate request") };
    migration.commit_after_ready = true;
    let mut events = Vec::new();
    let resp = migrate_with(&src, req, &mut |e| events.push(e.to_string()));
    assert!(events.iter().any(|e| e == "stop_and_copy"), "{events:?}");
    assert_eq!(resp.outcome, Some(MigrateOutcome::FailedSourceRunning), "{resp:?}");
    assert!(dst.log().contains("failpoint receive-exit-before-ready"), "{}", dst.log());
    let p = src.progress().expect("status");
    let q = src.wait_for("the source guest to resume", Duration::from_secs(10), |g| g.steps > p.steps + 100);
    assert_eq!(q.errors, 0);
    check_guest(&src, &vm.path("snap"), &vm.disk);
}

#[test]
fn destination_lost_before_deciding_an_early_commit_leaves_the_source_in_doubt_until_settled() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 16\ndisk_kib = 64");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    // With an early commit (the default) the commit follows the device
    // state: the destination dies with both in hand, before it decided. The
    // source, paused, tries to resume for the window (3 s here: nobody
    // answers), then stays in doubt and says how to settle it.
    let dst =
        Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[("WANMIG_FAILPOINT", "receive-exit-before-ready")]);
    let mut req = migrate_request(&dst.addr, &keys, None, false);
    let Request::Migrate { migration } = &mut req else { unreachable!("a migrate request") };
    assert!(!migration.commit_after_ready, "the early commit is the default");
    migration.resume_window_s = 3;
    let resp = migrate_with(&src, req, &mut |_| {});
    assert_eq!(resp.outcome, Some(MigrateOutcome::InDoubt), "{resp:?}");
    assert!(dst.log().contains("failpoint receive-exit-before-ready"), "{}", dst.log());
    let summary = resp.summary.as_ref().expect("a summary");
    let error = summary.error.as_deref().unwrap_or_default();
    assert!(summary.outages == 1 && error.contains("resume window"), "{resp:?}");
    assert!(error.contains("in doubt") && error.contains("wanmig settle"), "{error}");
    let p = src.progress().expect("status");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(src.progress().expect("status").steps, p.steps, "a guest in doubt stays paused");
    // The destination comes back at its address; settle asks it.
    let back = Receiver::start_at_addr(&dst.addr, &keys, &keys.src_fp, &vm.path("dst"));
    let out = crate::harness::wanmig().args(["settle"]).arg(&vm.config).output().expect("settle");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("not committed"), "settle: {said}\n{}", back.log());
    let q = src.wait_for("the source guest to resume", Duration::from_secs(10), |g| g.steps > p.steps + 100);
    assert_eq!(q.errors, 0);
    check_guest(&src, &vm.path("snap"), &vm.disk);
}

#[test]
fn wrong_peer_keys_are_refused_and_the_source_keeps_running() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1\nrate_mib = 4");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);

    // The source pins a fingerprint the destination does not have.
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let stranger = "ab".repeat(32);
    let (code, out) = run_to_end(&send_args(&vm, &dst, &keys, &stranger));
    assert_eq!(code, 1, "{out}");
    let (_, json) = json_of(&vm, &dst, &keys, &stranger, &[]);
    assert!(json.contains("is not pinned"), "{json}");

    // The destination does not trust this source.
    let dst2 = Receiver::start(&keys, &stranger, &vm.path("dst2"), &[]);
    let (code, json) = json_of(&vm, &dst2, &keys, &keys.dst_fp, &[]);
    assert_eq!(code, 1);
    assert!(json.contains("refused our certificate"), "{json}");
    dst2.wait_log("is not pinned", Duration::from_secs(5));

    let p = src.progress().expect("status");
    src.wait_for("the source guest to keep running", Duration::from_secs(10), |g| g.steps > p.steps);
    assert_eq!(src.progress().expect("status").errors, 0);
}

fn json_of(vm: &VmDir, to: &Receiver, keys: &Keys, peer: &str, extra: &[&str]) -> (i32, String) {
    let out = crate::harness::wanmig().args(send_args(vm, to, keys, peer)).args(extra).output().expect("send");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn garbage_from_an_authenticated_peer_is_refused_without_harm() {
    use wanmig_transport::{Identity, LinkTuning};
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = Keys::new(dir.path());
    let dst = Receiver::start(&keys, &keys.src_fp, &dir.path().join("dst"), &[]);
    let id = Identity::load(&keys.src).expect("identity");
    let peer = keys.dst_fp.parse().expect("fingerprint");
    let addr = dst.addr.parse().expect("address");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        for garbage in [&b"\x05\x00\x00\x00\xff\xff\xff\xff\xff"[..], b"\xff\xff\xff\xff", b"\x01\x00\x00\x00\x00"] {
            let mut conn = wanmig_transport::connect(addr, &id, &[peer], LinkTuning::default()).await.expect("connect");
            let (mut tx, mut rx) = conn.open_control().await.expect("control");
            tx.send_encoded(garbage).await.expect("send");
            // The destination drops the attempt: the stream ends or fails.
            let answer = rx.recv_timeout(Duration::from_secs(15)).await;
            assert!(!matches!(answer, Ok(Some(_))), "{answer:?}");
        }
    });
    dst.wait_log("bad frame", Duration::from_secs(10));
    assert!(!dst.log().contains("panicked"), "{}", dst.log());
    let mut dst = dst;
    assert!(dst.is_running(), "the destination died on garbage");
}

#[test]
fn a_guest_dirtying_faster_than_the_link_is_throttled_never_looped() {
    require_kvm();
    // Flat out, the guest rewrites its whole 32 MiB working set many times a
    // second; with a 5 ms budget the rest of a round never fits. Entropy 0:
    // the test is about the throttle, and at the default (35) the first copy
    // alone of this 64 MiB guest takes about a minute over the 4 Mbit link.
    let vm = VmDir::new(64, 1, "ws_mib = 32\nflat_out = true\nmem_entropy = 0");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.steps > 10_000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let mut args = send_args(&vm, &dst, &keys, &keys.dst_fp);
    args.extend([OsStr::new("--max-bandwidth"), OsStr::new("4Mbit"), OsStr::new("--downtime"), OsStr::new("5ms")]);
    // Pre-copy's own answer (post-copy has tests of its own).
    args.extend([OsStr::new("--postcopy"), OsStr::new("off")]);
    let out = crate::harness::wanmig().args(&args).output().expect("send");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let summary = &v["summary"];
    assert!(summary["max_throttle"].as_u64().unwrap_or(0) >= 20, "never throttled: {v}");
    match v["outcome"].as_str() {
        // Converged under throttle: the guest runs at the destination.
        Some("migrated") => {
            assert_eq!(out.status.code(), Some(0));
            let moved = VmProcess::at_socket(vm.path("dst").join("wanmig-it.sock"));
            let p = moved.wait_for_progress(Duration::from_secs(30), |g| g.steps > 0);
            assert_eq!(p.errors, 0);
            moved.shutdown();
        }
        // Or gave up with the numbers, and the guest runs on here, unthrottled.
        Some("failed_source_running") => {
            assert_eq!(out.status.code(), Some(1));
            let why = summary["error"].as_str().unwrap_or("");
            assert!(why.contains("MiB/s") && why.contains("throttle"), "{why}");
            let p = src.progress().expect("status");
            let q = src.wait_for("the guest to run on", Duration::from_secs(10), |g| g.steps > p.steps + 100_000);
            assert_eq!(q.errors, 0);
        }
        other => panic!("unexpected outcome {other:?}: {v}"),
    }
}

#[test]
fn a_lost_commit_acknowledgement_leaves_the_source_paused_and_in_doubt() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1\nrate_mib = 4");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    // The destination dies after Commit, before acknowledging it.
    let dst = Receiver::start(
        &keys,
        &keys.src_fp,
        &vm.path("dst"),
        &[("WANMIG_FAILPOINT", "receive-exit-before-commit-ack")],
    );
    // The source tries to hear the decision for the resume window (2 s:
    // nobody answers), then stays in doubt and says how to settle it.
    let (code, json) = json_of(&vm, &dst, &keys, &keys.dst_fp, &["--resume-window", "2s"]);
    assert_eq!(code, 3, "{json}");
    assert!(json.contains("in_doubt") && json.contains("wanmig settle"), "{json}");
    // Paused, and it stays so: the guest may be running elsewhere.
    let status = control::request(src.socket(), &Request::Status).expect("status").status.expect("status");
    assert_eq!(status.state, "in-doubt");
    let a = src.progress().expect("progress");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.progress().expect("progress"), a, "an in-doubt guest ran at the source");
    let refused = control::request(src.socket(), &Request::Resume).expect_err("resume must be refused");
    assert!(refused.to_string().contains("in doubt"), "{refused}");
}

#[test]
fn a_migration_past_its_timeout_gives_up_and_the_source_runs_on() {
    require_kvm();
    // Entropy 0: the guest must run on by 100 000 steps in 10 s below, which
    // it does at about 40 000 steps/s; at the default (35) it takes 5 500.
    let vm = VmDir::new(64, 1, "ws_mib = 32\nflat_out = true\nmem_entropy = 0");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let mut args = send_args(&vm, &dst, &keys, &keys.dst_fp);
    // A budget no round can meet, and one second to try.
    args.extend([OsStr::new("--downtime"), OsStr::new("1ms"), OsStr::new("--timeout"), OsStr::new("1s")]);
    let start = std::time::Instant::now();
    let out = crate::harness::wanmig().args(&args).output().expect("send");
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    let why = v["summary"]["error"].as_str().unwrap_or("");
    assert!(why.contains("timed out") || why.contains("MiB/s"), "{v}");
    let p = src.progress().expect("status");
    let q = src.wait_for("the guest to run on", Duration::from_secs(10), |g| g.steps > p.steps + 100_000);
    assert_eq!(q.errors, 0);
}

#[test]
fn disks_outside_the_shared_directory_are_refused() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1\nrate_mib = 4");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    // This destination shares another directory than the one holding the disk.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let dst = Receiver::start(&keys, &keys.src_fp, &elsewhere.path().join("dst"), &[]);
    let (code, json) = json_of(&vm, &dst, &keys, &keys.dst_fp, &[]);
    assert_eq!(code, 1, "{json}");
    assert!(json.contains("not an image under the shared directory"), "{json}");
    let p = src.progress().expect("status");
    src.wait_for("the source guest to keep running", Duration::from_secs(10), |g| g.steps > p.steps);
}
