//! The destination side (`wanmig receive`): accept a pinned source, receive
//! pages into fresh guest RAM and the disks into new images, have the host
//! build the VM from the device state, say `Ready`, and run the VM only once
//! `Commit` arrives. An attempt that fails before commit is discarded and
//! the listener waits for the next one; so does a completed `sync`. A
//! settle query is answered from the journal, before and after a VM arrives.
//!
//! The files: [`options`], `admit.rs` (what this host takes), `disks.rs`
//! (the images), `incoming.rs` (bulk data carried out), [`host`] (what the
//! VM's host must do), `session.rs` (one attempt, hello to acknowledgement).

mod admit;
mod disks;
mod error;
pub mod host;
mod incoming;
pub mod options;
mod session;

use std::sync::Arc;
use std::time::Duration;

use wanmig_dedup::ChunkStore;
use wanmig_transport::{Conn, Listener, TransportError};
use wanmig_types::error_chain;
use wanmig_vmm::config::VmConfig;
use wanmig_wire::Message;

pub use error::ReceiveError;
pub use host::VmHost;
pub use options::ReceiveOptions;

use crate::handover;
use crate::journal::DestJournal;

/// How long the first message of a connection may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A VM received, committed and started.
#[derive(Debug)]
pub struct Received<V> {
    /// The VM, as the host built and started it.
    pub vm: V,
    /// Its host configuration here (disks at their final paths).
    pub config: VmConfig,
    /// The network tunnel's end here, when the source asked for one.
    pub tunnel: Option<handover::TunnelRun>,
    /// The listener, still answering settle queries about past migrations
    /// (and telling new sources this host is busy) while the VM runs here.
    pub listener: ListenerService,
}

/// What a session came to.
enum Session<V> {
    /// A disk sync completed; keep waiting.
    Synced,
    /// A settle query was answered; keep waiting.
    Settled,
    /// A VM arrived and runs.
    Received(Box<(V, VmConfig, Option<handover::Started>)>),
}

/// The listener after a VM arrived: answers settle queries, refuses new
/// VMs, until dropped.
pub struct ListenerService {
    task: tokio::task::JoinHandle<()>,
    rt: Arc<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ListenerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerService").field("running", &!self.task.is_finished()).finish_non_exhaustive()
    }
}

impl Drop for ListenerService {
    fn drop(&mut self) {
        self.task.abort();
        let _ = &self.rt;
    }
}

/// Listens until one VM has been received and committed; returns it
/// running. `log` hears about refused peers, settle queries and failed
/// attempts.
pub fn receive<H: VmHost>(
    opts: &ReceiveOptions,
    host: &mut H,
    log: &mut dyn FnMut(String),
) -> Result<Received<H::Vm>, ReceiveError> {
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(ReceiveError::Runtime)?,
    );
    let store = match &opts.shared_disks {
        Some(_) => None,
        None => Some(Arc::new(
            ChunkStore::open(&opts.store)
                .map_err(|e| ReceiveError::Disk(format!("chunk store: {}", error_chain(&e))))?,
        )),
    };
    let journal = DestJournal::new(&opts.dir);
    let (vm, config, started, listener) = rt.block_on(async {
        let mut listener =
            Listener::bind(opts.listen, &opts.identity, &opts.peers, opts.tuning).map_err(ReceiveError::Listen)?;
        log(format!("listening on {}", listener.local_addr().map_err(ReceiveError::Listen)?));
        let (vm, config, started) = accept_until_received(&mut listener, opts, host, store, &journal, log).await?;
        Ok::<_, ReceiveError>((vm, config, started, listener))
    })?;
    let busy = format!("this host runs VM {} now; start another `wanmig receive` for a new VM", config.name);
    let task = rt.spawn(serve_after(listener, journal, busy));
    let tunnel = started.map(|s| handover::TunnelRun::new(s, rt.clone()));
    Ok(Received { vm, config, tunnel, listener: ListenerService { task, rt } })
}

async fn accept_until_received<H: VmHost>(
    listener: &mut Listener,
    opts: &ReceiveOptions,
    host: &mut H,
    store: Option<Arc<ChunkStore>>,
    journal: &DestJournal,
    log: &mut dyn FnMut(String),
) -> Result<(H::Vm, VmConfig, Option<handover::Started>), ReceiveError> {
    let mut refusals = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Some(conn) = conn else { return Err(ReceiveError::Listen(TransportError::Lost("listener closed".into()))) };
                let peer = conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
                match serve_connection(conn, opts, host, store.clone(), journal, log).await {
                    Ok(Session::Received(arrived)) => return Ok(*arrived),
                    Ok(Session::Synced) => log(format!("disks synced from {peer}; waiting for the next session")),
                    Ok(Session::Settled) => {}
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
}

/// One connection: a settle query, or a migration (or sync) attempt.
async fn serve_connection<H: VmHost>(
    mut conn: Conn,
    opts: &ReceiveOptions,
    host: &mut H,
    store: Option<Arc<ChunkStore>>,
    journal: &DestJournal,
    log: &mut dyn FnMut(String),
) -> Result<Session<H::Vm>, ReceiveError> {
    let (mut tx, mut rx) = conn.accept_control().await?;
    let first = rx.recv_timeout(HELLO_TIMEOUT).await?.ok_or(TransportError::Lost("closed before Hello".into()))?;
    if let Message::SettleQuery { migration_id } = first {
        let outcome = crate::settle::answer(&mut tx, &mut rx, migration_id, journal).await?;
        log(format!("settle query for migration {migration_id}: {outcome:?}"));
        return Ok(Session::Settled);
    }
    let attempt = session::Attempt { conn, tx, rx, opts, store, journal };
    match attempt.run(first, host, log).await? {
        Some(arrived) => Ok(Session::Received(Box::new(arrived))),
        None => Ok(Session::Synced),
    }
}

/// One session on a connection made elsewhere (an in-memory pair in
/// tests): a migration, a sync or a settle query. `Some` with the VM and
/// its configuration when a migration committed here.
pub async fn receive_on<H: VmHost>(
    conn: Conn,
    opts: &ReceiveOptions,
    host: &mut H,
    log: &mut dyn FnMut(String),
) -> Result<Option<(H::Vm, VmConfig)>, ReceiveError> {
    let store = match &opts.shared_disks {
        Some(_) => None,
        None => Some(Arc::new(
            ChunkStore::open(&opts.store)
                .map_err(|e| ReceiveError::Disk(format!("chunk store: {}", error_chain(&e))))?,
        )),
    };
    let journal = DestJournal::new(&opts.dir);
    match serve_connection(conn, opts, host, store, &journal, log).await? {
        Session::Received(arrived) => Ok(Some((arrived.0, arrived.1))),
        Session::Synced | Session::Settled => Ok(None),
    }
}

/// After a VM arrived: settle queries are answered; a new VM is refused.
async fn serve_after(mut listener: Listener, journal: DestJournal, busy: String) {
    while let Some(mut conn) = listener.accept().await {
        let Ok((mut tx, mut rx)) = conn.accept_control().await else { continue };
        match rx.recv_timeout(HELLO_TIMEOUT).await {
            Ok(Some(Message::SettleQuery { migration_id })) => {
                if let Err(e) = crate::settle::answer(&mut tx, &mut rx, migration_id, &journal).await {
                    eprintln!("wanmig receive: settle query for {migration_id}: {}", error_chain(&e));
                }
            }
            Ok(Some(Message::Hello { .. })) => {
                let _ = tx.send(&Message::Refuse { reason: busy.clone() }).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), tx.finish()).await;
            }
            _ => {}
        }
    }
}
