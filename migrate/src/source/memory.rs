//! The pre-copy rounds: written disk blocks until little is left, then
//! iterative memory pre-copy (Clark et al.) with the disks' blocks riding
//! along, until the convergence policy says the rest fits the downtime
//! budget (or gives up).

use std::time::{Duration, Instant};

use wanmig_mem_sync::policy::{ConvergencePolicy, Decision, DowntimeBudget, RoundReport};
use wanmig_mem_sync::postcopy::{HybridDecision, HybridPolicy};
use wanmig_types::features;
use wanmig_vmm::memory::DirtyPages;

use super::error::SendError;
use super::options::PostcopyMode;
use super::run::Run;
use super::vm::all_pages;
use crate::report::{Phase, RoundStat};

/// Most rounds of written extents before memory pre-copy joins anyway.
const MAX_DISK_ROUNDS: u32 = 30;

/// Rounds of the blocks the guest wrote during the disk's first copy, until
/// what it keeps writing fits in half the downtime budget.
pub async fn disk_rounds(run: &mut Run<'_>) -> Result<(), SendError> {
    let Some(mut d) = run.disks.take() else { return Ok(()) };
    run.report.phase(Phase::DiskRounds);
    let result = async {
        for _ in 0..MAX_DISK_ROUNDS {
            check_deadline(run)?;
            run.pace(None);
            let pending = d.harvest();
            let budget = run.steer.tunables().downtime.as_secs_f64();
            if pending as f64 <= (budget / 2.0 * d.rate().max(run.capacity())).max(1048576.0) {
                break;
            }
            let t = Instant::now();
            let on_wire = run.summary.bytes.disk;
            let sent = d.send_pending(&mut run.link, &mut run.summary.bytes).await?;
            let round = run.link.end_round(0, &mut run.summary.bytes).await?;
            let (secs, written) = (t.elapsed().as_secs_f64(), d.harvest());
            d.after_round(run.summary.bytes.disk - on_wire, secs, written, run.capacity());
            let stat = RoundStat {
                round,
                disk_bytes: sent,
                disk_dirty_bytes: written,
                ms: secs * 1e3,
                ..RoundStat::default()
            };
            run.summary.per_round.push(stat);
            let bytes_sent = run.summary.bytes.total;
            run.report.update(|p| {
                (p.round, p.bytes_sent, p.bytes_left) = (round, bytes_sent, written);
                p.link_rate = sent as f64 / secs.max(1e-6);
            });
        }
        Ok(())
    }
    .await;
    run.disks = Some(d);
    result
}

fn check_deadline(run: &Run<'_>) -> Result<(), SendError> {
    match Instant::now() > run.link.deadline {
        true => Err(SendError::Timeout(run.opts.timeout)),
        false => Ok(()),
    }
}

/// What one round of memory put on the wire.
struct Sent {
    pages: u64,
    bytes: u64,
    disk_sent: u64,
    disk_wire: u64,
}

/// One round: the disks' written blocks, then the pages in `to_send`.
async fn send_round(run: &mut Run<'_>, to_send: &DirtyPages) -> Result<Sent, SendError> {
    run.start_round(to_send);
    let round = run.link.session.round();
    let on_wire = run.summary.bytes.disk;
    let disk_sent = match &mut run.disks {
        Some(d) => {
            d.harvest();
            d.send_pending(&mut run.link, &mut run.summary.bytes).await?
        }
        None => 0,
    };
    let disk_wire = run.summary.bytes.disk - on_wire;
    let (pages, bytes) = run.link.bulk.send_pages(run.vm.ram(), to_send, round, &mut run.summary.bytes).await?;
    run.link.end_round(pages, &mut run.summary.bytes).await?;
    Ok(Sent { pages, bytes, disk_sent, disk_wire })
}

/// The best rates seen, which price what is left.
#[derive(Default)]
struct Rates {
    page: f64,
    link: f64,
}

