//! Post-copy at the destination: guest RAM registered with userfaultfd
//! (the pages the source named missing), a thread that reads faults and
//! never touches guest memory, requests on a stream of their own, and a
//! page pump that places what arrives (asked for on the urgent stream,
//! pushed on the bulk stream), each batch with one wake-up.
//!
//! Started when `PostcopyStart` arrives, before the device state (which
//! may fault while it loads); it runs on through the commit until every
//! page is placed, then reports what it measured.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vm_memory::GuestAddress;
use wanmig_mem_sync::compress::StreamDecompressor;
use wanmig_transport::{FrameReceiver, FrameSender};
use wanmig_types::{PAGE_SIZE_U64, error_chain};
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::postcopy::{self as uffd, Placement, PostcopyRam};
use wanmig_wire::{Message, PageAction, PageData, Pages, PostcopyPages, PostcopyReport, Stream};

use super::error::ReceiveError;

/// How long the fault thread waits for a fault before it looks whether
/// post-copy is over.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// What the pump measures.
#[derive(Debug, Default)]
struct Metrics {
    /// Faulted pages not placed yet: when the fault was read, by whom.
    waiting: HashMap<u64, (Instant, u32)>,
    /// Fault service times, µs.
    service: Vec<u64>,
    /// Time blocked per faulting thread (by thread id), µs.
    blocked: HashMap<u32, u64>,
    requested: u64,
    pushed: u64,
    duplicates: u64,
    first_placed: Option<Instant>,
    last_placed: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A post-copy in progress here.
pub struct DestPostcopy {
    pc: Arc<PostcopyRam>,
    flow: Arc<Mutex<PostcopyPages>>,
    metrics: Arc<Mutex<Metrics>>,
    stop: Arc<AtomicBool>,
    faults: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// Faulted page frames from the fault thread, for whichever requester
    /// runs (a new one after a resume).
    fault_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<u64>>>,
    pump: Option<JoinHandle<Result<(), ReceiveError>>>,
    requester: JoinHandle<Result<(), ReceiveError>>,
}

impl std::fmt::Debug for DestPostcopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestPostcopy").field("missing", &self.pc.missing_pages()).finish_non_exhaustive()
    }
}

/// The parts of `ram` outside the runs of page frames `named`, as
/// (guest-physical start, length): what stays present.
fn present_outside(ram: &GuestRam, named: &[wanmig_types::PageRange]) -> Vec<(GuestAddress, u64)> {
    let mut out = Vec::new();
    for (start, len) in ram.regions() {
        let (first, end) = (start.0 / PAGE_SIZE_U64, (start.0 + len) / PAGE_SIZE_U64);
        let mut at = first;
        for r in named.iter().filter(|r| r.end() > first && r.first < end) {
            let from = r.first.max(first);
            if from > at {
                out.push((GuestAddress(at * PAGE_SIZE_U64), (from - at) * PAGE_SIZE_U64));
            }
            at = at.max(r.end().min(end));
        }
        if at < end {
            out.push((GuestAddress(at * PAGE_SIZE_U64), (end - at) * PAGE_SIZE_U64));
        }
    }
    out
}

impl DestPostcopy {
    /// Registers `ram` (the pages `flow` names are dropped and fault from
    /// now on), starts the fault thread, the requests on `requests` and the
    /// pump reading `bulk` (with its zstd stream `zstd`) and `urgent`.
    pub fn start(
        ram: &GuestRam,
        flow: PostcopyPages,
        bulk: FrameReceiver,
        zstd: StreamDecompressor,
        urgent: FrameReceiver,
        requests: FrameSender,
    ) -> Result<Self, ReceiveError> {
        let present = present_outside(ram, &flow.named_runs());
        let pc = Arc::new(
            PostcopyRam::register(ram, &present)
                .map_err(|e| ReceiveError::Host(format!("post-copy: {}", error_chain(&e))))?,
        );
        let flow = Arc::new(Mutex::new(flow));
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (fault_tx, fault_rx) = mpsc::unbounded_channel();
        let faults = {
            let (pc, metrics, stop) = (pc.clone(), metrics.clone(), stop.clone());
            std::thread::Builder::new()
                .name("postcopy-faults".into())
                .spawn(move || read_faults(&pc, &metrics, &stop, &fault_tx))
                .map_err(|e| ReceiveError::Host(format!("post-copy: cannot start the fault thread: {e}")))?
        };
        let fault_rx = Arc::new(tokio::sync::Mutex::new(fault_rx));
        let requester = tokio::spawn(send_requests(fault_rx.clone(), pc.clone(), flow.clone(), requests));
        let pump = tokio::spawn(pump(pc.clone(), flow.clone(), metrics.clone(), bulk, zstd, urgent));
        Ok(DestPostcopy { pc, flow, metrics, stop, faults: Some(faults), fault_rx, pump: Some(pump), requester })
    }

