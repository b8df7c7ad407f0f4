//! Running `wanmig` processes around a test guest, and waiting on them.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wanmig_control::protocol::{MigrateRequest, TestGuestProgress};
use wanmig_control::{self as control, Request};
use wanmig_vmm::{snapshot, testguest};

/// Another build of `wanmig` to run instead of this one: a benchmark sets
/// it to compare a baseline with the build under test side by side.
pub static BINARY: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The `wanmig` binary: the one under test unless [`BINARY`] names another.
fn binary() -> PathBuf {
    let chosen = BINARY.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    chosen.unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_wanmig")))
}

/// The `wanmig` binary under test.
pub fn wanmig() -> Command {
    Command::new(binary())
}

/// The `wanmig` binary under test, run inside network namespace `netns`
/// (`ip netns exec`, which execs it: the child's pid is wanmig's) when one
/// is given.
pub fn wanmig_in(netns: Option<&str>) -> Command {
    match netns {
        None => wanmig(),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(binary());
            c
        }
    }
}

/// Fails loudly when there is no KVM: these tests must run, not skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the KVM integration tests cannot run on this machine"
    );
}

/// A directory with a vm.toml and a zeroed disk image.
pub struct VmDir {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub disk: PathBuf,
}

impl VmDir {
    /// `guest` is the body of the `[guest]` table after `kind = "test"`.
    pub fn new(memory_mib: u64, vcpus: u8, guest: &str) -> Self {
        Self::with_extra(memory_mib, vcpus, guest, "")
    }

