//! The ACPI tables that describe a wanmig VM to its guest.
//!
//! A stock distribution kernel (Debian's cloud kernel, for one) finds
//! virtio-mmio devices only through ACPI: its `virtio_mmio` driver binds to
//! devices with `_HID "LNRO0005"`. So every VM gets, in the window
//! [`layout::ACPI_TABLES_START`]`..`[`layout::ACPI_TABLES_END`] below 1 MiB:
//!
//! ```text
//! RSDP (rev 2, at the window's start: a scan of the BIOS area finds it)
//!  └─ XSDT ─┬─ FACP (FADT rev 6: hardware-reduced ACPI; the power device's
//!           │        sleep control/status and reset registers)
//!           │   └─ X_DSDT ─ DSDT: \_S5_ and \_SB_ { COM1, one LNRO0005 per
//!           │                     virtio-mmio device }
//!           └─ APIC (MADT: a LAPIC per vCPU, the IOAPIC)
//! ```
//!
//! [`AcpiTables::build`] is pure (tested without guest memory);
//! [`write_tables`] places its output in guest RAM and returns the RSDP's
//! address, which a Linux loader passes in `boot_params.acpi_rsdp_addr`.
//!
//! Hardware-reduced ACPI means no SCI, no PM1/GPE blocks and no FACS: power
//! off and reset go through the byte registers of [`crate::devices::power`].
//! The MADT has no interrupt source overrides: KVM's default GSI routing
//! sends ISA IRQ n to IOAPIC pin n, which is what an OS assumes without them.

mod aml;

use vm_memory::{Bytes, GuestAddress};

use crate::devices::power;
use crate::layout;
use crate::memory::GuestMem;

/// OEM id of every table.
pub const OEM_ID: [u8; 6] = *b"WANMIG";
const OEM_TABLE_ID: [u8; 8] = *b"WANMIGVM";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"WMIG";
const CREATOR_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"WANMIGVM";
/// Most vCPUs the MADT can declare: xAPIC ids are 0..=254 (255 broadcasts).
pub const MAX_VCPUS: u32 = 255;
/// Highest `_UID` of a virtio-mmio device: it names the device `Vnnn`.
pub const MAX_VIRTIO_UID: u32 = 999;
/// `_HID` of a virtio-mmio device, as Linux's `virtio_mmio` driver matches it.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

const HEADER_LEN: usize = 36;
const RSDP_LEN: usize = 36;
const FADT_LEN: usize = 276;
const MADT_LAPIC_LEN: usize = 8;
const MADT_IOAPIC_LEN: usize = 12;
/// Tables start on 16-byte boundaries.
const ALIGN: usize = 16;

/// Why tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The spec asks for something the tables cannot declare.
    #[error("cannot declare {what}: {reason}")]
    Invalid {
        /// What (vCPUs, a device, the serial port, the window).
        what: String,
        /// Why not.
        reason: String,
    },
    /// The tables do not fit their window.
    #[error("the ACPI tables need {need} bytes; the window at {base:#x} holds {window}")]
    TooLarge {
        /// Bytes needed.
        need: u64,
        /// Start of the window.
        base: u64,
        /// Its size.
        window: u64,
    },
    /// Guest memory refused the write (the window is not RAM).
    #[error("cannot write the ACPI tables at {addr:#x} into guest memory")]
    Write {
        /// Where.
        addr: u64,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> AcpiError {
    AcpiError::Invalid { what: what.into(), reason: reason.into() }
}

/// The machine the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiSpec {
    /// vCPUs: LAPIC ids (and processor UIDs) `0..vcpus`, all enabled.
    pub vcpus: u32,
    /// The IOAPIC.
    pub ioapic: IoApicSpec,
    /// The 8250 console, declared as COM1 (`PNP0501`).
    pub serial: SerialSpec,
    /// virtio-mmio devices, declared in this order.
    pub virtio: Vec<VirtioMmioSpec>,
}

/// An IOAPIC: pin n receives GSI `gsi_base + n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoApicSpec {
    /// Its id (what its ID register reads).
    pub id: u8,
    /// Its register window.
    pub addr: u32,
    /// GSI of pin 0.
    pub gsi_base: u32,
    /// Number of pins.
    pub pins: u32,
}