    /// Waits until every page is placed, or the page streams fail (an
    /// outage: [`DestPostcopy::restart`] on a new connection).
    pub async fn wait(&mut self) -> Result<(), ReceiveError> {
        let Some(pump) = self.pump.as_mut() else { return Ok(()) };
        let r = pump.await.map_err(|e| ReceiveError::Host(format!("post-copy: the page pump failed: {e}")))?;
        self.pump = None;
        r
    }

    /// After a resume: the page streams of the new connection. Faults the
    /// old requests asked for and that are still missing are asked for again.
    pub fn restart(
        &mut self,
        bulk: FrameReceiver,
        zstd: StreamDecompressor,
        urgent: FrameReceiver,
        requests: FrameSender,
    ) {
        self.requester.abort();
        if let Some(p) = self.pump.take() {
            p.abort();
        }
        let (pc, flow, metrics) = (self.pc.clone(), self.flow.clone(), self.metrics.clone());
        self.requester = tokio::spawn(send_requests(self.fault_rx.clone(), pc.clone(), flow.clone(), requests));
        self.pump = Some(tokio::spawn(pump(pc, flow, metrics, bulk, zstd, urgent)));
    }

    /// The missing pages that arrived, as runs of page frames (what a
    /// resumed source need not send again).
    pub fn arrived_runs(&self) -> Vec<wanmig_types::PageRange> {
        lock(&self.flow).arrived_runs()
    }

    /// Pages still missing.
    pub fn missing(&self) -> u64 {
        self.pc.missing_pages()
    }

    /// Waits until every page is placed (or the pump fails: then the
    /// guest here cannot go on), ends post-copy, and returns the flow (for
    /// the session's check) and the report for the source.
    pub async fn finish(mut self) -> Result<(PostcopyPages, PostcopyReport), ReceiveError> {
        let r = self.wait().await;
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.faults.take() {
            let joined = tokio::task::spawn_blocking(move || t.join()).await;
            if let Ok(Ok(Err(e))) = joined {
                return Err(ReceiveError::Host(format!("post-copy: reading faults: {e}")));
            }
        }
        r?;
        self.pc.finish().map_err(|e| ReceiveError::Host(format!("post-copy: {}", error_chain(&e))))?;
        let flow = lock(&self.flow).clone();
        Ok((flow, self.report()))
    }

    fn report(&self) -> PostcopyReport {
        let m = lock(&self.metrics);
        let mut service = m.service.clone();
        service.sort_unstable();
        let at = |q: f64| match service.len() {
            0 => 0,
            n => service[((n as f64 * q).ceil() as usize).clamp(1, n) - 1],
        };
        // Per vCPU: the VMM names its vCPU threads `vcpuN`; a device
        // thread's faults count in the service times, not here.
        let mut per_vcpu: Vec<u64> = Vec::new();
        for (&tid, &us) in &m.blocked {
            let Some(id) = vcpu_of(tid) else { continue };
            if id >= per_vcpu.len() {
                per_vcpu.resize(id + 1, 0);
            }
            per_vcpu[id] += us;
        }
        let placing = match (m.first_placed, m.last_placed) {
            (Some(a), Some(b)) => b.duration_since(a).as_micros() as u64,
            _ => 0,
        };
        PostcopyReport {
            faults: self.pc.stats().faults,
            requested: m.requested,
            pushed: m.pushed,
            duplicates: m.duplicates,
            service_p50_us: at(0.5),
            service_p99_us: at(0.99),
            service_max_us: service.last().copied().unwrap_or(0),
            vcpu_blocked_us: per_vcpu,
            placing_us: placing,
        }
    }
}

impl Drop for DestPostcopy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.requester.abort();
        if let Some(p) = &self.pump {
            p.abort();
        }
    }
}

/// The vCPU index of thread `tid` of this process, from its name
/// (`vcpuN`, as the VMM names them).
fn vcpu_of(tid: u32) -> Option<usize> {
    let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm")).ok()?;
    let id: usize = name.trim().strip_prefix("vcpu")?.parse().ok()?;
    (id < wanmig_wire::postcopy::MAX_REPORT_VCPUS as usize).then_some(id)
}

