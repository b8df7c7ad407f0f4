//! Emulated devices and the dispatch of port and MMIO exits to them: the
//! serial console, and behind virtio-mmio transports virtio-blk disks
//! ([`block`]) and virtio-net NICs ([`net`]) on host TAPs ([`tap`]).

pub mod block;
pub mod net;
pub mod serial;
pub mod tap;
pub mod virtio_mmio;

use std::sync::Mutex;

use crate::layout;
use serial::SerialConsole;
use virtio_mmio::MmioTransport;

/// Every device of a VM, reachable from every vCPU thread.
#[derive(Debug)]
pub struct Devices {
    /// The 8250 console.
    pub serial: Mutex<SerialConsole>,
    /// virtio-mmio slots, slot i at [`layout::virtio_mmio_addr`]`(i)`.
    pub virtio: Vec<Mutex<MmioTransport>>,
}

impl Devices {
    /// A guest `in` from `port`. Ports with no device read as all ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port.checked_sub(layout::SERIAL_PORT) {
            Some(off @ 0..8) if data.len() == 1 => data[0] = lock(&self.serial).read(off as u8),
            _ => data.fill(0xff),
        }
    }

    /// A guest `out` to `port`. Ports with no device ignore it.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if let Some(off @ 0..8) = port.checked_sub(layout::SERIAL_PORT)
            && data.len() == 1
        {
            lock(&self.serial).write(off as u8, data[0]);
        }
    }

    fn virtio_slot(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let off = addr.checked_sub(layout::VIRTIO_MMIO_BASE)?;
        let slot = usize::try_from(off / layout::VIRTIO_MMIO_STRIDE).ok()?;
        Some((self.virtio.get(slot)?, off % layout::VIRTIO_MMIO_STRIDE))
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
