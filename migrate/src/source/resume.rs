//! Going on after the link failed before the commit. The guest keeps
//! running here (it is resumed if the outage hit the stop-and-copy) and its
//! dirty pages and written blocks keep being tracked; the source reconnects
//! with backoff, within the resume window, over a new connection with the
//! same pinned keys, proves it is this migration's source (the secret of
//! its hello), and learns what the destination holds (`Resumed`). It then
//! sends only what the destination lacks: the pages of the round that was
//! cut that did not arrive, every page written since, the written blocks of
//! that round, and the disks' first copy from where it stands there.
//!
//! After the commit (`SETTLE_ON_RESUME` agreed) and before the
//! destination's decision was heard, the guest stays paused: it may be
//! the destination's. The source reconnects the same way; the destination
//! answers with its decision from its journal (committed: the migration
//! is done; not committed: the guest runs on here and the migration
//! fails), or, when it parked before it decided, `Resumed`: then nothing
//! was committed there and nothing can be without a new `Commit`, so the
//! guest is this side's again (journal and disk locks say so) while the
//! stop-and-copy is sent again, still paused, and the early commit after it.
//! A window that ends leaves the guest paused and in doubt, for `wanmig
//! settle`.

use std::time::{Duration, Instant};

use wanmig_mem_sync::to_ranges;
use wanmig_transport::{FrameReceiver, FrameSender, TransportError};
use wanmig_types::{MigrationId, PAGE_SIZE_U64, PageRange, features};
use wanmig_vmm::memory::{DirtyPages, RegionDirty};
use wanmig_wire::{FailureOutcome, Message, ResumePoint, Rewind, Settlement, SourceEvent, Stream};

use super::error::SendError;
use super::link::{ANSWER_TIMEOUT, BulkSender, Link};
use super::run::{Run, Stage};
use super::switchover;
use crate::journal::{SourceJournal, SourcePhase, SourceRecord};
use crate::report::Phase;

/// First wait between two reconnection attempts; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// [`crate::report::Summary::decided_on_resume`] when the destination had
/// not decided an early commit and took the migration up again.
pub const TAKEN_UP_AGAIN: &str = "TakenUpAgain";

/// A fresh secret for a migration's hello: 32 bytes from the kernel's
/// random source.
pub fn secret() -> Result<[u8; 32], SendError> {
    let mut s = [0u8; 32];
    // SAFETY: fills `s`, which is 32 bytes long, and nothing else.
    let n = unsafe { libc::getrandom(s.as_mut_ptr().cast(), s.len(), 0) };
    match usize::try_from(n) {
        Ok(32) => Ok(s),
        _ => Err(SendError::Refused(format!("no random secret: {}", std::io::Error::last_os_error()))),
    }
}

/// Whether `e` is a failure of the link that a resume can ride out.
pub fn resumable(run: &Run<'_>, e: &SendError) -> bool {
    // Post-copy rides out no outage this way (the guest must never run
    // here again once it has moved).
    matches!(e, SendError::Transport(_) | SendError::Closed)
        && !run.link.session.is_postcopy()
        && !run.opts.resume_window.is_zero()
        && run.link.session.resume_request().is_some()
}

/// What the destination answered a `Resume`.
pub(super) enum Answer {
    /// It took the migration up again on the new connection (its control
    /// stream's halves), from this point.
    Resumed(FrameSender, FrameReceiver, ResumePoint),
    /// The attempt there is over: what its journal says of the migration.
    Settled(MigrationId, Settlement),
}

/// After the link failed with `cause`: reconnects, resumes, and says where
/// the migration goes on.
pub async fn after_outage(
    run: &mut Run<'_>,
    cause: SendError,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
) -> Result<Stage, SendError> {
    let began = Instant::now();
    // A destination that gave up says so just before its connection goes.
    if let Some(reason) = heard_abort(run).await {
        return Err(SendError::Peer(format!("destination aborted: {reason}")));
    }
    // Before the commit the guest runs on here while the link is down;
    // after it, it may be the destination's.
    let committed = run.link.session.committed();
    if run.paused.is_some() && !committed {
        run.vm.resume();
        run.paused = None;
    }
    run.summary.outages += 1;
    let handed = run.link.bulk.handed;
    let (ctl, rx, point) = match reconnect(run, &cause, began).await? {
        Answer::Resumed(ctl, rx, point) => (ctl, rx, point),
        Answer::Settled(id, outcome) => return settled(run, id, outcome, began, journal, rec),
    };
    let mut session = run.link.session.clone();
    let rewind = session.on_resumed(&point)?;
    let agreed = session.features();
    let xbzrle = if agreed & features::XBZRLE != 0 { run.opts.xbzrle_cache } else { 0 };
    let zstd = run.opts.compress && agreed & features::ZSTD != 0;
    // A new stream, compressor and delta cache: the peer's are new too.
    let bulk = BulkSender::new(run.conn.open_bulk().await?, xbzrle, zstd, run.steer.tunables().max_bandwidth)?;
    let deadline = run.link.deadline + began.elapsed();
    (run.link, _) = Link::new(ctl, rx, bulk, session, deadline);
    // Only now: until the new session is in place a failure leaves the
    // source in doubt, as its journal still says.
    if committed {
        take_back(run, journal, rec)?;
    }
    let stage = next_stage(run, &rewind, &point, handed)?;
    run.summary.outage_ms += began.elapsed().as_secs_f64() * 1e3;
    Ok(stage)
}