/// A 16550-compatible UART on I/O ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialSpec {
    /// First port.
    pub port: u16,
    /// Number of ports.
    pub ports: u8,
    /// ISA IRQ (edge, active high).
    pub irq: u8,
}

/// A virtio-mmio transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSpec {
    /// `_UID`; the slot number.
    pub uid: u32,
    /// Base of its register window.
    pub base: u64,
    /// Length of its register window.
    pub len: u32,
    /// Its interrupt (edge, active high, not shared).
    pub gsi: u32,
}

impl VirtioMmioSpec {
    /// The device in virtio-mmio slot `slot` of [`layout`].
    pub fn at_slot(slot: usize) -> Self {
        VirtioMmioSpec {
            uid: u32::try_from(slot).unwrap_or(u32::MAX),
            base: layout::virtio_mmio_addr(slot),
            len: layout::VIRTIO_MMIO_STRIDE as u32,
            gsi: layout::VIRTIO_IRQ_BASE.saturating_add(u32::try_from(slot).unwrap_or(u32::MAX)),
        }
    }
}

impl AcpiSpec {
    /// A wanmig VM: `vcpus` vCPUs, KVM's IOAPIC, the serial console, and
    /// virtio-mmio devices in `slots`.
    pub fn new(vcpus: u32, slots: impl IntoIterator<Item = usize>) -> Self {
        AcpiSpec {
            vcpus,
            // KVM's IOAPIC resets with id 0, as QEMU and Firecracker declare it.
            ioapic: IoApicSpec { id: 0, addr: layout::IOAPIC_ADDR as u32, gsi_base: 0, pins: layout::IOAPIC_PINS },
            serial: SerialSpec {
                port: layout::SERIAL_PORT,
                ports: 8,
                irq: u8::try_from(layout::SERIAL_IRQ).expect("the serial IRQ is an ISA IRQ"),
            },
            virtio: slots.into_iter().map(VirtioMmioSpec::at_slot).collect(),
        }
    }

    /// Checks that the tables can declare this machine truthfully.
    fn validate(&self) -> Result<(), AcpiError> {
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(invalid(format!("{} vCPUs", self.vcpus), format!("1 ..= {MAX_VCPUS} can be declared")));
        }
        let io = &self.ioapic;
        let gsis = io.gsi_base..io.gsi_base.saturating_add(io.pins);
        if !(1..=240).contains(&io.pins) {
            return Err(invalid("the IOAPIC", format!("{} pins; 1 ..= 240", io.pins)));
        }
        let s = &self.serial;
        if s.irq >= 16
            || !gsis.contains(&u32::from(s.irq))
            || s.ports == 0
            || s.port.checked_add(s.ports.into()).is_none()
        {
            return Err(invalid("the serial port", format!("{} ports at {:#x}, ISA IRQ {}", s.ports, s.port, s.irq)));
        }
        for (i, d) in self.virtio.iter().enumerate() {
            let what = || format!("virtio-mmio device {}", d.uid);
            let end = d.base.saturating_add(u64::from(d.len));
            if d.uid > MAX_VIRTIO_UID {
                return Err(invalid(what(), format!("_UID above {MAX_VIRTIO_UID}")));
            }
            if d.len == 0 || d.base < layout::MMIO_GAP_START || end > layout::IOAPIC_ADDR {
                return Err(invalid(
                    what(),
                    format!(
                        "window {:#x}+{:#x} is not inside {:#x}..{:#x}",
                        d.base,
                        d.len,
                        layout::MMIO_GAP_START,
                        layout::IOAPIC_ADDR
                    ),
                ));
            }
            if !gsis.contains(&d.gsi) || d.gsi == u32::from(s.irq) {
                return Err(invalid(what(), format!("GSI {} is not a free IOAPIC input ({gsis:?})", d.gsi)));
            }
            for o in &self.virtio[..i] {
                if o.uid == d.uid || o.gsi == d.gsi || (o.base < end && d.base < o.base + u64::from(o.len)) {
                    return Err(invalid(what(), format!("shares its _UID, GSI or window with device {}", o.uid)));
                }
            }
        }
        Ok(())
    }
}

