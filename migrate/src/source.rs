//! The source side: iterative pre-copy from the dirty log, stop-and-copy,
//! and the two-phase commit, driving the [`wanmig_wire::Source`] machine.
//!
//! Runs inside the process that owns the VM (`wanmig run`). Any failure
//! before `Commit` resumes the guest here with nothing lost; after
//! `Commit` the guest never runs here again, and a lost acknowledgement is
//! reported as in doubt with the guest left paused.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::compress;
use wanmig_mem_sync::encode::{Encoded, PageEncoder};
use wanmig_mem_sync::policy::{ConvergencePolicy, Decision, DowntimeBudget, RateLimit, RoundReport, next_round_rate};
use wanmig_transport::{Fingerprint, FrameSender, Identity, LinkTuning, TransportError};
use wanmig_types::error_chain;
use wanmig_vmm::control::MigrateOutcome;
use wanmig_vmm::memory::{DirtyPages, RegionDirty};
use wanmig_vmm::{Vm, VmError};
use wanmig_wire::{
    ChunkParams, DiskInfo, FailureOutcome, Message, NicInfo, PageData, PageRef, PagesBuilder, ProtocolError, Source,
    VmShape, features,
};

use crate::disk_source::DiskCopy;
use crate::handover;
use crate::report::{Event, RoundStat, Summary, WireBytes};

/// How to migrate.
#[derive(Debug)]
pub struct SendOptions {
    /// Destination.
    pub dest: SocketAddr,
    /// This host's identity.
    pub identity: Identity,
    /// The destination's pinned fingerprint.
    pub peer: Fingerprint,
    /// Downtime budget.
    pub downtime: Duration,
    /// Bandwidth cap, bytes/s.
    pub max_bandwidth: Option<f64>,
    /// With a cap: Clark et al.'s dynamic rate, starting here (bytes/s) and
    /// running each round at the last round's dirty rate plus this much.
    pub min_bandwidth: Option<f64>,
    /// Give up after this long (before commit).
    pub timeout: Duration,
    /// Window sizing.
    pub tuning: LinkTuning,
    /// XBZRLE cache size, bytes (0 disables delta encoding).
    pub xbzrle_cache: usize,
    /// zstd-compress page batches.
    pub compress: bool,
    /// How to cut disk images (the destination may answer with its own).
    pub chunking: ChunkParams,
    /// This host's chunk store: keep every chunk of the disks there, so a
    /// later move back here sends only what changed.
    pub store: Option<std::path::PathBuf>,
    /// Only copy the disks (`wanmig sync`); the VM keeps running here.
    pub sync: bool,
    /// Leave the network tunnel running after the commit ([`crate::handover`]).
    pub tunnel: Option<wanmig_vmm::control::TunnelRequest>,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// A VM operation failed.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The destination refused or aborted.
    #[error("{0}")]
    Peer(String),
    /// The guest would not converge.
    #[error("{0}")]
    NoConvergence(String),
    /// The migration took longer than allowed.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection.
    #[error("the destination closed the connection")]
    Closed,
    /// Reading a disk image or the local chunk store failed.
    #[error("disk copy: {0}")]
    Disk(String),
}

