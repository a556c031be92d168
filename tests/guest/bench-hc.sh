#!/usr/bin/env bash
# USB 2 / USB 1.1 controller benchmark: guest dd (O_DIRECT, bs=1M) write
# and read through our EHCI or UHCI over vfio-user and through QEMU's
# built-in controller (usb-ehci / piix3-usb-uhci) + usb-storage, same QEMU,
# same kernel, one run; our register accesses per MiB; and idle CPU with
# a stick and a keyboard attached and the guest idle for 30 s: our CPU, and
# the CPU QEMU's controller adds to an idle guest (QEMU with the
# controller + stick minus QEMU without USB).
# Usage: bench-hc.sh ehci|uhci [KERNEL_VERSION]
#   ehci: 128 MiB per dd, a high-speed stick, BOT, then both sticks with
#   UAS (ours uas = true, QEMU's usb-uas); uhci: 64 MiB, full speed
#   (QEMU's UHCI: one round instead of five; it is that slow).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
. "$HERE/lib.sh"
eval "$("$HERE/fetch.sh" 2>/dev/null)"
HCM=${1:?usage: bench-hc.sh ehci|uhci [KERNEL]}
K=${2:-${KERNELS%% *}}
case $HCM in
  ehci) MIB=128; QDEV=usb-ehci; QROUNDS=5 ;;
  # QEMU's UHCI moves about 1.2 MB/s: one round of it takes two minutes.
  uhci) MIB=64; QDEV=piix3-usb-uhci; QROUNDS=1 ;;
  *) echo "bench-hc.sh: ehci or uhci, not $HCM" >&2; exit 2 ;;
esac
(cd "$ROOT" && cargo build --release -q -p devmodel)
DM=$ROOT/target/release/xen-usb-dm
STICK=$((256 << 20))
W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
truncate -s $STICK "$W/stick.img"
export HC=$HCM

