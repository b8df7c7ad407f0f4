//! The 8250 UART at port 0x3f8 (vm-superio's model), output to a writer,
//! interrupt on IRQ 4 through an irqfd.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial IRQ by writing to an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// Where the console goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The serial console.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

/// Saved state of the UART registers and its receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    regs: [u8; 9],
    in_buffer: Vec<u8>,
}

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved receive FIFO is larger than the UART's.
    #[error("saved serial state is invalid: {0}")]
    BadState(String),
}

impl SerialConsole {
    /// A UART in its reset state.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialConsole { uart: Serial::new(IrqTrigger(irq), out) }
    }

    /// A UART in a saved state.
    pub fn restore(irq: EventFd, out: ConsoleOut, s: &SerialSnapshot) -> Result<Self, SerialError> {
        let [
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
        ] = s.regs;
        let state = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| SerialError::BadState(format!("{e:?}")))?;
        Ok(SerialConsole { uart })
    }

    /// Captures the UART's state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A guest read of register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A guest write of register `offset`. Output errors (a closed stdout)
    /// drop the byte rather than stop the guest.
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}
