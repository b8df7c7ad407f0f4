//! The source side: runs in the process that owns the VM (`wanmig run`),
//! reached through its control socket by `wanmig send`.
//!
//! [`send`] connects, agrees on the session, copies the disks, runs the
//! pre-copy rounds, stops and copies, and commits; an operator may watch,
//! steer and cancel it meanwhile through its [`Steering`]. Any failure (or
//! a cancel) before `Commit` resumes the guest here with nothing lost.
//! After `Commit` (by default right behind the device state) the guest
//! stays paused until the destination's decision is heard: its
//! acknowledgement, its abort, or its answer to a resume after an outage
//! (`resume.rs`); it runs here again only if the destination did not
//! commit. A decision never heard within the resume window leaves it paused
//! and in doubt until `wanmig settle`.
//!
//! The files: [`options`] (what to do), [`vm`] (what it needs of the VM),
//! `link.rs` (streams and the session machine), `progress.rs`, `run.rs`
//! (one migration's state), `disk.rs` (the disks' copy), `memory.rs` (the
//! pre-copy rounds), `switchover.rs` (stop-and-copy and commit).

pub mod connector;
mod disk;
mod error;
mod link;
mod memory;
pub mod options;
mod postcopy;
mod progress;
mod resume;
mod run;
mod switchover;
pub mod vm;

use std::sync::Arc;
use std::time::{Duration, Instant};

use wanmig_transport::Conn;
use wanmig_types::{MigrationId, error_chain, features};
use wanmig_vmm::memory::DirtyPages;
use wanmig_wire::{FailureOutcome, SourceEvent, SourceSession, Stream};

pub use crate::handover::{TunnelLifetime, TunnelRequest};
pub use connector::Connector;
pub use error::SendError;
pub use link::BATCH_BYTES;
pub use options::{DiskBase, PostcopyMode, SendOptions};
pub use resume::TAKEN_UP_AGAIN;
pub use vm::{SourceVm, shape_of};

use self::disk::DiskCopy;
use self::link::{ANSWER_TIMEOUT, BulkSender, Link};
use self::progress::Reporter;
use self::run::{Run, Stage};
use crate::handover;
use crate::journal::{SourceJournal, SourcePhase, SourceRecord};
use crate::report::{Outcome, Progress, Summary};
use crate::steer::Steering;

/// How a migration ended at the source.
#[derive(Debug)]
pub struct SendResult {
    /// The outcome.
    pub outcome: Outcome,
    /// The summary (its `error` says why, when it failed).
    pub summary: Summary,
    /// After a migration that asked for one, the network tunnel's source
    /// end, running.
    pub tunnel: Option<handover::TunnelRun>,
}

/// Live-migrates `vm` as `opts` says, steered by `steer`, reporting progress
/// to `progress`. Connects over QUIC; the VM runs here again after
/// `FailedSourceRunning`, stays paused after `InDoubt`.
pub fn send(
    vm: &mut dyn SourceVm,
    opts: &SendOptions,
    steer: &Steering,
    progress: &mut dyn FnMut(&Progress),
) -> SendResult {
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let summary = Summary { error: Some(format!("cannot start the async runtime: {e}")), ..Summary::default() };
            return SendResult { outcome: Outcome::FailedSourceRunning, summary, tunnel: None };
        }
    };
    let (outcome, summary, started) = rt.block_on(async {
        let pins = [opts.peer];
        let connect = wanmig_transport::connect(opts.dest, &opts.identity, &pins, opts.tuning);
        let conn = tokio::select! {
            c = connect => c.map_err(SendError::from),
            c = steer.cancelled() => Err(SendError::Cancelled(c.0)),
        };
        let mut connector = Connector::Quic {
            dest: opts.dest,
            identity: opts.identity_dir.clone(),
            peer: opts.peer,
            tuning: opts.tuning,
        };
        match conn {
            Ok(conn) => send_on(conn, &mut connector, vm, opts, steer, progress).await,
            Err(e) => {
                let summary = Summary {
                    error: Some(error_chain(&e)),
                    cancelled: matches!(e, SendError::Cancelled(_)),
                    ..Summary::default()
                };
                (Outcome::FailedSourceRunning, summary, None)
            }
        }
    });
    match started {
        Some(s) if outcome == Outcome::Migrated => {
            SendResult { outcome, summary, tunnel: Some(handover::TunnelRun::new(s, Arc::new(rt))) }
        }
        _ => {
            rt.shutdown_timeout(Duration::from_secs(1));
            SendResult { outcome, summary, tunnel: None }
        }
    }
}

