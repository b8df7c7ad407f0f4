//! Builds the built-in test guest (vmm/testguest) with the system's gcc and
//! binutils into a multiboot ELF that `testguest::IMAGE` embeds.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is gcc installed?)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let src = Path::new("testguest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for f in ["boot.S", "guest.c", "abi.h", "guest.ld"] {
        println!("cargo::rerun-if-changed=testguest/{f}");
    }
    let cflags = [
        "-m64",
        "-O2",
        "-ffreestanding",
        "-fno-pic",
        "-fno-pie",
        "-fno-stack-protector",
        "-mgeneral-regs-only",
        "-mno-red-zone",
        "-fno-asynchronous-unwind-tables",
        "-fno-tree-loop-distribute-patterns",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-nostdlib",
    ];
    for (input, obj) in [("boot.S", "boot.o"), ("guest.c", "guest.o")] {
        run(Command::new("gcc").args(cflags).arg("-c").arg(src.join(input)).arg("-o").arg(out.join(obj)));
    }
    let elf64 = out.join("testguest64.elf");
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-nostdlib", "-static", "-no-pie", "-z", "noexecstack"])
        .args(["-z", "max-page-size=4096", "--no-warn-rwx-segments", "-T"])
        .arg(src.join("guest.ld"))
        .arg(out.join("boot.o"))
        .arg(out.join("guest.o"))
        .arg("-o")
        .arg(&elf64));
    // QEMU's multiboot loader refuses ELF64 files; the code is position-fixed
    // and the header carries load addresses, so the ELF class is only a label.
    run(Command::new("objcopy").args(["-O", "elf32-i386"]).arg(&elf64).arg(out.join("testguest.elf")));
}
