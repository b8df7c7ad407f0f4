//! The destination side (`wanmig receive`): accept a pinned source, receive
//! pages into fresh guest RAM and the disks into new images, have the host
//! build the VM from the device state, say `Ready`, and run the VM only once
//! `Commit` arrives. An attempt that fails before commit is discarded and
//! the listener waits for the next one; so does a completed `sync`. A
//! settle query is answered from the journal, before and after a VM arrives;
//! so is a source's `Resume` once no attempt here waits for it (the attempt
//! decided, or failed): the source hears whether its migration committed.
//!
//! One attempt runs at a time; while it runs, other connections are still
//! heard: settle queries are answered, and a second source's hello is
//! refused at once as busy (it does not wait). Every wait has a deadline:
//! 10 s for a connection's first message, the idle timeout
//! ([`ReceiveOptions::idle_timeout`], 120 s) for a source that sends nothing
//! during the transfer, 60 s for `Commit` after `Ready`. The listener bounds
//! handshakes in flight (`wanmig_transport::limits`).
//!
//! The files: [`options`], `admit.rs` (what this host takes: shape, memory,
//! disk space, shared images opened), `disks.rs` (the images: reserved
//! names, installation, replicas, the chunk store's roots), `incoming.rs`
//! (bulk data carried out), [`host`] (what the VM's host must do),
//! `session.rs` (one attempt, hello to acknowledgement), [`leftovers`]
//! (what a crashed `receive` left, removed at start).

mod admit;
pub(crate) mod disks;
mod error;
pub mod host;
mod incoming;
pub mod leftovers;
pub mod options;
mod postcopy;
mod session;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinSet;
use wanmig_dedup::ChunkStore;
use wanmig_transport::{Conn, FrameReceiver, FrameSender, Listener, TransportError};
use wanmig_types::{MigrationId, error_chain};
use wanmig_vmm::config::VmConfig;
use wanmig_wire::{Message, Settlement};

pub use error::ReceiveError;
pub use host::VmHost;
pub use options::{DEFAULT_IDLE_TIMEOUT, DEFAULT_RESUME_WINDOW, ReceiveOptions};

use crate::handover;
use crate::journal::DestJournal;

/// How long a new connection may take to open its control stream and send
/// its first message.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections being heard at once (before their first message); more are
/// closed at once.
const MAX_TRIAGE: usize = 32;

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

/// What an attempt came to.
enum Outcome<V> {
    /// A disk sync completed; keep waiting.
    Synced,
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
/// running. `log` hears about refused peers, settle queries, failed
/// attempts and what a crashed earlier `receive` left behind (removed first:
/// see [`leftovers`]).
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
    let journal = DestJournal::new(&opts.dir);
    leftovers::clean(&journal, &opts.dir, log);
    let store = match &opts.shared_disks {
        Some(_) => None,
        None => Some(Arc::new(
            ChunkStore::open(&opts.store)
                .map_err(|e| ReceiveError::Disk(format!("chunk store: {}", error_chain(&e))))?,
        )),
    };
    let (vm, config, started, listener) = rt.block_on(async {
        let mut listener =
            Listener::bind(opts.listen, &opts.identity, &opts.peers, opts.tuning).map_err(ReceiveError::Listen)?;
        log(format!("listening on {}", listener.local_addr().map_err(ReceiveError::Listen)?));
        let (vm, config, started) = accept_until_received(&mut listener, opts, host, store, &journal, log).await?;
        Ok::<_, ReceiveError>((vm, config, started, listener))
    })?;
    let busy = format!("busy: this host runs VM {} now; start another `wanmig receive` for a new VM", config.name);
    let task = rt.spawn(serve_after(listener, journal, busy));
    let tunnel = started.map(|s| handover::TunnelRun::new(s, rt.clone()));
    Ok(Received { vm, config, tunnel, listener: ListenerService { task, rt } })
}

