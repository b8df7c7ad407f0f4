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
mod rules;
mod source;

pub use destination::{DestAction, DestSession};
pub use rules::{FailureOutcome, ProtocolError, Stream, stream_of};
pub use source::{Rewind, SourceEvent, SourceSession};

pub use crate::message::Settlement;

#[cfg(test)]
mod tests;
