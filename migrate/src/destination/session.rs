//! One attempt at the destination, from the hello to the commit
//! acknowledgement, driven by the [`DestSession`] machine. Before the
//! commit, a failure removes what the attempt created and tells the source
//! why; after it, the VM is this host's whatever happens.

use std::cell::RefCell;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedReceiver;
use wanmig_dedup::ChunkStore;
use wanmig_mem_sync::compress;
use wanmig_transport::{Conn, FrameReceiver, FrameSender, PEER_CANCELLED, TransportError};
use wanmig_types::{MigrationId, error_chain, features};
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::memory::GuestRam;
use wanmig_wire::{ChunkParams, DestAction, DestSession, Message, Stream, VmShape};

use super::admit::{Admission, HostFacts, check_resources, host_config};
use super::disks::{Binding, DestDisks};
use super::error::ReceiveError;
use super::host::VmHost;
use super::incoming::{Bulk, Incoming};
use super::options::ReceiveOptions;
use super::postcopy::DestPostcopy;
use crate::handover;
use crate::journal::{DestJournal, DestPhase, DestRecord, ImageRecord, Owner};

/// How long the destination waits for the source to open post-copy's
/// urgent stream.
const POSTCOPY_OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many link failures one attempt rides out: a source whose link
/// keeps failing is given up on, so that it cannot hold this host forever.
const MAX_PARKS: u32 = 32;
/// How long the destination waits for `Commit` after `Ready`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// A source come back for its attempt after the link failed: a new
/// connection whose first message was `Resume`.
pub struct Rejoin {
    /// The new connection.
    pub conn: Conn,
    /// Its control stream's two halves.
    pub tx: FrameSender,
    /// Its control stream's two halves.
    pub rx: FrameReceiver,
    /// The `Resume` it sent.
    pub first: Message,
    /// Who it came from.
    pub peer: String,
}

/// One attempt's connection and what it works with.
pub struct Attempt<'a> {
    /// The connection.
    pub conn: Conn,
    /// The control stream's two halves.
    pub tx: FrameSender,
    /// The control stream's two halves.
    pub rx: FrameReceiver,
    /// What was asked of `receive`.
    pub opts: &'a ReceiveOptions,
    /// This host's chunk store (none with shared disks).
    pub store: Option<Arc<ChunkStore>>,
    /// The journal.
    pub journal: &'a DestJournal,
    /// Sources that come back to resume this attempt (none: it cannot be
    /// resumed).
    pub rejoins: Option<UnboundedReceiver<Rejoin>>,
    /// A rejoin heard while the attempt still served the old connection.
    pub early: Option<Rejoin>,
}

/// An admitted VM: what the attempt receives into.
struct Admitted {
    session: DestSession,
    config: VmConfig,
    incoming: Incoming,
    sync: bool,
    tunnel: bool,
    record: DestRecord,
    /// Shared disks, opened and checked at admission, for the VM.
    shared: Option<Vec<File>>,
    /// Post-copy, once it started: the guest's missing pages arrive there.
    postcopy: Option<DestPostcopy>,
    /// Times the link failed and the attempt waited for its source.
    parks: u32,
}

/// A received VM, its configuration and the tunnel's end.
type Arrived<V> = (V, VmConfig, Option<handover::Started>);

/// Runs `f` on the disks on a blocking thread, off the connection's task:
/// hashing and copying scale with what was received and may take seconds.
async fn off_task<T: Send + 'static>(
    slot: &mut Option<DestDisks>,
    f: impl FnOnce(&mut DestDisks) -> Result<T, ReceiveError> + Send + 'static,
) -> Result<T, ReceiveError> {
    let mut disks =
        slot.take().ok_or_else(|| ReceiveError::BadInput("disk data, but no disk is being copied".into()))?;
    let (disks, r) = tokio::task::spawn_blocking(move || {
        let r = f(&mut disks);
        (disks, r)
    })
    .await
    .map_err(|e| ReceiveError::Disk(format!("the disk task failed: {e}")))?;
    *slot = Some(disks);
    r
}