/// The destination's `Abort`, if it sent one before its connection went;
/// the session machine hears it too (an early commit it aborted is this
/// side's again).
pub(super) async fn heard_abort(run: &mut Run<'_>) -> Option<String> {
    let reason = run.link.peer_reason().await?;
    // Refused only where the machine has heard it already, or after
    // `Ready` (where the destination's journal must say it).
    let _ = run.link.session.on_message(Stream::Control, &Message::Abort { reason: reason.clone() });
    Some(reason)
}

/// The destination answered a resume from its journal: committed (the
/// guest is the destination's: the migration is done) or not (the guest
/// runs on here; the migration failed).
fn settled(
    run: &mut Run<'_>,
    id: MigrationId,
    outcome: Settlement,
    began: Instant,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
) -> Result<Stage, SendError> {
    run.summary.outage_ms += began.elapsed().as_secs_f64() * 1e3;
    let event = run.link.session.on_settled(id, outcome)?;
    run.summary.decided_on_resume = Some(format!("{outcome:?}"));
    match event {
        SourceEvent::CommitAcked => {
            let paused_at = run.paused.unwrap_or(began);
            switchover::acknowledged(run, journal, rec, paused_at)?;
            Ok(Stage::Done)
        }
        SourceEvent::Aborted(reason) => Err(SendError::Peer(reason)),
        e => Err(SendError::Peer(format!("{e:?} in answer to Resume"))),
    }
}

/// A commit the destination took up again before it decided: it never
/// committed and cannot without a new `Commit`, so until that one the guest
/// is this side's again (a failure from here resumes it here).
fn take_back(run: &mut Run<'_>, journal: &SourceJournal, rec: &mut SourceRecord) -> Result<(), SendError> {
    run.summary.decided_on_resume = Some(TAKEN_UP_AGAIN.into());
    if !run.opts.sync {
        journal.record(rec, SourcePhase::Started)?;
        run.vm.reclaim_disks()?;
    }
    Ok(())
}

