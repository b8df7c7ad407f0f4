//! `wanmig keygen`, `receive`, `send` and `sync`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use wanmig_control::host::ServeHost;
use wanmig_control::protocol::MigrateRequest;
use wanmig_control::{self as control, Request};
use wanmig_migrate::destination::{self, ReceiveOptions};
use wanmig_migrate::report::{Outcome, Phase, Progress, Summary};
use wanmig_migrate::source::{TunnelLifetime, TunnelRequest};
use wanmig_transport::{Fingerprint, Identity, LinkTuning};

/// Exit code of `send` when the migration failed and the VM still runs here.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of `send` when the outcome is in doubt (the VM is paused here).
pub const EXIT_IN_DOUBT: u8 = 3;
/// Exit code of `send` when a post-copy was lost: the guest ran at the
/// destination, which ended before it had every page; the VM is paused
/// here as it was at the switch and is not resumed.
pub const EXIT_POSTCOPY_LOST: u8 = 4;

/// Parses "300ms", "2s", "1.5s", "5m".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 300ms, 2s or 5m"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" | "" => v,
        "m" | "min" => v * 60.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m)")),
    };
    if !(0.0..=1e7).contains(&secs) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a bandwidth into bits/s: "200Mbit", "1Gbit", "500kbit", "100MiB"
/// (bytes/s), or a plain number of bits/s.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("`{s}` is not a bandwidth like 200Mbit or 100MiB"))?;
    let bits = match unit.trim_end_matches("/s") {
        "" | "bit" => v,
        "kbit" | "Kbit" => v * 1e3,
        "Mbit" => v * 1e6,
        "Gbit" => v * 1e9,
        "KiB" => v * 8.0 * 1024.0,
        "MiB" => v * 8.0 * 1048576.0,
        "GiB" => v * 8.0 * 1073741824.0,
        u => return Err(format!("`{s}`: unknown unit `{u}` (kbit, Mbit, Gbit, KiB, MiB, GiB)")),
    };
    if !(1e3..=1e13).contains(&bits) {
        return Err(format!("`{s}` is out of range (1 kbit/s to 10 Tbit/s)"));
    }
    Ok(bits as u64)
}

