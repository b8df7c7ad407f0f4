//! The built-in test guest and the oracle that checks it.
//!
//! The guest (C and assembly in `vmm/testguest/`, built by `build.rs`) is a
//! multiboot kernel: wanmig, QEMU (`-kernel`) and GRUB can all boot it.
//! `wanmig testguest --write FILE` saves it. It stamps every page of RAM from
//! 2 MiB up with a pattern, walks a working set incrementing a generation
//! counter, writes generation-stamped blocks to its first virtio-blk disk,
//! answers ARP, ICMP echo and a UDP sequence service ([`UDP_SEQ_PORT`]) on
//! its first virtio-net NIC, and keeps its own status page at
//! [`STATUS_GPA`]. Asked to (`poweroff_after_s`, `reset_after_s`), it finds
//! the ACPI tables the way an OS does and powers off or resets through the
//! registers they declare. `vmm/testguest/abi.h` is the contract; the
//! constants here mirror it.
//!
//! After any save/restore or migration the oracle ([`check_memory`],
//! [`check_disk`]) holds the guest to:
//! - every page outside the working set still holds its pattern;
//! - the working set holds N and N−1 with one transition edge, and its
//!   counters add up to the step count the guest recorded (or one more);
//! - the guest's own check of every page it touched found no error;
//! - the disk holds exactly the writes the guest completed (or one more,
//!   if it was paused between the device finishing a write and the guest
//!   counting it), and nothing else.

use std::fmt::Write as _;

use vm_memory::{Bytes, GuestAddress};

use crate::config::{NetConfig, TestGuestConfig};
use crate::memory::GuestMem;

/// The guest image (a multiboot ELF).
pub static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/testguest.elf"));

/// RAM below this is the guest's own (image, page tables, boot info).
pub const RESERVED_END: u64 = 0x20_0000;
/// Guest-physical address of the status page.
pub const STATUS_GPA: u64 = 0x10_1000;
/// Word 0 of every page is `PAGE_MAGIC ^ gpa`.
pub const PAGE_MAGIC: u64 = 0x574d_4750_4147_4530;
/// Word 0 of every written disk block.
pub const DISK_MAGIC: u64 = 0x574d_4744_4953_4b30;
/// Word 0 of the status page.
pub const STATUS_MAGIC: u64 = 0x574d_4753_5441_5431;
/// Stride of scattered disk writes (`disk_scatter`).
pub const DISK_SCATTER_STRIDE: u64 = 40503;
/// Phase: stamping done, working set and disk writer running.
pub const PHASE_RUNNING: u64 = 2;
/// UDP port of the guest's sequence service: each reply is the next value
/// of a counter in the status page (8 bytes, big-endian, starting at 1)
/// followed by the request's payload, truncated to [`UDP_SEQ_MAX_ECHO`].
pub const UDP_SEQ_PORT: u16 = 7;
/// Most payload bytes the sequence service echoes.
pub const UDP_SEQ_MAX_ECHO: usize = 1024;
const PAGE: u64 = 4096;
const BLOCK: usize = 4096;

/// The guest's command line for `cfg`; the guest drives the first NIC of
/// `nets` if it has an address.
pub fn cmdline(cfg: &TestGuestConfig, nets: &[NetConfig]) -> String {
    let mut s = format!("ws_mib={} disk_kib={} disk_mib={}", cfg.ws_mib, cfg.disk_kib, cfg.disk_mib);
    if cfg.disk_scatter {
        s.push_str(" disk_scatter=1");
    }
    if cfg.flat_out {
        s.push_str(" rate_mib=max");
    } else {
        let _ = write!(s, " rate_mib={}", cfg.rate_mib);
    }
    if let Some(net) = nets.first()
        && let Some(ip) = net.ip
    {
        let _ = write!(s, " net_ip={} net_mac={}", ip.addr, net.mac);
    }
    if let Some(n) = cfg.poweroff_after_s {
        let _ = write!(s, " poweroff_after_s={n}");
    }
    if let Some(n) = cfg.reset_after_s {
        let _ = write!(s, " reset_after_s={n}");
    }
    s
}

