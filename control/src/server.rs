//! The control server that runs beside a VM (`wanmig run`, `restore`, and a
//! received VM at `wanmig receive`): it answers requests while the VM runs
//! and while a migration of it runs, in its own thread, so that `status`,
//! `cancel` and `set` are served during the migration.
//!
//! The VM is in exactly one place (a `Slot`): here and ours to pause or
//! snapshot; inside a running migration (which owns it until it ends); in
//! doubt (paused, until `settle`); or gone (migrated away, with only the
//! network tunnel's end still served).

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wanmig_migrate::handover::TunnelRun;
use wanmig_migrate::journal::{SourceJournal, SourcePhase, SourceRecord};
use wanmig_migrate::report::Outcome;
use wanmig_migrate::source::{self, SendOptions, SendResult};
use wanmig_migrate::steer::{Steering, Tunables};
use wanmig_types::error_chain;
use wanmig_vmm::config::VmConfig;
use wanmig_vmm::memory::GuestMem;
use wanmig_vmm::vcpu::GuestStop;
use wanmig_vmm::vm::{RunState, Vm};

use crate::options::send_options;
use crate::protocol::{ProgressLine, Request, Response, SaveSummary, SettleReport, VmStatus};
use crate::settle::{self, Verdict};
use crate::socket::{self, ControlError};

/// How serving ended.
#[derive(Debug)]
pub enum ServeEnd {
    /// A `shutdown` request.
    Shutdown,
    /// The VM was migrated away and runs at the destination (and its
    /// network tunnel, if it left one, has ended).
    MigratedAway,
    /// A forced `shutdown` while a migration was in doubt: the journal
    /// still says so, and `wanmig settle` must decide before it runs again.
    ShutdownInDoubt,
    /// The guest stopped by itself.
    GuestStopped(GuestStop),
}

/// A migration running in a thread of its own, with the VM.
struct Running {
    steer: Steering,
    client: UnixStream,
    thread: JoinHandle<(Vm, SendResult)>,
    /// The VM's memory, to read the test guest's status meanwhile.
    mem: GuestMem,
    /// For a sync: the destination, and the write-tracking map it took.
    sync: Option<crate::dr::SyncTarget>,
}

/// Where the VM is.
enum Slot {
    /// Here, ours to run, pause, snapshot or migrate.
    Here(Vm),
    /// Inside a running migration.
    Migrating(Running),
    /// Paused: a migration's commit went out and no acknowledgement came.
    InDoubt(Vm),
    /// Gone: it runs at the destination.
    Away,
}

/// The server of one VM.
pub struct VmServer {
    cfg: VmConfig,
    path: PathBuf,
    listener: UnixListener,
    journal: SourceJournal,
    tunnel: Option<TunnelRun>,
    requests: mpsc::Receiver<(Result<Request, String>, UnixStream)>,
    requests_tx: mpsc::Sender<(Result<Request, String>, UnixStream)>,
}

impl std::fmt::Debug for VmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmServer").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Serves `vm`'s control socket (already bound at `cfg.control_socket` by
/// [`socket::bind`]) until a shutdown, the guest's own stop, or a migration
/// away (and the end of the tunnel it left). `tunnel` is the end of a
/// tunnel this host runs for the VM (a received VM's).
pub fn serve(
    vm: Vm,
    listener: UnixListener,
    cfg: &VmConfig,
    tunnel: Option<TunnelRun>,
) -> Result<ServeEnd, ControlError> {
    let (requests_tx, requests) = mpsc::channel();
    let journal = SourceJournal::new(&cfg.state_dir, &cfg.name);
    let mut server = VmServer {
        cfg: cfg.clone(),
        path: cfg.control_socket.clone(),
        listener,
        journal,
        tunnel,
        requests,
        requests_tx,
    };
    let end = server.run(Slot::Here(vm));
    let _ = std::fs::remove_file(&server.path);
    Ok(end)
}

impl VmServer {
    fn run(&mut self, mut slot: Slot) -> ServeEnd {
        loop {
            self.accept();
            slot = match self.tick(slot) {
                Ok(s) => s,
                Err(end) => return end,
            };
            let Ok((req, stream)) = self.requests.recv_timeout(Duration::from_millis(20)) else { continue };
            let (response, next) = match req {
                Err(e) => (Some(Response::err(e)), Ok(slot)),
                Ok(r) => self.handle(r, slot, &stream),
            };
            // A migration answers its own client when it ends.
            if let Some(r) = response {
                socket::send_line(&stream, &r);
            }
            slot = match next {
                Ok(s) => s,
                Err(end) => return end,
            };
        }
    }

