//! Admission: whether this host can take the VM a hello describes, and the
//! host configuration it gets here. Checked at the hello, before anything
//! moves, each refusal naming the figures:
//!
//! - the shape: memory layout and size, vCPUs, the VM's name, disks and NICs
//!   within the VMM's device slots, TAPs for its NICs;
//! - memory: the guest's RAM, plus [`MEM_MARGIN_MIB`] and 1/32 of the RAM
//!   for the VMM (page tables, device queues, QUIC windows, zstd, the chunk
//!   store's caches), plus the copied disks' block digests (33 bytes per
//!   64 KiB), against `MemAvailable` in `/proc/meminfo`;
//! - disk space (copied disks): the declared sizes under `--disk-dir` (an
//!   image may end up fully written), and as much again in the chunk store
//!   (which keeps every chunk received); both together when they share a
//!   filesystem (`statvfs`, space available to unprivileged users);
//! - shared disks: each image is opened here, once, beneath the shared
//!   directory with no symbolic link on the way (`openat2` with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), checked (a regular file of
//!   the declared size) and handed to the VM as that open file: what the
//!   path names later does not matter.

use std::fs::File;
use std::path::{Path, PathBuf};

use wanmig_types::MacAddr;
use wanmig_vmm::config::{DiskConfig, Ipv4Cidr, NetConfig, SerialOutput, VmConfig};
use wanmig_vmm::layout;
use wanmig_wire::VmShape;

use super::disks;
use super::options::ReceiveOptions;

/// Memory kept free beside a received VM's RAM, MiB (plus 1/32 of the RAM).
pub const MEM_MARGIN_MIB: u64 = 256;

/// What this host has to give, as measured at a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// `MemAvailable`, bytes.
    pub mem_available: u64,
    /// Free space under `--disk-dir`, bytes.
    pub disk_free: u64,
    /// Free space in the chunk store, bytes.
    pub store_free: u64,
    /// Whether the two are the same filesystem.
    pub same_fs: bool,
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

/// `MemAvailable` of `/proc/meminfo`, bytes.
fn mem_available() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    let kib = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("/proc/meminfo has no MemAvailable")?;
    Ok(kib.saturating_mul(1024))
}

/// Free bytes (for unprivileged users) and the device of the filesystem
/// holding `path`.
fn free_space(path: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| "a path with a NUL byte".to_string())?;
    // SAFETY: a zeroed statvfs is a valid out-buffer.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable; both outlive the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!("{}: {}", path.display(), std::io::Error::last_os_error()));
    }
    let dev = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.dev();
    Ok((st.f_bavail.saturating_mul(st.f_frsize), dev))
}

impl HostFacts {
    /// Measures this host for `opts`.
    pub fn probe(opts: &ReceiveOptions) -> Result<HostFacts, String> {
        let (disk_free, disk_dev) = free_space(&opts.disk_dir)?;
        let (store_free, store_dev) = match opts.shared_disks {
            Some(_) => (disk_free, disk_dev),
            None => free_space(&opts.store)?,
        };
        Ok(HostFacts { mem_available: mem_available()?, disk_free, store_free, same_fs: disk_dev == store_dev })
    }
}

