//! Post-copy at the source: the switch (pause, the disks' last blocks, the
//! list of pages the destination lacks, the device state), the commit,
//! then serving the destination until it holds every page.
//!
//! Two senders share the link once the guest has moved:
//! - the **urgent** task answers page requests on a stream of its own (so
//!   a request never queues behind the push), each requested page with the
//!   neighbours [`Prepager`] adds;
//! - the **push** (this module's loop) sends the rest on the bulk stream,
//!   next to the latest faults first (Hines' bubbling), paced like
//!   pre-copy.
//!
//! The guest stays paused here from the switch on. `Commit` follows the
//! device state at once when the early commit is agreed (the destination
//! decides), or waits for `Ready`. Once it is sent the guest never runs
//! here again, unless the destination says it did not commit (its `Abort`,
//! or its journal in answer to a resume): a destination that is lost after
//! committing, before it had every page, leaves the guest split between the
//! hosts, which is reported as such ([`SendError::PostcopyLost`]); the pages
//! stay here, paused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::postcopy::{Prepager, PrepagerConfig};
use wanmig_transport::{FrameReceiver, FrameSender};
use wanmig_types::{PAGE_SIZE, PAGE_SIZE_U64, PageRange};
use wanmig_vmm::memory::{DirtyPages, GuestMem};
use wanmig_wire::{Message, PageData, PageRef, PageSpace, PagesBuilder, SourceEvent, Stream};

use super::error::SendError;
use super::link::{BulkSender, Link};
use super::run::Run;
use super::switchover::{coalesce, union};
use crate::journal::{SourceJournal, SourcePhase, SourceRecord};
use crate::report::{Phase, PostcopyDestStats, PostcopyStats};

/// Most pages a push batch carries (1 MiB, a good zstd frame). Fewer on a
/// slow link: a batch takes about [`PUSH_SLICE`] of it, so that `Ready`
/// and `CommitAck` (looked at between batches) are not held up.
const PUSH_PAGES: u64 = 256;
/// Link time one push batch may take.
const PUSH_SLICE: f64 = 0.01;
/// Share of the link's bandwidth (`--link-bandwidth`) the push may take.
const PUSH_SHARE: f64 = 0.9;
/// Most pages one urgent answer carries (requested pages and neighbours).
const URGENT_PAGES: u64 = 256;
/// How long the destination may take to open its request stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source waits for the destination's `PostcopyComplete`
/// once every page was pushed, before it calls the destination lost.
const COMPLETE_TIMEOUT: Duration = Duration::from_secs(120);

/// Counts the urgent task keeps.
#[derive(Debug, Default)]
struct Served {
    requests: AtomicU64,
    faulted: AtomicU64,
    sent: AtomicU64,
}

/// Page frames of `pages` (region-relative runs) as ascending, disjoint
/// runs of guest page frame numbers.
fn pfn_runs(pages: &DirtyPages) -> Vec<PageRange> {
    let runs = pages.regions.iter().flat_map(|r| {
        let base = r.start.0 / PAGE_SIZE_U64;
        r.ranges.iter().map(move |x| PageRange { first: base + x.first, count: x.count })
    });
    coalesce(runs.collect())
}

/// Reads page `pfn` of `mem` and adds it to `b` (zero pages as such).
fn push_page(mem: &GuestMem, pfn: u64, buf: &mut [u8; PAGE_SIZE], b: &mut PagesBuilder) -> Result<(), SendError> {
    let gpa = pfn * PAGE_SIZE_U64;
    mem.read_slice(buf, GuestAddress(gpa)).map_err(|e| SendError::Refused(format!("page {gpa:#x}: {e}")))?;
    let data = match buf.iter().all(|&x| x == 0) {
        true => PageData::Zero,
        false => PageData::Raw(&buf[..]),
    };
    b.push(PageRef { gpa, data });
    Ok(())
}

