#!/usr/bin/env bash
# tests/firmware/run.sh [path/to/xen-usb-dm]
# The firmware matrix: firmware that boots from a USB stick, each driving
# OUR controller (xen-usb-dm over vfio-user in QEMU 11, TCG), not QEMU's.
# Each cell boots one firmware, waits for its marker on COM1 and kills
# QEMU. The stick (tests/firmware/images.sh, built from Debian packages
# and cached) has a tiny MBR that reads LBA 1..64 through INT 13h and a
# FAT partition with marker.txt and \EFI\BOOT\BOOTX64.EFI (GRUB, cats
# marker.txt); markers appear only if data really came off the stick.
#   seabios/*   QEMU's bios-256k.bin, INT 13h boot   marker LBA64-MARKER-OK
#   ovmf/*      OVMF_CODE_4M.fd, BOOTX64.EFI         marker USB-FILE-MARKER-7f3a
#   grub-native/ehci|uhci  GRUB i386-pc's own ehci/uhci+usbms  marker USB-FILE-MARKER-7f3a
#   u-boot/ehci qemu-x86_64 u-boot.rom autoboot -> BOOTX64.EFI
# Prints "RESULT firmware/<fw>/<hc> PASS|FAIL detail", then
# "firmware: N passed, M failed"; exits 1 if any failed. Logs (serial,
# SeaBIOS debugcon on port 0x402, xen-usb-dm at XEN_USB_DM_LOG, default
# info) stay in $FW_LOGDIR (default a new /tmp/firmware.XXXXXX).
# FW_CELLS="seabios/ehci ovmf/xhci ..." runs only those cells.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
eval "$("$HERE/../guest/fetch.sh" 2>/dev/null)"
eval "$("$HERE/images.sh")"
if [ $# -ge 1 ]; then
  DM=$(realpath "$1")
else
  (cd "$ROOT" && cargo build --release -q -p devmodel)
  DM=${CARGO_TARGET_DIR:-$ROOT/target}/release/xen-usb-dm
fi
[ -x "$DM" ] || { echo "firmware: no xen-usb-dm at $DM" >&2; exit 1; }
. "$HERE/../guest/lib.sh"
export XEN_USB_DM_LOG=${XEN_USB_DM_LOG:-info}
OUT=${FW_LOGDIR:-$(mktemp -d /tmp/firmware.XXXXXX)}
mkdir -p "$OUT"
passed=0 failed=0
NOCOLOR='s/\x1b\[[0-9;]*m//g'
ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }
t_all=$(ms)