    /// As [`VmDir::new`], with `extra` (more tables, such as `[[net]]`)
    /// appended to vm.toml.
    pub fn with_extra(memory_mib: u64, vcpus: u8, guest: &str, extra: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("wanmig-it-").tempdir().expect("tempdir");
        let config = dir.path().join("vm.toml");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk).expect("create disk").set_len(8 << 20).expect("size disk");
        let text = format!(
            "name = \"it\"\nmemory_mib = {memory_mib}\nvcpus = {vcpus}\nserial = \"serial.log\"\n\
             [guest]\nkind = \"test\"\n{guest}\n[[disk]]\npath = \"disk.img\"\n{extra}"
        );
        std::fs::write(&config, text).expect("write vm.toml");
        VmDir { dir, config, disk }
    }

    /// A VM named "it" whose vm.toml is the given body (after `name`),
    /// with the console in `serial.log` and no disk.
    pub fn with_toml(body: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("wanmig-it-").tempdir().expect("tempdir");
        let config = dir.path().join("vm.toml");
        let text = format!("name = \"it\"\nserial = \"serial.log\"\n{body}\n");
        std::fs::write(&config, text).expect("write vm.toml");
        let disk = dir.path().join("no-disk");
        VmDir { dir, config, disk }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Waits until the console holds `needle`; returns the console so far.
    pub fn wait_serial(&self, vm: &mut VmProcess, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let serial = self.serial();
            if serial.contains(needle) {
                return serial;
            }
            if let Some(status) = vm.exited() {
                panic!("wanmig exited ({status}) before the console showed {needle:?}: {}\n{serial}", vm.stderr());
            }
            assert!(start.elapsed() < timeout, "no {needle:?} on the console after {timeout:?}:\n{serial}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.path("wanmig-it.sock")
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }
}

/// A `wanmig run` or `wanmig restore` process, killed on drop — or, made
/// with [`VmProcess::at_socket`], a VM served by a process we did not start.
pub struct VmProcess {
    child: Option<Child>,
    socket: PathBuf,
}

impl VmProcess {
    pub fn run(vm: &VmDir) -> Self {
        Self::spawn(vm, &["run"])
    }

    /// `wanmig run` inside network namespace `netns`.
    pub fn run_in(vm: &VmDir, netns: &str) -> Self {
        Self::spawn_in(Some(netns), vm, &["run"])
    }

    pub fn restore(vm: &VmDir, snapshot: &Path) -> Self {
        Self::spawn(vm, &["restore", "--from", snapshot.to_str().expect("utf-8 path")])
    }

    /// `wanmig restore` inside network namespace `netns`.
    pub fn restore_in(vm: &VmDir, snapshot: &Path, netns: &str) -> Self {
        Self::spawn_in(Some(netns), vm, &["restore", "--from", snapshot.to_str().expect("utf-8 path")])
    }

    /// Restored and left paused.
    pub fn restore_paused(vm: &VmDir, snapshot: &Path) -> Self {
        let p = Self::spawn(vm, &["restore", "--paused", "--from", snapshot.to_str().expect("utf-8 path")]);
        // Wait until it serves its socket.
        let start = Instant::now();
        while control::request(&p.socket, &Request::Status).is_err() {
            assert!(start.elapsed() < Duration::from_secs(60), "restored VM never served its socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        p
    }

    fn spawn(vm: &VmDir, args: &[&str]) -> Self {
        Self::spawn_in(None, vm, args)
    }

    /// `wanmig run` with `env` set (e.g. a failpoint).
    pub fn run_with_env(vm: &VmDir, env: &[(&str, &str)]) -> Self {
        Self::spawn_with(None, vm, &["run"], env)
    }

    fn spawn_in(netns: Option<&str>, vm: &VmDir, args: &[&str]) -> Self {
        Self::spawn_with(netns, vm, args, &[])
    }

    fn spawn_with(netns: Option<&str>, vm: &VmDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        let child = wanmig_in(netns)
            .args(args)
            .envs(env.iter().copied())
            .arg(&vm.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wanmig");
        VmProcess { child: Some(child), socket: vm.socket() }
    }

    /// A handle on a VM served by another process (a destination).
    pub fn at_socket(socket: PathBuf) -> Self {
        VmProcess { child: None, socket }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait"))
    }

    pub fn request(&self, req: &Request) -> control::Response {
        control::request(&self.socket, req).unwrap_or_else(|e| panic!("{req:?}: {}", wanmig_types::error_chain(&e)))
    }

    pub fn progress(&self) -> Option<TestGuestProgress> {
        control::request(&self.socket, &Request::Status).ok()?.status?.guest
    }

    /// Polls the guest's progress until `ready`, failing with the process's
    /// stderr if it dies.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&TestGuestProgress) -> bool,
    ) -> TestGuestProgress {
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                panic!("wanmig exited ({status}) waiting for {what}: {}", self.stderr());
            }
            if let Some(p) = self.progress()
                && ready(&p)
            {
                return p;
            }
            assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls progress (for a VM whose process is not ours).
    pub fn wait_for_progress(
        &self,
        timeout: Duration,
        ready: impl Fn(&TestGuestProgress) -> bool,
    ) -> TestGuestProgress {
        let start = Instant::now();
        loop {
            if let Some(p) = self.progress()
                && ready(&p)
            {
                return p;
            }
            assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pauses and saves to `dir`; the process keeps serving, paused.
    pub fn snapshot(&self, dir: &Path) -> wanmig_control::protocol::SaveSummary {
        self.request(&Request::Snapshot { dir: dir.into(), resume: false }).save.expect("save figures")
    }

    /// Shuts the VM down; returns its process's exit status (success if
    /// it is not our child).
    pub fn shutdown(mut self) -> ExitStatus {
        self.request(&Request::Shutdown { force: false });
        match self.child.take() {
            Some(mut c) => c.wait().expect("wait"),
            None => std::os::unix::process::ExitStatusExt::from_raw(0),
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(start.elapsed() < timeout, "the process did not exit within {timeout:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the process wrote to stderr (once it has exited; blocks until then).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.as_mut().and_then(|c| c.stderr.take()) {
            let _ = e.read_to_string(&mut s);
        }
        s
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

/// Runs `wanmig` to completion; returns (exit code, stderr).
pub fn run_to_end(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = wanmig().args(args).stdin(Stdio::null()).output().expect("run wanmig");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Checks the guest through a snapshot in `dir`: memory oracle, and disk
/// oracle on the image at `disk`.
pub fn check_guest(vm: &VmProcess, dir: &Path, disk: &Path) -> testguest::MemoryReport {
    vm.snapshot(dir);
    let (_, ram) = snapshot::load_for_inspection(dir).expect("snapshot");
    let m = testguest::check_memory(ram.mem(), &ram.regions()).expect("memory oracle");
    let image = std::fs::read(disk).expect("disk");
    testguest::check_disk(&image, &m.status).expect("disk oracle");
    m
}

/// A `migrate` request from `keys.src` to `dest` with the defaults of
/// `wanmig send` (300 ms downtime budget) but a 120 s timeout and no
/// resume window (a test that kills the destination wants the failure at
/// once; the resume tests set their own window).
pub fn migrate_request(dest: &str, keys: &Keys, store: Option<&Path>, sync: bool) -> Request {
    Request::Migrate {
        migration: MigrateRequest {
            dest: dest.to_string(),
            identity: keys.src.clone(),
            peer: keys.dst_fp.clone(),
            downtime_ms: 300,
            max_bandwidth_bps: None,
            min_bandwidth_bps: None,
            timeout_s: 120,
            link_bandwidth_bps: None,
            rtt_ms: None,
            store: store.map(Path::to_path_buf),
            sync,
            tunnel: None,
            resume_window_s: 0,
            postcopy: wanmig_migrate::source::options::PostcopyMode::Off,
            commit_after_ready: false,
        },
    }
}

/// `wanmig send` of `config` to `dest` with `--json` and `extra` options,
/// started (its output captured).
pub fn send_child(config: &Path, dest: &str, keys: &Keys, extra: &[&str]) -> Child {
    wanmig()
        .arg("send")
        .arg(config)
        .arg(dest)
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn wanmig send")
}

/// A [`send_child`]'s exit code, its JSON summary and its stderr.
pub fn finish_send(child: Child) -> (i32, wanmig_migrate::report::Summary, String) {
    let out = child.wait_with_output().expect("send ends");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|e| panic!("no JSON from send ({e}): {stdout}\n{stderr}"));
    let summary = serde_json::from_value(v["summary"].clone()).expect("a summary");
    (out.status.code().unwrap_or(-1), summary, stderr)
}

/// Makes `disk` `size` bytes long and fills the MiBs of `mibs` with
/// xorshift output from `seed`: data that neither compresses nor dedups.
pub fn fill_incompressible(disk: &Path, size: u64, mibs: std::ops::Range<u64>, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(disk).expect("disk");
    f.set_len(size).expect("size");
    let mut x = seed;
    for mib in mibs {
        let block: Vec<u8> = (0..1 << 17)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        f.write_all_at(&block, mib << 20).expect("fill");
    }
}

/// Identities for a source and a destination, in `dir`.
pub struct Keys {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub src_fp: String,
    pub dst_fp: String,
}

impl Keys {
    pub fn new(dir: &Path) -> Self {
        let keygen = |name: &str| {
            let d = dir.join(name);
            let out = wanmig().args(["keygen", "--dir"]).arg(&d).output().expect("keygen");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            (d, String::from_utf8(out.stdout).expect("utf-8").trim().to_string())
        };
        let (src, src_fp) = keygen("src-id");
        let (dst, dst_fp) = keygen("dst-id");
        Keys { src, dst, src_fp, dst_fp }
    }
}

/// A `wanmig receive` process; its stderr is collected as it runs.
pub struct Receiver {
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    pub addr: String,
}

impl Receiver {
    /// Starts a destination trusting `peer`, with `env` set, in `dir`; disks
    /// are shared from the directory above it.
    pub fn start(keys: &Keys, peer: &str, dir: &Path, env: &[(&str, &str)]) -> Self {
        let shared = dir.parent().unwrap_or(dir); // the VM's directory, where its disk is
        Self::start_with(None, "127.0.0.1:0", keys, peer, dir, &[OsStr::new("--shared-disks"), shared.as_os_str()], env)
    }

    /// As [`Receiver::start`], inside network namespace `netns`.
    pub fn start_in(netns: &str, keys: &Keys, peer: &str, dir: &Path) -> Self {
        let shared = dir.parent().unwrap_or(dir);
        let shared = [OsStr::new("--shared-disks"), shared.as_os_str()];
        Self::start_with(Some(netns), "127.0.0.1:0", keys, peer, dir, &shared, &[])
    }

    /// A destination in network namespace `netns` listening on `listen`,
    /// with extra `args`.
    pub fn start_at(netns: &str, listen: &str, keys: &Keys, peer: &str, dir: &Path, args: &[&OsStr]) -> Self {
        Self::start_with(Some(netns), listen, keys, peer, dir, args, &[])
    }

    /// Starts a destination that copies disks (into `dir`, with its chunk
    /// store in `dir/chunks` unless `args` say otherwise).
    pub fn copying(keys: &Keys, peer: &str, dir: &Path, args: &[&OsStr]) -> Self {
        Self::start_with(None, "127.0.0.1:0", keys, peer, dir, args, &[])
    }

    /// As [`Receiver::start`] (shared disks), listening on `listen` (e.g.
    /// the address of one that was killed).
    pub fn start_at_addr(listen: &str, keys: &Keys, peer: &str, dir: &Path) -> Self {
        let shared = dir.parent().unwrap_or(dir);
        Self::start_with(None, listen, keys, peer, dir, &[OsStr::new("--shared-disks"), shared.as_os_str()], &[])
    }

    /// As [`Receiver::copying`], listening on `listen` (e.g. the address
    /// of one that was killed).
    pub fn copying_at(listen: &str, keys: &Keys, peer: &str, dir: &Path, args: &[&OsStr]) -> Self {
        Self::start_with(None, listen, keys, peer, dir, args, &[])
    }

    fn start_with(
        netns: Option<&str>,
        listen: &str,
        keys: &Keys,
        peer: &str,
        dir: &Path,
        args: &[&OsStr],
        env: &[(&str, &str)],
    ) -> Self {
        use std::io::BufRead;
        let mut child = wanmig_in(netns)
            .args(["receive", "--listen", listen])
            .args(args)
            .arg("--identity")
            .arg(&keys.dst)
            .args(["--peer", peer, "--dir"])
            .arg(dir)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wanmig receive");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("wanmig receive: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                let mut l = sink.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(30)).expect("the destination listens");
        Receiver { child, log, addr }
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.log().contains(needle) {
            assert!(start.elapsed() < timeout, "destination never logged `{needle}`: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}
