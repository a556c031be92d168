#!/usr/bin/env bash
# Host USB passthrough against real usbfs. Boots a stock Debian kernel
# under QEMU (TCG) whose QEMU-emulated USB devices — a usb-storage stick
# (SuperSpeed), a usb-kbd, a usb-audio (isochronous) and a usb-uas with a
# scsi-hd (SuperSpeed, bulk streams) on qemu-xhci — are
# real USB devices to that kernel. Inside, the vmtest example (built here,
# run from this machine's root file system shared read-only over 9p) puts
# our xHCI in front of them through usbfs and drives it with the in-process
# guest driver. Lines "PT-WAIT what" from the VM are answered here through
# QMP: a key press for the keyboard, unplug and re-plug of the stick.
#
# `check` then boots a second VM for the EHCI checks (vmtest_ehci): a
# high-speed usb-storage stick on QEMU's usb-ehci, a full-speed stick and a
# usb-kbd on its piix3-usb-uhci, through our EHCI (the full-speed devices
# behind its rate-matching hub). A VM of its own because QEMU delivers
# injected keys to one keyboard only (the last one realized) and the xHCI
# checks find their devices by product name. A third VM with the same
# devices runs the UHCI checks (vmtest_uhci): the full-speed stick and the
# keyboard on our UHCI's two ports, the high-speed stick refused.
#
# A fourth VM checks the evdev input sources (evdev_vmtest, devmodel's
# example): uinput devices as the host's keyboard and tablet.
#
# A fifth VM checks the control socket's USB_HOST_DISCONNECTED /
# USB_HOST_CONNECTED events (events_vmtest, devmodel's example): the real
# xen-usb-dm binary, no VMM attached, passes a usb-storage stick through;
# the example, a control-socket client, has it unplugged and re-plugged
# (PT-WAIT unplug/replug) and waits for the events.
#
# Usage: tests/passthrough/run.sh [check | xhci | ehci | uhci | evdev | events | bench [MiB]]
# (check = xhci + ehci + uhci + evdev + events).
# Env: PT_KERNEL (default: the first of fetch.sh's kernels), PT_LOG (the
# backend's tracing filter inside the VM, default info).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=${1:-check}
ARG=${2:-}
eval "$("$ROOT/tests/guest/fetch.sh")"
(cd "$ROOT" && cargo build --release -q -p passthrough --example vmtest --example vmtest_ehci --example vmtest_uhci \
  && cargo build --release -q -p devmodel --bin xen-usb-dm --example evdev_vmtest --example events_vmtest)
K=${PT_KERNEL:-${KERNELS%% *}}
export GUEST_SCRIPT=$HERE/guest.sh GUEST_MEM=1024 TIMEOUT=${PT_TIMEOUT:-290}
export EXTRA_MODULES="fs/9p net/9p fs/netfs fs/fscache drivers/virtio drivers/input"
total_failed=0

# run_vm MODE MIN_PASSED QEMU-ARGS...: one VM; answers its PT-WAIT lines
# (key, key2: a key press; unplug, replug: $STICK) through QMP.
run_vm() {
  local mode=$1 min=$2 bin=$ROOT/target/release/examples/vmtest
  shift 2
  case $mode in ehci|uhci) bin=${bin}_$mode ;; evdev) bin=$ROOT/target/release/examples/evdev_vmtest ;;
    events) bin=$ROOT/target/release/examples/events_vmtest ;; esac
  local W keep=0
  W=$(mktemp -d)
  truncate -s 64M "$W/stick.img"
  truncate -s 16M "$W/uas.img"
  truncate -s 32M "$W/fsstick.img"
  QMP=$W/qmp.sock
  local args=()
  for a in "$@"; do args+=("${a//@W@/$W}"); done
  export APPEND="pt_bin=$bin pt_mode=$mode pt_arg=$ARG pt_log=${PT_LOG:-info}"
  local t
  t=$(date +%s)
  "$ROOT/tests/guest/boot.sh" "$K" "$W/guest.log" "${args[@]}" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
    -qmp "unix:$QMP,server=on,wait=off" &
  local BOOT=$! done_waits=" " w
  while kill -0 $BOOT 2>/dev/null; do
    [ -f "$W/guest.log" ] || { sleep 0.2; continue; }
    for w in $(tr -d '\r' < "$W/guest.log" | awk '/^PT-WAIT/ {print $2}'); do
      case $done_waits in *" $w "*) continue ;; esac
      done_waits="$done_waits$w "
      echo "passthrough: VM asks for '$w' ($(( $(date +%s) - t )) s)"
      case $w in
        key | key2) sleep 0.5; key true; sleep 0.3; key false ;;
        unplug) sleep 0.5; qmp '{"execute":"device_del","arguments":{"id":"'"$STICK_ID"'"}}' ;;
        replug) sleep 1; qmp '{"execute":"device_add","arguments":'"$STICK"'}' ;;
        *) echo "passthrough: unknown request '$w'" ;;
      esac
    done
    sleep 0.2
  done
  local rc=0 passed failed
  wait $BOOT || rc=$?
  grep -E '^(RESULT|METRIC|host device)' "$W/guest.log" | sed 's/^/  /' || true
  passed=$(grep -c '^RESULT .* PASS' "$W/guest.log" || true)
  failed=$(grep -c '^RESULT .* FAIL' "$W/guest.log" || true)
  if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
  if [ "$rc" != 0 ] || [ "$mode" != bench ] && [ "$passed" -lt "$min" ]; then
    echo "passthrough: boot status $rc; guest log tail:"; tail -60 "$W/guest.log" | sed 's/^/  | /'
    [ "$failed" != 0 ] || failed=1
  fi
  [ "$failed" = 0 ] || keep=1
  echo "passthrough: $mode on $K took $(( $(date +%s) - t )) s"
  echo "passthrough: $mode: $passed passed, $failed failed"
  if [ $keep = 1 ]; then echo "passthrough: logs kept in $W"; else rm -rf "$W"; fi
  total_failed=$((total_failed + failed))
}

