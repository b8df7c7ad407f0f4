//! `wanmig`: the command line. Thin: parses arguments, loads `vm.toml`, and
//! calls into the library crates; `demo` chains the other commands.

mod demo;
mod dr;
mod keep;
mod migration;
mod settle;
mod signals;
mod store;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use wanmig_control::{self as control, Request, ServeEnd};
use wanmig_vmm::vcpu::GuestStop;
use wanmig_vmm::{Vm, VmConfig};

#[derive(Parser)]
#[command(name = "wanmig", version, about = "Live-migrate KVM virtual machines across data centres")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the VM described by vm.toml and serve its control socket.
    Run {
        /// The VM's configuration.
        config: PathBuf,
        /// Boot even though its journal says it migrated away or is in doubt
        /// (it may run elsewhere: two copies of one VM corrupt its data).
        #[arg(long)]
        force: bool,
    },
    /// Start a VM from a snapshot directory and serve its control socket.
    Restore {
        /// The VM's configuration (host resources: disks, console, socket).
        config: PathBuf,
        /// Snapshot directory written by `wanmig snapshot`.
        #[arg(long)]
        from: PathBuf,
        /// Leave the VM paused (resume it with `wanmig resume`).
        #[arg(long)]
        paused: bool,
        /// Restore even though its journal says it migrated away or is in doubt.
        #[arg(long)]
        force: bool,
    },
    /// Pause a running VM and save it to a directory (it stays paused).
    Snapshot {
        /// The VM's configuration (names its control socket).
        config: PathBuf,
        /// Directory to write (created if missing).
        dir: PathBuf,
        /// Resume the VM after saving.
        #[arg(long)]
        resume: bool,
    },
    /// Pause a running VM.
    Pause {
        /// The VM's configuration.
        config: PathBuf,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM's configuration.
        config: PathBuf,
    },
    /// The routes to a migrated guest's address have converged: end the
    /// network tunnel its migration left (at the old or the new host).
    RoutesConverged {
        /// The VM's configuration (names its control socket).
        config: PathBuf,
    },
    /// Print a VM's state (and its network tunnel's, if a migration left
    /// one at this host) as JSON.
    Status {
        /// The VM's configuration.
        config: PathBuf,
    },
    /// Stop a VM and its `wanmig run` process.
    Shutdown {
        /// The VM's configuration.
        config: PathBuf,
        /// Even while a migration of it is in doubt (it stays in doubt).
        #[arg(long)]
        force: bool,
    },
    /// Cancel the VM's running migration (before its commit): the VM runs
    /// on here, the destination discards what it received.
    Cancel {
        /// The VM's configuration.
        config: PathBuf,
    },
    /// Change the running migration's downtime budget or bandwidth cap,
    /// from its next round on.
    Set {
        /// The VM's configuration.
        config: PathBuf,
        /// New downtime budget (e.g. 50ms).
        #[arg(long, value_parser = migration::parse_duration)]
        downtime: Option<std::time::Duration>,
        /// New bandwidth cap (e.g. 200Mbit).
        #[arg(long, value_parser = migration::parse_bandwidth, conflicts_with = "no_bandwidth_cap")]
        max_bandwidth: Option<u64>,
        /// Lift the bandwidth cap.
        #[arg(long)]
        no_bandwidth_cap: bool,
    },
    /// Settle a migration left in doubt (commit sent, no acknowledgement):
    /// ask its destination whether it committed, then retire the VM here
    /// (it runs there) or take it back. Works whether or not a process
    /// still serves the VM here.
    Settle {
        /// The VM's configuration.
        config: PathBuf,
        /// Take the VM back even if the destination has no record of the
        /// migration (never when it says it committed).
        #[arg(long)]
        force_resume: bool,
    },
    /// Check a snapshot of the built-in test guest with its oracle.
    Verify {
        /// Snapshot directory.
        dir: PathBuf,
        /// The disk image the guest writes to, as it was at the snapshot.
        #[arg(long)]
        disk: Option<PathBuf>,
    },
    /// Write the built-in test guest (a multiboot kernel) to a file.
    Testguest {
        /// Output file.
        #[arg(long)]
        write: PathBuf,
    },
    /// Create this host's identity (key + self-signed certificate) and print
    /// its fingerprint.
    Keygen {
        /// Directory for cert.pem and key.pem.
        #[arg(long)]
        dir: PathBuf,
        /// Name in the certificate.
        #[arg(long, default_value = "wanmig")]
        name: String,
    },
    /// Print the fingerprint of an identity.
    Fingerprint {
        /// Identity directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Wait for one incoming live migration, then run the VM (disk syncs
    /// that arrive first are kept as replicas, and it goes on waiting).
    Receive(migration::ReceiveArgs),
    /// Live-migrate the VM of vm.toml, with its disks, to a destination
    /// running `wanmig receive`. Exit status: 0 migrated, 1 failed (the VM
    /// still runs here), 3 in doubt (the VM is paused here), 2 bad usage.
    Send(migration::SendArgs),
    /// Copy the disks of the VM of vm.toml to a destination's chunk store
    /// and a verified replica image, while the VM keeps running here (it
    /// pauses only for the final consistent sync). A later `send` to the
    /// same destination then moves only what changed since.
    Sync(migration::SendArgs),
    /// Inspect or clean a host's chunk store (what `receive --store` and
    /// `send --store` fill).
    Store {
        /// The store's directory.
        dir: PathBuf,
        #[command(subcommand)]
        action: store::StoreAction,
    },
    /// Disaster recovery: the last sync against an RPO, scheduled syncs
    /// with retries, a drill, a failover.
    Dr {
        #[command(subcommand)]
        action: dr::DrAction,
    },
    /// Show the VM's write-tracking maps (the blocks each disk's guest wrote
    /// since the last sync to each destination; kept across a clean
    /// restart), or add, reset or remove one.
    Tracking {
        /// The VM's configuration.
        config: PathBuf,
        /// Add a map (invalid until reset or synced).
        #[arg(long)]
        add: Option<String>,
        /// Clear a map and declare it valid.
        #[arg(long)]
        reset: Option<String>,
        /// Remove a map.
        #[arg(long)]
        remove: Option<String>,
    },
    /// Boot the test guest, live-migrate it to a second process over
    /// loopback QUIC, and check it there with its oracle.
    Demo {
        /// Work directory (default: a new temporary one, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Snapshot and restore in a new process instead of migrating.
        #[arg(long)]
        snapshot: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Run { .. }
            | Command::Restore { .. }
            | Command::Receive { .. }
            | Command::Demo { .. }
            | Command::Send(_)
            | Command::Sync(_)
            | Command::Dr { action: dr::DrAction::Failover(_) | dr::DrAction::Sync { .. } }
    ) {
        // Commands that print and exit die quietly when their output pipe
        // closes (`wanmig status vm.toml | head`), like other tools. Not the
        // ones that serve a VM: a client hanging up must never kill a guest.
        // SAFETY: resets a signal disposition before any thread is spawned.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wanmig: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: &Path) -> Result<VmConfig> {
    Ok(VmConfig::load(config)?)
}

fn ask(config: &Path, req: &Request) -> Result<control::Response> {
    let cfg = load(config)?;
    Ok(control::request(&cfg.control_socket, req)?)
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { config, force } => {
            let cfg = load(&config)?;
            settle::check_may_run(&cfg, force)?;
            let mut vm = Vm::boot(&cfg).map_err(chain).context("cannot start the VM")?;
            vm.resume();
            eprintln!("wanmig: VM '{}' running; control socket {}", cfg.name, cfg.control_socket.display());
            serve(vm, &cfg)
        }
        Command::Restore { config, from, paused, force } => {
            let cfg = load(&config)?;
            settle::check_may_run(&cfg, force)?;
            let t = std::time::Instant::now();
            let mut vm = Vm::restore(&cfg, &from)
                .map_err(chain)
                .with_context(|| format!("cannot restore from {}", from.display()))?;
            let restore_ms = t.elapsed().as_secs_f64() * 1e3;
            if !paused {
                vm.resume();
            }
            eprintln!(
                "wanmig: VM '{}' restored from {} in {restore_ms:.1} ms ({}); control socket {}",
                cfg.name,
                from.display(),
                if paused { "paused" } else { "running" },
                cfg.control_socket.display()
            );
            serve(vm, &cfg)
        }
        Command::Snapshot { config, dir, resume } => {
            let dir = std::path::absolute(&dir)?;
            let r = ask(&config, &Request::Snapshot { dir: dir.clone(), resume })?;
            let s = r.save.context("the VM answered without save figures")?;
            println!(
                "saved to {}: pause {:.1} ms, state {:.1} ms, memory {:.1} ms + sync {:.1} ms ({} MiB of non-zero pages)",
                dir.display(),
                s.pause_ms,
                s.state_ms,
                s.memory_ms,
                s.sync_ms,
                s.memory_bytes >> 20
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pause { config } => ask(&config, &Request::Pause).map(|_| ExitCode::SUCCESS),
        Command::Resume { config } => ask(&config, &Request::Resume).map(|_| ExitCode::SUCCESS),
        Command::Shutdown { config, force } => ask(&config, &Request::Shutdown { force }).map(|_| ExitCode::SUCCESS),
        Command::Cancel { config } => {
            ask(&config, &Request::Cancel)?;
            eprintln!("wanmig: cancel accepted: the migration stops before its commit; the VM runs on here");
            Ok(ExitCode::SUCCESS)
        }
        Command::Set { config, downtime, max_bandwidth, no_bandwidth_cap } => {
            let req = Request::Set {
                downtime_ms: downtime.map(|d| d.as_millis() as u64),
                max_bandwidth_bps: max_bandwidth,
                no_bandwidth_cap,
            };
            let r = ask(&config, &req)?;
            println!("{}", serde_json::to_string_pretty(&r.migration)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Settle { config, force_resume } => settle::settle(&load(&config)?, force_resume),
        Command::Status { config } => {
            let r = ask(&config, &Request::Status)?;
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "vm": r.status,
                "migration": r.migration,
                "tunnel": r.tunnel,
                "tracking": r.tracking,
            }))?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::RoutesConverged { config } => ask(&config, &Request::RoutesConverged).map(|_| ExitCode::SUCCESS),
        Command::Verify { dir, disk } => {
            let report = demo::verify(&dir, disk.as_deref())?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Testguest { write } => {
            std::fs::write(&write, wanmig_vmm::testguest::IMAGE)
                .with_context(|| format!("cannot write {}", write.display()))?;
            println!(
                "wrote {} ({} bytes): a multiboot kernel; boot it with e.g. \
                 qemu-system-x86_64 -kernel {} -append 'ws_mib=16 rate_mib=8' -serial stdio",
                write.display(),
                wanmig_vmm::testguest::IMAGE.len(),
                write.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, snapshot } => demo::run(dir, snapshot).map(|()| ExitCode::SUCCESS),
        Command::Keygen { dir, name } => migration::keygen(&dir, &name),
        Command::Fingerprint { dir } => migration::fingerprint(&dir),
        Command::Receive(args) => migration::receive(args),
        Command::Send(args) => migration::send(args, false),
        Command::Sync(args) => migration::send(args, true),
        Command::Store { dir, action } => store::run(&dir, action),
        Command::Dr { action } => dr::run(action),
        Command::Tracking { config, add, reset, remove } => {
            let r = ask(&config, &Request::Tracking { add, reset, remove })?;
            println!("{}", serde_json::to_string_pretty(&r.tracking)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn serve(vm: Vm, cfg: &VmConfig) -> Result<ExitCode> {
    serve_vm(vm, cfg, control::socket::bind(&cfg.control_socket)?, None)
}

/// Serves a VM until it ends here (and, after a migration that left the
/// network tunnel running, until the tunnel's end here closes).
pub fn serve_vm(
    vm: Vm,
    cfg: &VmConfig,
    listener: std::os::unix::net::UnixListener,
    tunnel: Option<wanmig_migrate::handover::TunnelRun>,
) -> Result<ExitCode> {
    let end = control::serve(vm, listener, cfg, tunnel)?;
    report_end(end, cfg)
}

/// The exit of a process that served a VM.
fn report_end(end: ServeEnd, cfg: &VmConfig) -> Result<ExitCode> {
    match end {
        ServeEnd::Shutdown => Ok(ExitCode::SUCCESS),
        ServeEnd::MigratedAway => {
            eprintln!("wanmig: VM '{}' migrated away; it runs at the destination", cfg.name);
            Ok(ExitCode::SUCCESS)
        }
        ServeEnd::ShutdownInDoubt => {
            eprintln!(
                "wanmig: VM '{}' shut down while a migration of it is in doubt; `wanmig settle` decides where it runs",
                cfg.name
            );
            Ok(ExitCode::from(migration::EXIT_IN_DOUBT))
        }
        ServeEnd::GuestStopped(stop @ GuestStop::Failed(_)) => {
            eprintln!("wanmig: guest {stop}");
            Ok(ExitCode::FAILURE)
        }
        ServeEnd::GuestStopped(stop @ (GuestStop::Reset | GuestStop::TripleFault)) => {
            eprintln!("wanmig: guest {stop}; VM '{}' ends (wanmig does not reboot guests)", cfg.name);
            Ok(ExitCode::SUCCESS)
        }
        ServeEnd::GuestStopped(GuestStop::PowerOff) => {
            eprintln!("wanmig: guest powered off; VM '{}' ends", cfg.name);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Flattens an error's source chain into one anyhow message.
pub fn chain(e: impl std::error::Error) -> anyhow::Error {
    anyhow::anyhow!(wanmig_types::error_chain(&e))
}