/// A connection that opened its control stream and sent its first message.
struct Heard {
    conn: Conn,
    tx: FrameSender,
    rx: FrameReceiver,
    first: Message,
    peer: String,
}

/// Waits (bounded) for a new connection's control stream and first
/// message; or says what went wrong, and with whom.
async fn hear(conn: Conn) -> Result<Heard, String> {
    let peer = conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
    hear_or_fail(conn)
        .await
        .map_err(|e| format!("connection from {peer} dropped before its hello: {}", error_chain(&e)))
}

/// Waits (bounded) for a new connection's control stream and first message.
async fn hear_or_fail(mut conn: Conn) -> Result<Heard, ReceiveError> {
    let peer = conn.remote_addr().map_or_else(|| "?".into(), |a| a.to_string());
    let heard = async {
        let (tx, mut rx) = conn.accept_control().await?;
        let first = rx.recv().await?.ok_or(TransportError::Lost("closed before Hello".into()))?;
        Ok::<_, TransportError>((tx, rx, first))
    };
    let (tx, rx, first) =
        tokio::time::timeout(HELLO_TIMEOUT, heard).await.map_err(|_| TransportError::Timeout(HELLO_TIMEOUT))??;
    Ok(Heard { conn, tx, rx, first, peer })
}

/// Answers a settle query on its own task; `notes` hears the outcome. So
/// is a `Resume` of a migration no attempt here waits for (any more): what
/// the journal says of it is the source's answer (committed: the VM is
/// ours; not committed: it never will be), as `wanmig settle` would hear.
fn answer_settle(mut h: Heard, journal: DestJournal, notes: UnboundedSender<String>) {
    let (what, migration_id) = match h.first {
        Message::SettleQuery { migration_id } => ("settle query", migration_id),
        Message::Resume { migration_id, .. } => ("resume, answered from the journal,", migration_id),
        _ => return,
    };
    tokio::spawn(async move {
        let note = match crate::settle::answer(&mut h.tx, &mut h.rx, migration_id, &journal).await {
            Ok(outcome) => format!("{what} for migration {migration_id} from {}: {outcome:?}", h.peer),
            Err(e) => format!("{what} for {migration_id}: {}", error_chain(&e)),
        };
        let _ = notes.send(note);
        drop(h.conn);
    });
}

/// A settle query about the attempt running here, decided (not yet
/// answered): `NotCommitted` means its source gave up on it, and it never
/// may commit now; the caller ends it, then answers.
fn settle_running(id: MigrationId, journal: &DestJournal, say: &dyn Fn(String)) -> Option<Settlement> {
    journal.settle(id).map_err(|e| say(format!("settle query for {id}: {}", error_chain(&e)))).ok()
}

/// A source coming back to resume its migration: handed to the attempt
/// running it (which checks the secret); when that attempt is over, the
/// journal answers ([`answer_settle`]).
fn route_resume(
    h: Heard,
    rejoin: Option<&UnboundedSender<session::Rejoin>>,
    journal: &DestJournal,
    notes: &UnboundedSender<String>,
) {
    let Heard { conn, tx, rx, first, peer } = h;
    let r = session::Rejoin { conn, tx, rx, first, peer };
    let unheard = match rejoin {
        Some(t) => t.send(r).err().map(|e| e.0),
        None => Some(r),
    };
    if let Some(session::Rejoin { conn, tx, rx, first, peer }) = unheard {
        answer_settle(Heard { conn, tx, rx, first, peer }, journal.clone(), notes.clone());
    }
}

/// Sends an outcome decided already, on its own task.
fn reply_settled(mut h: Heard, migration_id: MigrationId, outcome: Settlement) {
    tokio::spawn(async move {
        let _ = h.tx.send(&Message::SettleAnswer { migration_id, outcome }).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), h.tx.finish()).await;
        drop(h.conn);
    });
}

