//! The migration orchestrator: the source and destination drivers that
//! compose the VMM, memory and disk pre-copy, the wire protocol and the
//! transport. Nothing here serves a socket or parses a command line: the
//! control layer (`wanmig-control`) and the CLI sit above.
//!
//! - [`source`]: [`source::send`] migrates a VM it is given (any
//!   [`source::SourceVm`]), steered through a [`steer::Steering`].
//! - [`destination`]: [`destination::receive`] takes one VM and has a
//!   [`destination::VmHost`] build and run it.
//! - [`journal`]: both ends' durable record of each migration's phase;
//!   [`settle`]: asking the destination what became of one.
//! - [`epochs`]: after a sync, the destination's replica becomes an epoch
//!   (`wanmig-dr`), pruned by the store's retention rules.
//! - [`handover`]: after the commit, the network tunnel's two ends on the
//!   migration's own connection (`wanmig-tunnel`).
//! - [`report`]: live progress and the final summary; [`steer`]: status,
//!   cancel and tunables while a migration runs.
//!
//! The protocol and its commit rule are documented in `wanmig_wire::session`,
//! whose machines both drivers follow.

#![warn(clippy::too_many_lines)]

pub mod destination;
pub mod epochs;
pub mod handover;
pub mod journal;
pub mod report;
pub mod settle;
pub mod source;
pub mod steer;

use std::time::Duration;

/// Test hook: a process started with `WANMIG_FAILPOINT=<name>` is killed
/// (SIGKILL, as a crashed host would be) at the point of that name, after
/// `delay`. The fault tests use it to cut a migration at a precise
/// protocol step.
pub fn failpoint(name: &str, delay: Duration) {
    if std::env::var("WANMIG_FAILPOINT").is_ok_and(|v| v == name) {
        std::thread::sleep(delay);
        eprintln!("wanmig: failpoint {name}: killing this process");
        // SAFETY: sends a signal to this process; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Resolves `host:port` to one address.
pub fn resolve(dest: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs;
    dest.to_socket_addrs()
        .map_err(|e| format!("destination `{dest}`: {e}"))?
        .next()
        .ok_or_else(|| format!("destination `{dest}` resolves to no address"))
}