impl Attempt<'_> {
    /// Runs the attempt whose first message is `hello`. `Some` with the VM
    /// when it was a migration, `None` after a completed sync.
    pub async fn run<H: VmHost>(
        mut self,
        hello: Message,
        host: &RefCell<&mut H>,
        log: &dyn Fn(String),
    ) -> Result<Option<Arrived<H::Vm>>, ReceiveError> {
        let mut adm = self.admit(&hello, log).await?;
        let result = self.transfer(&mut adm, host, log).await;
        let vm = match result {
            Ok(vm) => vm,
            Err(e) => {
                self.fail(&mut adm, &e).await;
                return Err(e);
            }
        };
        self.commit(adm, vm, host, log).await
    }

    async fn send(&mut self, msg: &Message) -> Result<(), ReceiveError> {
        self.tx.send(msg).await?;
        Ok(())
    }

    /// The hello: checks it, admits or refuses the VM, sets up where it
    /// goes. Whatever fails before `Accept` is a refusal the source hears.
    async fn admit(&mut self, hello: &Message, log: &dyn Fn(String)) -> Result<Admitted, ReceiveError> {
        let mut session = DestSession::new();
        if let Err(e) = session.on_message(Stream::Control, hello) {
            let _ = self.send(&Message::Refuse { reason: e.to_string() }).await;
            return Err(ReceiveError::Refused(e.to_string()));
        }
        let Message::Hello { shape, features: offered, chunking: proposed, bases, .. } = hello else {
            return Err(ReceiveError::BadInput(format!("expected Hello, got {}", hello.name())));
        };
        match self.prepare(&mut session, shape, *offered, *proposed) {
            Ok((mut adm, local, params)) => {
                let based = self.start_from_bases(&mut adm, bases, log).await;
                let accept = session.accept(local, params, &based)?;
                adm.tunnel = session.features() & features::TUNNEL != 0;
                adm.session = session;
                if let Err(e) = self.send(&accept).await {
                    self.fail(&mut adm, &e).await;
                    return Err(e);
                }
                Ok(adm)
            }
            Err(reason) => {
                let refuse = session.refuse(&reason)?;
                let _ = self.send(&refuse).await;
                Err(ReceiveError::Refused(reason))
            }
        }
    }

    /// The disks that start from the earlier sync the source named (see
    /// `disks.rs`, "Bases"), where this host holds it: one flag per disk.
    /// A base that cannot be had is no refusal, only a first copy.
    async fn start_from_bases(
        &self,
        adm: &mut Admitted,
        bases: &[Option<MigrationId>],
        log: &dyn Fn(String),
    ) -> Vec<bool> {
        let mut based = vec![false; bases.len()];
        let Some(store) = self.store.clone() else { return based };
        if adm.incoming.disks.is_none() {
            return based;
        }
        for (i, base) in bases.iter().enumerate() {
            let Some(base) = base else { continue };
            let vm = adm.config.name.clone();
            let found = wanmig_dr::epoch::list(&*store, Some(&vm))
                .map_err(|e| error_chain(&e))
                .map(|all| all.into_iter().rev().find(|e| e.migration_id == base.to_string()));
            let epoch = match found {
                Ok(Some(e)) => e,
                Ok(None) => {
                    log(format!("disk {i}: no epoch of VM {vm} from sync {base} here: a first copy"));
                    continue;
                }
                Err(e) => {
                    log(format!("disk {i}: cannot list the epochs of VM {vm}: {e}: a first copy"));
                    continue;
                }
            };
            let t = Instant::now();
            let started = off_task(&mut adm.incoming.disks, move |d| Ok(d.start_from(i, &epoch))).await;
            match started.map_err(|e| error_chain(&e)).and_then(|r| r) {
                Ok(how) => {
                    based[i] = true;
                    log(format!(
                        "disk {i} starts from the epoch of sync {base} ({how}, {:.0} ms): only the blocks written since arrive",
                        t.elapsed().as_secs_f64() * 1e3
                    ));
                }
                Err(e) => log(format!("disk {i}: cannot start from sync {base}: {e}: a first copy")),
            }
        }
        based
    }

    /// Everything admission decides, before anything moves: the VM's
    /// configuration here, the host's resources, the disks' reserved names
    /// and incoming images, the journal record; with the features this
    /// host speaks and the chunking to use. The error is the refusal.
    fn prepare(
        &mut self,
        session: &mut DestSession,
        shape: &VmShape,
        offered: u64,
        proposed: ChunkParams,
    ) -> Result<(Admitted, u64, ChunkParams), String> {
        let id = session.id();
        // Names this attempt's incoming images: never another attempt's.
        let attempt = id.short();
        let sync = offered & features::SYNC_ONLY != 0;
        if sync && self.store.is_none() {
            return Err("this host keeps no disk copies (it runs with --shared-disks)".into());
        }
        let facts = HostFacts::probe(self.opts)?;
        check_resources(shape, self.store.is_some(), &facts, self.opts)?;
        let admission = host_config(shape, self.opts, &attempt)?;
        let (mut local, params, record_chunking) = match &self.store {
            Some(st) => {
                let (params, new) = chunking(st, proposed).map_err(|e| error_chain(&e))?;
                (features::ALL, params, new.then_some(params))
            }
            None => (features::ALL & !features::DISK_COPY & !features::SYNC_ONLY, proposed, None),
        };
        // Journalled before any file is created, so that a crash from here
        // on leaves a record naming what to remove.
        let mut record = self.plan(id, shape, sync, &admission)?;
        let (disks, ram) = match self.set_up(&mut record, shape, &admission, sync, record_chunking) {
            Ok(made) => made,
            Err(e) => {
                record.images.clear();
                let _ = self.journal.record(&mut record, DestPhase::Aborted);
                return Err(e);
            }
        };
        // This host runs the tunnel's end if the guest's first NIC has an
        // address and a TAP here.
        if handover::destination_config(&admission.config.nets).is_err() {
            local &= !features::TUNNEL;
        }
        let incoming = Incoming::new(ram, disks).map_err(|e| error_chain(&e))?;
        let adm = Admitted {
            session: DestSession::new(),
            config: admission.config,
            incoming,
            sync,
            tunnel: false,
            record,
            shared: admission.shared,
            postcopy: None,
            parks: 0,
        };
        Ok((adm, local, params))
    }

    /// The attempt's journal record, written: who receives, and the files
    /// it will create.
    fn plan(&self, id: MigrationId, shape: &VmShape, sync: bool, admission: &Admission) -> Result<DestRecord, String> {
        let source = self.conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
        let images = (admission.finals.iter().zip(&admission.config.disks))
            .map(|(f, d)| ImageRecord { incoming: d.path.clone(), path: f.clone(), reservation: None, replica: false })
            .collect();
        let mut record = DestRecord {
            migration_id: id,
            vm: shape.name.clone(),
            source,
            phase: DestPhase::Receiving,
            updated_unix: 0,
            sync,
            owner: Some(Owner::this_process()),
            images,
        };
        self.journal.record(&mut record, DestPhase::Receiving).map_err(journal_err)?;
        Ok(record)
    }

    /// Reserves the images' names and creates them (copied disks), records
    /// them in the journal, and maps guest RAM (a migration). What it made
    /// goes again if it fails.
    fn set_up(
        &self,
        record: &mut DestRecord,
        shape: &VmShape,
        admission: &Admission,
        sync: bool,
        record_chunking: Option<ChunkParams>,
    ) -> Result<(Option<DestDisks>, Option<GuestRam>), String> {
        let disks = match (&self.store, shape.disks.is_empty()) {
            (Some(st), false) => {
                let fingerprint = self.conn.peer_fingerprint().map_or_else(|| "unknown".into(), |f| f.to_string());
                let binding = Binding { vm: shape.name.clone(), source: fingerprint };
                let attempt = record.migration_id.short();
                let d =
                    DestDisks::create(&shape.disks, &admission.finals, st.clone(), &attempt, binding, record_chunking)?;
                record.images = d.records();
                self.journal.record(record, DestPhase::Receiving).map_err(journal_err)?;
                Some(d)
            }
            _ => None,
        };
        let ram = match sync {
            true => None,
            false => {
                let mut ram = GuestRam::new(admission.config.memory_bytes()).map_err(|e| error_chain(&e))?;
                // The KVM VM is made (and the RAM registered with it) now,
                // not inside the downtime. Best effort: where it fails, the
                // VM's build makes its own, and says why if it cannot.
                let _ = wanmig_vmm::vm::Vm::prepare(&mut ram);
                Some(ram)
            }
        };
        Ok((disks, ram))
    }

    /// From `Accept` to `Ready`: receives everything, has the host build
    /// the VM (none for a sync) and says `Ready`.
    async fn transfer<H: VmHost>(
        &mut self,
        adm: &mut Admitted,
        host: &RefCell<&mut H>,
        log: &dyn Fn(String),
    ) -> Result<Option<H::Vm>, ReceiveError> {
        let state = loop {
            match self.receive_all(adm).await {
                Ok(state) => break state,
                Err(e) if self.resumable(adm, &e) => self.park(adm, &e, log).await?,
                Err(e) => return Err(e),
            }
        };
        let t_state = Instant::now();
        if adm.incoming.disks.is_some() {
            off_task(&mut adm.incoming.disks, |d| d.check_complete()).await?;
            let s = adm.incoming.disks.as_ref().map(|d| d.stats).unwrap_or_default();
            log(format!(
                "disks verified: {} chunks copied from the local store, {} received, {} found corrupt in the store and fetched again",
                s.from_store, s.received, s.corrupt
            ));
        }
        crate::failpoint("receive-exit-before-ready", Duration::ZERO);
        let t_checked = Instant::now();
        let vm = match adm.sync {
            true => None,
            false => Some(self.build(adm, host, &state)?),
        };
        log(format!(
            "device state received; disks checked in {:.1} ms, VM built {:.1} ms after the last data",
            (t_checked - t_state).as_secs_f64() * 1e3,
            t_state.elapsed().as_secs_f64() * 1e3
        ));
        let ready = adm.session.ready()?;
        self.journal.record(&mut adm.record, DestPhase::Ready)?;
        self.send(&ready).await?;
        Ok(vm)
    }

    fn build<H: VmHost>(
        &self,
        adm: &mut Admitted,
        host: &RefCell<&mut H>,
        state: &[u8],
    ) -> Result<H::Vm, ReceiveError> {
        let state = match adm.session.features() & features::ZSTD != 0 {
            true => {
                let max = (wanmig_vmm::state::MAX_STATE_BYTES + 64) as usize;
                compress::decompress_blob(state, max)
                    .map_err(|e| ReceiveError::BadInput(format!("device state: {e}")))?
            }
            false => state.to_vec(),
        };
        let ram = adm.incoming.ram.take().ok_or_else(|| ReceiveError::BadInput("no memory was received".into()))?;
        host.borrow_mut().build(&adm.config, ram, &state, adm.shared.take()).map_err(ReceiveError::Host)
    }

    /// Serves both streams until the device state has arrived and the bulk
    /// stream has ended; returns the state. A source that sends no whole
    /// message on either stream for the idle timeout is dropped.
    async fn receive_all(&mut self, adm: &mut Admitted) -> Result<Vec<u8>, ReceiveError> {
        // The bulk stream shows up with its first byte, which may come after
        // manifests on the control stream have been answered: accept it while
        // serving those.
        let mut bulk: Option<FrameReceiver> = None;
        let (mut bulk_open, mut state) = (true, None);
        let idle = self.opts.idle_timeout;
        let mut deadline = tokio::time::Instant::now() + idle;
        while bulk_open || state.is_none() {
            tokio::select! {
                b = self.conn.accept_bulk(), if bulk.is_none() && bulk_open => bulk = Some(b?),
                m = async { bulk.as_mut().expect("guarded").recv().await }, if bulk_open && bulk.is_some() => {
                    let m = m?;
                    match adm.incoming.on_bulk(&mut adm.session, m)? {
                        Bulk::Applied => {}
                        // Rounds are acknowledged once applied (and hashed),
                        // so the source measures the rate at which data
                        // really land.
                        Bulk::RoundDone(round) => {
                            if adm.incoming.disks.is_some() {
                                off_task(&mut adm.incoming.disks, |d| d.refresh()).await?;
                            }
                            self.send(&Message::RoundApplied { round }).await?;
                        }
                        Bulk::CheckDisk(done) => off_task(&mut adm.incoming.disks, move |d| d.on_done(&done)).await?,
                        Bulk::Commit => off_task(&mut adm.incoming.disks, DestDisks::commit).await?,
                        Bulk::End => bulk_open = false,
                        Bulk::StartPostcopy => {
                            let rx = bulk.take().ok_or_else(|| ReceiveError::BadInput("no bulk stream".into()))?;
                            adm.postcopy = Some(self.start_postcopy(adm, rx).await?);
                            bulk_open = false;
                        }
                    }
                    deadline = tokio::time::Instant::now() + idle;
                }
                m = self.rx.recv(), if state.is_none() => {
                    let m = m?.ok_or(TransportError::Lost("the source closed the control stream".into()))?;
                    state = self.on_control(adm, m).await?;
                    deadline = tokio::time::Instant::now() + idle;
                }
                _ = tokio::time::sleep_until(deadline) => return Err(TransportError::Timeout(idle).into()),
                r = async { self.rejoins.as_mut().expect("guarded").recv().await }, if self.rejoins.is_some() => {
                    // The source saw the link fail before this side did.
                    let Some(r) = r else {
                        self.rejoins = None;
                        continue;
                    };
                    self.early = Some(r);
                    return Err(TransportError::Lost("the source reconnected on a new connection".into()).into());
                }
            }
        }
        Ok(state.unwrap_or_default())
    }

    /// `PostcopyStart` arrived on `bulk`: registers the missing pages,
    /// takes the urgent stream the source opens, opens the request stream,
    /// and starts serving faults (before the device state loads).
    async fn start_postcopy(&mut self, adm: &mut Admitted, bulk: FrameReceiver) -> Result<DestPostcopy, ReceiveError> {
        let flow =
            adm.session.take_postcopy().ok_or_else(|| ReceiveError::BadInput("post-copy did not start".into()))?;
        let urgent = tokio::time::timeout(POSTCOPY_OPEN_TIMEOUT, self.conn.accept_bulk())
            .await
            .map_err(|_| TransportError::Timeout(POSTCOPY_OPEN_TIMEOUT))??;
        let requests = self.conn.open_bulk().await?;
        let zstd = adm.incoming.take_zstd()?;
        let ram = adm.incoming.ram.as_ref().ok_or_else(|| ReceiveError::BadInput("post-copy of a sync".into()))?;
        DestPostcopy::start(ram, flow, bulk, zstd, urgent, requests)
    }

    /// Whether the attempt can wait for its source to come back after `e`:
    /// a lost link, not a source that cancelled nor one that holds a live
    /// connection and sends nothing (a stall is no outage: it keeps the slot
    /// only for the idle timeout), and not more than [`MAX_PARKS`] times.
    fn resumable(&self, adm: &Admitted, e: &ReceiveError) -> bool {
        let lost = matches!(e, ReceiveError::Transport(TransportError::Lost(why)) if why != PEER_CANCELLED);
        lost && adm.parks < MAX_PARKS
            && self.rejoins.is_some()
            && !self.opts.resume_window.is_zero()
            && adm.session.can_resume()
            && adm.postcopy.is_none()
    }

    /// After the link failed with `why`: holds what arrived for the resume
    /// window, until the source reconnects with this migration's secret;
    /// then says where it stands (`Resumed`) and goes on with the new
    /// connection. A window that ends fails the attempt.
    async fn park(&mut self, adm: &mut Admitted, why: &ReceiveError, log: &dyn Fn(String)) -> Result<(), ReceiveError> {
        let window = self.opts.resume_window;
        adm.parks += 1;
        // Whatever is left of the old connection goes: a source still on it
        // learns that it must reconnect.
        self.conn.close(0);
        log(format!(
            "link to the source lost ({}); keeping migration {} for {window:?} for it to resume",
            error_chain(why),
            adm.session.id()
        ));
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let r = self.next_rejoin(deadline, why, "").await?;
            match self.rejoin(adm, r).await {
                Ok(peer) => {
                    log(format!("source reconnected from {peer}: migration {} resumed", adm.session.id()));
                    return Ok(());
                }
                Err(e) => log(format!("a resume failed, still waiting: {}", error_chain(&e))),
            }
        }
    }

    /// After a post-copy's commit: acknowledges it, waits (riding out
    /// outages) until every page is here, and tells the source.
    async fn finish_postcopy(
        &mut self,
        adm: &mut Admitted,
        mut pc: DestPostcopy,
        log: &dyn Fn(String),
    ) -> Result<(), ReceiveError> {
        // The guest runs here on what it has; the rest comes.
        let _ = self.tx.send(&Message::CommitAck).await;
        log(format!("post-copy: the guest runs here; {} pages still at the source", pc.missing()));
        loop {
            match pc.wait().await {
                Ok(()) => break,
                Err(e) if self.resumable_postcopy(adm, &e) => self.park_postcopy(adm, &mut pc, &e, log).await?,
                Err(e) => return Err(e),
            }
        }
        let (flow, report) = pc.finish().await?;
        let complete = adm.session.postcopy_complete(&flow, report.clone())?;
        let _ = self.journal.record(&mut adm.record, DestPhase::Committed);
        // Every page is here: the guest is whole whatever happens to this
        // message (a source that misses it learns it from settle).
        if let Err(e) = self.send(&complete).await {
            log(format!("post-copy complete, but the source was not told: {}", error_chain(&e)));
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tx.finish()).await;
        log(format!(
            "post-copy complete: {} faults, fault service p50 {} µs, p99 {} µs, max {} µs; {} pages requested, {} pushed",
            report.faults,
            report.service_p50_us,
            report.service_p99_us,
            report.service_max_us,
            report.requested,
            report.pushed
        ));
        Ok(())
    }

    /// Whether a post-copy whose page streams failed with `e` can wait for
    /// its source to come back (the vCPUs that fault wait meanwhile).
    fn resumable_postcopy(&self, adm: &Admitted, e: &ReceiveError) -> bool {
        matches!(e, ReceiveError::Transport(_))
            && self.rejoins.is_some()
            && !self.opts.resume_window.is_zero()
            && adm.session.can_resume()
    }

    /// Post-copy's link failed with `why`: the guest runs on here and its
    /// vCPUs wait on missing pages until the source reconnects (within the
    /// resume window); then the page streams go on over the new connection
    /// from the pages that arrived. A window that ends loses the guest.
    async fn park_postcopy(
        &mut self,
        adm: &mut Admitted,
        pc: &mut DestPostcopy,
        why: &ReceiveError,
        log: &dyn Fn(String),
    ) -> Result<(), ReceiveError> {
        let window = self.opts.resume_window;
        self.conn.close(0);
        log(format!(
            "post-copy: link to the source lost ({}); {} pages missing, faulting vCPUs wait; keeping migration {} for {window:?}",
            error_chain(why),
            pc.missing(),
            adm.session.id()
        ));
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let r = self.next_rejoin(deadline, why, "post-copy lost: ").await?;
            match self.rejoin_postcopy(adm, pc, r).await {
                Ok(peer) => {
                    log(format!("source reconnected from {peer}: post-copy of {} resumed", adm.session.id()));
                    return Ok(());
                }
                Err(e) => log(format!("a resume failed, still waiting: {}", error_chain(&e))),
            }
        }
    }

    /// [`Attempt::rejoin`] for a post-copy: says which missing pages
    /// arrived, then takes the new connection's page streams.
    async fn rejoin_postcopy(
        &mut self,
        adm: &mut Admitted,
        pc: &mut DestPostcopy,
        mut r: Rejoin,
    ) -> Result<String, ReceiveError> {
        proves_its_source(&adm.session, &mut r).await?;
        let point = adm.session.resume(pc.arrived_runs())?;
        r.tx.send(&Message::Resumed(point)).await?;
        let open = async {
            let bulk = r.conn.accept_bulk().await?;
            let urgent = r.conn.accept_bulk().await?;
            let requests = r.conn.open_bulk().await?;
            Ok::<_, TransportError>((bulk, urgent, requests))
        };
        let (bulk, urgent, requests) = tokio::time::timeout(POSTCOPY_OPEN_TIMEOUT, open)
            .await
            .map_err(|_| TransportError::Timeout(POSTCOPY_OPEN_TIMEOUT))??;
        let zstd = wanmig_mem_sync::compress::StreamDecompressor::new()
            .map_err(|e| ReceiveError::BadInput(format!("zstd: {e}")))?;
        pc.restart(bulk, zstd, urgent, requests);
        (self.conn, self.tx, self.rx) = (r.conn, r.tx, r.rx);
        Ok(r.peer)
    }

    /// The next connection that claims to resume this attempt (heard while
    /// the old one still served, or since), until `deadline`: then the
    /// attempt fails, its message led by `lost` and naming `why` the link
    /// went.
    async fn next_rejoin(
        &mut self,
        deadline: tokio::time::Instant,
        why: &ReceiveError,
        lost: &str,
    ) -> Result<Rejoin, ReceiveError> {
        if let Some(r) = self.early.take() {
            return Ok(r);
        }
        let rejoins = self.rejoins.as_mut().ok_or(TransportError::Lost("no way to resume".into()))?;
        match tokio::time::timeout_at(deadline, rejoins.recv()).await {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(TransportError::Lost("the listener is gone".into()).into()),
            Err(_) => Err(ReceiveError::Aborted(format!(
                "{lost}the source did not come back within the resume window ({:?}) after: {}",
                self.opts.resume_window,
                error_chain(why)
            ))),
        }
    }

    /// Takes the attempt up on `r`'s connection if it proves to be this
    /// migration's source; tells it where this side stands. A stranger is
    /// refused and the old state kept.
    async fn rejoin(&mut self, adm: &mut Admitted, mut r: Rejoin) -> Result<String, ReceiveError> {
        proves_its_source(&adm.session, &mut r).await?;
        let point = adm.session.resume(adm.incoming.round_received())?;
        adm.incoming.reset_stream()?;
        if let Some(d) = adm.incoming.disks.as_mut() {
            d.rewind(&point.disks);
        }
        r.tx.send(&Message::Resumed(point)).await?;
        (self.conn, self.tx, self.rx) = (r.conn, r.tx, r.rx);
        Ok(r.peer)
    }

    /// A control message during the transfer; the device state when it is one.
    async fn on_control(&mut self, adm: &mut Admitted, m: Message) -> Result<Option<Vec<u8>>, ReceiveError> {
        match (adm.session.on_message(Stream::Control, &m)?, m) {
            (DestAction::AnswerManifest, Message::DiskManifest(manifest)) => {
                let disk = manifest.disk;
                let needed = off_task(&mut adm.incoming.disks, move |d| d.on_manifest(&manifest)).await?;
                let need = adm.session.need(disk, needed)?;
                self.send(&need).await?;
                Ok(None)
            }
            (DestAction::LoadState, Message::DeviceState { state }) => Ok(Some(state)),
            (DestAction::Aborted, Message::Abort { reason }) => {
                Err(ReceiveError::Aborted(format!("source aborted: {reason}")))
            }
            (a, m) => Err(ReceiveError::BadInput(format!("{} on the control stream ({a:?})", m.name()))),
        }
    }

    /// Before the commit: tells the source why (best effort, bounded: a
    /// source that is gone must not hold us up) and journals the end; the
    /// incoming images go when `adm` is dropped.
    async fn fail(&mut self, adm: &mut Admitted, e: &ReceiveError) {
        let _ = self.journal.record(&mut adm.record, DestPhase::Aborted);
        let reason = error_chain(e);
        let tell = async {
            let _ = self.tx.send(&Message::Abort { reason }).await;
            let _ = self.tx.finish().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), tell).await;
    }

    /// Waits for `Commit`; then the VM (or the replica) is ours.
    async fn commit<H: VmHost>(
        mut self,
        mut adm: Admitted,
        vm: Option<H::Vm>,
        host: &RefCell<&mut H>,
        log: &dyn Fn(String),
    ) -> Result<Option<Arrived<H::Vm>>, ReceiveError> {
        let commit = self
            .rx
            .recv_timeout(COMMIT_TIMEOUT)
            .await
            .and_then(|m| m.ok_or(TransportError::Lost("closed before Commit".into())));
        let t_commit = Instant::now();
        let decided = match commit {
            Err(e) => Err(ReceiveError::from(e)),
            Ok(m) => match adm.session.on_message(Stream::Control, &m) {
                Err(e) => Err(e.into()),
                Ok(DestAction::Commit) => {
                    let phase = if adm.postcopy.is_some() { DestPhase::Postcopy } else { DestPhase::Committed };
                    self.journal.commit_as(&mut adm.record, phase).map_err(ReceiveError::from)
                }
                Ok(_) => Err(ReceiveError::Aborted(format!("{} instead of Commit", m.name()))),
            },
        };
        if let Err(e) = decided {
            self.fail(&mut adm, &e).await;
            return Err(e);
        }
        // Committed: the VM (or the replica) is ours, whatever happens to
        // the acknowledgement.
        let t_journal = Instant::now();
        let since_base = adm.incoming.disks.as_ref().and_then(DestDisks::since_base);
        let installed = match adm.incoming.disks.take() {
            Some(d) => d.install(adm.sync),
            None => Ok(Vec::new()),
        };
        let phase = if adm.postcopy.is_some() { DestPhase::Postcopy } else { DestPhase::Committed };
        if installed.is_ok() {
            adm.record.images.clear();
            let _ = self.journal.record(&mut adm.record, phase);
        }
        let Some(mut vm) = vm else {
            let images = installed?;
            let source = self.conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
            let Attempt { conn, tx, store, .. } = self;
            acknowledge(tx, Some(conn)).await;
            // Disaster recovery (wanmig-dr): the replica becomes an epoch.
            if let Some(store) = store {
                let sync = crate::epochs::Synced { images, migration_id: adm.session.id(), source, since_base };
                crate::epochs::after_sync(store, &adm.config, sync, log).await;
            }
            return Ok(None);
        };
        let paths = installed.unwrap_or_else(|e| {
            log(format!("the VM runs, but its disks keep their incoming names: {}", error_chain(&e)));
            adm.config.disks.iter().map(|d| d.path.clone()).collect::<Vec<PathBuf>>()
        });
        for (d, p) in adm.config.disks.iter_mut().zip(&paths) {
            d.path = p.clone();
        }
        let t_installed = Instant::now();
        if let Err(e) = host.borrow_mut().start(&mut vm, &paths, self.opts.paused) {
            log(format!("committed, but the VM could not be started here: {e}"));
        }
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        log(format!(
            "committed: journal {:.1} ms, images installed {:.1} ms, VM started {:.1} ms",
            ms(t_commit, t_journal),
            ms(t_journal, t_installed),
            ms(t_installed, Instant::now())
        ));
        crate::failpoint("receive-exit-before-commit-ack", Duration::ZERO);
        self.hand_over(adm, vm, log).await
    }

    /// The guest runs here: acknowledges the commit (post-copy first
    /// brings the pages the guest still lacks), then starts the network
    /// tunnel's end when asked for.
    async fn hand_over<V>(
        mut self,
        mut adm: Admitted,
        vm: V,
        log: &dyn Fn(String),
    ) -> Result<Option<Arrived<V>>, ReceiveError> {
        // Post-copy acknowledges the commit itself.
        let acked = match adm.postcopy.take() {
            Some(pc) => {
                self.finish_postcopy(&mut adm, pc, log).await?;
                true
            }
            None => false,
        };
        let Attempt { conn, tx, .. } = self;
        let started = match (adm.tunnel, acked) {
            (true, true) => {
                linger(tx, None);
                start_tunnel(conn, &adm.config, log).await
            }
            (true, false) => {
                acknowledge(tx, None).await;
                start_tunnel(conn, &adm.config, log).await
            }
            (false, true) => {
                linger(tx, Some(conn));
                None
            }
            (false, false) => {
                acknowledge(tx, Some(conn)).await;
                None
            }
        };
        Ok(Some((vm, adm.config, started)))
    }
}

