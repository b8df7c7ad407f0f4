#!/usr/bin/env bash
# Installs what building and testing wanmig needs on a fresh Debian 12 host
# (run as root). Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
# gcc + binutils build the built-in test guest (vmm/build.rs).
command -v gcc >/dev/null || need_apt+=(gcc)
command -v ld >/dev/null && command -v objcopy >/dev/null || need_apt+=(binutils)
# QEMU boots the test guest in a test that checks it is a standard kernel.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# iasl (the ACPI reference disassembler) checks the VMM's ACPI tables in a test.
command -v iasl >/dev/null || need_apt+=(acpica-tools)
# The chunk store links the distribution's RocksDB (.cargo/config.toml); the
# rocksdb crate generates its bindings from its header with bindgen, which
# needs libclang. g++ links the C++ runtime RocksDB needs.
command -v g++ >/dev/null || need_apt+=(g++)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
dpkg -s librocksdb-dev >/dev/null 2>&1 || need_apt+=(librocksdb-dev)
# systemd-analyze checks the shipped timer units (deploy/systemd); it
# works on unit files whether or not systemd runs this machine.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The Linux test guest (scripts/guest-assets.sh): BusyBox and a static C
# library for its initramfs and workload, depmod for its modules, lz4 for
# Debian's kernel payload (xz and zstd for kernels and modules packed with
# those), cpio, and mkfs.ext4 for its data disk.
for p in busybox-static libc6-dev kmod lz4 xz-utils zstd cpio e2fsprogs; do
    dpkg -s "$p" >/dev/null 2>&1 || need_apt+=("$p")
done
if ((${#need_apt[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi

# Downloads and builds the Linux test guest into /var/tmp/wanmig-guest, or
# does nothing when it is up to date.
bash "$(dirname "$0")/guest-assets.sh"

if [ ! -c /dev/kvm ]; then
    echo "setup: WARNING: /dev/kvm is missing; the KVM integration tests will fail" >&2
fi
echo "setup: ok"
