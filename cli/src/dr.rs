//! `wanmig dr`: disaster recovery around `wanmig sync`.
//!
//! - `status`: the last good sync and its age against an RPO (monitoring).
//! - `sync`: `wanmig sync` with retries and exponential backoff, what the
//!   systemd timer runs; `install-timer` installs that timer.
//! - `test`: a drill at the DR site — a disposable copy of an epoch booted
//!   in isolation, checked, removed; the measured recovery time.
//! - `failover`: the VM started from an epoch at the DR site, once the
//!   source site is gone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wanmig_block_sync::BlockDigest;
use wanmig_dedup::StoreView;
use wanmig_dr::epoch::{self, EpochRecord, FileIdentity, Which};
use wanmig_dr::probe::{self, Answer, Probe};
use wanmig_migrate::report::Outcome;
use wanmig_vmm::config::GuestConfig;
use wanmig_vmm::{Vm, VmConfig};

use crate::migration::{SendArgs, parse_duration};
use crate::store::parse_age;

/// The systemd units `install-timer` installs (shipped in `deploy/systemd/`).
const SERVICE: &str = include_str!("../../deploy/systemd/wanmig-sync@.service");
const TIMER: &str = include_str!("../../deploy/systemd/wanmig-sync@.timer");
const RPO_SERVICE: &str = include_str!("../../deploy/systemd/wanmig-rpo@.service");
const RPO_TIMER: &str = include_str!("../../deploy/systemd/wanmig-rpo@.timer");
/// Where the shipped units expect the binary and the per-VM settings.
const SHIPPED_BINARY: &str = "/usr/local/bin/wanmig";
const SHIPPED_ENV_DIR: &str = "/etc/wanmig/sync";