/// Whether `r` is this migration's source coming back (its `Resume` names
/// the migration and carries its secret); a stranger is refused, told why.
async fn proves_its_source(session: &DestSession, r: &mut Rejoin) -> Result<(), ReceiveError> {
    let Message::Resume { migration_id, secret } = &r.first else {
        return Err(ReceiveError::BadInput(format!("{} instead of Resume", r.first.name())));
    };
    if *migration_id == session.id() && session.is_secret(secret) {
        return Ok(());
    }
    let reason = format!("migration {migration_id} is not waiting here, or the secret is wrong");
    let _ = r.tx.send(&Message::Refuse { reason: reason.clone() }).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), r.tx.finish()).await;
    Err(ReceiveError::Refused(format!("a resume from {}: {reason}", r.peer)))
}

/// How long the acknowledgement's delivery is waited for, in the
/// background, before its connection is let go.
const ACK_LINGER: Duration = Duration::from_secs(30);

/// Sends `CommitAck`; then, on a task of its own, ends the stream once the
/// source has it (a source that got it and went away leaves that wait to
/// the idle timeout: nothing here waits for it) and keeps `conn` open until
/// then, so closing it cannot cut the acknowledgement short.
async fn acknowledge(mut tx: FrameSender, conn: Option<Conn>) {
    let _ = tx.send(&Message::CommitAck).await;
    linger(tx, conn);
}

