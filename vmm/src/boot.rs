//! Loading a multiboot (v1) kernel: the built-in test guest's format.
//!
//! Only images that carry the header's address fields (flag bit 16) are
//! accepted, so the loader never parses ELF: it copies
//! `[load_addr, load_end_addr)` from the file, zeroes the bss up to
//! `bss_end_addr`, and writes the boot information (memory map and command
//! line) at [`layout::MULTIBOOT_INFO`]. Every field read from the image is
//! checked against the image and guest RAM before use.

use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMem;

const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What the loader leaves in EAX for the kernel.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;
/// The header must sit in the first 8 KiB, 4-byte aligned.
const HEADER_SEARCH: usize = 8192;
/// Images load at or above 1 MiB, clear of the boot information.
const MIN_LOAD_ADDR: u64 = 0x10_0000;

/// Why an image could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// No valid multiboot header in the first 8 KiB.
    #[error("no multiboot header with a valid checksum in the first 8 KiB of the image")]
    NoHeader,
    /// The header lacks the address fields this loader relies on.
    #[error("the multiboot header has no address fields (flag bit 16); ELF-only kernels are not supported")]
    NoAddressFields,
    /// The header's addresses are inconsistent or point outside low RAM.
    #[error("bad multiboot header: {0}")]
    BadHeader(&'static str),
    /// The command line does not fit.
    #[error("the guest command line is {len} bytes; at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the image into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

struct Header {
    offset: usize,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?).map(|s| u32::from_le_bytes(s.try_into().expect("slice of 4")))
}

fn find_header(image: &[u8]) -> Result<Header, BootError> {
    let end = image.len().min(HEADER_SEARCH);
    for offset in (0..end.saturating_sub(11)).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) =
            (read_u32(image, offset), read_u32(image, offset + 4), read_u32(image, offset + 8))
        else {
            break;
        };
        if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            continue;
        }
        if flags & FLAG_ADDRESS_FIELDS == 0 {
            return Err(BootError::NoAddressFields);
        }
        let field = |i: usize| read_u32(image, offset + 12 + 4 * i).ok_or(BootError::BadHeader("truncated"));
        return Ok(Header {
            offset,
            header_addr: field(0)?,
            load_addr: field(1)?,
            load_end_addr: field(2)?,
            bss_end_addr: field(3)?,
            entry_addr: field(4)?,
        });
    }
    Err(BootError::NoHeader)
}

/// Loads `image` into `mem` with `cmdline`, describes `ram` to the guest, and
/// returns the 32-bit entry point.
pub fn load_multiboot(
    mem: &GuestMem,
    image: &[u8],
    cmdline: &str,
    ram: &[(GuestAddress, u64)],
) -> Result<u32, BootError> {
    let h = find_header(image)?;
    let low_end = ram.first().map_or(0, |(start, len)| start.0 + len);
    let load = u64::from(h.load_addr);
    if load < MIN_LOAD_ADDR || h.header_addr < h.load_addr {
        return Err(BootError::BadHeader("load address below 1 MiB or after the header"));
    }
    let file_start = h
        .offset
        .checked_sub((h.header_addr - h.load_addr) as usize)
        .ok_or(BootError::BadHeader("load address before the start of the file"))?;
    let file_len = if h.load_end_addr == 0 {
        image.len() - file_start
    } else {
        h.load_end_addr.checked_sub(h.load_addr).ok_or(BootError::BadHeader("load end before load start"))? as usize
    };
    let text =
        image.get(file_start..file_start + file_len).ok_or(BootError::BadHeader("load range past end of file"))?;
    let load_end = load + file_len as u64;
    let bss_end = if h.bss_end_addr == 0 { load_end } else { u64::from(h.bss_end_addr) };
    if bss_end < load_end || bss_end > low_end {
        return Err(BootError::BadHeader("bss ends before the image or outside RAM"));
    }
    if !(load..load_end).contains(&u64::from(h.entry_addr)) {
        return Err(BootError::BadHeader("entry point outside the loaded image"));
    }
    if cmdline.len() + 1 > layout::CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong { len: cmdline.len(), max: layout::CMDLINE_MAX - 1 });
    }

    mem.write_slice(text, GuestAddress(load)).map_err(BootError::Write)?;
    let bss = vec![0u8; (bss_end - load_end) as usize];
    mem.write_slice(&bss, GuestAddress(load_end)).map_err(BootError::Write)?;

    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::MULTIBOOT_CMDLINE)).map_err(BootError::Write)?;

    // Memory map: conventional memory, then every region above 1 MiB.
    let mut map: Vec<(u64, u64)> = vec![(0, 0xA_0000)];
    for &(start, len) in ram {
        let s = start.0.max(MIN_LOAD_ADDR);
        if start.0 + len > s {
            map.push((s, start.0 + len - s));
        }
    }
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for (base, len) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&1u32.to_le_bytes());
    }
    mem.write_slice(&mmap, GuestAddress(layout::MULTIBOOT_MMAP)).map_err(BootError::Write)?;

    let mem_upper_kib = (low_end.min(layout::MMIO_GAP_START) - MIN_LOAD_ADDR) / 1024;
    let mut info = [0u32; 13];
    info[0] = 1 | (1 << 2) | (1 << 6); // mem_*, cmdline, mmap
    info[1] = 640;
    info[2] = u32::try_from(mem_upper_kib).expect("low RAM ends below 4 GiB");
    info[4] = layout::MULTIBOOT_CMDLINE as u32;
    info[11] = mmap.len() as u32;
    info[12] = layout::MULTIBOOT_MMAP as u32;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(layout::MULTIBOOT_INFO)).map_err(BootError::Write)?;
    Ok(h.entry_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::testguest;

    fn ram() -> GuestRam {
        GuestRam::new(32 << 20).expect("map")
    }

    #[test]
    fn loads_the_test_guest() {
        let r = ram();
        let entry = load_multiboot(r.mem(), testguest::IMAGE, "ws_mib=1", &r.regions()).expect("loads");
        assert!((0x10_0000..0x20_0000).contains(&entry));
        let mut c = [0u8; 9];
        r.mem().read_slice(&mut c, GuestAddress(layout::MULTIBOOT_CMDLINE)).expect("read");
        assert_eq!(&c, b"ws_mib=1\0");
    }

    #[test]
    fn hostile_headers_are_refused() {
        let r = ram();
        let regions = r.regions();
        let image = testguest::IMAGE;
        let off = find_header(image).expect("header").offset;
        let patch = |field: usize, value: u32| {
            let mut img = image.to_vec();
            img[off + 12 + 4 * field..off + 16 + 4 * field].copy_from_slice(&value.to_le_bytes());
            img
        };
        assert!(matches!(load_multiboot(r.mem(), &image[..64], "", &regions), Err(BootError::NoHeader)));
        assert!(matches!(load_multiboot(r.mem(), &[0u8; 100], "", &regions), Err(BootError::NoHeader)));
        for img in [patch(1, 0x1000), patch(2, 0xffff_ffff), patch(3, 0xffff_0000), patch(4, 0x10)] {
            assert!(matches!(load_multiboot(r.mem(), &img, "", &regions), Err(BootError::BadHeader(_))));
        }
        let long = "x".repeat(layout::CMDLINE_MAX);
        assert!(matches!(load_multiboot(r.mem(), image, &long, &regions), Err(BootError::CmdlineTooLong { .. })));
    }
}
