//! One attempt at the destination, from the hello to the commit
//! acknowledgement, driven by the [`DestSession`] machine. Before the
//! commit, a failure removes what the attempt created and tells the source
//! why; after it, the VM is this host's whatever happens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wanmig_dedup::ChunkStore;
use wanmig_mem_sync::compress;
use wanmig_transport::{Conn, FrameReceiver, FrameSender, TransportError};
use wanmig_types::{error_chain, features};
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::memory::GuestRam;
use wanmig_wire::{ChunkParams, DestAction, DestSession, Message, Stream};

use super::admit::host_config;
use super::disks::DestDisks;
use super::error::ReceiveError;
use super::host::VmHost;
use super::incoming::{Bulk, Incoming};
use super::options::ReceiveOptions;
use crate::handover;
use crate::journal::{DestJournal, DestPhase, DestRecord};

/// How long the destination waits for `Commit` after `Ready`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

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
}

/// An admitted VM: what the attempt receives into.
struct Admitted {
    session: DestSession,
    config: VmConfig,
    incoming: Incoming,
    sync: bool,
    tunnel: bool,
    record: Option<DestRecord>,
}

/// A received VM, its configuration and the tunnel's end.
type Arrived<V> = (V, VmConfig, Option<handover::Started>);

impl Attempt<'_> {
    /// Runs the attempt whose first message is `hello`. `Some` with the VM
    /// when it was a migration, `None` after a completed sync.
    pub async fn run<H: VmHost>(
        mut self,
        hello: Message,
        host: &mut H,
        log: &mut dyn FnMut(String),
    ) -> Result<Option<Arrived<H::Vm>>, ReceiveError> {
        let mut adm = self.admit(&hello).await?;
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

    /// The hello: checks it, admits or refuses the VM, sets up where it goes.
    async fn admit(&mut self, hello: &Message) -> Result<Admitted, ReceiveError> {
        let mut session = DestSession::new();
        if let Err(e) = session.on_message(Stream::Control, hello) {
            let _ = self.send(&Message::Refuse { reason: e.to_string() }).await;
            return Err(ReceiveError::Refused(e.to_string()));
        }
        let Message::Hello { shape, features: offered, chunking: proposed, migration_id, .. } = hello else {
            return Err(ReceiveError::BadInput(format!("expected Hello, got {}", hello.name())));
        };
        // Names this attempt's incoming images: never another attempt's.
        let attempt = migration_id.short();
        let sync = offered & features::SYNC_ONLY != 0;
        let setup = match host_config(shape, self.opts, &attempt) {
            Ok(_) if sync && self.store.is_none() => {
                Err("this host keeps no disk copies (it runs with --shared-disks)".into())
            }
            other => other,
        };
        let (config, finals) = match setup {
            Ok(c) => c,
            Err(reason) => {
                let refuse = session.refuse(&reason)?;
                let _ = self.send(&refuse).await;
                return Err(ReceiveError::Refused(reason));
            }
        };
        let (mut local, params) = match &self.store {
            Some(st) => (features::ALL, chunking(st, *proposed)?),
            None => (features::ALL & !features::DISK_COPY & !features::SYNC_ONLY, *proposed),
        };
        let disks = match (&self.store, shape.disks.is_empty()) {
            (Some(st), false) => Some(DestDisks::create(&shape.name, &shape.disks, &finals, st.clone(), &attempt)?),
            _ => None,
        };
        let ram =
            if sync { None } else { Some(GuestRam::new(config.memory_bytes()).map_err(wanmig_vmm::VmError::from)?) };
        // This host runs the tunnel's end if the guest's first NIC has an
        // address and a TAP here.
        if handover::destination_config(&config.nets).is_err() {
            local &= !features::TUNNEL;
        }
        let accept = session.accept(local, params)?;
        let tunnel = session.features() & features::TUNNEL != 0;
        let record = match sync {
            true => None,
            false => {
                let source = self.conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
                let mut rec = DestRecord {
                    migration_id: *migration_id,
                    vm: shape.name.clone(),
                    source,
                    phase: DestPhase::Receiving,
                    updated_unix: 0,
                };
                self.journal.record(&mut rec, DestPhase::Receiving)?;
                Some(rec)
            }
        };
        let incoming = Incoming::new(ram, disks)?;
        self.send(&accept).await?;
        Ok(Admitted { session, config, incoming, sync, tunnel, record })
    }

    /// From `Accept` to `Ready`: receives everything, has the host build
    /// the VM (none for a sync) and says `Ready`.
    async fn transfer<H: VmHost>(
        &mut self,
        adm: &mut Admitted,
        host: &mut H,
        log: &mut dyn FnMut(String),
    ) -> Result<Option<H::Vm>, ReceiveError> {
        let state = self.receive_all(adm).await?;
        let t_state = Instant::now();
        if let Some(d) = &adm.incoming.disks {
            d.check_complete()?;
            let s = d.stats;
            log(format!(
                "disks verified: {} chunks copied from the local store, {} received, {} found corrupt in the store and fetched again",
                s.from_store, s.received, s.corrupt
            ));
        }
        crate::failpoint("receive-exit-before-ready", Duration::ZERO);
        let vm = match adm.sync {
            true => None,
            false => Some(self.build(adm, host, &state)?),
        };
        log(format!(
            "device state received; VM built {:.1} ms after the last data",
            t_state.elapsed().as_secs_f64() * 1e3
        ));
        let ready = adm.session.ready()?;
        if let Some(rec) = &mut adm.record {
            self.journal.record(rec, DestPhase::Ready)?;
        }
        self.send(&ready).await?;
        Ok(vm)
    }

    fn build<H: VmHost>(&self, adm: &mut Admitted, host: &mut H, state: &[u8]) -> Result<H::Vm, ReceiveError> {
        let state = match adm.session.features() & features::ZSTD != 0 {
            true => {
                let max = (wanmig_vmm::state::MAX_STATE_BYTES + 64) as usize;
                compress::decompress_blob(state, max)
                    .map_err(|e| ReceiveError::BadInput(format!("device state: {e}")))?
            }
            false => state.to_vec(),
        };
        let ram = adm.incoming.ram.take().ok_or_else(|| ReceiveError::BadInput("no memory was received".into()))?;
        host.build(&adm.config, ram, &state).map_err(ReceiveError::Host)
    }

    /// Serves both streams until the device state has arrived and the bulk
    /// stream has ended; returns the state.
    async fn receive_all(&mut self, adm: &mut Admitted) -> Result<Vec<u8>, ReceiveError> {
        // The bulk stream shows up with its first byte, which may come after
        // manifests on the control stream have been answered: accept it while
        // serving those.
        let mut bulk: Option<FrameReceiver> = None;
        let (mut bulk_open, mut state) = (true, None);
        while bulk_open || state.is_none() {
            tokio::select! {
                b = self.conn.accept_bulk(), if bulk.is_none() => bulk = Some(b?),
                m = async { bulk.as_mut().expect("guarded").recv().await }, if bulk_open && bulk.is_some() => {
                    match adm.incoming.on_bulk(&mut adm.session, m?)? {
                        Bulk::Applied => {}
                        // Rounds are acknowledged once applied, so the source
                        // measures the rate at which data really land.
                        Bulk::RoundDone(round) => self.send(&Message::RoundApplied { round }).await?,
                        Bulk::End => bulk_open = false,
                    }
                }
                m = self.rx.recv(), if state.is_none() => {
                    let m = m?.ok_or(TransportError::Lost("the source closed the control stream".into()))?;
                    state = self.on_control(adm, m).await?;
                }
            }
        }
        Ok(state.unwrap_or_default())
    }

    /// A control message during the transfer; the device state when it is one.
    async fn on_control(&mut self, adm: &mut Admitted, m: Message) -> Result<Option<Vec<u8>>, ReceiveError> {
        match (adm.session.on_message(Stream::Control, &m)?, m) {
            (DestAction::AnswerManifest, Message::DiskManifest(manifest)) => {
                let disks = adm
                    .incoming
                    .disks
                    .as_mut()
                    .ok_or_else(|| ReceiveError::BadInput("a manifest, but no disk is being copied".into()))?;
                let needed = disks.on_manifest(&manifest)?;
                let need = adm.session.need(manifest.disk, needed)?;
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
        if let Some(rec) = &mut adm.record {
            let _ = self.journal.record(rec, DestPhase::Aborted);
        }
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
        host: &mut H,
        log: &mut dyn FnMut(String),
    ) -> Result<Option<Arrived<H::Vm>>, ReceiveError> {
        let commit = self
            .rx
            .recv_timeout(COMMIT_TIMEOUT)
            .await
            .and_then(|m| m.ok_or(TransportError::Lost("closed before Commit".into())));
        let decided = match commit {
            Err(e) => Err(ReceiveError::from(e)),
            Ok(m) => match adm.session.on_message(Stream::Control, &m) {
                Err(e) => Err(e.into()),
                Ok(DestAction::Commit) => match &mut adm.record {
                    Some(rec) => self.journal.commit(rec).map_err(ReceiveError::from),
                    None => Ok(()),
                },
                Ok(_) => Err(ReceiveError::Aborted(format!("{} instead of Commit", m.name()))),
            },
        };
        if let Err(e) = decided {
            self.fail(&mut adm, &e).await;
            return Err(e);
        }
        // Committed: the VM (or the replica) is ours, whatever happens to
        // the acknowledgement.
        let installed = match adm.incoming.disks.take() {
            Some(d) => d.install(adm.sync),
            None => Ok(Vec::new()),
        };
        let Some(mut vm) = vm else {
            let images = installed?;
            self.acknowledge().await;
            // Disaster recovery (wanmig-dr): the replica becomes an epoch.
            if let Some(store) = self.store.clone() {
                let source = self.conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
                crate::epochs::after_sync(store, &adm.config, images, adm.session.id(), source, log).await;
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
        if let Err(e) = host.start(&mut vm, &paths, self.opts.paused) {
            log(format!("committed, but the VM could not be started here: {e}"));
        }
        crate::failpoint("receive-exit-before-commit-ack", Duration::ZERO);
        self.acknowledge().await;
        let started = match adm.tunnel {
            true => start_tunnel(self.conn, &adm.config, log).await,
            false => None,
        };
        Ok(Some((vm, adm.config, started)))
    }

    /// Sends `CommitAck` and waits (briefly: the source may close the
    /// connection as soon as it has it) for it to be delivered.
    async fn acknowledge(&mut self) {
        let _ = self.tx.send(&Message::CommitAck).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.tx.finish()).await;
    }
}

/// The chunking this host's store was filled with, or (for a new store)
/// the source's proposal, which it keeps from now on.
fn chunking(store: &ChunkStore, proposed: ChunkParams) -> Result<ChunkParams, ReceiveError> {
    let err = |e: wanmig_dedup::StoreError| ReceiveError::Disk(format!("chunk store: {e}"));
    if let Some(v) = store.meta("chunking").map_err(err)? {
        let n: Vec<u32> = v.split('/').filter_map(|x| x.parse().ok()).collect();
        if let [min, avg, max] = n[..] {
            let p = ChunkParams { min, avg, max };
            if p.check().is_ok() {
                return Ok(p);
            }
        }
        return Err(ReceiveError::Disk(format!("chunk store: unreadable chunking parameters {v:?}")));
    }
    store.set_meta("chunking", &format!("{}/{}/{}", proposed.min, proposed.avg, proposed.max)).map_err(err)?;
    Ok(proposed)
}

/// Starts this host's end of the network tunnel on the stream the source
/// opens after the commit. The VM runs here whatever happens: a failure is
/// logged, not returned.
async fn start_tunnel(mut conn: Conn, config: &VmConfig, log: &mut dyn FnMut(String)) -> Option<handover::Started> {
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
