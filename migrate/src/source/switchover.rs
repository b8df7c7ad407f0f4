//! The end of a migration at the source: stop-and-copy (sent again, still
//! paused, when an early commit is resumed before the destination
//! decided), then the commit (journalled), then the network hand-over.

use std::time::Instant;

use wanmig_mem_sync::compress;
use wanmig_types::{PageRange, features};
use wanmig_vmm::memory::DirtyPages;
use wanmig_wire::SourceEvent;

use super::error::SendError;
use super::run::Run;
use crate::journal::{SourceJournal, SourcePhase, SourceRecord};
use crate::report::Phase;

/// Pauses the guest and sends what is left: the last dirty pages, the last
/// written blocks and each disk's digest, then the device state. Returns
/// when the pause began.
pub async fn stop_and_copy(run: &mut Run<'_>, pending: DirtyPages) -> Result<Instant, SendError> {
    let paused_at = pause(run)?;
    run.link.session.stop_and_copy()?;
    let pages = match run.opts.sync {
        true => DirtyPages { regions: Vec::new() },
        false => union(&pending, &run.vm.harvest_dirty()?),
    };
    send_rest(run, &pages, paused_at).await?;
    Ok(paused_at)
}

/// Pauses the guest for the switch-over (the stop-and-copy, or post-copy's
/// switch); returns when the pause began.
pub(super) fn pause(run: &mut Run<'_>) -> Result<Instant, SendError> {
    // A throttled disk write must not hold up the pause.
    run.unthrottle_disks();
    run.report.phase(Phase::StopAndCopy);
    // Flushed while the guest runs, so that the flush in the pause covers
    // only the writes of the last moments.
    run.vm.sync_disks()?;
    let paused_at = Instant::now();
    run.vm.pause()?;
    run.paused = Some(paused_at);
    // On shared storage the destination opens these very images: the
    // writes the guest saw complete must be on them first. A copied disk
    // is read here through the page cache, which holds them already; its
    // flush is no business of the guest's downtime.
    if run.disks.is_none() {
        run.vm.sync_disks()?;
    }
    Ok(paused_at)
}

/// After an early commit the destination took up again before it decided
/// (the guest has stayed paused since `paused_at`): sends `pages` (what of
/// the cut round it lacks), then the rest again as the stop-and-copy did.
pub async fn resend(run: &mut Run<'_>, pages: DirtyPages) -> Result<Instant, SendError> {
    let paused_at = run.paused.ok_or_else(|| SendError::Refused("a stop-and-copy resent, yet no pause".into()))?;
    run.report.phase(Phase::StopAndCopy);
    send_rest(run, &pages, paused_at).await?;
    Ok(paused_at)
}

/// Inside the stop-and-copy (the guest paused since `paused_at`): `pages`,
/// the disks' last written blocks and digests, the round's end, then the
/// device state.
async fn send_rest(run: &mut Run<'_>, pages: &DirtyPages, paused_at: Instant) -> Result<(), SendError> {
    let round = run.link.session.round();
    let mut last_pages = 0;
    if !run.opts.sync {
        run.start_round(pages);
        let ram = run.vm.ram();
        (last_pages, _) = run.link.bulk.send_pages(ram, pages, round, &mut run.summary.bytes).await?;
    }
    if let Some(d) = &mut run.disks {
        d.finish(&mut run.link, &mut run.summary.bytes).await?;
    }
    // The round's acknowledgement arrives before Ready; not waited for here.
    let done = run.link.session.round_done(last_pages)?;
    run.link.bulk.send(&done, &mut run.summary.bytes).await?;
    // The destination sees the bulk stream end now, not once the commit
    // is journalled here (the wait for its delivery comes later).
    run.link.bulk.end().await?;
    run.summary.downtime_breakdown.last_pages_ms = ms_since(paused_at);
    let state = if run.opts.sync {
        // A sync hands over no VM: its "device state" is empty.
        Vec::new()
    } else {
        let state = run.vm.device_state()?;
        match run.link.session.features() & features::ZSTD != 0 {
            true => compress::compress_blob(&state).map_err(|e| SendError::Refused(format!("zstd: {e}")))?,
            false => state,
        }
    };
    run.summary.bytes.state = state.len() as u64;
    let msg = run.link.session.device_state(state)?;
    run.link.send_ctl(&msg, &mut run.summary.bytes).await?;
    run.summary.downtime_breakdown.state_ms = ms_since(paused_at);
    Ok(())
}

/// The pages of `a` and `b` (same regions, in the same order), each
/// region's runs ascending and disjoint: pages go into a batch in
/// ascending order, and a page dirty in both goes once.
pub fn union(a: &DirtyPages, b: &DirtyPages) -> DirtyPages {
    let mut out = a.clone();
    for r in &b.regions {
        match out.regions.iter_mut().find(|o| o.start == r.start) {
            Some(o) => {
                o.ranges.extend_from_slice(&r.ranges);
                o.ranges = coalesce(std::mem::take(&mut o.ranges));
            }
            None => out.regions.push(r.clone()),
        }
    }
    out
}