/// What `wanmig dr` does.
#[derive(clap::Subcommand)]
pub enum DrAction {
    /// The VM's last good sync (from the record its process keeps beside
    /// the journal) and its age; with --rpo, exit 1 when it is older than
    /// that (or there was none): for monitoring.
    Status {
        /// The VM's configuration.
        config: PathBuf,
        /// The recovery point objective (e.g. 15m, 1h).
        #[arg(long, value_parser = parse_age)]
        rpo: Option<Duration>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// `wanmig sync`, tried again after a failure with exponential backoff
    /// (what the systemd timer runs). Exit 0 synced, 1 every attempt failed.
    Sync {
        #[command(flatten)]
        send: SendArgs,
        #[command(flatten)]
        retry: RetryArgs,
    },
    /// Install and enable a systemd timer that syncs the VM on a calendar
    /// schedule (`wanmig-sync@VM.timer`, from `deploy/systemd/`).
    InstallTimer(InstallArgs),
    /// A drill at the DR site: boots a disposable copy of an epoch in
    /// isolation (no NIC), checks it, removes it, and reports the recovery
    /// time. The store and the replica are only read.
    Test(TestArgs),
    /// Starts the VM from an epoch at the DR site (a cold boot from its
    /// disks) when the source site is gone; refused while a probe of the
    /// source answers, unless --force. This process then serves the VM.
    Failover(FailoverArgs),
}

/// Retries of `dr sync`.
#[derive(clap::Args, Clone, Debug)]
pub struct RetryArgs {
    /// Attempts after the first one fails.
    #[arg(long, default_value = "3")]
    retries: u32,
    /// Wait before the first retry; doubled before each next one.
    #[arg(long, default_value = "30s", value_parser = parse_age)]
    backoff: Duration,
    /// Longest wait between attempts.
    #[arg(long, default_value = "10m", value_parser = parse_age)]
    max_backoff: Duration,
}

/// Options of `dr install-timer`.
#[derive(clap::Args)]
pub struct InstallArgs {
    /// The VM's configuration.
    config: PathBuf,
    /// The DR destination, host:port (running `wanmig receive`).
    dest: String,
    /// This host's identity directory.
    #[arg(long)]
    identity: PathBuf,
    /// The destination's fingerprint.
    #[arg(long)]
    peer: String,
    /// When to sync: a systemd calendar expression (`*:0/15`: every 15
    /// minutes; `hourly`; `*-*-* 02:00`).
    #[arg(long, default_value = "*:0/15")]
    on_calendar: String,
    /// Retries after a failed sync, within one run.
    #[arg(long, default_value = "3")]
    retries: u32,
    /// First wait before a retry (doubled each time, at most 10 min).
    #[arg(long, default_value = "30s")]
    backoff: String,
    /// More options for `wanmig sync` (e.g. "--store /var/lib/wanmig/chunks --max-bandwidth 200Mbit").
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    sync_args: String,
    /// Also check every 5 minutes that the last good sync is younger than
    /// this (`wanmig-rpo@VM.timer`; a failed check shows in `systemctl
    /// --failed`).
    #[arg(long)]
    rpo: Option<String>,
    /// Where the units go.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Where the per-VM settings go.
    #[arg(long, default_value = SHIPPED_ENV_DIR)]
    env_dir: PathBuf,
    /// Write the files only: no `systemctl daemon-reload`, no enabling.
    #[arg(long)]
    no_enable: bool,
}

/// Options of `dr test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// The VM's configuration at the DR site (its `[guest]`; its disks and
    /// NICs are replaced by the copy's, without NICs).
    config: PathBuf,
    /// The DR site's chunk store (`receive --store`).
    #[arg(long)]
    store: PathBuf,
    /// Which epoch: an id, or `latest`.
    #[arg(long, default_value = "latest")]
    epoch: Which,
    /// Where the copy goes (a new directory under it, removed afterwards;
    /// default: beside the configuration, where the replicas have room).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Give up on the guest after this long.
    #[arg(long, default_value = "3m", value_parser = parse_duration)]
    timeout: Duration,
    /// The console must show this (a Linux guest's "booted" marker).
    #[arg(long)]
    console_marker: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Options of `dr failover`.
#[derive(clap::Args)]
pub struct FailoverArgs {
    /// The VM's configuration at the DR site: its `[guest]`, its NICs on
    /// this site's TAPs, and its disks at the paths of the replicas
    /// (`receive --disk-dir`), in the VM's disk order.
    config: PathBuf,
    /// The DR site's chunk store (`receive --store`).
    #[arg(long)]
    store: PathBuf,
    /// Which epoch: an id, or `latest`.
    #[arg(long, default_value = "latest")]
    epoch: Which,
    /// A probe of the source (icmp:ADDRESS, tcp:ADDRESS:PORT; repeatable);
    /// default: an ICMP echo to each address the VM's NICs had.
    #[arg(long = "probe")]
    probes: Vec<Probe>,
    /// How long each probe waits for an answer.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    probe_timeout: Duration,
    /// Start it even though a probe answers or none can be made (two
    /// copies of one VM diverge: fence the source first).
    #[arg(long)]
    force: bool,
    /// Leave the VM paused.
    #[arg(long)]
    paused: bool,
}

/// `wanmig dr ACTION`.
pub fn run(action: DrAction) -> Result<ExitCode> {
    match action {
        DrAction::Status { config, rpo, json } => status(&config, rpo, json),
        DrAction::Sync { send, retry } => sync_with_retries(&send, &retry),
        DrAction::InstallTimer(a) => install_timer(&a),
        DrAction::Test(a) => drill(&a),
        DrAction::Failover(a) => failover(&a),
    }
}

fn status(config: &Path, rpo: Option<Duration>, json: bool) -> Result<ExitCode> {
    let cfg = VmConfig::load(config)?;
    let last = wanmig_dr::status::read(&wanmig_dr::status::path(&cfg.state_dir, &cfg.name)).map_err(crate::chain)?;
    let r = wanmig_dr::status::report(&cfg.name, last, wanmig_dr::unix_now(), rpo.map(|d| d.as_secs()));
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        match (&r.last_sync, r.age_s) {
            (Some(l), Some(age)) => println!(
                "{}: last good sync {} ({} s ago) to {}, migration {}, {:.1} MiB on the wire{}",
                r.vm,
                r.last_sync_time.as_deref().unwrap_or("?"),
                age,
                l.dest,
                l.migration_id,
                l.wire_bytes as f64 / 1048576.0,
                match r.rpo_s {
                    Some(rpo) if r.rpo_met => format!("; within the RPO of {rpo} s"),
                    Some(rpo) => format!("; RPO of {rpo} s EXCEEDED"),
                    None => String::new(),
                }
            ),
            _ => println!("{}: no sync has succeeded (no recovery point)", r.vm),
        }
    }
    let fail = rpo.is_some() && !r.rpo_met;
    Ok(if fail { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Waits `d`, or less if a signal arrived; whether one did.
fn wait_or_interrupted(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if crate::signals::INTERRUPTED.load(Ordering::Acquire) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())));
    }
    crate::signals::INTERRUPTED.load(Ordering::Acquire)
}

