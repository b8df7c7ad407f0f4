//! Emulated devices and the dispatch of port and MMIO exits to them: the
//! serial console, and behind virtio-mmio transports virtio-blk disks
//! ([`block`]) and virtio-net NICs ([`net`]) on host TAPs ([`tap`]); what
//! each saves ([`persist`]).

pub mod block;
pub mod net;
pub mod persist;
pub mod power;
pub mod serial;
pub mod tap;
pub mod virtio_mmio;

use std::sync::Mutex;

use crate::layout;
use power::PowerEvent;
use serial::SerialConsole;
use virtio_mmio::MmioTransport;

/// Every device of a VM, reachable from every vCPU thread.
#[derive(Debug)]
pub struct Devices {
    /// The 8250 console.
    pub serial: Mutex<SerialConsole>,
    /// virtio-mmio slots, slot i at [`layout::virtio_mmio_addr`]`(i)`.
    pub virtio: Vec<Mutex<MmioTransport>>,
    /// Guest RAM as (guest-physical start, length): an MMIO exit inside it
    /// is an access KVM could not make to memory the VMM must provide
    /// (e.g. a post-copy page that can never arrive), never a device.
    pub ram: Vec<(u64, u64)>,
}

impl Devices {
    /// A guest `in` from `port`. Ports with no device read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port.checked_sub(layout::SERIAL_PORT) {
            Some(off @ 0..8) if data.len() == 1 => data[0] = lock(&self.serial).read(off as u8),
            _ if power::claims(port) => power::read(port, data),
            _ => data.fill(0xff),
        }
    }

    /// A guest `out` to `port`. Ports with no device ignore it. Returns the
    /// power event the write asked for, if it did: the vCPU stops the guest.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<PowerEvent> {
        match port.checked_sub(layout::SERIAL_PORT) {
            Some(off @ 0..8) if data.len() == 1 => {
                lock(&self.serial).write(off as u8, data[0]);
                None
            }
            _ if power::claims(port) => power::write(port, data),
            _ => None,
        }
    }

    fn virtio_slot(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let off = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let slot = usize::try_from(off / layout::VIRTIO_MMIO_STRIDE).ok()?;
        Some((self.virtio.get(slot)?, off % layout::VIRTIO_MMIO_STRIDE))
    }

    /// Whether `addr` is guest RAM (where an MMIO exit is fatal).
    pub fn is_ram(&self, addr: u64) -> bool {
        self.ram.iter().any(|&(start, len)| addr >= start && addr - start < len)
    }

    /// A guest MMIO read. Addresses with no device read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_slot(addr) {
            Some((dev, off)) => lock(dev).read(off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write. Addresses with no device ignore it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((dev, off)) = self.virtio_slot(addr) {
            lock(dev).write(off, data);
        }
    }
}

/// Locks a device. A poisoned lock means a device model panicked on another
/// vCPU thread; its state is still the last consistent one, so go on.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn port_writes_reach_the_power_device() {
        let serial = SerialConsole::new(EventFd::new(0).expect("eventfd"), Box::new(std::io::sink()));
        let d = Devices { serial: Mutex::new(serial), virtio: Vec::new(), ram: vec![(0, 1 << 20)] };
        assert!(d.is_ram(0xFFFFF) && !d.is_ram(1 << 20));
        assert_eq!(d.pio_write(layout::SERIAL_PORT, b"x"), None);
        assert_eq!(d.pio_write(0x80, &[0xFE]), None, "a port with no device");
        assert_eq!(
            d.pio_write(layout::ACPI_SLEEP_CONTROL_PORT, &[power::power_off_command()]),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(d.pio_write(layout::ACPI_RESET_PORT, &[power::RESET_VALUE]), Some(PowerEvent::Reset));
        assert_eq!(d.pio_write(layout::I8042_COMMAND_PORT, &[0xFE]), Some(PowerEvent::Reset));
        let mut b = [0xAA];
        d.pio_read(layout::ACPI_SLEEP_STATUS_PORT, &mut b);
        assert_eq!(b, [0]);
        d.pio_read(0x80, &mut b);
        assert_eq!(b, [0xff]);
    }
}
