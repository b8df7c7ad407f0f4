//! Bad input through the command line: every refusal is a clear message and
//! an ordinary failure exit, never a panic.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use wanmig_vmm::snapshot::{MEMORY_FILE, STATE_FILE};

use crate::harness::{VmDir, VmProcess, require_kvm, run_to_end};

fn restore_error(vm: &VmDir, snap: &Path) -> String {
    let (code, stderr) =
        run_to_end(&[OsStr::new("restore"), OsStr::new("--from"), snap.as_os_str(), vm.config.as_os_str()]);
    assert_eq!(code, 1, "restore should fail cleanly: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn corrupt_snapshots_are_refused_clearly() {
    require_kvm();
    let vm = VmDir::new(32, 1, "ws_mib = 1");
    let mut src = VmProcess::run(&vm);
    src.wait_for("the guest to run", Duration::from_secs(120), |g| g.phase == 2);
    let good = vm.path("good");
    src.snapshot(&good);
    assert!(src.shutdown().success());
    let state = std::fs::read(good.join(STATE_FILE)).expect("read state");

    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let dir = vm.path(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::copy(good.join(MEMORY_FILE), dir.join(MEMORY_FILE)).expect("copy memory");
        let mut s = state.clone();
        edit(&mut s);
        std::fs::write(dir.join(STATE_FILE), s).expect("write state");
        restore_error(&vm, &dir)
    };
    assert!(variant("truncated", &|s| s.truncate(s.len() / 2)).contains("truncated"));
    assert!(variant("empty", &|s| s.clear()).contains("truncated"));
    assert!(variant("magic", &|s| s[0] = b'X').contains("bad magic"));
    assert!(variant("version", &|s| s[8] = 9).contains("version 9 is not supported"));
    assert!(variant("huge", &|s| s[12..20].copy_from_slice(&(1u64 << 40).to_le_bytes())).contains("exceeds the limit"));
    assert!(
        variant("checksum", &|s| {
            let mid = s.len() / 2;
            s[mid] ^= 1;
        })
        .contains("checksum mismatch")
    );

    // A memory file of the wrong size.
    let short = vm.path("short-memory");
    std::fs::create_dir_all(&short).expect("mkdir");
    std::fs::write(short.join(STATE_FILE), &state).expect("write");
    std::fs::File::create(short.join(MEMORY_FILE)).expect("create").set_len(4096).expect("size");
    assert!(restore_error(&vm, &short).contains("memory file is 4096 bytes"));

    // A configuration whose shape differs from the snapshot's.
    let text = std::fs::read_to_string(&vm.config).expect("read config");
    std::fs::write(&vm.config, text.replace("memory_mib = 32", "memory_mib = 48")).expect("write");
    assert!(restore_error(&vm, &good).contains("does not match the configuration"));
}

#[test]
fn bad_configs_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.toml");
    for (text, key) in [
        ("name = \"x\"\nmemory_mib = 64\nmemroy = 1\n[guest]\nkind = \"test\"\n", "memroy"),
        ("name = \"x\"\nmemory_mib = 3\n[guest]\nkind = \"test\"\n", "memory_mib"),
        ("name = \"x\"\nmemory_mib = 64\nvcpus = 0\n[guest]\nkind = \"test\"\n", "vcpus"),
        ("name = \"x\"\nmemory_mib = 64\n[guest]\nkind = \"bsd\"\n", "bsd"),
        ("name = \"x\"\nmemory_mib = 64\n[guest\n", "TOML"),
    ] {
        std::fs::write(&path, text).expect("write");
        let (code, stderr) = run_to_end(&[OsStr::new("run"), path.as_os_str()]);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(key) || (key == "TOML" && stderr.contains("vm.toml")), "{key}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A disk that does not exist: a clear error naming it.
    std::fs::write(&path, "name = \"x\"\nmemory_mib = 64\n[guest]\nkind = \"test\"\n[[disk]]\npath = \"nope.img\"\n")
        .expect("write");
    let (code, stderr) = run_to_end(&[OsStr::new("run"), path.as_os_str()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("nope.img"), "{stderr}");
}
