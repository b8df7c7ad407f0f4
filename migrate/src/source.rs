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
use wanmig_vmm::control::MigrateOutcome;
use wanmig_vmm::control::error_chain;
use wanmig_vmm::memory::{DirtyPages, RegionDirty};
use wanmig_vmm::{Vm, VmError};
use wanmig_wire::{
    DiskInfo, FailureOutcome, Message, PageData, PageRef, PagesBuilder, ProtocolError, Source, VmShape, features,
};

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
}

/// Largest encoded batch before it is sent: 1024 whole pages, the unit
/// zstd compresses (4 MiB gave 6% fewer wire bytes than 1 MiB on the test
/// guest, `cargo bench -p wanmig --bench migrate`).
pub const BATCH_BYTES: usize = 4 << 20;
/// How long to wait for the destination's answer to the hello, and at
/// least how long for any later answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Live-migrates `vm`. Returns how it ended and the summary; the VM is
/// running here again after `FailedSourceRunning`, paused after `InDoubt`.
pub fn send(vm: &mut Vm, opts: &SendOptions, progress: &mut dyn FnMut(&Event)) -> (MigrateOutcome, Summary) {
    let start = Instant::now();
    let mut session = Source::Start;
    let mut summary = Summary { memory_bytes: vm.ram().size(), ..Summary::default() };
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            summary.error = Some(format!("cannot start the async runtime: {e}"));
            return (MigrateOutcome::FailedSourceRunning, summary);
        }
    };
    let result = rt.block_on(run(vm, opts, progress, &mut session, &mut summary));
    summary.total_ms = start.elapsed().as_secs_f64() * 1e3;
    summary.effective_rate = summary.memory_bytes as f64 / start.elapsed().as_secs_f64();
    summary.compression_ratio = if summary.bytes.pages > 0 {
        summary.bytes.pages_uncompressed as f64 / summary.bytes.pages as f64
    } else {
        1.0
    };
    let outcome = match result {
        Ok(()) => MigrateOutcome::Migrated,
        Err(e) => {
            summary.error = Some(error_chain(&e));
            match session.on_failure() {
                FailureOutcome::ResumeSource => {
                    vm.set_throttle(0);
                    let _ = vm.set_dirty_logging(false);
                    vm.resume();
                    MigrateOutcome::FailedSourceRunning
                }
                FailureOutcome::InDoubt => MigrateOutcome::InDoubt,
                FailureOutcome::Done => MigrateOutcome::Migrated,
            }
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    (outcome, summary)
}

fn migration_id() -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&format!("{:?}", std::time::SystemTime::now()).into_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
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
            })
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

/// Encodes and sends pages, keeping count of what went on the wire.
struct PageSender {
    encoder: PageEncoder,
    /// One zstd stream for every batch (when the destination speaks zstd).
    zstd: Option<compress::StreamCompressor>,
    limit: Option<RateLimit>,
    last_send: Instant,
    page: [u8; wanmig_mem_sync::PAGE_SIZE],
}

