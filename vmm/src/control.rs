//! The control socket of a running VM: one JSON request per connection, one
//! JSON response line back.
//!
//! ```text
//! → {"op":"status"}                       ← {"ok":true,"status":{...}}
//! → {"op":"pause"}                        ← {"ok":true}
//! → {"op":"resume"}                       ← {"ok":true}
//! → {"op":"snapshot","dir":"/x","resume":false}  ← {"ok":true,"save":{...}}
//! → {"op":"shutdown"}                     ← {"ok":true}
//! ```
//!
//! A snapshot pauses the VM and leaves it paused unless `resume` is true.
//! Requests are capped at 64 KiB and 5 s; a client that sends garbage gets
//! `{"ok":false,"error":...}` and the VM is unaffected.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::testguest::GuestStatus;
use crate::vcpu::GuestStop;
use crate::vm::{RunState, SaveReport, Vm};

const MAX_REQUEST: u64 = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Report the VM's state.
    Status,
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// Pause and save to `dir`.
    Snapshot {
        /// Snapshot directory (created if missing).
        dir: PathBuf,
        /// Resume after saving.
        #[serde(default)]
        resume: bool,
    },
    /// Stop the VM and the serving process.
    Shutdown,
    /// Live-migrate the VM; progress lines stream back before the response.
    Migrate {
        /// What to do.
        migration: MigrateRequest,
    },
    /// The routes to the guest's address have converged: end the network
    /// tunnel of the last migration (at either end).
    RoutesConverged,
}

/// What `wanmig send` asks of the process running the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination `host:port`.
    pub dest: String,
    /// Directory of this host's identity (`wanmig keygen`).
    pub identity: PathBuf,
    /// The destination's fingerprint.
    pub peer: String,
    /// Downtime budget, ms.
    pub downtime_ms: u64,
    /// Bandwidth cap, bits/s.
    pub max_bandwidth_bps: Option<u64>,
    /// With a cap: start at this rate, bits/s, and run each round at the
    /// last round's dirty rate plus this much (Clark et al.'s dynamic rate).
    #[serde(default)]
    pub min_bandwidth_bps: Option<u64>,
    /// Give up (and resume here) after this long, s.
    pub timeout_s: u64,
    /// Expected link bandwidth for window sizing, bits/s.
    pub link_bandwidth_bps: Option<u64>,
    /// Expected round-trip time for window sizing, ms.
    pub rtt_ms: Option<u64>,
    /// Keep this host's disk chunks in the chunk store in this directory,
    /// so that a later move back here sends only what changed.
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// Only copy the disks (`wanmig sync`): the VM keeps running here.
    #[serde(default)]
    pub sync: bool,
    /// Keep the guest's address reachable through this host after the
    /// commit (the network tunnel).
    #[serde(default)]
    pub tunnel: Option<TunnelRequest>,
}

/// The network tunnel a migration should leave behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelRequest {
    /// This host's interface on the guest's segment (where it answers ARP
    /// for the guest's address).
    pub interface: String,
    /// How long it lives.
    pub lifetime: TunnelLifetime,
}

/// How long a tunnel lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelLifetime {
    /// Until an operator says the routes converged (`wanmig routes-converged`).
    UntilConverged,
    /// Until the routes converged or this many seconds passed.
    Seconds(u64),
    /// For good (a disaster-recovery move): only a shutdown ends it.
    Forever,
}

/// How a migration ended, as the VM's process reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrateOutcome {
    /// The destination runs the VM; this process stops.
    Migrated,
    /// Failed before commit; the VM runs here as before.
    FailedSourceRunning,
    /// Commit sent, acknowledgement lost: the VM stays paused here.
    InDoubt,
    /// A `sync` completed: the destination holds a verified replica of the
    /// disks; the VM runs here as before.
    Synced,
}

/// Runs migrations for [`serve`]; supplied by the crate that knows how.
pub trait Migrator {
    /// Migrates `vm` as `req` says, reporting progress through `progress`;
    /// returns the outcome and a summary (JSON) for the client.
    fn migrate(
        &mut self,
        vm: &mut Vm,
        req: &MigrateRequest,
        progress: &mut dyn FnMut(serde_json::Value),
    ) -> (MigrateOutcome, serde_json::Value);

