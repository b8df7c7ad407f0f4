//! `vm.toml`: what a VM is made of.
//!
//! ```toml
//! name = "demo"              # required: [A-Za-z0-9._-], at most 64 characters
//! memory_mib = 256           # required: 16 ..= 61440
//! vcpus = 1                  # default 1; 1 ..= 32
//! control_socket = "demo.sock"  # default "wanmig-<name>.sock" beside vm.toml
//! serial = "stdout"          # "stdout" (default), "none", or a file path
//! state_dir = "."            # where wanmig keeps the VM's migration journal (default: beside vm.toml)
//!
//! [cpu]                      # optional
//! hide = ["cx16", "xsave"]   # CPUID features the guest must not see (see vmm::cpuid)
//!
//! [guest]                    # required by `wanmig run`; either a Linux kernel ...
//! kind = "linux"
//! kernel = "vmlinux"         # an x86-64 ELF vmlinux or a bzImage
//! initrd = "initramfs.cpio.gz"  # optional
//! cmdline = "console=ttyS0"  # default: console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1
//!
//! [guest]                    # ... or the built-in test guest
//! kind = "test"
//! ws_mib = 16                # working set, MiB (default 16)
//! rate_mib = 0               # MiB/s of working-set pages dirtied (default 0 = idle)
//! flat_out = false           # dirty as fast as the vCPU can (overrides rate_mib)
//! disk_kib = 0               # KiB/s written to the first disk (default 0)
//! disk_mib = 1               # size of the disk region the guest cycles over (default 1)
//! disk_scatter = false       # scatter the 4 KiB writes over the region (default: in order)
//! mem_entropy = 35           # % of each page it writes that is pseudo-random, 0 ..= 100 (default 35)
//! disk_entropy = 60          # % of each disk block it writes that is pseudo-random (default 60)
//! poweroff_after_s = 30      # power off through ACPI after this many s (default: never)
//! reset_after_s = 30         # or reset through ACPI instead (default: never); 1 ..= 31536000
//!
//! [[disk]]                   # zero or more; raw images
//! path = "disk.img"
//! read_only = false          # default false
//!
//! [[net]]                    # zero or more virtio-net NICs, each on a host TAP
//! tap = "tap0"               # required: the TAP interface (created if missing), at most 15 bytes
//! mac = "52:54:00:12:34:56"  # required: the guest's unicast MAC
//! ip = "10.0.0.2/24"         # optional: the guest's IPv4 address and prefix
//! gateway = "10.0.0.1"       # optional: its default gateway, inside that prefix
//! ```
//!
//! Disks and NICs together take at most 8 virtio-mmio slots: disks first,
//! in order, then NICs. The test guest answers on the first NIC's `ip`.
//!
//! The test guest's entropy defaults make it compress like a real server
//! rather than 1000:1. A page written at `mem_entropy = e` is e % random
//! words and the rest zeros, so zstd shrinks it about 100/e to 1: 35 gives
//! ≈2.9:1, in the middle (on a log scale) of the 2–4:1 that fast codecs get
//! on real RAM (Linux's zram documentation plans for 2:1; zram and zswap
//! users report 2.5–3.5:1 with lzo/lz4/zstd). Disks hold more data that is
//! already compressed (media, packages, compressed database pages), so
//! `disk_entropy = 60` (≈1.7:1). `mem_entropy = 0` and `disk_entropy = 0`
//! give the old, almost entirely compressible guest; 100 an incompressible
//! one. Random bytes cost the emulated vCPU this project is tested on about
//! 0.6 µs per 8 (a `rep movsq` iteration), so the higher the entropy, the
//! lower the dirty rate `flat_out` reaches (README, "The test guest").
//!
//! Relative paths are relative to the directory of `vm.toml`. Unknown keys
//! are errors that name the key; so are impossible values.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::layout;
pub use wanmig_types::MacAddr;

