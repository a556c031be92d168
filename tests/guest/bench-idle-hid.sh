#!/usr/bin/env bash
# Idle cost of emulated input devices: a guest with a keyboard and a tablet
# (usbhid bound, both evdev nodes held open, as a desktop would: usbhid
# then keeps an interrupt IN transfer queued on each) idles 30 s; over 20 s
# of it, the CPU of our process (keyboard + tablet on our controller over
# vfio-user), and the CPU QEMU's own controller with usb-kbd + usb-tablet
# adds to the same idle guest (QEMU with them minus QEMU without USB), same
# QEMU, same kernel, one run. Prints a Markdown table row per controller.
# Usage: bench-idle-hid.sh [CONTROLLERS (default "xhci ehci uhci")] [KERNEL]
# (BENCH_KEEP=DIR: work in DIR and keep it: the logs, our stats lines)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/lib.sh"
eval "$("$HERE/fetch.sh" 2>/dev/null)"
HCS=${1:-xhci ehci uhci}
K=${2:-${KERNELS%% *}}
(cd "$ROOT" && cargo build --release -q -p devmodel)
DM=$ROOT/target/release/xen-usb-dm
W=${BENCH_KEEP:-$(mktemp -d)}; [ -n "${BENCH_KEEP:-}" ] || trap 'rm -rf "$W"' EXIT
bound() { # LOG: how many HID nodes the guest held open
  grep -c 'IDLE-HID bound and open' "$1" || true
}
echo "bench-idle-hid: kernel $K, QEMU $QEMU_VERSION, $(nproc) CPUs, $(date -u +%F)" >&2
q0=$(qemu_idle "$K" "$W/q-none.log" "mode=idle nostick=1 hc=none")
echo "| controller | ours: our process (% of a core) | QEMU's controller + usb-kbd + usb-tablet (QEMU with minus without USB) |"
echo "|---|---|---|"
for hc in $HCS; do
  case $hc in xhci) qdev=qemu-xhci ;; ehci) qdev=usb-ehci ;; uhci) qdev=piix3-usb-uhci ;; esac
  NOSTICK=true KBD=true TABLET=true HC=$hc start_dm "$DM" "$W" false "$W/dm-$hc.log"; echo "$DM_PID" > "$W/dm.pid"
  EXTRA_MODULES=drivers/input APPEND="mode=idle nostick=1 hc=$hc" "$HERE/boot.sh" "$K" "$W/ours-$hc.log" -device "$(vfio_dev "$W")" &
  b=$!
  ours=$(idle_cpu "$W/ours-$hc.log" "$W/dm.pid"); wait $b || true; stop_dm
  q=$(qemu_idle "$K" "$W/q-$hc.log" "mode=idle nostick=1 hc=$hc" \
      -device $qdev,id=hc -device usb-kbd,bus=hc.0 -device usb-tablet,bus=hc.0)
  no=$(bound "$W/ours-$hc.log") nq=$(bound "$W/q-$hc.log")
  if [ "$no" != 2 ] || [ "$nq" != 2 ]; then
    echo "bench-idle-hid: $hc: the guest held $no of our HID nodes and $nq of QEMU's open, not 2" >&2; exit 1
  fi
  awk -v hc="$hc" -v qd="$qdev" -v o="$ours" -v q="$q" -v z="$q0" \
    'BEGIN {printf "| %s | %.2f | %.2f (%s: %.2f - %.2f) |\n", hc, o, q - z, qd, q, z}'
done
