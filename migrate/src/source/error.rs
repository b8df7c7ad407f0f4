//! Why a migration failed at the source.

use std::time::Duration;

use wanmig_transport::TransportError;
use wanmig_vmm::VmError;
use wanmig_wire::ProtocolError;

use crate::journal::JournalError;

/// Why a migration failed. Each variant names what failed; the cause is
/// its source, or the destination's own words.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The destination broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A VM operation failed.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The destination refused or gave up; its reason.
    #[error("{0}")]
    Peer(String),
    /// The guest would not converge.
    #[error("{0}")]
    NoConvergence(String),
    /// The migration took longer than allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The destination closed the connection.
    #[error("the destination closed the connection")]
    Closed,
    /// Reading a disk image or the local chunk store failed.
    #[error("disk copy: {0}")]
    Disk(String),
    /// An operator cancelled it before the commit.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// The journal could not record the migration's phase, so the phase
    /// was not entered.
    #[error("cannot journal the migration")]
    Journal(#[from] JournalError),
    /// Post-copy failed after the commit: the guest ran at the
    /// destination, which can no longer get its missing pages.
    #[error(
        "post-copy lost: the guest ran at the destination and its state there is gone; this side holds the guest \
         as it was at the switch, NOT resumed ({0})"
    )]
    PostcopyLost(String),
    /// What was asked cannot be done (bad options for this VM).
    #[error("{0}")]
    Refused(String),
}
