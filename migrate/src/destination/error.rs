//! Why a migration failed at the destination.

use wanmig_transport::TransportError;
use wanmig_vmm::VmError;
use wanmig_wire::ProtocolError;

use crate::journal::JournalError;

/// Why an attempt failed. Each variant names what failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The source broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Building or loading the VM failed.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The source sent something impossible (the reason says what).
    #[error("bad input from the source: {0}")]
    BadInput(String),
    /// We refused the VM.
    #[error("refused the VM: {0}")]
    Refused(String),
    /// The source aborted.
    #[error("{0}")]
    Aborted(String),
    /// The listener could not start.
    #[error("cannot listen")]
    Listen(#[source] TransportError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A disk image or the chunk store failed here (the text names the
    /// file and what happened, e.g. "no space left").
    #[error("{0}")]
    Disk(String),
    /// This host could not build or prepare the VM it received.
    #[error("cannot host the VM: {0}")]
    Host(String),
    /// The journal could not record the migration's phase, so the phase
    /// was not entered.
    #[error("cannot journal the migration")]
    Journal(#[from] JournalError),
}
