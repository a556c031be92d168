#!/usr/bin/env bash
# Benchmark: guest dd of 128 MiB (O_DIRECT, bs=1M) write and read through
# our xHCI over vfio-user and through QEMU's built-in qemu-xhci +
# usb-storage, same QEMU, same kernel, same image size, in one run; then
# the same with both sticks speaking UAS (ours with uas = true, QEMU's
# usb-uas + scsi-hd). Prints MiB/s of each and the ratios, module load ->
# /dev/sda, and our register accesses per MiB (BOT).
# Usage: bench.sh [KERNEL_VERSION]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/lib.sh"
eval "$("$HERE/fetch.sh" 2>/dev/null)"
K=${1:-${KERNELS%% *}}
(cd "$ROOT" && cargo build --release -q -p devmodel)
DM=$ROOT/target/release/xen-usb-dm
STICK=$((256 << 20))
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
truncate -s $STICK "$W/stick.img"

metric() { grep "^METRIC $1 " "$2" | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }  # median of runs
accesses() { grep -o 'region_accesses=[0-9]*' "$1" | tail -1 | cut -d= -f2; }

ours() { # $1 mode, $2 log tag -> guest log $W/ours-$2.log, server log $W/dm-$2.log
  start_dm "$DM" "$W" false "$W/dm-$2.log"
  APPEND="stick_bytes=$STICK mode=$1 ${GUEST_ARGS:-}" "$HERE/boot.sh" "$K" "$W/ours-$2.log" \
    -device "$(vfio_dev "$W")"
  stop_dm
}
qemu() { # $1 log tag, then the USB stick's -device arguments
  local tag=$1; shift
  APPEND="stick_bytes=$STICK mode=bench ${GUEST_ARGS:-}" "$HERE/boot.sh" "$K" "$W/qemu-$tag.log" \
    -device qemu-xhci,id=xhci -drive if=none,id=stick,file="$W/stick.img",format=raw "$@"
}
echo "bench: kernel $K, QEMU $QEMU_VERSION, $(nproc) CPUs, $(date -u +%F)" >&2
ours enum enum; ours bench bot
qemu bot -device usb-storage,bus=xhci.0,drive=stick
UAS=true GUEST_ARGS=stick_proto=uas ours bench uas
GUEST_ARGS=stick_proto=uas qemu uas -device usb-uas,id=uas,bus=xhci.0 -device scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=stick
m() { metric "$1" "$W/$2.log"; }
a_enum=$(accesses "$W/dm-enum.log"); a_bench=$(accesses "$W/dm-bot.log")
python3 - "$(m write_ms ours-bot)" "$(m read_ms ours-bot)" "$(m write_ms qemu-bot)" "$(m read_ms qemu-bot)" \
  "$(m write_ms ours-uas)" "$(m read_ms ours-uas)" "$(m write_ms qemu-uas)" "$(m read_ms qemu-uas)" \
  "$(m sda_ms ours-bot)" "$(m sda_ms qemu-bot)" "$a_enum" "$a_bench" <<'PY'
import sys
ow, orr, qw, qr, uw, ur, vw, vr, osda, qsda, ae, ab = map(int, sys.argv[1:])
mibps = lambda ms: 128 * 1000.0 / ms
cell = lambda ms: f"{mibps(ms):.1f} MiB/s ({ms} ms)"
print("| 128 MiB, O_DIRECT bs=1M | xen-usb-dm (vfio-user) | QEMU built-in | ratio (ours/QEMU) |")
print("|---|---|---|---|")
print(f"| write, Bulk-Only (QEMU: qemu-xhci + usb-storage) | {cell(ow)} | {cell(qw)} | {qw/ow:.2f} |")
print(f"| read, Bulk-Only | {cell(orr)} | {cell(qr)} | {qr/orr:.2f} |")
print(f"| write, UAS (QEMU: qemu-xhci + usb-uas) | {cell(uw)} | {cell(vw)} | {vw/uw:.2f} |")
print(f"| read, UAS | {cell(ur)} | {cell(vr)} | {vr/ur:.2f} |")
print(f"| module load -> /dev/sda (BOT) | {osda} ms | {qsda} ms | |")
print(f"| register accesses, enumeration | {ae} | | |")
print(f"| register accesses per MiB of I/O (BOT) | {(ab-ae)/1280:.1f} | | |")
PY
