//! A guest that powers itself off or resets through the registers its ACPI
//! tables declare ends `wanmig run` cleanly: exit status 0, a message that
//! says which, the console flushed, the control socket gone.

use std::time::Duration;

use crate::harness::{VmDir, VmProcess, require_kvm};

/// Runs the test guest with `option = 1` (two vCPUs, one disk: the tables
/// declare them) and returns (stderr, serial) after it ended by itself.
fn run_until_guest_stops(option: &str) -> (String, String) {
    require_kvm();
    let vm = VmDir::new(32, 2, &format!("ws_mib = 1\n{option} = 1"));
    let mut p = VmProcess::run(&vm);
    let status = p.wait_exit(Duration::from_secs(60));
    let stderr = p.stderr();
    assert!(status.success(), "wanmig run exited with {status}: {stderr}");
    assert!(!vm.socket().exists(), "the control socket outlived the VM");
    (stderr, vm.serial())
}

#[test]
fn guest_power_off_ends_run_cleanly() {
    let (stderr, serial) = run_until_guest_stops("poweroff_after_s");
    assert!(stderr.contains("wanmig: guest powered off"), "{stderr}");
    // The guest found the registers through RSDP → XSDT → FADT → DSDT.
    assert!(serial.contains("ACPI: sleep control port 0x0000000000000600 S5 type 5"), "{serial}");
    // The last line it wrote before the write that stopped it is there.
    assert!(serial.trim_end().ends_with("wanmig-testguest: powering off (ACPI S5)"), "{serial}");
}

#[test]
fn guest_reset_ends_run_cleanly() {
    let (stderr, serial) = run_until_guest_stops("reset_after_s");
    assert!(stderr.contains("wanmig: guest reset"), "{stderr}");
    assert!(serial.contains("reset port 0x0000000000000602 value 0x0000000000000001"), "{serial}");
    assert!(serial.trim_end().ends_with("wanmig-testguest: resetting (ACPI reset register)"), "{serial}");
}