/// ACPI tables laid out for a window of guest memory, RSDP first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    base: GuestAddress,
    image: Vec<u8>,
}

impl AcpiTables {
    /// Builds the tables for `spec`, to be placed at `base` (16-byte
    /// aligned) in a window of `window` bytes.
    pub fn build(spec: &AcpiSpec, base: GuestAddress, window: u64) -> Result<Self, AcpiError> {
        spec.validate()?;
        if base.0 % ALIGN as u64 != 0 || base.0.checked_add(window).is_none() {
            return Err(invalid(
                "the table window",
                format!("{:#x}+{window:#x}: not 16-byte aligned, or past the address space", base.0),
            ));
        }
        let dsdt = dsdt(spec);
        let madt = madt(spec);
        let xsdt_off = align(RSDP_LEN);
        let fadt_off = align(xsdt_off + HEADER_LEN + 2 * 8);
        let madt_off = align(fadt_off + FADT_LEN);
        let dsdt_off = align(madt_off + madt.len());
        let need = dsdt_off + dsdt.len();
        if need as u64 > window {
            return Err(AcpiError::TooLarge { need: need as u64, base: base.0, window });
        }
        let at = |off: usize| base.0 + off as u64;
        let mut image = vec![0u8; need];
        for (off, bytes) in [
            (0, &rsdp(at(xsdt_off))[..]),
            (xsdt_off, &xsdt(&[at(fadt_off), at(madt_off)])),
            (fadt_off, &fadt(at(dsdt_off))),
            (madt_off, &madt),
            (dsdt_off, &dsdt),
        ] {
            image[off..off + bytes.len()].copy_from_slice(bytes);
        }
        Ok(AcpiTables { base, image })
    }

    /// Where the RSDP is: the start of the window.
    pub fn rsdp(&self) -> GuestAddress {
        self.base
    }

    /// The window's content from its start.
    pub fn image(&self) -> &[u8] {
        &self.image
    }
}

/// Builds the tables for `spec` in the window of [`layout`] and writes them
/// to guest memory; returns the RSDP's address.
pub fn write_tables(mem: &GuestMem, spec: &AcpiSpec) -> Result<GuestAddress, AcpiError> {
    let base = GuestAddress(layout::ACPI_TABLES_START);
    let tables = AcpiTables::build(spec, base, layout::ACPI_TABLES_END - layout::ACPI_TABLES_START)?;
    mem.write_slice(tables.image(), base).map_err(|source| AcpiError::Write { addr: base.0, source })?;
    Ok(tables.rsdp())
}

fn align(off: usize) -> usize {
    off.next_multiple_of(ALIGN)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, &b| acc.wrapping_sub(b))
}

/// A table: the standard header, then `body`; length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(HEADER_LEN + body.len()).expect("tables are bounded by AcpiSpec::validate");
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&OEM_REVISION.to_le_bytes());
    t.extend_from_slice(&CREATOR_ID);
    t.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// RSDP revision 2: no RSDT, the XSDT at `xsdt`.
