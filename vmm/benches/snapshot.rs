//! Benchmark: pause + save and restore + resume of the test guest at 1 GiB
//! and 4 GiB, and the cost of one dirty-log harvest per GiB.
//!
//! Run with `cargo bench -p wanmig-vmm --bench snapshot` (release build).
//! Sizes can be chosen with `WANMIG_BENCH_GIB=1,4`. RAM goes to a file in
//! `$TMPDIR`; the restore happens in this process (the cross-process path
//! is covered by the integration tests and `wanmig demo`). Each size runs
//! twice; the second row is the one with warm host memory.

use std::path::Path;
use std::time::{Duration, Instant};

use wanmig_vmm::config::{GuestConfig, SerialOutput, TestGuestConfig, VmConfig};
use wanmig_vmm::testguest::GuestStatus;
use wanmig_vmm::vm::Vm;

fn config(gib: u64, dir: &Path) -> VmConfig {
    VmConfig {
        name: format!("bench{gib}"),
        memory_mib: gib << 10,
        vcpus: 1,
        control_socket: dir.join("unused.sock"),
        state_dir: dir.to_path_buf(),
        serial: SerialOutput::None,
        guest: Some(GuestConfig::Test(TestGuestConfig {
            ws_mib: 16,
            rate_mib: 1,
            flat_out: false,
            disk_kib: 0,
            disk_mib: 1,
            disk_scatter: false,
            mem_entropy: wanmig_vmm::testguest::DEFAULT_MEM_ENTROPY,
            disk_entropy: wanmig_vmm::testguest::DEFAULT_DISK_ENTROPY,
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
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let sizes: Vec<u64> = std::env::var("WANMIG_BENCH_GIB")
        .unwrap_or_else(|_| "1,4".into())
        .split(',')
        .map(|s| s.trim().parse().expect("WANMIG_BENCH_GIB: comma-separated GiB counts"))
        .collect();
    let dir = tempfile::Builder::new().prefix("wanmig-bench-").tempdir().expect("tempdir");
    println!(
        "{:>5} {:>7} {:>9} {:>9} {:>10} {:>8} {:>11} {:>10} {:>10} {:>12} {:>12}",
        "GiB",
        "boot_s",
        "pause_ms",
        "state_ms",
        "memory_ms",
        "sync_ms",
        "restore_ms",
        "resume_ms",
        "log_on_ms",
        "harvest_all",
        "harvest_few"
    );
    // Each size runs twice: on a host that has not touched this much memory
    // recently, the first run also pays for the host backing fresh pages
    // (measured here: ~3.7 s per GiB on first touch, 0.3 s after).
    for gib in sizes.iter().flat_map(|&g| [g, g]) {
        let cfg = config(gib, dir.path());
        let t = Instant::now();
        let mut vm = Vm::boot(&cfg).expect("boot");
        // Logging on from the start: the boot-time stamping dirties every page.
        let t_log = Instant::now();
        vm.set_dirty_logging(true).expect("dirty logging");
        let log_on = t_log.elapsed();
        vm.resume();
        wait(&vm, Duration::from_secs(600), |s| s.phase == 2);
        let boot = t.elapsed();

        let t_h = Instant::now();
        let all = vm.harvest_dirty().expect("harvest");
        let harvest_all = t_h.elapsed();
        std::thread::sleep(Duration::from_millis(100));
        let t_h = Instant::now();
        let few = vm.harvest_dirty().expect("harvest");
        let harvest_few = t_h.elapsed();

        let t_p = Instant::now();
        vm.pause().expect("pause");
        let pause = t_p.elapsed();
        let snap = dir.path().join(format!("snap{gib}"));
        let save = vm.save(&snap).expect("save");
        let before = vm.test_guest_status().expect("status");
        drop(vm);

        let t_r = Instant::now();
        let mut vm = Vm::restore(&cfg, &snap).expect("restore");
        let restore = t_r.elapsed();
        let t_run = Instant::now();
        vm.resume();
        wait(&vm, Duration::from_secs(60), |s| s.ticks > before.ticks);
        let resume = t_run.elapsed();
        drop(vm);
        std::fs::remove_dir_all(&snap).expect("clean up");

        let per_gib = |d: Duration| format!("{:.2}ms/GiB", ms(d) / gib as f64);
        println!(
            "{gib:>5} {:>7.1} {:>9.2} {:>9.2} {:>10.1} {:>8.1} {:>11.1} {:>10.1} {:>10.2} {:>12} {:>12}",
            boot.as_secs_f64(),
            ms(pause),
            save.state_ms,
            save.memory_ms,
            save.sync_ms,
            ms(restore),
            ms(resume),
            ms(log_on),
            per_gib(harvest_all),
            per_gib(harvest_few),
        );
        println!(
            "      harvest_all found {} dirty pages, harvest_few {}; memory file {} MiB of data",
            all.pages(),
            few.pages(),
            save.memory_bytes >> 20
        );
    }
    println!("boot_s: until the guest has stamped all RAM (runs in KVM's instruction emulator on PVM hosts)");
    println!("memory_ms: RAM to memory.bin with O_DIRECT, zero pages skipped; sync_ms: the fsync after it");
    println!("restore_ms: a new VM in this process, state + RAM read back with O_DIRECT (data extents only)");
    println!("resume_ms: from resume to the guest's next 10 ms timer tick (includes up to 10 ms of tick wait)");
}
