//! The destination side: accept a pinned source, receive pages into fresh
//! guest RAM and the disks into new images (see `disk_dest.rs`),
//! build the VM from the device state, say `Ready`, and run the VM only
//! once `Commit` arrives. An attempt that fails before commit is discarded
//! and the listener waits for the next one; so does a completed `sync`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use wanmig_dedup::ChunkStore;
use wanmig_mem_sync::{PAGE_SIZE, compress, xbzrle};
use wanmig_transport::{Conn, Fingerprint, FrameReceiver, Identity, LinkTuning, Listener, TransportError};
use wanmig_types::error_chain;
use wanmig_vmm::config::{DiskConfig, Ipv4Cidr, MacAddr, NetConfig, SerialOutput, VmConfig};
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::snapshot::VmState;
use wanmig_vmm::{Vm, VmError, layout};
use wanmig_wire::{ChunkParams, Destination, Message, PageData, Pages, ProtocolError, VmShape, features};

use crate::disk_dest::{self, DestDisks};
use crate::handover;

/// How to receive.
#[derive(Debug)]
pub struct ReceiveOptions {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// This host's identity.
    pub identity: Identity,
    /// Sources allowed to migrate here.
    pub peers: Vec<Fingerprint>,
    /// Where the received VM's control socket and console log go.
    pub dir: PathBuf,
    /// Use the source's disk images at their paths, which must lie under
    /// this directory (storage both hosts see) instead of copying them.
    pub shared_disks: Option<PathBuf>,
    /// Where copied disk images go.
    pub disk_dir: PathBuf,
    /// This host's chunk store (created if missing).
    pub store: PathBuf,
    /// Leave the VM paused after the commit.
    pub paused: bool,
    /// This host's TAP interfaces for the VM's NICs, in the VM's NIC order.
    pub taps: Vec<String>,
    /// Window sizing.
    pub tuning: LinkTuning,
}

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The source broke the protocol.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// Building or loading the VM failed.
    #[error("VM")]
    Vm(#[from] VmError),
    /// The source sent something impossible (the reason says what).
    #[error("bad input from the source: {0}")]
    BadInput(String),
    /// We refused the VM.
    #[error("refused the VM: {0}")]
    Refused(String),
    /// The source aborted.
    #[error("{0}")]
    Aborted(String),
    /// The listener could not start.
    #[error("cannot listen")]
    Listen(#[source] TransportError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// A disk image or the chunk store failed here.
    #[error("disk: {0}")]
    Disk(String),
}

/// A VM received and running.
#[derive(Debug)]
pub struct Received {
    /// The VM (running).
    pub vm: Vm,
    /// Its host configuration.
    pub config: VmConfig,
    /// Its control socket, bound before the commit.
    pub control: std::os::unix::net::UnixListener,
    /// The network tunnel's end here, when the source asked for one.
    pub tunnel: Option<handover::TunnelRun>,
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

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Listens until one VM has been received and committed; returns it running.
/// `log` hears about refused peers and failed attempts.
pub fn receive(opts: &ReceiveOptions, log: &mut dyn FnMut(String)) -> Result<Received, ReceiveError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(ReceiveError::Runtime)?;
    let store = match &opts.shared_disks {
        Some(_) => None,
        None => Some(Arc::new(
            ChunkStore::open(&opts.store)
                .map_err(|e| ReceiveError::Disk(format!("chunk store: {}", error_chain(&e))))?,
        )),
    };
    let result = rt.block_on(async {
        let mut listener = Listener::bind(opts.listen, &opts.identity, &opts.peers, opts.tuning)
            .map_err(ReceiveError::Listen)?;
        log(format!("listening on {}", listener.local_addr().map_err(ReceiveError::Listen)?));
        let mut refusals = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                conn = listener.accept() => {
                    let Some(conn) = conn else { return Err(ReceiveError::Listen(TransportError::Lost("listener closed".into()))) };
                    let peer = conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
                    log(format!("incoming migration from {peer}"));
                    match receive_one(conn, opts, store.clone(), log).await {
                        Ok(Some(r)) => return Ok(r),
                        Ok(None) => log(format!("disks synced from {peer}; waiting for the next session")),
                        Err(e) => log(format!("migration from {peer} failed, discarded: {}", error_chain(&e))),
                    }
                }
                _ = refusals.tick() => {
                    if let Some(fp) = listener.take_refusal() {
                        log(format!("refused a source whose certificate {fp} is not pinned"));
                    }
                }
            }
        }
    });
    match result {
        // The tunnel's end lives on the runtime that drives its connection.
        Ok((mut r, Some(started))) => {
            r.tunnel = Some(handover::TunnelRun::new(started, rt));
            Ok(r)
        }
        other => {
            rt.shutdown_timeout(Duration::from_secs(1));
            other.map(|(r, _)| r)
        }
    }
}

