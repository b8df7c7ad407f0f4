//! File operations that follow no link someone else could plant.
//!
//! A VMM opens files in directories other parties can write: disk images on
//! storage a migration source shares, snapshot directories named by a
//! control-socket client, a receive directory shared by two processes.
//! Checking a path and then opening it by name lets a link swapped in
//! between redirect the open. These helpers open once, relative to a
//! directory descriptor, refuse links, and never replace what is there:
//!
//! - [`open_beneath`]: `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//!   (no `..` out of the directory, no absolute path, no symbolic link in
//!   any component).
//! - [`open_dir_nofollow`], [`create_new_at`]: `O_NOFOLLOW`, `O_EXCL`.
//! - [`rename_at`]: `renameat2` with `RENAME_NOREPLACE` or `RENAME_EXCHANGE`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn fd_result(fd: libc::c_long) -> io::Result<File> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd as libc::c_int) })
}

/// Opens directory `path`, refusing it if its last component is a symbolic
/// link.
pub fn open_dir_nofollow(path: &Path) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
    fd_result(fd.into())
}

/// Opens `rel` beneath directory `dir` for reading (and writing when
/// `write`), with no symbolic link anywhere on the way and no way out of
/// `dir` (`..` past it, or an absolute path, fails with `EXDEV`; a link with
/// `ELOOP`). Fails with `ENOSYS` on kernels before 5.6.
pub fn open_beneath(dir: &File, rel: &Path, write: bool) -> io::Result<File> {
    let c = cstr(rel)?;
    let flags = if write { libc::O_RDWR } else { libc::O_RDONLY } | libc::O_CLOEXEC | libc::O_NOFOLLOW;
    // SAFETY: a zeroed open_how is valid (no flags); the fields are set below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `how` (of the size given) and the NUL-terminated
    // path, both alive across the call; `dir` is an open descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &raw const how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    fd_result(fd)
}

/// Creates `name` in directory `dir`, which must not exist (`O_EXCL`: not
/// even as a dangling link), write-only with mode `mode` and `extra` flags
/// (e.g. `O_DIRECT`).
pub fn create_new_at(dir: &File, name: &str, mode: u32, extra: libc::c_int) -> io::Result<File> {
    let c = cstr(Path::new(name))?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra;
    // SAFETY: `c` is NUL-terminated and outlives the call; `dir` is open.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, mode as libc::c_uint) };
    fd_result(fd.into())
}

/// Whether `name` exists in `dir` (as anything, a link included).
pub fn exists_at(dir: &File, name: &str) -> io::Result<bool> {
    let c = cstr(Path::new(name))?;
    // SAFETY: a zeroed stat is a valid out-buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` and `st` outlive the call; `dir` is open.
    let r = unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    if r == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        e => Err(e),
    }
}

/// How [`rename_at`] treats the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rename {
    /// Fail with `EEXIST` if the target exists.
    NoReplace,
    /// Swap the two names atomically; both must exist.
    Exchange,
}

/// `renameat2`: `from` in `from_dir` to `to` in `to_dir` (`None`: relative
/// to the working directory, or absolute paths).
pub fn rename_at(
    from_dir: Option<&File>,
    from: &Path,
    to_dir: Option<&File>,
    to: &Path,
    how: Rename,
) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    let flags = match how {
        Rename::NoReplace => libc::RENAME_NOREPLACE,
        Rename::Exchange => libc::RENAME_EXCHANGE,
    };
    let fd = |d: Option<&File>| d.map_or(libc::AT_FDCWD, AsRawFd::as_raw_fd);
    // SAFETY: both paths are NUL-terminated and outlive the call; the
    // descriptors are open (or AT_FDCWD).
    let r = unsafe { libc::renameat2(fd(from_dir), f.as_ptr(), fd(to_dir), t.as_ptr(), flags) };
    match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn links_and_escapes_are_refused_beneath_a_directory() {
        let root = tempfile::tempdir().expect("tmp");
        let shared = root.path().join("shared");
        std::fs::create_dir_all(shared.join("sub")).expect("mkdir");
        std::fs::write(shared.join("sub/disk.img"), b"image").expect("write");
        std::fs::write(root.path().join("secret"), b"secret").expect("write");
        symlink(root.path().join("secret"), shared.join("link.img")).expect("link");
        symlink(shared.join("sub"), shared.join("linkdir")).expect("link");
        let dir = open_dir_nofollow(&shared).expect("open dir");
        let mut s = String::new();
        open_beneath(&dir, Path::new("sub/disk.img"), false).expect("plain file").read_to_string(&mut s).expect("read");
        assert_eq!(s, "image");
        for bad in ["link.img", "linkdir/disk.img", "../secret", "sub/../../secret"] {
            let e = open_beneath(&dir, Path::new(bad), false).expect_err(bad);
            assert!(matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV)), "{bad}: {e}");
        }
        let abs = root.path().join("secret");
        assert!(open_beneath(&dir, &abs, false).is_err(), "absolute paths leave the directory");
        assert!(open_dir_nofollow(&shared.join("linkdir")).is_err(), "a linked directory");
    }

    #[test]
    fn creation_is_exclusive_and_renames_never_replace() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = open_dir_nofollow(root.path()).expect("dir");
        create_new_at(&dir, "a", 0o600, 0).expect("new").write_all(b"a").expect("write");
        assert!(create_new_at(&dir, "a", 0o600, 0).is_err(), "exists");
        symlink(root.path().join("nowhere"), root.path().join("dangling")).expect("link");
        assert!(create_new_at(&dir, "dangling", 0o600, 0).is_err(), "a dangling link is not followed");
        assert!(!root.path().join("nowhere").exists());
        assert!(exists_at(&dir, "dangling").expect("stat") && !exists_at(&dir, "b").expect("stat"));
        std::fs::write(root.path().join("b"), b"b").expect("write");
        let e = rename_at(Some(&dir), Path::new("a"), Some(&dir), Path::new("b"), Rename::NoReplace);
        assert_eq!(e.expect_err("b exists").raw_os_error(), Some(libc::EEXIST));
        rename_at(Some(&dir), Path::new("a"), Some(&dir), Path::new("b"), Rename::Exchange).expect("swap");
        assert_eq!(std::fs::read(root.path().join("b")).expect("read"), b"a");
        assert_eq!(std::fs::read(root.path().join("a")).expect("read"), b"b");
    }
}