/// Ends the control stream once the source has everything on it, on a
/// task of its own, holding `conn` open until then (30 s at most).
fn linger(mut tx: FrameSender, conn: Option<Conn>) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(ACK_LINGER, tx.finish()).await;
        drop(conn);
    });
}

fn journal_err(e: crate::journal::JournalError) -> String {
    format!("cannot journal the migration: {}", error_chain(&e))
}

/// The chunking this host's store was filled with, or (for a new store)
/// the source's proposal, with `true`: it is recorded with the first
/// chunk kept, so a refused or empty attempt leaves the store unbound.
fn chunking(store: &ChunkStore, proposed: ChunkParams) -> Result<(ChunkParams, bool), ReceiveError> {
    let err = |e: wanmig_dedup::StoreError| ReceiveError::Disk(format!("chunk store: {e}"));
    if let Some(v) = store.meta("chunking").map_err(err)? {
        let n: Vec<u32> = v.split('/').filter_map(|x| x.parse().ok()).collect();
        if let [min, avg, max] = n[..] {
            let p = ChunkParams { min, avg, max };
            if p.check().is_ok() {
                return Ok((p, false));
            }
        }
        return Err(ReceiveError::Disk(format!("chunk store: unreadable chunking parameters {v:?}")));
    }
    Ok((proposed, true))
}

/// Starts this host's end of the network tunnel on the stream the source
/// opens after the commit. The VM runs here whatever happens: a failure is
/// logged, not returned.
async fn start_tunnel(mut conn: Conn, config: &VmConfig, log: &dyn Fn(String)) -> Option<handover::Started> {
    let started = async {
        let cfg = handover::destination_config(&config.nets)?;
        let (tx, rx) = tokio::time::timeout(handover::OPEN_TIMEOUT, conn.accept_control())
            .await
            .map_err(|_| format!("the source opened no tunnel stream within {:?}", handover::OPEN_TIMEOUT))?
            .map_err(|e| e.to_string())?;
        wanmig_tunnel::Tunnel::start(cfg, tx, rx).await.map_err(|e| e.to_string())
    };
    match started.await {
        Ok(tunnel) => {
            log(format!("network tunnel from the source: forwarding for the guest on {}", tunnel.status().interface));
            Some(handover::Started { tunnel, conn })
        }
        Err(e) => {
            log(format!("network tunnel failed to start: {e}"));
            None
        }
    }
}