/// The wait before retry `n` (1-based): `backoff` doubled `n - 1` times,
/// at most `max`.
pub fn backoff(n: u32, first: Duration, max: Duration) -> Duration {
    first.saturating_mul(1u32 << (n - 1).min(20)).min(max)
}

fn sync_with_retries(a: &SendArgs, r: &RetryArgs) -> Result<ExitCode> {
    crate::migration::check_send_args(a, true)?;
    let cfg = VmConfig::load(&a.config)?;
    crate::signals::cancel_on_interrupt(cfg.control_socket.clone());
    for attempt in 0..=r.retries {
        if attempt > 0 {
            let wait = backoff(attempt, r.backoff, r.max_backoff);
            eprintln!("wanmig: sync attempt {attempt} failed; trying again in {wait:?}");
            if wait_or_interrupted(wait) {
                eprintln!("wanmig: interrupted; no more attempts");
                return Ok(ExitCode::FAILURE);
            }
        }
        match crate::migration::send_once(a, true) {
            Ok(Outcome::Synced) => return Ok(ExitCode::SUCCESS),
            Ok(other) => eprintln!("wanmig: sync ended {other:?}"),
            Err(e) => eprintln!("wanmig: sync failed: {e:#}"),
        }
        if crate::signals::INTERRUPTED.load(Ordering::Acquire) {
            return Ok(ExitCode::FAILURE);
        }
    }
    eprintln!("wanmig: the sync failed {} time(s); the next run of the schedule tries again", r.retries + 1);
    Ok(ExitCode::FAILURE)
}

