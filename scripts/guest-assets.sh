#!/usr/bin/env bash
# Builds the Linux test guest from Debian packages into OUT_DIR (default
# $WANMIG_GUEST_DIR, else /var/tmp/wanmig-guest):
#
#   vmlinuz            Debian's cloud kernel (bzImage), as packaged
#   vmlinux            the same kernel as an uncompressed ELF (PVH entry)
#   config             its configuration, for reference
#   modules/           the virtio-mmio, virtio-blk and virtio-net modules and
#                      their dependencies, with load-order and builtin lists
#   wanmig-workload    tests/linux-guest/workload.c, static
#   initramfs.cpio.gz  BusyBox, the modules, the workload, tests/linux-guest/init
#   data.img           256 MiB ext4 data disk of real files (/dev/vda in the guest)
#   linux.toml         a vm.toml that boots all of it with `wanmig run`
#
# Idempotent: OUT_DIR/.stamp records, for each part, the inputs it was built
# from (kernel version, this script's hash, the guest sources); a part is
# rebuilt only when they change or its files are gone. data.img is also
# rebuilt when a run of the VM has written to it, so that it stays a known
# sample. The tools come from scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-${WANMIG_GUEST_DIR:-/var/tmp/wanmig-guest}}
src=$PWD/tests/linux-guest
say() { echo "guest-assets: $*"; }
started=$SECONDS

missing=()
for tool in apt-get dpkg depmod readelf lz4 xz zstd gzip gcc cpio mkfs.ext4 flock; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
bb_applets=$(/bin/busybox --list 2>/dev/null) || missing+=(busybox-static)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
if ((${#missing[@]})); then
    echo "guest-assets: missing ${missing[*]}: run scripts/setup.sh" >&2
    exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
# Setup and a test may both call this script; one at a time per OUT_DIR.
exec 9>"$out/.lock"
flock 9
tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/wanmig-guest-build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# Timestamps and ids inside the initramfs and the image, so that the same
# inputs give the same bytes.
epoch=${SOURCE_DATE_EPOCH:-1704067200} # 2024-01-01
data_uuid=5a1d7e3c-4b2f-4e8a-9c61-0d3f2a7b9e15
self_hash=$(sha256sum "$0" | cut -c1-16)

stamp=$out/.stamp
stamp_get() { awk -v k="$1" '$1 == k { sub(/^[^ ]+ /, ""); print }' "$stamp" 2>/dev/null || true; }
stamp_set() {
    { grep -v "^$1 " "$stamp" 2>/dev/null || true; echo "$1 $2"; } >"$stamp.tmp"
    mv "$stamp.tmp" "$stamp"
}

# ---------------------------------------------------------------- kernel

# The newest cloud kernel is what the linux-image-cloud-amd64 meta package
# depends on (its candidate version; run `apt-get update` to move on).
resolve_kernel() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
kpkg=$(resolve_kernel)
if [ -z "$kpkg" ]; then
    apt-get update -qq
    kpkg=$(resolve_kernel)
fi
[ -n "$kpkg" ] || { echo "guest-assets: apt knows no linux-image-cloud-amd64" >&2; exit 1; }
krel=${kpkg#linux-image-}
krel=${krel%-unsigned}
kver=$(apt-cache show --no-all-versions "$kpkg" | awk '$1 == "Version:" { print $2; exit }')

# Modules the guest needs: virtio over MMIO (found through ACPI), the block
# device and its ext4 file system, the NIC. Their dependencies are added
# from modules.dep; those built into the kernel are only listed.
modules_wanted=(virtio virtio_ring virtio_mmio virtio_blk virtio_net net_failover failover
    ext4 jbd2 mbcache crc16 crc32c_generic)

# Uncompresses a bzImage's payload into an ELF vmlinux, as the kernel's
# scripts/extract-vmlinux does, but locating the payload through the boot
# protocol header (payload_offset at 0x248, payload_length at 0x24c, from
# the protected-mode code that follows the setup sectors) rather than by
# scanning for magic numbers, which also match inside the setup code.
extract_vmlinux() {
    local bz=$1 elf=$2 setup_sects offset length start magic size
    setup_sects=$(od -An -tu1 -j $((0x1f1)) -N1 "$bz" | tr -d ' ')
    offset=$(od -An -tu4 -j $((0x248)) -N4 "$bz" | tr -d ' ')
    length=$(od -An -tu4 -j $((0x24c)) -N4 "$bz" | tr -d ' ')
    start=$(((setup_sects + 1) * 512 + offset))
    # Every compressor but gzip gets the uncompressed size appended (LE32,
    # the kernel's size_append); gzip's own trailer ends with it too.
    size=$(od -An -tu4 -j $((start + length - 4)) -N4 "$bz" | tr -d ' ')
    magic=$(od -An -tx1 -j "$start" -N6 "$bz" | tr -d ' \n')
    local -a unpack
    case $magic in
    1f8b*) unpack=(gzip -dc) ;;
    fd377a585a00) unpack=(xz -dc) && length=$((length - 4)) ;;
    28b52ffd*) unpack=(zstd -dcq) && length=$((length - 4)) ;;
    02214c18*) unpack=(lz4 -dc) && length=$((length - 4)) ;; # Debian 12: CONFIG_KERNEL_LZ4
    *) echo "guest-assets: $bz: unknown payload compression (magic $magic)" >&2 && return 1 ;;
    esac
    dd if="$bz" iflag=skip_bytes,count_bytes skip="$start" count="$length" status=none | "${unpack[@]}" >"$elf"
    if [ "$(stat -c %s "$elf")" != "$size" ]; then
        echo "guest-assets: $elf: $(stat -c %s "$elf") bytes, the bzImage says $size" >&2
        return 1
    fi
    readelf -h "$elf" >"$elf.header"
    if ! grep -q 'Class: *ELF64' "$elf.header" || ! grep -q 'Machine: *Advanced Micro Devices X86-64' "$elf.header"; then
        echo "guest-assets: $elf is not an x86-64 ELF64 file" >&2
        return 1
    fi
    rm "$elf.header"
}