/// The guest's status page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GuestStatus {
    /// 0 booting, 1 stamping, 2 running.
    pub phase: u64,
    /// Working-set steps taken (one page incremented per step).
    pub steps: u64,
    /// First page of the working set.
    pub ws_start: u64,
    /// Pages in the working set.
    pub ws_pages: u64,
    /// Pages stamped at boot.
    pub stamped_pages: u64,
    /// Disk writes completed.
    pub disk_done: u64,
    /// Blocks in the disk region written cyclically.
    pub disk_blocks: u64,
    /// Mismatches the guest found itself.
    pub errors: u64,
    /// 10 ms timer ticks seen.
    pub ticks: u64,
    /// Address of the first mismatch.
    pub first_error_gpa: u64,
    /// Write `seq` goes to block `seq * disk_stride % disk_blocks`.
    pub disk_stride: u64,
    /// virtio-mmio base of the NIC the guest drives; 0: none.
    pub net_base: u64,
    /// Frames the guest received.
    pub net_rx: u64,
    /// Frames the guest sent.
    pub net_tx: u64,
    /// Frames received and not answered (not for it, or malformed).
    pub net_dropped: u64,
    /// Replies of the UDP sequence service so far (the last one carried it).
    pub udp_seq: u64,
}

/// What the oracle found wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OracleError {
    /// No status page: the guest did not start, or this is not the test guest.
    #[error("no test-guest status page at {STATUS_GPA:#x} (magic {0:#x})")]
    NoStatus(u64),
    /// The guest has not finished stamping its memory.
    #[error("the test guest is not running yet (phase {0})")]
    NotRunning(u64),
    /// The status page describes a working set outside RAM.
    #[error("status page describes a working set outside RAM ({start:#x}, {pages} pages)")]
    BadWorkingSet {
        /// Its start.
        start: u64,
        /// Its length.
        pages: u64,
    },
    /// A page lost its pattern.
    #[error("page {gpa:#x}: word {word} is {found:#x}, expected {expected:#x}")]
    Page {
        /// The page.
        gpa: u64,
        /// Which word.
        word: u8,
        /// What it holds.
        found: u64,
        /// What it should hold.
        expected: u64,
    },
    /// The working set has more than one edge or a jump of more than one.
    #[error("working set is not N/N-1 with one edge: page {gpa:#x} holds {found} after {previous}")]
    Edge {
        /// The page.
        gpa: u64,
        /// Its counter.
        found: u64,
        /// The counter of the page before it.
        previous: u64,
    },
    /// The counters do not add up to the guest's step count.
    #[error("working-set counters add up to {sum}, the guest counted {steps} steps")]
    Steps {
        /// Sum of counters.
        sum: u64,
        /// The guest's count.
        steps: u64,
    },
    /// The guest itself saw a page that was not what it last wrote.
    #[error("the guest found {errors} mismatched pages, the first at {first:#x}")]
    GuestErrors {
        /// How many.
        errors: u64,
        /// The first.
        first: u64,
    },
    /// The disk image is not what the guest wrote.
    #[error("disk block {block} is not what writes 0..{done} (or 0..={done}) left there")]
    Disk {
        /// First block that differs.
        block: u64,
        /// Writes the guest completed.
        done: u64,
    },
    /// The disk image is smaller than the region the guest writes.
    #[error("disk image is {len} bytes, the guest writes {need}")]
    DiskTooSmall {
        /// Image size.
        len: u64,
        /// Bytes the guest writes.
        need: u64,
    },
}

/// Reads the status page from guest memory.
pub fn read_status(mem: &GuestMem) -> Result<GuestStatus, OracleError> {
    let mut w = [0u64; 17];
    for (i, word) in w.iter_mut().enumerate() {
        *word = mem.read_obj(GuestAddress(STATUS_GPA + 8 * i as u64)).map_err(|_| OracleError::NoStatus(0))?;
    }
    if w[0] != STATUS_MAGIC {
        return Err(OracleError::NoStatus(w[0]));
    }
    Ok(GuestStatus {
        phase: w[1],
        steps: w[2],
        ws_start: w[3],
        ws_pages: w[4],
        stamped_pages: w[5],
        disk_done: w[6],
        disk_blocks: w[7],
        errors: w[8],
        ticks: w[9],
        first_error_gpa: w[10],
        disk_stride: w[11],
        net_base: w[12],
        net_rx: w[13],
        net_tx: w[14],
        net_dropped: w[15],
        udp_seq: w[16],
    })
}

/// What a passing memory check saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    /// The guest's status page.
    pub status: GuestStatus,
    /// Highest generation in the working set.
    pub generation: u64,
    /// Pages checked.
    pub pages_checked: u64,
}