/// [`send`] on a connection already made (QUIC, or an in-memory pair in
/// tests), making new ones with `connector` to resume after an outage.
/// Returns the outcome, the summary and, after a migration that asked for
/// it, the tunnel's source end started on the connection.
pub async fn send_on(
    mut conn: Conn,
    connector: &mut Connector,
    vm: &mut dyn SourceVm,
    opts: &SendOptions,
    steer: &Steering,
    progress: &mut dyn FnMut(&Progress),
) -> (Outcome, Summary, Option<handover::Started>) {
    let start = Instant::now();
    let journal = SourceJournal::new(&opts.state_dir, &vm.config().name);
    let mut summary = Summary { memory_bytes: vm.ram().size(), ..Summary::default() };
    let mut session = None;
    let result = {
        let ends = Ends { conn: &mut conn, connector };
        // A cancel is the attempt's to handle: it tells the destination.
        attempt(ends, vm, opts, steer, progress, &journal, &mut summary, &mut session).await
    };
    finish_summary(&mut summary, start);
    let outcome = settle_locally(vm, opts, &journal, session.as_ref(), &result, &mut summary, &conn).await;
    let started = match (result, outcome) {
        (Ok(()), Outcome::Migrated) => handover_tunnel(conn, vm, opts, &mut summary).await,
        _ => None,
    };
    (outcome, summary, started)
}

fn finish_summary(summary: &mut Summary, start: Instant) {
    let secs = start.elapsed().as_secs_f64();
    summary.total_ms = secs * 1e3;
    summary.effective_rate = summary.memory_bytes as f64 / secs;
    summary.compression_ratio = match summary.bytes.pages {
        0 => 1.0,
        p => summary.bytes.pages_uncompressed as f64 / p as f64,
    };
}

/// The session as far as it got, kept outside the attempt so that a
/// failure or a cancel at any await point can be judged by it.
type SessionSlot = Option<SourceSession>;

/// The connection in use and how to make another.
struct Ends<'a> {
    conn: &'a mut Conn,
    connector: &'a mut Connector,
}

/// Everything from the hello to the commit acknowledgement.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    ends: Ends<'_>,
    vm: &mut dyn SourceVm,
    opts: &SendOptions,
    steer: &Steering,
    progress: &mut dyn FnMut(&Progress),
    journal: &SourceJournal,
    summary: &mut Summary,
    slot: &mut SessionSlot,
) -> Result<(), SendError> {
    if opts.sync && vm.config().disks.is_empty() {
        return Err(SendError::Refused("the VM has no disks to sync".into()));
    }
    let report = Reporter::new(steer, progress, opts.dest.to_string());
    // Cancelled before the transfer: the connection's close says so.
    let (mut rec, link) = tokio::select! {
        r = negotiate(ends.conn, &*vm, opts, journal, summary, slot) => r?,
        c = steer.cancelled() => return Err(SendError::Cancelled(c.0)),
    };
    let copy_disks = link.session.features() & features::DISK_COPY != 0 && !vm.config().disks.is_empty();
    let disks = match copy_disks {
        true => {
            let mut d = DiskCopy::new(&*vm, open_store(opts)?)?;
            d.start_from_bases(&link.session.based(), &opts.disk_bases);
            Some(d)
        }
        false => None,
    };
    let mut run = Run::new(vm, opts, link, summary, report, steer, disks, ends.conn, ends.connector);
    // A cancel stops the transfer wherever it is, and the destination hears
    // it on the control stream (a closed stream alone would look like an
    // outage to a destination that keeps attempts for a resume).
    let result = tokio::select! {
        r = transfer(&mut run, journal, &mut rec) => Some(r),
        _ = steer.cancelled(), if !steer.committed() => None,
    };
    let result = match result {
        Some(r) => r,
        None => {
            let why = steer.cancel_requested().unwrap_or_default();
            // Not delivered (a send the cancel cut short tore the stream):
            // the connection's close says it, before the stream's end could
            // pass for an outage.
            if !run.link.abort(&format!("cancelled: {why}")).await {
                run.conn.close(wanmig_transport::CLOSE_CANCELLED);
            }
            Err(SendError::Cancelled(why))
        }
    };
    run.unthrottle_disks();
    let result = match result {
        Err(e) if matches!(e, SendError::Cancelled(_)) => Err(e),
        Err(e) => match resume::heard_abort(&mut run).await {
            Some(reason) => Err(SendError::Peer(format!("destination aborted: {reason}"))),
            None => Err(e),
        },
        ok => ok,
    };
    // What the failure means is judged by the session as it ended.
    *slot = Some(run.link.session.clone());
    result
}