metric() { grep "^METRIC $1 " "$2" | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
accesses() { grep -o 'region_accesses=[0-9]*' "$1" | tail -1 | cut -d= -f2; }

ours() { # $1 mode, $2 tag
  start_dm "$DM" "$W" false "$W/dm-$2.log"
  APPEND="stick_bytes=$STICK mode=$1 hc=$HCM bench_mib=$MIB" "$HERE/boot.sh" "$K" "$W/ours-$2.log" \
    -device "$(vfio_dev "$W")"
  stop_dm
}
qemu() { # $1 tag, then the USB -device arguments
  local tag=$1; shift
  # (QEMU's usb-ehci has no MSI: the guest's msix check fails there.)
  APPEND="stick_bytes=$STICK mode=bench hc=$HCM bench_mib=$MIB bench_rounds=$QROUNDS" "$HERE/boot.sh" "$K" "$W/qemu-$tag.log" \
    -drive if=none,id=stick,file="$W/stick.img",format=raw "$@" || true
  grep -q '^METRIC write_ms' "$W/qemu-$tag.log" || { echo "QEMU $tag: no figures" >&2; tail -20 "$W/qemu-$tag.log" >&2; exit 1; }
}
echo "bench-hc: $HCM, kernel $K, QEMU $QEMU_VERSION, $(nproc) CPUs, $(date -u +%F)" >&2
ours enum enum; ours bench bench
qemu bench -device $QDEV,id=hc -device usb-storage,bus=hc.0,drive=stick
# EHCI: both sticks also with USB Attached SCSI at high speed (no streams,
# Read/Write Ready IUs; the guest's uas driver): ours with uas = true,
# QEMU's usb-uas + scsi-hd.
if [ "$HCM" = ehci ]; then
  UAS=true ours bench bench-uas
  ( qemu bench-uas -device $QDEV,id=hc -device usb-uas,id=uas,bus=hc.0 -device scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=stick ) \
    || echo "bench-hc: QEMU's usb-uas gave no figures (its rows are left out)" >&2
fi

# Idle: ours.
KBD=true start_dm "$DM" "$W" false "$W/dm-idle.log"; echo "$DM_PID" > "$W/dm.pid"
EXTRA_MODULES=drivers/input APPEND="stick_bytes=$STICK mode=idle hc=$HCM" "$HERE/boot.sh" "$K" "$W/ours-idle.log" -device "$(vfio_dev "$W")" &
bpid=$!
ours_idle=$(idle_cpu "$W/ours-idle.log" "$W/dm.pid"); wait $bpid || true; stop_dm
grep -q "IDLE-HID bound and open" "$W/ours-idle.log" || { echo "bench-hc: the guest's usbhid did not bind our keyboard" >&2; exit 1; }
# Idle: QEMU with its controller + stick + usb-kbd, and without USB.
q_with=$(qemu_idle "$K" "$W/q-idle-$HCM.log" "stick_bytes=$STICK mode=idle hc=$HCM" -drive if=none,id=stick,file="$W/stick.img",format=raw -device $QDEV,id=hc -device usb-storage,bus=hc.0,drive=stick -device usb-kbd,bus=hc.0)
q_without=$(qemu_idle "$K" "$W/q-idle-none.log" "stick_bytes=$STICK mode=idle hc=none")
m() { metric "$1" "$W/$2.log"; }
a_enum=$(accesses "$W/dm-enum.log"); a_bench=$(accesses "$W/dm-bench.log")
python3 - "$(m write_ms ours-bench)" "$(m read_ms ours-bench)" "$(m write_ms qemu-bench)" "$(m read_ms qemu-bench)" \
  "$(m sda_ms ours-bench)" "$(m sda_ms qemu-bench)" "$a_enum" "$a_bench" "$ours_idle" "$q_with" "$q_without" \
  "$HCM" "$QDEV" "$MIB" \
  "$(m write_ms ours-bench-uas 2>/dev/null)" "$(m read_ms ours-bench-uas 2>/dev/null)" \
  "$(m write_ms qemu-bench-uas 2>/dev/null)" "$(m read_ms qemu-bench-uas 2>/dev/null)" <<'PY'
import sys
ow, orr, qw, qr, osda, qsda, ae, ab = map(int, sys.argv[1:9])
oi, qi, q0 = map(float, sys.argv[9:12])
hc, qdev, mib = sys.argv[12], sys.argv[13], int(sys.argv[14])
mibps = lambda ms: mib * 1000.0 / ms
cell = lambda ms: f"{mibps(ms):.1f} MiB/s ({ms} ms)"
print(f"| {mib} MiB, O_DIRECT bs=1M | xen-usb-dm {hc.upper()} (vfio-user) | QEMU {qdev} + usb-storage | ratio (ours/QEMU) |")
print("|---|---|---|---|")
print(f"| write | {cell(ow)} | {cell(qw)} | {qw/ow:.2f} |")
print(f"| read | {cell(orr)} | {cell(qr)} | {qr/orr:.2f} |")
uw, ur, quw, qur = (int(x) if x else 0 for x in sys.argv[15:19])
if uw and ur:
    print(f"| write, our stick with UAS (vs QEMU usb-storage) | {cell(uw)} | {cell(qw)} | {qw/uw:.2f} |")
    print(f"| read, our stick with UAS (vs QEMU usb-storage) | {cell(ur)} | {cell(qr)} | {qr/ur:.2f} |")
if uw and ur and quw and qur:
    print(f"| write, UAS both (QEMU usb-uas) | {cell(uw)} | {cell(quw)} | {quw/uw:.2f} |")
    print(f"| read, UAS both (QEMU usb-uas) | {cell(ur)} | {cell(qur)} | {qur/ur:.2f} |")
print(f"| module load -> /dev/sda | {osda} ms | {qsda} ms | |")
print(f"| register accesses, enumeration | {ae} | | |")
print(f"| register accesses per MiB of I/O | {(ab-ae)/(10*mib):.1f} | | |")
print(f"| idle CPU, stick + keyboard attached (usbhid bound), guest idle 20 s (% of a core) | {oi:.2f} (our process) | {qi - q0:.2f} (QEMU with {qdev} minus without: {qi:.2f} - {q0:.2f}) | |")
PY