/// Smallest guest: the test guest reserves the first 2 MiB and needs room to work.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Largest guest: the test guest identity-maps 64 GiB of guest-physical space,
/// of which 1 GiB is the MMIO gap below 4 GiB.
pub const MAX_MEMORY_MIB: u64 = 60 * 1024;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// Longest delay before the test guest powers off or resets: a year.
pub const MAX_STOP_AFTER_S: u64 = 365 * 24 * 3600;

/// A VM's configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Name of the VM (used in messages and default file names).
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Unix socket on which `wanmig run` serves the control protocol.
    pub control_socket: PathBuf,
    /// Where the guest's serial console goes.
    pub serial: SerialOutput,
    /// Where wanmig keeps what must survive this process for the VM (its
    /// migration journal).
    pub state_dir: PathBuf,
    /// What runs inside; required to boot (`wanmig run`), unused when the
    /// VM comes from a snapshot or a migration.
    pub guest: Option<GuestConfig>,
    /// Raw disk images, attached as virtio-blk devices in this order.
    pub disks: Vec<DiskConfig>,
    /// NICs, attached as virtio-net devices in this order, after the disks.
    pub nets: Vec<NetConfig>,
    /// CPUID features hidden from the guest (names from [`crate::cpuid::FEATURES`]).
    pub cpu_hide: Vec<String>,
}

/// Destination of the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The VMM process's standard output.
    Stdout,
    /// Discarded.
    None,
    /// Appended to this file.
    File(PathBuf),
}

/// The guest software.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum GuestConfig {
    /// The built-in deterministic test guest (see [`crate::testguest`]).
    Test(TestGuestConfig),
    /// A Linux kernel (see [`crate::linux`]).
    Linux(LinuxGuestConfig),
}

/// A Linux kernel, its initramfs and command line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxGuestConfig {
    /// The kernel: an x86-64 ELF `vmlinux` or a `bzImage`.
    pub kernel: PathBuf,
    /// An initramfs (cpio, optionally compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default = "default_linux_cmdline")]
    pub cmdline: String,
}

/// The command line a Linux guest gets unless `vm.toml` says otherwise:
/// the console on our 8250 (early messages too), reboot through the
/// keyboard controller, and a reboot (which ends the VMM) one second after
/// a panic.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0 reboot=k panic=1";

fn default_linux_cmdline() -> String {
    DEFAULT_LINUX_CMDLINE.into()
}

/// The `[cpu]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuConfig {
    #[serde(default)]
    hide: Vec<String>,
}

/// Parameters of the built-in test guest, passed on its command line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestGuestConfig {
    /// Working set in MiB.
    #[serde(default = "default_ws_mib")]
    pub ws_mib: u64,
    /// MiB/s of working-set pages dirtied; 0 = idle.
    #[serde(default)]
    pub rate_mib: u64,
    /// Dirty pages as fast as the vCPU can.
    #[serde(default)]
    pub flat_out: bool,
    /// KiB/s of 4 KiB blocks written to the first disk; 0 = none.
    #[serde(default)]
    pub disk_kib: u64,
    /// MiB of the first disk the writer cycles over.
    #[serde(default = "default_disk_mib")]
    pub disk_mib: u64,
    /// Scatter the writes over the region instead of writing it in order.
    #[serde(default)]
    pub disk_scatter: bool,
    /// Percentage of each page the guest writes that is pseudo-random
    /// (the rest is zeros), 0 ..= 100.
    #[serde(default = "default_mem_entropy")]
    pub mem_entropy: u8,
    /// Percentage of each disk block the guest writes that is pseudo-random.
    #[serde(default = "default_disk_entropy")]
    pub disk_entropy: u8,
    /// Power off through the ACPI sleep control register after this many
    /// seconds of running; `None`: never.
    #[serde(default)]
    pub poweroff_after_s: Option<u64>,
    /// Reset through the ACPI reset register after this many seconds of
    /// running; `None`: never.
    #[serde(default)]
    pub reset_after_s: Option<u64>,
}

