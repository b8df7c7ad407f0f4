//! The test guest is a standard multiboot kernel: QEMU boots it too, and its
//! virtio-blk writes there pass the same disk oracle. This is what lets a
//! benchmark run the very same guest under QEMU and under wanmig.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wanmig_vmm::testguest::{self, GuestStatus, PHASE_RUNNING, RESERVED_END};

#[test]
fn qemu_boots_the_test_guest_and_its_disk_passes_the_oracle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("guest.elf");
    let disk = dir.path().join("disk.img");
    std::fs::write(&kernel, testguest::IMAGE).expect("write guest");
    std::fs::File::create(&disk).expect("create").set_len(8 << 20).expect("size");
    let blocks = 256; // disk_mib=1: 256 blocks of 4 KiB
    // QEMU's microvm machine has virtio-mmio at 0xfeb00000, 512 bytes apart;
    // its transports speak virtio 1.x only with force-legacy=false.
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-accel", "tcg", "-m", "64", "-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .args([
            "-append",
            "ws_mib=2 rate_mib=4 disk_kib=256 disk_mib=1 mem_entropy=35 disk_entropy=60 pool_kib=1024 \
             mmio=0xfeb00000 mmio_stride=0x200 mmio_count=24",
        ])
        .args(["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-blk-device,drive=d0"])
        .arg("-drive")
        .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 is installed by scripts/setup.sh");
    // Let it run until its third progress line (its own clock), then stop it.
    let stdout = qemu.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut serial = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serial.contains("wanmig-testguest: t=3s") && Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            serial.push_str(&line);
            serial.push('\n');
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(serial.contains("wanmig-testguest: virtio-blk at 0x00000000feb0"), "{serial}");
    assert!(serial.contains("wanmig-testguest: t=3s"), "the guest's timer does not run: {serial}");
    assert!(!serial.contains("MISMATCH") && !serial.contains("unexpected"), "{serial}");

    // The last write the image holds tells how many were issued; the oracle
    // then demands every block be exactly what writes 0..n left, but for
    // those that may still have been in flight when QEMU was killed (it
    // completes writes asynchronously, in any order).
    let image = std::fs::read(&disk).expect("read disk");
    let writes = image
        .chunks(4096)
        .filter(|b| b[..8] == testguest::DISK_MAGIC.to_le_bytes())
        .map(|b| u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")) + 1)
        .max()
        .expect("QEMU's disk holds no guest writes");
    let status = GuestStatus {
        phase: PHASE_RUNNING,
        steps: 0,
        ws_start: RESERVED_END,
        ws_pages: 0,
        stamped_pages: 0,
        disk_done: writes.saturating_sub(testguest::DISK_QUEUE_DEPTH),
        disk_issued: writes,
        disk_blocks: blocks,
        disk_entropy: 60,
        pool_bytes: 1 << 20,
        errors: 0,
        ticks: 0,
        first_error_gpa: 0,
        disk_stride: 1,
        ..GuestStatus::default()
    };
    let held = testguest::check_disk(&image, &status).expect("disk oracle");
    assert!(held > status.disk_done && held <= writes, "{held} of {writes} writes");
    assert!(writes >= 2 * 64, "{writes} writes after 3 s of guest time at 64 blocks/s");
}