    /// Takes every waiting connection; each request is read in a thread of
    /// its own, so a slow client never holds the server up.
    fn accept(&self) {
        while let Ok((stream, _)) = self.listener.accept() {
            let tx = self.requests_tx.clone();
            std::thread::spawn(move || {
                let req = socket::read_request(&stream);
                let _ = tx.send((req, stream));
            });
        }
    }

    /// What happened by itself: the guest stopped, a migration ended, the
    /// tunnel closed.
    fn tick(&mut self, slot: Slot) -> Result<Slot, ServeEnd> {
        match slot {
            Slot::Here(vm) => match vm.wait_guest_stop(Duration::ZERO) {
                Some(stop) => Err(ServeEnd::GuestStopped(stop)),
                None => Ok(Slot::Here(vm)),
            },
            Slot::Migrating(r) if r.thread.is_finished() => self.finish_migration(r),
            Slot::Away if !self.tunnel.as_ref().is_some_and(TunnelRun::is_running) => Err(ServeEnd::MigratedAway),
            s => Ok(s),
        }
    }

    fn handle(&mut self, req: Request, slot: Slot, stream: &UnixStream) -> (Option<Response>, Result<Slot, ServeEnd>) {
        match (req, slot) {
            (Request::Status, s) => (Some(self.status(&s)), Ok(s)),
            (Request::Migrate { migration }, Slot::Here(vm)) => match self.start_migration(vm, &migration, stream) {
                Ok(running) => (None, Ok(Slot::Migrating(running))),
                Err((vm, e)) => (Some(Response::err(e)), Ok(Slot::Here(vm))),
            },
            (Request::Cancel, Slot::Migrating(r)) => {
                let resp = match r.steer.cancel("cancelled by the operator") {
                    Ok(()) => Response::ok(),
                    Err(e) => Response::err(e),
                };
                (Some(resp), Ok(Slot::Migrating(r)))
            }
            (Request::Set { downtime_ms, max_bandwidth_bps, no_bandwidth_cap }, Slot::Migrating(r)) => {
                let cap = match (no_bandwidth_cap, max_bandwidth_bps) {
                    (true, _) => Some(None),
                    (false, Some(b)) => Some(Some(b as f64 / 8.0)),
                    (false, None) => None,
                };
                r.steer.set(downtime_ms.map(Duration::from_millis), cap);
                (Some(Response { migration: Some(r.steer.progress()), ..Response::ok() }), Ok(Slot::Migrating(r)))
            }
            (Request::Settle { force_resume }, Slot::InDoubt(vm)) => self.settle(vm, force_resume),
            (Request::RoutesConverged, s) => {
                let r = match &self.tunnel {
                    Some(t) => t.routes_converged().map_or_else(Response::err, |()| Response::ok()),
                    None => Response::err("no network tunnel runs here"),
                };
                (Some(r), Ok(s))
            }
            (Request::Shutdown { force }, s) => self.shutdown(force, s),
            (Request::Tracking { add, reset, remove }, Slot::Here(vm)) => {
                let r = crate::dr::tracking_request(&vm, add, reset, remove);
                (Some(r), Ok(Slot::Here(vm)))
            }
            (req @ (Request::Pause | Request::Resume | Request::Snapshot { .. }), Slot::Here(mut vm)) => {
                let r = vm_request(&mut vm, req);
                (Some(r), Ok(Slot::Here(vm)))
            }
            (req, s) => (Some(Response::err(refusal(&req, &s))), Ok(s)),
        }
    }

    fn status(&self, slot: &Slot) -> Response {
        let (state, guest, migration) = match slot {
            Slot::Here(vm) => {
                let state = if vm.run_state() == RunState::Running { "running" } else { "paused" };
                (state, vm.test_guest_status(), None)
            }
            Slot::Migrating(r) => {
                ("migrating", wanmig_vmm::testguest::read_status(&r.mem).ok(), Some(r.steer.progress()))
            }
            Slot::InDoubt(vm) => ("in-doubt", vm.test_guest_status(), None),
            Slot::Away => ("migrated-away", None, None),
        };
        let c = &self.cfg;
        let status = VmStatus {
            name: c.name.clone(),
            state: state.into(),
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            guest: guest.map(Into::into),
        };
        let tracking = match slot {
            Slot::Here(vm) | Slot::InDoubt(vm) => Some(crate::dr::tracking_status(vm)),
            _ => None,
        };
        Response {
            status: Some(status),
            migration,
            tunnel: self.tunnel.as_ref().map(TunnelRun::status),
            tracking,
            ..Response::ok()
        }
    }

