//! What both machines share: the streams, which message belongs to which,
//! the protocol's errors, and what a failure means for the source.

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
        | Message::SettleAnswer { .. }
        | Message::Resume { .. }
        | Message::Resumed(_) => None,
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

pub(super) fn violation(s: String) -> ProtocolError {
    ProtocolError::Violation(s)
}

/// Checks that `msg` came on its own stream.
pub(super) fn check_stream(stream: Stream, msg: &Message) -> Result<(), ProtocolError> {
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
