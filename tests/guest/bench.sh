#!/usr/bin/env bash
# Benchmark: guest dd of 128 MiB (O_DIRECT, bs=1M) write and read through
# our xHCI over vfio-user and through QEMU's built-in qemu-xhci +
# usb-storage, same QEMU, same kernel, same image size, in one run.
# Prints MiB/s of both and the ratio, module load -> /dev/sda, and our
# register accesses per MiB. Usage: bench.sh [KERNEL_VERSION]
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

ours() { # $1 mode -> guest log $W/ours-$1.log, server log $W/dm-$1.log
  start_dm "$DM" "$W" false "$W/dm-$1.log"
  APPEND="stick_bytes=$STICK mode=$1" "$HERE/boot.sh" "$K" "$W/ours-$1.log" \
    -device "$(vfio_dev "$W")"
  stop_dm
}
qemu() {
  APPEND="stick_bytes=$STICK mode=bench" "$HERE/boot.sh" "$K" "$W/qemu.log" \
    -device qemu-xhci,id=xhci -drive if=none,id=stick,file="$W/stick.img",format=raw \
    -device usb-storage,bus=xhci.0,drive=stick
}
echo "bench: kernel $K, QEMU $QEMU_VERSION, $(nproc) CPUs, $(date -u +%F)" >&2
ours enum; ours bench; qemu
ow=$(metric write_ms "$W/ours-bench.log"); orr=$(metric read_ms "$W/ours-bench.log")
qw=$(metric write_ms "$W/qemu.log"); qr=$(metric read_ms "$W/qemu.log")
osda=$(metric sda_ms "$W/ours-bench.log"); qsda=$(metric sda_ms "$W/qemu.log")
a_enum=$(accesses "$W/dm-enum.log"); a_bench=$(accesses "$W/dm-bench.log")
python3 - "$ow" "$orr" "$qw" "$qr" "$osda" "$qsda" "$a_enum" "$a_bench" <<'PY'
import sys
ow, orr, qw, qr, osda, qsda, ae, ab = map(int, sys.argv[1:])
mibps = lambda ms: 128 * 1000.0 / ms
print("| | xen-usb-dm (vfio-user) | QEMU qemu-xhci | ratio (ours/QEMU) |")
print("|---|---|---|---|")
print(f"| write 128 MiB, O_DIRECT bs=1M | {mibps(ow):.1f} MiB/s ({ow} ms) | {mibps(qw):.1f} MiB/s ({qw} ms) | {qw/ow:.2f} |")
print(f"| read 128 MiB, O_DIRECT bs=1M | {mibps(orr):.1f} MiB/s ({orr} ms) | {mibps(qr):.1f} MiB/s ({qr} ms) | {qr/orr:.2f} |")
print(f"| module load -> /dev/sda | {osda} ms | {qsda} ms | |")
print(f"| register accesses, enumeration | {ae} | | |")
print(f"| register accesses per MiB of I/O | {(ab-ae)/1280:.1f} | | |")
PY
