//! Loading a Linux kernel with the x86 64-bit boot protocol
//! (Documentation/arch/x86/boot.rst): an uncompressed ELF `vmlinux` or a
//! `bzImage`, an optional initramfs and a command line.
//!
//! The loader (`linux-loader` reads the image) fills the zero page
//! (`boot_params`: setup header, e820 map, RSDP address), writes the command
//! line and the initramfs, and builds what the 64-bit entry needs: a GDT and
//! page tables identity-mapping the first 4 GiB with 2 MiB pages. The vCPU
//! then starts in long mode at the kernel's 64-bit entry with RSI pointing at
//! the zero page ([`crate::vcpu::set_linux_entry`]).
//!
//! An ELF `vmlinux` is what makes Linux practical on this project's test
//! machines (software-emulated KVM): a `bzImage` spends minutes
//! decompressing itself there, `vmlinux` starts at once. On hardware KVM
//! both take well under a second.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMem;

/// "HdrS": a setup header follows.
const HDRS_MAGIC: u32 = 0x5372_6448;
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader id: what VMMs that are not in the registry use.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `xloadflags`: the kernel has a 64-bit entry at 0x200 past its load address.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Where a `bzImage`'s 64-bit entry sits relative to its protected-mode code.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;
/// Alignment the kernel asks for (and gets) when it is relocatable.
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// Highest address (inclusive) of the initramfs for kernels that do not say
/// (protocol < 2.03 says 0x37ffffff; every 64-bit kernel states its own).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Why a kernel could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    /// A file could not be opened or read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither an x86-64 ELF nor a usable bzImage.
    #[error("{path} is not a kernel wanmig can boot (an x86-64 ELF vmlinux or a bzImage): {reason}")]
    Image {
        /// The file.
        path: std::path::PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// The bzImage has no 64-bit entry point.
    #[error("{0} has no 64-bit entry (setup header protocol < 2.12 or XLF_KERNEL_64 unset)")]
    No64BitEntry(std::path::PathBuf),
    /// The command line does not fit.
    #[error("the kernel command line is {len} bytes; at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line has a NUL byte.
    #[error("the kernel command line contains a NUL byte")]
    CmdlineNul,
    /// The initramfs does not fit in low memory above the kernel.
    #[error("the initramfs ({size} bytes) does not fit between the kernel's end ({kernel_end:#x}) and {limit:#x}")]
    InitrdTooBig {
        /// Its size.
        size: u64,
        /// First free byte after the kernel.
        kernel_end: u64,
        /// Highest address it may reach.
        limit: u64,
    },
    /// Writing into guest memory failed.
    #[error("cannot write the boot data into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the boot vCPU needs to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// The kernel's 64-bit entry point (guest-physical).
    pub entry: u64,
    /// The zero page (`boot_params`), passed in RSI.
    pub boot_params: u64,
}

