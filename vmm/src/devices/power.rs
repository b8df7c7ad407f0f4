//! The power device: how a guest turns itself off or resets.
//!
//! Three byte-wide I/O registers, declared to the guest in the FADT (see
//! [`crate::acpi`]), and the i8042's reset line:
//!
//! | port | register | a write of | means |
//! |---|---|---|---|
//! | [`layout::ACPI_SLEEP_CONTROL_PORT`] | ACPI sleep control | `S5_SLP_TYP << 2 \| SLP_EN` | power off |
//! | [`layout::ACPI_SLEEP_STATUS_PORT`] | ACPI sleep status | anything | nothing (reads 0) |
//! | [`layout::ACPI_RESET_PORT`] | ACPI reset | [`RESET_VALUE`] | reset |
//! | [`layout::I8042_COMMAND_PORT`] | i8042 command | `0xFE` | reset |
//!
//! The device has no state, so it has nothing to save or migrate. wanmig
//! does not reboot guests: a reset ends the VM like a power-off does, and
//! the vCPU that wrote the register reports it as a guest stop.

use crate::layout;

/// The sleep type of S5 (soft off), as the DSDT's `\_S5_` package declares
/// it; an OS writes it to the SLP_TYP field of the sleep control register.
pub const S5_SLP_TYP: u8 = 5;
/// Bit position of SLP_TYP in the sleep control register (ACPI 6.5, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
/// Mask of SLP_TYP in the sleep control register.
const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
/// SLP_EN: start the transition to the sleep state in SLP_TYP.
const SLP_EN: u8 = 1 << 5;
/// What an OS writes to the reset register (the FADT's `RESET_VALUE`).
pub const RESET_VALUE: u8 = 0x01;
/// The i8042 command that pulses the CPU reset line.
const I8042_RESET: u8 = 0xFE;

/// What a write to the power device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// Enter S5: the guest is off.
    PowerOff,
    /// Reset the machine.
    Reset,
}

/// The byte an OS writes to the sleep control register to power off.
pub const fn power_off_command() -> u8 {
    (S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN
}

/// Whether `port` belongs to the power device.
pub fn claims(port: u16) -> bool {
    matches!(
        port,
        layout::ACPI_SLEEP_CONTROL_PORT
            | layout::ACPI_SLEEP_STATUS_PORT
            | layout::ACPI_RESET_PORT
            | layout::I8042_COMMAND_PORT
    )
}

/// A guest `out` to `port` (one the device [`claims`]). Only byte writes are
/// decoded, as the FADT declares the registers 8 bits wide; anything else,
/// and any value that asks for nothing this device does (another sleep
/// state, another i8042 command), is ignored.
pub fn write(port: u16, data: &[u8]) -> Option<PowerEvent> {
    let &[value] = data else { return None };
    match port {
        layout::ACPI_SLEEP_CONTROL_PORT
            if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP =>
        {
            Some(PowerEvent::PowerOff)
        }
        layout::ACPI_RESET_PORT if value == RESET_VALUE => Some(PowerEvent::Reset),
        layout::I8042_COMMAND_PORT if value == I8042_RESET => Some(PowerEvent::Reset),
        _ => None,
    }
}

/// A guest `in` from `port` (one the device [`claims`]). The ACPI registers
/// read as 0 (no wake event pending); the i8042 is otherwise absent and its
/// port reads as all ones, like any port with no device.
pub fn read(port: u16, data: &mut [u8]) {
    data.fill(if port == layout::I8042_COMMAND_PORT { 0xff } else { 0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_declared_writes_stop_the_guest() {
        use layout::{ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, I8042_COMMAND_PORT};
        // What Linux's acpi_hw_extended_sleep writes for \_S5_ = {5, 0}.
        assert_eq!(power_off_command(), 0x34);
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[0x34]), Some(PowerEvent::PowerOff));
        // Reserved bits do not matter; SLP_EN and the type do.
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[0x34 | 0xc3]), Some(PowerEvent::PowerOff));
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[0x14]), None, "SLP_EN clear");
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[(3 << 2) | 0x20]), None, "S3 is not declared");
        assert_eq!(write(ACPI_SLEEP_CONTROL_PORT, &[0x34, 0]), None, "not a byte access");
        // Linux clears the wake status before it sleeps: harmless.
        assert_eq!(write(ACPI_SLEEP_STATUS_PORT, &[0x80]), None);
        assert_eq!(write(ACPI_RESET_PORT, &[RESET_VALUE]), Some(PowerEvent::Reset));
        assert_eq!(write(ACPI_RESET_PORT, &[RESET_VALUE ^ 0xff]), None);
        assert_eq!(write(I8042_COMMAND_PORT, &[0xFE]), Some(PowerEvent::Reset));
        assert_eq!(write(I8042_COMMAND_PORT, &[0xAD]), None, "another i8042 command");
        assert!(claims(ACPI_SLEEP_STATUS_PORT) && claims(I8042_COMMAND_PORT) && !claims(layout::SERIAL_PORT));
        let mut b = [7u8];
        read(ACPI_SLEEP_STATUS_PORT, &mut b);
        assert_eq!(b, [0]);
        read(I8042_COMMAND_PORT, &mut b);
        assert_eq!(b, [0xff]);
    }
}