/// The env file's text for a VM.
fn env_file(a: &InstallArgs, config: &Path, identity: &Path) -> String {
    format!(
        "# wanmig dr install-timer: settings of wanmig-sync@.service for this VM.\n\
         WANMIG_CONFIG={}\nWANMIG_DEST={}\nWANMIG_IDENTITY={}\nWANMIG_PEER={}\n\
         WANMIG_RETRIES={}\nWANMIG_BACKOFF={}\nWANMIG_SYNC_ARGS={}\nWANMIG_RPO={}\n",
        config.display(),
        a.dest,
        identity.display(),
        a.peer,
        a.retries,
        a.backoff,
        a.sync_args,
        a.rpo.as_deref().unwrap_or("")
    )
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

fn install_timer(a: &InstallArgs) -> Result<ExitCode> {
    let config = std::path::absolute(&a.config)?;
    let cfg = VmConfig::load(&config)?;
    let identity = std::path::absolute(&a.identity)?;
    a.peer.parse::<wanmig_transport::Fingerprint>()?;
    parse_age(&a.backoff).map_err(anyhow::Error::msg)?;
    if let Some(rpo) = &a.rpo {
        parse_age(rpo).map_err(anyhow::Error::msg)?;
    }
    // systemd-analyze knows calendar expressions exactly.
    if let Ok(out) = std::process::Command::new("systemd-analyze").args(["calendar", &a.on_calendar]).output()
        && !out.status.success()
    {
        bail!("--on-calendar {:?}: {}", a.on_calendar, String::from_utf8_lossy(&out.stderr).trim());
    }
    let exe = std::env::current_exe()?;
    let env_dir = std::path::absolute(&a.env_dir)?;
    let local = |unit: &str| {
        unit.replace(SHIPPED_BINARY, &exe.to_string_lossy()).replace(SHIPPED_ENV_DIR, &env_dir.to_string_lossy())
    };
    let vm = &cfg.name;
    write_file(&a.unit_dir.join("wanmig-sync@.service"), &local(SERVICE))?;
    write_file(&a.unit_dir.join("wanmig-sync@.timer"), TIMER)?;
    let mut timers = vec![format!("wanmig-sync@{vm}.timer")];
    if a.rpo.is_some() {
        write_file(&a.unit_dir.join("wanmig-rpo@.service"), &local(RPO_SERVICE))?;
        write_file(&a.unit_dir.join("wanmig-rpo@.timer"), RPO_TIMER)?;
        timers.push(format!("wanmig-rpo@{vm}.timer"));
    }
    let schedule = format!(
        "# wanmig dr install-timer: when VM {vm} is synced.\n[Timer]\nOnCalendar=\nOnCalendar={}\n",
        a.on_calendar
    );
    write_file(&a.unit_dir.join(format!("wanmig-sync@{vm}.timer.d")).join("schedule.conf"), &schedule)?;
    write_file(&env_dir.join(format!("{vm}.env")), &env_file(a, &config, &identity))?;
    println!("installed {} ({}) in {}", timers.join(" and "), a.on_calendar, a.unit_dir.display());
    if a.no_enable {
        return Ok(ExitCode::SUCCESS);
    }
    let mut enable = vec!["enable", "--now"];
    enable.extend(timers.iter().map(String::as_str));
    for args in [vec!["daemon-reload"], enable] {
        let st = std::process::Command::new("systemctl").args(&args).status().context("cannot run systemctl")?;
        if !st.success() {
            bail!("systemctl {} failed ({st})", args.join(" "));
        }
    }
    println!("enabled: `systemctl list-timers wanmig-sync@{vm}.timer` shows the next run");
    Ok(ExitCode::SUCCESS)
}

/// The test guest's disk region on disk 0, as bytes (its oracle's input).
fn guest_region(cfg: &VmConfig, image: &Path) -> Result<Option<Vec<u8>>> {
    let Some(GuestConfig::Test(t)) = &cfg.guest else { return Ok(None) };
    if t.disk_mib == 0 {
        return Ok(None);
    }
    let f = std::fs::File::open(image)?;
    let len = (t.disk_mib << 20).min(f.metadata()?.len()) as usize;
    let mut buf = vec![0u8; len];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0)?;
    Ok(Some(buf))
}

/// What a drill measured and found.
#[derive(Debug, serde::Serialize)]
struct DrillReport {
    vm: String,
    epoch: u64,
    epoch_time: String,
    /// Seconds to write the copy from the store (verified).
    materialize_s: f64,
    /// Data bytes written.
    data_bytes: u64,
    /// Seconds from the boot to the guest running and checked.
    boot_to_checked_s: f64,
    /// Seconds from the start of the drill to the guest running and
    /// checked: the recovery time a failover of this epoch would take.
    recovery_time_s: f64,
    /// What was checked.
    checks: Vec<String>,
    /// The copy was removed.
    removed: bool,
}

fn open_epoch(store: &Path, vm: &str, which: Which) -> Result<(StoreView, EpochRecord)> {
    let view = StoreView::open(store).with_context(|| format!("chunk store {}", store.display()))?;
    let rec = epoch::find(&view, vm, which).map_err(crate::chain)?;
    Ok((view, rec))
}