impl PageSender {
    async fn send(
        &mut self,
        vm: &Vm,
        pages: &DirtyPages,
        round: u32,
        bulk: &mut FrameSender,
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
                        sent_bytes +=
                            self.flush(std::mem::replace(&mut b, PagesBuilder::new(round)), bulk, wire).await? as u64;
                    }
                }
            }
        }
        if !b.is_empty() {
            sent_pages += u64::from(b.len());
            sent_bytes += self.flush(b, bulk, wire).await? as u64;
        }
        let enc = self.encoder.stats;
        (wire.raw_pages, wire.delta_pages, wire.zero_pages) = (enc.raw_pages, enc.delta_pages, enc.zero_pages);
        Ok((sent_pages, sent_bytes))
    }

    async fn flush(
        &mut self,
        b: PagesBuilder,
        bulk: &mut FrameSender,
        wire: &mut WireBytes,
    ) -> Result<usize, SendError> {
        let frame = Message::Pages(b.finish()).encode();
        wire.pages_uncompressed += frame.len() as u64;
        // Compress the body without length and type: the page bytes open it.
        // Once in the stream, every batch must go through it (the peer's
        // decoder needs all of the history).
        let frame = match &mut self.zstd {
            Some(z) => {
                let body = &frame[5..];
                let data = z.compress(body).map_err(|e| SendError::Peer(format!("zstd: {e}")))?;
                Message::Compressed { raw_len: body.len() as u32, data }.encode()
            }
            None => frame,
        };
        let n = bulk.send_encoded(&frame).await?;
        wire.pages += n as u64;
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
fn receive(session: &mut Source, msg: &Message) -> Result<(), ProtocolError> {
    advance(session, |s| Ok((s.on_message(msg)?, ())))
}

/// The destination's next message. It may take a while: a round ends when
/// the destination has applied it, and a highly compressible round can sit
/// in flight as many times the flow-control window of page data. So wait
/// until the migration's own deadline (and at least [`ANSWER_TIMEOUT`]).
async fn next_answer(
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

async fn run(
    vm: &mut Vm,
    opts: &SendOptions,
    progress: &mut dyn FnMut(&Event),
    session: &mut Source,
    summary: &mut Summary,
) -> Result<(), SendError> {
    let start = Instant::now();
    let deadline = start + opts.timeout;
    let mut conn = wanmig_transport::connect(opts.dest, &opts.identity, &[opts.peer], opts.tuning).await?;
    let (mut ctl_tx, mut ctl_rx) = conn.open_control().await?;
    let hello = advance(session, |s| s.hello(migration_id(), shape_of(vm)))?;
    summary.bytes.total += ctl_tx.send(&hello).await? as u64;
    let answer = ctl_rx.recv_timeout(ANSWER_TIMEOUT).await?.ok_or(SendError::Closed)?;
    receive(session, &answer)?;
    if let Source::Aborted(reason) = session {
        return Err(SendError::Peer(reason.clone()));
    }
    let agreed = session.features().unwrap_or(0);
    progress(&Event::Connected { peer: opts.dest.to_string() });

    // Everything the destination says from now on arrives here, so that an
    // Abort is seen between batches.
    let (msg_tx, mut msgs) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let r = ctl_rx.recv().await;
            let last = !matches!(r, Ok(Some(_)));
            let item = match r {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err(TransportError::Lost("the destination closed the control stream".into())),
                Err(e) => Err(e),
            };
            if msg_tx.send(item).await.is_err() || last {
                break;
            }
        }
    });

    let mut bulk = conn.open_bulk().await?;
    let limit = opts.max_bandwidth.map(|max| RateLimit::new(opts.min_bandwidth.unwrap_or(max).min(max)));
    let mut sender = PageSender {
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

    // Track writes from before the first page is read.
    vm.set_dirty_logging(true)?;
    vm.harvest_dirty()?;
    let mut policy = DowntimeBudget::new(opts.downtime);
    let mut to_send = all_pages(vm);
    let mut round = 0u32;
    let state_estimate = 64 * 1024 * u64::from(vm.config().vcpus);
    let (mut best_page_rate, mut best_link_rate) = (0f64, 0f64);
    loop {
        if Instant::now() > deadline {
            return Err(SendError::Timeout(opts.timeout));
        }
        let t = Instant::now();
        // A round, however large, is bounded by the migration's deadline.
        let left = deadline.saturating_duration_since(Instant::now());
        let (pages, bytes) =
            tokio::time::timeout(left, sender.send(vm, &to_send, round, &mut bulk, &mut summary.bytes))
                .await
                .map_err(|_| SendError::Timeout(opts.timeout))??;
        summary.bytes.total += bulk.send(&Message::RoundDone { round, pages }).await? as u64;
        // The round ends when the destination has applied it: the rate that
        // matters is the rate at which pages land, not at which they leave.
        loop {
            let m = next_answer(&mut msgs, deadline).await?;
            receive(session, &m)?;
            if let Source::Aborted(reason) = session {
                return Err(SendError::Peer(reason.clone()));
            }
            if m == (Message::RoundApplied { round }) {
                break;
            }
        }
        let elapsed = t.elapsed();
        let secs = elapsed.as_secs_f64().max(1e-6);
        best_page_rate = best_page_rate.max(pages as f64 / secs);
        best_link_rate = best_link_rate.max(bytes as f64 / secs);
        let dirty = vm.harvest_dirty()?;
        let report = RoundReport {
            round,
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
            state_bytes: state_estimate,
            rtt: opts.tuning.rtt.min(elapsed),
        };
        let decision = policy.decide(&report);
        progress(&Event::Round {
            round,
            pages,
            dirty_pages: report.dirty_pages,
            bytes_left: (report.dirty_pages as f64 * report.bytes_per_page) as u64,
            dirty_rate: report.dirty_rate() * 4096.0,
            link_rate: report.link_rate,
            predicted_downtime_ms: report.predicted_downtime().as_secs_f64() * 1e3,
            throttle: vm.throttle_percent(),
            elapsed_s: start.elapsed().as_secs_f64(),
        });
        summary.rounds = round + 1;
        summary.per_round.push(RoundStat {
            round,
            pages_sent: pages,
            dirty_pages: report.dirty_pages,
            ms: elapsed.as_secs_f64() * 1e3,
        });
        to_send = dirty;
        round += 1;
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
        if let (Some(limit), Some(min), Some(max)) = (&mut sender.limit, opts.min_bandwidth, opts.max_bandwidth) {
            limit.set_rate(next_round_rate(report.dirty_rate() * report.bytes_per_page, min, min, max));
        }
    }

    // Stop-and-copy: pause, send what is dirty, then the device state.
    let paused_at = Instant::now();
    vm.pause()?;
    // Disk writes the guest saw complete must be on the images before
    // another host opens them.
    vm.sync_disks()?;
    advance(session, |s| Ok((s.stop_and_copy()?, ())))?;
    let last = vm.harvest_dirty()?;
    progress(&Event::StopAndCopy { dirty_pages: to_send.pages() + last.pages() });
    let (p1, _) = sender.send(vm, &to_send, round, &mut bulk, &mut summary.bytes).await?;
    let (p2, _) = sender.send(vm, &last, round, &mut bulk, &mut summary.bytes).await?;
    summary.bytes.total += bulk.send(&Message::RoundDone { round, pages: p1 + p2 }).await? as u64;
    bulk.finish().await?;
    let since_pause = || paused_at.elapsed().as_secs_f64() * 1e3;
    summary.downtime_breakdown.last_pages_ms = since_pause();
    let mut state = wanmig_vmm::state::encode(&vm.save_state()?);
    if agreed & features::ZSTD != 0 {
        state = compress::compress_blob(&state).map_err(|e| SendError::Peer(format!("zstd: {e}")))?;
    }
    summary.bytes.state = state.len() as u64;
    let msg = advance(session, |s| s.device_state(state))?;
    summary.bytes.total += ctl_tx.send(&msg).await? as u64;
    summary.downtime_breakdown.state_ms = since_pause();
    progress(&Event::Committing);

    while *session == Source::AwaitReady {
        let answer = next_answer(&mut msgs, deadline).await?;
        receive(session, &answer)?;
    }
    summary.downtime_breakdown.ready_ms = since_pause();
    if let Source::Aborted(reason) = session {
        return Err(SendError::Peer(reason.clone()));
    }
    // The commit point: from here on the guest never runs on this host.
    let commit = advance(session, Source::commit)?;
    summary.bytes.total += ctl_tx.send(&commit).await? as u64;
    let answer = next_answer(&mut msgs, deadline).await?;
    receive(session, &answer)?;
    summary.downtime_ms = since_pause();
    summary.downtime_breakdown.commit_ack_ms = summary.downtime_ms;
    conn.close(0);
    Ok(())
}