/// Test hook: a destination started with `WANMIG_FAILPOINT=<name>` dies
/// abruptly at the point of that name, as a crashed host would. The fault
/// tests use it to cut a migration at a precise protocol step.
fn failpoint(name: &str) {
    if std::env::var("WANMIG_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("wanmig receive: failpoint {name}: exiting");
        std::process::exit(70);
    }
}

/// The host configuration for an incoming VM, or why it cannot be hosted;
/// with copied disks, also where each image goes once committed (the
/// configuration names the incoming images until then).
fn host_config(shape: &VmShape, opts: &ReceiveOptions, attempt: &str) -> Result<(VmConfig, Vec<PathBuf>), String> {
    let total = shape.memory.iter().try_fold(0u64, |acc, (_, l)| acc.checked_add(*l)).ok_or("memory size overflows")?;
    if total % (1 << 20) != 0 {
        return Err(format!("memory of {total} bytes is not whole MiB"));
    }
    let want: Vec<(u64, u64)> = layout::ram_regions(total).into_iter().map(|(a, l)| (a.0, l)).collect();
    if shape.memory != want {
        return Err(format!("memory layout {:x?} is not one this VMM builds", shape.memory));
    }
    let memory_mib = total >> 20;
    if !(wanmig_vmm::config::MIN_MEMORY_MIB..=wanmig_vmm::config::MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(format!("{memory_mib} MiB of memory is out of range"));
    }
    if shape.vcpus == 0 || shape.vcpus > wanmig_vmm::config::MAX_VCPUS {
        return Err(format!("{} vCPUs", shape.vcpus));
    }
    if !shape.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || shape.name.is_empty() {
        return Err("the VM name has characters this host does not accept".into());
    }
    let mut disks = Vec::new();
    let mut finals = Vec::new();
    for d in &shape.disks {
        let Some(shared) = &opts.shared_disks else {
            if d.size % 4096 != 0 || d.size > disk_dest::MAX_DISK_BYTES {
                return Err(format!(
                    "disk {} of {} bytes: copied disks are 4 KiB multiples up to 4 TiB",
                    d.path, d.size
                ));
            }
            let path = disk_dest::image_path(&opts.disk_dir, d, &shape.name)?;
            if finals.contains(&path) {
                return Err(format!("two disks would both be {}", path.display()));
            }
            // The VM opens the incoming image until the commit renames it.
            disks.push(DiskConfig { path: disk_dest::incoming(&path, attempt), read_only: d.read_only });
            finals.push(path);
            continue;
        };
        // A source names the path: hold it to the shared directory, after
        // resolving links and `..`, so it cannot open any file here.
        let under = std::fs::canonicalize(&d.path)
            .ok()
            .zip(std::fs::canonicalize(shared).ok())
            .is_some_and(|(disk, dir)| disk.starts_with(dir));
        if !under {
            return Err(format!("disk {} is not an image under the shared directory", d.path));
        }
        let size = std::fs::metadata(&d.path).map_err(|e| format!("disk {}: {e}", d.path))?.len();
        if size != d.size {
            return Err(format!("disk {} is {size} bytes here, {} at the source", d.path, d.size));
        }
        disks.push(DiskConfig { path: d.path.clone().into(), read_only: d.read_only });
    }
    if shape.nics.len() > opts.taps.len() {
        return Err(format!(
            "the VM has {} NIC(s) and this host offers {} TAP(s) for them (receive --tap NAME, one per NIC)",
            shape.nics.len(),
            opts.taps.len()
        ));
    }
    let mut nets = Vec::new();
    for (n, tap) in shape.nics.iter().zip(&opts.taps) {
        let mac = MacAddr(n.mac);
        if !mac.is_unicast() {
            return Err(format!("NIC MAC {mac} is not a unicast address"));
        }
        let ip = n.ipv4.map(|(a, prefix)| Ipv4Cidr { addr: a.into(), prefix });
        nets.push(NetConfig { tap: tap.clone(), mac, ip, gateway: None });
    }
    Ok((
        VmConfig {
            name: shape.name.clone(),
            memory_mib,
            vcpus: shape.vcpus,
            control_socket: opts.dir.join(format!("wanmig-{}.sock", shape.name)),
            serial: SerialOutput::File(opts.dir.join(format!("{}.serial.log", shape.name))),
            guest: None,
            disks,
            // The guest's CPUID arrives with its vCPU state.
            cpu_hide: Vec::new(),
            nets,
        },
        finals,
    ))
}