/// `wanmig keygen`.
pub fn keygen(dir: &Path, name: &str) -> Result<ExitCode> {
    let id = Identity::create(dir, name).with_context(|| format!("cannot create an identity in {}", dir.display()))?;
    println!("{}", id.fingerprint());
    eprintln!(
        "wanmig: identity written to {}; give the fingerprint above to the peers that must trust this host",
        dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `wanmig fingerprint`.
pub fn fingerprint(dir: &Path) -> Result<ExitCode> {
    println!("{}", Identity::load(dir)?.fingerprint());
    Ok(ExitCode::SUCCESS)
}

/// Options of `wanmig receive`.
#[derive(clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on, e.g. `[::]:4750`.
    #[arg(long)]
    listen: String,
    /// This host's identity directory.
    #[arg(long)]
    identity: PathBuf,
    /// Fingerprint of a source allowed to migrate here (repeatable).
    #[arg(long = "peer", required = true)]
    peers: Vec<String>,
    /// Where the VM's control socket and console log go.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Open the source's disk images at the same paths, which must lie
    /// under this directory (storage both hosts see), instead of copying them.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["disk_dir", "store"])]
    shared_disks: Option<PathBuf>,
    /// Where copied disk images go (default: --dir). An image takes the
    /// file name it has at the source; an existing file is never
    /// overwritten unless it is a replica left by `wanmig sync`.
    #[arg(long, value_name = "DIR")]
    disk_dir: Option<PathBuf>,
    /// This host's chunk store (default: `DIR/chunks` of --dir): chunks it holds are
    /// not sent again.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Leave the received VM paused after the commit (resume it with the
    /// control socket's `resume`), e.g. to inspect its disks as they were
    /// at the source's pause.
    #[arg(long)]
    paused: bool,
    /// A TAP interface of this host for the VM's next NIC (repeatable, in
    /// the VM's NIC order); created if missing. A VM with more NICs than
    /// TAPs given is refused at its hello.
    #[arg(long = "tap", value_name = "NAME")]
    taps: Vec<String>,
    /// Expected link bandwidth, for flow-control windows (e.g. 1Gbit).
    #[arg(long, value_parser = parse_bandwidth)]
    link_bandwidth: Option<u64>,
    /// Expected round-trip time, for flow-control windows (e.g. 100ms).
    #[arg(long, value_parser = parse_duration)]
    rtt: Option<Duration>,
    /// Drop a source that sends nothing for this long while it transfers
    /// (default 120s: 4 times the longest a working source waits for an
    /// answer), freeing this host for the next one.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// How long an attempt whose link failed waits for its source to
    /// reconnect and resume it from where it was (default 10m, the source's
    /// own `--resume-window`; 0 discards it at once).
    #[arg(long, value_parser = parse_duration)]
    resume_window: Option<Duration>,
    /// Retention of the epochs each sync leaves (given: stored in the chunk
    /// store as its default for every VM; see `wanmig store DIR retention`).
    #[command(flatten)]
    keep: crate::keep::KeepArgs,
}

/// `wanmig receive`: waits for one VM, then runs it and serves its control socket.
pub fn receive(a: ReceiveArgs) -> Result<ExitCode> {
    let listen = wanmig_migrate::resolve(&a.listen).map_err(anyhow::Error::msg)?;
    let identity = Identity::load(&a.identity)?;
    let peers = a.peers.iter().map(|p| p.parse::<Fingerprint>()).collect::<Result<Vec<_>, _>>()?;
    if peers.is_empty() {
        bail!("no --peer given: no source could ever migrate here");
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("cannot create {}", a.dir.display()))?;
    let dir = std::path::absolute(&a.dir)?;
    let disk_dir = std::path::absolute(a.disk_dir.as_deref().unwrap_or(&dir))?;
    std::fs::create_dir_all(&disk_dir).with_context(|| format!("cannot create {}", disk_dir.display()))?;
    let store = std::path::absolute(a.store.unwrap_or_else(|| dir.join("chunks")))?;
    if let Some(rules) = a.keep.rules() {
        crate::keep::set_store_rules(&store, None, &rules)?;
    }
    let mut tuning = LinkTuning::default();
    if let Some(b) = a.link_bandwidth {
        tuning.bandwidth_bps = b;
    }
    if let Some(r) = a.rtt {
        tuning.rtt = r;
    }
    let opts = ReceiveOptions {
        listen,
        identity,
        peers,
        dir,
        shared_disks: a.shared_disks,
        disk_dir,
        store,
        paused: a.paused,
        taps: a.taps,
        tuning,
        idle_timeout: a.idle_timeout.unwrap_or(destination::DEFAULT_IDLE_TIMEOUT),
        resume_window: a.resume_window.unwrap_or(destination::DEFAULT_RESUME_WINDOW),
    };
    let mut host = ServeHost { dir: opts.dir.clone() };
    let received = destination::receive(&opts, &mut host, &mut |line| eprintln!("wanmig receive: {line}"))
        .map_err(crate::chain)?;
    let cfg = received.config;
    let written = received.vm.config_file.as_ref().map_or_else(|| "not written".into(), |p| p.display().to_string());
    eprintln!(
        "wanmig receive: VM '{}' committed and running; control socket {}; its configuration: {written}",
        cfg.name,
        cfg.control_socket.display()
    );
    // The listener goes on answering settle queries while the VM runs here.
    let _listener = received.listener;
    let mut cfg = cfg;
    cfg.disks = received.vm.vm.config().disks.clone();
    crate::serve_vm(received.vm.vm, &cfg, received.vm.listener.take(), received.tunnel)
}

/// Options of `wanmig send`.
#[derive(clap::Args)]
pub struct SendArgs {
    /// The VM's configuration (names its control socket).
    pub config: PathBuf,
    /// Destination host:port.
    pub dest: String,
    /// This host's identity directory.
    #[arg(long)]
    pub identity: PathBuf,
    /// The destination's fingerprint.
    #[arg(long)]
    pub peer: String,
    /// Downtime budget.
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    downtime: Duration,
    /// Bandwidth cap (e.g. 200Mbit).
    #[arg(long, value_parser = parse_bandwidth)]
    max_bandwidth: Option<u64>,
    /// With --max-bandwidth: dynamic rate limiting (Clark et al.): start
    /// here, then run each round at the last round's dirty rate plus this.
    #[arg(long, value_parser = parse_bandwidth)]
    min_bandwidth: Option<u64>,
    /// Give up (and keep running here) after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    timeout: Duration,
    /// Expected link bandwidth, for flow-control windows.
    #[arg(long, value_parser = parse_bandwidth)]
    link_bandwidth: Option<u64>,
    /// Expected round-trip time, for flow-control windows.
    #[arg(long, value_parser = parse_duration)]
    rtt: Option<Duration>,
    /// Keep every chunk of the VM's disks in this host's chunk store in
    /// DIR, so that a later move back here sends only what changed.
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print the outcome and summary as JSON instead of progress and text.
    #[arg(long)]
    json: bool,
    /// After the commit, keep the guest's IPv4 address reachable through
    /// this host: answer ARP for it on this interface (the guest's segment)
    /// and forward its traffic through a tunnel to the destination, until
    /// `wanmig routes-converged` (or --tunnel-for, or --tunnel-forever).
    #[arg(long, value_name = "IFACE")]
    tunnel_via: Option<String>,
    /// End the tunnel after this long even without the routes-converged signal.
    #[arg(long, value_parser = parse_duration, requires = "tunnel_via", conflicts_with = "tunnel_forever")]
    tunnel_for: Option<Duration>,
    /// Keep the tunnel for good (a disaster-recovery move whose address stays).
    #[arg(long, requires = "tunnel_via")]
    tunnel_forever: bool,
    /// How long the link may stay down before the commit: the guest runs on
    /// here while the migration reconnects, then goes on from what the
    /// destination holds (0: an outage fails the migration at once).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    resume_window: Duration,
    /// Post-copy: `off` (pre-copy only: throttle the guest, or give up,
    /// when it writes faster than the link), `auto` (pre-copy first; move
    /// the guest and fetch the rest on demand when converging would need
    /// it throttled past 50%), `now` (move the guest as soon as the disks
    /// are copied). Disks are always copied whole before the guest moves.
    #[arg(long, default_value = "auto")]
    postcopy: wanmig_migrate::source::options::PostcopyMode,
    /// Send the commit right behind the device state and let the
    /// destination decide: a round trip less of downtime. This is the
    /// default (the flag stays accepted). The source stays paused from the
    /// device state until it hears the decision; an outage there is resumed
    /// like any other, and only a destination unreachable for the whole
    /// resume window leaves it in doubt (`wanmig settle`).
    #[arg(long, conflicts_with = "commit_after_ready")]
    early_commit: bool,
    /// Commit only after the destination says Ready (the classic two-phase
    /// order): a round trip more of downtime, and the source in doubt only
    /// from its Commit on.
    #[arg(long)]
    commit_after_ready: bool,
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

/// `wanmig send` (or, with `sync`, `wanmig sync`): asks the process running
/// the VM to migrate it (or to copy its disks to the destination). Ctrl-C or
/// SIGTERM before the commit cancels it; after the commit they are too late,
/// and it waits for the outcome.
pub fn send(a: SendArgs, sync: bool) -> Result<ExitCode> {
    check_send_args(&a, sync)?;
    let cfg = wanmig_vmm::VmConfig::load(&a.config)?;
    crate::signals::cancel_on_interrupt(cfg.control_socket.clone());
    Ok(exit_code(send_once(&a, sync)?))
}

/// The exit status for a migration's outcome.
pub fn exit_code(outcome: Outcome) -> ExitCode {
    match outcome {
        Outcome::Migrated | Outcome::Synced => ExitCode::SUCCESS,
        Outcome::FailedSourceRunning => ExitCode::from(EXIT_FAILED),
        Outcome::InDoubt => ExitCode::from(EXIT_IN_DOUBT),
        Outcome::PostcopyLost => ExitCode::from(EXIT_POSTCOPY_LOST),
    }
}

/// What `send` (or `sync`) checks before it asks the VM's process.
pub fn check_send_args(a: &SendArgs, sync: bool) -> Result<()> {
    let _ = wanmig_vmm::VmConfig::load(&a.config)?;
    // Fail fast, here, on what the VM process would refuse anyway.
    a.peer.parse::<Fingerprint>()?;
    if a.min_bandwidth.is_some() && a.max_bandwidth.is_none() {
        bail!("--min-bandwidth needs --max-bandwidth (the dynamic rate runs between the two)");
    }
    Identity::load(&a.identity)?;
    if sync && a.tunnel_via.is_some() {
        bail!("a sync hands no VM over: it has no tunnel to leave behind");
    }
    Ok(())
}

/// One migration (or sync) through the VM's process: its outcome, after
/// printing progress and the summary (or the JSON).
pub fn send_once(a: &SendArgs, sync: bool) -> Result<Outcome> {
    let cfg = wanmig_vmm::VmConfig::load(&a.config)?;
    let req = Request::Migrate { migration: migrate_request(a, sync)? };
    let bar = if a.json { ProgressBar::hidden() } else { ProgressBar::new_spinner() };
    bar.set_style(ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("valid template"));
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message(format!("connecting to {}", a.dest));
    let resp = control::request_with_progress(&cfg.control_socket, &req, &mut |p| bar.set_message(progress_line(&p)))?;
    bar.finish_and_clear();
    let outcome = resp.outcome.context("the VM process answered without an outcome")?;
    let summary = resp.summary.context("the VM process answered without a summary")?;
    if a.json {
        println!("{}", serde_json::json!({ "outcome": outcome, "summary": summary }));
    } else {
        print_summary(outcome, &summary);
    }
    Ok(outcome)
}

fn migrate_request(a: &SendArgs, sync: bool) -> Result<MigrateRequest> {
    Ok(MigrateRequest {
        dest: a.dest.clone(),
        identity: std::path::absolute(&a.identity)?,
        peer: a.peer.clone(),
        downtime_ms: a.downtime.as_millis() as u64,
        max_bandwidth_bps: a.max_bandwidth,
        min_bandwidth_bps: a.min_bandwidth,
        timeout_s: a.timeout.as_secs().max(1),
        link_bandwidth_bps: a.link_bandwidth,
        rtt_ms: a.rtt.map(|r| r.as_millis() as u64),
        store: a.store.as_deref().map(std::path::absolute).transpose()?,
        sync,
        resume_window_s: a.resume_window.as_secs(),
        postcopy: a.postcopy,
        commit_after_ready: a.commit_after_ready && !a.early_commit,
        tunnel: a.tunnel_via.clone().map(|interface| TunnelRequest {
            interface,
            lifetime: match (a.tunnel_forever, a.tunnel_for) {
                (true, _) => TunnelLifetime::Forever,
                (false, Some(d)) => TunnelLifetime::Seconds(d.as_secs().max(1)),
                (false, None) => TunnelLifetime::UntilConverged,
            },
        }),
    })
}

/// One line of live progress.
pub fn progress_line(p: &Progress) -> String {
    let eta = if p.eta_s > 0.0 { format!(" | ETA {:.1} s", p.eta_s) } else { String::new() };
    match (p.phase, &p.disk) {
        (Phase::Connecting, _) => format!("connecting to {}", p.dest),
        (Phase::DiskCopy, Some(d)) => format!(
            "disk copy {:.0}% | {} of {} | {} chunks sent, {} already there | {}/s{eta}",
            100.0 * d.bytes_done as f64 / d.bytes_total.max(1) as f64,
            mib(d.bytes_done as f64),
            mib(d.bytes_total as f64),
            d.chunks_sent,
            d.chunks_present,
            mib(p.link_rate)
        ),
        (Phase::DiskCopy, None) => "disk copy".into(),
        (Phase::DiskRounds, _) => format!(
            "disk round {} | {} of written blocks left | {}/s",
            p.round,
            mib(p.bytes_left as f64),
            mib(p.link_rate)
        ),
        (Phase::Precopy, _) => format!(
            "pre-copy round {} | {} left | dirty {}/s | link {}/s | predicted downtime {:.0} ms (budget {:.0}) | throttle {}%{eta}",
            p.round,
            mib(p.bytes_left as f64),
            mib(p.dirty_rate),
            mib(p.link_rate),
            p.predicted_downtime_ms,
            p.downtime_budget_ms,
            p.throttle
        ),
        (Phase::StopAndCopy, _) => "stop-and-copy: guest paused".into(),
        (Phase::Committing, _) => "committing: the destination verifies".into(),
        (Phase::Committed, _) => "commit sent: waiting for the destination's acknowledgement".into(),
        (Phase::Reconnecting, _) => format!(
            "link down, reconnecting (attempt {}, {:.0} s left of the resume window); {}",
            p.reconnect_attempt,
            p.resume_left_s,
            match p.awaiting_decision {
                true => "the commit is out: the VM stays paused here until the destination's decision is heard",
                false => "the VM runs on here",
            }
        ),
        (Phase::Postcopy, _) => format!(
            "post-copy: the guest runs at the destination; {} pages still to send, {} page requests served",
            p.postcopy_pages_left, p.faults_served
        ),
    }
}

fn print_postcopy(pc: &wanmig_migrate::report::PostcopyStats) {
    println!(
        "  post-copy ({}): {:.2} s from the switch, {} pages missing at the switch; {} requests served \
         ({} pages faulted), pages requested {} vs pushed {}",
        pc.reason,
        pc.postcopy_ms / 1e3,
        pc.missing_pages,
        pc.requests_served,
        pc.pages_faulted,
        pc.pages_requested,
        pc.pages_pushed
    );
    if let Some(d) = &pc.dest {
        let blocked: Vec<String> = d.vcpu_blocked_us.iter().map(|b| format!("{:.1} ms", *b as f64 / 1e3)).collect();
        println!(
            "  post-copy at the destination: {} faults, fault service p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
             {} duplicate pages; blocked per vCPU: [{}]",
            d.faults,
            d.service_p50_us as f64 / 1e3,
            d.service_p99_us as f64 / 1e3,
            d.service_max_us as f64 / 1e3,
            d.duplicates,
            blocked.join(", ")
        );
    }
}

fn print_summary(outcome: Outcome, s: &Summary) {
    let error = s.error.as_deref().unwrap_or("unknown error");
    match outcome {
        Outcome::Migrated => println!("migrated: the VM runs at the destination (migration {})", s.migration_id),
        Outcome::Synced => println!("synced: the destination holds a verified replica; the VM runs here"),
        Outcome::FailedSourceRunning if s.cancelled => {
            println!("CANCELLED, the VM still runs here; the destination discarded what it received: {error}")
        }
        Outcome::FailedSourceRunning => println!("FAILED, the VM still runs here: {error}"),
        Outcome::InDoubt => println!(
            "IN DOUBT: commit was sent but not acknowledged; the VM is paused here and may run at the destination              (`wanmig settle` asks it): {error}"
        ),
        Outcome::PostcopyLost => println!("POST-COPY LOST: {error}"),
    }
    if let Some(pc) = &s.postcopy {
        print_postcopy(pc);
    }
    if s.outages > 0 {
        println!(
            "  link outages ridden out: {} ({:.1} s down, {} sent again){}",
            s.outages,
            s.outage_ms / 1e3,
            mib(s.resent_bytes as f64),
            s.decided_on_resume
                .as_deref()
                .map(|d| format!("; the destination's answer to the resume: {d}"))
                .unwrap_or_default()
        );
    }
    println!(
        "  total {:.2} s, downtime {:.1} ms, {} pre-copy round(s), throttle up to {}%",
        s.total_ms / 1e3,
        s.downtime_ms,
        s.rounds,
        s.max_throttle
    );
    let b = &s.bytes;
    println!(
        "  on the wire: {} total, {} of pages (from {} before compression, ratio {:.1}), {:.1} KiB of state",
        mib(b.total as f64),
        mib(b.pages as f64),
        mib(b.pages_uncompressed as f64),
        s.compression_ratio,
        b.state as f64 / 1024.0
    );
    println!(
        "  pages: {} raw, {} delta, {} zero (never sent as data); {} of RAM at {}/s effective",
        b.raw_pages,
        b.delta_pages,
        b.zero_pages,
        mib(s.memory_bytes as f64),
        mib(s.effective_rate)
    );
    if let Some(d) = &s.disk {
        println!(
            "  disks: {} in {} disk(s), {} on the wire; {} chunks: {} sent ({}), {} already there, {} zero; dedup {}",
            mib(d.image_bytes as f64),
            d.disks,
            mib(b.disk as f64),
            d.chunks,
            d.chunks_sent,
            mib(d.chunk_bytes_sent as f64),
            d.chunks_present,
            d.zero_chunks,
            if d.chunk_bytes_sent > 0 {
                format!("{:.1}x", d.dedup_ratio)
            } else {
                "complete: every chunk was already there".into()
            },
        );
        if d.from_base > 0 {
            println!(
                "  {} disk(s) started from the destination's copy of the last sync: {} written since then sent instead of a first copy",
                d.from_base,
                mib(d.base_written_bytes as f64)
            );
        }
        println!(
            "  disk writes re-sent: {} ({} inside the downtime); first copy {:.2} s{}",
            mib(d.extent_bytes as f64),
            mib(d.final_bytes as f64),
            d.first_copy_ms / 1e3,
            d.write_limit
                .map(|l| format!("; guest disk writes throttled down to {}/s", mib(l as f64)))
                .unwrap_or_default()
        );
    }
    if !s.per_round.is_empty() {
        let wws: Vec<String> = s
            .per_round
            .iter()
            .map(|r| format!("{}: {} sent, {} dirtied in {:.0} ms", r.round, r.pages_sent, r.dirty_pages, r.ms))
            .collect();
        println!("  writable working set by round: {}", wws.join("; "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("300ms"), Ok(Duration::from_millis(300)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err() && parse_duration("-1s").is_err());
        assert_eq!(parse_bandwidth("200Mbit"), Ok(200_000_000));
        assert_eq!(parse_bandwidth("1Gbit/s"), Ok(1_000_000_000));
        assert_eq!(parse_bandwidth("1MiB"), Ok(8 * 1048576));
        assert!(parse_bandwidth("fast").is_err() && parse_bandwidth("0Mbit").is_err());
    }
}
