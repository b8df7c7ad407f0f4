//! Debian's stock cloud kernel under our VMM: the boot protocol, the memory
//! map, the ACPI tables and the MADT as the kernel sees them, and a snapshot
//! taken mid-boot that goes on in another process.
//!
//! This machine's KVM emulates every instruction of a guest that is not
//! PVM-aware (about 1.4 M instructions/s) and lacks some (`xrstor`, and the
//! `int3` of the kernel's alternatives self-test), so the kernel runs here
//! for about a minute and then stops; everything checked below happens in
//! the first seconds of its boot. On hardware KVM the same VM reaches init
//! in well under a second (`scripts/linux-check.sh`).

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::{VmDir, VmProcess, require_kvm};

/// Where `scripts/guest-assets.sh` puts the guest kernel and initramfs.
fn asset(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("WANMIG_GUEST_DIR").map_or_else(|| PathBuf::from("/var/tmp/wanmig-guest"), PathBuf::from);
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run scripts/guest-assets.sh (see the README's Setup)", p.display());
    p
}

/// A Linux VM: the uncompressed kernel, our initramfs, `vcpus` vCPUs.
/// `noxsave`: this KVM cannot emulate `xrstor`, and its CPUID shows XSAVE
/// whatever the VMM asks (hiding `cx16` through `[cpu]` does work).
fn linux_vm(vcpus: u8) -> VmDir {
    VmDir::with_toml(&format!(
        "memory_mib = 512\nvcpus = {vcpus}\n[cpu]\nhide = [\"cx16\"]\n[guest]\nkind = \"linux\"\n\
         kernel = \"{}\"\ninitrd = \"{}\"\n\
         cmdline = \"console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1 pci=off noxsave\"\n",
        asset("vmlinux").display(),
        asset("initramfs.cpio.gz").display()
    ))
}

const BOOT: Duration = Duration::from_secs(240);

#[test]
fn stock_kernel_sees_our_memory_map_acpi_tables_and_cpus() {
    require_kvm();
    let vm = linux_vm(2);
    let mut p = VmProcess::run(&vm);
    let serial = vm.wait_serial(&mut p, "smpboot: Allowing", BOOT);
    for line in [
        "Linux version 6.",
        "Command line: console=ttyS0",
        // The e820 map the loader built.
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        // The initramfs where the zero page says.
        "RAMDISK: [mem 0x",
        // Every ACPI table found and accepted.
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT 0x",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "ACPI: APIC 0x",
        // The MADT's CPUs and IOAPIC.
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "IOAPIC[0]: apic_id ",
        "address 0xfec00000, GSI 0-23",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ] {
        assert!(serial.contains(line), "the console lacks {line:?}:\n{serial}");
    }
    for bad in ["ACPI BIOS Error", "ACPI Error", "Incorrect checksum", "Invalid", "not listed by BIOS"] {
        assert!(!serial.contains(bad), "the console shows {bad:?}:\n{serial}");
    }
    assert!(p.shutdown().success());
}

/// The kernel's timestamps, in order of the console's lines.
fn timestamps(console: &str) -> Vec<f64> {
    console.lines().filter_map(|l| l.strip_prefix('[')?.split_once(']')?.0.trim().parse().ok()).collect()
}

#[test]
fn kernel_snapshotted_mid_boot_goes_on_in_another_process() {
    require_kvm();
    let vm = linux_vm(1);
    let mut src = VmProcess::run(&vm);
    vm.wait_serial(&mut src, "Booting paravirtualized kernel", BOOT);
    src.snapshot(&vm.path("snap"));
    assert!(src.shutdown().success());
    let before = vm.serial();
    assert!(!before.contains("Kernel command line:"), "the kernel got too far before the snapshot");

    let mut dst = VmProcess::restore(&vm, &vm.path("snap"));
    let all = vm.wait_serial(&mut dst, "Kernel command line:", BOOT);
    let after = &all[before.len()..];
    assert_eq!(all.matches("Linux version").count(), 1, "the kernel booted again:\n{after}");
    // It continued where it stopped: its clock runs on from the last line
    // printed before the snapshot.
    let (t0, t1) = (timestamps(&before), timestamps(after));
    let last = *t0.last().expect("timestamps before");
    let first = *t1.first().unwrap_or_else(|| panic!("no kernel lines after the restore:\n{after}"));
    assert!(first >= last, "restored clock went back: {first} after {last}\n{after}");
    assert!(t1.windows(2).all(|w| w[0] <= w[1]), "{after}");
    assert!(dst.shutdown().success());
}
