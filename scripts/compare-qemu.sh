#!/usr/bin/env bash
# wanmig against QEMU 7.2, side by side: the same test guest, the same disk
# image of real files, the same emulated WAN link. A benchmark: it prints
# figures and writes them down, and asserts nothing.
#
#   scripts/compare-qemu.sh [--quick] [options of bench/compare_qemu.py]
#
# Root (network namespaces, TAP devices, KVM). It builds wanmig and the link
# emulator's program (release), writes the test guest, builds the 1 GiB data
# image once (below), installs matplotlib into a virtualenv if it is
# missing, then runs bench/compare_qemu.py, which writes
# bench/results/compare-<date>.{md,json,png}. --quick runs a subset (one
# profile, the idle guest, wanmig and QEMU's multifd+zstd) as a smoke test.
# Everything it creates in the network stack is named cmpq-* and removed
# when it ends, however it ends.
#
# The data image (cached in $CMPQ_CACHE, default /var/tmp/wanmig-compare):
# 1 GiB raw; its first 64 MiB are zeros, the region the test guest writes
# (disk_mib = 64), and an ext4 file system of real files from /usr fills
# the rest (built as scripts/guest-assets.sh builds data.img, larger:
# documentation, manual pages, the Python library, shared libraries and
# programs, every tenth file stored twice under dup/; files with other
# hard links are left out, as mke2fs would store them once), so the guest's
# writes never clobber the files a deduplicating copy may find.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "$(id -u)" != 0 ]; then
    echo "compare-qemu: needs root (network namespaces, TAP devices, /dev/kvm)" >&2
    exit 2
fi
for tool in qemu-system-x86_64 ip mkfs.ext4 python3 cargo; do
    command -v "$tool" >/dev/null || { echo "compare-qemu: $tool is missing (scripts/setup.sh installs it)" >&2; exit 2; }
done
[ -c /dev/kvm ] || { echo "compare-qemu: /dev/kvm is missing" >&2; exit 2; }

cache=${CMPQ_CACHE:-/var/tmp/wanmig-compare}
mkdir -p "$cache"
exec 9>"$cache/.lock"
if ! flock -n 9; then
    echo "compare-qemu: another compare-qemu run holds $cache/.lock" >&2
    exit 2
fi

# Namespaces of an earlier run that was killed too hard to clean up (ours
# alone: we hold the lock).
cleanup_netns() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^cmpq-' || true); do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}
cleanup_netns
trap cleanup_netns EXIT

echo "compare-qemu: building wanmig and linkem-run (release)"
cargo build --release --locked -q -p wanmig -p wanmig-bench
target=${CARGO_TARGET_DIR:-$root/target}
wanmig=$target/release/wanmig
linkem=$target/release/linkem-run
"$wanmig" testguest --write "$cache/guest.elf" >/dev/null

# ------------------------------------------------------------- data image
image=$cache/data-1g.img
region_mib=64
image_key="v2 region=$region_mib"  # bump when the recipe below changes
if [ "$(cat "$image.key" 2>/dev/null)" != "$image_key" ] || [ ! -s "$image" ]; then
    echo "compare-qemu: building $image (1 GiB: $region_mib MiB for the guest's writes, then ext4 of files from /usr)"
    tmp=$(mktemp -d "$cache/build.XXXXXX")
    tree=$tmp/tree
    mkdir -p "$tree/dup"
    python_lib=$(printf '%s\n' /usr/lib/python3.[0-9]* | sort -V | tail -1)
    sources=("/usr/share/doc 120" "/usr/share/man 90" "$python_lib 60" "/usr/lib/x86_64-linux-gnu 200" "/usr/bin 60")
    : >"$tmp/dups"
    i=0
    for entry in "${sources[@]}"; do
        dir=${entry% *} cap=$((${entry##* } * 1024 * 1024)) total=0
        name=${dir##*/}
        while IFS= read -r -d '' rec; do
            size=${rec%% *} f=${rec#* }
            ((total + size <= cap)) || continue
            total=$((total + size))
            printf '%s\0' "$f"
            if ((++i % 10 == 0)); then printf '%s\0' "$name/$f" >&3; fi
        done < <(find "$dir" -type f -links 1 -readable -printf '%s %P\0' | LC_ALL=C sort -z -k2) >"$tmp/list" 3>>"$tmp/dups"
        mkdir -p "$tree/$name"
        (cd "$dir" && cpio -0 -pdm --quiet "$tree/$name" <"$tmp/list")
    done
    i=0
    while IFS= read -r -d '' f; do
        i=$((i + 1))
        cp "$tree/$f" "$tree/dup/$(printf %05d $i)-${f##*/}"
    done <"$tmp/dups"
    chmod -R u=rwX,go=rX "$tree"
    truncate -s $((1024 - region_mib))M "$tmp/fs.img"
    mkfs.ext4 -q -F -b 4096 -i 8192 -L wanmig-cmp -E root_owner=0:0,nodiscard -d "$tree" "$tmp/fs.img"
    truncate -s 1G "$tmp/data.img"
    dd if="$tmp/fs.img" of="$tmp/data.img" bs=1M seek=$region_mib conv=notrunc,sparse status=none
    files=$(find "$tree" -type f | wc -l) dups=$(find "$tree/dup" -type f | wc -l)
    mib=$(du -s --apparent-size -m "$tree" | cut -f1)
    echo "{\"files\": $files, \"files_stored_twice\": $dups, \"file_mib\": $mib, \"guest_region_mib\": $region_mib," \
        "\"allocated_mib\": $(($(stat -c %b "$tmp/data.img") * 512 / 1048576))}" >"$image.info"
    mv "$tmp/data.img" "$image"
    echo "$image_key" >"$image.key"
    rm -rf "$tmp"
fi
echo "compare-qemu: data image: $(cat "$image.info")"

# ------------------------------------------------------------- matplotlib
py=python3
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    venv=$cache/venv
    if ! "$venv/bin/python3" -c 'import matplotlib' 2>/dev/null; then
        echo "compare-qemu: installing matplotlib into $venv (for the chart)"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q matplotlib
    fi
    py=$venv/bin/python3
fi

"$py" "$root/bench/compare_qemu.py" \
    --wanmig "$wanmig" --linkem "$linkem" --guest "$cache/guest.elf" \
    --image "$image" --image-info "$image.info" --region-mib "$region_mib" \
    --work "$cache/work" --out "$root/bench/results" --invocation "$*" "$@"
