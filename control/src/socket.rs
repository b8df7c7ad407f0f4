//! The control socket itself: created owner-only (0600) and never replacing
//! a live one, every peer checked (`SO_PEERCRED`: root or this process's own
//! user), one bounded request line in, JSON lines out.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::protocol::{ProgressLine, Request, Response};

/// Longest request line.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// How long a client may take to send its request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket could not be created.
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

/// Creates the control socket at `path`, readable and writable by its
/// owner only. A stale socket file from a dead process is replaced; a live
/// one is not. (Bound under a temporary name, restricted, then renamed into
/// place, so it is never reachable with looser permissions.)
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let err = |source| ControlError::Bind { path: path.into(), source };
    if UnixStream::connect(path).is_ok() {
        return Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another VM is serving this socket")));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| listener.set_nonblocking(true));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(listener)
}

/// A control socket bound for a VM that may never run here (a destination
/// binds before `Ready`): its file goes when this is dropped, unless it was
/// taken to be served.
#[derive(Debug)]
pub struct Bound {
    listener: Option<UnixListener>,
    path: PathBuf,
}

impl Bound {
    /// Binds at `path`, as [`bind`] does.
    pub fn new(path: &Path) -> Result<Self, ControlError> {
        Ok(Bound { listener: Some(bind(path)?), path: path.into() })
    }

    /// The listener, to serve: the file stays.
    pub fn take(mut self) -> UnixListener {
        self.listener.take().expect("a Bound holds its listener until taken")
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Whether the peer of `stream` may steer this VM: root, or this process's
/// own user.
pub fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let mut cred = libc::ucred { pid: 0, uid: u32::MAX, gid: u32::MAX };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of the length given; both outlive the call.
    let r = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if r != 0 {
        return Err(format!("cannot tell who is connecting: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match cred.uid == 0 || cred.uid == me {
        true => Ok(()),
        false => Err(format!("uid {} may not control this VM (only root and uid {me})", cred.uid)),
    }
}

/// Reads one request from a client that just connected.
pub fn read_request(stream: &UnixStream) -> Result<Request, String> {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    peer_allowed(stream)?;
    let mut line = String::new();
    BufReader::new(stream.take(MAX_REQUEST)).read_line(&mut line).map_err(|e| e.to_string())?;
    serde_json::from_str::<Request>(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Writes one JSON line (best effort: a client that went away misses it).
pub fn send_line(stream: &UnixStream, value: &impl Serialize) {
    let mut text = serde_json::to_string(value).expect("control messages serialize");
    text.push('\n');
    let _ = (&*stream).write_all(text.as_bytes());
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
    progress: &mut dyn FnMut(wanmig_migrate::report::Progress),
) -> Result<Response, ControlError> {
    let connect = |source| ControlError::Connect { path: path.into(), source };
    let mut stream = UnixStream::connect(path).map_err(connect)?;
    // A snapshot of a large VM takes a while; a stuck VM must not hang us
    // forever. A migration streams progress at least every round.
    stream.set_read_timeout(Some(Duration::from_secs(600))).map_err(connect)?;
    let mut text = serde_json::to_string(req).expect("requests serialize");
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(connect)?;
    let mut reader = BufReader::new(&stream);
    let resp: Response = loop {
        let mut line = String::new();
        (&mut reader).take(16 << 20).read_line(&mut line).map_err(connect)?;
        if line.is_empty() {
            return Err(ControlError::BadResponse("the VM closed the connection without answering".into()));
        }
        if line.starts_with("{\"progress\"") {
            let p: ProgressLine =
                serde_json::from_str(line.trim()).map_err(|e| ControlError::BadResponse(e.to_string()))?;
            progress(p.progress);
            continue;
        }
        break serde_json::from_str(line.trim()).map_err(|e| ControlError::BadResponse(e.to_string()))?;
    };
    if !resp.ok && resp.outcome.is_none() {
        return Err(ControlError::Refused(resp.error.unwrap_or_else(|| "refused without a reason".into())));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_is_owner_only_and_a_live_one_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("vm.sock");
        let listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("socket").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(bind(&path).is_err(), "a live socket is kept");
        drop(listener);
        let _again = bind(&path).expect("a stale socket file is replaced");
        let (a, _b) = UnixStream::pair().expect("pair");
        peer_allowed(&a).expect("this user may");
    }

    /// What a process of uid 65534 ("nobody") got when it tried `path`:
    /// the child forks off this process, drops to that uid, connects and
    /// writes a request, and reports in its exit status (0 connected, 1
    /// connect refused, 2 could not drop privileges).
    fn connect_as_nobody(path: &Path) -> i32 {
        use std::os::unix::ffi::OsStrExt;
        let cpath = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: a zeroed sockaddr_un is valid; the path fits (asserted).
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = cpath.as_bytes_with_nul();
        assert!(bytes.len() <= addr.sun_path.len(), "socket path too long for the test");
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let line = b"{\"status\":null}\n";
        // SAFETY: the child calls only async-signal-safe functions (setgid,
        // setuid, socket, connect, write, _exit) on memory prepared before
        // the fork, and never returns into the test harness.
        unsafe {
            match libc::fork() {
                0 => {
                    if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                        libc::_exit(2);
                    }
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
                    if libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                        libc::_exit(1);
                    }
                    libc::write(fd, line.as_ptr().cast(), line.len());
                    libc::_exit(0);
                }
                pid => {
                    assert!(pid > 0, "fork failed");
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0);
                    libc::WEXITSTATUS(status)
                }
            }
        }
    }

    #[test]
    fn another_user_can_neither_reach_the_socket_nor_be_served() {
        // SAFETY: geteuid cannot fail.
        assert_eq!(unsafe { libc::geteuid() }, 0, "this test drops to uid 65534: run it as root, as the suite is");
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let path = dir.path().join("vm.sock");
        let listener = bind(&path).expect("bind");
        listener.set_nonblocking(false).expect("blocking");
        // The file's mode alone keeps the other user out.
        assert_eq!(connect_as_nobody(&path), 1, "uid 65534 connected to a 0600 socket");
        // Were the mode loosened, the credential check still refuses it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
        assert_eq!(connect_as_nobody(&path), 0, "uid 65534 could not connect to a 0666 socket");
        let (stream, _) = listener.accept().expect("accept");
        let e = read_request(&stream).expect_err("another user's request is refused");
        assert!(e.contains("uid 65534 may not control this VM"), "{e}");
    }
}
