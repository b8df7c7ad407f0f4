//! `vm.toml`: what a VM is made of.
//!
//! ```toml
//! name = "demo"              # required: [A-Za-z0-9._-], at most 64 characters
//! memory_mib = 256           # required: 16 ..= 61440
//! vcpus = 1                  # default 1; 1 ..= 32
//! control_socket = "demo.sock"  # default "wanmig-<name>.sock" beside vm.toml
//! serial = "stdout"          # "stdout" (default), "none", or a file path
//!
//! [guest]                    # required by `wanmig run`
//! kind = "test"              # the built-in test guest (the only kind so far)
//! ws_mib = 16                # working set, MiB (default 16)
//! rate_mib = 0               # MiB/s of working-set pages dirtied (default 0 = idle)
//! flat_out = false           # dirty as fast as the vCPU can (overrides rate_mib)
//! disk_kib = 0               # KiB/s written to the first disk (default 0)
//! disk_mib = 1               # size of the disk region the guest cycles over (default 1)
//! disk_scatter = false       # scatter the 4 KiB writes over the region (default: in order)
//! poweroff_after_s = 30      # power off through ACPI after this many s (default: never)
//! reset_after_s = 30         # or reset through ACPI instead (default: never); 1 ..= 31536000
//!
//! [[disk]]                   # zero or more, at most 8; raw images
//! path = "disk.img"
//! read_only = false          # default false
//! ```
//!
//! Relative paths are relative to the directory of `vm.toml`. Unknown keys
//! are errors that name the key; so are impossible values.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::layout;

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
    /// What runs inside; required to boot (`wanmig run`), unused when the
    /// VM comes from a snapshot or a migration.
    pub guest: Option<GuestConfig>,
    /// Raw disk images, attached as virtio-blk devices in this order.
    pub disks: Vec<DiskConfig>,
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
    guest: Option<GuestConfig>,
    #[serde(default, rename = "disk")]
    disks: Vec<DiskConfig>,
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
        if let Some(GuestConfig::Test(t)) = &raw.guest {
            check_test_guest(t, raw.memory_mib, disks_configured).map_err(|(key, reason)| invalid(key, reason))?;
        }
        if raw.disks.len() > layout::VIRTIO_MMIO_SLOTS {
            return Err(invalid("disk", format!("{} disks; at most {}", raw.disks.len(), layout::VIRTIO_MMIO_SLOTS)));
        }
        let disks = raw.disks.iter().map(|d| DiskConfig { path: resolve(&d.path), read_only: d.read_only }).collect();
        Ok(VmConfig {
            name: raw.name,
            memory_mib: raw.memory_mib,
            vcpus,
            control_socket,
            serial,
            guest: raw.guest,
            disks,
        })
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
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
                poweroff_after_s: None,
                reset_after_s: None,
            }))
        );
        let c = parse(&GOOD.replace("disk_kib = 8", "disk_kib = 8\npoweroff_after_s = 3")).expect("valid");
        let Some(GuestConfig::Test(t)) = c.guest else { panic!("test guest") };
        assert_eq!((t.poweroff_after_s, t.reset_after_s), (Some(3), None));
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
        let no_disk = GOOD.replace("[[disk]]\n        path = \"d.img\"", "");
        assert!(error_of(&no_disk).contains("`guest.disk_kib`"));
    }
}