/// The batch of pages at indices `ranges` of `space`, as page frame runs
/// and the `Pages` message carrying them.
fn batch(
    mem: &GuestMem,
    space: &PageSpace,
    ranges: &[PageRange],
    round: u32,
) -> Result<(Message, Vec<PageRange>, u64), SendError> {
    // A batch goes in ascending order (requests come in fault order).
    let mut pfns = Vec::new();
    for r in ranges {
        for i in r.first..r.end() {
            pfns.push(space.pfn(i).ok_or_else(|| SendError::Refused(format!("page index {i} is not RAM")))?);
        }
    }
    pfns.sort_unstable();
    pfns.dedup();
    let mut b = PagesBuilder::new(round);
    let mut buf = [0u8; PAGE_SIZE];
    for &pfn in &pfns {
        push_page(mem, pfn, &mut buf, &mut b)?;
    }
    Ok((Message::Pages(b.finish()), ranges.to_vec(), pfns.len() as u64))
}

/// Answers requests as they come: each requested page still to send goes
/// at once on the urgent stream with its neighbours.
async fn serve_urgent(
    mut urgent: FrameSender,
    mut requests: mpsc::Receiver<Result<Vec<u64>, SendError>>,
    prepager: Arc<Mutex<Prepager>>,
    mem: GuestMem,
    space: PageSpace,
    round: u32,
    served: Arc<Served>,
) -> Result<(), SendError> {
    while let Some(pages) = requests.recv().await {
        let pages = pages?;
        if pages.is_empty() {
            // The request stream's opening.
            continue;
        }
        served.requests.fetch_add(1, Ordering::Relaxed);
        served.faulted.fetch_add(pages.len() as u64, Ordering::Relaxed);
        let ranges = {
            let mut p = prepager.lock().unwrap_or_else(PoisonError::into_inner);
            for &pfn in &pages {
                // `space.index` is Some: the session checked every page is RAM.
                if let Some(i) = space.index(pfn) {
                    p.on_fault(i);
                }
            }
            p.next_requested(URGENT_PAGES * pages.len().max(1) as u64)
        };
        // Several messages when the answer is large (a frame holds at most
        // a batch of pages).
        for chunk in split(&ranges, URGENT_PAGES) {
            let (msg, sent, n) = batch(&mem, &space, &chunk, round)?;
            urgent.send(&msg).await?;
            prepager.lock().unwrap_or_else(PoisonError::into_inner).on_sent(&sent);
            served.sent.fetch_add(n, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// `ranges` cut into pieces of at most `max` pages each.
fn split(ranges: &[PageRange], max: u64) -> Vec<Vec<PageRange>> {
    let mut out = Vec::new();
    let mut cur: Vec<PageRange> = Vec::new();
    let mut n = 0;
    for r in ranges {
        let mut r = *r;
        while r.count > 0 {
            let take = r.count.min(max - n);
            cur.push(PageRange { first: r.first, count: take });
            (r.first, r.count, n) = (r.first + take, r.count - take, n + take);
            if n == max {
                out.push(std::mem::take(&mut cur));
                n = 0;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads the destination's page requests into `tx` (an error ends it).
fn read_requests(
    mut rx: FrameReceiver,
    tx: mpsc::Sender<Result<Vec<u64>, SendError>>,
    mut check: impl FnMut(&Message) -> Result<Vec<u64>, SendError> + Send + 'static,
) {
    tokio::spawn(async move {
        loop {
            let item = match rx.recv().await {
                Ok(Some(m)) => check(&m),
                Ok(None) => return,
                Err(e) => Err(e.into()),
            };
            let last = item.is_err();
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    });
}

/// The push's policy for `space`, with only the `missing` runs (page
/// frames, ascending, in RAM) to send.
fn prepager_for(space: &PageSpace, missing: &[PageRange]) -> Prepager {
    let mut prepager = Prepager::new(space.pages(), PrepagerConfig::default());
    let mut next = 0;
    for r in missing {
        let first = space.index(r.first).expect("postcopy_start checked the runs are RAM");
        if first > next {
            prepager.already_there(PageRange { first: next, count: first - next });
        }
        next = first + r.count;
    }
    if next < space.pages() {
        prepager.already_there(PageRange { first: next, count: space.pages() - next });
    }
    prepager
}

/// The device state, as in a stop-and-copy.
async fn send_state(run: &mut Run<'_>) -> Result<(), SendError> {
    let state = run.vm.device_state()?;
    let state = match run.link.session.features() & wanmig_types::features::ZSTD != 0 {
        true => {
            wanmig_mem_sync::compress::compress_blob(&state).map_err(|e| SendError::Refused(format!("zstd: {e}")))?
        }
        false => state,
    };
    run.summary.bytes.state = state.len() as u64;
    let msg = run.link.session.device_state(state)?;
    run.link.send_ctl(&msg, &mut run.summary.bytes).await?;
    Ok(())
}

/// The switch, the commit and the post-copy, for a guest whose pre-copy
/// left `pending` to send (all pages with `--postcopy now`). `why` says
/// why it switched.
pub async fn run_postcopy(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    pending: DirtyPages,
    why: String,
) -> Result<(), SendError> {
    let paused_at = super::switchover::pause(run)?;
    run.link.session.postcopy_switch()?;
    // Missing at the destination: what pre-copy left, and what the guest
    // wrote since (none was harvested when dirty logging never ran).
    let last = match run.first_round {
        Some(_) => run.vm.harvest_dirty()?,
        None => DirtyPages::default(),
    };
    let missing = pfn_runs(&union(&pending, &last));
    if let Some(d) = &mut run.disks {
        d.finish(&mut run.link, &mut run.summary.bytes).await?;
    }
    let done = run.link.session.round_done(0)?;
    run.link.bulk.send(&done, &mut run.summary.bytes).await?;
    let round = run.link.session.round();
    for m in run.link.session.postcopy_start(&missing)? {
        run.link.bulk.send(&m, &mut run.summary.bytes).await?;
    }
    let total: u64 = missing.iter().map(|r| r.count).sum();
    let space = PageSpace::of(&run.vm.ram().regions().into_iter().map(|(s, l)| (s.0, l)).collect::<Vec<_>>());
    let prepager = Arc::new(Mutex::new(prepager_for(&space, &missing)));
    run.summary.postcopy = Some(PostcopyStats { reason: why, missing_pages: total, ..PostcopyStats::default() });

    let served = Arc::new(Served::default());
    let mem = run.vm.ram().mem().clone();
    let streams = Streams { prepager: prepager.clone(), mem: mem.clone(), space: space.clone(), round, served };
    // The urgent stream opens now; the request stream is awaited after the
    // device state went (a round trip less in the downtime).
    let urgent = streams.open_urgent(run).await?;

    send_state(run).await?;
    run.summary.downtime_breakdown.state_ms = paused_at.elapsed().as_secs_f64() * 1e3;

    // The push keeps to the cap in force, as pre-copy did, and below the
    // link's bandwidth: a queue of pushed pages at the bottleneck would
    // delay every answer to a fault by as much.
    run.pace(None);
    let link = run.opts.tuning.bandwidth_bps as f64 / 8.0 * PUSH_SHARE;
    let cap = run.steer.tunables().max_bandwidth.map_or(link, |c| c.min(link));
    run.link.bulk.set_rate(Some(cap));
    let served = streams.served.clone();
    // An early commit goes with the state: the destination commits as soon
    // as the VM is built there, a round trip sooner than after `Ready`.
    let mut commit_early = run.link.session.features() & wanmig_types::features::EARLY_COMMIT != 0;
    let mut urgent = Some(urgent);
    let mut task: Option<UrgentTask> = None;
    let result = loop {
        let r = match task.as_mut() {
            Some(t) => {
                serve(run, journal, rec, &prepager, &mem, &space, round, paused_at, t, &served).await.map(|()| true)
            }
            None => {
                let commit = std::mem::take(&mut commit_early);
                let opened = open_serving(run, journal, rec, &streams, urgent.take(), commit).await;
                opened.map(|t| {
                    task = Some(t);
                    false
                })
            }
        };
        match r {
            Ok(true) => break Ok(()),
            Ok(false) => {}
            // The guest runs there (or may): ride the outage out on a new
            // connection; the pages stay here until they all arrived.
            Err(e) if outage_after_commit(run, &e) => {
                if let Some(t) = task.take() {
                    t.abort();
                }
                match resume(run, e, &missing, &prepager, &space, round).await {
                    Ok(true) => run.report.phase(Phase::Postcopy),
                    // Every page is there already.
                    Ok(false) => break journal.record(rec, SourcePhase::Migrated).map_err(SendError::from),
                    Err(e) => break Err(e),
                }
            }
            Err(e) => break Err(e),
        }
    };
    if let Some(t) = task {
        t.abort();
    }
    let pc = run.summary.postcopy.get_or_insert_with(PostcopyStats::default);
    pc.requests_served = served.requests.load(Ordering::Relaxed);
    pc.pages_faulted = served.faulted.load(Ordering::Relaxed);
    pc.pages_requested = served.sent.load(Ordering::Relaxed);
    pc.postcopy_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    result
}

/// The task that answers page requests ([`serve_urgent`]).
type UrgentTask = tokio::task::JoinHandle<Result<(), SendError>>;

/// Starts answering requests: on `urgent`, the stream the switch opened
/// (after the early `Commit` when `commit` says so), or on new streams
/// after a resume.
async fn open_serving(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    streams: &Streams,
    urgent: Option<FrameSender>,
    commit: bool,
) -> Result<UrgentTask, SendError> {
    if commit {
        super::switchover::decide(run, journal, rec).await?;
    }
    match urgent {
        Some(u) => streams.serve(run, u).await,
        None => streams.open(run).await,
    }
}

/// What serves requests: opened at the switch and again after a resume.
struct Streams {
    prepager: Arc<Mutex<Prepager>>,
    mem: GuestMem,
    space: PageSpace,
    round: u32,
    served: Arc<Served>,
}

impl Streams {
    /// Opens the urgent stream (with an empty batch: a QUIC stream shows at
    /// the peer with its first bytes, and the destination opens its request
    /// stream once it has it), accepts the request stream, and starts the
    /// urgent task on them.
    async fn open(&self, run: &mut Run<'_>) -> Result<UrgentTask, SendError> {
        let urgent = self.open_urgent(run).await?;
        self.serve(run, urgent).await
    }

    /// Opens the urgent stream (an empty batch makes it show).
    async fn open_urgent(&self, run: &mut Run<'_>) -> Result<FrameSender, SendError> {
        let mut urgent = run.conn.open_bulk().await?;
        urgent.send(&Message::Pages(PagesBuilder::new(self.round).finish())).await?;
        Ok(urgent)
    }

    /// Accepts the request stream and starts the urgent task.
    async fn serve(&self, run: &mut Run<'_>, urgent: FrameSender) -> Result<UrgentTask, SendError> {
        let requests = tokio::time::timeout(OPEN_TIMEOUT, run.conn.accept_bulk())
            .await
            .map_err(|_| SendError::Timeout(OPEN_TIMEOUT))??;
        let (req_tx, req_rx) = mpsc::channel(64);
        let mut checker = run.link.session.clone();
        read_requests(requests, req_tx, move |m| match checker.on_message(Stream::Requests, m)? {
            SourceEvent::PagesRequested(p) => Ok(p),
            e => Err(SendError::Peer(format!("{e:?} on the request stream"))),
        });
        Ok(tokio::spawn(serve_urgent(
            urgent,
            req_rx,
            self.prepager.clone(),
            self.mem.clone(),
            self.space.clone(),
            self.round,
            self.served.clone(),
        )))
    }
}

/// Whether `e`, after the commit, is an outage to ride out by resuming.
fn outage_after_commit(run: &Run<'_>, e: &SendError) -> bool {
    matches!(e, SendError::Transport(_) | SendError::Closed | SendError::Timeout(_))
        && run.link.session.committed()
        && !run.link.session.done()
        && !run.opts.resume_window.is_zero()
}

/// Reconnects after `cause` (within the resume window), takes the
/// migration up again where the destination stands, and puts back for
/// sending every missing page that did not arrive there: `true`. `false`
/// when the destination's journal says it holds every page already.
///
/// Committed early and the decision not heard, the source first asks for
/// it (the session's request is a settle query): not committed, the guest
/// is this side's again (an error: the migration failed, the guest runs on
/// here); running there, it reconnects again to resume.
async fn resume(
    run: &mut Run<'_>,
    cause: SendError,
    missing: &[PageRange],
    prepager: &Mutex<Prepager>,
    space: &PageSpace,
    round: u32,
) -> Result<bool, SendError> {
    let began = Instant::now();
    run.summary.outages += 1;
    let (ctl, rx, point) = loop {
        let (id, outcome) = match super::resume::reconnect(run, &cause, began).await? {
            super::resume::Answer::Resumed(ctl, rx, point) => break (ctl, rx, point),
            super::resume::Answer::Settled(id, outcome) => (id, outcome),
        };
        run.summary.decided_on_resume = Some(format!("{outcome:?}"));
        match run.link.session.on_settled(id, outcome) {
            // Running there: the next connection resumes it.
            Ok(SourceEvent::CommitAcked) if !run.link.session.done() => continue,
            Ok(SourceEvent::CommitAcked) => {
                run.summary.outage_ms += began.elapsed().as_secs_f64() * 1e3;
                return Ok(false);
            }
            // It never committed (the commit had not reached it, or it
            // failed before it decided): the guest never ran there.
            Ok(SourceEvent::Aborted(reason)) => return Err(SendError::Peer(reason)),
            // It committed and its attempt is over: the guest it ran is gone.
            _ => return Err(SendError::PostcopyLost(format!("the destination answered a resume with {outcome:?}"))),
        }
    };
    let mut session = run.link.session.clone();
    session.on_resumed(&point)?;
    let zstd = run.opts.compress && session.features() & wanmig_types::features::ZSTD != 0;
    // A new stream and compressor: the destination's decoder is new too.
    let mut bulk = BulkSender::new(run.conn.open_bulk().await?, 0, zstd, run.steer.tunables().max_bandwidth)?;
    bulk.send(&Message::Pages(PagesBuilder::new(round).finish()), &mut run.summary.bytes).await?;
    let deadline = run.link.deadline + began.elapsed();
    (run.link, _) = Link::new(ctl, rx, bulk, session, deadline);
    let arrived = |pfn: u64| {
        let i = point.received.partition_point(|r| r.first <= pfn);
        i > 0 && point.received[i - 1].end() > pfn
    };
    let mut p = prepager.lock().unwrap_or_else(PoisonError::into_inner);
    let before = p.remaining();
    for pfn in missing.iter().flat_map(|r| r.first..r.end()).filter(|&pfn| !arrived(pfn)) {
        if let Some(i) = space.index(pfn) {
            p.requeue(PageRange { first: i, count: 1 });
        }
    }
    run.summary.resent_bytes += (p.remaining() - before) * PAGE_SIZE_U64;
    run.summary.outage_ms += began.elapsed().as_secs_f64() * 1e3;
    Ok(true)
}

/// What the serving loop waits on next.
enum Step {
    Event(Result<SourceEvent, SendError>),
    Urgent(Result<Result<(), SendError>, tokio::task::JoinError>),
    Push,
}

/// The push's state in the serving loop.
struct Push<'a> {
    prepager: &'a Arc<Mutex<Prepager>>,
    mem: &'a GuestMem,
    space: &'a PageSpace,
    round: u32,
    pushed: u64,
    urgent_done: bool,
    all_sent_at: Option<Instant>,
}

impl Push<'_> {
    fn prepager(&self) -> std::sync::MutexGuard<'_, Prepager> {
        self.prepager.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pushes one batch, unless a control message is waiting; with nothing
    /// left to push, waits for the destination (or the urgent task).
    async fn step(&mut self, run: &mut Run<'_>, urgent: &mut UrgentTask) -> Result<Step, SendError> {
        let pages = (run.capacity() * PUSH_SLICE / PAGE_SIZE as f64).clamp(8.0, PUSH_PAGES as f64) as u64;
        let to_push = self.prepager().next_push_batch(pages);
        if !to_push.is_empty() {
            // Control first: a Ready or a complaint must not wait behind
            // the whole push.
            if let Some(e) = run.link.try_event() {
                // Not sent after all: give the pages back.
                let mut p = self.prepager();
                to_push.iter().for_each(|r| p.requeue(*r));
                return Ok(Step::Event(e));
            }
            let (msg, sent, n) = batch(self.mem, self.space, &to_push, self.round)?;
            run.link.bulk.send(&msg, &mut run.summary.bytes).await?;
            self.prepager().on_sent(&sent);
            self.pushed += n;
            return Ok(Step::Push);
        }
        let wait = match self.all_sent_at {
            Some(t) => COMPLETE_TIMEOUT.saturating_sub(t.elapsed()),
            None => Duration::from_millis(20),
        };
        tokio::select! {
            e = run.link.next_event() => Ok(Step::Event(e)),
            r = &mut *urgent, if !self.urgent_done => Ok(Step::Urgent(r)),
            _ = tokio::time::sleep(wait) => match self.all_sent_at {
                Some(t) if t.elapsed() >= COMPLETE_TIMEOUT => Err(SendError::PostcopyLost(format!(
                    "every page was sent, yet the destination did not confirm it has them all within {COMPLETE_TIMEOUT:?}"
                ))),
                _ => Ok(Step::Push),
            },
        }
    }
}

/// Pushes pages, commits when the destination is ready, and waits for
/// `PostcopyComplete`; the urgent task serves requests meanwhile.
#[allow(clippy::too_many_arguments)]
async fn serve(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    prepager: &Arc<Mutex<Prepager>>,
    mem: &GuestMem,
    space: &PageSpace,
    round: u32,
    paused_at: Instant,
    urgent: &mut UrgentTask,
    served: &Served,
) -> Result<(), SendError> {
    let mut push = Push { prepager, mem, space, round, pushed: 0, urgent_done: false, all_sent_at: None };
    loop {
        let step = push.step(run, urgent).await?;
        if push.all_sent_at.is_none() && push.prepager().is_done() {
            push.all_sent_at = Some(Instant::now());
        }
        let left = push.prepager().remaining();
        let requests = served.requests.load(Ordering::Relaxed);
        if let Some(pc) = run.summary.postcopy.as_mut() {
            pc.pages_pushed = push.pushed;
        }
        run.report.update(|p| (p.postcopy_pages_left, p.faults_served) = (left, requests));
        match step {
            Step::Push => {}
            Step::Urgent(r) => {
                push.urgent_done = true;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(SendError::Refused(format!("the urgent task failed: {e}"))),
                }
            }
            Step::Event(e) => match e? {
                SourceEvent::RoundApplied(_) => {}
                SourceEvent::Ready => ready(run, journal, rec, paused_at).await?,
                SourceEvent::CommitAcked => {
                    run.summary.downtime_ms = paused_at.elapsed().as_secs_f64() * 1e3;
                    run.summary.downtime_breakdown.commit_ack_ms = run.summary.downtime_ms;
                    run.report.phase(Phase::Postcopy);
                }
                SourceEvent::PostcopyComplete(report) => {
                    if let Some(pc) = run.summary.postcopy.as_mut() {
                        pc.dest = Some(PostcopyDestStats::from(&report));
                    }
                    journal.record(rec, SourcePhase::Migrated)?;
                    return Ok(());
                }
                e => return Err(SendError::Peer(format!("{e:?} during post-copy"))),
            },
        }
    }
}

/// Ready came: the destination built the VM. Unless the commit went early
/// (the destination then committed as it said so), the two-phase commit's
/// second half. From `Commit` on the guest never runs here again.
async fn ready(
    run: &mut Run<'_>,
    journal: &SourceJournal,
    rec: &mut SourceRecord,
    paused_at: Instant,
) -> Result<(), SendError> {
    run.summary.downtime_breakdown.ready_ms = paused_at.elapsed().as_secs_f64() * 1e3;
    match run.link.session.committed() {
        true => Ok(()),
        false => super::switchover::decide(run, journal, rec).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wanmig_vmm::memory::RegionDirty;

    fn r(first: u64, count: u64) -> PageRange {
        PageRange { first, count }
    }

    #[test]
    fn missing_pages_become_sorted_disjoint_page_frame_runs() {
        // Two regions (the second at 4 GiB), overlapping and unsorted runs.
        let pages = DirtyPages {
            regions: vec![
                RegionDirty { start: GuestAddress(0), ranges: vec![r(10, 5), r(0, 2), r(12, 6), r(30, 0)] },
                RegionDirty { start: GuestAddress(1 << 32), ranges: vec![r(0, 1), r(1, 3)] },
            ],
        };
        assert_eq!(pfn_runs(&pages), vec![r(0, 2), r(10, 8), r(1 << 20, 4)]);
        assert_eq!(pfn_runs(&DirtyPages::default()), Vec::new());
    }

    #[test]
    fn answers_are_cut_into_batches_of_at_most_max_pages() {
        let parts = split(&[r(0, 5), r(100, 300), r(1000, 1)], 256);
        let sizes: Vec<u64> = parts.iter().map(|p| p.iter().map(|x| x.count).sum()).collect();
        assert_eq!(sizes, vec![256, 50]);
        assert_eq!(parts[0][0], r(0, 5));
        assert_eq!(parts[0][1], r(100, 251));
        assert_eq!(parts[1], vec![r(351, 49), r(1000, 1)]);
        assert!(split(&[], 8).is_empty());
    }
}