/// Loads `kernel` (and `initrd`) into `mem` for a guest with `ram`, and fills
/// the zero page. `rsdp` is the ACPI root pointer, if the VM has tables.
pub fn load(
    mem: &GuestMem,
    ram: &[(GuestAddress, u64)],
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<LinuxEntry, LinuxBootError> {
    let read_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LinuxBootError::Read { path, source }
    };
    if cmdline.len() + 1 > layout::LINUX_CMDLINE_MAX {
        return Err(LinuxBootError::CmdlineTooLong { len: cmdline.len(), max: layout::LINUX_CMDLINE_MAX - 1 });
    }
    if cmdline.contains('\0') {
        return Err(LinuxBootError::CmdlineNul);
    }

    let mut file = File::open(kernel).map_err(read_err(kernel))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let image_err =
        |e: linux_loader::loader::Error| LinuxBootError::Image { path: kernel.to_path_buf(), reason: e.to_string() };
    // ELF first: a bzImage is never an ELF file, and the ELF loader checks
    // the magic before touching memory.
    let (loaded, hdr, entry) = match Elf::load(mem, None, &mut file, himem) {
        Ok(r) => {
            let entry = r.kernel_load.0;
            (r, None, entry)
        }
        Err(linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::InvalidElfMagicNumber)) => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(image_err)?;
            let hdr = r.setup_header.ok_or_else(|| LinuxBootError::No64BitEntry(kernel.to_path_buf()))?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LinuxBootError::No64BitEntry(kernel.to_path_buf()));
            }
            let entry = r.kernel_load.0 + BZIMAGE_ENTRY64_OFFSET;
            (r, Some(hdr), entry)
        }
        Err(e) => return Err(image_err(e)),
    };

    let hdr = hdr.unwrap_or_else(|| setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: KERNEL_ALIGNMENT,
        ..Default::default()
    });
    let mut params = boot_params { hdr, ..Default::default() };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = layout::LINUX_CMDLINE as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp;
    }

    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(layout::LINUX_CMDLINE)).map_err(LinuxBootError::Write)?;

    let low_end = ram.first().map_or(0, |(s, l)| s.0 + l);
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(read_err(path))?;
        let size = data.len() as u64;
        let addr_max = match params.hdr.initrd_addr_max {
            0 => DEFAULT_INITRD_ADDR_MAX,
            m => u64::from(m),
        };
        let limit = (addr_max + 1).min(low_end);
        let kernel_end = loaded.kernel_end;
        let at = limit.checked_sub(size).map(|a| a & !(wanmig_types::PAGE_SIZE_U64 - 1)).filter(|&a| a >= kernel_end);
        let Some(at) = at else {
            return Err(LinuxBootError::InitrdTooBig { size, kernel_end, limit });
        };
        mem.write_slice(&data, GuestAddress(at)).map_err(LinuxBootError::Write)?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(ram);
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *e;
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(layout::LINUX_ZERO_PAGE)).map_err(LinuxBootError::Write)?;
    write_gdt_and_page_tables(mem)?;
    Ok(LinuxEntry { entry, boot_params: layout::LINUX_ZERO_PAGE })
}

/// The memory map the kernel is given: conventional memory, the ACPI window
/// (reserved), and every RAM region above 1 MiB.
fn e820_map(ram: &[(GuestAddress, u64)]) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(layout::ACPI_TABLES_START, layout::ACPI_TABLES_END - layout::ACPI_TABLES_START, E820_RESERVED),
    ];
    for &(start, len) in ram {
        let s = start.0.max(layout::HIMEM_START);
        if start.0 + len > s {
            map.push(entry(s, start.0 + len - s, E820_RAM));
        }
    }
    map
}

/// GDT entry: flat 4 GiB segment with `flags` (access byte and
/// granularity/size nibble as in Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16) -> u64 {
    let flags = flags as u64;
    // base 0, limit 0xfffff
    ((flags & 0xf0ff) << 40) | (0xf << 48) | 0xffff
}

/// The boot GDT: null, null, 64-bit code (selector 0x10), data (0x18) —
/// the selectors the boot protocol names.
pub const BOOT_GDT: [u64; 4] = [0, 0, gdt_entry(0xa09b), gdt_entry(0xc093)];