# Puts the wanted modules and their dependencies, uncompressed, in $1 with
# load-order (dependencies first) and builtin (those in the kernel itself).
select_modules() {
    local dest=$1 moddir=$2 p n
    declare -A path_of=() deps_of=() builtin=() seen=()
    local -a order=() inside=()
    while IFS=: read -r p rest; do
        n=${p##*/} && n=${n%%.ko*} && n=${n//-/_}
        path_of[$n]=$p
        deps_of[$n]=$rest
    done <"$moddir/modules.dep"
    while read -r p; do
        n=${p##*/} && n=${n%%.ko*} && n=${n//-/_}
        builtin[$n]=1
    done <"$moddir/modules.builtin"
    add() {
        local m=$1 d
        [ -z "${seen[$m]:-}" ] || return 0
        seen[$m]=1
        if [ -n "${builtin[$m]:-}" ]; then
            inside+=("$m")
            return 0
        fi
        [ -n "${path_of[$m]:-}" ] || { echo "guest-assets: kernel $krel has no module $m" >&2 && return 1; }
        for d in ${deps_of[$m]}; do
            d=${d##*/} && d=${d%%.ko*} && add "${d//-/_}"
        done
        order+=("$m")
    }
    for n in "${modules_wanted[@]}"; do add "$n"; done
    mkdir -p "$dest"
    for n in "${order[@]}"; do
        p=$moddir/${path_of[$n]}
        # BusyBox insmod loads plain .ko files only.
        case $p in
        *.ko.xz) xz -dc "$p" ;;
        *.ko.zst) zstd -dcq "$p" ;;
        *.ko.gz) gzip -dc "$p" ;;
        *) cat "$p" ;;
        esac >"$dest/$n.ko"
        echo "$n.ko" >>"$dest/load-order"
    done
    printf '%s\n' "${inside[@]}" >"$dest/builtin"
}