/// Whether this host has the memory and disk space the VM of `shape`
/// needs (see the module docs); the refusal names the figures.
pub fn check_resources(
    shape: &VmShape,
    copies_disks: bool,
    facts: &HostFacts,
    opts: &ReceiveOptions,
) -> Result<(), String> {
    let ram = shape.memory.iter().fold(0u64, |acc, (_, l)| acc.saturating_add(*l));
    let disks = match copies_disks {
        true => shape.disks.iter().fold(0u64, |acc, d| acc.saturating_add(d.size)),
        false => 0,
    };
    let digests = disks / wanmig_block_sync::digest::BLOCK * 33;
    let overhead = (MEM_MARGIN_MIB << 20) + ram / 32 + digests;
    let need = ram.saturating_add(overhead);
    if need > facts.mem_available {
        return Err(format!(
            "not enough memory: the VM needs {} MiB ({} MiB of RAM, {} MiB for the VMM, buffers and disk digests), {} MiB available",
            mib(need),
            mib(ram),
            mib(overhead),
            mib(facts.mem_available)
        ));
    }
    if disks == 0 {
        return Ok(());
    }
    let here = opts.disk_dir.display();
    if facts.same_fs {
        let need = disks.saturating_mul(2);
        if need > facts.disk_free {
            return Err(format!(
                "not enough disk space: the VM's disks need {} MiB under {here} ({} MiB of images and as much for the chunk store {} on the same filesystem), {} MiB free",
                mib(need),
                mib(disks),
                opts.store.display(),
                mib(facts.disk_free)
            ));
        }
        return Ok(());
    }
    if disks > facts.disk_free {
        return Err(format!(
            "not enough disk space: the VM's disk images need {} MiB under {here}, {} MiB free",
            mib(disks),
            mib(facts.disk_free)
        ));
    }
    if disks > facts.store_free {
        return Err(format!(
            "not enough disk space: the VM's disks need {} MiB in the chunk store {}, {} MiB free",
            mib(disks),
            opts.store.display(),
            mib(facts.store_free)
        ));
    }
    Ok(())
}

/// Opens the shared image `path` the source names, beneath `shared` with
/// no link on the way, and checks it is a regular file of `size` bytes.
fn open_shared(shared: &Path, path: &str, size: u64, read_only: bool) -> Result<File, String> {
    let outside = || format!("disk {path} is not an image under the shared directory");
    // The operator's directory may be named through links; the source's
    // path below it may not.
    let canon = std::fs::canonicalize(shared).map_err(|e| format!("shared directory {}: {e}", shared.display()))?;
    let p = Path::new(path);
    let rel = p.strip_prefix(shared).or_else(|_| p.strip_prefix(&canon)).map_err(|_| outside())?;
    if rel.as_os_str().is_empty() {
        return Err(outside());
    }
    let dir = wanmig_vmm::files::open_dir_nofollow(&canon).map_err(|e| format!("{}: {e}", canon.display()))?;
    let file = wanmig_vmm::files::open_beneath(&dir, rel, !read_only).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("disk {path}: a symbolic link on its path under the shared directory is refused"),
        Some(libc::EXDEV) => outside(),
        _ => format!("disk {path}: {e}"),
    })?;
    let meta = file.metadata().map_err(|e| format!("disk {path}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("disk {path} is not a regular file"));
    }
    if meta.len() != size {
        return Err(format!("disk {path} is {} bytes here, {size} at the source", meta.len()));
    }
    Ok(file)
}

/// An admitted VM's configuration here.
#[derive(Debug)]
pub struct Admission {
    /// Its host configuration (copied disks named by their incoming images).
    pub config: VmConfig,
    /// With copied disks: where each image goes once committed.
    pub finals: Vec<PathBuf>,
    /// With shared disks: each image, opened and checked.
    pub shared: Option<Vec<File>>,
}

