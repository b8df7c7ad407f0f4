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
//!
//! With `features::EARLY_COMMIT` the `Commit` follows the device state at
//! once and the destination decides (`Ready` then `CommitAck`, or `Abort`).
//! With `features::SETTLE_ON_RESUME` (and `RESUME`) a source in doubt
//! resumes too, the guest still paused, and the destination's answer to its
//! `Resume` decides:
//!
//! ```text
//! source (CommittedEarly / CommitSent)        destination
//!   ──Resume{id, secret}──────────────────────▶ parked (Receiving, HaveState):
//!   ◀─────────────────────────Resumed(point)──  not decided, and cannot be
//! Transfer(paused): what the point lacks,        without a new Commit
//!   the disks' last data, DeviceState, Commit ▶ (as in the stop-and-copy)
//!                                             attempt over (decided, or failed):
//!   ◀──────SettleAnswer{id, Committed}────────  its journal: the VM runs there
//! Done                                          (source: migrated)
//!   ◀──────SettleAnswer{id, NotCommitted}─────  it never will: the guest
//! Aborted (the guest runs on here)              is the source's
//! ```
//!
//! A destination parks only before `Ready`, so `Resumed` after `Ready` is
//! refused ([`SourceSession::on_resumed`]), as is any other settlement
//! ([`SourceSession::on_settled`]): the source then stays in doubt.
//!
//! Post-copy (`features::POSTCOPY`) moves the guest before all its pages
//! did: the switch replaces the stop-and-copy's last pages with the list of
//! pages the destination lacks, and after the commit the source keeps
//! serving them until the destination has every one. Its page flow and
//! failure rules are in [`PostcopyPages`]' module.

mod destination;
pub mod postcopy;
mod rules;
mod source;

pub use destination::{DestAction, DestSession};
pub use postcopy::{PageAction, PageSpace, PostcopyPages};
pub use rules::{FailureOutcome, ProtocolError, Stream, stream_of};
pub use source::{Rewind, SourceEvent, SourceSession};

pub use crate::message::Settlement;

#[cfg(test)]
mod postcopy_tests;
#[cfg(test)]
mod tests;