/// Applies a batch to guest RAM, checking every address.
fn apply(ram: &GuestRam, pages: &Pages, counts: &mut HashMap<u32, u64>) -> Result<(), ReceiveError> {
    let mem = ram.mem();
    let mut page = [0u8; PAGE_SIZE];
    let outside = |gpa: u64| ReceiveError::BadInput(format!("page {gpa:#x} is outside guest memory"));
    for p in pages.iter() {
        let at = GuestAddress(p.gpa);
        match p.data {
            PageData::Zero => mem.write_slice(&[0u8; PAGE_SIZE], at).map_err(|_| outside(p.gpa))?,
            PageData::Raw(b) => mem.write_slice(b, at).map_err(|_| outside(p.gpa))?,
            PageData::Delta(d) => {
                mem.read_slice(&mut page, at).map_err(|_| outside(p.gpa))?;
                xbzrle::decode(d, &mut page).map_err(|e| ReceiveError::BadInput(format!("page {:#x}: {e}", p.gpa)))?;
                mem.write_slice(&page, at).map_err(|_| outside(p.gpa))?;
            }
        }
    }
    *counts.entry(pages.round).or_default() += pages.len() as u64;
    Ok(())
}

/// What a bulk-stream message amounted to.
enum Bulk {
    /// Data applied.
    Applied,
    /// A round is complete and applied: tell the source.
    RoundDone(u32),
    /// The source ended the stream.
    End,
}

/// What the destination keeps while data arrive.
struct Incoming {
    /// Guest RAM (none for a disk-only sync).
    ram: Option<GuestRam>,
    /// Pages received per round, checked against each `RoundDone`.
    counts: HashMap<u32, u64>,
    /// The decoder of the source's zstd stream.
    zstd: compress::StreamDecompressor,
    /// The disks being copied.
    disks: Option<DestDisks>,
}

impl Incoming {
    fn disks(&mut self, what: &str) -> Result<&mut DestDisks, ReceiveError> {
        self.disks.as_mut().ok_or_else(|| ReceiveError::BadInput(format!("{what}, but no disk is being copied")))
    }

    fn on_data(&mut self, msg: Message) -> Result<Bulk, ReceiveError> {
        match msg {
            Message::Pages(p) => {
                let ram =
                    self.ram.as_ref().ok_or_else(|| ReceiveError::BadInput("pages in a disk-only sync".into()))?;
                apply(ram, &p, &mut self.counts)?;
            }
            Message::DiskChunk(c) => self.disks("a chunk")?.on_chunk(&c)?,
            Message::DiskWrites(w) => self.disks("written extents")?.on_writes(&w)?,
            m => return Err(ReceiveError::BadInput(format!("{} inside a compressed frame", m.name()))),
        }
        Ok(Bulk::Applied)
    }
}