/// Largest encoded batch before it is sent: 1024 whole pages, the unit
/// zstd compresses (4 MiB gave 6% fewer wire bytes than 1 MiB on the test
/// guest, `cargo bench -p wanmig --bench migrate`).
pub const BATCH_BYTES: usize = 4 << 20;
/// How long to wait for the destination's answer to the hello, and at
/// least how long for any later answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Live-migrates `vm`. Returns how it ended, the summary, and (after a
/// migration asked to leave one) the network tunnel's source end, running;
/// the VM is running here again after `FailedSourceRunning`, paused after
/// `InDoubt`.
pub fn send(
    vm: &mut Vm,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Event),
) -> (MigrateOutcome, Summary, Option<handover::TunnelRun>) {
    let start = Instant::now();
    let mut session = Source::Start;
    let mut summary = Summary { memory_bytes: vm.ram().size(), ..Summary::default() };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            summary.error = Some(format!("cannot start the async runtime: {e}"));
            return (MigrateOutcome::FailedSourceRunning, summary, None);
        }
    };
    let mut handed_over = None;
    let result = rt.block_on(run(vm, opts, progress, &mut session, &mut summary, &mut handed_over));
    summary.total_ms = start.elapsed().as_secs_f64() * 1e3;
    summary.effective_rate = summary.memory_bytes as f64 / start.elapsed().as_secs_f64();
    summary.compression_ratio = if summary.bytes.pages > 0 {
        summary.bytes.pages_uncompressed as f64 / summary.bytes.pages as f64
    } else {
        1.0
    };
    DiskCopy::unthrottle(vm);
    let resume = |vm: &mut Vm| {
        vm.set_throttle(0);
        let _ = vm.set_dirty_logging(false);
        vm.resume();
    };
    let outcome = match result {
        // A sync hands nothing over: the VM goes on here.
        Ok(()) if opts.sync => {
            resume(vm);
            MigrateOutcome::Synced
        }
        Ok(()) => MigrateOutcome::Migrated,
        Err(e) => {
            summary.error = Some(error_chain(&e));
            match session.on_failure() {
                FailureOutcome::ResumeSource => {
                    resume(vm);
                    MigrateOutcome::FailedSourceRunning
                }
                // After a sync's commit the destination only keeps a replica.
                FailureOutcome::InDoubt | FailureOutcome::Done if opts.sync => {
                    resume(vm);
                    MigrateOutcome::FailedSourceRunning
                }
                FailureOutcome::InDoubt => MigrateOutcome::InDoubt,
                FailureOutcome::Done => MigrateOutcome::Migrated,
            }
        }
    };
    match handed_over {
        Some(started) if outcome == MigrateOutcome::Migrated => {
            (outcome, summary, Some(handover::TunnelRun::new(started, rt)))
        }
        _ => {
            rt.shutdown_timeout(Duration::from_secs(1));
            (outcome, summary, None)
        }
    }
}

/// What the destination must host.
pub fn shape_of(vm: &Vm) -> VmShape {
    let c = vm.config();
    VmShape {
        name: c.name.clone(),
        memory: vm.ram().regions().into_iter().map(|(s, l)| (s.0, l)).collect(),
        vcpus: c.vcpus,
        disks: c
            .disks
            .iter()
            .map(|d| DiskInfo {
                size: std::fs::metadata(&d.path).map(|m| m.len()).unwrap_or(0),
                path: d.path.to_string_lossy().into_owned(),
                read_only: d.read_only,
            })
            .collect(),
        nics: c
            .nets
            .iter()
            .map(|n| NicInfo { mac: n.mac.0, ipv4: n.ip.map(|ip| (ip.addr.octets(), ip.prefix)) })
            .collect(),
    }
}

fn all_pages(vm: &Vm) -> DirtyPages {
    let regions = vm
        .ram()
        .regions()
        .into_iter()
        .map(|(start, len)| RegionDirty {
            start,
            ranges: vec![wanmig_mem_sync::PageRange { first: 0, count: len / wanmig_mem_sync::PAGE_SIZE as u64 }],
        })
        .collect();
    DirtyPages { regions }
}

/// Sends on the bulk stream: encodes pages, compresses every data message
/// through the migration's one zstd stream, paces to the bandwidth cap,
/// and keeps count of what went on the wire.
pub(crate) struct BulkSender {
    stream: FrameSender,
    encoder: PageEncoder,
    /// One zstd stream for every batch (when the destination speaks zstd).
    zstd: Option<compress::StreamCompressor>,
    limit: Option<RateLimit>,
    last_send: Instant,
    page: [u8; wanmig_mem_sync::PAGE_SIZE],
}