/// Iterative memory pre-copy, from every page or (after a resume) from
/// `resend`. Returns the pages still to send inside the stop-and-copy.
/// With `Some(reason)`, the hybrid policy says to switch to post-copy.
pub async fn precopy(run: &mut Run<'_>, resend: Option<DirtyPages>) -> Result<(DirtyPages, Option<String>), SendError> {
    run.report.phase(Phase::Precopy);
    let mut to_send = match resend {
        Some(pages) => pages,
        None => {
            // Track writes from before the first page is read.
            run.vm.set_dirty_logging(true)?;
            run.vm.harvest_dirty()?;
            all_pages(&*run.vm)
        }
    };
    let mut policy = run.policy.take().unwrap_or_else(|| DowntimeBudget::new(run.steer.tunables().downtime));
    let first_round = *run.first_round.get_or_insert(run.link.session.round());
    let auto = run.opts.postcopy == PostcopyMode::Auto
        && run.link.session.features() & wanmig_types::features::POSTCOPY != 0
        && !run.opts.sync;
    if auto && run.hybrid.is_none() {
        run.hybrid = Some(HybridPolicy::new(run.steer.tunables().downtime));
    }
    let result = rounds(run, &mut policy, &mut to_send, first_round).await;
    run.policy = Some(policy);
    result.map(|switch| (to_send, switch))
}

/// Rounds until the policy says stop (leaving in `to_send` what is left);
/// `Some(reason)` when the hybrid policy switches to post-copy.
async fn rounds(
    run: &mut Run<'_>,
    policy: &mut DowntimeBudget,
    to_send: &mut DirtyPages,
    first_round: u32,
) -> Result<Option<String>, SendError> {
    let mut rates = Rates::default();
    let mut dirty_rate = None;
    loop {
        check_deadline(run)?;
        run.pace(dirty_rate);
        policy.budget = run.steer.tunables().downtime;
        let t = Instant::now();
        let left = run.link.deadline.saturating_duration_since(t);
        // A round, however large, is bounded by the migration's deadline.
        let sent = tokio::time::timeout(left, send_round(run, to_send))
            .await
            .map_err(|_| SendError::Timeout(run.opts.timeout))??;
        let elapsed = t.elapsed();
        let dirty = run.vm.harvest_dirty()?;
        let report = round_report(run, &sent, elapsed, &dirty, &mut rates);
        dirty_rate = Some(report.dirty_rate() * report.bytes_per_page);
        let decision = match run.hybrid.as_mut() {
            Some(h) => {
                h.precopy.budget = run.steer.tunables().downtime;
                match h.decide(&report) {
                    HybridDecision::PreCopy(d) => d,
                    HybridDecision::SwitchToPostcopy { reason } => {
                        record_round(run, &report, &sent, first_round);
                        *to_send = dirty;
                        return Ok(Some(reason));
                    }
                }
            }
            None => policy.decide(&report),
        };
        record_round(run, &report, &sent, first_round);
        *to_send = dirty;
        match decision {
            Decision::StopAndCopy => return Ok(None),
            Decision::Continue => {}
            Decision::Throttle(p) => {
                run.vm.set_throttle(p);
                run.summary.max_throttle = run.summary.max_throttle.max(p);
            }
            Decision::GiveUp(reason) => {
                let _ = run.link.abort(&reason).await;
                return Err(SendError::NoConvergence(reason));
            }
        }
    }
}

