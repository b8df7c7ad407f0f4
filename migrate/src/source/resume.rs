//! Going on after the link failed before the commit. The guest keeps
//! running here (it is resumed if the outage hit the stop-and-copy) and its
//! dirty pages and written blocks keep being tracked; the source reconnects
//! with backoff, within the resume window, over a new connection with the
//! same pinned keys, proves it is this migration's source (the secret of
//! its hello), and learns what the destination holds (`Resumed`). It then
//! sends only what the destination lacks: the pages of the round that was
//! cut that did not arrive, every page written since, the written blocks of
//! that round, and the disks' first copy from where it stands there.

use std::time::{Duration, Instant};

use wanmig_mem_sync::to_ranges;
use wanmig_transport::{FrameReceiver, FrameSender, TransportError};
use wanmig_types::{PAGE_SIZE_U64, PageRange, features};
use wanmig_vmm::memory::{DirtyPages, RegionDirty};
use wanmig_wire::{Message, ResumePoint, Rewind};

use super::error::SendError;
use super::link::{ANSWER_TIMEOUT, BulkSender, Link};
use super::run::{Run, Stage};
use crate::report::Phase;

/// First wait between two reconnection attempts; it doubles up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    matches!(e, SendError::Transport(_) | SendError::Closed)
        && !run.opts.resume_window.is_zero()
        && run.link.session.resume_request().is_some()
}

/// After the link failed with `cause`: reconnects, resumes, and says where
/// the migration goes on.
pub async fn after_outage(run: &mut Run<'_>, cause: SendError) -> Result<Stage, SendError> {
    let began = Instant::now();
    // A destination that gave up says so just before its connection goes.
    if let Some(reason) = run.link.peer_reason().await {
        return Err(SendError::Peer(format!("destination aborted: {reason}")));
    }
    // The guest runs on here while the link is down.
    if run.paused {
        run.vm.resume();
        run.paused = false;
    }
    run.summary.outages += 1;
    let handed = run.link.bulk.handed;
    let (ctl, rx, point) = reconnect(run, &cause, began).await?;
    let mut session = run.link.session.clone();
    let rewind = session.on_resumed(&point)?;
    let agreed = session.features();
    let xbzrle = if agreed & features::XBZRLE != 0 { run.opts.xbzrle_cache } else { 0 };
    let zstd = run.opts.compress && agreed & features::ZSTD != 0;
    // A new stream, compressor and delta cache: the peer's are new too.
    let bulk = BulkSender::new(run.conn.open_bulk().await?, xbzrle, zstd, run.steer.tunables().max_bandwidth)?;
    let deadline = run.link.deadline + began.elapsed();
    (run.link, _) = Link::new(ctl, rx, bulk, session, deadline);
    let stage = next_stage(run, &rewind, &point, handed)?;
    run.summary.outage_ms += began.elapsed().as_secs_f64() * 1e3;
    Ok(stage)
}

/// Reconnects with backoff until the destination takes the migration up
/// again, or the resume window ends.
async fn reconnect(
    run: &mut Run<'_>,
    cause: &SendError,
    began: Instant,
) -> Result<(FrameSender, FrameReceiver, ResumePoint), SendError> {
    let window = run.opts.resume_window;
    let request = run.link.session.resume_request().ok_or_else(|| SendError::Refused("nothing to resume".into()))?;
    let mut backoff = FIRST_BACKOFF;
    let mut last: Option<TransportError> = None;
    for attempt in 1u32.. {
        let left = window.saturating_sub(began.elapsed());
        if left.is_zero() {
            let why = last.map_or_else(|| wanmig_types::error_chain(cause), |e| wanmig_types::error_chain(&e));
            return Err(SendError::Peer(format!(
                "the link stayed down longer than the resume window ({window:?}): {why}"
            )));
        }
        run.report.update(|p| {
            p.phase = Phase::Reconnecting;
            (p.reconnect_attempt, p.resume_left_s) = (attempt, left.as_secs_f64());
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
                return Ok((tx, rx, point));
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
    Ok(Stage::Precopy(Some(resend)))
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