    /// The status of the network tunnel a migration left running here
    /// (to or from this host), if there is one.
    fn tunnel_status(&self) -> Option<serde_json::Value> {
        None
    }

    /// Ends that tunnel: the routes converged.
    fn routes_converged(&mut self) -> Result<(), String> {
        Err("no network tunnel runs here".into())
    }

    /// Whether a tunnel still runs here.
    fn tunnel_running(&self) -> bool {
        false
    }

    /// Ends a running tunnel (the process is shutting down).
    fn end_tunnel(&mut self, _why: &str) {}
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// "running" or "paused".
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// The test guest's own status page, when it runs the test guest.
    pub guest: Option<TestGuestProgress>,
}

/// Progress of the test guest (a subset of its status page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestGuestProgress {
    /// 2 = running.
    pub phase: u64,
    /// Working-set steps.
    pub steps: u64,
    /// Disk writes completed.
    pub disk_done: u64,
    /// Mismatches it found.
    pub errors: u64,
    /// Timer ticks (10 ms).
    pub ticks: u64,
    /// Whether the guest drives a NIC.
    #[serde(default)]
    pub net_up: bool,
    /// Frames it received.
    #[serde(default)]
    pub net_rx: u64,
    /// Frames it sent.
    #[serde(default)]
    pub net_tx: u64,
    /// Replies of its UDP sequence service so far.
    #[serde(default)]
    pub udp_seq: u64,
}

impl From<GuestStatus> for TestGuestProgress {
    fn from(s: GuestStatus) -> Self {
        TestGuestProgress {
            phase: s.phase,
            steps: s.steps,
            disk_done: s.disk_done,
            errors: s.errors,
            ticks: s.ticks,
            net_up: s.net_base != 0,
            net_rx: s.net_rx,
            net_tx: s.net_tx,
            udp_seq: s.udp_seq,
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<VmStatus>,
    /// For `snapshot`: timings in ms and bytes of RAM written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save: Option<SaveSummary>,
    /// For `migrate`: how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<MigrateOutcome>,
    /// For `migrate`: the summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
    /// For `status`: the network tunnel a migration left running here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<serde_json::Value>,
}

/// Timings of a snapshot.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct SaveSummary {
    /// Pause time.
    pub pause_ms: f64,
    /// State capture and write.
    pub state_ms: f64,
    /// RAM write.
    pub memory_ms: f64,
    /// Wait for stable storage.
    pub sync_ms: f64,
    /// RAM bytes written.
    pub memory_bytes: u64,
}

impl Response {
    fn ok() -> Self {
        Response { ok: true, error: None, status: None, save: None, outcome: None, summary: None, tunnel: None }
    }
    fn err(e: impl std::fmt::Display) -> Self {
        Response { ok: false, error: Some(e.to_string()), ..Self::ok() }
    }
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Talking to the VM failed.
    #[error("cannot reach the VM at {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM's answer was not understood.
    #[error("bad answer from the VM: {0}")]
    BadResponse(String),
    /// The VM refused the request.
    #[error("{0}")]
    Refused(String),
}

/// How serving ended.
#[derive(Debug)]
pub enum ServeEnd {
    /// A `shutdown` request.
    Shutdown,
    /// The VM was migrated away and runs at the destination.
    MigratedAway,
    /// The guest stopped by itself.
    GuestStopped(GuestStop),
}

/// Serves `vm`'s control socket until a shutdown request or the guest stops.
/// A stale socket file from a dead process is replaced; a live one is not.
pub fn serve(vm: Vm, path: &Path, migrator: &mut dyn Migrator) -> Result<ServeEnd, ControlError> {
    serve_on(vm, bind(path)?, path, migrator)
}

/// Binds the control socket at `path`. A stale socket file from a dead
/// process is replaced; a live one is not. (A migration destination binds
/// before it says Ready, so that it never commits a VM it cannot serve.)
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::Bind {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another VM is serving this socket"),
        });
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind { path: path.into(), source })?;
    listener.set_nonblocking(true).map_err(|source| ControlError::Bind { path: path.into(), source })?;
    Ok(listener)
}