fn check_disks(cfg: &VmConfig, rec: &EpochRecord) -> Result<()> {
    if cfg.disks.len() != rec.disks.len() {
        bail!(
            "{} has {} disk(s), epoch {} of VM {} has {}",
            cfg.name,
            cfg.disks.len(),
            rec.id,
            rec.vm,
            rec.disks.len()
        );
    }
    if cfg.memory_mib != rec.facts.memory_mib || cfg.vcpus != rec.facts.vcpus {
        eprintln!(
            "wanmig: note: the configuration gives {} MiB and {} vCPU(s); the VM had {} MiB and {} at the epoch",
            cfg.memory_mib, cfg.vcpus, rec.facts.memory_mib, rec.facts.vcpus
        );
    }
    Ok(())
}

fn drill(a: &TestArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let mut cfg = VmConfig::load(&a.config)?;
    if cfg.guest.is_none() {
        bail!("{}: no [guest]: a drill boots the VM from its disks", a.config.display());
    }
    if matches!(cfg.guest, Some(GuestConfig::Linux(_))) && a.console_marker.is_none() {
        bail!("a Linux guest is checked by a line on its console: give --console-marker");
    }
    let (view, rec) = open_epoch(&a.store, &cfg.name, a.epoch)?;
    check_disks(&cfg, &rec)?;
    let parent = match &a.work_dir {
        Some(d) => d.clone(),
        None => std::path::absolute(&a.config)?.parent().map_or_else(std::env::temp_dir, Path::to_path_buf),
    };
    let work = tempfile::Builder::new().prefix(&format!("wanmig-drill-{}-", cfg.name)).tempdir_in(&parent)?;
    // Isolated: no NIC, and everything the VM writes in the work directory.
    let mut data_bytes = 0;
    for (i, d) in cfg.disks.iter_mut().enumerate() {
        let copy = work.path().join(format!("disk{i}-{}", rec.disks[i].name));
        let m = epoch::materialize(&view, &rec, i, &copy).map_err(crate::chain)?;
        data_bytes += m.data_bytes;
        d.path = copy;
    }
    let materialize_s = start.elapsed().as_secs_f64();
    cfg.nets.clear();
    cfg.control_socket = work.path().join("drill.sock");
    cfg.state_dir = work.path().to_path_buf();
    cfg.serial = wanmig_vmm::config::SerialOutput::File(work.path().join("console.log"));
    let region = match cfg.disks.first() {
        Some(d) => guest_region(&cfg, &d.path)?,
        None => None,
    };
    let mut checks = vec![format!(
        "epoch {}: every disk written from the store and verified against its digest ({} disk(s))",
        rec.id,
        rec.disks.len()
    )];
    let booted = Instant::now();
    let mut vm = Vm::boot(&cfg).map_err(crate::chain).context("cannot boot the copy")?;
    vm.resume();
    let checked = watch_guest(&vm, &cfg, region.as_deref(), a, &mut checks);
    drop(vm);
    let boot_to_checked_s = booted.elapsed().as_secs_f64();
    let recovery_time_s = start.elapsed().as_secs_f64();
    let work_path = work.path().to_path_buf();
    work.close().with_context(|| format!("cannot remove the copy in {}", work_path.display()))?;
    let report = DrillReport {
        vm: cfg.name.clone(),
        epoch: rec.id,
        epoch_time: rec.time(),
        materialize_s,
        data_bytes,
        boot_to_checked_s,
        recovery_time_s,
        checks,
        removed: !work_path.exists(),
    };
    checked?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "drill of VM {} epoch {} ({}): running and checked {:.2} s after the start (copy {:.2} s, boot to checked {:.2} s); the copy is removed",
            report.vm,
            report.epoch,
            report.epoch_time,
            report.recovery_time_s,
            report.materialize_s,
            report.boot_to_checked_s
        );
        for c in &report.checks {
            println!("  ok: {c}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the booted copy to run and checks it: the test guest's disk
/// region as a prefix of the source guest's writes, then the new guest's
/// own oracle; a console marker if one was asked for.
fn watch_guest(vm: &Vm, cfg: &VmConfig, region: Option<&[u8]>, a: &TestArgs, checks: &mut Vec<String>) -> Result<()> {
    let deadline = Instant::now() + a.timeout;
    let console = || match &cfg.serial {
        wanmig_vmm::config::SerialOutput::File(p) => std::fs::read_to_string(p).unwrap_or_default(),
        _ => String::new(),
    };
    if let Some(GuestConfig::Test(t)) = &cfg.guest {
        // Running, and writing its disk if it does.
        let status = loop {
            if let Some(s) = vm.test_guest_status()
                && s.phase == 2
                && (t.disk_kib == 0 || t.disk_mib == 0 || s.disk_done >= 8)
            {
                break s;
            }
            if let Some(stop) = vm.wait_guest_stop(Duration::from_millis(50)) {
                bail!("the copy's guest stopped: {stop}");
            }
            if Instant::now() > deadline {
                bail!("the copy's guest did not run within {:?}", a.timeout);
            }
        };
        if status.errors != 0 {
            bail!("the copy's guest found {} error(s) in its own memory or disk", status.errors);
        }
        checks.push(format!(
            "the test guest boots from the copy and runs: {} working-set steps, {} disk writes of its own, 0 errors",
            status.steps, status.disk_done
        ));
        if let Some(region) = region {
            let n = wanmig_vmm::testguest::check_disk_prefix(region, &status)
                .map_err(|e| anyhow::anyhow!("the epoch's disk is not a prefix of the source guest's writes: {e}"))?;
            checks.push(format!(
                "the epoch's disk holds exactly the source guest's first {n} writes (a crash-consistent point)"
            ));
        }
    }
    if let Some(marker) = &a.console_marker {
        while !console().contains(marker.as_str()) {
            if let Some(stop) = vm.wait_guest_stop(Duration::from_millis(100)) {
                bail!("the copy's guest stopped before its console showed {marker:?}: {stop}");
            }
            if Instant::now() > deadline {
                bail!("the console did not show {marker:?} within {:?}", a.timeout);
            }
        }
        checks.push(format!("the console shows {marker:?}"));
    }
    Ok(())
}

/// The digest of the image at `path`, read whole.
fn digest_of(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path)?;
    let mut d = BlockDigest::new(f.metadata()?.len());
    d.refresh(&f)?;
    Ok(d.digest().iter().map(|b| format!("{b:02x}")).collect())
}

/// `path` with `.suffix` appended.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Puts disk `i` of `rec` at `target`: the replica there is used as it is
/// when it is still the file the epoch was made from (checked against the
/// digest), else the epoch is written from the store. Either way the
/// replica marker goes: the image is the VM's now, and a late sync from
/// the old source is refused. Returns how.
fn place(view: &StoreView, rec: &EpochRecord, i: usize, target: &Path) -> Result<String> {
    let marker = with_suffix(target, "replica");
    if target.exists() && !marker.exists() {
        bail!("{} exists and is not a replica kept by `wanmig sync`: not overwritten", target.display());
    }
    let d = &rec.disks[i];
    let unchanged = |r: &FileIdentity| {
        FileIdentity::of(target)
            .is_ok_and(|now| (now.dev, now.ino, now.size, now.mtime) == (r.dev, r.ino, r.size, r.mtime))
    };
    let how = if d.replica.as_ref().is_some_and(unchanged) && digest_of(target)? == d.digest {
        "the replica in place (still the epoch's, digest checked)".to_string()
    } else {
        let tmp = with_suffix(target, "failover");
        let _ = std::fs::remove_file(&tmp);
        let m = epoch::materialize(view, rec, i, &tmp).map_err(crate::chain)?;
        std::fs::rename(&tmp, target).with_context(|| format!("cannot install {}", target.display()))?;
        format!("written from the store in {:.2} s (verified)", m.secs)
    };
    match std::fs::remove_file(&marker) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", marker.display()));
        }
        _ => {}
    }
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir).and_then(|f| f.sync_all())?;
    }
    Ok(how)
}