/// The host configuration for an incoming VM, or why it cannot be hosted;
/// with copied disks, also where each image goes once committed (the
/// configuration names the incoming images until then); with shared disks,
/// the images opened.
pub fn host_config(shape: &VmShape, opts: &ReceiveOptions, attempt: &str) -> Result<Admission, String> {
    let total = shape.memory.iter().try_fold(0u64, |acc, (_, l)| acc.checked_add(*l)).ok_or("memory size overflows")?;
    if total % (1 << 20) != 0 {
        return Err(format!("memory of {total} bytes is not whole MiB"));
    }
    let want: Vec<(u64, u64)> = layout::ram_regions(total).into_iter().map(|(a, l)| (a.0, l)).collect();
    if shape.memory != want {
        return Err(format!("memory layout {:x?} is not one this VMM builds", shape.memory));
    }
    let memory_mib = total >> 20;
    if !(wanmig_vmm::config::MIN_MEMORY_MIB..=wanmig_vmm::config::MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(format!("{memory_mib} MiB of memory is out of range"));
    }
    if shape.vcpus == 0 || shape.vcpus > wanmig_vmm::config::MAX_VCPUS {
        return Err(format!("{} vCPUs", shape.vcpus));
    }
    let name_ok = shape.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !name_ok || shape.name.is_empty() || shape.name.len() > 64 || shape.name.starts_with('.') {
        return Err("the VM name has characters this host does not accept".into());
    }
    if shape.disks.len() + shape.nics.len() > layout::VIRTIO_MMIO_SLOTS {
        return Err(format!(
            "{} disks and {} NICs: this VMM has {} device slots",
            shape.disks.len(),
            shape.nics.len(),
            layout::VIRTIO_MMIO_SLOTS
        ));
    }
    let mut disks = Vec::new();
    let mut finals = Vec::new();
    let mut shared_files = Vec::new();
    for d in &shape.disks {
        let Some(shared) = &opts.shared_disks else {
            if d.size % 4096 != 0 || d.size > disks::MAX_DISK_BYTES {
                return Err(format!(
                    "disk {} of {} bytes: copied disks are 4 KiB multiples up to 4 TiB",
                    d.path, d.size
                ));
            }
            let path = disks::image_path(&opts.disk_dir, d)?;
            if finals.contains(&path) {
                return Err(format!("two disks would both be {}", path.display()));
            }
            // The VM opens the incoming image until the commit renames it.
            disks.push(DiskConfig { path: disks::incoming(&path, attempt), read_only: d.read_only });
            finals.push(path);
            continue;
        };
        // A source names the path: the image is opened now, beneath the
        // shared directory with no link, and the VM gets that file.
        shared_files.push(open_shared(shared, &d.path, d.size, d.read_only)?);
        disks.push(DiskConfig { path: d.path.clone().into(), read_only: d.read_only });
    }
    if shape.nics.len() > opts.taps.len() {
        return Err(format!(
            "the VM has {} NIC(s) and this host offers {} TAP(s) for them (receive --tap NAME, one per NIC)",
            shape.nics.len(),
            opts.taps.len()
        ));
    }
    let mut nets = Vec::new();
    for (n, tap) in shape.nics.iter().zip(&opts.taps) {
        let mac = MacAddr(n.mac);
        if !mac.is_unicast() {
            return Err(format!("NIC MAC {mac} is not a unicast address"));
        }
        let ip = n.ipv4.map(|(a, prefix)| Ipv4Cidr { addr: a.into(), prefix });
        nets.push(NetConfig { tap: tap.clone(), mac, ip, gateway: None });
    }
    let shared = opts.shared_disks.as_ref().map(|_| shared_files);
    let config = VmConfig {
        name: shape.name.clone(),
        memory_mib,
        vcpus: shape.vcpus,
        control_socket: opts.dir.join(format!("wanmig-{}.sock", shape.name)),
        state_dir: opts.dir.clone(),
        serial: SerialOutput::File(opts.dir.join(format!("{}.serial.log", shape.name))),
        guest: None,
        disks,
        // The guest's CPUID arrives with its vCPU state.
        cpu_hide: Vec::new(),
        nets,
    };
    Ok(Admission { config, finals, shared })
}

#[cfg(test)]
mod tests {
    use wanmig_wire::DiskInfo;

    use super::*;

    fn opts(dir: &Path) -> ReceiveOptions {
        ReceiveOptions::for_tests(dir)
    }

    fn shape(ram_mib: u64, disks: &[u64]) -> VmShape {
        VmShape {
            name: "vm".into(),
            memory: layout::ram_regions(ram_mib << 20).into_iter().map(|(a, l)| (a.0, l)).collect(),
            vcpus: 1,
            disks: disks.iter().map(|&size| DiskInfo { size, path: "/src/d.img".into(), read_only: false }).collect(),
            nics: Vec::new(),
        }
    }