fn rsdp(xsdt: u64) -> [u8; RSDP_LEN] {
    let mut r = [0u8; RSDP_LEN];
    r[..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&(RSDP_LEN as u32).to_le_bytes());
    r[24..32].copy_from_slice(&xsdt.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(b"XSDT", 1, &body)
}

/// A Generic Address Structure for a one-byte I/O port.
fn io_port_gas(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    // System I/O space, 8 bits wide at bit 0, byte access.
    g[..4].copy_from_slice(&[1, 8, 0, 1]);
    g[4..].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// FADT flags (ACPI 6.5, table 5.10).
mod fadt_flags {
    /// No fixed power button (none at all).
    pub const PWR_BUTTON: u32 = 1 << 4;
    /// No fixed sleep button (none at all).
    pub const SLP_BUTTON: u32 = 1 << 5;
    /// RESET_REG is supported.
    pub const RESET_REG_SUP: u32 = 1 << 10;
    /// Hardware-reduced ACPI: no fixed hardware, no SCI.
    pub const HW_REDUCED_ACPI: u32 = 1 << 20;
}

/// IA-PC boot architecture flags (ACPI 6.5, table 5.11).
mod boot_arch {
    /// Devices on the ISA/LPC bus that need a driver exist (the UART).
    pub const LEGACY_DEVICES: u16 = 1 << 0;
    /// No VGA.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// No MSI (there is no PCI).
    pub const MSI_NOT_SUPPORTED: u16 = 1 << 3;
    /// The OS must not touch PCIe ASPM (there is no PCIe).
    pub const PCIE_ASPM_CONTROLS: u16 = 1 << 4;
    /// No CMOS RTC at ports 0x70/0x71 (kvmclock gives the time).
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// FADT revision 6 (ACPI 6.5): hardware-reduced, the DSDT at `dsdt`.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = vec![0u8; FADT_LEN - HEADER_LEN];
    let mut put = |off: usize, bytes: &[u8]| f[off - HEADER_LEN..off - HEADER_LEN + bytes.len()].copy_from_slice(bytes);
    // FIRMWARE_CTRL, DSDT (32-bit), SCI_INT, SMI_CMD and every PM block stay
    // 0: a hardware-reduced machine has none; X_DSDT replaces DSDT.
    // No 8042 flag: the i8042 exists only as its reset line.
    let arch = boot_arch::LEGACY_DEVICES
        | boot_arch::VGA_NOT_PRESENT
        | boot_arch::MSI_NOT_SUPPORTED
        | boot_arch::PCIE_ASPM_CONTROLS
        | boot_arch::CMOS_RTC_NOT_PRESENT;
    put(109, &arch.to_le_bytes());
    let flags =
        fadt_flags::HW_REDUCED_ACPI | fadt_flags::RESET_REG_SUP | fadt_flags::PWR_BUTTON | fadt_flags::SLP_BUTTON;
    put(112, &flags.to_le_bytes());
    put(116, &io_port_gas(layout::ACPI_RESET_PORT));
    put(128, &[power::RESET_VALUE]);
    put(131, &[5]); // FADT minor version: ACPI 6.5
    put(140, &dsdt.to_le_bytes());
    put(244, &io_port_gas(layout::ACPI_SLEEP_CONTROL_PORT));
    put(256, &io_port_gas(layout::ACPI_SLEEP_STATUS_PORT));
    put(268, &HYPERVISOR_VENDOR);
    sdt(b"FACP", 6, &f)
}

/// MADT: a LAPIC per vCPU, then the IOAPIC.
fn madt(spec: &AcpiSpec) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    // PCAT_COMPAT = 1: KVM's in-kernel irqchip has the two 8259s (and each
    // vCPU's LINT0 is wired to them as ExtINT), so an OS that switches to
    // the IOAPIC must mask them, which this flag tells it to do. Declaring
    // them absent would be false and could leave PIT interrupts arriving
    // through both paths.
    body.extend_from_slice(&1u32.to_le_bytes());
    for id in 0..spec.vcpus {
        let id = u8::try_from(id).expect("vCPU count validated to fit an xAPIC id");
        // Type 0, processor UID, APIC id, flags: enabled.
        body.extend_from_slice(&[0, MADT_LAPIC_LEN as u8, id, id, 1, 0, 0, 0]);
    }
    let io = &spec.ioapic;
    body.extend_from_slice(&[1, MADT_IOAPIC_LEN as u8, io.id, 0]);
    body.extend_from_slice(&io.addr.to_le_bytes());
    body.extend_from_slice(&io.gsi_base.to_le_bytes());
    sdt(b"APIC", 5, &body)
}

/// DSDT: `\_S5_` and the devices under `\_SB_`.
fn dsdt(spec: &AcpiSpec) -> Vec<u8> {
    let s = &spec.serial;
    let mut devices = aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")),
            aml::name("_UID", &aml::integer(0)),
            aml::name("_CRS", &aml::resource_template(&[&aml::io(s.port, s.ports), &aml::irq_no_flags(s.irq)])),
        ]
        .concat(),
    );
    for d in &spec.virtio {
        let base = u32::try_from(d.base).expect("validated to lie below the IOAPIC");
        devices.extend(aml::device(
            &format!("V{:03}", d.uid),
            &[
                aml::name("_HID", &aml::string(VIRTIO_MMIO_HID)),
                aml::name("_UID", &aml::integer(d.uid.into())),
                aml::name(
                    "_CRS",
                    &aml::resource_template(&[&aml::memory32_fixed_rw(base, d.len), &aml::interrupt_edge_high(d.gsi)]),
                ),
            ]
            .concat(),
        ));
    }
    // S5 is the only sleep state: an OS powers off by writing its type
    // (here as SLP_TYPa; SLP_TYPb is unused) to the sleep control register.
    let s5 = aml::name("\\_S5", &aml::package(&[aml::integer(power::S5_SLP_TYP.into()), aml::integer(0)]));
    // Revision 2: integers are 64 bits.
    sdt(b"DSDT", 2, &[s5, aml::scope("\\_SB", &devices)].concat())
}