impl BulkSender {
    async fn send_pages(
        &mut self,
        vm: &Vm,
        pages: &DirtyPages,
        round: u32,
        wire: &mut WireBytes,
    ) -> Result<(u64, u64), SendError> {
        let mem = vm.ram().mem();
        let (mut sent_pages, mut sent_bytes) = (0u64, 0u64);
        let mut b = PagesBuilder::new(round);
        for region in &pages.regions {
            for range in &region.ranges {
                for p in range.first..range.end() {
                    let gpa = region.start.0 + p * wanmig_mem_sync::PAGE_SIZE as u64;
                    // A copy: the guest may be writing this page right now;
                    // if so it is dirty again and goes in a later round.
                    mem.read_slice(&mut self.page, GuestAddress(gpa)).map_err(|e| SendError::Peer(e.to_string()))?;
                    let data = match self.encoder.encode(gpa, &self.page) {
                        Encoded::Zero => PageData::Zero,
                        Encoded::Delta => PageData::Delta(self.encoder.delta()),
                        Encoded::Raw => PageData::Raw(&self.page),
                    };
                    b.push(PageRef { gpa, data });
                    if b.is_full() || b.bytes() >= BATCH_BYTES {
                        sent_pages += u64::from(b.len());
                        let full = std::mem::replace(&mut b, PagesBuilder::new(round));
                        sent_bytes += self.send_message(&Message::Pages(full.finish()), wire).await? as u64;
                    }
                }
            }
        }
        if !b.is_empty() {
            sent_pages += u64::from(b.len());
            sent_bytes += self.send_message(&Message::Pages(b.finish()), wire).await? as u64;
        }
        let enc = self.encoder.stats;
        (wire.raw_pages, wire.delta_pages, wire.zero_pages) = (enc.raw_pages, enc.delta_pages, enc.zero_pages);
        Ok((sent_pages, sent_bytes))
    }

