//! Pause and save in one process, restore in another, and hold the guest to
//! its oracle on both sides.

use std::time::Duration;

use wanmig_vmm::snapshot::{self, MEMORY_FILE};
use wanmig_vmm::testguest::{self, MemoryReport};

use crate::harness::{VmDir, VmProcess, require_kvm};

/// An irqchip's bytes with the PIC's interrupt request register cleared
/// (byte 9: `chip_id`, padding, then `kvm_pic_state { last_irr, irr, .. }`).
fn without_pic_irr(chip: &wanmig_vmm::state::Pod<kvm_bindings::kvm_irqchip>) -> Vec<u8> {
    use zerocopy::IntoBytes;
    let mut bytes = chip.0.as_bytes().to_vec();
    if chip.0.chip_id != kvm_bindings::KVM_IRQCHIP_IOAPIC {
        bytes[9] = 0;
    }
    bytes
}

fn check(dir: &std::path::Path, disk: &std::path::Path) -> (MemoryReport, u64) {
    let (_, ram) = snapshot::load_for_inspection(dir).expect("snapshot loads");
    let m = testguest::check_memory(ram.mem(), &ram.regions()).expect("memory oracle");
    let image = std::fs::read(disk).expect("read disk");
    let d = testguest::check_disk(&image, &m.status).expect("disk oracle");
    (m, d)
}

#[test]
fn guest_continues_in_another_process() {
    require_kvm();
    // Two vCPUs: the second sits in wait-for-SIPI, and its state travels too.
    let vm = VmDir::new(128, 2, "ws_mib = 8\nflat_out = true\ndisk_kib = 256\ndisk_mib = 2");
    let mut src = VmProcess::run(&vm);
    let p0 = src.wait_for("the guest to stamp its memory", Duration::from_secs(120), |g| g.phase == 2);
    src.wait_for("progress", Duration::from_secs(60), |g| {
        g.steps > p0.steps + 20_000 && g.disk_done > p0.disk_done + 16
    });

    let snap1 = vm.path("snap1");
    let save = src.snapshot(&snap1);
    assert!(save.memory_bytes > 0);
    // Paused means paused: nothing moves.
    let a = src.progress().expect("status");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(src.progress().expect("status"), a, "the guest ran while paused");
    let src_pid = src.pid();
    assert!(src.shutdown().success());
    let (m1, d1) = check(&snap1, &vm.disk);
    assert!(m1.status.steps > 0 && d1 > 16, "{m1:?} {d1}");

    let mut dst = VmProcess::restore(&vm, &snap1);
    assert_ne!(dst.pid(), src_pid);
    let p = dst.wait_for("the restored guest to continue", Duration::from_secs(60), |g| {
        g.steps > m1.status.steps + 50_000 && g.disk_done > d1 + 16
    });
    assert_eq!(p.errors, 0, "the guest found pages it did not write");
    let snap2 = vm.path("snap2");
    dst.snapshot(&snap2);
    assert!(dst.shutdown().success());
    let (m2, d2) = check(&snap2, &vm.disk);
    assert!(m2.status.steps > m1.status.steps && m2.generation >= m1.generation && d2 > d1);
    // Both processes wrote the console; the restored one went on counting.
    let serial = vm.serial();
    assert!(serial.contains("wanmig-testguest: running"), "{serial}");
    assert!(!serial.contains("MISMATCH"), "{serial}");
}

#[test]
fn restore_then_save_reproduces_the_snapshot() {
    require_kvm();
    let vm = VmDir::new(64, 1, "ws_mib = 4\nrate_mib = 64\ndisk_kib = 64");
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2 && g.disk_done > 4);
    let snap1 = vm.path("snap1");
    src.snapshot(&snap1);
    assert!(src.shutdown().success());

    // Restored but never resumed, then saved again: the same VM.
    let dst = VmProcess::restore_paused(&vm, &snap1);
    let snap2 = vm.path("snap2");
    dst.snapshot(&snap2);
    assert!(dst.shutdown().success());
    let m1 = std::fs::read(snap1.join(MEMORY_FILE)).expect("read");
    let m2 = std::fs::read(snap2.join(MEMORY_FILE)).expect("read");
    assert!(m1 == m2, "guest memory changed across restore + save");
    let (s1, _) = snapshot::load_for_inspection(&snap1).expect("load");
    let (s2, _) = snapshot::load_for_inspection(&snap2).expect("load");
    assert_eq!(s1.memory, s2.memory);
    assert_eq!(s1.serial, s2.serial);
    assert_eq!(s1.virtio, s2.virtio);
    // The in-kernel PIT keeps ticking while the VM is paused, so the PICs'
    // interrupt request registers may gain the timer's bit; all else is equal.
    for (a, b) in s1.irqchips.iter().zip(&s2.irqchips) {
        assert_eq!(without_pic_irr(a), without_pic_irr(b), "irqchip {} changed", a.0.chip_id);
    }
    for (a, b) in s1.vcpus.iter().zip(&s2.vcpus) {
        assert!(a.same_execution_state(b), "vCPU {} state changed across restore + save", a.id);
    }
}