fn on_bulk(msg: Option<Message>, inc: &mut Incoming) -> Result<Bulk, ReceiveError> {
    match msg {
        None => Ok(Bulk::End),
        Some(m @ (Message::Pages(_) | Message::DiskChunk(_) | Message::DiskWrites(_))) => inc.on_data(m),
        Some(Message::Compressed { raw_len, data }) => {
            let body =
                inc.zstd.decompress(&data, raw_len as usize).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
            let m = Message::decode_compressed_body(body).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
            inc.on_data(m)
        }
        Some(Message::DiskDone(d)) => inc.disks("a disk digest")?.on_done(&d).map(|()| Bulk::Applied),
        Some(Message::RoundDone { round, pages }) => {
            let got = inc.counts.get(&round).copied().unwrap_or(0);
            if got != pages {
                return Err(ReceiveError::BadInput(format!("round {round}: {pages} pages announced, {got} received")));
            }
            // Hash what the round wrote now, so the check before Ready
            // reads only what the stop-and-copy writes.
            if let Some(d) = &mut inc.disks {
                d.refresh()?;
            }
            Ok(Bulk::RoundDone(round))
        }
        Some(m) => Err(ReceiveError::BadInput(format!("{} on the bulk stream", m.name()))),
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

/// One session; `Some` with the VM (and the network tunnel's end, when the
/// source asked for one) when it was a migration, `None` after a completed
/// sync. Before the commit, a failure removes what the attempt
/// created and tells the source why.
async fn receive_one(
    mut conn: Conn,
    opts: &ReceiveOptions,
    store: Option<Arc<ChunkStore>>,
    log: &mut dyn FnMut(String),
) -> Result<Option<(Received, Option<handover::Started>)>, ReceiveError> {
    let (mut tx, mut rx) = conn.accept_control().await?;
    let hello = rx.recv_timeout(HELLO_TIMEOUT).await?.ok_or(TransportError::Lost("closed before Hello".into()))?;
    let dst = match Destination::AwaitHello.on_message(&hello) {
        Ok(d) => d,
        Err(e) => {
            let reason = match &hello {
                Message::Hello { version, page_size, .. } => {
                    format!(
                        "protocol version {version} / page size {page_size} not supported (this host: {} / {PAGE_SIZE})",
                        wanmig_wire::message::PROTOCOL_VERSION
                    )
                }
                m => format!("expected Hello, got {}", m.name()),
            };
            let _ = tx.send(&Message::Refuse { reason: reason.clone() }).await;
            return Err(ReceiveError::Refused(format!("{reason} ({e})")));
        }
    };
    let Message::Hello { shape, features: offered, chunking: proposed, migration_id, .. } = &hello else {
        return Err(ReceiveError::BadInput(format!("expected Hello, got {}", hello.name())));
    };
    // Names this attempt's incoming images: never another attempt's.
    let attempt: String = migration_id.short();
    let sync = offered & features::SYNC_ONLY != 0;
    let setup = match host_config(shape, opts, &attempt) {
        Ok(_) if sync && store.is_none() => Err("this host keeps no disk copies (it runs with --shared-disks)".into()),
        other => other,
    };
    let (config, finals) = match setup {
        Ok(c) => c,
        Err(reason) => {
            let (_, refuse) = dst.refuse_vm(&reason)?;
            let _ = tx.send(&refuse).await;
            return Err(ReceiveError::Refused(reason));
        }
    };
    let (local, params) = match &store {
        Some(st) => (features::ALL, chunking(st, *proposed)?),
        None => (features::ALL & !features::DISK_COPY & !features::SYNC_ONLY, *proposed),
    };
    let disks = match (&store, shape.disks.is_empty()) {
        (Some(st), false) => Some(DestDisks::create(&shape.name, &shape.disks, &finals, st.clone(), &attempt)?),
        _ => None,
    };
    let ram = if sync { None } else { Some(GuestRam::new(config.memory_bytes()).map_err(VmError::from)?) };
    // This host runs the tunnel's end if the guest's first NIC has an
    // address and a TAP here.
    let local = if handover::destination_config(&config.nets).is_ok() { local } else { local & !features::TUNNEL };
    let (dst, accept) = dst.accept(local, params)?;
    let tunnel = dst.features().unwrap_or(0) & features::TUNNEL != 0;
    let mut inc = Incoming {
        ram,
        counts: HashMap::new(),
        zstd: compress::StreamDecompressor::new().map_err(|e| ReceiveError::BadInput(format!("zstd: {e}")))?,
        disks,
    };
    tx.send(&accept).await?;
    let result = transfer(&mut conn, &mut tx, &mut rx, dst, &config, &mut inc, sync, log).await;
    let disks = inc.disks.take();
    drop(inc);
    match result {
        Err(e) => {
            // Tell the source why (best effort), and leave nothing behind.
            // Bounded: a source that is gone must not hold us up.
            let tell = async {
                let _ = tx.send(&Message::Abort { reason: error_chain(&e) }).await;
                let _ = tx.finish().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), tell).await;
            drop(disks); // removes the incoming images
            Err(e)
        }
        Ok((dst, ready_vm)) => {
            // Anything but Commit ends the attempt; returning drops (and
            // so removes) the incoming images.
            let commit =
                rx.recv_timeout(COMMIT_TIMEOUT).await?.ok_or(TransportError::Lost("closed before Commit".into()))?;
            if let Destination::Aborted(reason) = dst.on_message(&commit)? {
                return Err(ReceiveError::Aborted(reason));
            }
            // Committed: the VM (or the replica) is ours, whatever happens
            // to the acknowledgement.
            let installed = match disks {
                Some(d) => d.install(sync),
                None => Ok(Vec::new()),
            };
            let Some((mut vm, control)) = ready_vm else {
                installed?;
                let _ = tx.send(&Message::CommitAck).await;
                let _ = tx.finish().await;
                return Ok(None);
            };
            match installed {
                Ok(paths) if !paths.is_empty() => vm.set_disk_paths(&paths),
                Ok(_) => {}
                Err(e) => log(format!("the VM runs, but its disks keep their incoming names: {}", error_chain(&e))),
            }
            if !opts.paused {
                vm.resume();
            }
            failpoint("receive-exit-before-commit-ack");
            let _ = tx.send(&Message::CommitAck).await;
            let _ = tx.finish().await;
            let mut config = config;
            config.disks = vm.config().disks.clone();
            let tunnel = if tunnel { start_tunnel(conn, &config, log).await } else { None };
            Ok(Some((Received { vm, config, control, tunnel: None }, tunnel)))
        }
    }
}

/// From `Accept` to `Ready`: receives everything, checks it, builds the VM
/// (none for a sync) and says `Ready`.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    conn: &mut Conn,
    tx: &mut wanmig_transport::FrameSender,
    rx: &mut FrameReceiver,
    mut dst: Destination,
    config: &VmConfig,
    inc: &mut Incoming,
    sync: bool,
    log: &mut dyn FnMut(String),
) -> Result<(Destination, Option<(Vm, std::os::unix::net::UnixListener)>), ReceiveError> {
    let agreed = dst.features().unwrap_or(0);
    // The bulk stream shows up with its first byte, which may come after
    // manifests on the control stream have been answered: accept it while
    // serving those.
    let mut bulk: Option<FrameReceiver> = None;
    let mut bulk_open = true;
    let state = loop {
        tokio::select! {
            b = conn.accept_bulk(), if bulk.is_none() => bulk = Some(b?),
            m = async { bulk.as_mut().expect("guarded").recv().await }, if bulk_open && bulk.is_some() => match on_bulk(m?, inc)? {
                Bulk::Applied => {}
                // Pre-copy rounds are acknowledged once applied, so the
                // source measures the rate at which data really land.
                Bulk::RoundDone(round) => { tx.send(&Message::RoundApplied { round }).await?; }
                Bulk::End => bulk_open = false,
            },
            m = rx.recv() => {
                let m = m?.ok_or(TransportError::Lost("the source closed the control stream".into()))?;
                dst = dst.on_message(&m)?;
                match m {
                    Message::DeviceState { state } => break state,
                    Message::DiskManifest(manifest) => {
                        let need = inc.disks("a manifest")?.on_manifest(&manifest)?;
                        tx.send(&Message::DiskNeed(need)).await?;
                    }
                    _ => if let Destination::Aborted(reason) = &dst { return Err(ReceiveError::Aborted(reason.clone())) },
                }
            }
        }
    };
    // The source ends the bulk stream after the last pages: drain it.
    let t_state = std::time::Instant::now();
    let mut bulk = match bulk {
        Some(b) => b,
        None => conn.accept_bulk().await?,
    };
    while bulk_open {
        bulk_open = !matches!(on_bulk(bulk.recv().await?, inc)?, Bulk::End);
    }
    let drained = t_state.elapsed();
    if let Some(d) = &inc.disks {
        d.check_complete()?;
        let s = d.stats;
        log(format!(
            "disks verified: {} chunks copied from the local store, {} received, {} found corrupt in the store and fetched again",
            s.from_store, s.received, s.corrupt
        ));
    }
    failpoint("receive-exit-before-ready");
    if sync {
        if !state.is_empty() {
            return Err(ReceiveError::BadInput("a sync carried device state".into()));
        }
        let (dst, ready) = dst.ready()?;
        tx.send(&ready).await?;
        return Ok((dst, None));
    }
    let state = if agreed & features::ZSTD != 0 {
        let max = (wanmig_vmm::state::MAX_STATE_BYTES + 64) as usize;
        compress::decompress_blob(&state, max).map_err(|e| ReceiveError::BadInput(format!("device state: {e}")))?
    } else {
        state
    };
    let state: VmState = wanmig_vmm::state::decode(&state).map_err(|e| ReceiveError::BadInput(error_chain(&e)))?;
    let ram = inc.ram.take().ok_or_else(|| ReceiveError::BadInput("no memory was received".into()))?;
    let vm = Vm::from_incoming(config, ram, &state)?;
    // Everything that could stop us serving the VM fails here, before
    // Ready, where failing still resumes the source.
    let control = wanmig_vmm::control::bind(&config.control_socket)
        .map_err(|e| ReceiveError::Refused(format!("cannot serve the VM: {}", error_chain(&e))))?;
    log(format!(
        "device state received; last data applied {:.1} ms after it, VM built {:.1} ms after it",
        drained.as_secs_f64() * 1e3,
        t_state.elapsed().as_secs_f64() * 1e3
    ));
    let (dst, ready) = dst.ready()?;
    tx.send(&ready).await?;
    Ok((dst, Some((vm, control))))
}