#[cfg(test)]
mod tests {
    use super::aml::parse::{self, Obj, Resource, Value};
    use super::*;

    const BASE: u64 = layout::ACPI_TABLES_START;
    const WINDOW: u64 = layout::ACPI_TABLES_END - layout::ACPI_TABLES_START;

    fn build(spec: &AcpiSpec) -> AcpiTables {
        AcpiTables::build(spec, GuestAddress(BASE), WINDOW).expect("tables build")
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    /// The table at guest address `addr`, checked: inside the image, its
    /// signature, its length, and a checksum that sums to 0.
    fn table<'a>(t: &'a AcpiTables, addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = usize::try_from(addr - BASE).expect("offset");
        let img = t.image();
        assert_eq!(&img[off..off + 4], sig, "signature at {addr:#x}");
        let len = u32_at(img, off + 4) as usize;
        let tbl = &img[off..off + len];
        assert_eq!(tbl.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&tbl[10..16], b"WANMIG");
        tbl
    }

    /// Follows RSDP → XSDT → (FACP → DSDT, APIC) and returns (FACP, APIC, DSDT).
    fn walk(t: &AcpiTables) -> (&[u8], &[u8], &[u8]) {
        let img = t.image();
        let rsdp = &img[..RSDP_LEN];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "RSDP checksum");
        assert_eq!(rsdp.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "RSDP extended checksum");
        assert_eq!((rsdp[15], u32_at(rsdp, 20), &rsdp[9..15]), (2, 36, &b"WANMIG"[..]));
        let xsdt = table(t, u64_at(rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_LEN + 16);
        let facp = table(t, u64_at(xsdt, 36), b"FACP");
        let apic = table(t, u64_at(xsdt, 44), b"APIC");
        assert_eq!((facp.len(), facp[8]), (FADT_LEN, 6));
        assert_eq!(u32_at(facp, 40), 0, "32-bit DSDT must be 0 when X_DSDT is set");
        let dsdt = table(t, u64_at(facp, 140), b"DSDT");
        (facp, apic, dsdt)
    }

