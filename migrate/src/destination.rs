//! The destination side: accept a pinned source, receive pages into fresh
//! guest RAM, build the VM from the device state, say `Ready`, and run the
//! VM only once `Commit` arrives. An attempt that fails before commit is
//! discarded and the listener waits for the next one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use wanmig_mem_sync::{PAGE_SIZE, compress, xbzrle};
use wanmig_transport::{Conn, Fingerprint, FrameReceiver, Identity, LinkTuning, Listener, TransportError};
use wanmig_vmm::config::{DiskConfig, SerialOutput, VmConfig};
use wanmig_vmm::control::error_chain;
use wanmig_vmm::memory::GuestRam;
use wanmig_vmm::snapshot::VmState;
use wanmig_vmm::{Vm, VmError, layout};
use wanmig_wire::{Destination, Message, PageData, Pages, ProtocolError, VmShape};

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
    /// this directory (storage both hosts see). `None`: refuse VMs with disks.
    pub shared_disks: Option<PathBuf>,
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
                    match receive_one(conn, opts, log).await {
                        Ok(r) => return Ok(r),
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
    rt.shutdown_timeout(Duration::from_secs(1));
    result
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

/// The host configuration for an incoming VM, or why it cannot be hosted.
fn host_config(shape: &VmShape, opts: &ReceiveOptions) -> Result<VmConfig, String> {
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
    for d in &shape.disks {
        let Some(shared) = &opts.shared_disks else {
            return Err("the VM has disks; disk migration (block-sync) is not built yet: \
                        receive with --shared-disks DIR when both hosts see the same images under DIR"
                .into());
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
        disks.push(DiskConfig { path: d.path.clone().into(), read_only: false });
    }
    Ok(VmConfig {
        name: shape.name.clone(),
        memory_mib,
        vcpus: shape.vcpus,
        control_socket: opts.dir.join(format!("wanmig-{}.sock", shape.name)),
        serial: SerialOutput::File(opts.dir.join(format!("{}.serial.log", shape.name))),
        guest: None,
        disks,
    })
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
    /// Pages applied.
    Applied,
    /// A round is complete and applied: tell the source.
    RoundDone(u32),
    /// The source ended the stream.
    End,
}

/// What the destination keeps while pages arrive.
struct Incoming<'a> {
    ram: &'a GuestRam,
    /// Pages received per round, checked against each `RoundDone`.
    counts: HashMap<u32, u64>,
    /// The decoder of the source's zstd stream.
    zstd: compress::StreamDecompressor,
}

fn on_bulk(msg: Option<Message>, inc: &mut Incoming<'_>) -> Result<Bulk, ReceiveError> {
    let (ram, counts) = (inc.ram, &mut inc.counts);
    match msg {
        None => Ok(Bulk::End),
        Some(Message::Pages(p)) => apply(ram, &p, counts).map(|()| Bulk::Applied),
        Some(Message::Compressed { raw_len, data }) => {
            let body =
                inc.zstd.decompress(&data, raw_len as usize).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
            let p = Message::decode_pages_body(body).map_err(|e| ReceiveError::BadInput(e.to_string()))?;
            apply(ram, &p, counts).map(|()| Bulk::Applied)
        }
        Some(Message::RoundDone { round, pages }) => {
            let got = counts.get(&round).copied().unwrap_or(0);
            if got != pages {
                return Err(ReceiveError::BadInput(format!("round {round}: {pages} pages announced, {got} received")));
            }
            Ok(Bulk::RoundDone(round))
        }
        Some(m) => Err(ReceiveError::BadInput(format!("{} on the bulk stream", m.name()))),
    }
}

async fn receive_one(
    mut conn: Conn,
    opts: &ReceiveOptions,
    log: &mut dyn FnMut(String),
) -> Result<Received, ReceiveError> {
    let (mut tx, mut rx) = conn.accept_control().await?;
    let hello = rx.recv_timeout(HELLO_TIMEOUT).await?.ok_or(TransportError::Lost("closed before Hello".into()))?;
    let dst = match Destination::AwaitHello.on_message(&hello) {
        Ok(d) => d,
        Err(e) => {
            let reason = match &hello {
                Message::Hello { version, page_size, .. } => {
                    format!("protocol version {version} / page size {page_size} not supported (this host: 1 / 4096)")
                }
                m => format!("expected Hello, got {}", m.name()),
            };
            let _ = tx.send(&Message::Refuse { reason: reason.clone() }).await;
            return Err(ReceiveError::Refused(format!("{reason} ({e})")));
        }
    };
    let Message::Hello { shape, .. } = &hello else {
        return Err(ReceiveError::BadInput(format!("expected Hello, got {}", hello.name())));
    };
    let config = match host_config(shape, opts) {
        Ok(c) => c,
        Err(reason) => {
            let (_, refuse) = dst.refuse_vm(&reason)?;
            let _ = tx.send(&refuse).await;
            return Err(ReceiveError::Refused(reason));
        }
    };
    let ram = GuestRam::new(config.memory_bytes()).map_err(VmError::from)?;
    let (mut dst, accept) = dst.accept()?;
    let agreed = dst.features().unwrap_or(0);
    tx.send(&accept).await?;
    let mut bulk: FrameReceiver = conn.accept_bulk().await?;
    let zstd = compress::StreamDecompressor::new().map_err(|e| ReceiveError::BadInput(format!("zstd: {e}")))?;
    let mut incoming = Incoming { ram: &ram, counts: HashMap::new(), zstd };
    let mut bulk_open = true;
    let state = loop {
        tokio::select! {
            m = bulk.recv(), if bulk_open => match on_bulk(m?, &mut incoming)? {
                Bulk::Applied => {}
                // Pre-copy rounds are acknowledged once applied, so the
                // source measures the rate at which pages really land.
                Bulk::RoundDone(round) => { tx.send(&Message::RoundApplied { round }).await?; }
                Bulk::End => bulk_open = false,
            },
            m = rx.recv() => {
                let m = m?.ok_or(TransportError::Lost("the source closed the control stream".into()))?;
                dst = dst.on_message(&m)?;
                match m {
                    Message::DeviceState { state } => break state,
                    _ => if let Destination::Aborted(reason) = &dst { return Err(ReceiveError::Aborted(reason.clone())) },
                }
            }
        }
    };
    // The source ends the bulk stream after the last pages: drain it.
    let t_state = std::time::Instant::now();
    while bulk_open {
        bulk_open = !matches!(on_bulk(bulk.recv().await?, &mut incoming)?, Bulk::End);
    }
    let drained = t_state.elapsed();
    drop(incoming);
    failpoint("receive-exit-before-ready");
    let state = if agreed & wanmig_wire::features::ZSTD != 0 {
        let max = (wanmig_vmm::state::MAX_STATE_BYTES + 64) as usize;
        compress::decompress_blob(&state, max).map_err(|e| ReceiveError::BadInput(format!("device state: {e}")))?
    } else {
        state
    };
    let state: VmState = wanmig_vmm::state::decode(&state).map_err(|e| ReceiveError::BadInput(error_chain(&e)))?;
    let mut vm = Vm::from_incoming(&config, ram, &state)?;
    // Everything that could stop us serving the VM fails here, before
    // Ready, where failing still resumes the source.
    let control = wanmig_vmm::control::bind(&config.control_socket)
        .map_err(|e| ReceiveError::Refused(format!("cannot serve the VM: {}", error_chain(&e))))?;
    log(format!(
        "device state received; last pages applied {:.1} ms after it, VM built {:.1} ms after it",
        drained.as_secs_f64() * 1e3,
        t_state.elapsed().as_secs_f64() * 1e3
    ));
    let (dst, ready) = dst.ready()?;
    tx.send(&ready).await?;
    let commit = rx.recv_timeout(COMMIT_TIMEOUT).await?.ok_or(TransportError::Lost("closed before Commit".into()))?;
    let dst = dst.on_message(&commit)?;
    if let Destination::Aborted(reason) = dst {
        return Err(ReceiveError::Aborted(reason));
    }
    // Committed: the VM is ours, whatever happens to the acknowledgement.
    vm.resume();
    failpoint("receive-exit-before-commit-ack");
    let _ = tx.send(&Message::CommitAck).await;
    let _ = tx.finish().await;
    Ok(Received { vm, config, control })
}