/// Refuses a source's hello (or resume) on its own task, saying why.
fn refuse(conn: Conn, mut tx: FrameSender, reason: String) {
    tokio::spawn(async move {
        let _ = tx.send(&Message::Refuse { reason }).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), tx.finish()).await;
        drop(conn);
    });
}

/// An attempt in progress: its peer and its outcome to come.
type Running<'a, V> = Pin<Box<dyn Future<Output = (String, Result<Option<Arrived<V>>, ReceiveError>)> + 'a>>;
type Arrived<V> = (V, VmConfig, Option<handover::Started>);

/// Serves connections until a VM has arrived. One attempt runs at a time;
/// meanwhile other connections are heard concurrently: settle queries are
/// answered, and another source's hello is refused as busy at once.
async fn accept_until_received<H: VmHost>(
    listener: &mut Listener,
    opts: &ReceiveOptions,
    host: &mut H,
    store: Option<Arc<ChunkStore>>,
    journal: &DestJournal,
    log: &mut dyn FnMut(String),
) -> Result<Arrived<H::Vm>, ReceiveError> {
    let log = RefCell::new(log);
    let say = |s: String| (log.borrow_mut())(s);
    let host = RefCell::new(host);
    let mut refusals = tokio::time::interval(Duration::from_millis(200));
    let mut heard: JoinSet<Result<Heard, String>> = JoinSet::new();
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut running: Option<Running<'_, H::Vm>> = None;
    // Where sources coming back to resume the running attempt go.
    let mut rejoin: Option<UnboundedSender<session::Rejoin>> = None;
    let (mut vm_name, mut running_id) = (String::new(), MigrationId::default());
    loop {
        tokio::select! {
            // An attempt that has ended is seen before the next hello is
            // heard: a source that retries at once is not told "busy".
            biased;
            (peer, outcome) = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                (running, rejoin) = (None, None);
                match outcome.map(|o| o.map_or(Outcome::Synced, |a| Outcome::Received(Box::new(a)))) {
                    Ok(Outcome::Received(arrived)) => return Ok(*arrived),
                    Ok(Outcome::Synced) => say(format!("disks synced from {peer}; waiting for the next session")),
                    Err(e) => say(format!("migration from {peer} failed, discarded: {}", error_chain(&e))),
                }
            }
            conn = listener.accept() => {
                let Some(conn) = conn else { return Err(ReceiveError::Listen(TransportError::Lost("listener closed".into()))) };
                if heard.len() < MAX_TRIAGE {
                    heard.spawn(hear(conn));
                }
            }
            Some(h) = heard.join_next(), if !heard.is_empty() => {
                let h = match h {
                    Ok(Ok(h)) => h,
                    Ok(Err(why)) => {
                        say(why);
                        continue;
                    }
                    Err(_) => continue,
                };
                match (&h.first, running.is_some()) {
                    (&Message::SettleQuery { migration_id: id }, true) if id == running_id => {
                        if let Some(outcome) = settle_running(id, journal, &say) {
                            // Ended (its VM, socket and images with it)
                            // before the answer goes out.
                            if outcome == Settlement::NotCommitted {
                                (running, rejoin) = (None, None);
                                say(format!("migration {id} of VM {vm_name} was settled as not committed: discarded"));
                            }
                            say(format!("settle query for migration {id}: {outcome:?}"));
                            reply_settled(h, id, outcome);
                        }
                    }
                    (&Message::Resume { migration_id: id, .. }, true) if id == running_id => {
                        route_resume(h, rejoin.as_ref(), journal, &notes_tx);
                    }
                    (Message::SettleQuery { .. } | Message::Resume { .. }, _) => {
                        answer_settle(h, journal.clone(), notes_tx.clone());
                    }
                    (Message::Hello { shape, .. }, true) => {
                        say(format!("refused VM {} from {}: busy receiving VM {vm_name}", shape.name, h.peer));
                        refuse(h.conn, h.tx, format!("busy: this host is receiving VM {vm_name} from another source; try again when it is done"));
                    }
                    (Message::Hello { shape, migration_id, .. }, false) => {
                        (vm_name, running_id) = (shape.name.clone(), *migration_id);
                        let Heard { conn, tx, rx, first, peer } = h;
                        let (rejoin_tx, rejoins) = unbounded_channel();
                        rejoin = Some(rejoin_tx);
                        let attempt = session::Attempt {
                            conn, tx, rx, opts, store: store.clone(), journal, rejoins: Some(rejoins), early: None,
                        };
                        let (host, say) = (&host, &say);
                        running = Some(Box::pin(async move { (peer, attempt.run(first, host, say).await) }));
                    }
                    _ => {}
                }
            }
            Some(note) = notes.recv() => say(note),
            _ = refusals.tick() => {
                if let Some(fp) = listener.take_refusal() {
                    say(format!("refused a source whose certificate {fp} is not pinned"));
                }
            }
        }
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
    receive_on_with(conn, None, opts, host, log).await
}

