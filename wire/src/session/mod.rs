//! Sans-IO session state machines for both ends of a migration.
//!
//! No sockets, no clocks: each end feeds its machine every message it
//! receives (with the stream it came on) and asks it for every message it
//! sends. The machine holds what was offered and agreed, the round and
//! request bookkeeping, and which message may come when and on which
//! stream; it answers with what the driver must do next, or refuses with a
//! [`ProtocolError`]. Drivers carry the answers out and keep no protocol
//! state of their own, so these rules can be tested, and a whole migration
//! driven, without a network or a VM.
//!
//! ```text
//! source                                      destination
//! Start ──Hello───────────────────────[C]──▶ AwaitHello
//! HelloSent ◀──────────────Accept/Refuse[C]── Deciding (driver checks the shape)
//! Transfer ──DiskManifest──────────────[C]──▶ Receiving
//!          ◀──────────────────DiskNeed──[C]─  (only the chunks asked for may come)
//!          ──DiskChunk*, DiskWrites*───[B]──▶
//!          ──Pages*, RoundDone─────────[B]──▶ (pages counted per round)
//!          ◀──────────────RoundApplied──[C]─
//!   │ pause the VM (stop-and-copy)
//! Transfer(paused) ──Pages*, DiskWrites*, DiskDone per disk, RoundDone, end of bulk [B]──▶
//!          ──DeviceState───────────────[C]──▶ HaveState (driver builds the VM)
//! AwaitReady ◀─────────────────Ready────[C]── ReadySent (everything verified)
//! ReadyToCommit ──Commit───────────────[C]──▶ Committed (driver runs the VM)
//! CommitSent ◀──────────────CommitAck───[C]─
//! Done
//! ```
//!
//! `[C]` is the control stream (two-way, opened by the source), `[B]` the
//! bulk stream (one-way, source to destination); [`stream_of`] says which
//! each message belongs to, and a message on the other one is an error.
//! `Abort` (control stream) ends the session before the commit in every
//! state that has one.
//!
//! The commit point is the source sending `Commit`. Before it, any failure
//! resumes the source and the destination discards what it received
//! ([`SourceSession::on_failure`] says `ResumeSource`). After it the source
//! never runs the VM again: if the link fails before `CommitAck`, the
//! outcome is `InDoubt` and the source stays paused until `wanmig settle`
//! asks the destination (`SettleQuery` → `SettleAnswer` on a connection of
//! its own) whether that migration committed.

mod destination;
mod source;

pub use destination::{DestAction, DestSession};
pub use source::{SourceEvent, SourceSession};

use crate::message::Message;

/// The two streams of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Two-way, opened by the source: negotiation, manifests and their
    /// answers, acknowledgements, device state, the commit.
    Control,
    /// One-way, source to destination: pages, chunks, written extents,
    /// round ends and disk digests.
    Bulk,
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stream::Control => "control",
            Stream::Bulk => "bulk",
        })
    }
}

/// The stream `msg` travels on during a migration; `None` for messages that
/// never belong to one (the tunnel's, and a settle query's own connection).
pub fn stream_of(msg: &Message) -> Option<Stream> {
    match msg {
        Message::Hello { .. }
        | Message::Accept { .. }
        | Message::Refuse { .. }
        | Message::DeviceState { .. }
        | Message::Ready
        | Message::Commit
        | Message::CommitAck
        | Message::Abort { .. }
        | Message::RoundApplied { .. }
        | Message::DiskManifest(_)
        | Message::DiskNeed(_) => Some(Stream::Control),
        Message::Pages(_)
        | Message::Compressed { .. }
        | Message::RoundDone { .. }
        | Message::DiskChunk(_)
        | Message::DiskWrites(_)
        | Message::DiskDone(_) => Some(Stream::Bulk),
        Message::TunnelPacket { .. }
        | Message::TunnelClose { .. }
        | Message::TunnelKeepalive
        | Message::SettleQuery { .. }
        | Message::SettleAnswer { .. } => None,
    }
}

/// A message or action the protocol does not allow where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The message (or local action) is not valid in this state.
    #[error("protocol error: {message} is not valid while {state}")]
    Unexpected {
        /// The state.
        state: &'static str,
        /// The message or action.
        message: &'static str,
    },
    /// The message came on the wrong stream.
    #[error("protocol error: {message} on the {stream} stream")]
    WrongStream {
        /// The message.
        message: &'static str,
        /// Where it came.
        stream: Stream,
    },
    /// The message is valid here but its content breaks the session's
    /// bookkeeping (a round's page count, a manifest's place, a chunk
    /// nobody asked for, data for a finished disk, ...).
    #[error("protocol error: {0}")]
    Violation(String),
}

fn violation(s: String) -> ProtocolError {
    ProtocolError::Violation(s)
}

/// Checks that `msg` came on its own stream.
fn check_stream(stream: Stream, msg: &Message) -> Result<(), ProtocolError> {
    match stream_of(msg) {
        Some(s) if s == stream => Ok(()),
        _ => Err(ProtocolError::WrongStream { message: msg.name(), stream }),
    }
}

/// What a failure (link loss, peer crash, local error) means for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Before commit: resume the guest on the source; nothing is lost.
    ResumeSource,
    /// After `Commit`, before `CommitAck`: the destination may or may not run
    /// the guest. The source must stay paused until the outcome is settled.
    InDoubt,
    /// The destination runs the guest.
    Done,
}

/// What a destination knows of a migration a `SettleQuery` asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Settlement {
    /// It committed: the destination owns (and ran) the VM.
    Committed,
    /// It never committed and never will (it ended before `Commit`
    /// arrived): the source owns the VM.
    NotCommitted,
    /// The destination has no record of it.
    Unknown,
}

#[cfg(test)]
mod tests;
