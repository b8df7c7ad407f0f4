//! `wanmig demo` and `wanmig verify`: the built-in test guest booted in one
//! process, snapshotted, restored in another, and checked by its oracle.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wanmig_control::protocol::{SaveSummary, TestGuestProgress};
use wanmig_control::{self as control, Request};
use wanmig_vmm::snapshot;
use wanmig_vmm::testguest::{self, MemoryReport};

/// What the oracle found in a snapshot.
pub struct Verified {
    memory: MemoryReport,
    disk_writes: Option<u64>,
}

impl fmt::Display for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.memory.status;
        write!(
            f,
            "oracle passed: {} pages hold their pattern; working set of {} pages at generation {} \
             ({} steps, one edge); guest saw 0 errors",
            self.memory.pages_checked, s.ws_pages, self.memory.generation, s.steps
        )?;
        if let Some(w) = self.disk_writes {
            write!(f, "; disk holds exactly writes 0..{w}")?;
        }
        Ok(())
    }
}

/// Checks a test-guest snapshot (and, if given, the disk image it writes).
pub fn verify(dir: &Path, disk: Option<&Path>) -> Result<Verified> {
    let (_, ram) = snapshot::load_for_inspection(dir).map_err(crate::chain)?;
    let memory = testguest::check_memory(ram.mem(), &ram.regions())?;
    let disk_writes = match disk {
        None => None,
        Some(p) => {
            let image = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
            Some(testguest::check_disk(&image, &memory.status)?)
        }
    };
    Ok(Verified { memory, disk_writes })
}

/// A VM behind a control socket, in a process we started.
struct VmProcess {
    child: Option<Child>,
    socket: PathBuf,
}

fn wanmig() -> Result<Command> {
    Ok(Command::new(std::env::current_exe().context("cannot find the wanmig binary")?))
}

impl VmProcess {
    fn start(args: &[&str], config: &Path) -> Result<Self> {
        let child =
            wanmig()?.args(args).arg(config).stdin(Stdio::null()).spawn().context("cannot start a wanmig process")?;
        Ok(VmProcess { child: Some(child), socket: wanmig_vmm::VmConfig::load(config)?.control_socket })
    }

    /// Polls the guest until `ready` holds for its progress.
    fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&TestGuestProgress) -> bool,
    ) -> Result<TestGuestProgress> {
        let socket = self.socket.clone();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                bail!("the VM process exited ({status}) while waiting for {what}");
            }
            if let Ok(r) = control::request(&socket, &Request::Status)
                && let Some(g) = r.status.and_then(|s| s.guest)
                && ready(&g)
            {
                return Ok(g);
            }
            if start.elapsed() > timeout {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn snapshot_and_stop(mut self, dir: &Path) -> Result<SaveSummary> {
        let socket = self.socket.clone();
        let r = control::request(&socket, &Request::Snapshot { dir: dir.into(), resume: false })?;
        control::request(&socket, &Request::Shutdown { force: false })?;
        if let Some(c) = &mut self.child {
            c.wait()?;
        }
        r.save.context("no save figures")
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child
            && matches!(c.try_wait(), Ok(None))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the demo in `dir` (or a temporary directory): a live migration
/// between two processes, or with `snapshot`, a save and restore.
pub fn run(dir: Option<PathBuf>, snapshot: bool) -> Result<()> {
    let tmp;
    let dir = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            std::path::absolute(d)?
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let config = dir.join("vm.toml");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    std::fs::write(
        &config,
        "name = \"demo\"\nmemory_mib = 256\nvcpus = 1\nserial = \"serial.log\"\n\
         [guest]\nkind = \"test\"\nws_mib = 16\nrate_mib = 8\ndisk_kib = 64\ndisk_mib = 4\n\
         [[disk]]\npath = \"disk.img\"\n",
    )?;
    println!("demo: in {}", dir.display());
    if snapshot { snapshot_restore(&dir, &config, &disk) } else { migrate(&dir, &config, &disk) }
}

/// Boots the guest, live-migrates it to a second process over loopback
/// QUIC, and checks it at the destination.
fn migrate(dir: &Path, config: &Path, disk: &Path) -> Result<()> {
    let src_id = wanmig_transport::Identity::create(&dir.join("src-id"), "source")?.fingerprint().to_string();
    let dst_id = wanmig_transport::Identity::create(&dir.join("dst-id"), "destination")?.fingerprint().to_string();
    println!("demo: 1. booting the test guest (256 MiB, 16 MiB working set at 8 MiB/s, 64 KiB/s of disk writes)");
    let mut source = VmProcess::start(&["run"], config)?;
    source.wait_for("the guest to stamp its memory", Duration::from_secs(300), |g| g.phase == 2)?;
    let before = source.wait_for("the guest to make progress", Duration::from_secs(60), |g| g.ticks >= 100)?;
    println!("demo:    running: {} working-set steps, {} disk writes", before.steps, before.disk_done);

    println!("demo: 2. starting a destination process (wanmig receive) on loopback, with its own disk directory");
    let dst_dir = dir.join("dst");
    let mut receiver = wanmig()?
        .args(["receive", "--listen", "127.0.0.1:0"])
        .arg("--identity")
        .arg(dir.join("dst-id"))
        .args(["--peer", &src_id, "--dir"])
        .arg(&dst_dir)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let addr = listening_addr(&mut receiver)?;
    let destination = VmProcess { child: Some(receiver), socket: dst_dir.join("wanmig-demo.sock") };

    println!("demo: 3. wanmig send vm.toml {addr}");
    let status = wanmig()?
        .arg("send")
        .arg(config)
        .arg(&addr)
        .arg("--identity")
        .arg(dir.join("src-id"))
        .args(["--peer", &dst_id])
        .status()?;
    if !status.success() {
        bail!("the migration failed ({status})");
    }
    let mut destination = destination;
    let after = destination.wait_for("the guest to continue at the destination", Duration::from_secs(60), |g| {
        g.steps > before.steps + 2000
    })?;
    println!(
        "demo: 4. the guest continues at the destination: steps {} -> {}, disk writes {} -> {}, guest errors {}",
        before.steps, after.steps, before.disk_done, after.disk_done, after.errors
    );
    let snap = dir.join("after");
    destination.snapshot_and_stop(&snap)?;
    // The guest writes its disk at the destination now: its own copy.
    let copied = dst_dir.join(disk.file_name().context("the disk has a file name")?);
    println!("demo:    saved there and checked (disk {}): {}", copied.display(), verify(&snap, Some(&copied))?);
    drop(source);
    println!("demo: done");
    Ok(())
}

/// Reads the destination's stderr until it says where it listens; the rest
/// of its output goes on to ours.
fn listening_addr(child: &mut Child) -> Result<String> {
    use std::io::BufRead;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("wanmig receive: listening on ") {
                let _ = tx.send(a.to_string());
            }
            eprintln!("{line}");
        }
    });
    rx.recv_timeout(Duration::from_secs(30)).context("the destination did not start listening")
}

