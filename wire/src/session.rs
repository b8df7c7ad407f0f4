//! Sans-IO session state machines for both ends of a migration.
//!
//! No sockets, no clocks: each side's state is an enum consumed by value;
//! a received message or a local decision moves it on or is refused. Every
//! (state, message) pair not listed below is a protocol error, and `Abort`
//! is accepted in every state before the end.
//!
//! ```text
//! source                                   destination
//! Start ──Hello──────────────────────────▶ AwaitHello
//! HelloSent ◀──────────────Accept/Refuse── (driver checks the shape)
//! Precopy ──Pages*, RoundDone*───────────▶ Receiving
//!         ◀─────────────────RoundApplied*─
//!   │ pause the VM (stop-and-copy)
//! StopAndCopy ──Pages*, DeviceState──────▶ HaveState (driver loads, verifies)
//! AwaitReady ◀──────────────────────Ready─ ReadySent
//! ReadyToCommit ──Commit─────────────────▶ Committed (driver resumes the VM)
//! CommitSent ◀──────────────────CommitAck─
//! Done
//! ```
//!
//! The commit point is the source sending `Commit`. Before it, any failure
//! resumes the source and the destination discards what it received
//! ([`Source::on_failure`] says `ResumeSource`). After it the source never
//! runs the VM again: if the link fails before `CommitAck`, the outcome is
//! `InDoubt` and the source stays paused until an operator (or a later
//! query of the destination) settles it.

use crate::disk::ChunkParams;
use crate::message::{Message, PAGE_SIZE, PROTOCOL_VERSION, VmShape, features};

/// A message that is not valid in the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("protocol error: {message} is not valid while {state}")]
pub struct ProtocolError {
    /// The state.
    pub state: &'static str,
    /// The message (or local action).
    pub message: &'static str,
}

/// What a failure (link loss, peer crash, local error) means for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Before commit: resume the guest on the source; nothing is lost.
    ResumeSource,
    /// After `Commit`, before `CommitAck`: the destination may or may not run
    /// the guest. The source must stay paused.
    InDoubt,
    /// The destination runs the guest.
    Done,
}

/// The source's side of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Nothing sent yet.
    Start,
    /// Waiting for `Accept` or `Refuse`.
    HelloSent,
    /// Pre-copy: pages may be sent.
    Precopy {
        /// Features agreed.
        features: u64,
    },
    /// The guest is paused; the last pages and the device state go out.
    StopAndCopy {
        /// Features agreed.
        features: u64,
    },
    /// Device state sent; waiting for `Ready`.
    AwaitReady,
    /// The destination is ready; the source may commit.
    ReadyToCommit,
    /// `Commit` sent; waiting for `CommitAck`.
    CommitSent,
    /// The destination runs the VM.
    Done,
    /// The migration ended before commit.
    Aborted(String),
}

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Start => "starting",
            Source::HelloSent => "waiting for the destination's answer",
            Source::Precopy { .. } => "in pre-copy",
            Source::StopAndCopy { .. } => "in stop-and-copy",
            Source::AwaitReady => "waiting for Ready",
            Source::ReadyToCommit => "ready to commit",
            Source::CommitSent => "waiting for CommitAck",
            Source::Done => "done",
            Source::Aborted(_) => "aborted",
        }
    }

    fn refuse(self, message: &'static str) -> ProtocolError {
        ProtocolError { state: self.name(), message }
    }

    /// Opens the session: the `Hello` to send, offering `features` and
    /// proposing how to cut disk images.
    pub fn hello(
        self,
        migration_id: wanmig_types::MigrationId,
        shape: VmShape,
        features: u64,
        chunking: ChunkParams,
    ) -> Result<(Source, Message), ProtocolError> {
        match self {
            Source::Start => Ok((
                Source::HelloSent,
                Message::Hello {
                    version: PROTOCOL_VERSION,
                    features,
                    page_size: PAGE_SIZE as u32,
                    migration_id,
                    shape,
                    chunking,
                },
            )),
            s => Err(s.refuse("Hello")),
        }
    }

    /// A message from the destination.
    pub fn on_message(self, msg: &Message) -> Result<Source, ProtocolError> {
        match (self, msg) {
            (Source::HelloSent, Message::Accept { features: f, .. }) if f & !features::ALL == 0 => {
                Ok(Source::Precopy { features: *f })
            }
            (Source::HelloSent, Message::Refuse { reason }) => Ok(Source::Aborted(format!("refused: {reason}"))),
            // The last round's acknowledgement may cross the device state.
            (
                s @ (Source::Precopy { .. } | Source::StopAndCopy { .. } | Source::AwaitReady),
                Message::RoundApplied { .. },
            ) => Ok(s),
            // The driver checks each answer against the manifest it sent.
            (s @ (Source::Precopy { .. } | Source::StopAndCopy { .. }), Message::DiskNeed(_)) => Ok(s),
            (Source::AwaitReady, Message::Ready) => Ok(Source::ReadyToCommit),
            (Source::CommitSent, Message::CommitAck) => Ok(Source::Done),
            (
                Source::HelloSent
                | Source::Precopy { .. }
                | Source::StopAndCopy { .. }
                | Source::AwaitReady
                | Source::ReadyToCommit,
                Message::Abort { reason },
            ) => Ok(Source::Aborted(format!("destination aborted: {reason}"))),
            (s, m) => Err(s.refuse(m.name())),
        }
    }

    /// Features agreed, while pages may be sent.
    pub fn features(&self) -> Option<u64> {
        match self {
            Source::Precopy { features } | Source::StopAndCopy { features } => Some(*features),
            _ => None,
        }
    }

    /// The guest has been paused for the final copy.
    pub fn stop_and_copy(self) -> Result<Source, ProtocolError> {
        match self {
            Source::Precopy { features } => Ok(Source::StopAndCopy { features }),
            s => Err(s.refuse("stop-and-copy")),
        }
    }

    /// The `DeviceState` that ends the stop-and-copy.
    pub fn device_state(self, state: Vec<u8>) -> Result<(Source, Message), ProtocolError> {
        match self {
            Source::StopAndCopy { .. } => Ok((Source::AwaitReady, Message::DeviceState { state })),
            s => Err(s.refuse("DeviceState")),
        }
    }

    /// The commit point: after this the source never runs the guest again.
    pub fn commit(self) -> Result<(Source, Message), ProtocolError> {
        match self {
            Source::ReadyToCommit => Ok((Source::CommitSent, Message::Commit)),
            s => Err(s.refuse("Commit")),
        }
    }

    /// Gives up (before commit): the `Abort` to send, if the link still works.
    pub fn abort(self, reason: &str) -> Result<(Source, Message), ProtocolError> {
        match self {
            Source::CommitSent | Source::Done => Err(self.refuse("Abort")),
            _ => Ok((Source::Aborted(reason.into()), Message::Abort { reason: reason.into() })),
        }
    }

    /// What any failure in this state means.
    pub fn on_failure(&self) -> FailureOutcome {
        match self {
            Source::CommitSent => FailureOutcome::InDoubt,
            Source::Done => FailureOutcome::Done,
            _ => FailureOutcome::ResumeSource,
        }
    }
}