    #[test]
    fn pointers_lengths_and_checksums_hold() {
        let t = build(&AcpiSpec::new(4, 0..3));
        assert_eq!(t.rsdp(), GuestAddress(layout::ACPI_RSDP));
        let (facp, apic, _) = walk(&t);
        // Hardware-reduced, with a reset register.
        let flags = u32_at(facp, 112);
        assert!(flags & (1 << 20) != 0 && flags & (1 << 10) != 0, "{flags:#x}");
        // The power device's registers, as one-byte I/O-port GAS.
        let gas = |off: usize| (facp[off], facp[off + 1], facp[off + 3], u64_at(facp, off + 4));
        assert_eq!(gas(116), (1, 8, 1, u64::from(layout::ACPI_RESET_PORT)));
        assert_eq!(gas(244), (1, 8, 1, u64::from(layout::ACPI_SLEEP_CONTROL_PORT)));
        assert_eq!(gas(256), (1, 8, 1, u64::from(layout::ACPI_SLEEP_STATUS_PORT)));
        assert_eq!(facp[128], power::RESET_VALUE);
        // No 8042 (bit 1) in the boot flags: Linux must not probe for one.
        assert_eq!(u16::from_le_bytes([facp[109], facp[110]]) & 2, 0);
        // MADT: LAPIC base, PCAT_COMPAT, 4 enabled LAPICs, the IOAPIC.
        assert_eq!(apic.len(), HEADER_LEN + 8 + 4 * 8 + 12);
        assert_eq!((u32_at(apic, 36), u32_at(apic, 40)), (0xFEE0_0000, 1));
        for id in 0..4u8 {
            let e = &apic[44 + 8 * usize::from(id)..][..8];
            assert_eq!(e, [0, 8, id, id, 1, 0, 0, 0]);
        }
        let io = &apic[44 + 32..];
        assert_eq!((io[0], io[1], u32_at(io, 4), u32_at(io, 8)), (1, 12, 0xFEC0_0000, 0));
    }

    /// A device as the DSDT declares it: name, _HID, _UID, resources.
    type Declared = (String, Value, u64, Vec<Resource>);

    /// The devices the DSDT declares, and `\_S5_`.
    fn devices(dsdt: &[u8]) -> (Vec<Declared>, Value) {
        let objs = parse::terms(&dsdt[HEADER_LEN..]).expect("the DSDT parses");
        let [Obj::Name(s5, s5_value), Obj::Scope(sb, devs)] = &objs[..] else { panic!("{objs:?}") };
        assert_eq!((s5.as_str(), sb.as_str()), ("\\_S5_", "\\_SB_"));
        let out = devs
            .iter()
            .map(|d| {
                let Obj::Device(name, body) = d else { panic!("not a device: {d:?}") };
                let get = |n: &str| {
                    body.iter()
                        .find_map(|o| match o {
                            Obj::Name(k, v) if k == n => Some(v.clone()),
                            _ => None,
                        })
                        .unwrap_or_else(|| panic!("{name} has no {n}"))
                };
                let Value::Int(uid) = get("_UID") else { panic!("_UID") };
                let Value::Buffer(crs) = get("_CRS") else { panic!("_CRS") };
                (name.clone(), get("_HID"), uid, parse::resources(&crs).expect("_CRS parses"))
            })
            .collect();
        (out, s5_value.clone())
    }

    #[test]
    fn dsdt_declares_each_virtio_slot_and_the_console() {
        for slots in [vec![], vec![0], vec![0, 1, 2, 3, 4, 5, 6, 7], vec![1, 4]] {
            let t = build(&AcpiSpec::new(2, slots.iter().copied()));
            let (_, _, dsdt) = walk(&t);
            let (devs, s5) = devices(dsdt);
            assert_eq!(s5, Value::Package(vec![Value::Int(5), Value::Int(0)]));
            assert_eq!(
                devs[0],
                (
                    "COM1".into(),
                    Value::Int(0x0105_D041),
                    0,
                    vec![Resource::Io(0x3f8, 0x3f8, 1, 8), Resource::Irq(1 << 4)]
                )
            );
            assert_eq!(devs.len(), 1 + slots.len());
            for (d, &slot) in devs[1..].iter().zip(&slots) {
                let want = (
                    format!("V{slot:03}"),
                    Value::Str("LNRO0005".into()),
                    slot as u64,
                    vec![
                        Resource::Memory32Fixed(true, 0xD000_0000 + 0x1000 * slot as u32, 0x1000),
                        // Consumer, edge, active high, exclusive.
                        Resource::Interrupt(0b0011, vec![5 + slot as u32]),
                    ],
                );
                assert_eq!(*d, want);
            }
        }
    }