    #[allow(clippy::result_large_err)] // The VM comes back on refusal; it is moved, not copied.
    fn start_migration(
        &mut self,
        vm: Vm,
        req: &crate::protocol::MigrateRequest,
        stream: &UnixStream,
    ) -> Result<Running, (Vm, String)> {
        if vm.run_state() != RunState::Running {
            return Err((vm, "the VM is paused; resume it before migrating".into()));
        }
        if let Ok(Some(rec)) = self.journal.read() {
            if rec.phase != SourcePhase::Started {
                return Err((
                    vm,
                    format!("the journal records migration {} as {:?}: settle it first", rec.migration_id, rec.phase),
                ));
            }
        }
        let mut opts = match send_options(req, &self.cfg) {
            Ok(o) => o,
            Err(e) => return Err((vm, e)),
        };
        let client = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => return Err((vm, format!("cannot keep the client's connection: {e}"))),
        };
        let _ = client.set_write_timeout(Some(Duration::from_secs(5)));
        let steer = Steering::new(Tunables { downtime: opts.downtime, max_bandwidth: opts.max_bandwidth });
        let mem = vm.ram().mem().clone();
        // Before the sync reads anything: what was written since the last
        // one to this destination is handed over, and the map restarts.
        let sync = req.sync.then(|| crate::dr::SyncTarget::begin(&vm, req));
        opts.disk_bases = crate::dr::disk_bases(&vm, req, req.sync);
        let thread = spawn_migration(vm, opts, steer.clone(), client.try_clone().ok());
        Ok(Running { steer, client, thread, mem, sync })
    }

    fn finish_migration(&mut self, r: Running) -> Result<Slot, ServeEnd> {
        let Ok((vm, result)) = r.thread.join() else {
            // The migration thread panicked: the VM went with it.
            socket::send_line(&r.client, &Response::err("the migration thread failed; the VM is lost to this process"));
            return Err(ServeEnd::GuestStopped(GuestStop::Failed("migration thread panicked".into())));
        };
        let SendResult { outcome, summary, tunnel } = result;
        if let Some(sync) = &r.sync {
            sync.finish(&vm, &self.cfg, outcome, &summary);
        }
        let ok = matches!(outcome, Outcome::Migrated | Outcome::Synced);
        let error = (!ok).then(|| summary.error.clone().unwrap_or_else(|| "migration failed".into()));
        socket::send_line(
            &r.client,
            &Response { ok, error, outcome: Some(outcome), summary: Some(summary), ..Response::ok() },
        );
        match outcome {
            Outcome::Migrated => {
                drop(vm);
                if tunnel.is_some() {
                    // A tunnel of an earlier migration (from the host this VM
                    // came from) gives way to the one that reaches it now.
                    if let Some(old) = self.tunnel.take() {
                        old.shutdown("the VM moved on");
                    }
                    self.tunnel = tunnel;
                }
                match self.tunnel.as_ref().is_some_and(TunnelRun::is_running) {
                    true => Ok(Slot::Away),
                    false => Err(ServeEnd::MigratedAway),
                }
            }
            // Never run here again without settling: the guest ran there.
            Outcome::InDoubt | Outcome::PostcopyLost => Ok(Slot::InDoubt(vm)),
            Outcome::FailedSourceRunning | Outcome::Synced => Ok(Slot::Here(vm)),
        }
    }

    fn settle(&mut self, mut vm: Vm, force_resume: bool) -> (Option<Response>, Result<Slot, ServeEnd>) {
        let mut rec = match self.journal.read() {
            Ok(Some(rec)) if rec.phase == SourcePhase::CommitSent => rec,
            Ok(_) => return (Some(Response::err("the journal records no migration in doubt")), Ok(Slot::InDoubt(vm))),
            Err(e) => return (Some(Response::err(error_chain(&e))), Ok(Slot::InDoubt(vm))),
        };
        let said = match settle::ask_destination(&rec) {
            Ok(s) => s,
            Err(e) => {
                return (Some(Response::err(format!("still in doubt: {}", error_chain(&e)))), Ok(Slot::InDoubt(vm)));
            }
        };
        let (verdict, action) = match settle::apply(&self.journal, &mut rec, said, force_resume) {
            Ok(v) => v,
            Err(e) => return (Some(Response::err(error_chain(&e))), Ok(Slot::InDoubt(vm))),
        };
        let report = settle_report(&rec, said, &action);
        match verdict {
            Verdict::Retire => {
                (Some(Response { settled: Some(report), ..Response::ok() }), Err(ServeEnd::MigratedAway))
            }
            Verdict::Reclaim => match vm.lock_disks() {
                Ok(()) => {
                    vm.resume();
                    (Some(Response { settled: Some(report), ..Response::ok() }), Ok(Slot::Here(vm)))
                }
                Err(e) => {
                    let why =
                        format!("{action}; but its disks cannot be taken back: {}; it stays paused", error_chain(&e));
                    (Some(Response::err(why)), Ok(Slot::Here(vm)))
                }
            },
            Verdict::Undecided => (Some(Response::err(action)), Ok(Slot::InDoubt(vm))),
        }
    }

    fn shutdown(&mut self, force: bool, slot: Slot) -> (Option<Response>, Result<Slot, ServeEnd>) {
        match slot {
            Slot::Migrating(r) => (
                Some(Response::err("a migration is running: cancel it (`wanmig cancel`) first")),
                Ok(Slot::Migrating(r)),
            ),
            Slot::InDoubt(vm) if !force => (
                Some(Response::err(
                    "a migration of this VM is in doubt: it may run at the destination; `wanmig settle` first (or shut down with --force: it stays in doubt)",
                )),
                Ok(Slot::InDoubt(vm)),
            ),
            Slot::InDoubt(_) => (Some(Response::ok()), Err(ServeEnd::ShutdownInDoubt)),
            Slot::Away => {
                if let Some(t) = &self.tunnel {
                    t.shutdown("the operator shut the old host's end down");
                }
                (Some(Response::ok()), Err(ServeEnd::MigratedAway))
            }
            Slot::Here(_) => (Some(Response::ok()), Err(ServeEnd::Shutdown)),
        }
    }

    /// Ends a tunnel this process still runs (it is exiting).
    pub fn end_tunnel(&mut self, why: &str) {
        if let Some(t) = self.tunnel.take() {
            t.shutdown(why);
            t.wait(Duration::from_secs(3));
        }
    }
}