/// The destination's side of a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Waiting for `Hello`.
    AwaitHello,
    /// `Hello` received; the driver checks whether it can host the VM.
    Deciding {
        /// Features the source offered.
        offered: u64,
    },
    /// Receiving pages.
    Receiving {
        /// Features agreed.
        features: u64,
    },
    /// Device state received; the driver loads and verifies it.
    HaveState,
    /// `Ready` sent; waiting for `Commit`.
    ReadySent,
    /// The VM is ours: run it.
    Committed,
    /// The migration ended before commit; discard everything.
    Aborted(String),
}

impl Destination {
    fn name(&self) -> &'static str {
        match self {
            Destination::AwaitHello => "waiting for Hello",
            Destination::Deciding { .. } => "deciding",
            Destination::Receiving { .. } => "receiving",
            Destination::HaveState => "verifying",
            Destination::ReadySent => "waiting for Commit",
            Destination::Committed => "committed",
            Destination::Aborted(_) => "aborted",
        }
    }

    fn refuse(self, message: &'static str) -> ProtocolError {
        ProtocolError { state: self.name(), message }
    }

    /// A message from the source. A `Hello` of another version or page size
    /// is a protocol error (the driver answers it with `Refuse`).
    pub fn on_message(self, msg: &Message) -> Result<Destination, ProtocolError> {
        match (self, msg) {
            (Destination::AwaitHello, Message::Hello { version, page_size, features: f, .. })
                if *version == PROTOCOL_VERSION && *page_size as usize == PAGE_SIZE =>
            {
                Ok(Destination::Deciding { offered: *f })
            }
            (
                s @ Destination::Receiving { .. },
                Message::Pages(_)
                | Message::Compressed { .. }
                | Message::RoundDone { .. }
                | Message::DiskManifest(_)
                | Message::DiskChunk(_)
                | Message::DiskWrites(_)
                | Message::DiskDone(_),
            ) => Ok(s),
            (Destination::Receiving { .. }, Message::DeviceState { .. }) => Ok(Destination::HaveState),
            (Destination::ReadySent, Message::Commit) => Ok(Destination::Committed),
            (
                Destination::AwaitHello
                | Destination::Deciding { .. }
                | Destination::Receiving { .. }
                | Destination::HaveState
                | Destination::ReadySent,
                Message::Abort { reason },
            ) => Ok(Destination::Aborted(format!("source aborted: {reason}"))),
            (s, m) => Err(s.refuse(m.name())),
        }
    }

    /// Accepts the VM: the `Accept` to send, with the features both sides
    /// speak (of those offered, the ones in `local`) and the chunking to use.
    pub fn accept(self, local: u64, chunking: ChunkParams) -> Result<(Destination, Message), ProtocolError> {
        match self {
            Destination::Deciding { offered } => {
                let f = offered & local & features::ALL;
                Ok((Destination::Receiving { features: f }, Message::Accept { features: f, chunking }))
            }
            s => Err(s.refuse("Accept")),
        }
    }

    /// Refuses the VM.
    pub fn refuse_vm(self, reason: &str) -> Result<(Destination, Message), ProtocolError> {
        match self {
            Destination::AwaitHello | Destination::Deciding { .. } => {
                Ok((Destination::Aborted(reason.into()), Message::Refuse { reason: reason.into() }))
            }
            s => Err(s.refuse("Refuse")),
        }
    }

    /// Features agreed, while pages are accepted.
    pub fn features(&self) -> Option<u64> {
        match self {
            Destination::Receiving { features } => Some(*features),
            _ => None,
        }
    }

    /// Everything arrived and checks out: the `Ready` to send.
    pub fn ready(self) -> Result<(Destination, Message), ProtocolError> {
        match self {
            Destination::HaveState => Ok((Destination::ReadySent, Message::Ready)),
            s => Err(s.refuse("Ready")),
        }
    }

    /// Gives up (before commit).
    pub fn abort(self, reason: &str) -> Result<(Destination, Message), ProtocolError> {
        match self {
            Destination::Committed => Err(self.refuse("Abort")),
            _ => Ok((Destination::Aborted(reason.into()), Message::Abort { reason: reason.into() })),
        }
    }

    /// Whether the VM is this side's to run.
    pub fn owns_vm(&self) -> bool {
        matches!(self, Destination::Committed)
    }
}
