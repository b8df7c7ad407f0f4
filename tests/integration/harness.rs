//! Running `wanmig` processes around a test guest, and waiting on them.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use wanmig_vmm::control::{self, Request, TestGuestProgress};

/// The `wanmig` binary under test.
pub fn wanmig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wanmig"))
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
        let dir = tempfile::Builder::new().prefix("wanmig-it-").tempdir().expect("tempdir");
        let config = dir.path().join("vm.toml");
        let disk = dir.path().join("disk.img");
        std::fs::File::create(&disk).expect("create disk").set_len(8 << 20).expect("size disk");
        let text = format!(
            "name = \"it\"\nmemory_mib = {memory_mib}\nvcpus = {vcpus}\nserial = \"serial.log\"\n\
             [guest]\nkind = \"test\"\n{guest}\n[[disk]]\npath = \"disk.img\"\n"
        );
        std::fs::write(&config, text).expect("write vm.toml");
        VmDir { dir, config, disk }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("wanmig-it.sock")
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }
}

/// A `wanmig run` or `wanmig restore` process, killed on drop.
pub struct VmProcess {
    child: Child,
    socket: PathBuf,
}

impl VmProcess {
    pub fn run(vm: &VmDir) -> Self {
        Self::spawn(vm, &["run"])
    }

    pub fn restore(vm: &VmDir, snapshot: &Path) -> Self {
        Self::spawn(vm, &["restore", "--from", snapshot.to_str().expect("utf-8 path")])
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
        let child = wanmig()
            .args(args)
            .arg(&vm.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wanmig");
        VmProcess { child, socket: vm.socket() }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn request(&self, req: &Request) -> control::Response {
        control::request(&self.socket, req).unwrap_or_else(|e| panic!("{req:?}: {}", control::error_chain(&e)))
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
            if let Some(status) = self.child.try_wait().expect("try_wait") {
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

    /// Pauses and saves to `dir`; the process keeps serving, paused.
    pub fn snapshot(&self, dir: &Path) -> control::SaveSummary {
        self.request(&Request::Snapshot { dir: dir.into(), resume: false }).save.expect("save figures")
    }

    pub fn shutdown(mut self) -> ExitStatus {
        self.request(&Request::Shutdown);
        self.child.wait().expect("wait")
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `wanmig` to completion; returns (exit code, stderr).
pub fn run_to_end(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = wanmig().args(args).stdin(Stdio::null()).output().expect("run wanmig");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}