fn open_store(opts: &SendOptions) -> Result<Option<Arc<wanmig_dedup::ChunkStore>>, SendError> {
    let Some(dir) = &opts.store else { return Ok(None) };
    let store = wanmig_dedup::ChunkStore::open(dir).map_err(|e| SendError::Disk(error_chain(&e)))?;
    Ok(Some(Arc::new(store)))
}

/// Opens the control stream, journals the migration, says hello and checks
/// the destination's answer; then opens the bulk stream.
async fn negotiate(
    conn: &mut Conn,
    vm: &dyn SourceVm,
    opts: &SendOptions,
    journal: &SourceJournal,
    summary: &mut Summary,
    slot: &mut SessionSlot,
) -> Result<(SourceRecord, Link), SendError> {
    let tunnel = match &opts.tunnel {
        Some(req) if !opts.sync => Some(
            handover::source_config(req, &vm.config().nets)
                .map_err(|e| SendError::Refused(format!("cannot run the network tunnel: {e}")))?,
        ),
        _ => None,
    };
    let mut offer = if opts.sync { features::ALL } else { features::ALL & !features::SYNC_ONLY };
    if tunnel.is_none() {
        offer &= !features::TUNNEL;
    }
    // A sync hands no VM over: it keeps the classic commit after Ready, and
    // a failure after it lets the guest run on here at once rather than
    // wait paused for the destination's decision.
    if opts.sync || !opts.early_commit {
        offer &= !features::EARLY_COMMIT;
    }
    if opts.sync {
        offer &= !features::SETTLE_ON_RESUME;
    }
    if opts.resume_window.is_zero() {
        offer &= !features::RESUME;
    }
    let id = MigrationId::new();
    summary.migration_id = id.to_string();
    let mut rec = SourceRecord {
        migration_id: id,
        vm: vm.config().name.clone(),
        dest: opts.dest.to_string(),
        peer: opts.peer.to_string(),
        identity: opts.identity_dir.clone(),
        phase: SourcePhase::Started,
        updated_unix: 0,
    };
    if !opts.sync {
        journal.record(&mut rec, SourcePhase::Started)?;
    }
    let (mut ctl, mut rx) = conn.open_control().await?;
    let mut session = SourceSession::new();
    let bases: Vec<Option<MigrationId>> =
        (0..vm.config().disks.len()).map(|i| opts.disk_bases.get(i).cloned().flatten().map(|b| b.since)).collect();
    let hello = session.hello(id, shape_of(vm), offer, opts.chunking, resume::secret()?, bases)?;
    summary.bytes.total += ctl.send(&hello).await? as u64;
    let answer = rx.recv_timeout(ANSWER_TIMEOUT).await?.ok_or(SendError::Closed)?;
    let event = session.on_message(Stream::Control, &answer);
    *slot = Some(session.clone());
    match event? {
        SourceEvent::Accepted { .. } => {}
        SourceEvent::Refused(reason) => return Err(SendError::Peer(format!("refused: {reason}"))),
        e => return Err(SendError::Peer(format!("{e:?} instead of an answer to the hello"))),
    }
    let agreed = session.features();
    let refusal = match () {
        () if opts.sync
            && agreed & (features::SYNC_ONLY | features::DISK_COPY) != features::SYNC_ONLY | features::DISK_COPY =>
        {
            Some("the destination does not take disk syncs (it runs with --shared-disks)")
        }
        () if tunnel.is_some() && agreed & features::TUNNEL == 0 => Some(
            "the destination cannot run the network tunnel's end (it needs a TAP for the VM's first NIC: receive --tap)",
        ),
        () => None,
    };
    if let Some(reason) = refusal {
        if let Ok(abort) = session.abort(reason) {
            let _ = ctl.send(&abort).await;
        }
        return Err(SendError::Refused(reason.into()));
    }
    let rate = opts.max_bandwidth.map(|max| opts.min_bandwidth.unwrap_or(max).min(max));
    let xbzrle = if agreed & features::XBZRLE != 0 { opts.xbzrle_cache } else { 0 };
    let bulk = BulkSender::new(conn.open_bulk().await?, xbzrle, opts.compress && agreed & features::ZSTD != 0, rate)?;
    let (link, _) = Link::new(ctl, rx, bulk, session, Instant::now() + opts.timeout);
    Ok((rec, link))
}

