//! Ctrl-C and SIGTERM during `wanmig send`: they cancel the migration
//! through the VM's control socket (before the commit), or say it is too
//! late (after it), and `send` goes on waiting for the outcome either way.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once SIGINT or SIGTERM arrived (after [`cancel_on_interrupt`]):
/// a command that waits between attempts stops waiting.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

use wanmig_control::{self as control, ControlError, Request};

/// From now on SIGINT and SIGTERM cancel the migration of the VM served at
/// `socket`. Call before any other thread starts (they inherit the mask).
pub fn cancel_on_interrupt(socket: PathBuf) {
    // SAFETY: a zeroed sigset_t is a valid argument to sigemptyset, which
    // initialises it; the set outlives every call that reads it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals in `set`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            INTERRUPTED.store(true, Ordering::Release);
            let name = if sig == libc::SIGINT { "interrupted" } else { "terminated" };
            match control::request(&socket, &Request::Cancel) {
                Ok(_) => eprintln!("\nwanmig: {name}: cancelling the migration; the VM runs on here"),
                Err(ControlError::Refused(why)) => eprintln!("\nwanmig: {name}: {why}"),
                Err(e) => eprintln!("\nwanmig: {name}: cannot cancel: {e}"),
            }
        }
    });
}
