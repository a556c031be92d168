#!/usr/bin/env bash
# Where the time of a mass-storage command goes: boots the bench guest
# (128 MiB dd write/read, O_DIRECT, bs=1M, five times) once against our
# xHCI over vfio-user with per-access timeline tracing, once against QEMU's
# qemu-xhci + usb-storage with QEMU's xHCI trace events, and prints the
# per-phase medians of a Bulk-Only command for both (phases.py).
# Tracing slows both sides a little; compare phases, not throughput.
# Usage: phases.sh [KERNEL_VERSION]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/lib.sh"
eval "$("$HERE/fetch.sh" 2>/dev/null)"
K=${1:-${KERNELS%% *}}
(cd "$ROOT" && cargo build --release -q -p devmodel)
STICK=$((256 << 20))
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
truncate -s $STICK "$W/stick.img"
export XEN_USB_DM_TIMELINE=$W/timeline.txt
start_dm "$ROOT/target/release/xen-usb-dm" "$W" false "$W/dm.log"
unset XEN_USB_DM_TIMELINE
APPEND="stick_bytes=$STICK mode=bench" "$HERE/boot.sh" "$K" "$W/ours.log" -device "$(vfio_dev "$W")"
stop_dm
APPEND="stick_bytes=$STICK mode=bench" "$HERE/boot.sh" "$K" "$W/qemu.log" \
  -device qemu-xhci,id=xhci -drive if=none,id=stick,file="$W/stick.img",format=raw \
  -device usb-storage,bus=xhci.0,drive=stick -msg timestamp=on -D "$W/qemu-trace.txt" \
  -trace 'usb_xhci_doorbell_*' -trace 'usb_xhci_runtime_*' -trace 'usb_xhci_oper_*'
echo "phases: kernel $K, QEMU $QEMU_VERSION, $(date -u +%F)"
python3 "$HERE/phases.py" "$W/timeline.txt" "$W/qemu-trace.txt"