/// Checks every RAM page of a paused (or restored, not yet resumed) test guest.
pub fn check_memory(mem: &GuestMem, regions: &[(GuestAddress, u64)]) -> Result<MemoryReport, OracleError> {
    let status = read_status(mem)?;
    if status.phase != PHASE_RUNNING {
        return Err(OracleError::NotRunning(status.phase));
    }
    let ws = status.ws_start..status.ws_start.saturating_add(status.ws_pages.saturating_mul(PAGE));
    let ws_inside_ram = regions.iter().any(|(s, l)| s.0 <= ws.start && ws.end <= s.0 + l);
    if status.ws_start != RESERVED_END || !ws_inside_ram {
        return Err(OracleError::BadWorkingSet { start: status.ws_start, pages: status.ws_pages });
    }
    if status.errors != 0 {
        return Err(OracleError::GuestErrors { errors: status.errors, first: status.first_error_gpa });
    }
    let mut pages_checked = 0;
    let (mut sum, mut first, mut previous, mut generation) = (0u64, None::<u64>, 0u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    for &(start, len) in regions {
        let mut at = start.0.max(RESERVED_END);
        let end = start.0 + len;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(at)).map_err(|_| OracleError::NoStatus(0))?;
            for (i, page) in buf[..n].chunks_exact(PAGE as usize).enumerate() {
                let gpa = at + i as u64 * PAGE;
                let w0 = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
                let w1 = u64::from_le_bytes(page[8..16].try_into().expect("8 bytes"));
                if w0 != PAGE_MAGIC ^ gpa {
                    return Err(OracleError::Page { gpa, word: 0, found: w0, expected: PAGE_MAGIC ^ gpa });
                }
                if ws.contains(&gpa) {
                    // Non-increasing along the working set, one step at most.
                    match first {
                        None => {
                            first = Some(w1);
                            generation = w1;
                        }
                        Some(f) if w1 == previous || (w1 + 1 == previous && w1 + 1 == f) => {}
                        Some(_) => return Err(OracleError::Edge { gpa, found: w1, previous }),
                    }
                    previous = w1;
                    sum += w1;
                } else if w1 != 0 {
                    return Err(OracleError::Page { gpa, word: 1, found: w1, expected: 0 });
                }
                pages_checked += 1;
            }
            at += n as u64;
        }
    }
    if sum != status.steps && sum != status.steps + 1 {
        return Err(OracleError::Steps { sum, steps: status.steps });
    }
    Ok(MemoryReport { status, generation, pages_checked })
}

/// The block written by write `seq`.
pub fn block_of(seq: u64, blocks: u64, stride: u64) -> u64 {
    (u128::from(seq) * u128::from(stride) % u128::from(blocks)) as u64
}

/// `a`⁻¹ mod `n`, if `a` and `n` are coprime.
fn inverse_mod(a: u64, n: u64) -> Option<u64> {
    let (mut r0, mut r1) = (i128::from(n), i128::from(a));
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    (r0 == 1).then(|| t0.rem_euclid(i128::from(n)) as u64)
}

/// The 4 KiB block that write number `seq` leaves at block `seq % blocks`.
pub fn disk_block(seq: u64, blocks: u64, stride: u64) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    for (i, w) in b.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => DISK_MAGIC,
            1 => seq,
            2 => block_of(seq, blocks, stride),
            _ => DISK_MAGIC ^ (seq << 16) ^ i as u64,
        };
        w.copy_from_slice(&v.to_le_bytes());
    }
    b
}

