//! Settling an in-doubt migration: the source asks the destination, on a
//! connection of its own (same pinned identities), whether a migration id
//! committed there; the destination answers from its journal.

use std::time::Duration;

use wanmig_transport::{Conn, FrameReceiver, FrameSender, TransportError};
use wanmig_types::MigrationId;
use wanmig_wire::{Message, Settlement};

use crate::journal::{DestJournal, JournalError};

/// How long either side waits for the other's one message.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a settle query failed.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The destination could not be reached or answered nothing.
    #[error("cannot ask the destination")]
    Transport(#[from] TransportError),
    /// It answered something else.
    #[error("the destination answered {0} to a settle query")]
    BadAnswer(&'static str),
    /// It answered about another migration.
    #[error("the destination answered about migration {got}, not {asked}")]
    WrongMigration {
        /// Asked about.
        asked: MigrationId,
        /// Answered about.
        got: MigrationId,
    },
}

/// Asks the destination at the other end of `conn` what became of `id`.
pub async fn ask(conn: &mut Conn, id: MigrationId) -> Result<Settlement, SettleError> {
    let (mut tx, mut rx) = conn.open_control().await?;
    tx.send(&Message::SettleQuery { migration_id: id }).await?;
    let answer = rx.recv_timeout(SETTLE_TIMEOUT).await?.ok_or(TransportError::Lost("no answer".into()))?;
    conn.close(0);
    match answer {
        Message::SettleAnswer { migration_id, outcome } if migration_id == id => Ok(outcome),
        Message::SettleAnswer { migration_id, .. } => Err(SettleError::WrongMigration { asked: id, got: migration_id }),
        m => Err(SettleError::BadAnswer(m.name())),
    }
}

/// Answers a settle query for `id` (the connection's first message) from
/// `journal`. A migration not committed here is recorded as aborted first,
/// so it can never commit after the source was told it did not.
pub async fn answer(
    tx: &mut FrameSender,
    _rx: &mut FrameReceiver,
    id: MigrationId,
    journal: &DestJournal,
) -> Result<Settlement, JournalError> {
    let outcome = journal.settle(id)?;
    let _ = tx.send(&Message::SettleAnswer { migration_id: id, outcome }).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), tx.finish()).await;
    Ok(outcome)
}
