//! Benchmark: post-copy. Prints, for a 128 MiB test guest whose pages do
//! not compress (`mem_entropy = 100`):
//!
//! - `--postcopy now` through the link emulator (`wanmig-linkem`, two
//!   network namespaces, 200 Mbit/s, no loss) at 1 ms and at 50 ms RTT:
//!   total time, post-copy time, faults, fault service time p50/p99/max at
//!   the destination, time the vCPU spent blocked, pages requested vs.
//!   pushed;
//! - the same guest under QEMU (`-accel kvm`, microvm) with its
//!   `postcopy-ram`, switched at once (`migrate-start-postcopy`), over the
//!   same emulated links: total time, downtime, page requests, and the
//!   destination's `postcopy-blocktime`;
//! - on loopback capped at 20 Mbit/s, the same flat-out guest with
//!   `--postcopy auto` (hybrid) and `--postcopy off` (pre-copy with
//!   auto-converge): total time, downtime, rounds, highest throttle.
//!
//! `cargo bench -p wanmig --bench postcopy` (needs root for the network
//! namespaces, and /dev/kvm; `WANMIG_BENCH_ONLY=wan|qemu|hybrid` runs one
//! part). On a shared 2-core machine a release build
//! is long; `--profile dev` runs the same scenarios with the debug binary.

#[allow(dead_code)]
#[path = "../../tests/integration/harness.rs"]
mod harness;

use std::time::Duration;

use harness::{Keys, Receiver, VmDir, VmProcess, wanmig_in};
use wanmig_linkem::{LinkConfig, LinkParams, WanPair};