qmp() { python3 "$HERE/qmp.py" "$QMP" "$1" >/dev/null || echo "passthrough: QMP $1 failed"; }
key() { # $1 = true (press) | false (release)
  qmp '{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":'"$1"',"key":{"type":"qcode","data":"a"}}}]}}'
}

if [ "$MODE" != ehci ] && [ "$MODE" != uhci ] && [ "$MODE" != evdev ] && [ "$MODE" != events ]; then
  STICK_ID=ustick
  STICK='{"driver":"usb-storage","bus":"xhci.0","drive":"stick","id":"ustick","serial":"PT0001"}'
  xmode=$MODE
  [ "$MODE" = xhci ] && xmode=check
  run_vm "$xmode" 16 \
    -device qemu-xhci,id=xhci,p2=8,p3=8 \
    -blockdev '{"driver":"raw","node-name":"stick","file":{"driver":"file","filename":"@W@/stick.img"}}' \
    -device "$STICK" \
    -device usb-kbd,bus=xhci.0,id=kbd0 \
    -audiodev none,id=snd0 -device usb-audio,bus=xhci.0,audiodev=snd0,id=audio0 \
    -drive "if=none,id=uasdisk,file=@W@/uas.img,format=raw" \
    -device usb-uas,id=uas,bus=xhci.0 \
    -device scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=uasdisk
fi
if [ "$MODE" = check ] || [ "$MODE" = ehci ]; then
  STICK_ID=fsstick
  STICK='{"driver":"usb-storage","bus":"uhci.0","drive":"fsdisk","id":"fsstick","serial":"PTFS01"}'
  run_vm ehci 19 \
    -device usb-ehci,id=ehci \
    -blockdev '{"driver":"raw","node-name":"hsdisk","file":{"driver":"file","filename":"@W@/stick.img"}}' \
    -device usb-storage,bus=ehci.0,drive=hsdisk,id=hsstick,serial=PTHS01 \
    -device piix3-usb-uhci,id=uhci \
    -blockdev '{"driver":"raw","node-name":"fsdisk","file":{"driver":"file","filename":"@W@/fsstick.img"}}' \
    -device "$STICK" \
    -device usb-kbd,bus=uhci.0,id=kbd0
fi
if [ "$MODE" = check ] || [ "$MODE" = uhci ]; then
  # The same devices, through our UHCI (vmtest_uhci): the full-speed
  # stick and the keyboard on its ports, the high-speed stick refused.
  STICK_ID=fsstick
  STICK='{"driver":"usb-storage","bus":"uhci.0","drive":"fsdisk","id":"fsstick","serial":"PTFS01"}'
  run_vm uhci 12 \
    -device usb-ehci,id=ehci \
    -blockdev '{"driver":"raw","node-name":"hsdisk","file":{"driver":"file","filename":"@W@/stick.img"}}' \
    -device usb-storage,bus=ehci.0,drive=hsdisk,id=hsstick,serial=PTHS01 \
    -device piix3-usb-uhci,id=uhci \
    -blockdev '{"driver":"raw","node-name":"fsdisk","file":{"driver":"file","filename":"@W@/fsstick.img"}}' \
    -device "$STICK" \
    -device usb-kbd,bus=uhci.0,id=kbd0
fi
if [ "$MODE" = check ] || [ "$MODE" = evdev ]; then
  # The evdev input sources (evdev_vmtest): uinput devices in the VM as
  # the host's keyboard and tablet, our emulated ones reading them on our
  # xHCI; no USB devices of QEMU's.
  run_vm evdev 7
fi
if [ "$MODE" = check ] || [ "$MODE" = events ]; then
  # The control socket's host-device events (events_vmtest): the real
  # xen-usb-dm process (vfio-user, nobody connected) passes this stick
  # through; unplugged and re-plugged through QMP on the VM's request.
  STICK_ID=evstick
  STICK='{"driver":"usb-storage","bus":"xhci.0","drive":"evdisk","id":"evstick","serial":"PTEV01"}'
  run_vm events 8 \
    -device qemu-xhci,id=xhci,p2=8,p3=8 \
    -blockdev '{"driver":"raw","node-name":"evdisk","file":{"driver":"file","filename":"@W@/stick.img"}}' \
    -device "$STICK"
fi
[ "$total_failed" = 0 ]