    /// Sends a data message (pages, a chunk, written extents) compressed
    /// when agreed, or any other bulk message as it is; returns wire bytes.
    pub(crate) async fn send_message(&mut self, msg: &Message, wire: &mut WireBytes) -> Result<usize, SendError> {
        let frame = msg.encode();
        let is_pages = matches!(msg, Message::Pages(_));
        if is_pages {
            wire.pages_uncompressed += frame.len() as u64;
        }
        // Once in the stream, every data message must go through it (the
        // peer's decoder needs all of the history).
        let frame = match (&mut self.zstd, msg) {
            (Some(z), Message::Pages(_) | Message::DiskChunk(_) | Message::DiskWrites(_)) => {
                let body = &frame[4..];
                let data = z.compress(body).map_err(|e| SendError::Peer(format!("zstd: {e}")))?;
                Message::Compressed { raw_len: body.len() as u32, data }.encode()
            }
            _ => frame,
        };
        let n = self.stream.send_encoded(&frame).await?;
        if is_pages {
            wire.pages += n as u64;
        } else if !matches!(msg, Message::RoundDone { .. }) {
            wire.disk += n as u64;
        }
        wire.total += n as u64;
        if let Some(limit) = &mut self.limit {
            let wait = limit.spend(n as u64, self.last_send.elapsed());
            self.last_send = Instant::now();
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        Ok(n)
    }
}

/// Moves the machine on with `step`, applied to a copy: if the step fails,
/// `session` keeps the state it had, which is what decides whether a
/// failure resumes the guest here (before commit) or leaves it in doubt.
/// Never evaluate anything fallible between taking the state and putting
/// the next one back.
fn advance<T>(
    session: &mut Source,
    step: impl FnOnce(Source) -> Result<(Source, T), ProtocolError>,
) -> Result<T, ProtocolError> {
    let (next, out) = step(session.clone())?;
    *session = next;
    Ok(out)
}

/// [`advance`] for a received message.
pub(crate) fn receive(session: &mut Source, msg: &Message) -> Result<(), ProtocolError> {
    advance(session, |s| Ok((s.on_message(msg)?, ())))
}

/// The destination's next message. It may take a while: a round ends when
/// the destination has applied it, and a highly compressible round can sit
/// in flight as many times the flow-control window of page data. So wait
/// until the migration's own deadline (and at least [`ANSWER_TIMEOUT`]).
pub(crate) async fn next_answer(
    msgs: &mut mpsc::Receiver<Result<Message, TransportError>>,
    deadline: Instant,
) -> Result<Message, SendError> {
    let wait = deadline.saturating_duration_since(Instant::now()).max(ANSWER_TIMEOUT);
    match tokio::time::timeout(wait, msgs.recv()).await {
        Err(_) => Err(SendError::Timeout(wait)),
        Ok(None) => Err(SendError::Closed),
        Ok(Some(r)) => Ok(r?),
    }
}

/// Waits until the destination has applied `round`.
async fn round_applied(
    msgs: &mut mpsc::Receiver<Result<Message, TransportError>>,
    session: &mut Source,
    deadline: Instant,
    round: u32,
) -> Result<(), SendError> {
    loop {
        let m = next_answer(msgs, deadline).await?;
        receive(session, &m)?;
        if let Source::Aborted(reason) = session {
            return Err(SendError::Peer(reason.clone()));
        }
        if m == (Message::RoundApplied { round }) {
            return Ok(());
        }
    }
}

/// Most rounds of written extents before memory pre-copy joins anyway.
const MAX_DISK_ROUNDS: u32 = 30;

/// The destination's reason, when it aborted: an `Abort` it sent just
/// before dropping the connection may arrive after the failure it causes
/// here (a reset stream), and says much more.
type AbortNote = std::sync::Arc<std::sync::Mutex<Option<String>>>;

async fn run(
    vm: &mut Vm,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Event),
    session: &mut Source,
    summary: &mut Summary,
    handed_over: &mut Option<handover::Started>,
) -> Result<(), SendError> {
    let note = AbortNote::default();
    let result = run_session(vm, opts, progress, session, summary, note.clone(), handed_over).await;
    if let Err(SendError::Transport(_) | SendError::Closed) = &result {
        for _ in 0..10 {
            if let Some(reason) = note.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(SendError::Peer(format!("destination aborted: {reason}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    result
}

async fn run_session(
    vm: &mut Vm,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Event),
    session: &mut Source,
    summary: &mut Summary,
    note: AbortNote,
    handed_over: &mut Option<handover::Started>,
) -> Result<(), SendError> {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    if opts.sync && vm.config().disks.is_empty() {
        return Err(SendError::Disk("the VM has no disks to sync".into()));
    }
    let mut conn = wanmig_transport::connect(opts.dest, &opts.identity, &[opts.peer], opts.tuning).await?;
    let (mut ctl_tx, mut ctl_rx) = conn.open_control().await?;
    let tunnel_config = match &opts.tunnel {
        Some(req) if !opts.sync => Some(
            handover::source_config(req, &vm.config().nets)
                .map_err(|e| SendError::Peer(format!("cannot run the network tunnel: {e}")))?,
        ),
        _ => None,
    };
    let mut offer = if opts.sync { features::ALL } else { features::ALL & !features::SYNC_ONLY };
    if tunnel_config.is_none() {
        offer &= !features::TUNNEL;
    }
    let hello = advance(session, |s| s.hello(wanmig_types::MigrationId::new(), shape_of(vm), offer, opts.chunking))?;
    summary.bytes.total += ctl_tx.send(&hello).await? as u64;
    let answer = ctl_rx.recv_timeout(ANSWER_TIMEOUT).await?.ok_or(SendError::Closed)?;
    receive(session, &answer)?;
    if let Source::Aborted(reason) = session {
        return Err(SendError::Peer(reason.clone()));
    }
    let agreed = session.features().unwrap_or(0);
    let chunking = match &answer {
        Message::Accept { chunking, .. } => *chunking,
        _ => opts.chunking,
    };
    if opts.sync && agreed & (features::SYNC_ONLY | features::DISK_COPY) != features::SYNC_ONLY | features::DISK_COPY {
        let reason = "the destination does not take disk syncs (it runs with --shared-disks)";
        if let Ok(abort) = advance(session, |s| s.abort(reason)) {
            let _ = ctl_tx.send(&abort).await;
        }
        return Err(SendError::Peer(reason.into()));
    }
    if tunnel_config.is_some() && agreed & features::TUNNEL == 0 {
        let reason = "the destination cannot run the network tunnel's end (it needs a TAP for the VM's first NIC: receive --tap)";
        if let Ok(abort) = advance(session, |s| s.abort(reason)) {
            let _ = ctl_tx.send(&abort).await;
        }
        return Err(SendError::Peer(reason.into()));
    }
    progress(&Event::Connected { peer: opts.dest.to_string() });

    // Everything the destination says from now on arrives here, so that an
    // Abort is seen between batches.
    let (msg_tx, mut msgs) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let r = ctl_rx.recv().await;
            let last = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(m)) => {
                    if let Message::Abort { reason } = &m {
                        *note.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
                    }
                    Ok(m)
                }
                Ok(None) => Err(TransportError::Lost("the destination closed the control stream".into())),
                Err(e) => Err(e),
            };
            if msg_tx.send(item).await.is_err() || last {
                break;
            }
        }
    });

    let limit = opts.max_bandwidth.map(|max| RateLimit::new(opts.min_bandwidth.unwrap_or(max).min(max)));
    let mut bulk = BulkSender {
        stream: conn.open_bulk().await?,
        encoder: PageEncoder::new(if agreed & features::XBZRLE != 0 { opts.xbzrle_cache } else { 0 }),
        zstd: if opts.compress && agreed & features::ZSTD != 0 {
            Some(
                compress::StreamCompressor::new(compress::DEFAULT_LEVEL)
                    .map_err(|e| SendError::Peer(format!("zstd: {e}")))?,
            )
        } else {
            None
        },
        limit,
        last_send: Instant::now(),
        page: [0; wanmig_mem_sync::PAGE_SIZE],
    };
    let link_bytes_per_sec = opts.tuning.bandwidth_bps as f64 / 8.0;
    // What the link can carry: the cap, or else the expected bandwidth.
    let capacity = opts.max_bandwidth.unwrap_or(link_bytes_per_sec);
    let mut round = 0u32;

    // Disks first: they are the largest part, and memory pre-copy joins once
    // what the guest keeps writing is small.
    let mut disks = None;
    if agreed & features::DISK_COPY != 0 && !vm.config().disks.is_empty() {
        let store = match &opts.store {
            Some(dir) => Some(std::sync::Arc::new(
                wanmig_dedup::ChunkStore::open(dir).map_err(|e| SendError::Disk(error_chain(&e)))?,
            )),
            None => None,
        };
        let d = disks.insert(DiskCopy::new(vm, chunking, store)?);
        let bytes = &mut summary.bytes;
        d.first_copy(&mut ctl_tx, &mut bulk, bytes, &mut msgs, session, deadline, progress).await?;
        // A round boundary: the destination hashes what the first copy
        // wrote now, not inside the stop-and-copy.
        bulk.send_message(&Message::RoundDone { round, pages: 0 }, &mut summary.bytes).await?;
        round_applied(&mut msgs, session, deadline, round).await?;
        round += 1;
        let disk_started = Instant::now();
        for _ in 0..MAX_DISK_ROUNDS {
            if Instant::now() > deadline {
                return Err(SendError::Timeout(opts.timeout));
            }
            let pending = d.harvest();
            // Little enough to send inside half the downtime budget.
            let small = opts.downtime.as_secs_f64() / 2.0 * d.rate().max(capacity);
            if pending as f64 <= small.max(1048576.0) {
                break;
            }
            let t = Instant::now();
            let on_wire = summary.bytes.disk;
            let sent = d.send_pending(&mut bulk, &mut summary.bytes).await?;
            let on_wire = summary.bytes.disk - on_wire;
            bulk.send_message(&Message::RoundDone { round, pages: 0 }, &mut summary.bytes).await?;
            round_applied(&mut msgs, session, deadline, round).await?;
            let secs = t.elapsed().as_secs_f64();
            let written = d.harvest();
            d.after_round(on_wire, secs, written, capacity);
            summary.per_round.push(RoundStat {
                round,
                disk_bytes: sent,
                disk_dirty_bytes: written,
                ms: secs * 1e3,
                ..RoundStat::default()
            });
            progress(&Event::Disk {
                phase: "round".into(),
                bytes_done: sent,
                bytes_total: written,
                chunks_sent: d.stats.chunks_sent,
                chunks_present: d.stats.chunks_present,
                elapsed_s: disk_started.elapsed().as_secs_f64(),
            });
            round += 1;
        }
    }

    let pending = if opts.sync {
        DirtyPages { regions: Vec::new() }
    } else {
        let mut link = Link { bulk: &mut bulk, msgs: &mut msgs, ctl: &mut ctl_tx, deadline, round };
        let pending = precopy_memory(vm, opts, progress, session, summary, &mut link, disks.as_mut()).await?;
        round = link.round;
        pending
    };

    // Stop-and-copy: pause, send what is dirty, then the device state.
    // A throttled disk write must not hold up the pause.
    DiskCopy::unthrottle(vm);
    let paused_at = Instant::now();
    vm.pause()?;
    // Disk writes the guest saw complete must be on the images before
    // they are read for the last time (or another host opens them).
    vm.sync_disks()?;
    advance(session, |s| Ok((s.stop_and_copy()?, ())))?;
    let mut last_pages = 0;
    if !opts.sync {
        let last = vm.harvest_dirty()?;
        progress(&Event::StopAndCopy { dirty_pages: pending.pages() + last.pages() });
        let (p1, _) = bulk.send_pages(vm, &pending, round, &mut summary.bytes).await?;
        let (p2, _) = bulk.send_pages(vm, &last, round, &mut summary.bytes).await?;
        last_pages = p1 + p2;
    }
    if let Some(d) = &mut disks {
        d.finish(&mut bulk, &mut summary.bytes).await?;
    }
    bulk.send_message(&Message::RoundDone { round, pages: last_pages }, &mut summary.bytes).await?;
    bulk.stream.finish().await?;
    let since_pause = || paused_at.elapsed().as_secs_f64() * 1e3;
    summary.downtime_breakdown.last_pages_ms = since_pause();
    let state = if opts.sync {
        // A sync hands over no VM: its "device state" is empty.
        Vec::new()
    } else {
        let mut state = wanmig_vmm::state::encode(&vm.save_state()?);
        if agreed & features::ZSTD != 0 {
            state = compress::compress_blob(&state).map_err(|e| SendError::Peer(format!("zstd: {e}")))?;
        }
        state
    };
    summary.bytes.state = state.len() as u64;
    let msg = advance(session, |s| s.device_state(state))?;
    summary.bytes.total += ctl_tx.send(&msg).await? as u64;
    summary.downtime_breakdown.state_ms = since_pause();
    progress(&Event::Committing);
    summary.disk = disks.map(|d| d.stats);

    while *session == Source::AwaitReady {
        let answer = next_answer(&mut msgs, deadline).await?;
        receive(session, &answer)?;
    }
    summary.downtime_breakdown.ready_ms = since_pause();
    if let Source::Aborted(reason) = session {
        return Err(SendError::Peer(reason.clone()));
    }
    // The commit point: from here on the guest never runs on this host
    // (for a sync: the destination keeps the replica).
    let commit = advance(session, Source::commit)?;
    summary.bytes.total += ctl_tx.send(&commit).await? as u64;
    let answer = next_answer(&mut msgs, deadline).await?;
    receive(session, &answer)?;
    summary.downtime_ms = since_pause();
    summary.downtime_breakdown.commit_ack_ms = summary.downtime_ms;
    let Some(config) = tunnel_config else {
        conn.close(0);
        return Ok(());
    };
    // The VM runs at the destination now: a tunnel that fails to start is
    // reported, not a failed migration.
    let interface = config.role.interface().to_string();
    let started = async {
        let (tx, rx) = conn.open_control().await.map_err(|e| e.to_string())?;
        wanmig_tunnel::Tunnel::start(config, tx, rx).await.map_err(|e| e.to_string())
    };
    match started.await {
        Ok(tunnel) => {
            summary.tunnel = Some(format!("forwarding for the guest through {interface}"));
            *handed_over = Some(handover::Started { tunnel, conn });
        }
        Err(e) => {
            summary.tunnel = Some(format!("failed to start: {e}"));
            conn.close(0);
        }
    }
    Ok(())
}