/// The probes to make: those given, else an ICMP echo to each address the
/// VM's NICs had at the epoch.
fn probes_for(a: &FailoverArgs, rec: &EpochRecord) -> Vec<Probe> {
    if !a.probes.is_empty() {
        return a.probes.clone();
    }
    rec.facts.nics.iter().filter_map(|n| n.ip.as_deref()?.split('/').next()?.parse().ok()).map(Probe::Icmp).collect()
}

/// Refuses while the source answers (or nothing can tell), unless forced.
fn check_source_gone(a: &FailoverArgs, rec: &EpochRecord) -> Result<()> {
    let probes = probes_for(a, rec);
    let mut usable = 0;
    for p in &probes {
        match probe::probe(p, a.probe_timeout) {
            Answer::Alive(how) if a.force => eprintln!("wanmig: WARNING: {p} {how}; failing over anyway (--force)"),
            Answer::Alive(how) => bail!(
                "the source still answers: {p} {how}; the VM runs there (fail over only once it is gone or fenced; --force overrides)"
            ),
            Answer::Silent => {
                usable += 1;
                eprintln!("wanmig: {p}: no answer within {:?}", a.probe_timeout);
            }
            Answer::Unusable(why) => eprintln!("wanmig: {p}: cannot probe: {why}"),
        }
    }
    if usable == 0 && !a.force {
        bail!(
            "nothing tells whether the source still runs the VM (no probe could be made: give --probe icmp:ADDRESS or tcp:ADDRESS:PORT, or --force once the source is fenced)"
        );
    }
    Ok(())
}