fn default_ws_mib() -> u64 {
    16
}
fn default_disk_mib() -> u64 {
    1
}
fn default_mem_entropy() -> u8 {
    DEFAULT_MEM_ENTROPY
}
fn default_disk_entropy() -> u8 {
    DEFAULT_DISK_ENTROPY
}

/// Default `mem_entropy` of the test guest (see the module docs for why).
pub const DEFAULT_MEM_ENTROPY: u8 = 35;
/// Default `disk_entropy` of the test guest.
pub const DEFAULT_DISK_ENTROPY: u8 = 60;

/// One raw disk image.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// One virtio-net NIC on a host TAP interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of the host TAP interface.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// The guest's IPv4 address, if the configuration gives one.
    pub ip: Option<Ipv4Cidr>,
    /// The guest's default gateway.
    pub gateway: Option<Ipv4Addr>,
}

/// An IPv4 address with the prefix length of its subnet (`10.0.0.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 1 ..= 32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Whether `other` is in this address's subnet.
    pub fn contains(&self, other: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
        u32::from(self.addr) & mask == u32::from(other) & mask
    }

    /// The subnet's broadcast address.
    fn broadcast(&self) -> Ipv4Addr {
        let host = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) | host)
    }

    /// The subnet's own address (host part zero).
    fn network(&self) -> Ipv4Addr {
        let host = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) & !host)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    /// `A.B.C.D/N`, N in 1 ..= 32, a host address of its subnet (not
    /// unspecified, loopback, multicast, or, below /31, the subnet's
    /// network or broadcast address).
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) =
            s.split_once('/').ok_or_else(|| format!("`{s}` is not an IPv4 address with a prefix (A.B.C.D/N)"))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let prefix: u8 =
            p.parse().ok().filter(|n| (1..=32).contains(n)).ok_or_else(|| format!("prefix `/{p}` is not in 1..=32"))?;
        let c = Ipv4Cidr { addr, prefix };
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast() {
            return Err(format!("{addr} cannot be a host's address"));
        }
        if prefix <= 30 && (addr == c.network() || addr == c.broadcast()) {
            return Err(format!("{addr} is the network or broadcast address of {}/{prefix}", c.network()));
        }
        Ok(c)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A `[[net]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNet {
    tap: String,
    mac: String,
    ip: Option<String>,
    gateway: Option<String>,
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: String,
    memory_mib: u64,
    #[serde(default = "default_vcpus")]
    vcpus: u64,
    control_socket: Option<PathBuf>,
    serial: Option<String>,
    state_dir: Option<PathBuf>,
    guest: Option<GuestConfig>,
    #[serde(default, rename = "disk")]
    disks: Vec<DiskConfig>,
    #[serde(default, rename = "net")]
    nets: Vec<RawNet>,
    #[serde(default)]
    cpu: CpuConfig,
}

fn default_vcpus() -> u64 {
    1
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message: names the key and the line.
        message: String,
    },
    /// A key has a value that cannot work.
    #[error("{path}: `{key}`: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, as written in the file.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl VmConfig {
    /// Reads and validates `vm.toml`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates the text of a `vm.toml` found at `path` (used to
    /// resolve relative paths and in messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid { path: path.into(), key, reason };
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };

        if raw.name.is_empty()
            || raw.name.len() > 64
            || !raw.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return Err(invalid("name", "must be 1 to 64 characters from [A-Za-z0-9._-]".into()));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&raw.memory_mib) {
            return Err(invalid(
                "memory_mib",
                format!("{} is out of range {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}", raw.memory_mib),
            ));
        }
        let vcpus = u8::try_from(raw.vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or_else(|| invalid("vcpus", format!("{} is out of range 1..={MAX_VCPUS}", raw.vcpus)))?;
        let control_socket =
            resolve(&raw.control_socket.unwrap_or_else(|| PathBuf::from(format!("wanmig-{}.sock", raw.name))));
        // sockaddr_un holds 108 bytes including the terminating NUL.
        if control_socket.as_os_str().len() > 107 {
            return Err(invalid("control_socket", format!("{} is longer than 107 bytes", control_socket.display())));
        }
        let serial = match raw.serial.as_deref() {
            None | Some("stdout") => SerialOutput::Stdout,
            Some("none") => SerialOutput::None,
            Some("") => return Err(invalid("serial", "empty; use \"stdout\", \"none\" or a path".into())),
            Some(p) => SerialOutput::File(resolve(Path::new(p))),
        };
        let disks_configured = !raw.disks.is_empty();
        let guest = match raw.guest {
            Some(GuestConfig::Test(t)) => {
                check_test_guest(&t, raw.memory_mib, disks_configured).map_err(|(key, reason)| invalid(key, reason))?;
                Some(GuestConfig::Test(t))
            }
            Some(GuestConfig::Linux(l)) => {
                if l.cmdline.len() >= layout::LINUX_CMDLINE_MAX || l.cmdline.contains('\0') {
                    return Err(invalid(
                        "guest.cmdline",
                        format!("must be under {} bytes, without NUL", layout::LINUX_CMDLINE_MAX),
                    ));
                }
                Some(GuestConfig::Linux(LinuxGuestConfig {
                    kernel: resolve(&l.kernel),
                    initrd: l.initrd.as_deref().map(resolve),
                    cmdline: l.cmdline,
                }))
            }
            None => None,
        };
        if let Some(bad) = raw.cpu.hide.iter().find(|n| crate::cpuid::feature(n).is_none()) {
            let known: Vec<&str> = crate::cpuid::FEATURES.iter().map(|f| f.name).collect();
            return Err(invalid("cpu.hide", format!("unknown feature {bad:?}; known: {}", known.join(", "))));
        }
        if raw.disks.len() + raw.nets.len() > layout::VIRTIO_MMIO_SLOTS {
            return Err(invalid(
                if raw.nets.is_empty() { "disk" } else { "net" },
                format!(
                    "{} disks and {} NICs; at most {} devices in all",
                    raw.disks.len(),
                    raw.nets.len(),
                    layout::VIRTIO_MMIO_SLOTS
                ),
            ));
        }
        let disks = raw.disks.iter().map(|d| DiskConfig { path: resolve(&d.path), read_only: d.read_only }).collect();
        let mut nets: Vec<NetConfig> = Vec::with_capacity(raw.nets.len());
        for n in &raw.nets {
            let net = check_net(n).map_err(|(key, reason)| invalid(key, reason))?;
            if nets.iter().any(|o| o.tap == net.tap) {
                return Err(invalid("net.tap", format!("`{}` is used by two NICs", net.tap)));
            }
            if nets.iter().any(|o| o.mac == net.mac) {
                return Err(invalid("net.mac", format!("{} is used by two NICs", net.mac)));
            }
            nets.push(net);
        }
        let state_dir = raw.state_dir.as_deref().map_or_else(|| base.to_path_buf(), resolve);
        Ok(VmConfig {
            name: raw.name,
            memory_mib: raw.memory_mib,
            vcpus,
            control_socket,
            serial,
            state_dir,
            guest,
            disks,
            nets,
            cpu_hide: raw.cpu.hide,
        })
    }

    /// The configuration as a `vm.toml` that [`VmConfig::parse`] reads back
    /// to the same host configuration, every path absolute. It has no
    /// `[guest]` section: it describes a VM that resumes from its state (a
    /// received VM), not one to boot.
    pub fn to_toml(&self) -> String {
        let mut t = toml::Table::new();
        t.insert("name".into(), self.name.clone().into());
        t.insert("memory_mib".into(), (self.memory_mib as i64).into());
        t.insert("vcpus".into(), i64::from(self.vcpus).into());
        let path = |p: &Path| toml::Value::from(p.to_string_lossy().into_owned());
        t.insert("control_socket".into(), path(&self.control_socket));
        t.insert("state_dir".into(), path(&self.state_dir));
        let serial = match &self.serial {
            SerialOutput::Stdout => "stdout".into(),
            SerialOutput::None => "none".into(),
            SerialOutput::File(p) => path(p),
        };
        t.insert("serial".into(), serial);
        if !self.cpu_hide.is_empty() {
            let mut cpu = toml::Table::new();
            cpu.insert(
                "hide".into(),
                self.cpu_hide.iter().map(|h| toml::Value::from(h.clone())).collect::<Vec<_>>().into(),
            );
            t.insert("cpu".into(), cpu.into());
        }
        let disks: Vec<toml::Value> = self
            .disks
            .iter()
            .map(|d| {
                let mut d2 = toml::Table::new();
                d2.insert("path".into(), path(&d.path));
                d2.insert("read_only".into(), d.read_only.into());
                d2.into()
            })
            .collect();
        if !disks.is_empty() {
            t.insert("disk".into(), disks.into());
        }
        let nets: Vec<toml::Value> = self
            .nets
            .iter()
            .map(|n| {
                let mut n2 = toml::Table::new();
                n2.insert("tap".into(), n.tap.clone().into());
                n2.insert("mac".into(), n.mac.to_string().into());
                if let Some(ip) = n.ip {
                    n2.insert("ip".into(), ip.to_string().into());
                }
                if let Some(g) = n.gateway {
                    n2.insert("gateway".into(), g.to_string().into());
                }
                n2.into()
            })
            .collect();
        if !nets.is_empty() {
            t.insert("net".into(), nets.into());
        }
        let mut text =
            String::from("# Written by wanmig when this VM arrived here; `wanmig status|send|snapshot` read it.\n");
        text.push_str(&toml::to_string(&t).expect("a TOML table serializes"));
        text
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// Checks one `[[net]]` table; the error names the key.
fn check_net(n: &RawNet) -> Result<NetConfig, (&'static str, String)> {
    if !crate::devices::tap::is_valid_name(&n.tap) {
        return Err((
            "net.tap",
            format!(
                "`{}` is not an interface name (1 to {} bytes, no '/', ':' or whitespace)",
                n.tap,
                crate::devices::tap::MAX_NAME_LEN
            ),
        ));
    }
    let mac: MacAddr = n.mac.parse().map_err(|e: wanmig_types::mac::BadMac| ("net.mac", e.to_string()))?;
    if !mac.is_unicast() {
        return Err(("net.mac", format!("{mac} is not a unicast address (multicast bit set, or all zeros)")));
    }
    let ip = n.ip.as_deref().map(str::parse::<Ipv4Cidr>).transpose().map_err(|e| ("net.ip", e))?;
    let gateway = match (n.gateway.as_deref(), ip) {
        (None, _) => None,
        (Some(_), None) => return Err(("net.gateway", "a gateway needs the NIC's `ip`".into())),
        (Some(g), Some(ip)) => {
            let g: Ipv4Addr = g.parse().map_err(|_| ("net.gateway", format!("`{g}` is not an IPv4 address")))?;
            if !ip.contains(g) || g == ip.addr {
                return Err(("net.gateway", format!("{g} is not another address in {}/{}", ip.network(), ip.prefix)));
            }
            Some(g)
        }
    };
    Ok(NetConfig { tap: n.tap.clone(), mac, ip, gateway })
}

/// Checks the test guest's parameters; the error names the key.
fn check_test_guest(t: &TestGuestConfig, memory_mib: u64, has_disk: bool) -> Result<(), (&'static str, String)> {
    if t.ws_mib > memory_mib {
        return Err(("guest.ws_mib", format!("{} MiB exceeds memory_mib", t.ws_mib)));
    }
    if t.disk_mib == 0 {
        return Err(("guest.disk_mib", "must be at least 1".into()));
    }
    if t.rate_mib > 1 << 20 {
        return Err(("guest.rate_mib", format!("{} MiB/s is not a rate a guest can reach", t.rate_mib)));
    }
    if t.disk_kib > 1 << 20 {
        return Err(("guest.disk_kib", format!("{} KiB/s is above 1 GiB/s", t.disk_kib)));
    }
    for (key, e) in [("guest.mem_entropy", t.mem_entropy), ("guest.disk_entropy", t.disk_entropy)] {
        if e > 100 {
            return Err((key, format!("{e} is not a percentage (0 ..= 100)")));
        }
    }
    if t.disk_kib > 0 && !has_disk {
        return Err(("guest.disk_kib", "the guest is asked to write but no [[disk]] is configured".into()));
    }
    for (key, after) in [("guest.poweroff_after_s", t.poweroff_after_s), ("guest.reset_after_s", t.reset_after_s)] {
        if let Some(s) = after
            && !(1..=MAX_STOP_AFTER_S).contains(&s)
        {
            return Err((key, format!("{s} s is out of range 1..={MAX_STOP_AFTER_S}")));
        }
    }
    if t.poweroff_after_s.is_some() && t.reset_after_s.is_some() {
        return Err(("guest.reset_after_s", "the guest cannot both power off and reset; set one".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(text, Path::new("/etc/wanmig/vm.toml"))
    }

    const GOOD: &str = r#"
        name = "t1"
        memory_mib = 64
        [guest]
        kind = "test"
        disk_kib = 8
        [[disk]]
        path = "d.img"
    "#;

    #[test]
    fn good_config_resolves_paths() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.vcpus, 1);
        assert_eq!(c.disks[0].path, PathBuf::from("/etc/wanmig/d.img"));
        assert_eq!(c.control_socket, PathBuf::from("/etc/wanmig/wanmig-t1.sock"));
        assert_eq!(c.serial, SerialOutput::Stdout);
        assert_eq!(
            c.guest,
            Some(GuestConfig::Test(TestGuestConfig {
                ws_mib: 16,
                rate_mib: 0,
                flat_out: false,
                disk_kib: 8,
                disk_mib: 1,
                disk_scatter: false,
                mem_entropy: 35,
                disk_entropy: 60,
                poweroff_after_s: None,
                reset_after_s: None,
            }))
        );
        let c = parse(&GOOD.replace("disk_kib = 8", "disk_kib = 8\npoweroff_after_s = 3")).expect("valid");
        let Some(GuestConfig::Test(t)) = c.guest else { panic!("test guest") };
        assert_eq!((t.poweroff_after_s, t.reset_after_s), (Some(3), None));
    }

    #[test]
    fn linux_guest_paths_resolve_and_cmdline_defaults() {
        let text = "name = \"l\"\nmemory_mib = 512\n[cpu]\nhide = [\"cx16\"]\n\
                    [guest]\nkind = \"linux\"\nkernel = \"vmlinux\"\ninitrd = \"/boot/i.gz\"\n";
        let c = parse(text).expect("valid");
        assert_eq!(c.cpu_hide, vec!["cx16".to_string()]);
        assert_eq!(
            c.guest,
            Some(GuestConfig::Linux(LinuxGuestConfig {
                kernel: PathBuf::from("/etc/wanmig/vmlinux"),
                initrd: Some(PathBuf::from("/boot/i.gz")),
                cmdline: DEFAULT_LINUX_CMDLINE.into(),
            }))
        );
        let long = format!("{text}cmdline = \"{}\"\n", "x".repeat(layout::LINUX_CMDLINE_MAX));
        assert!(error_of(&long).contains("`guest.cmdline`"));
        assert!(error_of(&text.replace("kernel = ", "kernal = ")).contains("kernal"));
    }

    fn error_of(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn unknown_keys_are_named() {
        assert!(error_of(&format!("{GOOD}\nmemroy = 3")).contains("memroy"));
        let e = error_of(&GOOD.replace("disk_kib = 8", "disk_kib = 8\nwsmib = 1"));
        assert!(e.contains("wsmib"), "{e}");
        let e = error_of(&GOOD.replace("path = \"d.img\"", "path = \"d.img\"\nsize = 1"));
        assert!(e.contains("size"), "{e}");
        let e = error_of(&GOOD.replace("kind = \"test\"", "kind = \"windows\""));
        assert!(e.contains("windows"), "{e}");
    }

    #[test]
    fn impossible_values_name_the_key() {
        for (from, to, key) in [
            ("memory_mib = 64", "memory_mib = 1", "memory_mib"),
            ("memory_mib = 64", "memory_mib = 99999999", "memory_mib"),
            ("memory_mib = 64", "memory_mib = 64\nvcpus = 0", "vcpus"),
            ("memory_mib = 64", "memory_mib = 64\nvcpus = 300", "vcpus"),
            ("name = \"t1\"", "name = \"a b\"", "name"),
            ("disk_kib = 8", "disk_kib = 8\nws_mib = 65", "guest.ws_mib"),
            ("disk_kib = 8", "disk_kib = 8\ndisk_mib = 0", "guest.disk_mib"),
            ("disk_kib = 8", "disk_kib = 8\nmem_entropy = 101", "guest.mem_entropy"),
            ("disk_kib = 8", "disk_kib = 8\ndisk_entropy = 200", "guest.disk_entropy"),
            ("memory_mib = 64", "memory_mib = 64\nserial = \"\"", "serial"),
            ("disk_kib = 8", "disk_kib = 8\npoweroff_after_s = 0", "guest.poweroff_after_s"),
            ("disk_kib = 8", "disk_kib = 8\nreset_after_s = 99999999999", "guest.reset_after_s"),
            ("disk_kib = 8", "disk_kib = 8\nreset_after_s = 2\npoweroff_after_s = 2", "guest.reset_after_s"),
        ] {
            let e = error_of(&GOOD.replace(from, to));
            assert!(e.contains(&format!("`{key}`")), "{key}: {e}");
        }
        let e = error_of(&GOOD.replace("memory_mib = 64", "memory_mib = \"lots\""));
        assert!(e.contains("memory_mib"), "{e}");
        let e = error_of(&format!("{GOOD}\n[cpu]\nhide = [\"cx16\", \"warp_drive\"]"));
        assert!(e.contains("`cpu.hide`") && e.contains("warp_drive"), "{e}");
        let no_disk = GOOD.replace("[[disk]]\n        path = \"d.img\"", "");
        assert!(error_of(&no_disk).contains("`guest.disk_kib`"));
    }

    const NET: &str =
        "\n[[net]]\ntap = \"tap0\"\nmac = \"52:54:00:12:34:56\"\nip = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n";

    #[test]
    fn nics_follow_the_disks() {
        let c = parse(&format!("{GOOD}{NET}[[net]]\ntap = \"tap1\"\nmac = \"52:54:00:00:00:01\"\n")).expect("valid");
        assert_eq!(c.nets.len(), 2);
        let n = &c.nets[0];
        assert_eq!((n.tap.as_str(), n.mac), ("tap0", MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(n.ip, Some(Ipv4Cidr { addr: Ipv4Addr::new(10, 0, 0, 2), prefix: 24 }));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!((c.nets[1].ip, c.nets[1].gateway), (None, None));
        assert_eq!(n.mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(n.ip.expect("ip").to_string(), "10.0.0.2/24");
        assert!(parse(GOOD).expect("valid").nets.is_empty());
    }

    #[test]
    fn bad_nics_name_the_key() {
        for (from, to, key) in [
            ("52:54:00:12:34:56", "52:54:00:12:34", "net.mac"),
            ("52:54:00:12:34:56", "52:54:00:12:34:56:78", "net.mac"),
            ("52:54:00:12:34:56", "52-54-00-12-34-56", "net.mac"),
            ("52:54:00:12:34:56", "52:54:00:12:34:5g", "net.mac"),
            ("52:54:00:12:34:56", "01:00:5e:00:00:01", "net.mac"),
            ("52:54:00:12:34:56", "ff:ff:ff:ff:ff:ff", "net.mac"),
            ("52:54:00:12:34:56", "00:00:00:00:00:00", "net.mac"),
            ("10.0.0.2/24", "10.0.0.2", "net.ip"),
            ("10.0.0.2/24", "10.0.0.2/33", "net.ip"),
            ("10.0.0.2/24", "10.0.0.2/0", "net.ip"),
            ("10.0.0.2/24", "10.0.0.0/24", "net.ip"),
            ("10.0.0.2/24", "10.0.0.255/24", "net.ip"),
            ("10.0.0.2/24", "10.0.0.300/24", "net.ip"),
            ("10.0.0.2/24", "127.0.0.2/8", "net.ip"),
            ("10.0.0.2/24", "224.0.0.1/24", "net.ip"),
            ("10.0.0.1\"", "10.0.1.1\"", "net.gateway"),
            ("10.0.0.1\"", "10.0.0.2\"", "net.gateway"),
            ("10.0.0.1\"", "gw\"", "net.gateway"),
            ("tap0", "", "net.tap"),
            ("tap0", "much-too-long-tap", "net.tap"),
            ("tap0", "a/b", "net.tap"),
        ] {
            let e = error_of(&format!("{GOOD}{}", NET.replace(from, to)));
            assert!(e.contains(&format!("`{key}`")), "{to}: {e}");
        }
        let no_ip = NET.replace("ip = \"10.0.0.2/24\"\n", "");
        assert!(error_of(&format!("{GOOD}{no_ip}")).contains("`net.gateway`"));
        // Unknown and missing keys are named by toml.
        let e = error_of(&format!("{GOOD}{NET}mtu = 9000\n"));
        assert!(e.contains("mtu"), "{e}");
        let e = error_of(&format!("{GOOD}{}", NET.replace("tap = \"tap0\"\n", "")));
        assert!(e.contains("tap"), "{e}");
        // Two NICs on one TAP, or with one MAC.
        let other_mac = NET.replace("52:54:00:12:34:56", "52:54:00:12:34:57");
        assert!(error_of(&format!("{GOOD}{NET}{other_mac}")).contains("`net.tap`"));
        let other_tap = NET.replace("tap0", "tap1");
        assert!(error_of(&format!("{GOOD}{NET}{other_tap}")).contains("`net.mac`"));
    }

    #[test]
    fn disks_and_nics_share_the_slots() {
        let disks = "[[disk]]\npath = \"d.img\"\n".repeat(layout::VIRTIO_MMIO_SLOTS - 2);
        let nic = |i: usize| format!("[[net]]\ntap = \"t{i}\"\nmac = \"52:54:00:00:00:{i:02x}\"\n");
        let base = format!("{GOOD}{disks}");
        // GOOD has one disk: 1 + 6 + 1 NIC = 8 fits, a second NIC does not.
        assert!(parse(&format!("{base}{}", nic(1))).is_ok());
        let e = error_of(&format!("{base}{}{}", nic(1), nic(2)));
        assert!(e.contains("`net`") && e.contains("at most 8"), "{e}");
        let e = error_of(&format!("{base}{disks}"));
        assert!(e.contains("`disk`"), "{e}");
    }

    #[test]
    fn a_written_configuration_reads_back_the_same() {
        let dir = tempfile::tempdir().expect("tmp");
        let text = "name = \"vm-1\"\nmemory_mib = 64\nvcpus = 2\nserial = \"serial.log\"\n[cpu]\nhide = [\"cx16\"]\n\
             [[disk]]\npath = \"a.img\"\n[[disk]]\npath = \"b.img\"\nread_only = true\n\
             [[net]]\ntap = \"tap0\"\nmac = \"52:54:00:12:34:56\"\nip = \"10.0.0.2/24\"\ngateway = \"10.0.0.1\"\n";
        let path = dir.path().join("vm.toml");
        let c = VmConfig::parse(text, &path).expect("parses");
        assert_eq!(c.state_dir, dir.path());
        let written = dir.path().join("elsewhere").join("vm-1.toml");
        let back = VmConfig::parse(&c.to_toml(), &written).expect("reads back");
        assert_eq!(back, VmConfig { guest: None, ..c });
    }
}