/// Checks a disk image against the guest's status: it must hold exactly
/// writes `0..done` or `0..=done`, and zeros everywhere else.
/// Returns the number of writes it holds.
pub fn check_disk(image: &[u8], status: &GuestStatus) -> Result<u64, OracleError> {
    let n = status.disk_blocks;
    if n == 0 {
        // The guest writes no disk.
        return Ok(status.disk_done);
    }
    let stride = status.disk_stride.max(1);
    // Block b is written by the writes seq = first(b) (mod n).
    let inverse = inverse_mod(stride % n.max(1), n).ok_or(OracleError::Disk { block: 0, done: status.disk_done })?;
    let first = |block: u64| (u128::from(block) * u128::from(inverse) % u128::from(n)) as u64;
    let need = n * BLOCK as u64;
    if (image.len() as u64) < need {
        return Err(OracleError::DiskTooSmall { len: image.len() as u64, need });
    }
    let expect = |writes: u64, block: u64| -> Option<[u8; BLOCK]> {
        // The last write to `block` among 0..writes.
        let k = first(block);
        (writes > k).then(|| disk_block(k + (writes - 1 - k) / n * n, n, stride))
    };
    let matches = |writes: u64| -> Result<(), u64> {
        // Past the region, the image is not the guest's to check.
        for (block, data) in image.chunks(BLOCK).take(n as usize).enumerate() {
            let block = block as u64;
            let ok = match expect(writes, block) {
                Some(e) => data == e.as_slice(),
                None => data.iter().all(|&b| b == 0),
            };
            if !ok {
                return Err(block);
            }
        }
        Ok(())
    };
    let done = status.disk_done;
    match matches(done) {
        Ok(()) => Ok(done),
        Err(block) => matches(done + 1).map(|()| done + 1).map_err(|_| OracleError::Disk { block, done }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_matches_the_abi() {
        // The status page lives where the linker script puts it, and the
        // multiboot header is in the first 8 KiB.
        assert!(IMAGE.len() > 4096);
        let h = IMAGE.windows(4).take(8192).position(|w| w == 0x1BAD_B002u32.to_le_bytes());
        assert!(h.is_some());
        let abi = include_str!("../testguest/abi.h");
        for (name, value) in [
            ("RESERVED_END", RESERVED_END),
            ("STATUS_GPA", STATUS_GPA),
            ("PAGE_MAGIC", PAGE_MAGIC),
            ("DISK_MAGIC", DISK_MAGIC),
            ("STATUS_MAGIC", STATUS_MAGIC),
            ("PHASE_RUNNING", PHASE_RUNNING),
            ("UDP_SEQ_PORT", u64::from(UDP_SEQ_PORT)),
            ("UDP_SEQ_MAX_ECHO", UDP_SEQ_MAX_ECHO as u64),
        ] {
            let line = abi.lines().find(|l| l.starts_with(&format!("#define {name} "))).expect(name);
            let text = line.split_whitespace().nth(2).expect("value").trim_end_matches("ull");
            let parsed =
                if let Some(hex) = text.strip_prefix("0x") { u64::from_str_radix(hex, 16) } else { text.parse() };
            assert_eq!(parsed, Ok(value), "{name}");
        }
    }

    #[test]
    fn cmdline_carries_every_option() {
        let mut cfg = TestGuestConfig {
            ws_mib: 4,
            rate_mib: 2,
            flat_out: false,
            disk_kib: 8,
            disk_mib: 1,
            disk_scatter: true,
            poweroff_after_s: Some(3),
            reset_after_s: None,
        };
        assert_eq!(cmdline(&cfg, &[]), "ws_mib=4 disk_kib=8 disk_mib=1 disk_scatter=1 rate_mib=2 poweroff_after_s=3");
        (cfg.flat_out, cfg.poweroff_after_s, cfg.reset_after_s) = (true, None, Some(7));
        assert!(cmdline(&cfg, &[]).ends_with(" rate_mib=max reset_after_s=7"));
        // The guest parses each key it is given.
        let guest = include_str!("../testguest/guest.c");
        for key in cmdline(&cfg, &[]).split(' ').chain(["poweroff_after_s=1"]).filter_map(|kv| kv.split('=').next()) {
            assert!(guest.contains(&format!("streq_prefix(s, \"{key}\", &v)")), "the guest ignores {key}");
        }
    }

    fn status(done: u64, blocks: u64) -> GuestStatus {
        GuestStatus {
            phase: PHASE_RUNNING,
            steps: 0,
            ws_start: RESERVED_END,
            ws_pages: 0,
            stamped_pages: 0,
            disk_done: done,
            disk_blocks: blocks,
            errors: 0,
            ticks: 0,
            first_error_gpa: 0,
            disk_stride: 1,
            ..GuestStatus::default()
        }
    }

    fn written(writes: u64, blocks: u64, len: usize) -> Vec<u8> {
        written_with(writes, blocks, 1, len)
    }

    fn written_with(writes: u64, blocks: u64, stride: u64, len: usize) -> Vec<u8> {
        let mut img = vec![0u8; len];
        for seq in 0..writes {
            let b = block_of(seq, blocks, stride) as usize;
            img[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&disk_block(seq, blocks, stride));
        }
        img
    }

    #[test]
    fn scattered_writes_check_like_ordered_ones() {
        let (blocks, stride) = (256, DISK_SCATTER_STRIDE);
        for writes in [0, 1, 100, 255, 256, 700] {
            let img = written_with(writes, blocks, stride, blocks as usize * BLOCK);
            let s = GuestStatus { disk_stride: stride, ..status(writes, blocks) };
            assert_eq!(check_disk(&img, &s), Ok(writes), "{writes} writes");
            if writes > 3 {
                // Read as ordered writes, the same image is wrong.
                assert!(check_disk(&img, &status(writes, blocks)).is_err());
            }
        }
        assert_eq!(inverse_mod(3, 7), Some(5));
        assert_eq!(inverse_mod(4, 8), None);
    }

    #[test]
    fn disk_oracle_accepts_exact_and_one_more() {
        let img = written(11, 4, 8 * BLOCK);
        assert_eq!(check_disk(&img, &status(11, 4)), Ok(11));
        assert_eq!(check_disk(&img, &status(10, 4)), Ok(11));
        assert!(matches!(check_disk(&img, &status(9, 4)), Err(OracleError::Disk { .. })));
        assert!(matches!(check_disk(&img, &status(12, 4)), Err(OracleError::Disk { .. })));
        let mut stray = written(3, 4, 8 * BLOCK);
        stray[3 * BLOCK + 5] = 1;
        assert!(matches!(check_disk(&stray, &status(3, 4)), Err(OracleError::Disk { block: 3, .. })));
        // Past the region, the image is not the guest's.
        let mut other = img.clone();
        other[6 * BLOCK + 5] = 1;
        assert_eq!(check_disk(&other, &status(11, 4)), Ok(11));
        assert!(matches!(check_disk(&img[..BLOCK], &status(11, 4)), Err(OracleError::DiskTooSmall { .. })));
        assert_eq!(check_disk(&img, &status(0, 0)), Ok(0), "no disk writer, nothing to check");
    }
}

#[cfg(test)]
mod memory_oracle_tests {
    use super::*;
    use crate::memory::GuestRam;

    /// A fake guest: 16 MiB stamped, an 8-page working set after 12 steps
    /// (pages 0..4 at generation 2, pages 4..8 at 1).
    fn guest() -> GuestRam {
        let ram = GuestRam::new(16 << 20).expect("map");
        let mem = ram.mem();
        for gpa in (RESERVED_END..16 << 20).step_by(PAGE as usize) {
            mem.write_obj(PAGE_MAGIC ^ gpa, GuestAddress(gpa)).expect("write");
        }
        for i in 0..8u64 {
            mem.write_obj(if i < 4 { 2u64 } else { 1 }, GuestAddress(RESERVED_END + i * PAGE + 8)).expect("write");
        }
        let status = [STATUS_MAGIC, PHASE_RUNNING, 12, RESERVED_END, 8, 3584, 0, 0, 0, 0, 0];
        for (i, w) in status.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(STATUS_GPA + 8 * i as u64)).expect("write");
        }
        ram
    }

    fn check(ram: &GuestRam) -> Result<MemoryReport, OracleError> {
        check_memory(ram.mem(), &ram.regions())
    }

    fn poke(ram: &GuestRam, gpa: u64, v: u64) {
        ram.mem().write_obj(v, GuestAddress(gpa)).expect("write");
    }

    #[test]
    fn accepts_a_consistent_guest() {
        let r = check(&guest()).expect("consistent");
        assert_eq!((r.generation, r.pages_checked), (2, (16 << 20) / PAGE - RESERVED_END / PAGE));
        // One step further (page written, step not yet counted) also passes.
        let g = guest();
        poke(&g, RESERVED_END + 4 * PAGE + 8, 2);
        assert!(check(&g).is_ok());
    }

    #[test]
    fn catches_every_kind_of_damage() {
        let g = guest();
        poke(&g, 0x80_0000, 0);
        assert!(matches!(check(&g), Err(OracleError::Page { gpa: 0x80_0000, word: 0, .. })));
        let g = guest();
        poke(&g, 0x80_0008, 5);
        assert!(matches!(check(&g), Err(OracleError::Page { word: 1, .. })));
        let g = guest(); // a stale page behind the edge: two edges
        poke(&g, RESERVED_END + 2 * PAGE + 8, 1);
        assert!(matches!(check(&g), Err(OracleError::Edge { .. })));
        let g = guest(); // a page two generations behind
        poke(&g, RESERVED_END + 7 * PAGE + 8, 0);
        assert!(matches!(check(&g), Err(OracleError::Edge { .. })));
        let g = guest(); // the counters disagree with the guest's step count
        poke(&g, STATUS_GPA + 16, 20);
        assert!(matches!(check(&g), Err(OracleError::Steps { sum: 12, steps: 20 })));
        let g = guest();
        poke(&g, STATUS_GPA + 64, 1);
        assert!(matches!(check(&g), Err(OracleError::GuestErrors { errors: 1, .. })));
        let g = guest();
        poke(&g, STATUS_GPA, 0);
        assert!(matches!(check(&g), Err(OracleError::NoStatus(0))));
        let g = guest();
        poke(&g, STATUS_GPA + 32, 1 << 40);
        assert!(matches!(check(&g), Err(OracleError::BadWorkingSet { .. })));
    }
}
