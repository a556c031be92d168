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
# Usage: tests/passthrough/run.sh [check | bench [MiB]]
# Env: PT_KERNEL (default: the first of fetch.sh's kernels), PT_LOG (the
# backend's tracing filter inside the VM, default info).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MODE=${1:-check}
ARG=${2:-}
eval "$("$ROOT/tests/guest/fetch.sh")"
(cd "$ROOT" && cargo build --release -q -p passthrough --example vmtest)
BIN=$ROOT/target/release/examples/vmtest
K=${PT_KERNEL:-${KERNELS%% *}}
W=$(mktemp -d)
keep=0
trap '[ $keep = 1 ] && echo "passthrough: logs kept in $W" || rm -rf "$W"' EXIT
truncate -s 64M "$W/stick.img"
truncate -s 16M "$W/uas.img"
QMP=$W/qmp.sock
STICK='{"driver":"usb-storage","bus":"xhci.0","drive":"stick","id":"ustick","serial":"PT0001"}'
qmp() { python3 "$HERE/qmp.py" "$QMP" "$1" >/dev/null || echo "passthrough: QMP $1 failed"; }
key() { # $1 = true (press) | false (release)
  qmp '{"execute":"input-send-event","arguments":{"events":[{"type":"key","data":{"down":'"$1"',"key":{"type":"qcode","data":"a"}}}]}}'
}

export GUEST_SCRIPT=$HERE/guest.sh GUEST_MEM=1024 TIMEOUT=${PT_TIMEOUT:-290}
export EXTRA_MODULES="fs/9p net/9p fs/netfs fs/fscache drivers/virtio"
export APPEND="pt_bin=$BIN pt_mode=$MODE pt_arg=$ARG pt_log=${PT_LOG:-info}"
t=$(date +%s)
"$ROOT/tests/guest/boot.sh" "$K" "$W/guest.log" \
  -device qemu-xhci,id=xhci,p2=8,p3=8 \
  -blockdev '{"driver":"raw","node-name":"stick","file":{"driver":"file","filename":"'"$W/stick.img"'"}}' \
  -device "$STICK" \
  -device usb-kbd,bus=xhci.0,id=kbd0 \
  -audiodev none,id=snd0 -device usb-audio,bus=xhci.0,audiodev=snd0,id=audio0 \
  -drive "if=none,id=uasdisk,file=$W/uas.img,format=raw" \
  -device usb-uas,id=uas,bus=xhci.0 \
  -device scsi-hd,bus=uas.0,scsi-id=0,lun=0,drive=uasdisk \
  -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on \
  -qmp "unix:$QMP,server=on,wait=off" &
BOOT=$!
done_waits=" "
while kill -0 $BOOT 2>/dev/null; do
  [ -f "$W/guest.log" ] || { sleep 0.2; continue; }
  for w in $(tr -d '\r' < "$W/guest.log" | awk '/^PT-WAIT/ {print $2}'); do
    case $done_waits in *" $w "*) continue ;; esac
    done_waits="$done_waits$w "
    echo "passthrough: VM asks for '$w' ($(( $(date +%s) - t )) s)"
    case $w in
      key) sleep 0.5; key true; sleep 0.3; key false ;;
      unplug) sleep 0.5; qmp '{"execute":"device_del","arguments":{"id":"ustick"}}' ;;
      replug) sleep 1; qmp '{"execute":"device_add","arguments":'"$STICK"'}' ;;
      *) echo "passthrough: unknown request '$w'" ;;
    esac
  done
  sleep 0.2
done
rc=0
wait $BOOT || rc=$?
grep -E '^(RESULT|METRIC|host device)' "$W/guest.log" | sed 's/^/  /' || true
passed=$(grep -c '^RESULT .* PASS' "$W/guest.log" || true)
failed=$(grep -c '^RESULT .* FAIL' "$W/guest.log" || true)
if [ "$rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
if [ "$rc" != 0 ] || [ "$MODE" = check ] && [ "$passed" -lt 16 ]; then
  echo "passthrough: boot status $rc; guest log tail:"; tail -60 "$W/guest.log" | sed 's/^/  | /'
  [ "$failed" != 0 ] || failed=1
fi
[ "$failed" = 0 ] || keep=1
echo "passthrough: $MODE on $K took $(( $(date +%s) - t )) s"
echo "passthrough: $passed passed, $failed failed"
[ "$failed" = 0 ]