fn settle_report(rec: &SourceRecord, said: wanmig_wire::Settlement, action: &str) -> SettleReport {
    SettleReport {
        migration_id: rec.migration_id.to_string(),
        dest: rec.dest.clone(),
        destination_says: said,
        action: action.into(),
    }
}

fn spawn_migration(
    mut vm: Vm,
    opts: SendOptions,
    steer: Steering,
    client: Option<UnixStream>,
) -> JoinHandle<(Vm, SendResult)> {
    std::thread::spawn(move || {
        let mut last = Instant::now() - Duration::from_secs(1);
        let result = source::send(&mut vm, &opts, &steer, &mut |p| {
            // At most ten lines a second: a fast migration must not be
            // slowed by its watcher.
            if last.elapsed() >= Duration::from_millis(100) || p.phase != wanmig_migrate::report::Phase::DiskCopy {
                last = Instant::now();
                if let Some(c) = &client {
                    socket::send_line(c, &ProgressLine { progress: p.clone() });
                }
            }
        });
        (vm, result)
    })
}

/// Why `req` cannot be served where the VM is.
fn refusal(req: &Request, slot: &Slot) -> String {
    let what = match req {
        Request::Cancel | Request::Set { .. } => return "no migration is running".into(),
        Request::Settle { .. } => return "nothing to settle: no migration of this VM is in doubt".into(),
        _ => "that",
    };
    match slot {
        Slot::Migrating(_) => format!("cannot do {what} while a migration runs (`wanmig cancel` stops it)"),
        Slot::InDoubt(_) => format!(
            "a migration of this VM is in doubt: it may be running at the destination; cannot do {what} (`wanmig settle` first)"
        ),
        Slot::Away => "the VM has migrated away; only its network tunnel runs here".into(),
        Slot::Here(_) => format!("cannot do {what} now"),
    }
}

/// A request on the VM itself (it is here).
fn vm_request(vm: &mut Vm, req: Request) -> Response {
    match req {
        Request::Pause => vm.pause().map_or_else(|e| Response::err(error_chain(&e)), |()| Response::ok()),
        Request::Resume => {
            vm.resume();
            Response::ok()
        }
        Request::Snapshot { dir, resume } => snapshot(vm, &dir, resume),
        _ => Response::err("not a request on the VM"),
    }
}

fn snapshot(vm: &mut Vm, dir: &std::path::Path, resume: bool) -> Response {
    let t = Instant::now();
    let result = vm.pause().and_then(|()| {
        let pause_ms = t.elapsed().as_secs_f64() * 1e3;
        vm.save(dir).map(|r| SaveSummary {
            pause_ms,
            state_ms: r.state_ms,
            memory_ms: r.memory_ms,
            sync_ms: r.sync_ms,
            memory_bytes: r.memory_bytes,
        })
    });
    if resume {
        vm.resume();
    }
    match result {
        Ok(s) => Response { save: Some(s), ..Response::ok() },
        Err(e) => Response::err(error_chain(&e)),
    }
}