/// Iterative memory pre-copy (Clark et al.): round 0 sends every page, each
/// later round what the guest dirtied meanwhile, with the disks' written
/// extents first, until the policy says the rest fits the downtime budget.
/// Returns the pages still to send.
async fn precopy_memory(
    vm: &mut Vm,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Event),
    session: &mut Source,
    summary: &mut Summary,
    link: &mut Link<'_>,
    mut disks: Option<&mut DiskCopy>,
) -> Result<DirtyPages, SendError> {
    let start = Instant::now();
    let Link { bulk, msgs, ctl: ctl_tx, deadline, round } = link;
    let deadline = *deadline;
    // Track writes from before the first page is read.
    vm.set_dirty_logging(true)?;
    vm.harvest_dirty()?;
    let mut policy = DowntimeBudget::new(opts.downtime);
    let mut to_send = all_pages(vm);
    let state_estimate = 64 * 1024 * u64::from(vm.config().vcpus);
    let (mut best_page_rate, mut best_link_rate) = (0f64, 0f64);
    let first_round = *round;
    loop {
        if Instant::now() > deadline {
            return Err(SendError::Timeout(opts.timeout));
        }
        let t = Instant::now();
        // A round, however large, is bounded by the migration's deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        let r = *round;
        let sending = async {
            let on_wire = summary.bytes.disk;
            let disk_sent = match disks.as_deref_mut() {
                Some(d) => {
                    d.harvest();
                    d.send_pending(bulk, &mut summary.bytes).await?
                }
                None => 0,
            };
            let disk_wire = summary.bytes.disk - on_wire;
            let (pages, bytes) = bulk.send_pages(vm, &to_send, r, &mut summary.bytes).await?;
            Ok::<_, SendError>((disk_sent, disk_wire, pages, bytes))
        };
        let (disk_sent, disk_wire, pages, bytes) =
            tokio::time::timeout(left, sending).await.map_err(|_| SendError::Timeout(opts.timeout))??;
        bulk.send_message(&Message::RoundDone { round: r, pages }, &mut summary.bytes).await?;
        // The round ends when the destination has applied it: the rate that
        // matters is the rate at which pages land, not at which they leave.
        round_applied(msgs, session, deadline, r).await?;
        let elapsed = t.elapsed();
        let secs = elapsed.as_secs_f64().max(1e-6);
        best_page_rate = best_page_rate.max(pages as f64 / secs);
        best_link_rate = best_link_rate.max(bytes as f64 / secs);
        let dirty = vm.harvest_dirty()?;
        let disk_dirty = match disks.as_deref_mut() {
            Some(d) => {
                let written = d.harvest();
                d.after_round(
                    disk_wire,
                    secs,
                    written,
                    opts.max_bandwidth.unwrap_or(opts.tuning.bandwidth_bps as f64 / 8.0),
                );
                written
            }
            None => 0,
        };
        let report = RoundReport {
            round: r,
            pages_sent: pages,
            bytes_sent: bytes,
            elapsed,
            dirty_pages: dirty.pages(),
            bytes_per_page: if pages > 0 { bytes as f64 / pages as f64 } else { 4096.0 },
            page_rate: best_page_rate,
            // Compressed rounds rarely fill the link, so what they achieved
            // says little about its capacity: take the expected bandwidth
            // when it is higher (it only prices the small device state).
            link_rate: best_link_rate.max(opts.tuning.bandwidth_bps as f64 / 8.0),
            // Disk extents still to write go out inside the downtime too.
            state_bytes: state_estimate + disk_dirty,
            rtt: opts.tuning.rtt.min(elapsed),
        };
        let decision = policy.decide(&report);
        progress(&Event::Round {
            round: r,
            pages,
            dirty_pages: report.dirty_pages,
            bytes_left: (report.dirty_pages as f64 * report.bytes_per_page) as u64 + disk_dirty,
            dirty_rate: report.dirty_rate() * 4096.0,
            link_rate: report.link_rate,
            predicted_downtime_ms: report.predicted_downtime().as_secs_f64() * 1e3,
            throttle: vm.throttle_percent(),
            elapsed_s: start.elapsed().as_secs_f64(),
        });
        summary.rounds = r + 1 - first_round;
        summary.per_round.push(RoundStat {
            round: r,
            pages_sent: pages,
            dirty_pages: report.dirty_pages,
            disk_bytes: disk_sent,
            disk_dirty_bytes: disk_dirty,
            ms: elapsed.as_secs_f64() * 1e3,
        });
        to_send = dirty;
        *round += 1;
        match decision {
            Decision::StopAndCopy => break,
            Decision::Continue => {}
            Decision::Throttle(p) => {
                vm.set_throttle(p);
                summary.max_throttle = summary.max_throttle.max(p);
            }
            Decision::GiveUp(reason) => {
                if let Ok(abort) = advance(session, |s| s.abort(&reason)) {
                    let _ = ctl_tx.send(&abort).await;
                }
                return Err(SendError::NoConvergence(reason));
            }
        }
        if let (Some(limit), Some(min), Some(max)) = (&mut bulk.limit, opts.min_bandwidth, opts.max_bandwidth) {
            limit.set_rate(next_round_rate(report.dirty_rate() * report.bytes_per_page, min, min, max));
        }
    }
    Ok(to_send)
}

/// The streams to the destination and the migration's deadline.
struct Link<'a> {
    bulk: &'a mut BulkSender,
    msgs: &'a mut mpsc::Receiver<Result<Message, TransportError>>,
    ctl: &'a mut FrameSender,
    deadline: Instant,
    /// The next round number (rounds of disk extents count too).
    round: u32,
}