fn failover(a: &FailoverArgs) -> Result<ExitCode> {
    let start = Instant::now();
    let cfg = VmConfig::load(&a.config)?;
    if cfg.guest.is_none() {
        bail!("{}: no [guest]: a failover boots the VM from its disks", a.config.display());
    }
    let (view, rec) = open_epoch(&a.store, &cfg.name, a.epoch)?;
    check_disks(&cfg, &rec)?;
    check_source_gone(a, &rec)?;
    crate::settle::check_may_run(&cfg, a.force)?;
    for (i, d) in cfg.disks.iter().enumerate() {
        let how = place(&view, &rec, i, &d.path)?;
        eprintln!("wanmig: disk {i} ({}): {how}", d.path.display());
    }
    drop(view);
    let mut vm = Vm::boot(&cfg).map_err(crate::chain).context("cannot start the VM")?;
    if !a.paused {
        vm.resume();
    }
    eprintln!(
        "wanmig: VM '{}' failed over from epoch {} ({}, sync {}): {} {:.2} s after the start; control socket {}",
        cfg.name,
        rec.id,
        rec.time(),
        rec.migration_id,
        if a.paused { "paused" } else { "running" },
        start.elapsed().as_secs_f64(),
        cfg.control_socket.display()
    );
    crate::serve_vm(vm, &cfg, wanmig_control::socket::bind(&cfg.control_socket)?, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let (first, max) = (Duration::from_secs(30), Duration::from_secs(600));
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n, first, max).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
        assert_eq!(backoff(40, first, max), max);
    }

    #[test]
    fn the_shipped_units_name_what_the_installer_replaces() {
        assert!(SERVICE.contains(SHIPPED_BINARY) && SERVICE.contains(SHIPPED_ENV_DIR));
        assert!(RPO_SERVICE.contains(SHIPPED_BINARY) && RPO_SERVICE.contains(SHIPPED_ENV_DIR));
        assert!(SERVICE.contains("Type=oneshot") && TIMER.contains("Persistent=true"));
    }
}