/// Boots the guest, saves it, restores it in a second process, and checks
/// both snapshots.
fn snapshot_restore(dir: &Path, config: &Path, disk: &Path) -> Result<()> {
    let (config, disk) = (config.to_path_buf(), disk.to_path_buf());
    println!("demo: 1. booting the test guest (256 MiB, 16 MiB working set at 8 MiB/s, 64 KiB/s of disk writes)");
    let mut source = VmProcess::start(&["run"], &config)?;
    let booted = source.wait_for("the guest to stamp its memory", Duration::from_secs(300), |g| g.phase == 2)?;
    let before =
        source.wait_for("the guest to make progress", Duration::from_secs(60), |g| g.ticks >= booted.ticks + 200)?;
    println!("demo:    running: {} working-set steps, {} disk writes", before.steps, before.disk_done);

    let snap1 = dir.join("snap1");
    let s = source.snapshot_and_stop(&snap1)?;
    println!(
        "demo: 2. paused and saved in process 1 (pause {:.1} ms, state {:.1} ms, memory {:.1} ms), process 1 stopped",
        s.pause_ms, s.state_ms, s.memory_ms
    );
    let v1 = verify(&snap1, Some(&disk))?;
    println!("demo:    {v1}");

    println!("demo: 3. restoring in a new process");
    let mut restored = VmProcess::start(&["restore", "--from", &snap1.to_string_lossy()], &config)?;
    let at = v1.memory.status;
    let after = restored.wait_for("the restored guest to continue", Duration::from_secs(120), |g| {
        g.steps > at.steps + 1000 && g.disk_done > at.disk_done + 8
    })?;
    println!(
        "demo:    continuing: steps {} -> {}, disk writes {} -> {}, guest errors {}",
        at.steps, after.steps, at.disk_done, after.disk_done, after.errors
    );
    let snap2 = dir.join("snap2");
    restored.snapshot_and_stop(&snap2)?;
    let v2 = verify(&snap2, Some(&disk))?;
    println!("demo: 4. saved again and checked: {v2}");
    if v2.memory.status.steps <= at.steps {
        bail!("the restored guest did not make progress");
    }
    println!("demo: done: the guest continued in a new process with no lost or stale page and an exact disk");
    Ok(())
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let base = std::env::temp_dir().join(format!("wanmig-demo-{}", std::process::id()));
        std::fs::create_dir_all(&base)?;
        Ok(TempDir(base))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
