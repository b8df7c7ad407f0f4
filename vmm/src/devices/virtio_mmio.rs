//! The virtio-mmio transport (virtio 1.x, "version 2" register layout) and
//! the interface its devices implement.
//!
//! The transport owns the queues and the feature/status handshake; a
//! [`VirtioDevice`] owns the device-specific config space and request
//! processing. Queue notifications are processed synchronously on the vCPU
//! thread that wrote `QueueNotify`, so when all vCPUs are paused no request
//! is in flight and the queue indices in the saved state are exact.
//!
//! A device can also have work the guest did not ask for (a NIC's received
//! frames): a VMM thread runs it with [`MmioTransport::device_work`], under
//! the same lock as the vCPUs' accesses. Such a thread must not touch the
//! transport while the VM is paused; `Vm::pause` takes every transport's
//! lock once after parking the vCPUs, so it returns only when work begun
//! before the pause has finished.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use super::persist::DeviceSnapshot;
use crate::memory::GuestMem;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR_ID: u32 = 0x4d47_5741; // "AWGM"
/// Feature bit every device offers: the virtio 1.x interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const INT_VRING: u32 = 1;

/// A virtio device behind an MMIO transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// A driver read of the config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Processes what the driver made available on queue `index`; returns
    /// whether buffers were used (and so the driver may need an interrupt).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool;
    /// The device's state. Deliberately without a default: a device that does
    /// not say how to save itself must not compile.
    fn save(&self) -> DeviceSnapshot;
}

/// Saved state of one queue (mirrors `virtio_queue::QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    max_size: u16,
    size: u16,
    ready: bool,
    next_avail: u16,
    next_used: u16,
    event_idx: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

/// Saved state of a transport and its device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: DeviceSnapshot,
}

/// Errors restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The saved state does not fit this device or this guest's memory.
    #[error("saved virtio-mmio state is invalid: {0}")]
    BadState(String),
}

/// One virtio-mmio slot.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq: EventFd,
    mem: GuestMem,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport in its reset state.
    pub fn new(device: Box<dyn VirtioDevice>, irq: EventFd, mem: GuestMem) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq,
            mem,
        }
    }

    /// A transport in a saved state, around a device restored by the caller.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        irq: EventFd,
        mem: GuestMem,
        s: &MmioSnapshot,
    ) -> Result<Self, MmioError> {
        let bad = |m: String| MmioError::BadState(m);
        let max_sizes = device.queue_max_sizes();
        if s.queues.len() != max_sizes.len() {
            return Err(bad(format!("{} queues saved, the device has {}", s.queues.len(), max_sizes.len())));
        }
        if s.driver_features & !device.features() != 0 {
            return Err(bad(format!("driver features {:#x} were never offered", s.driver_features)));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, &max)) in s.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(bad(format!("queue {i}: max size {} saved, device has {max}", q.max_size)));
            }
            let state = QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue = Queue::try_from(state).map_err(|e| bad(format!("queue {i}: {e}")))?;
            if queue.ready() && !queue.is_valid(&mem) {
                return Err(bad(format!("queue {i}: rings outside guest memory")));
            }
            queues.push(queue);
        }
        Ok(MmioTransport {
            device,
            queues,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            driver_features: s.driver_features,
            queue_sel: s.queue_sel,
            status: s.status,
            interrupt_status: s.interrupt_status,
            config_generation: s.config_generation,
            irq,
            mem,
        })
    }

    /// Captures the transport's and the device's state.
    pub fn save(&self) -> MmioSnapshot {
        MmioSnapshot {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                })
                .collect(),
            device: self.device.save(),
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.queue_sel = 0;
    }

    /// A driver read at `offset` within the slot.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        let v = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt_status,
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    /// A driver write at `offset` within the slot.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 || data.len() != 4 {
            return; // config space is read-only (block, net); registers are 32-bit
        }
        let v = u32::from_le_bytes(data.try_into().expect("length checked"));
        let configuring = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 if configuring && self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let mask = 0xffff_ffffu64 << shift;
                let offered = self.device.features();
                self.driver_features = (self.driver_features & !mask) | ((u64::from(v) << shift) & offered);
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    q.set_size(v as u16);
                }
            }
            0x044 => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                    if v == 1 && !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                }
            }
            0x050 => self.notify(v as usize),
            0x064 => self.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                } else if v & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    // Legacy drivers are not supported: refuse FEATURES_OK.
                    self.status = v & !STATUS_FEATURES_OK;
                } else {
                    self.status = v;
                }
            }
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let (lo, hi) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    match offset & !4 {
                        0x080 => q.set_desc_table_address(lo, hi),
                        0x090 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn notify(&mut self, index: usize) {
        self.device_work(index);
    }

    /// Runs the device's work on queue `index` — what a guest notification
    /// of that queue does — and raises the interrupt if buffers were used.
    /// Returns false, doing nothing, when the driver has not finished
    /// setting the device up or the queue is not ready.
    pub fn device_work(&mut self, index: usize) -> bool {
        if self.status & STATUS_DRIVER_OK == 0 {
            return false;
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else { return false };
        if self.device.process_queue(index, queue, &self.mem) && queue.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt_status |= INT_VRING;
            // A full eventfd counter still raises the line; nothing to do on error.
            let _ = self.irq.write(1);
        }
        true
    }
}