/// What the failure (or success) means for the VM here: resumed (before
/// the commit), left paused (in doubt), or handed over. The journal is
/// brought in line.
#[allow(clippy::too_many_arguments)]
async fn settle_locally(
    vm: &mut dyn SourceVm,
    opts: &SendOptions,
    journal: &SourceJournal,
    session: Option<&SourceSession>,
    result: &Result<(), SendError>,
    summary: &mut Summary,
    conn: &Conn,
) -> Outcome {
    let failure = session.map_or(FailureOutcome::ResumeSource, SourceSession::on_failure);
    let resume = |vm: &mut dyn SourceVm, summary: &mut Summary| {
        vm.set_throttle(0);
        let _ = vm.set_dirty_logging(false);
        if let Err(e) = vm.reclaim_disks() {
            summary.error = Some(format!(
                "{}; and the disk images could not be locked again: {}",
                summary.error.as_deref().unwrap_or("failed"),
                error_chain(&e)
            ));
        }
        vm.resume();
    };
    DiskCopy::unthrottle(&*vm);
    match (result, failure) {
        (Ok(()), _) | (Err(_), FailureOutcome::Done) if opts.sync => {
            resume(vm, summary);
            Outcome::Synced
        }
        (Ok(()), _) | (Err(_), FailureOutcome::Done) => Outcome::Migrated,
        // The guest ran at the destination: never run it here.
        (Err(e), FailureOutcome::Postcopy) => {
            summary.error = Some(match e {
                SendError::PostcopyLost(_) => error_chain(e),
                e => error_chain(&SendError::PostcopyLost(error_chain(e))),
            });
            Outcome::PostcopyLost
        }
        (Err(e), FailureOutcome::InDoubt) if !opts.sync => {
            summary.error = Some(error_chain(e));
            Outcome::InDoubt
        }
        (Err(e), _) => {
            summary.error = Some(error_chain(e));
            summary.cancelled = matches!(e, SendError::Cancelled(_));
            // The destination hears why (it may already know), then the
            // connection goes.
            if summary.cancelled {
                conn.close(wanmig_transport::CLOSE_CANCELLED);
            }
            if let Err(je) = journal.clear() {
                summary.error = Some(format!("{}; and the journal: {}", error_chain(e), error_chain(&je)));
            }
            resume(vm, summary);
            Outcome::FailedSourceRunning
        }
    }
}

