//! Settling an in-doubt migration from the source's journal: asks the
//! destination (same pinned identities) whether the migration committed
//! there. Used by the serving process (`wanmig settle` while it runs) and
//! by the CLI directly when no process serves the VM any more (it crashed
//! or was killed after `Commit`).

use std::time::Duration;

use wanmig_migrate::journal::{JournalError, SourceJournal, SourcePhase, SourceRecord};
use wanmig_migrate::settle::{SettleError, ask};
use wanmig_transport::{Fingerprint, Identity, LinkTuning};
use wanmig_types::error_chain;
use wanmig_wire::Settlement;

/// Why the destination could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The journal names an identity or peer that cannot be used.
    #[error("the journal's {what}: {reason}")]
    Journal {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The destination could not be reached or answered badly.
    #[error("asking {dest}")]
    Ask {
        /// Where.
        dest: String,
        /// Why.
        #[source]
        source: SettleError,
    },
    /// The journal could not be read or written.
    #[error(transparent)]
    Record(#[from] JournalError),
}

/// Asks the destination named in `rec` what became of its migration.
pub fn ask_destination(rec: &SourceRecord) -> Result<Settlement, AskError> {
    let journal = |what, reason: String| AskError::Journal { what, reason };
    let identity = Identity::load(&rec.identity).map_err(|e| journal("identity", error_chain(&e)))?;
    let peer: Fingerprint =
        rec.peer.parse().map_err(|e: wanmig_transport::IdentityError| journal("peer", e.to_string()))?;
    let dest = wanmig_migrate::resolve(&rec.dest).map_err(|e| journal("destination", e))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| journal("runtime", e.to_string()))?;
    let asked = rt.block_on(async {
        let tuning = LinkTuning { idle_timeout: Duration::from_secs(30), ..LinkTuning::default() };
        let mut conn = wanmig_transport::connect(dest, &identity, &[peer], tuning).await.map_err(SettleError::from)?;
        ask(&mut conn, rec.migration_id).await
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    asked.map_err(|source| AskError::Ask { dest: rec.dest.clone(), source })
}

/// What settling decides for the VM here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It committed: the VM runs at the destination; this copy is retired
    /// for good (the journal says so, and `wanmig run` refuses it).
    Retire,
    /// It did not commit: the VM is this host's again (the journal is
    /// cleared).
    Reclaim,
    /// Nothing can be decided: the VM stays as it is (in doubt).
    Undecided,
}

/// Brings the journal in line with the destination's answer; returns what
/// it means for the VM here and the words to say it.
pub fn apply(
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    said: Settlement,
    force_resume: bool,
) -> Result<(Verdict, String), JournalError> {
    Ok(match said {
        Settlement::Committed => {
            journal.record(rec, SourcePhase::Migrated)?;
            (Verdict::Retire, format!("committed: the VM runs at {}; this host's copy is retired", rec.dest))
        }
        Settlement::NotCommitted => {
            journal.clear()?;
            (
                Verdict::Reclaim,
                format!("not committed: {} discarded it and never will run it; the VM is this host's", rec.dest),
            )
        }
        Settlement::PostcopyRunning => (
            Verdict::Undecided,
            format!(
                "committed in post-copy: the VM runs at {} and still needs pages this host holds; \
                 the VM stays paused here and keeps them (a source that reconnects serves them)",
                rec.dest
            ),
        ),
        Settlement::PostcopyLost => (
            Verdict::Undecided,
            format!(
                "post-copy lost: the guest ran at {} and its state there is gone; this side holds the guest \
                 as it was at the switch, NOT resumed (running it would go back in time for its disks and peers)",
                rec.dest
            ),
        ),
        Settlement::Unknown if force_resume => {
            journal.clear()?;
            (Verdict::Reclaim, format!("{} has no record of the migration; taken back here as forced", rec.dest))
        }
        Settlement::Unknown => (
            Verdict::Undecided,
            format!(
                "{} has no record of migration {}: nothing is decided, the VM stays in doubt \
                 (if you know it does not run there, settle again with --force-resume)",
                rec.dest, rec.migration_id
            ),
        ),
    })
}
