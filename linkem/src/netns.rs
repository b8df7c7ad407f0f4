//! Network namespaces for tests: created with `ip netns add`, deleted on
//! drop (a panic unwinding through the owner included), and threads and
//! tokio runtimes that live inside one.
//!
//! A thread's network namespace decides where the sockets it opens live;
//! threads inherit it from the thread that starts them. [`Netns::spawn`]
//! and [`Netns::run`] start a thread that enters the namespace first;
//! [`Netns::runtime`] builds a tokio runtime every thread of which enters it.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Errors of namespace handling.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The name cannot be a namespace's.
    #[error("`{0}` is not a usable namespace name (1 to 64 of [A-Za-z0-9_-])")]
    BadName(String),
    /// A command could not be started.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it said.
        stderr: String,
    },
    /// Entering the namespace failed.
    #[error("cannot enter network namespace `{ns}`")]
    Enter {
        /// The namespace.
        ns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    /// A thread inside the namespace panicked.
    #[error("a thread inside namespace `{0}` panicked")]
    Panicked(String),
    /// The tokio runtime could not be built.
    #[error("cannot build a tokio runtime in namespace `{ns}`")]
    Runtime {
        /// The namespace.
        ns: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn check_name(ns: &str) -> Result<(), NetnsError> {
    let ok =
        !ns.is_empty() && ns.len() <= 64 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(NetnsError::BadName(ns.to_string())) }
}

/// Opens the file of namespace `ns` (as `ip netns add` creates it).
fn open_ns(ns: &str) -> Result<File, NetnsError> {
    check_name(ns)?;
    File::open(format!("/run/netns/{ns}")).map_err(|source| NetnsError::Enter { ns: ns.to_string(), source })
}

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: `f` is an open namespace file for the duration of the call;
    // setns changes only the calling thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the calling thread enter network namespace `ns` (as created by
/// `ip netns add`), for good.
pub fn enter_netns(ns: &str) -> Result<(), NetnsError> {
    let f = open_ns(ns)?;
    setns(&f).map_err(|source| NetnsError::Enter { ns: ns.to_string(), source })
}

/// Runs `f` on a new thread inside network namespace `ns` and returns what
/// it returns: sockets it opens belong to that namespace, and threads it
/// starts begin there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
    let name = ns.to_string();
    std::thread::Builder::new()
        .name(format!("in-{ns}"))
        .spawn(move || {
            enter_netns(&name)?;
            Ok(f())
        })
        .map_err(NetnsError::Thread)?
        .join()
        .map_err(|_| NetnsError::Panicked(ns.to_string()))?
}

/// Runs a command, failing with what it printed.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<(), NetnsError> {
    let cmd = || format!("{program} {}", args.join(" "));
    let out = Command::new(program).args(args).output().map_err(|source| NetnsError::Spawn { cmd: cmd(), source })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            cmd: cmd(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A network namespace this process created; deleted (with every
/// interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up. A leftover of the
    /// same name (from a killed run) is deleted first.
    pub fn new(name: &str) -> Result<Netns, NetnsError> {
        check_name(name)?;
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_cmd("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS` (`args` split at whitespace).
    pub fn ip(&self, args: &str) -> Result<(), NetnsError> {
        let mut argv = vec!["-n", &self.name];
        argv.extend(args.split_whitespace());
        run_cmd("ip", &argv)
    }

    /// Sets sysctl `key` (a per-namespace one) to `value` inside it.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetnsError> {
        run_cmd("ip", &["netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")])
    }

    /// Starts a thread inside the namespace; it returns `f`'s result, or
    /// why it could not enter.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<JoinHandle<Result<T, NetnsError>>, NetnsError> {
        let file = open_ns(&self.name)?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                setns(&file).map_err(|source| NetnsError::Enter { ns: name, source })?;
                Ok(f())
            })
            .map_err(NetnsError::Thread)
    }

    /// Runs `f` on a thread inside the namespace and waits for it.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        in_netns(&self.name, f)
    }

    /// A multi-threaded tokio runtime with `workers` worker threads, every
    /// thread of which (workers and blocking pool) lives in the namespace.
    pub fn runtime(&self, workers: usize) -> Result<NsRuntime, NetnsError> {
        let file = Arc::new(open_ns(&self.name)?);
        let name = self.name.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name(format!("rt-{name}"))
            .on_thread_start(move || {
                // The namespace file stays open in this closure, so the
                // namespace exists even if it was deleted meanwhile.
                setns(&file).expect("entering an open namespace file cannot fail for root");
            })
            .enable_all()
            .build()
            .map_err(|source| NetnsError::Runtime { ns: self.name.clone(), source })?;
        Ok(NsRuntime { rt: Some(rt) })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A tokio runtime whose threads live in one namespace
/// ([`Netns::runtime`]). Futures run on its threads, never on the caller's
/// (which may be elsewhere): use [`NsRuntime::run`] and
/// [`NsRuntime::spawn`], not `block_on` of a future that opens sockets.
#[derive(Debug)]
pub struct NsRuntime {
    rt: Option<tokio::runtime::Runtime>,
}

impl NsRuntime {
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime is only taken in drop")
    }

    /// Runs `f` on the runtime's threads and waits for its output; a panic
    /// in `f` is resumed here.
    pub fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        match self.rt().block_on(self.rt().spawn(f)) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the task was cancelled: {e}"),
        }
    }

    /// Spawns `f` on the runtime.
    pub fn spawn<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> tokio::task::JoinHandle<T> {
        self.rt().spawn(f)
    }

    /// Waits for `f` on the calling thread (for join handles and channels;
    /// sockets opened here would live in the caller's namespace).
    pub fn block_on<T>(&self, f: impl Future<Output = T>) -> T {
        self.rt().block_on(f)
    }

    /// The runtime's handle.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.rt().handle()
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
