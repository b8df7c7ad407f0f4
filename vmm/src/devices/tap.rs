//! A TAP interface, the host end of a virtio-net device.
//!
//! [`Tap::open`] attaches to the TAP interface of a given name through
//! `/dev/net/tun`, creating it if it does not exist (which needs
//! `CAP_NET_ADMIN`; attaching to a persistent TAP owned by the caller does
//! not). The file is non-blocking and opened with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, the vnet header set to the 12 bytes of the virtio-net v1
//! header: every `read` returns one frame behind that header and every
//! `write` takes one, exactly the layout of a virtio-net buffer, so frames
//! pass between the TAP and a virtqueue without reformatting. No offloads
//! are enabled (`TUNSETOFFLOAD` stays 0), so the kernel hands over only
//! whole, checksummed frames no longer than the interface's MTU.
//!
//! A TAP holds frames that arrive while nobody reads them in its own queue
//! (up to `txqueuelen`, then it drops): frames that arrive while the VM is
//! paused wait there. They are purged when the last file attached to the
//! TAP closes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Longest interface name, without its terminating NUL (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = 15;
/// Size of the virtio-net v1 header in front of every frame (`struct
/// virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;

// From <linux/if_tun.h>: _IOW('T', 202, int) and _IOW('T', 216, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the
/// flags (a `short`) at the start of the 24-byte union.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a TAP could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long, or has a character interface names cannot have.
    #[error("`{0}` is not a valid interface name (1 to {MAX_NAME_LEN} bytes, no '/', ':' or whitespace)")]
    BadName(String),
    /// `/dev/net/tun` is missing: no tun driver.
    #[error("cannot open /dev/net/tun: the tun driver is not available")]
    NoTunDevice(#[source] std::io::Error),
    /// `/dev/net/tun` or the interface may not be used by this process.
    #[error(
        "no permission to attach TAP `{name}` (creating one needs CAP_NET_ADMIN; an existing one must be \
         persistent and owned by this user)"
    )]
    Permission {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An interface of that name exists and is not a TAP.
    #[error("interface `{name}` exists and is not a TAP")]
    NotTap {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or VM) is attached to the TAP.
    #[error("TAP `{name}` is in use by another process")]
    Busy {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another step of the setup failed.
    #[error("cannot set up TAP `{name}`: {what}")]
    Setup {
        /// The interface.
        name: String,
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// An attached TAP interface: one frame, behind its virtio-net header, per
/// `read` or `write`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can name a network interface (the kernel's
/// `dev_valid_name`, restricted to printable ASCII).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl Tap {
    /// Attaches to (or creates) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !is_valid_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::PermissionDenied => TapError::Permission { name: name.into(), source },
                _ => TapError::NoTunDevice(source),
            })?;
        let mut req =
            IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes on
        // Linux), which `IfReq` is, field for field; `req` outlives the call
        // and the fd is ours.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let source = std::io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::Permission { name, source },
                Some(libc::EBUSY) => TapError::Busy { name, source },
                Some(libc::EINVAL) => TapError::NotTap { name, source },
                _ => TapError::Setup { name, what: "TUNSETIFF", source },
            });
        }
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which
        // points at `size`, alive for the call.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            let source = std::io::Error::last_os_error();
            return Err(TapError::Setup { name: name.into(), what: "set the vnet header size", source });
        }
        Ok(Tap { file, name: name.into() })
    }

    /// A TAP-like backend on any descriptor that carries one frame with its
    /// 12-byte header per `read` and `write` (a `SOCK_DGRAM` socketpair in
    /// tests, or a TAP opened by a parent process). It is made
    /// non-blocking.
    pub fn from_fd(fd: OwnedFd, name: &str) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
        let ok = unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            flags >= 0 && libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
        };
        if !ok {
            let source = std::io::Error::last_os_error();
            return Err(TapError::Setup { name: name.into(), what: "make it non-blocking", source });
        }
        Ok(Tap { file: File::from(fd), name: name.into() })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none
    /// is queued. A frame longer than `buf` is truncated.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Sends one frame (header included).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n == frame.len() {
            Ok(())
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::WriteZero, format!("{n} of {} bytes sent", frame.len())))
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded() {
        for bad in ["", "a/b", "a b", "x:1", ".", "..", "sixteen-chars-xx", "tab\t", "é"] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
        for good in ["tap0", "wm-tap.1", "fifteen-chars-x"] {
            assert!(is_valid_name(good), "{good:?}");
        }
        let e = Tap::open("a/b").expect_err("refused before any syscall").to_string();
        assert!(e.contains("a/b"), "{e}");
    }

    #[test]
    fn an_interface_that_is_not_a_tap_is_named() {
        // `lo` exists in every network namespace and is not a TAP: refused
        // with EINVAL (or EPERM without CAP_NET_ADMIN; both name it).
        match Tap::open("lo") {
            Err(e @ (TapError::NotTap { .. } | TapError::Permission { .. })) => assert!(e.to_string().contains("`lo`")),
            Err(TapError::NoTunDevice(_)) => eprintln!("no /dev/net/tun on this machine: only the name check ran"),
            other => panic!("lo attached as a TAP: {other:?}"),
        }
    }

    #[test]
    fn a_socketpair_carries_frames() {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        let tap = Tap::from_fd(OwnedFd::from(a), "pair").expect("wrap");
        let mut buf = [0u8; 64];
        assert_eq!(tap.recv(&mut buf).expect_err("empty").kind(), std::io::ErrorKind::WouldBlock);
        b.send(&[7u8; 30]).expect("send");
        assert_eq!(tap.recv(&mut buf).expect("frame"), 30);
        tap.send(&[9u8; 20]).expect("send");
        assert_eq!(b.recv(&mut buf).expect("frame"), 20);
        assert_eq!(tap.name(), "pair");
    }
}