# cell NAME HC SPEED MARKER GIVEUP TIMEOUT QEMU-ARGS...: one boot; it
# fails early when the serial or debugcon log matches GIVEUP (the
# firmware gave up on the stick).
cell() {
  local name=$1 hc=$2 speed=$3 marker=$4 giveup=$5 tmo=$6; shift 6
  case " ${FW_CELLS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
  local W=$OUT/${name//\//-}
  rm -rf "$W"; mkdir -p "$W"
  cp --sparse=always "$STICK" "$W/stick.img"
  HC=$hc SPEED=$speed start_dm "$DM" "$W" true "$W/dm.log"
  local t0; t0=$(ms)
  timeout --kill-after=5 "$tmo" "$QEMU" -accel tcg -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on \
    -machine pc,memory-backend=mem -nodefaults -display none -no-reboot \
    -serial "file:$W/serial.log" \
    -chardev "file,id=dbg,path=$W/debugcon.log" -device isa-debugcon,iobase=0x402,chardev=dbg \
    -device "$(vfio_dev "$W")" "$@" < /dev/null > "$W/qemu.log" 2>&1 &
  local qpid=$! st=FAIL why="no marker within ${tmo}s"
  while :; do
    if grep -aq "$marker" "$W/serial.log" 2>/dev/null; then st=PASS; break; fi
    if cat "$W/serial.log" "$W/debugcon.log" 2>/dev/null | grep -aqE "$giveup"; then
      why="the firmware gave up: $(cat "$W/serial.log" "$W/debugcon.log" | tr -d '\r' | grep -aoE "$giveup" | head -1)"
      sleep 0.5; break
    fi
    if ! kill -0 $qpid 2>/dev/null; then
      grep -aq "$marker" "$W/serial.log" 2>/dev/null && { st=PASS; break; }
      wait $qpid && why="QEMU exited without the marker" || why="QEMU exited ($?) without the marker"
      break
    fi
    sleep 0.2
  done
  local dt; dt=$(secs $(($(ms) - t0)))
  kill $qpid 2>/dev/null || true
  wait $qpid 2>/dev/null || true
  stop_dm
  rm -f "$W/stick.img"
  if [ $st = PASS ]; then
    printf 'RESULT firmware/%s PASS %s in %s s\n' "$name" "$marker" "$dt"
    passed=$((passed + 1))
  else
    printf 'RESULT firmware/%s FAIL %s (%s s; logs in %s)\n' "$name" "$why" "$dt" "$W"
    failed=$((failed + 1))
    echo "--- $name: last serial lines"; tr -d '\r' < "$W/serial.log" | strings -n 2 | tail -15 | sed 's/^/  /'
    if [ -s "$W/debugcon.log" ]; then echo "--- $name: last debugcon lines"; tail -15 "$W/debugcon.log" | sed 's/^/  /'; fi
    if [ -s "$W/qemu.log" ]; then echo "--- $name: QEMU"; tail -5 "$W/qemu.log" | sed 's/^/  /'; fi
    echo "--- $name: xen-usb-dm warnings"; sed "$NOCOLOR" "$W/dm.log" | grep -aE 'WARN|ERROR' | head -10 | sed 's/^/  /' || true
    echo "--- $name: xen-usb-dm log"; sed "$NOCOLOR" "$W/dm.log" | tail -15 | sed 's/^/  /'
  fi
}

seabios=()
ovmf() { cp "$OVMF_VARS" "$OUT/vars-$1.fd"
  echo "-drive if=pflash,format=raw,unit=0,readonly=on,file=$OVMF_CODE"
  echo "-drive if=pflash,format=raw,unit=1,file=$OUT/vars-$1.fd"; }
LBA=LBA64-MARKER-OK FILE=USB-FILE-MARKER-7f3a
SB_GIVEUP='No bootable device|INT13-ERROR.*'
EFI_GIVEUP='Shell> |error: [^\r]*'
cell seabios/ehci      ehci ""   $LBA  "$SB_GIVEUP"  30 "${seabios[@]}"
cell seabios/ehci-full ehci full $LBA  "$SB_GIVEUP"  45 "${seabios[@]}"
cell seabios/xhci      xhci ""   $LBA  "$SB_GIVEUP"  30 "${seabios[@]}"
# shellcheck disable=SC2046
cell ovmf/ehci         ehci ""   $FILE "$EFI_GIVEUP" 90 $(ovmf ehci)
# shellcheck disable=SC2046
cell ovmf/xhci         xhci ""   $FILE "$EFI_GIVEUP" 90 $(ovmf xhci)
cell grub-native/ehci  ehci ""   $FILE "$EFI_GIVEUP" 45 -kernel "$GRUB_LKRN"
cell u-boot/ehci       ehci ""   $FILE "$EFI_GIVEUP|=> $" 60 -bios "$UBOOT_ROM"
cell seabios/uhci      uhci ""   $LBA  "$SB_GIVEUP"  45 "${seabios[@]}"
# shellcheck disable=SC2046
cell ovmf/uhci         uhci ""   $FILE "$EFI_GIVEUP" 90 $(ovmf uhci)
cell grub-native/uhci  uhci ""   $FILE "$EFI_GIVEUP" 45 -kernel "$GRUB_UHCI_LKRN"

rm -f "$OUT"/vars-*.fd
echo "firmware: logs in $OUT; $(secs $(($(ms) - t_all))) s"
echo "firmware: $passed passed, $failed failed"
[ $failed = 0 ]
