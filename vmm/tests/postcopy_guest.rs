//! The built-in test guest moved by post-copy alone, in one process: booted
//! and run, paused, its RAM copied out (the "source"), then a VM built with
//! `Vm::from_incoming` on RAM where **every** page is missing, and resumed.
//! A server thread plays both ends of the link: it reads faults, feeds them
//! to the source's send order (`wanmig_mem_sync::postcopy::Prepager`:
//! requested pages first, then bubbling around them), and places what that
//! order sends, a few pages at a time so the guest runs for seconds with
//! most of its RAM still missing. The oracle checks every page at the end.
//! Needs `/dev/kvm`; fails (never skips) without it.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::postcopy::{Prepager, PrepagerConfig};
use wanmig_vmm::config::{GuestConfig, SerialOutput, TestGuestConfig, VmConfig};
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::postcopy::{PageData, Placement, PostcopyRam};
use wanmig_vmm::testguest::{self, GuestStatus};
use wanmig_vmm::vm::Vm;

const PAGE: u64 = 4096;

fn config(dir: &Path) -> VmConfig {
    VmConfig {
        name: "postcopy".into(),
        memory_mib: 64,
        vcpus: 1,
        control_socket: dir.join("unused.sock"),
        state_dir: dir.to_path_buf(),
        serial: SerialOutput::None,
        guest: Some(GuestConfig::Test(TestGuestConfig {
            ws_mib: 8,
            rate_mib: 4,
            flat_out: false,
            disk_kib: 0,
            disk_mib: 1,
            disk_scatter: false,
            mem_entropy: testguest::DEFAULT_MEM_ENTROPY,
            disk_entropy: testguest::DEFAULT_DISK_ENTROPY,
            poweroff_after_s: None,
            reset_after_s: None,
        })),
        disks: Vec::new(),
        cpu_hide: Vec::new(),
        nets: Vec::new(),
    }
}

fn wait(vm: &Vm, timeout: Duration, ready: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = vm.test_guest_status().filter(|s| ready(s)) {
            return s;
        }
        assert!(start.elapsed() < timeout, "the guest did not get there in {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_test_guest_runs_on_ram_that_arrives_by_post_copy_and_passes_its_oracle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = config(dir.path());

    // The source: boot, run a while, pause, copy RAM and state out.
    let mut src = Vm::boot(&cfg).expect("/dev/kvm is needed for this test (boot the test guest)");
    src.resume();
    let running = wait(&src, Duration::from_secs(120), |s| s.phase == testguest::PHASE_RUNNING && s.steps > 100);
    src.pause().expect("pause");
    let state = src.save_state().expect("save state");
    let regions = src.ram().regions();
    assert_eq!(regions.len(), 1, "64 MiB is one region");
    let mut image = vec![0u8; regions[0].1 as usize];
    src.ram().mem().read_slice(&mut image, regions[0].0).expect("read RAM");
    let at_pause = src.test_guest_status().expect("status");
    drop(src);
    assert!(at_pause.steps >= running.steps);

    // The destination: nothing present.
    let ram = GuestRam::new(cfg.memory_bytes()).expect("map");
    let pc = Arc::new(PostcopyRam::register(&ram, &[]).expect("register"));
    let pages = image.len() as u64 / PAGE;
    assert_eq!(pc.missing_pages(), pages);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (pc, stop) = (pc.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut order = Prepager::new(pages, PrepagerConfig::default());
            let mut faults = Vec::new();
            let mut tids = Vec::new();
            let start = Instant::now();
            // 16 pages pushed every 2 ms at most: about 4 s for the 64 MiB.
            while !order.is_done() && !stop.load(Ordering::Acquire) {
                faults.clear();
                pc.read_faults(Some(Duration::from_millis(2)), &mut faults).expect("read faults");
                for f in &faults {
                    order.on_fault(f.gpa.0 / PAGE);
                    tids.push(f.tid);
                }
                let mut send = order.next_requested(256);
                send.extend(order.next_push_batch(16));
                let batch: Vec<Placement> = send
                    .iter()
                    .map(|r| {
                        let bytes = &image[(r.first * PAGE) as usize..(r.end() * PAGE) as usize];
                        Placement { gpa: GuestAddress(r.first * PAGE), data: PageData::Bytes(bytes) }
                    })
                    .collect();
                pc.place(&batch).expect("place");
                order.on_sent(&send);
            }
            (order.handed_out(), tids, start.elapsed())
        })
    };

    // Build the VM on the missing RAM (loading device state may fault too)
    // and run it.
    let mut vm = Vm::from_incoming(&cfg, ram, &state, None).expect("build the VM on post-copy RAM");
    let while_building = pc.stats().faults;
    // A VMM thread (this one) reads the status page before the guest runs:
    // a user-mode fault, served like the vCPU's.
    assert_eq!(vm.test_guest_status().expect("status").steps, at_pause.steps);
    vm.resume();
    let t0 = Instant::now();
    let progressed = wait(&vm, Duration::from_secs(60), |s| s.steps >= at_pause.steps + 200);
    let missing_then = pc.missing_pages();
    let ran_for = t0.elapsed();
    let vcpu_tid = vm.vcpu_thread_ids()[0];
    let ((requested, pushed), tids, took) = {
        let r = server.join();
        stop.store(true, Ordering::Release);
        r.expect("server")
    };
    assert_eq!(pc.missing_pages(), 0);
    pc.finish().expect("finish post-copy");
    vm.pause().expect("pause");
    let report = testguest::check_memory(vm.ram().mem(), &vm.ram().regions()).expect("the oracle passes");
    let stats = pc.stats();
    println!(
        "post-copy of a 64 MiB test guest: {} steps in {:.2} s while {} of {pages} pages were still missing; \
         all pages in {:.2} s; {} faults reported ({} from the vCPU, {} messages, {while_building} while the VM \
         was built), {requested} pages sent on request (with neighbours), {pushed} pushed; oracle: {} pages \
         checked, generation {}",
        progressed.steps - at_pause.steps,
        ran_for.as_secs_f64(),
        missing_then,
        took.as_secs_f64(),
        stats.faults,
        tids.iter().filter(|&&t| t == vcpu_tid).count(),
        stats.messages,
        report.pages_checked,
        report.generation,
    );
    // The guest made progress while most of its RAM was not there yet.
    assert!(missing_then > pages / 4, "only {missing_then} pages were missing when the guest had run on");
    assert!(report.status.steps > at_pause.steps + 200);
    // Its vCPU faulted (inside KVM_RUN) and the VMM did (the status reads).
    assert!(tids.contains(&vcpu_tid), "no fault from the vCPU thread {vcpu_tid}");
    assert!(tids.iter().any(|&t| t != vcpu_tid), "no fault from a VMM thread");
    assert_eq!(requested + pushed, pages);
}
