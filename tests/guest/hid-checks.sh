#!/bin/sh
# Runs inside the guest (busybox sh): our emulated keyboard and tablet on
# the controller named by hc=xhci|ehci|uhci, bound by the stock usbhid and
# hid-generic, and input injected through xen-usb-dm's control socket
# arriving in their /dev/input/eventN exactly. Prints HID-READY when the
# host may inject (keys: `a` down/up, shift down, `b` down/up, shift up;
# tablet: x 16384 and y 8192 with the left button down, then up), then
# reads the evdev nodes and compares, in order, the EV_KEY events
# (code:value) of the keyboard and the EV_ABS and EV_KEY events of the
# tablet.
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
res() { echo "RESULT $1 $2 $3"; }
now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
HC=$(arg hc)
case $HC in
  ehci) HCMOD=ehci-pci ;;
  uhci) HCMOD=uhci-hcd ;;
  *) HCMOD=xhci-pci ;;
esac
t0=$(now_ms)
modprobe $HCMOD; modprobe evdev 2>/dev/null; modprobe usbhid; modprobe hid-generic
node() { # node NAME-PART: the evdev node of our device whose name has it
  for d in /sys/class/input/event*; do
    [ -e "$d/device/name" ] || continue
    grep -q "hcd-emul.*$1" "$d/device/name" && { echo "/dev/input/${d##*/}"; return; }
  done
}
kb="" tab="" i=0
while { [ -z "$kb" ] || [ -z "$tab" ]; } && [ $i -lt 600 ]; do
  kb=$(node Keyboard); tab=$(node Tablet)
  [ -n "$kb" ] && [ -n "$tab" ] || { usleep 50000; i=$((i + 1)); }
done
if [ -z "$kb" ] || [ -z "$tab" ]; then
  res hid_bound FAIL "evdev nodes: keyboard '$kb' tablet '$tab'"; ls /sys/bus/usb/drivers/usbhid/ 2>&1; dmesg | tail -20
  exit 0
fi
res hid_bound PASS "keyboard $kb, tablet $tab after $(( $(now_ms) - t0 )) ms"
cat "$kb" > /tmp/kb & p1=$!
cat "$tab" > /tmp/tab & p2=$!
usleep 200000
echo "HID-READY"
# Keys: six transitions of MSC_SCAN + EV_KEY + SYN; tablet: at least the
# move and the two button reports (24 bytes an event).
i=0
while { [ "$(wc -c < /tmp/kb)" -lt $((18 * 24)) ] || [ "$(wc -c < /tmp/tab)" -lt $((7 * 24)) ]; } && [ $i -lt 400 ]; do
  usleep 50000; i=$((i + 1))
done
usleep 300000
kill $p1 $p2 2>/dev/null
# struct input_event on x86-64: 16 bytes of time, u16 type, u16 code, s32 value.
events() { od -An -v -tu2 -w24 "$1" | awk -v t="$2" '$9 == t {printf "%s:%s ", $10, $11 + 65536 * $12}'; }
got=$(events /tmp/kb 1)
want="30:1 30:0 42:1 48:1 48:0 42:0 "
[ "$got" = "$want" ] && res keys_exact PASS "$got" || res keys_exact FAIL "got '$got' want '$want'"
got=$(events /tmp/tab 3)
want="0:16384 1:8192 "
[ "$got" = "$want" ] && res tablet_abs_exact PASS "$got" || res tablet_abs_exact FAIL "got '$got' want '$want'"
got=$(events /tmp/tab 1)
want="272:1 272:0 "
[ "$got" = "$want" ] && res tablet_button_exact PASS "$got" || res tablet_button_exact FAIL "got '$got' want '$want'"
