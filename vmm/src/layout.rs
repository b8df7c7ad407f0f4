//! The guest-physical and I/O-port map every wanmig VM has.
//!
//! ```text
//! 0x0000_0000 ..  RAM (low)          up to 3 GiB
//!   0x0000_0500   Linux: boot GDT
//!   0x0000_7000   Linux: zero page (boot_params)
//!   0x0000_9000   multiboot info, command line at +0x400, memory map at +0x800
//!   0x0000_9000   Linux: page tables (PML4, PDPT, 4 PDs) up to 0xF000
//!   0x0002_0000   Linux: command line
//!   0x0009_FC00   end of conventional memory given to Linux (EBDA above)
//!   0x000A_0000   .. 1 MiB: not usable RAM (the legacy VGA/BIOS hole)
//!   0x000E_0000   ACPI tables, .. 1 MiB; the RSDP first (a BIOS-area scan finds it)
//! 0xC000_0000 ..  MMIO gap           3 GiB .. 4 GiB
//!   0xD000_0000   virtio-mmio slot i at + i * 0x1000, GSI 5 + i
//!   0xFEC0_0000   IOAPIC (in-kernel), 24 pins, GSI 0..24 = pin n
//!   0xFEE0_0000   LAPIC (in-kernel)
//! 0x1_0000_0000 ..  RAM (high)       the rest of guest RAM
//! port 0x64       i8042 command port: only its reset (0xFE) is decoded
//! port 0x3f8      8250 serial, IRQ 4
//! port 0x600      ACPI sleep control register (FADT SLEEP_CONTROL_REG)
//! port 0x601      ACPI sleep status register (FADT SLEEP_STATUS_REG)
//! port 0x602      ACPI reset register (FADT RESET_REG)
//! ```
//!
//! A Linux loader must report `ACPI_TABLES_START..ACPI_TABLES_END` as
//! reserved (not RAM) in its memory map and pass [`ACPI_RSDP`] in
//! `boot_params.acpi_rsdp_addr`.

use vm_memory::GuestAddress;

/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// End of the MMIO gap (RAM resumes here).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0xD000_0000;
/// Distance between virtio-mmio slots.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// Number of virtio-mmio slots.
pub const VIRTIO_MMIO_SLOTS: usize = 8;
/// GSI of virtio-mmio slot 0; slot i uses `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// First I/O port of the 8250 serial console.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of the serial console.
pub const SERIAL_IRQ: u32 = 4;
/// The IOAPIC's registers (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u64 = 0xFEC0_0000;
/// Pins of KVM's IOAPIC; its default routing maps GSI n to pin n.
pub const IOAPIC_PINS: u32 = 24;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xFEE0_0000;
/// Start of the window the ACPI tables live in (16-byte aligned, inside the
/// BIOS area `0xE0000..0x100000` that an OS scans for the RSDP).
pub const ACPI_TABLES_START: u64 = 0x000E_0000;
/// End of the ACPI tables window (exclusive): 1 MiB.
pub const ACPI_TABLES_END: u64 = 0x0010_0000;
/// The RSDP, first in the ACPI window.
pub const ACPI_RSDP: u64 = ACPI_TABLES_START;
/// ACPI sleep control register: a byte write of `SLP_TYP << 2 | SLP_EN`
/// with the `\_S5_` type powers the guest off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (reads 0: no wake event is ever pending).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register: a byte write of the FADT's `RESET_VALUE` resets
/// (ends) the guest.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// The i8042 keyboard controller's command port; 0xFE pulses the CPU
/// reset line (the fallback reboot of Linux and most firmware).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Where the multiboot information structure is written.
pub const MULTIBOOT_INFO: u64 = 0x9000;
/// Where the guest command line is written (at most [`CMDLINE_MAX`] bytes).
pub const MULTIBOOT_CMDLINE: u64 = 0x9400;
/// Longest command line, including its NUL.
pub const CMDLINE_MAX: usize = 0x400;
/// Where the multiboot memory map is written.
pub const MULTIBOOT_MMAP: u64 = 0x9800;
/// Linux: the boot GDT.
pub const LINUX_GDT: u64 = 0x500;
/// Linux: the zero page (`boot_params`).
pub const LINUX_ZERO_PAGE: u64 = 0x7000;
/// Linux: top of the stack the kernel is entered with.
pub const LINUX_BOOT_STACK: u64 = 0x8ff0;
/// Linux: the page-map level 4 table.
pub const LINUX_PML4: u64 = 0x9000;
/// Linux: the page-directory-pointer table.
pub const LINUX_PDPT: u64 = 0xa000;
/// Linux: four page directories mapping 0..4 GiB.
pub const LINUX_PD: u64 = 0xb000;
/// Linux: the command line.
pub const LINUX_CMDLINE: u64 = 0x2_0000;
/// Linux: longest command line, including its NUL (the x86 kernel's
/// COMMAND_LINE_SIZE).
pub const LINUX_CMDLINE_MAX: usize = 2048;
/// End of the conventional memory Linux is given (the EBDA starts here).
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of "high" memory: kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// KVM's TSS for real-mode emulation (three pages just below the BIOS area).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// The RAM regions of a guest with `bytes` of memory: `(start, length)`.
pub fn ram_regions(bytes: u64) -> Vec<(GuestAddress, u64)> {
    if bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), bytes)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), bytes - MMIO_GAP_START)]
    }
}

/// Base address of virtio-mmio slot `slot`.
pub fn virtio_mmio_addr(slot: usize) -> u64 {
    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_STRIDE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_split_around_the_gap() {
        assert_eq!(ram_regions(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        assert_eq!(ram_regions(4 << 30), vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]);
        let last = virtio_mmio_addr(VIRTIO_MMIO_SLOTS - 1) + VIRTIO_MMIO_STRIDE;
        assert!(VIRTIO_MMIO_BASE >= MMIO_GAP_START && last <= IOAPIC_ADDR);
        // The ACPI window lies in the BIOS area, below 1 MiB, clear of the
        // multiboot data, and the RSDP is 16-byte aligned.
        assert!(MULTIBOOT_MMAP < 0xA_0000 && (0xE_0000..ACPI_TABLES_END).contains(&ACPI_RSDP));
        assert_eq!((ACPI_RSDP % 16, ACPI_TABLES_END), (0, 0x10_0000));
        let power = [ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_RESET_PORT];
        assert!(power.iter().all(|p| !(SERIAL_PORT..SERIAL_PORT + 8).contains(p) && *p != I8042_COMMAND_PORT));
    }
}