/// What the policy sees of a round.
fn round_report(
    run: &mut Run<'_>,
    sent: &Sent,
    elapsed: Duration,
    dirty: &DirtyPages,
    rates: &mut Rates,
) -> RoundReport {
    let secs = elapsed.as_secs_f64().max(1e-6);
    rates.page = rates.page.max(sent.pages as f64 / secs);
    rates.link = rates.link.max(sent.bytes as f64 / secs);
    let capacity = run.capacity();
    let cap = run.steer.tunables().max_bandwidth;
    let disk_dirty = match &mut run.disks {
        Some(d) => {
            let written = d.harvest();
            d.after_round(sent.disk_wire, secs, written, capacity);
            written
        }
        None => 0,
    };
    let state_estimate = 64 * 1024 * u64::from(run.vm.config().vcpus);
    let rtt = run.opts.tuning.rtt.min(elapsed);
    RoundReport {
        round: run.link.session.round().saturating_sub(1),
        pages_sent: sent.pages,
        bytes_sent: sent.bytes,
        elapsed,
        dirty_pages: dirty.pages(),
        bytes_per_page: if sent.pages > 0 { sent.bytes as f64 / sent.pages as f64 } else { 4096.0 },
        page_rate: rates.page,
        // Compressed rounds rarely fill the link, so what they achieved
        // says little about its capacity: take the expected bandwidth
        // when it is higher (it only prices the small device state); never
        // more than the cap in force (an operator may have lowered it).
        link_rate: rates.link.max(run.opts.tuning.bandwidth_bps as f64 / 8.0).min(cap.unwrap_or(f64::INFINITY)),
        // Disk extents still to write go out inside the downtime too.
        state_bytes: state_estimate + disk_dirty,
        rtt,
        switch: switch_cost(run, rtt, disk_dirty),
    }
}

/// The switch-over's cost beyond what it sends: a fixed part
/// ([`SWITCH_FLOOR`]), the commit's round trips (one when the destination
/// decides an early commit: the device state's way there and the
/// acknowledgement's way back; two when the source waits for `Ready`), and
/// flushing the last disk writes, which the destination does before it
/// commits (the rest were flushed between rounds) at [`FLUSH_RATE`].
fn switch_cost(run: &Run<'_>, rtt: Duration, disk_dirty: u64) -> Duration {
    let early = run.link.session.features() & features::EARLY_COMMIT != 0;
    let trips = if early { 1 } else { 2 };
    rtt * trips + SWITCH_FLOOR + Duration::from_secs_f64(disk_dirty as f64 / FLUSH_RATE)
}

/// The switch-over's fixed cost at zero RTT with nothing left to send:
/// the source's last flush and dirty harvest, the device state, the
/// destination's checks and build of the VM, the journal records and the
/// images' installation. Measured with `cargo bench -p wanmig --bench
/// downtime` on a 2-core VM: 30–70 ms from the pause to the
/// acknowledgement on loopback for a last round of 25–250 pages, of which
/// sending took 2–15 ms; the destination's share alone (logged by
/// `receive`) 10–25 ms. Taken at the low end: an estimate that is too high
/// throttles the guest for nothing.
const SWITCH_FLOOR: Duration = Duration::from_millis(25);

/// Bytes per second a disk image is taken to flush at (the last disk
/// writes, inside the downtime).
const FLUSH_RATE: f64 = 100e6;

/// Reports a round and adds it to the summary.
fn record_round(run: &mut Run<'_>, r: &RoundReport, sent: &Sent, first_round: u32) {
    let disk_dirty = r.state_bytes.saturating_sub(64 * 1024 * u64::from(run.vm.config().vcpus));
    let throttle = run.vm.throttle_percent();
    let bytes_sent = run.summary.bytes.total;
    run.report.update(|p| {
        p.round = r.round;
        p.bytes_sent = bytes_sent;
        p.bytes_left = (r.dirty_pages as f64 * r.bytes_per_page) as u64 + disk_dirty;
        p.dirty_rate = r.dirty_rate() * 4096.0;
        p.link_rate = r.link_rate;
        p.predicted_downtime_ms = r.predicted_downtime().as_secs_f64() * 1e3;
        p.throttle = throttle;
    });
    run.summary.rounds = r.round + 1 - first_round;
    run.summary.per_round.push(RoundStat {
        round: r.round,
        pages_sent: sent.pages,
        dirty_pages: r.dirty_pages,
        disk_bytes: sent.disk_sent,
        disk_dirty_bytes: disk_dirty,
        wire_bytes: sent.bytes + sent.disk_wire,
        ms: r.elapsed.as_secs_f64() * 1e3,
    });
}