/// Runs `send` with `args`; returns the JSON answer.
fn send(netns: Option<&str>, vm: &VmDir, dest: &str, keys: &Keys, args: &[&str]) -> serde_json::Value {
    let out = wanmig_in(netns)
        .arg("send")
        .arg(&vm.config)
        .arg(dest)
        .arg("--identity")
        .arg(&keys.src)
        .args(["--peer", &keys.dst_fp, "--json"])
        .args(args)
        .output()
        .expect("send");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("send printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// `--postcopy now` across the emulated WAN at `rtt`.
fn across(tag: &str, rtt: Duration) {
    let params = LinkParams::wan(200_000_000, rtt);
    let wan = WanPair::new(tag, LinkConfig::symmetric(params).with_seed(7)).expect("the emulated WAN (root)");
    let vm = VmDir::new(128, 1, "ws_mib = 32\nrate_mib = 16\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run_in(&vm, wan.a().name());
    src.wait_for("the guest to run", Duration::from_secs(300), |g| g.phase == 2 && g.steps > 1000);
    let listen = format!("{}:0", wan.addr_b());
    let shared = vm.dir.path().to_path_buf();
    let args = [std::ffi::OsStr::new("--shared-disks"), shared.as_os_str()];
    let dst = Receiver::start_at(wan.b().name(), &listen, &keys, &keys.src_fp, &vm.path("dst"), &args);
    let rtt_ms = format!("{}ms", rtt.as_millis());
    let v = send(
        Some(wan.a().name()),
        &vm,
        &dst.addr,
        &keys,
        &["--postcopy", "now", "--link-bandwidth", "200Mbit", "--rtt", &rtt_ms],
    );
    let s = &v["summary"];
    let pc = &s["postcopy"];
    let d = &pc["dest"];
    let blocked: f64 = d["vcpu_blocked_us"].as_array().map_or(0.0, |a| a.iter().map(f).sum());
    println!(
        "{:<22} {:>9} {:>8.2} {:>9.2} {:>8.1} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8} {:>8}",
        format!("now, RTT {rtt_ms}"),
        v["outcome"].as_str().unwrap_or("?"),
        f(&s["total_ms"]) / 1e3,
        f(&pc["postcopy_ms"]) / 1e3,
        f(&s["downtime_ms"]),
        d["faults"],
        f(&d["service_p50_us"]) / 1e3,
        f(&d["service_p99_us"]) / 1e3,
        f(&d["service_max_us"]) / 1e3,
        blocked / 1e6,
        d["requested"],
        d["pushed"],
    );
    drop(dst);
}

/// The flat-out guest over loopback capped at 20 Mbit/s, with `mode`.
fn flat_out(mode: &str) {
    let vm = VmDir::new(128, 1, "ws_mib = 32\nflat_out = true\nmem_entropy = 100");
    let keys = Keys::new(vm.dir.path());
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(300), |g| g.phase == 2 && g.steps > 10_000);
    let dst = Receiver::start(&keys, &keys.src_fp, &vm.path("dst"), &[]);
    let v = send(None, &vm, &dst.addr, &keys, &["--postcopy", mode, "--max-bandwidth", "20Mbit", "--timeout", "300s"]);
    let s = &v["summary"];
    let pc = &s["postcopy"];
    println!(
        "{:<22} {:>9} {:>8.2} {:>9.2} {:>8.1} {:>7} {:>9}%  wire {:.1} MiB{}",
        format!("{mode}, 20 Mbit"),
        v["outcome"].as_str().unwrap_or("?"),
        f(&s["total_ms"]) / 1e3,
        f(&pc["postcopy_ms"]) / 1e3,
        f(&s["downtime_ms"]),
        s["rounds"],
        s["max_throttle"],
        f(&s["bytes"]["total"]) / 1048576.0,
        match pc["reason"].as_str() {
            Some(r) => format!("; switched: {r}"),
            None => String::new(),
        }
    );
}

fn main() {
    harness::require_kvm();
    println!(
        "{:<22} {:>9} {:>8} {:>9} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}",
        "scenario",
        "outcome",
        "total s",
        "postcopy",
        "down ms",
        "faults",
        "p50 ms",
        "p99 ms",
        "max ms",
        "blocked s",
        "asked",
        "pushed"
    );
    // `WANMIG_BENCH_ONLY=wan` or `=hybrid` runs one half.
    let only = std::env::var("WANMIG_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "wan" {
        across("pcb1", Duration::from_millis(1));
        across("pcb50", Duration::from_millis(50));
    }
    if only.is_empty() || only == "qemu" {
        println!(
            "{:<22} {:>9} {:>8} {:>8} {:>9} {:>10} {:>12}",
            "QEMU postcopy-ram", "status", "total s", "down ms", "requests", "blocktime", "vCPU blocked"
        );
        qemu::postcopy("pcq1", Duration::from_millis(1));
        qemu::postcopy("pcq50", Duration::from_millis(50));
    }
    if !only.is_empty() && only != "hybrid" {
        return;
    }
    println!(
        "{:<22} {:>9} {:>8} {:>9} {:>8} {:>7} {:>10}",
        "scenario", "outcome", "total s", "postcopy", "down ms", "rounds", "throttle"
    );
    flat_out("auto");
    flat_out("off");
}

/// QEMU's post-copy of the same test guest, driven over QMP.
mod qemu {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};
    use wanmig_linkem::{LinkConfig, LinkParams, WanPair};

    /// A QMP connection.
    struct Qmp {
        r: BufReader<UnixStream>,
        w: UnixStream,
    }

    impl Qmp {
        fn connect(path: &Path) -> Self {
            let deadline = Instant::now() + Duration::from_secs(30);
            let s = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => panic!("QMP at {}: {e}", path.display()),
                }
            };
            let mut q = Qmp { r: BufReader::new(s.try_clone().expect("clone")), w: s };
            let mut greeting = String::new();
            q.r.read_line(&mut greeting).expect("QMP greeting");
            q.run("qmp_capabilities", json!({}));
            q
        }

        /// Runs `cmd`; its `return` (events in between are skipped).
        fn run(&mut self, cmd: &str, args: Value) -> Value {
            let msg = json!({ "execute": cmd, "arguments": args });
            writeln!(self.w, "{msg}").expect("QMP write");
            loop {
                let mut line = String::new();
                assert!(self.r.read_line(&mut line).expect("QMP read") > 0, "QMP closed during {cmd}");
                let v: Value = serde_json::from_str(&line).expect("QMP JSON");
                if let Some(r) = v.get("return") {
                    return r.clone();
                }
                if let Some(e) = v.get("error") {
                    panic!("QMP {cmd}: {e}");
                }
            }
        }
    }

    fn qemu(netns: &str, dir: &Path, name: &str, guest: &Path, incoming: bool) -> Child {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns, "qemu-system-x86_64", "-M", "microvm", "-accel", "kvm", "-m", "128"])
            .args(["-display", "none", "-no-reboot", "-serial"])
            .arg(format!("file:{}", dir.join(format!("{name}.serial")).display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dir.join(format!("{name}.qmp")).display()))
            .arg("-kernel")
            .arg(guest)
            .args(["-append", "ws_mib=32 rate_mib=16 mem_entropy=100 mmio=0xfeb00000 mmio_stride=0x200 mmio_count=24"]);
        if incoming {
            c.args(["-incoming", "defer"]);
        }
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("qemu-system-x86_64")
    }

    pub fn postcopy(tag: &str, rtt: Duration) {
        let params = LinkParams::wan(200_000_000, rtt);
        let wan = WanPair::new(tag, LinkConfig::symmetric(params).with_seed(7)).expect("the emulated WAN (root)");
        let dir = tempfile::tempdir().expect("tmp");
        let guest = dir.path().join("guest.elf");
        std::fs::write(&guest, wanmig_vmm::testguest::IMAGE).expect("guest");
        let _running = Kill(vec![
            qemu(wan.a().name(), dir.path(), "src", &guest, false),
            qemu(wan.b().name(), dir.path(), "dst", &guest, true),
        ]);
        let serial = dir.path().join("src.serial");
        // The guest computes its incompressible pool first: long on a
        // loaded machine.
        let deadline = Instant::now() + Duration::from_secs(600);
        // Its progress lines ("wanmig-testguest: t=Ns ...") come every few
        // seconds: wait until one says 3 s or more.
        let ran = |log: &str| {
            log.lines()
                .filter_map(|l| l.strip_prefix("wanmig-testguest: t=")?.split('s').next()?.parse::<u64>().ok())
                .any(|t| t >= 3)
        };
        while !ran(&std::fs::read_to_string(&serial).unwrap_or_default()) {
            assert!(Instant::now() < deadline, "the guest under QEMU never ran 3 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut qs = Qmp::connect(&dir.path().join("src.qmp"));
        let mut qd = Qmp::connect(&dir.path().join("dst.qmp"));
        let caps = |blocktime: bool| {
            let mut c = vec![json!({ "capability": "postcopy-ram", "state": true })];
            if blocktime {
                c.push(json!({ "capability": "postcopy-blocktime", "state": true }));
            }
            json!({ "capabilities": c })
        };
        qs.run("migrate-set-capabilities", caps(false));
        qd.run("migrate-set-capabilities", caps(true));
        let uri = format!("tcp:{}:4446", wan.addr_b());
        qd.run("migrate-incoming", json!({ "uri": uri }));
        let started = Instant::now();
        qs.run("migrate", json!({ "uri": uri }));
        // Switch as soon as the migration runs (`--postcopy now`).
        loop {
            let st = qs.run("query-migrate", json!({}));
            match st["status"].as_str() {
                Some("active") => break,
                Some("failed") => panic!("QEMU's migration failed: {st}"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        qs.run("migrate-start-postcopy", json!({}));
        let st = loop {
            let st = qs.run("query-migrate", json!({}));
            match st["status"].as_str() {
                Some("completed") => break st,
                Some("failed") | Some("cancelled") => panic!("QEMU's migration failed: {st}"),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let elapsed = started.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let d = qd.run("query-migrate", json!({}));
        let blocked: Vec<String> = d["postcopy-vcpu-blocktime"]
            .as_array()
            .map(|a| a.iter().map(|b| format!("{} ms", b)).collect())
            .unwrap_or_default();
        println!(
            "{:<22} {:>9} {:>8.2} {:>8} {:>9} {:>7} ms {:>12}",
            format!("QEMU, RTT {} ms", rtt.as_millis()),
            st["status"].as_str().unwrap_or("?"),
            elapsed.as_secs_f64(),
            st["downtime"],
            st["ram"]["postcopy-requests"],
            d["postcopy-blocktime"],
            blocked.join(", ")
        );
    }

    /// QEMU processes, killed however the scenario ends.
    struct Kill(Vec<Child>);

    impl Drop for Kill {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
