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
}

impl From<GuestStatus> for TestGuestProgress {
    fn from(s: GuestStatus) -> Self {
        TestGuestProgress { phase: s.phase, steps: s.steps, disk_done: s.disk_done, errors: s.errors, ticks: s.ticks }
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
        Response { ok: true, error: None, status: None, save: None }
    }
    fn err(e: impl std::fmt::Display) -> Self {
        Response { ok: false, error: Some(e.to_string()), status: None, save: None }
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
    /// The guest stopped by itself.
    GuestStopped(GuestStop),
}

/// Serves `vm`'s control socket until a shutdown request or the guest stops.
/// A stale socket file from a dead process is replaced; a live one is not.
pub fn serve(mut vm: Vm, path: &Path) -> Result<ServeEnd, ControlError> {
    if UnixStream::connect(path).is_ok() {
        return Err(ControlError::Bind {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another VM is serving this socket"),
        });
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Bind { path: path.into(), source })?;
    listener.set_nonblocking(true).map_err(|source| ControlError::Bind { path: path.into(), source })?;
    let end = loop {
        if let Some(stop) = vm.wait_guest_stop(Duration::from_millis(20)) {
            break ServeEnd::GuestStopped(stop);
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if handle(&mut vm, stream) {
                    break ServeEnd::Shutdown;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let _ = std::fs::remove_file(path);
    Ok(end)
}

/// Handles one connection; returns whether the VM should shut down.
fn handle(vm: &mut Vm, stream: UnixStream) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut line = String::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
    let (response, shutdown) = match read
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}")))
    {
        Err(e) => (Response::err(e), false),
        Ok(req) => execute(vm, req),
    };
    let mut text = serde_json::to_string(&response).expect("responses serialize");
    text.push('\n');
    let _ = (&stream).write_all(text.as_bytes());
    shutdown
}

fn execute(vm: &mut Vm, req: Request) -> (Response, bool) {
    match req {
        Request::Status => {
            let c = vm.config();
            let status = VmStatus {
                name: c.name.clone(),
                state: match vm.run_state() {
                    RunState::Running => "running".into(),
                    RunState::Paused => "paused".into(),
                },
                vcpus: c.vcpus,
                memory_mib: c.memory_mib,
                guest: vm.test_guest_status().map(Into::into),
            };
            (Response { status: Some(status), ..Response::ok() }, false)
        }
        Request::Pause => (vm.pause().map_or_else(Response::err, |()| Response::ok()), false),
        Request::Resume => {
            vm.resume();
            (Response::ok(), false)
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
            if resume {
                vm.resume();
            }
            match result {
                Ok(s) => (Response { save: Some(s), ..Response::ok() }, false),
                Err(e) => (Response::err(error_chain(&e)), false),
            }
        }
        Request::Shutdown => (Response::ok(), true),
    }
}

/// Sends `req` to the VM serving `path` and returns its answer; a refusal
/// becomes [`ControlError::Refused`].
pub fn request(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let connect = |source| ControlError::Connect { path: path.into(), source };
    let mut stream = UnixStream::connect(path).map_err(connect)?;
    // A snapshot of a large VM takes a while; a stuck VM must not hang us forever.
    stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(connect)?;
    let mut text = serde_json::to_string(req).expect("requests serialize");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(connect)?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line).map_err(connect)?;
    let resp: Response = serde_json::from_str(line.trim()).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    if !resp.ok {
        return Err(ControlError::Refused(resp.error.unwrap_or_else(|| "refused without a reason".into())));
    }
    Ok(resp)
}

/// An error and its causes, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