/// `runs` sorted, with the ones that overlap or touch merged (empty ones
/// dropped).
pub fn coalesce(mut runs: Vec<PageRange>) -> Vec<PageRange> {
    runs.retain(|r| r.count > 0);
    runs.sort_by_key(|r| r.first);
    let mut out: Vec<PageRange> = Vec::with_capacity(runs.len());
    for r in runs {
        match out.last_mut() {
            Some(last) if r.first <= last.end() => {
                let end = last.end().max(r.end());
                last.count = end - last.first;
            }
            _ => out.push(r),
        }
    }
    out
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The two-phase commit. With `EARLY_COMMIT` agreed, `Commit` follows the
/// device state at once and the destination decides: it commits when it
/// holds everything, or aborts (and the guest runs on here); the guest's
/// downtime is a round trip shorter, and a failure from here on leaves the
/// source in doubt until it hears. Otherwise: waits for `Ready`, then
/// commits. Either way `commit_sent` is journalled and the disks let go
/// before `Commit` leaves (the point of no return); then it waits for the
/// acknowledgement.
pub async fn commit(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    paused_at: Instant,
) -> Result<(), SendError> {
    run.report.phase(Phase::Committing);
    let early = run.link.session.features() & features::EARLY_COMMIT != 0;
    if early {
        decide(run, journal, rec).await?;
    }
    // The bulk stream ends behind the state (and the commit), not before
    // them: waiting for its last bytes to be acknowledged first would put
    // a round trip between them (the destination takes them in any order).
    run.link.bulk.finish().await?;
    loop {
        match run.link.next_event().await? {
            SourceEvent::Ready => break,
            SourceEvent::RoundApplied(_) => {}
            e => return Err(SendError::Peer(format!("{e:?} while waiting for Ready"))),
        }
    }
    run.summary.downtime_breakdown.ready_ms = ms_since(paused_at);
    if !early {
        decide(run, journal, rec).await?;
    }
    // Long enough for the Commit to leave this host.
    crate::failpoint("send-exit-after-commit", std::time::Duration::from_millis(300));
    match run.link.next_event().await? {
        SourceEvent::CommitAcked => {}
        e => return Err(SendError::Peer(format!("{e:?} instead of CommitAck"))),
    }
    acknowledged(run, journal, rec, paused_at)
}

/// The destination runs the guest (it acknowledged the commit, or its
/// journal said so in answer to a resume): the downtime that began at
/// `paused_at` ends, and the journal says the VM migrated.
pub fn acknowledged(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    paused_at: Instant,
) -> Result<(), SendError> {
    run.summary.downtime_ms = ms_since(paused_at);
    run.summary.downtime_breakdown.commit_ack_ms = run.summary.downtime_ms;
    if !run.opts.sync {
        journal.record(rec, SourcePhase::Migrated)?;
    }
    Ok(())
}

/// The point of no return: a cancel that came first wins; then
/// `commit_sent` is journalled, the disks let go and `Commit` sent.
pub(super) async fn decide(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
) -> Result<(), SendError> {
    run.steer.try_commit().map_err(|c| SendError::Cancelled(c.0))?;
    // A sync hands no VM over: nothing to journal.
    if !run.opts.sync {
        journal.record(rec, SourcePhase::CommitSent)?;
    }
    crate::failpoint("send-exit-before-commit", std::time::Duration::ZERO);
    if !run.opts.sync {
        run.vm.release_disks();
    }
    let commit = run.link.session.commit()?;
    run.report.phase(Phase::Committed);
    run.link.send_ctl(&commit, &mut run.summary.bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use wanmig_vmm::memory::RegionDirty;

    use super::*;

    fn pages(regions: &[(u64, &[(u64, u64)])]) -> DirtyPages {
        let regions = regions.iter().map(|&(start, runs)| RegionDirty {
            start: GuestAddress(start),
            ranges: runs.iter().map(|&(first, count)| PageRange { first, count }).collect(),
        });
        DirtyPages { regions: regions.collect() }
    }

    #[test]
    fn a_union_is_ascending_and_disjoint_so_each_page_goes_once() {
        // The pages left to send and those dirtied since overlap and touch.
        let pending = pages(&[(0, &[(2, 3), (10, 2)]), (1 << 32, &[(0, 1)])]);
        let last = pages(&[(0, &[(0, 1), (4, 4), (12, 1), (20, 0)]), (2 << 32, &[(5, 1)])]);
        let u = union(&pending, &last);
        assert_eq!(u, pages(&[(0, &[(0, 1), (2, 6), (10, 3)]), (1 << 32, &[(0, 1)]), (2 << 32, &[(5, 1)])]));
    }
}