    #[test]
    fn impossible_machines_are_refused() {
        let refused = |spec: AcpiSpec| match AcpiTables::build(&spec, GuestAddress(BASE), WINDOW) {
            Err(AcpiError::Invalid { what, .. }) => what,
            other => panic!("{spec:?} gave {other:?}"),
        };
        assert!(refused(AcpiSpec::new(0, 0..1)).contains("0 vCPUs"));
        assert!(refused(AcpiSpec::new(256, 0..1)).contains("256 vCPUs"));
        // Slot 19 would need GSI 24: the IOAPIC has 24 pins.
        assert!(refused(AcpiSpec::new(1, 0..20)).contains("device 19"));
        assert!(refused(AcpiSpec::new(1, [2, 2])).contains("device 2"));
        let mut s = AcpiSpec::new(1, 0..2);
        s.virtio[1].gsi = s.virtio[0].gsi;
        assert!(refused(s).contains("device 1"));
        let mut s = AcpiSpec::new(1, 0..2);
        s.virtio[1].base = s.virtio[0].base + 0x800;
        s.virtio[1].uid = 9;
        assert!(refused(s).contains("device 9"), "overlapping windows");
        let mut s = AcpiSpec::new(1, 0..1);
        s.virtio[0].gsi = 4;
        assert!(refused(s).contains("device 0"), "the console's IRQ");
        let mut s = AcpiSpec::new(1, 0..1);
        s.virtio[0].base = 0x1000;
        assert!(refused(s).contains("device 0"), "in RAM");
        let mut s = AcpiSpec::new(1, 0..1);
        s.serial.irq = 16;
        assert!(refused(s).contains("serial"));
        assert!(matches!(
            AcpiTables::build(&AcpiSpec::new(1, 0..1), GuestAddress(BASE + 8), WINDOW),
            Err(AcpiError::Invalid { .. })
        ));
    }

    #[test]
    fn too_much_for_the_window_is_refused() {
        // The largest machine fits the real window...
        let big = AcpiSpec::new(MAX_VCPUS, 0..19);
        let need = build(&big).image().len() as u64;
        assert!(need <= WINDOW);
        // ...and errs, without writing, in one a byte too small.
        let err = AcpiTables::build(&big, GuestAddress(BASE), need - 1).expect_err("one byte short");
        assert!(matches!(err, AcpiError::TooLarge { need: n, base: BASE, window } if n == need && window == need - 1));
        // More vCPUs or devices need more room (tables are 16-byte aligned:
        // two LAPIC entries surely cross a boundary).
        let smaller = build(&AcpiSpec::new(MAX_VCPUS - 2, 0..19)).image().len() as u64;
        let fewer = build(&AcpiSpec::new(MAX_VCPUS, 0..18)).image().len() as u64;
        assert!(smaller < need && fewer < need);
    }

    #[test]
    fn write_tables_puts_them_in_guest_ram() {
        let ram = crate::memory::GuestRam::new(16 << 20).expect("map");
        let spec = AcpiSpec::new(2, 0..2);
        let rsdp = write_tables(ram.mem(), &spec).expect("write");
        assert_eq!(rsdp, GuestAddress(layout::ACPI_RSDP));
        let want = build(&spec);
        let mut got = vec![0u8; want.image().len()];
        ram.mem().read_slice(&mut got, rsdp).expect("read");
        assert_eq!(got, want.image());
    }
}

/// The tables through the ACPI reference disassembler, `iasl -d`.
#[cfg(test)]
mod iasl_tests {
    use std::path::Path;
    use std::process::Command;

    use super::*;