/// Reconnects with backoff until the destination answers the migration's
/// `Resume`, or the resume window ends.
pub(super) async fn reconnect(run: &mut Run<'_>, cause: &SendError, began: Instant) -> Result<Answer, SendError> {
    let window = run.opts.resume_window;
    let request = run.link.session.resume_request().ok_or_else(|| SendError::Refused("nothing to resume".into()))?;
    let awaiting_decision = awaiting_decision(run);
    let mut backoff = FIRST_BACKOFF;
    let mut last: Option<TransportError> = None;
    for attempt in 1u32.. {
        let left = window.saturating_sub(began.elapsed());
        if left.is_zero() {
            let why = last.map_or_else(|| wanmig_types::error_chain(cause), |e| wanmig_types::error_chain(&e));
            return Err(window_ended(run, window, why));
        }
        run.report.update(|p| {
            p.phase = Phase::Reconnecting;
            (p.reconnect_attempt, p.resume_left_s) = (attempt, left.as_secs_f64());
            p.awaiting_decision = awaiting_decision;
        });
        let tried = async {
            let mut conn = run.connector.connect().await?;
            let (mut tx, mut rx) = conn.open_control().await?;
            tx.send(&request).await?;
            let answer =
                rx.recv_timeout(ANSWER_TIMEOUT).await?.ok_or(TransportError::Lost("no answer to Resume".into()))?;
            Ok::<_, TransportError>((conn, tx, rx, answer))
        };
        match tokio::time::timeout(left, tried).await {
            Ok(Ok((conn, tx, rx, Message::Resumed(point)))) => {
                *run.conn = conn;
                return Ok(Answer::Resumed(tx, rx, point));
            }
            Ok(Ok((_, _, _, Message::SettleAnswer { migration_id, outcome }))) => {
                return Ok(Answer::Settled(migration_id, outcome));
            }
            Ok(Ok((_, _, _, Message::Refuse { reason }))) => {
                return Err(SendError::Peer(format!("the destination cannot resume the migration: {reason}")));
            }
            Ok(Ok((_, _, _, m))) => return Err(SendError::Peer(format!("{} in answer to Resume", m.name()))),
            Ok(Err(e)) => last = Some(e),
            Err(_) => {}
        }
        tokio::time::sleep(backoff.min(window.saturating_sub(began.elapsed()))).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    unreachable!("the attempts are unbounded; the window ends them")
}

/// Whether the commit is out and the destination's decision not heard:
/// the guest stays paused here until it is.
fn awaiting_decision(run: &Run<'_>) -> bool {
    run.link.session.on_failure() == FailureOutcome::InDoubt
}

/// The resume window ended with the link still down (`why`): before the
/// commit the migration fails; after it the guest stays paused, in doubt,
/// and the operator is told how to settle it.
fn window_ended(run: &Run<'_>, window: Duration, why: String) -> SendError {
    let down = format!("the link stayed down longer than the resume window ({window:?}): {why}");
    match awaiting_decision(run) {
        false => SendError::Peer(down),
        true => SendError::Peer(format!(
            "{down}; the destination's decision on the commit was never heard, so the VM stays paused here, \
             in doubt: run `wanmig settle` once the destination is reachable"
        )),
    }
}

/// Where the migration goes on after a resume at `rewind`.
/// (`handed`: pages of the cut round given to the old stream.)
fn next_stage(run: &mut Run<'_>, rewind: &Rewind, point: &ResumePoint, handed: u64) -> Result<Stage, SendError> {
    if let Some(d) = &mut run.disks {
        run.summary.resent_bytes += d.rewind(&rewind.disks)?;
        if !d.first_copy_done() {
            return Ok(Stage::FirstCopy);
        }
    }
    if run.first_round.is_none() {
        // Memory had not started: the disks' rounds go on (a sync's last
        // pass starts over from them too).
        return Ok(Stage::DiskRounds);
    }
    let (resend, again) = resend(run, rewind.round, &point.received, handed)?;
    run.summary.resent_bytes += again * PAGE_SIZE_U64;
    // An early commit taken up again: still inside its stop-and-copy.
    match run.link.session.stopped() {
        true => Ok(Stage::Resend(resend)),
        false => Ok(Stage::Precopy(Some(resend))),
    }
}

/// The pages to send after a resume: those of the round that was cut that
/// the destination did not apply, and every page written since (the dirty
/// log kept running). Returns them and how many of them are sent again:
/// those of the cut round's first `handed` (given to the old stream) that
/// did not arrive.
fn resend(
    run: &mut Run<'_>,
    round: u32,
    received: &[PageRange],
    mut handed: u64,
) -> Result<(DirtyPages, u64), SendError> {
    let dirty = run.vm.harvest_dirty()?;
    let cut = run.round_pages.take().filter(|(r, _)| *r == round).map(|(_, p)| p);
    let mut out = DirtyPages { regions: Vec::new() };
    let mut again = 0u64;
    for (start, len) in run.vm.ram().regions() {
        let pages = len / PAGE_SIZE_U64;
        let first_pfn = start.0 / PAGE_SIZE_U64;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let mark = |bits: &mut Vec<u64>, ranges: &[PageRange], offset: u64, set: bool| {
            for r in ranges {
                for p in r.first.saturating_sub(offset)..(r.first + r.count).saturating_sub(offset).min(pages) {
                    let (w, b) = ((p / 64) as usize, p % 64);
                    if set { bits[w] |= 1 << b } else { bits[w] &= !(1 << b) }
                }
            }
        };
        let of =
            |d: &DirtyPages| d.regions.iter().find(|r| r.start == start).map(|r| r.ranges.clone()).unwrap_or_default();
        if let Some(cut) = &cut {
            let cut = of(cut);
            mark(&mut bits, &cut, 0, true);
            // The destination's list is in page frame numbers.
            let here: Vec<PageRange> = received.iter().filter(|r| r.first + r.count > first_pfn).copied().collect();
            mark(&mut bits, &here, first_pfn, false);
            // The round went out in order: its first `handed` pages left.
            for p in cut.iter().flat_map(|r| r.first..r.end().min(pages)) {
                if handed == 0 {
                    break;
                }
                handed -= 1;
                again += (bits[(p / 64) as usize] >> (p % 64)) & 1;
            }
        }
        mark(&mut bits, &of(&dirty), 0, true);
        out.regions.push(RegionDirty { start, ranges: to_ranges(&bits, pages) });
    }
    Ok((out, again))
}