/// After the commit: starts the network tunnel's source end, if asked for.
/// The VM runs at the destination whatever happens here.
async fn handover_tunnel(
    mut conn: Conn,
    vm: &dyn SourceVm,
    opts: &SendOptions,
    summary: &mut Summary,
) -> Option<handover::Started> {
    let config = opts.tunnel.as_ref().and_then(|req| handover::source_config(req, &vm.config().nets).ok());
    let Some(config) = config.filter(|_| !opts.sync) else {
        conn.close(0);
        return None;
    };
    let interface = config.role.interface().to_string();
    let started = async {
        let (tx, rx) = conn.open_control().await.map_err(|e| e.to_string())?;
        wanmig_tunnel::Tunnel::start(config, tx, rx).await.map_err(|e| e.to_string())
    };
    match started.await {
        Ok(tunnel) => {
            summary.tunnel = Some(format!("forwarding for the guest through {interface}"));
            Some(handover::Started { tunnel, conn })
        }
        Err(e) => {
            summary.tunnel = Some(format!("failed to start: {e}"));
            conn.close(0);
            None
        }
    }
}

/// The disks, the memory, the stop-and-copy and the commit, stage by
/// stage; a link that fails before the commit is resumed (within the
/// window) and the migration goes on from what the destination holds.
async fn transfer(run: &mut Run<'_>, journal: &SourceJournal, rec: &mut SourceRecord) -> Result<(), SendError> {
    let mut stage = match &run.disks {
        Some(_) => Stage::FirstCopy,
        None if run.opts.sync => Stage::StopAndCopy(DirtyPages { regions: Vec::new() }),
        None => Stage::Precopy(None),
    };
    loop {
        let next = match std::mem::replace(&mut stage, Stage::Done) {
            Stage::FirstCopy => first_copy(run).await,
            Stage::DiskRounds => memory::disk_rounds(run).await.map(|()| match run.opts.sync {
                true => Stage::StopAndCopy(DirtyPages { regions: Vec::new() }),
                false => Stage::Precopy(None),
            }),
            // Every page is missing there (no dirty log ran to say less).
            Stage::Precopy(_) if run.opts.postcopy == PostcopyMode::Now && !run.opts.sync => {
                match postcopy_agreed(run) {
                    true => Ok(Stage::Postcopy(vm::all_pages(&*run.vm), "asked for (--postcopy now)".into())),
                    false => {
                        Err(SendError::Refused("--postcopy now, but the destination does not take post-copy".into()))
                    }
                }
            }
            Stage::Precopy(resend) => memory::precopy(run, resend).await.map(|(pending, switch)| match switch {
                Some(why) => Stage::Postcopy(pending, why),
                None => Stage::StopAndCopy(pending),
            }),
            Stage::Postcopy(pending, why) => {
                run.summary.disk = run.disks.as_ref().map(|d| d.stats.clone());
                postcopy::run_postcopy(run, journal, rec, pending, why).await.map(|()| Stage::Done)
            }
            Stage::StopAndCopy(pending) => switchover::stop_and_copy(run, pending).await.map(Stage::Commit),
            Stage::Resend(pages) => switchover::resend(run, pages).await.map(Stage::Commit),
            Stage::Commit(paused_at) => {
                run.summary.disk = run.disks.as_ref().map(|d| d.stats.clone());
                switchover::commit(run, journal, rec, paused_at).await.map(|()| Stage::Done)
            }
            Stage::Done => return Ok(()),
        };
        stage = match next {
            Ok(Stage::Done) => return Ok(()),
            Ok(s) => s,
            Err(e) if resume::resumable(run, &e) => resume::after_outage(run, e, journal, rec).await?,
            Err(e) => return Err(e),
        };
    }
}

/// Whether both sides agreed to post-copy (a destination may not speak it).
fn postcopy_agreed(run: &Run<'_>) -> bool {
    run.link.session.features() & features::POSTCOPY != 0 && !run.opts.sync
}

/// The first copy of the disks, then the round boundary that makes the
/// destination hash what it wrote.
async fn first_copy(run: &mut Run<'_>) -> Result<Stage, SendError> {
    let Some(mut d) = run.disks.take() else { return Ok(Stage::DiskRounds) };
    run.report.phase(crate::report::Phase::DiskCopy);
    let chunking = run.link.session.chunking();
    let r = d.first_copy(&mut run.link, &mut run.summary.bytes, chunking, &mut run.report, run.steer).await;
    run.disks = Some(d);
    r?;
    run.link.end_round(0, &mut run.summary.bytes).await?;
    Ok(Stage::DiskRounds)
}
