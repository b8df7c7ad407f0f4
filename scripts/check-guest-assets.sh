#!/usr/bin/env bash
# Boots the Linux test guest that scripts/guest-assets.sh built (vmlinuz,
# initramfs.cpio.gz, data.img in DIR, default $WANMIG_GUEST_DIR or
# /var/tmp/wanmig-guest) under QEMU and checks it: its console must show
# /init, the modules, the data disk mounted read-write, the NIC up, the
# workload's status lines and its own check; from the host, its TCP echo
# and UDP sequence services must answer through the NIC. Exits 1 on any
# failure, leaving the console log for reading.
#
# QEMU runs the guest with TCG, not KVM: this project's machines have a
# software KVM (PVM) that cannot run a stock kernel. The machine is microvm
# with ACPI, so that the virtio-mmio devices are declared to the kernel the
# way wanmig declares them (ACPI, not virtio_mmio.device= on the command line).
set -euo pipefail

dir=${1:-${WANMIG_GUEST_DIR:-/var/tmp/wanmig-guest}}
limit=${WANMIG_CHECK_TIMEOUT:-180} # seconds for the whole boot; TCG needs ~10
run_s=10                           # the guest's workload time before it powers off
started=$SECONDS
say() { echo "check-guest-assets: $*"; }
fail() {
    say "FAILED: $* (console: $log)" >&2
    exit 1
}

for f in vmlinuz initramfs.cpio.gz data.img; do
    [ -s "$dir/$f" ] || { say "$dir/$f is missing: run scripts/guest-assets.sh" >&2 && exit 1; }
done
command -v qemu-system-x86_64 >/dev/null || { say "qemu-system-x86_64 is missing: run scripts/setup.sh" >&2 && exit 1; }

log=$(mktemp /tmp/wanmig-guest-check.XXXXXX.log)
# Under TCG the guest's TSC is the host's. Telling the kernel its frequency
# spares it calibrating the TSC against the emulated PIT: on this busy
# 2-core machine QEMU is descheduled mid-measurement, the calibration fails
# and the boot hangs (2 boots in 3 at nice 19). tsc=reliable keeps the guest
# clock on the TSC, so its seconds are the host's.
tsc=$(awk '/^flags/ && / constant_tsc/ { c = 1 } /^cpu MHz/ && !m { m = $4 }
    END { if (c && m) printf "tsc_early_khz=%d tsc=reliable", m * 1000 }' /proc/cpuinfo)
# Host ports forwarded to the guest's TCP echo and UDP sequence services on
# port 7; random so that two checks can run at once.
tport=$((20000 + RANDOM % 20000))
uport=$((tport + 1))

# snapshot=on: the guest's writes go to a temporary overlay, data.img stays
# the pristine sample.
timeout "$limit" qemu-system-x86_64 -M microvm,acpi=on -accel tcg -m 512 -nographic -no-reboot \
    -kernel "$dir/vmlinuz" -initrd "$dir/initramfs.cpio.gz" \
    -append "console=ttyS0 $tsc wanmig.poweroff=1 wanmig.run_s=$run_s wanmig.ip=10.0.2.15/24 wanmig.gw=10.0.2.2 wanmig.ws_mib=64 wanmig.rate_mib=8 wanmig.disk_kib=64" \
    -drive id=data,file="$dir/data.img",format=raw,if=none,snapshot=on -device virtio-blk-device,drive=data \
    -netdev "user,id=net,hostfwd=tcp:127.0.0.1:$tport-:7,hostfwd=udp:127.0.0.1:$uport-:7" \
    -device virtio-net-device,netdev=net </dev/null >"$log" 2>&1 &
qemu=$!
trap 'kill "$qemu" 2>/dev/null || true' EXIT

# The workload prints its first line once its sockets are bound.
until grep -q '^wanmig-linux: workload:' "$log"; do
    kill -0 "$qemu" 2>/dev/null || fail "QEMU ended before the guest was ready"
    sleep 0.2
done
ready_s=$((SECONDS - started))

# TCP echo: one line out, the same line back.
probe="wanmig-echo-$RANDOM$RANDOM"
exec 3<>"/dev/tcp/127.0.0.1/$tport" || fail "cannot connect to the guest's TCP echo service"
echo "$probe" >&3
read -r -t 10 echoed <&3 || fail "no answer from the guest's TCP echo service"
exec 3>&-
[ "$echoed" = "$probe" ] || fail "TCP echo sent '$probe', got '$echoed'"

# UDP sequence service (vmm/testguest/abi.h): two requests; the replies
# carry the big-endian sequence numbers 1 and 2 (nobody else has asked),
# then the payload.
exec 4<>"/dev/udp/127.0.0.1/$uport"
for seq in 1 2; do
    payload="wanmig-seq-$seq"
    printf '%s' "$payload" >&4
    reply=$(timeout 10 head -c $((8 + ${#payload})) <&4 | od -An -tx1 -v | tr -d ' \n') ||
        fail "no answer from the guest's UDP sequence service"
    want=$(printf '%016x' "$seq")$(printf '%s' "$payload" | od -An -tx1 -v | tr -d ' \n')
    [ "$reply" = "$want" ] || fail "UDP request $seq: reply $reply, expected $want"
done
exec 4>&-

status=0
wait "$qemu" || status=$?
trap - EXIT
((status != 124)) || fail "the guest did not power off within ${limit} s"
((status == 0)) || fail "QEMU exited with status $status"

# The console, in the order /init prints it.
expect=(
    'wanmig-linux: init started'
    'wanmig-linux: insmod virtio_mmio$'
    'wanmig-linux: insmod virtio_blk$'
    'wanmig-linux: insmod virtio_net$'
    'wanmig-linux: modules loaded'
    'wanmig-linux: data disk /dev/vda mounted rw at /data'
    'wanmig-linux: net eth0 up .* ip 10.0.2.15/24 gw 10.0.2.2'
    'wanmig-linux: gateway 10.0.2.2 answers'
    'wanmig-linux: ready'
    'wanmig-linux: workload: mem 64 MiB at 8 MiB/s, disk 64 KiB/s'
    'wanmig-linux: check ok: .* mem_errors=0 disk_writes=[1-9][0-9]* tcp_conns=0 tcp_total=1 udp_replies=2$'
    'reboot: Power down'
)
console=$(tr -d '\r' <"$log")
line=0
for pattern in "${expect[@]}"; do
    at=$(awk -v after="$line" -v pattern="$pattern" 'NR > after && $0 ~ pattern { print NR; exit }' <<<"$console")
    [ -n "$at" ] || fail "no line matching '$pattern' after line $line"
    line=$at
done
grep -q 'insmod .* FAILED' <<<"$console" && fail "a module did not load"
steps=$(grep -c '^wanmig-linux: t=[0-9]* mem_steps=[1-9]' <<<"$console") || true
((steps >= run_s - 2)) || fail "only $steps workload status lines in ${run_s} s"

say "ok: ready after ${ready_s} s, powered off after $((SECONDS - started)) s; $steps status lines; TCP echo and UDP sequence answered"
rm -f "$log"