    #[test]
    fn memory_and_disk_space_are_checked_with_the_figures() {
        let dir = tempfile::tempdir().expect("tmp");
        let o = opts(dir.path());
        let plenty = HostFacts { mem_available: 16 << 30, disk_free: 1 << 40, store_free: 1 << 40, same_fs: false };
        check_resources(&shape(512, &[1 << 30]), true, &plenty, &o).expect("fits");
        // 512 MiB of RAM + 256 + 16 MiB, 96 MiB available.
        let short = HostFacts { mem_available: 96 << 20, ..plenty };
        let e = check_resources(&shape(512, &[]), true, &short, &o).expect_err("too little memory");
        assert!(
            e.contains(
                "needs 784 MiB (512 MiB of RAM, 272 MiB for the VMM, buffers and disk digests), 96 MiB available"
            ),
            "{e}"
        );
        // Eight 4 TiB disks: their digests alone are 17 GiB of memory.
        let e = check_resources(&shape(512, &[4 << 40; 8]), true, &plenty, &o).expect_err("digests");
        assert!(e.contains("not enough memory"), "{e}");
        let e = check_resources(&shape(512, &[4 << 40]), true, &plenty, &o).expect_err("4 TiB on 1 TiB");
        assert!(e.contains("need 4194304 MiB under") && e.contains("1048576 MiB free"), "{e}");
        let e = check_resources(&shape(512, &[600 << 30]), true, &HostFacts { same_fs: true, ..plenty }, &o)
            .expect_err("images and chunks on one filesystem");
        assert!(e.contains("need 1228800 MiB"), "{e}");
        let e = check_resources(&shape(512, &[600 << 30]), true, &HostFacts { store_free: 1 << 30, ..plenty }, &o)
            .expect_err("the store");
        assert!(e.contains("in the chunk store"), "{e}");
        // Shared disks need no space here.
        check_resources(&shape(512, &[4 << 40]), false, &plenty, &o).expect("shared");
        let facts = HostFacts::probe(&o).expect("probe");
        assert!(facts.mem_available > 0 && facts.disk_free > 0 && facts.same_fs, "{facts:?}");
    }

    #[test]
    fn a_shared_image_is_opened_once_beneath_the_directory_without_links() {
        use std::io::Read;
        let root = tempfile::tempdir().expect("tmp");
        let shared = root.path().join("shared");
        std::fs::create_dir(&shared).expect("mkdir");
        let img = shared.join("d.img");
        std::fs::write(&img, vec![1u8; 4096]).expect("image");
        std::fs::write(root.path().join("secret"), vec![2u8; 4096]).expect("secret");
        let p = |x: &Path| x.to_str().expect("utf-8").to_string();
        let mut f = open_shared(&shared, &p(&img), 4096, false).expect("opened");
        // The source swaps the image for a link to a same-sized file: the
        // VM's file is still the image checked.
        std::fs::remove_file(&img).expect("rm");
        std::os::unix::fs::symlink(root.path().join("secret"), &img).expect("link");
        let mut got = Vec::new();
        f.read_to_end(&mut got).expect("read");
        assert_eq!(got, vec![1u8; 4096]);
        // And a link at admission is refused, as are paths leaving the directory.
        let e = open_shared(&shared, &p(&img), 4096, false).expect_err("a link");
        assert!(e.contains("symbolic link"), "{e}");
        let e = open_shared(&shared, &format!("{}/../secret", p(&shared)), 4096, false).expect_err("..");
        assert!(e.contains("not an image under the shared directory"), "{e}");
        let e = open_shared(&shared, &p(&root.path().join("secret")), 4096, false).expect_err("outside");
        assert!(e.contains("not an image under the shared directory"), "{e}");
        std::fs::remove_file(&img).expect("rm");
        std::fs::write(&img, vec![1u8; 8192]).expect("image");
        let e = open_shared(&shared, &p(&img), 4096, false).expect_err("size");
        assert!(e.contains("8192 bytes here, 4096 at the source"), "{e}");
    }
}
