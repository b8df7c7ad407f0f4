//! One owner per disk image: the process that runs a VM holds an open-file-
//! description lock (`F_OFD_SETLK`) on each of its images, exclusive for a
//! writable disk and shared for a read-only one, so that a second `wanmig
//! run`, `restore`, a `receive --shared-disks` or a sync target cannot open
//! an image a running VM writes. The kernel drops the lock when the process
//! dies, so a crash never leaves a stale lock behind.
//!
//! OFD locks do not record their owner (`/proc/locks` shows pid -1); a
//! refusal names the holder by looking for the processes that have the
//! image open (`/proc/PID/fd`), which is what an operator needs to know.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("disk image {path} is in use by {holder}")]
    Held {
        /// The image.
        path: PathBuf,
        /// Who has it open, as far as this host can tell.
        holder: String,
    },
    /// The image could not be opened or locked.
    #[error("cannot lock disk image {path}")]
    Io {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A held lock on one image; released when dropped.
#[derive(Debug)]
pub struct DiskLock {
    file: File,
    path: PathBuf,
}

impl DiskLock {
    /// Locks `path`: exclusively when `write`, shared otherwise. Fails at
    /// once (never waits) when another process holds a conflicting lock.
    pub fn acquire(path: &Path, write: bool) -> Result<DiskLock, LockError> {
        let io_err = |source| LockError::Io { path: path.into(), source };
        let file = OpenOptions::new().read(true).write(write).open(path).map_err(io_err)?;
        Self::on_file(file, path, write)
    }

    /// Locks the image open as `file` (named `path` in messages), as
    /// [`DiskLock::acquire`] does: for a file opened once and checked, whose
    /// path may since name something else. `file` must be open for writing
    /// when `write`. The lock belongs to `file`'s open file description, so
    /// a duplicate of a descriptor the VM uses holds it for that very image.
    pub fn on_file(file: File, path: &Path, write: bool) -> Result<DiskLock, LockError> {
        let io_err = |source| LockError::Io { path: path.into(), source };
        // SAFETY: a zeroed flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = if write { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // l_start = 0, l_len = 0: the whole file; l_pid must be 0 for OFD locks.
        // SAFETY: `fl` is a valid flock that outlives the call; the fd is open.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => LockError::Held { path: path.into(), holder: holders(path) },
                _ => io_err(e),
            });
        }
        Ok(DiskLock { file, path: path.into() })
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the lock on the image after it was renamed to `path`.
    pub fn renamed(&mut self, path: &Path) {
        self.path = path.into();
        let _ = &self.file;
    }
}

/// The processes (other than this one) that have `path` open, as
/// "pid 123 (wanmig run vm.toml)"; "another process" when none can be seen.
fn holders(path: &Path) -> String {
    let Ok(meta) = std::fs::metadata(path) else { return "another process".into() };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let fds = std::fs::read_dir(entry.path().join("fd")).into_iter().flatten().flatten();
        let open = fds.filter_map(|fd| std::fs::metadata(fd.path()).ok()).any(|m| m.dev() == dev && m.ino() == ino);
        if open {
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd: Vec<String> = cmd
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            found.push(format!("pid {pid} ({})", cmd.join(" ")));
        }
    }
    match found.is_empty() {
        true => "another process".into(),
        false => found.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_or_a_reader_beside_a_writer_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("d.img");
        std::fs::write(&img, [0u8; 4096]).expect("image");
        let first = DiskLock::acquire(&img, true).expect("free");
        // A lock on another open file description conflicts even in this process.
        assert!(matches!(DiskLock::acquire(&img, true), Err(LockError::Held { .. })));
        assert!(matches!(DiskLock::acquire(&img, false), Err(LockError::Held { .. })));
        drop(first);
        let r1 = DiskLock::acquire(&img, false).expect("a reader");
        let _r2 = DiskLock::acquire(&img, false).expect("readers share");
        assert!(matches!(DiskLock::acquire(&img, true), Err(LockError::Held { .. })));
        drop(r1);
        assert!(matches!(DiskLock::acquire(&dir.path().join("none.img"), true), Err(LockError::Io { .. })));
    }
}
