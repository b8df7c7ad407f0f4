//! Admission: whether this host can take the VM a hello describes, and the
//! host configuration it gets here.

use std::path::PathBuf;

use wanmig_types::MacAddr;
use wanmig_vmm::config::{DiskConfig, Ipv4Cidr, NetConfig, SerialOutput, VmConfig};
use wanmig_vmm::layout;
use wanmig_wire::VmShape;

use super::disks;
use super::options::ReceiveOptions;

/// The host configuration for an incoming VM, or why it cannot be hosted;
/// with copied disks, also where each image goes once committed (the
/// configuration names the incoming images until then).
pub fn host_config(shape: &VmShape, opts: &ReceiveOptions, attempt: &str) -> Result<(VmConfig, Vec<PathBuf>), String> {
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
    if !shape.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) || shape.name.is_empty() {
        return Err("the VM name has characters this host does not accept".into());
    }
    let mut disks = Vec::new();
    let mut finals = Vec::new();
    for d in &shape.disks {
        let Some(shared) = &opts.shared_disks else {
            if d.size % 4096 != 0 || d.size > disks::MAX_DISK_BYTES {
                return Err(format!(
                    "disk {} of {} bytes: copied disks are 4 KiB multiples up to 4 TiB",
                    d.path, d.size
                ));
            }
            let path = disks::image_path(&opts.disk_dir, d, &shape.name)?;
            if finals.contains(&path) {
                return Err(format!("two disks would both be {}", path.display()));
            }
            // The VM opens the incoming image until the commit renames it.
            disks.push(DiskConfig { path: disks::incoming(&path, attempt), read_only: d.read_only });
            finals.push(path);
            continue;
        };
        // A source names the path: hold it to the shared directory, after
        // resolving links and `..`, so it cannot open any file here.
        let under = std::fs::canonicalize(&d.path)
            .ok()
            .zip(std::fs::canonicalize(shared).ok())
            .is_some_and(|(disk, dir)| disk.starts_with(dir));
        if !under {
            return Err(format!("disk {} is not an image under the shared directory", d.path));
        }
        let size = std::fs::metadata(&d.path).map_err(|e| format!("disk {}: {e}", d.path))?.len();
        if size != d.size {
            return Err(format!("disk {} is {size} bytes here, {} at the source", d.path, d.size));
        }
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
    Ok((
        VmConfig {
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
        },
        finals,
    ))
}
