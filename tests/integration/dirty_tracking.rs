//! Dirty tracking under KVM: vCPU writes through KVM's dirty log, device
//! writes through the VMM's own bitmap, guest disk writes through the
//! block device's write log.

use std::time::{Duration, Instant};

use wanmig_vmm::testguest::{GuestStatus, RESERVED_END};
use wanmig_vmm::{Vm, VmConfig};

use crate::harness::{VmDir, require_kvm};

const MIB: u64 = 1 << 20;

fn wait(vm: &Vm, what: &str, ready: impl Fn(&GuestStatus) -> bool) -> GuestStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = vm.test_guest_status()
            && ready(&s)
        {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn dirty_pages(vm: &Vm) -> Vec<u64> {
    let d = vm.harvest_dirty().expect("harvest");
    d.regions
        .iter()
        .flat_map(|r| r.ranges.iter().flat_map(move |x| (x.first..x.end()).map(move |p| r.start.0 + p * 4096)))
        .collect()
}

#[test]
fn harvest_sees_vcpu_device_and_disk_writes() {
    require_kvm();
    let dir = VmDir::new(64, 1, "ws_mib = 4\nflat_out = true\ndisk_kib = 512\ndisk_mib = 1");
    let cfg = VmConfig::load(&dir.config).expect("config");
    let mut vm = Vm::boot(&cfg).expect("boot");
    vm.resume();
    let s0 = wait(&vm, "the guest to run", |s| s.phase == 2 && s.disk_done > 0);
    let ws = s0.ws_start..s0.ws_start + s0.ws_pages * 4096;

    // Dirty logging off: only the VMM's own writes (virtio used ring and
    // status bytes, in the guest image below 2 MiB) are reported.
    let _ = dirty_pages(&vm);
    wait(&vm, "disk writes", |s| s.disk_done > s0.disk_done + 8);
    let device = dirty_pages(&vm);
    assert!(!device.is_empty(), "device DMA into guest memory was not tracked");
    assert!(device.iter().all(|&a| (MIB..RESERVED_END).contains(&a)), "{device:x?}");

    // Dirty logging on: a full pass over the working set shows all of it,
    // and nothing outside it and the guest's own image.
    vm.set_dirty_logging(true).expect("dirty logging on");
    let s1 = wait(&vm, "one step", |s| s.steps > 0);
    wait(&vm, "a full pass", |s| s.steps > s1.steps + 2 * s0.ws_pages);
    let pages = dirty_pages(&vm);
    let in_ws = pages.iter().filter(|a| ws.contains(a)).count() as u64;
    assert_eq!(in_ws, s0.ws_pages, "working-set pages missing from the dirty log");
    let stray: Vec<_> = pages.iter().filter(|a| !ws.contains(a) && !(MIB..RESERVED_END).contains(a)).collect();
    assert!(stray.is_empty(), "pages the guest never writes reported dirty: {stray:x?}");

    // The disk write log: only the 1 MiB region the guest cycles over.
    let log = vm.disk_write_logs()[0].take();
    let written: Vec<usize> = (0..log.len() * 64).filter(|&b| log[b / 64] & (1 << (b % 64)) != 0).collect();
    assert!(!written.is_empty());
    assert!(written.iter().all(|&b| b < 256), "writes outside the region: {written:?}");
    // Get-and-clear: once paused, a second take finds nothing new.
    vm.pause().expect("pause");
    let _ = vm.disk_write_logs()[0].take();
    assert!(vm.disk_write_logs()[0].take().iter().all(|&w| w == 0));
}