    /// Disassembles `bytes` as `dir/name` and returns the `.dsl` text,
    /// failing on any complaint.
    fn disassemble(dir: &Path, name: &str, bytes: &[u8]) -> String {
        let input = dir.join(name);
        std::fs::write(&input, bytes).expect("write table");
        let out = match Command::new("iasl").arg("-d").arg(&input).current_dir(dir).output() {
            Ok(out) => out,
            Err(e) => panic!("cannot run iasl ({e}): install acpica-tools (scripts/setup.sh does)"),
        };
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "iasl -d {name} failed: {log}");
        let dsl = std::fs::read_to_string(input.with_extension("dsl")).expect("iasl wrote a .dsl");
        for text in [&log, &dsl] {
            for line in text.lines() {
                let l = line.to_ascii_lowercase();
                assert!(
                    !(l.contains("error") || l.contains("warning") || l.contains("incorrect") || l.contains("invalid")),
                    "iasl complains about {name}: {line}\n{log}\n{dsl}"
                );
            }
        }
        dsl
    }

    #[test]
    fn iasl_disassembles_every_table_cleanly() {
        // One disk and one NIC-like device in the next slot, six vCPUs.
        let spec = AcpiSpec::new(6, 0..2);
        let t = AcpiTables::build(&spec, GuestAddress(layout::ACPI_TABLES_START), 0x2_0000).expect("build");
        let dir = tempfile::tempdir().expect("tempdir");
        let img = t.image();
        let at = |addr: u64| {
            let off = (addr - layout::ACPI_TABLES_START) as usize;
            let len = u32::from_le_bytes(img[off + 4..off + 8].try_into().expect("4")) as usize;
            &img[off..off + len]
        };
        let ptr = |b: &[u8], off: usize| u64::from_le_bytes(b[off..off + 8].try_into().expect("8"));
        let xsdt = at(ptr(img, 24));
        let facp = at(ptr(xsdt, 36));
        let apic = at(ptr(xsdt, 44));
        let dsdt = at(ptr(facp, 140));

        // Not the RSDP: iasl -d reads bytes 4..8 of a binary as a table
        // length, which in an RSDP are "PTR " (the unit tests check it).
        disassemble(dir.path(), "xsdt.dat", xsdt);
        let fadt = disassemble(dir.path(), "facp.dat", facp);
        // iasl's decoding of the FADT, line by line after each register's name.
        let after = |name: &str, skip: usize| -> String {
            let at = fadt.find(name).unwrap_or_else(|| panic!("no `{name}` in:\n{fadt}"));
            let line = fadt[at..].lines().nth(skip).unwrap_or("");
            line.rsplit(" : ").next().unwrap_or("").trim().to_string()
        };
        for (name, want) in [
            ("Hardware Reduced (V5)", "1"),
            ("Reset Register Supported (V2)", "1"),
            ("8042 Present on ports 60/64 (V2)", "0"),
            ("Value to cause reset", "01"),
        ] {
            assert_eq!(after(name, 0), want, "{name}");
        }
        for (name, port) in [
            ("Reset Register :", layout::ACPI_RESET_PORT),
            ("Sleep Control Register :", layout::ACPI_SLEEP_CONTROL_PORT),
            ("Sleep Status Register :", layout::ACPI_SLEEP_STATUS_PORT),
        ] {
            assert_eq!(after(name, 1), "01 [SystemIO]", "{name} space");
            assert_eq!(after(name, 2), "08", "{name} width");
            assert_eq!(after(name, 5), format!("{port:016X}"), "{name} address");
        }
        let madt = disassemble(dir.path(), "apic.dat", apic);
        assert_eq!(madt.matches("Processor Local APIC").count(), 6, "{madt}");
        assert_eq!(madt.matches("I/O APIC").count(), 1, "{madt}");
        assert!(!madt.contains("Interrupt Source Override"), "{madt}");
        let dsl = disassemble(dir.path(), "dsdt.aml", dsdt);
        assert!(dsl.contains("Name (_S5, Package (0x02)") || dsl.contains("Name (\\_S5, Package (0x02)"), "{dsl}");
        assert!(dsl.contains("EisaId (\"PNP0501\")"), "{dsl}");
        for d in &spec.virtio {
            let name = format!("Device (V{:03})", d.uid);
            let at = dsl.find(&name).unwrap_or_else(|| panic!("no {name}: {dsl}"));
            let body = &dsl[at..];
            let body = &body[..body[1..].find("Device (").map_or(body.len(), |e| e + 1)];
            for want in [
                "Name (_HID, \"LNRO0005\")".to_string(),
                format!("0x{:08X},         // Address Base", d.base),
                "0x00001000,         // Address Length".to_string(),
                "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )".to_string(),
                format!("0x{:08X},", d.gsi),
            ] {
                assert!(body.contains(&want), "{name} lacks `{want}`:\n{body}");
            }
        }
    }
}