/// [`receive_on`], with `more`: the connections a source that lost the
/// link makes to resume its migration (an in-memory test's reconnections).
pub async fn receive_on_with<H: VmHost>(
    conn: Conn,
    more: Option<UnboundedReceiver<Conn>>,
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
    let Heard { conn, mut tx, mut rx, first, .. } = hear_or_fail(conn).await?;
    if let Message::SettleQuery { migration_id } = first {
        let outcome = crate::settle::answer(&mut tx, &mut rx, migration_id, &journal).await?;
        log(format!("settle query for migration {migration_id}: {outcome:?}"));
        return Ok(None);
    }
    let log = RefCell::new(log);
    let say = |s: String| (log.borrow_mut())(s);
    let rejoins = more.map(|mut more| {
        let (rejoin_tx, rejoins) = unbounded_channel();
        let journal = journal.clone();
        // Nobody reads the notes of this one-session listener.
        let (notes, _) = unbounded_channel();
        tokio::spawn(async move {
            while let Some(conn) = more.recv().await {
                match hear_or_fail(conn).await {
                    // Answered from the journal (an undecided attempt is
                    // recorded as aborted; unlike `receive`'s listener this
                    // one does not end it: it waits out its resume window).
                    Ok(h) if matches!(h.first, Message::SettleQuery { .. }) => {
                        answer_settle(h, journal.clone(), notes.clone());
                    }
                    Ok(h) => route_resume(h, Some(&rejoin_tx), &journal, &notes),
                    Err(_) => {}
                }
            }
        });
        rejoins
    });
    let attempt = session::Attempt { conn, tx, rx, opts, store, journal: &journal, rejoins, early: None };
    let arrived = attempt.run(first, &RefCell::new(host), &say).await?;
    Ok(arrived.map(|(vm, config, _)| (vm, config)))
}

/// After a VM arrived: settle queries are answered; a new VM is refused.
async fn serve_after(mut listener: Listener, journal: DestJournal, busy: String) {
    let mut heard: JoinSet<Result<Heard, String>> = JoinSet::new();
    let (notes_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Some(conn) = conn else { return };
                if heard.len() < MAX_TRIAGE {
                    heard.spawn(hear(conn));
                }
            }
            Some(h) = heard.join_next(), if !heard.is_empty() => {
                let h = match h {
                    Ok(Ok(h)) => h,
                    Ok(Err(why)) => {
                        eprintln!("wanmig receive: {why}");
                        continue;
                    }
                    Err(_) => continue,
                };
                match &h.first {
                    Message::SettleQuery { .. } | Message::Resume { .. } => {
                        answer_settle(h, journal.clone(), notes_tx.clone());
                    }
                    Message::Hello { .. } => refuse(h.conn, h.tx, busy.clone()),
                    _ => {}
                }
            }
            Some(note) = notes.recv() => eprintln!("wanmig receive: {note}"),
        }
    }
}