fn write_gdt_and_page_tables(mem: &GuestMem) -> Result<(), LinuxBootError> {
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).map_err(LinuxBootError::Write);
    for (i, e) in BOOT_GDT.iter().enumerate() {
        w(*e, layout::LINUX_GDT + 8 * i as u64)?;
    }
    // Present | writable (| page size for the 2 MiB leaves).
    const TABLE: u64 = 0x3;
    const LEAF_2M: u64 = 0x83;
    w(layout::LINUX_PDPT | TABLE, layout::LINUX_PML4)?;
    for gib in 0..4u64 {
        let pd = layout::LINUX_PD + gib * wanmig_types::PAGE_SIZE_U64;
        w(pd | TABLE, layout::LINUX_PDPT + 8 * gib)?;
        for i in 0..512u64 {
            w(((gib << 30) + (i << 21)) | LEAF_2M, pd + 8 * i)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::io::Write;

    fn ram() -> GuestRam {
        GuestRam::new(64 << 20).expect("map")
    }

    /// A minimal static ELF64 x86-64 executable: one PT_LOAD of `code` at
    /// physical `paddr`, entry at its start.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x78];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 0x40;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&(0xffff_ffff_8000_0000u64 + paddr).to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn loads_an_elf_kernel_with_initrd_and_fills_the_zero_page() {
        let r = ram();
        let kernel = file_with(&tiny_elf(0x100_0000, &[0xf4; 64]));
        let initrd = file_with(&[0xab; 10_000]);
        let e = load(r.mem(), &r.regions(), kernel.path(), Some(initrd.path()), "console=ttyS0", Some(0xe0000))
            .expect("loads");
        assert_eq!(e, LinuxEntry { entry: 0x100_0000, boot_params: layout::LINUX_ZERO_PAGE });
        let p: boot_params = r.mem().read_obj(GuestAddress(e.boot_params)).expect("read");
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_TYPE_UNDEFINED);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!({ hdr.cmdline_size }, 13);
        let mut c = [0u8; 14];
        r.mem().read_slice(&mut c, GuestAddress(u64::from(hdr.cmd_line_ptr))).expect("read");
        assert_eq!(&c, b"console=ttyS0\0");
        // The initramfs sits page-aligned at the top of RAM, intact.
        let (at, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, 10_000);
        assert_eq!(at % wanmig_types::PAGE_SIZE_U64, 0);
        assert!(at + size <= 64 << 20 && at + size + wanmig_types::PAGE_SIZE_U64 > 64 << 20);
        let mut back = vec![0u8; 10_000];
        r.mem().read_slice(&mut back, GuestAddress(at)).expect("read");
        assert!(back.iter().all(|&b| b == 0xab));
        // e820: low memory, the ACPI window reserved, RAM from 1 MiB.
        let n = usize::from(p.e820_entries);
        let map: Vec<(u64, u64, u32)> = p.e820_table[..n].iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            map,
            vec![
                (0, layout::EBDA_START, E820_RAM),
                (layout::ACPI_TABLES_START, layout::ACPI_TABLES_END - layout::ACPI_TABLES_START, E820_RESERVED),
                (layout::HIMEM_START, (64 << 20) - layout::HIMEM_START, E820_RAM),
            ]
        );
        // The kernel's code is where its program header put it.
        let b: u8 = r.mem().read_obj(GuestAddress(0x100_0000)).expect("read");
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let r = ram();
        let kernel = file_with(&tiny_elf(0x100_0000, &[0x90; 16]));
        load(r.mem(), &r.regions(), kernel.path(), None, "", None).expect("loads");
        let read = |a: u64| -> u64 { r.mem().read_obj(GuestAddress(a)).expect("read") };
        // Walk the tables for a few addresses as the MMU would.
        for va in [0u64, 0x20_0000, 0x3fff_ffff, 0xfec0_0000, 0xffff_ffff] {
            let pdpt = read(layout::LINUX_PML4) & !0xfff;
            let pd = read(pdpt + 8 * (va >> 30)) & !0xfff;
            let leaf = read(pd + 8 * ((va >> 21) & 511));
            assert_eq!(leaf & 0x83, 0x83, "{va:#x}");
            assert_eq!((leaf & !0x1f_ffff) | (va & 0x1f_ffff), va);
        }
        assert_eq!(read(layout::LINUX_GDT + 16), 0x00af_9b00_0000_ffff);
        assert_eq!(read(layout::LINUX_GDT + 24), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let r = ram();
        let regions = r.regions();
        let junk = file_with(&[0x55; 8192]);
        let e = load(r.mem(), &regions, junk.path(), None, "", None).expect_err("not a kernel");
        assert!(matches!(e, LinuxBootError::Image { .. }), "{e}");
        let e = load(r.mem(), &regions, Path::new("/nonexistent/vmlinux"), None, "", None).expect_err("missing");
        assert!(matches!(e, LinuxBootError::Read { .. }), "{e}");
        let kernel = file_with(&tiny_elf(0x100_0000, &[0x90; 16]));
        let long = "x".repeat(layout::LINUX_CMDLINE_MAX);
        assert!(matches!(
            load(r.mem(), &regions, kernel.path(), None, &long, None),
            Err(LinuxBootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(load(r.mem(), &regions, kernel.path(), None, "a\0b", None), Err(LinuxBootError::CmdlineNul)));
        let huge = file_with(&vec![1u8; 63 << 20]);
        let e = load(r.mem(), &regions, kernel.path(), Some(huge.path()), "", None).expect_err("too big");
        assert!(matches!(e, LinuxBootError::InitrdTooBig { .. }), "{e}");
    }
}