/// Like [`serve`], on a socket already bound at `path` by [`bind`].
pub fn serve_on(
    mut vm: Vm,
    listener: UnixListener,
    path: &Path,
    migrator: &mut dyn Migrator,
) -> Result<ServeEnd, ControlError> {
    let mut server = Server { in_doubt: false };
    let end = loop {
        if let Some(stop) = vm.wait_guest_stop(Duration::from_millis(20)) {
            break ServeEnd::GuestStopped(stop);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Some(end) = server.handle(&mut vm, stream, migrator) {
                    break end;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = std::fs::remove_file(path);
    Ok(end)
}

/// After a migration away, serves the control socket at `path` for the
/// network tunnel the migration left running (`status`, `routesconverged`,
/// `shutdown`) until the tunnel ends; every other request is refused (the
/// VM runs at the destination).
pub fn serve_tunnel(path: &Path, migrator: &mut dyn Migrator) -> Result<(), ControlError> {
    let listener = bind(path)?;
    while migrator.tunnel_running() {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                let mut line = String::new();
                let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
                let req = read.map_err(|e| e.to_string()).and_then(|_| {
                    serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}"))
                });
                let response = match req {
                    Err(e) => Response::err(e),
                    Ok(Request::Status) => Response { tunnel: migrator.tunnel_status(), ..Response::ok() },
                    Ok(Request::RoutesConverged) => {
                        migrator.routes_converged().map_or_else(Response::err, |()| Response::ok())
                    }
                    Ok(Request::Shutdown) => {
                        migrator.end_tunnel("the operator shut the old host's end down");
                        Response::ok()
                    }
                    Ok(_) => Response::err("the VM has migrated away; only its network tunnel runs here"),
                };
                send_line(&stream, &response);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// State of the serving loop across requests.
struct Server {
    /// A migration committed without acknowledgement: the VM must not run
    /// here until an operator settles it.
    in_doubt: bool,
}

fn send_line(stream: &UnixStream, value: &impl Serialize) {
    let mut text = serde_json::to_string(value).expect("control messages serialize");
    text.push('\n');
    let _ = (&*stream).write_all(text.as_bytes());
}

impl Server {
    /// Handles one connection; returns how serving ends, if it does.
    fn handle(&mut self, vm: &mut Vm, stream: UnixStream, migrator: &mut dyn Migrator) -> Option<ServeEnd> {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let mut line = String::new();
        let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
        let req = read
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}")));
        let (response, end) = match req {
            Err(e) => (Response::err(e), None),
            Ok(Request::Migrate { migration }) => self.migrate(vm, &migration, &stream, migrator),
            Ok(Request::RoutesConverged) => {
                (migrator.routes_converged().map_or_else(Response::err, |()| Response::ok()), None)
            }
            Ok(Request::Status) => {
                let (mut r, end) = self.execute(vm, Request::Status);
                r.tunnel = migrator.tunnel_status();
                (r, end)
            }
            Ok(req) => self.execute(vm, req),
        };
        send_line(&stream, &response);
        end
    }

    fn migrate(
        &mut self,
        vm: &mut Vm,
        req: &MigrateRequest,
        stream: &UnixStream,
        migrator: &mut dyn Migrator,
    ) -> (Response, Option<ServeEnd>) {
        if self.in_doubt {
            return (Response::err("an earlier migration is in doubt; the VM stays paused"), None);
        }
        if vm.run_state() != RunState::Running {
            return (Response::err("the VM is paused; resume it before migrating"), None);
        }
        let (outcome, summary) =
            migrator.migrate(vm, req, &mut |p| send_line(stream, &serde_json::json!({ "progress": p })));
        let end = match outcome {
            MigrateOutcome::Migrated => Some(ServeEnd::MigratedAway),
            MigrateOutcome::InDoubt => {
                self.in_doubt = true;
                None
            }
            MigrateOutcome::FailedSourceRunning | MigrateOutcome::Synced => None,
        };
        let ok = matches!(outcome, MigrateOutcome::Migrated | MigrateOutcome::Synced);
        let error =
            (!ok).then(|| summary.get("error").and_then(|e| e.as_str()).unwrap_or("migration failed").to_string());
        (Response { ok, error, outcome: Some(outcome), summary: Some(summary), ..Response::ok() }, end)
    }

    fn execute(&mut self, vm: &mut Vm, req: Request) -> (Response, Option<ServeEnd>) {
        match req {
            Request::Status => {
                let c = vm.config();
                let status = VmStatus {
                    name: c.name.clone(),
                    state: match (vm.run_state(), self.in_doubt) {
                        (_, true) => "in-doubt".into(),
                        (RunState::Running, _) => "running".into(),
                        (RunState::Paused, _) => "paused".into(),
                    },
                    vcpus: c.vcpus,
                    memory_mib: c.memory_mib,
                    guest: vm.test_guest_status().map(Into::into),
                };
                (Response { status: Some(status), ..Response::ok() }, None)
            }
            Request::Pause => (vm.pause().map_or_else(Response::err, |()| Response::ok()), None),
            Request::Resume if self.in_doubt => (
                Response::err("a migration of this VM is in doubt: it may be running at the destination; not resuming"),
                None,
            ),
            Request::Resume => {
                vm.resume();
                (Response::ok(), None)
            }
            Request::Snapshot { dir, resume } => {
                let t = std::time::Instant::now();
                let result = vm.pause().and_then(|()| {
                    let pause_ms = t.elapsed().as_secs_f64() * 1e3;
                    vm.save(&dir).map(|r: SaveReport| SaveSummary {
                        pause_ms,
                        state_ms: r.state_ms,
                        memory_ms: r.memory_ms,
                        sync_ms: r.sync_ms,
                        memory_bytes: r.memory_bytes,
                    })
                });
                if resume && !self.in_doubt {
                    vm.resume();
                }
                match result {
                    Ok(s) => (Response { save: Some(s), ..Response::ok() }, None),
                    Err(e) => (Response::err(error_chain(&e)), None),
                }
            }
            Request::Shutdown => (Response::ok(), Some(ServeEnd::Shutdown)),
            Request::Migrate { .. } | Request::RoutesConverged => {
                (Response::err("handled with the migrator, not here"), None)
            }
        }
    }
}

/// Sends `req` to the VM serving `path` and returns its answer; a refusal
/// becomes [`ControlError::Refused`].
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    request_with_progress(path, req, &mut |_| {})
}

/// Like [`request`], passing each progress line (of a `migrate`) to `progress`.
pub fn request_with_progress(
    path: &Path,
    req: &Request,
    progress: &mut dyn FnMut(serde_json::Value),
) -> Result<Response, ControlError> {
    let connect = |source| ControlError::Connect { path: path.into(), source };
    let mut stream = UnixStream::connect(path).map_err(connect)?;
    // A snapshot of a large VM takes a while; a stuck VM must not hang us forever.
    stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(connect)?;
    let mut text = serde_json::to_string(req).expect("requests serialize");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(connect)?;
    let mut reader = BufReader::new(&stream);
    let resp: Response = loop {
        let mut line = String::new();
        (&mut reader).take(MAX_REQUEST).read_line(&mut line).map_err(connect)?;
        if line.is_empty() {
            return Err(ControlError::BadResponse("the VM closed the connection without answering".into()));
        }
        let v: serde_json::Value =
            serde_json::from_str(line.trim()).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        match v.get("progress") {
            Some(p) => progress(p.clone()),
            None => break serde_json::from_value(v).map_err(|e| ControlError::BadResponse(e.to_string()))?,
        }
    };
    if !resp.ok && resp.outcome.is_none() {
        return Err(ControlError::Refused(resp.error.unwrap_or_else(|| "refused without a reason".into())));
    }
    Ok(resp)
}

pub use wanmig_types::error_chain;