/// The fault thread: reads faults (never guest memory), stamps them, and
/// hands their page frames to the requester.
fn read_faults(
    pc: &PostcopyRam,
    metrics: &Mutex<Metrics>,
    stop: &AtomicBool,
    tx: &mpsc::UnboundedSender<u64>,
) -> Result<(), String> {
    let mut faults = Vec::new();
    while !stop.load(Ordering::Acquire) && pc.missing_pages() > 0 {
        faults.clear();
        pc.read_faults(Some(FAULT_POLL), &mut faults).map_err(|e| error_chain(&e))?;
        if faults.is_empty() {
            continue;
        }
        let now = Instant::now();
        let mut m = lock(metrics);
        for f in &faults {
            let pfn = f.gpa.0 / PAGE_SIZE_U64;
            m.waiting.entry(pfn).or_insert((now, f.tid));
            if tx.send(pfn).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Sends what the vCPUs wait for, every fault that came in together in
/// one request.
async fn send_requests(
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<u64>>>,
    pc: Arc<PostcopyRam>,
    flow: Arc<Mutex<PostcopyPages>>,
    mut tx: FrameSender,
) -> Result<(), ReceiveError> {
    let mut rx = rx.lock().await;
    tx.send(&PostcopyPages::opening_request()).await?;
    // Faults asked for on a connection that failed: ask again.
    let again: Vec<u64> = pc.pending_requests().iter().map(|g| g.0 / PAGE_SIZE_U64).collect();
    for chunk in again.chunks(wanmig_wire::postcopy::MAX_REQUEST_PAGES as usize) {
        let request = lock(&flow).request(chunk);
        if let Some(m) = request {
            tx.send(&m).await?;
        }
    }
    let mut pfns = Vec::new();
    while let Some(first) = rx.recv().await {
        pfns.clear();
        pfns.push(first);
        while let Ok(p) = rx.try_recv() {
            pfns.push(p);
        }
        for chunk in pfns.chunks(wanmig_wire::postcopy::MAX_REQUEST_PAGES as usize) {
            let request = lock(&flow).request(chunk);
            if let Some(m) = request {
                tx.send(&m).await?;
            }
        }
    }
    let _ = tx.finish().await;
    Ok(())
}

/// Places what arrives on `bulk` and `urgent` until every page is here.
async fn pump(
    pc: Arc<PostcopyRam>,
    flow: Arc<Mutex<PostcopyPages>>,
    metrics: Arc<Mutex<Metrics>>,
    mut bulk: FrameReceiver,
    mut zstd: StreamDecompressor,
    mut urgent: FrameReceiver,
) -> Result<(), ReceiveError> {
    let (mut bulk_open, mut urgent_open) = (true, true);
    while !lock(&flow).is_complete() {
        if !bulk_open && !urgent_open {
            return Err(ReceiveError::BadInput(format!(
                "the source ended both page streams with {} pages missing",
                lock(&flow).still_missing()
            )));
        }
        let (stream, msg) = tokio::select! {
            biased;
            m = urgent.recv(), if urgent_open => (Stream::Urgent, m?),
            m = bulk.recv(), if bulk_open => (Stream::Bulk, m?),
        };
        let Some(msg) = msg else {
            match stream {
                Stream::Urgent => urgent_open = false,
                _ => bulk_open = false,
            }
            continue;
        };
        let action = lock(&flow).on_message(stream, &msg)?;
        let msg = match (action, msg) {
            (PageAction::Place, m) => m,
            (PageAction::Decompress, Message::Compressed { raw_len, data }) if stream == Stream::Bulk => {
                let body =
                    zstd.decompress(&data, raw_len as usize).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
                let inner = Message::decode_compressed_body(body).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
                lock(&flow).on_decompressed(stream, &inner)?;
                inner
            }
            (_, m) => {
                return Err(ReceiveError::BadInput(format!("{} on the {stream} stream in post-copy", m.name())));
            }
        };
        let Message::Pages(p) = msg else {
            return Err(ReceiveError::BadInput(format!("{} on the {stream} stream in post-copy", msg.name())));
        };
        place(&pc, &metrics, stream, &p)?;
    }
    Ok(())
}

/// Places one batch (one wake-up) and books what it served.
fn place(pc: &PostcopyRam, metrics: &Mutex<Metrics>, stream: Stream, p: &Pages) -> Result<(), ReceiveError> {
    if p.is_empty() {
        return Ok(());
    }
    let batch: Vec<Placement<'_>> = p
        .iter()
        .map(|page| Placement {
            gpa: GuestAddress(page.gpa),
            data: match page.data {
                PageData::Raw(b) => uffd::PageData::Bytes(b),
                // The flow refused deltas; only zero is left.
                _ => uffd::PageData::Zero(1),
            },
        })
        .collect();
    let report = pc.place(&batch).map_err(|e| ReceiveError::Host(format!("post-copy: {}", error_chain(&e))))?;
    let now = Instant::now();
    let mut m = lock(metrics);
    m.first_placed.get_or_insert(now);
    m.last_placed = Some(now);
    m.duplicates += report.already;
    match stream {
        Stream::Urgent => m.requested += report.placed,
        _ => m.pushed += report.placed,
    }
    for page in p.iter() {
        if let Some((t, tid)) = m.waiting.remove(&(page.gpa / PAGE_SIZE_U64)) {
            let us = now.duration_since(t).as_micros() as u64;
            m.service.push(us);
            *m.blocked.entry(tid).or_default() += us;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use wanmig_types::PageRange;

    #[test]
    fn what_is_not_named_stays_present() {
        let ram = GuestRam::new(1 << 20).expect("ram");
        let named =
            [PageRange { first: 0, count: 2 }, PageRange { first: 10, count: 4 }, PageRange { first: 255, count: 1 }];
        let present = present_outside(&ram, &named);
        let p = |first: u64, pages: u64| (GuestAddress(first * PAGE_SIZE_U64), pages * PAGE_SIZE_U64);
        assert_eq!(present, vec![p(2, 8), p(14, 241)]);
        assert_eq!(present_outside(&ram, &[]), vec![p(0, 256)]);
    }
}