kernel_key="$krel $kver $self_hash"
if [ "$(stamp_get kernel)" != "$kernel_key" ] || [ ! -s "$out/vmlinux" ] || [ ! -s "$out/modules/load-order" ]; then
    say "kernel $krel ($kver): downloading"
    mkdir -p "$tmp/deb"
    # The signed image when the archive has it, else the unsigned one; both
    # hold the same kernel and modules. (-o Sandbox: apt's _apt user cannot
    # write the temporary directory.)
    for p in "linux-image-$krel" "linux-image-$krel-unsigned"; do
        (cd "$tmp/deb" && apt-get download -qq -o APT::Sandbox::User=root "$p" 2>/dev/null) && break
    done
    ls "$tmp"/deb/*.deb >/dev/null 2>&1 || { echo "guest-assets: cannot download linux-image-$krel" >&2 && exit 1; }
    dpkg -x "$tmp"/deb/*.deb "$tmp/pkg"
    # The package ships no modules.dep (its postinst runs depmod): make one.
    depmod -b "$tmp/pkg" "$krel"
    mkdir -p "$tmp/kernel"
    cp "$tmp/pkg/boot/vmlinuz-$krel" "$tmp/kernel/vmlinuz"
    cp "$tmp/pkg/boot/config-$krel" "$tmp/kernel/config"
    extract_vmlinux "$tmp/kernel/vmlinuz" "$tmp/kernel/vmlinux"
    select_modules "$tmp/kernel/modules" "$tmp/pkg/lib/modules/$krel"
    rm -rf "$out/modules"
    mv "$tmp/kernel/"* "$out/"
    stamp_set kernel "$kernel_key"
fi

# ------------------------------------------------------------- initramfs

# Applets /init uses, and a few for whoever gets the shell (wanmig.shell=1).
applets=(sh mount umount cat seq sleep df awk ip insmod uname kill sync poweroff reboot setsid cttyhack
    ls ps dmesg free grep sed head tail wc ping nc vi lsmod mkdir rm cp mv ln dd sha256sum)

busybox_ver=$(dpkg-query -W -f '${Version}' busybox-static)
initramfs_key=$(cat "$0" "$src/init" "$src/workload.c" <(echo "$kernel_key $busybox_ver $(gcc -dumpfullversion)") |
    sha256sum | cut -c1-16)
if [ "$(stamp_get initramfs)" != "$initramfs_key" ] || [ ! -s "$out/initramfs.cpio.gz" ]; then
    say "initramfs: building"
    gcc -static -O2 -s -Wall -Wextra -o "$tmp/wanmig-workload" "$src/workload.c"
    root=$tmp/initramfs
    mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,data,root,lib/modules}
    cp "$src/init" "$root/init"
    cp /bin/busybox "$root/bin/"
    for a in "${applets[@]}"; do
        grep -qx "$a" <<<"$bb_applets" || { echo "guest-assets: busybox has no $a" >&2 && exit 1; }
        ln -s busybox "$root/bin/$a"
    done
    cp "$tmp/wanmig-workload" "$root/bin/"
    cp "$out"/modules/*.ko "$out/modules/load-order" "$root/lib/modules/"
    # The kernel opens /dev/console before /init runs, to give it its
    # stdin/out/err; without the node /init would start with none.
    mknod -m 600 "$root/dev/console" c 5 1
    find "$root" -exec touch -h -d "@$epoch" {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -9n) >"$tmp/initramfs.cpio.gz"
    mv "$tmp/wanmig-workload" "$tmp/initramfs.cpio.gz" "$out/"
    stamp_set initramfs "$initramfs_key"
fi

# ------------------------------------------------------------- data disk

# Real files (documentation, manual pages, the Python library: text,
# compressed and binary data), at most this many MiB from each tree, taken
# in sorted order; every tenth file is also stored a second time under
# dup/, so that the image holds content a deduplicating copy can find
# twice. Then free space, all zeros.
python_lib=$(printf '%s\n' /usr/lib/python3.[0-9]* | sort -V | tail -1)
data_sources=("/usr/share/doc 60" "/usr/share/man 10" "$python_lib 50")
data_mib=256

data_key="$self_hash"
data_state() { stat -c '%s.%Y' "$out/data.img" 2>/dev/null; }
recorded=$(stamp_get data)
if [ "$recorded" != "$data_key $(data_state)" ]; then
    say "data.img: building (${data_mib} MiB)"
    tree=$tmp/data
    mkdir -p "$tree/dup"
    i=0
    for entry in "${data_sources[@]}"; do
        dir=${entry% *} cap=$((${entry##* } * 1024 * 1024)) total=0
        name=${dir##*/}
        while IFS= read -r -d '' rec; do
            size=${rec%% *} f=${rec#* }
            ((total + size <= cap)) || continue
            total=$((total + size))
            printf '%s\0' "$f"
            if ((++i % 10 == 0)); then printf '%s\0' "$name/$f" >&3; fi
        done < <(find "$dir" -type f -readable -printf '%s %P\0' | LC_ALL=C sort -z -k2) >"$tmp/list" 3>>"$tmp/dups"
        mkdir -p "$tree/$name"
        (cd "$dir" && cpio -0 -pdm --quiet "$tree/$name" <"$tmp/list")
    done
    i=0
    while IFS= read -r -d '' f; do
        i=$((i + 1))
        cp "$tree/$f" "$tree/dup/$(printf %05d $i)-${f##*/}"
    done <"$tmp/dups"
    chmod -R u=rwX,go=rX "$tree"
    find "$tree" -exec touch -h -d "@$epoch" {} +
    truncate -s "${data_mib}M" "$tmp/data.img"
    # mke2fs 1.47.0 takes each inode's ctime from the tree, which touch
    # cannot set: two builds from the same files differ in those alone.
    E2FSPROGS_FAKE_TIME=$epoch SOURCE_DATE_EPOCH=$epoch mkfs.ext4 -q -F -b 4096 -i 8192 -L wanmig-data -U "$data_uuid" \
        -E "hash_seed=$data_uuid,root_owner=0:0,nodiscard" -d "$tree" "$tmp/data.img"
    touch -d "@$epoch" "$tmp/data.img"
    mv "$tmp/data.img" "$out/data.img"
    say "data.img: $(du -s --apparent-size -m "$tree" | cut -f1) MiB of files ($(find "$tree" -type f | wc -l) files, $(find "$tree/dup" -type f | wc -l) stored twice)"
    stamp_set data "$data_key $(data_state)"
fi

# ----------------------------------------------------------- linux.toml

cat >"$tmp/linux.toml" <<EOF
# The Linux test guest built by scripts/guest-assets.sh: \`wanmig run linux.toml\`.
# The vm.toml format of vmm/src/config.rs: [guest] kind = "linux" (kernel,
# initrd, cmdline), [[disk]], [[net]] (tap, mac, ip, gateway). The kernel
# takes no address from [[net]]: the wanmig.ip/wanmig.gw keys of cmdline
# (tests/linux-guest/init) must say the same. The guest writes to data.img;
# guest-assets.sh puts the pristine image back on its next run.
name = "linux"
memory_mib = 512
vcpus = 1
serial = "stdout"

# On a software KVM (PVM) that cannot emulate cmpxchg16b and xrstor, add
# [cpu] hide = ["cx16"] and "noxsave" to cmdline (see tests/integration/linux.rs).

[guest]
kind = "linux"
kernel = "vmlinux"
initrd = "initramfs.cpio.gz"
cmdline = "console=ttyS0 reboot=k panic=1 pci=off wanmig.ip=10.0.0.2/24 wanmig.gw=10.0.0.1 wanmig.ws_mib=64 wanmig.rate_mib=8 wanmig.disk_kib=64"

[[disk]]
path = "data.img"

[[net]]
tap = "wanmig0"
mac = "52:54:00:00:00:02"
ip = "10.0.0.2/24"
gateway = "10.0.0.1"
EOF
cmp -s "$tmp/linux.toml" "$out/linux.toml" || mv "$tmp/linux.toml" "$out/linux.toml"

say "ok: $out (kernel $krel, $((SECONDS - started)) s)"
