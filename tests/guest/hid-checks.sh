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
# held_open PID NODE: PID has NODE open (up to 10 s): no event may come
# before the readers are there (the console's keyboard handler keeps the
# keyboard open and polled: its early events would not reach them).
held_open() {
  j=0
  while [ $j -lt 200 ]; do
    for f in /proc/$1/fd/*; do [ "$(readlink "$f")" = "$2" ] && return 0; done
    usleep 50000; j=$((j + 1))
  done
  echo "INFO $2 not open by $1 after 10 s"
}
cat "$kb" > /tmp/kb & p1=$!
cat "$tab" > /tmp/tab & p2=$!
held_open $p1 "$kb"; held_open $p2 "$tab"
echo "HID-READY"
# struct input_event on x86-64: 16 bytes of time, u16 type, u16 code, s32 value.
events() { od -An -v -tu2 -w24 "$1" | awk -v t="$2" '$9 == t {printf "%s:%s ", $10, $11 + 65536 * $12}'; }
n_keys() { events "$1" 1 | wc -w; }
# Wait for every key event: the keyboard's six transitions and the
# tablet's press and release (the host sends the release in a command of
# its own, later), up to 20 s.
i=0
while { [ "$(n_keys /tmp/kb)" -lt 6 ] || [ "$(n_keys /tmp/tab)" -lt 2 ]; } && [ $i -lt 400 ]; do
  usleep 50000; i=$((i + 1))
done
usleep 300000
kill $p1 $p2 2>/dev/null
got=$(events /tmp/kb 1)
want="30:1 30:0 42:1 48:1 48:0 42:0 "
[ "$got" = "$want" ] && res keys_exact PASS "$got" || res keys_exact FAIL "got '$got' want '$want'"
got=$(events /tmp/tab 3)
want="0:16384 1:8192 "
[ "$got" = "$want" ] && res tablet_abs_exact PASS "$got" || res tablet_abs_exact FAIL "got '$got' want '$want'"
got=$(events /tmp/tab 1)
want="272:1 272:0 "
[ "$got" = "$want" ] && res tablet_button_exact PASS "$got" || res tablet_button_exact FAIL "got '$got' want '$want'"

# Selective suspend and remote wakeup: both devices allowed to
# autosuspend (power/control=auto) while their evdev nodes are held open,
# so usbhid needs remote wakeup: the guest enables it (SET_FEATURE) and
# suspends the ports (then, all ports suspended, the root hub: xHCI bus
# suspend, EHCI halted, UHCI global suspend). The host then sends a key
# and a tablet position: each device signals resume, the controller shows
# it (xHCI Resume + PLC, EHCI FPR + PCD, UHCI Resume Detect), the guest
# resumes the port and the events arrive, exactly.
usbdev() { # the USB device directory of evdev node $1
  p=$(readlink -f "/sys/class/input/${1##*/}/device")
  while [ "$p" != / ] && [ ! -e "$p/idVendor" ]; do p=${p%/*}; done
  echo "$p"
}
kd=$(usbdev "$kb") td=$(usbdev "$tab")
cat "$kb" > /tmp/kb2 & p1=$!
cat "$tab" > /tmp/tab2 & p2=$!
held_open $p1 "$kb"; held_open $p2 "$tab"
for u in $kd $td; do echo 500 > "$u/power/autosuspend_delay_ms"; echo auto > "$u/power/control"; done
st() { cat "$1/power/runtime_status" 2>/dev/null; }
both() { [ "$(st $kd)" = suspended ] && [ "$(st $td)" = suspended ]; }
# Both suspended, and still so 200 ms later (seen once on the UHCI with
# 6.12: the tablet back to active right after its suspend).
t=$(now_ms); i=0
while ! { both && usleep 200000 && both; } && [ $i -lt 300 ]; do
  usleep 50000; i=$((i + 1))
done
rh=/sys/bus/usb/devices/usb$(cat "$kd/busnum")
if both; then
  res hid_suspend PASS "keyboard and tablet suspended after $(( $(now_ms) - t )) ms, root hub $(st $rh)"
  echo "HID-SUSPENDED"
  t=$(now_ms); i=0
  while { [ "$(n_keys /tmp/kb2)" -lt 2 ] || [ "$(events /tmp/tab2 3 | wc -w)" -lt 2 ]; } && [ $i -lt 400 ]; do
    usleep 50000; i=$((i + 1))
  done
  got="$(events /tmp/kb2 1)/$(events /tmp/tab2 3)"
  want="46:1 46:0 /0:1000 1:2000 "
  [ "$got" = "$want" ] && res hid_remote_wakeup PASS "key and position after $(( $(now_ms) - t )) ms (keyboard $(st $kd), tablet $(st $td))" \
    || { res hid_remote_wakeup FAIL "got '$got' want '$want' (keyboard $(st $kd), tablet $(st $td))"; dmesg | tail -20; }
else
  res hid_suspend FAIL "keyboard $(st $kd), tablet $(st $td) after $(( $(now_ms) - t )) ms ($i looks)"; dmesg | tail -20
  echo "HID-SUSPENDED"
fi
kill $p1 $p2 2>/dev/null
for u in $kd $td; do echo on > "$u/power/control"; done

# Hot-plug (hot=1 on the command line: the xHCI and EHCI cells; the
# UHCI's two ports hold the keyboard and tablet): the host adds a stick
# through the control socket (device_add) while the guest runs; the guest
# reads it and checks its contents (hot_sha: the sha256 of its first
# 2 MiB, made by the host), writes 1 MiB at 4 MiB and reads it back
# (HOTCHECK: the host compares its image), then starts a long read and
# the host removes the stick during it (device_del): the read must end
# (an I/O error) and the disk go away, no hang; then a stick added again
# must work (read and checked again).
[ "$(arg hot)" = 1 ] || exit 0
HOT_SHA=$(arg hot_sha)
sha() { sha256sum | cut -d' ' -f1; }
modprobe usb-storage; modprobe sd_mod
disk() { for b in /sys/block/sd*; do [ -e "$b" ] && { echo "${b##*/}"; return; }; done; }
wait_disk() { # $1 = timeout s: prints the disk's name
  i=0; d=$(disk)
  while [ -z "$d" ] && [ $i -lt $(($1 * 20)) ]; do usleep 50000; i=$((i + 1)); d=$(disk); done
  i=0; while [ -n "$d" ] && [ ! -b "/dev/$d" ] && [ $i -lt 100 ]; do usleep 50000; i=$((i + 1)); done
  echo "$d"
}
t=$(now_ms)
echo "HOTPLUG-ADD"
d=$(wait_disk 60)
if [ -z "$d" ]; then res hot_add FAIL "no disk 60 s after device_add"; dmesg | tail -20; exit 0; fi
res hot_add PASS "/dev/$d after $(( $(now_ms) - t )) ms"
got=$(dd if=/dev/$d bs=64k count=32 iflag=direct 2>/dev/null | sha)
[ "$got" = "$HOT_SHA" ] && res hot_read PASS "2 MiB $got" || res hot_read FAIL "got $got want $HOT_SHA"
dd if=/dev/urandom of=/tmp/w bs=64k count=16 2>/dev/null
want=$(sha < /tmp/w)
dd if=/tmp/w of=/dev/$d bs=64k seek=64 oflag=direct conv=notrunc 2>/dev/null
got=$(dd if=/dev/$d bs=64k skip=64 count=16 iflag=direct 2>/dev/null | sha)
[ "$got" = "$want" ] && res hot_write PASS "1 MiB at 4 MiB" || res hot_write FAIL "read back $got want $want"
echo "HOTCHECK $((4 << 20)) $((1 << 20)) $want"
# The long read, and the removal during it.
dd if=/dev/$d of=/dev/null bs=4k iflag=direct 2>/tmp/dd.err & ddp=$!
usleep 500000
kill -0 $ddp 2>/dev/null && during=yes || during=no
t=$(now_ms)
echo "HOTPLUG-DEL"
i=0; while kill -0 $ddp 2>/dev/null && [ $i -lt 1200 ]; do usleep 50000; i=$((i + 1)); done
if kill -0 $ddp 2>/dev/null; then
  res hot_remove_io FAIL "the read still runs 60 s after device_del"; kill -9 $ddp; dmesg | tail -20
else
  wait $ddp; rc=$?
  [ $during = yes ] && [ $rc != 0 ] && res hot_remove_io PASS "read ended (exit $rc) $(( $(now_ms) - t )) ms after the removal" \
    || res hot_remove_io FAIL "read running at removal: $during, exit $rc ($(tr '\n' ' ' < /tmp/dd.err))"
fi
i=0; while [ -e /sys/block/$d ] && [ $i -lt 600 ]; do usleep 50000; i=$((i + 1)); done
[ -e /sys/block/$d ] && res hot_gone FAIL "/sys/block/$d still there" || res hot_gone PASS "$d gone"
t=$(now_ms)
echo "HOTPLUG-READD"
d=$(wait_disk 60)
if [ -z "$d" ]; then res hot_readd FAIL "no disk 60 s after the second device_add"; dmesg | tail -20; exit 0; fi
got=$(dd if=/dev/$d bs=64k count=32 iflag=direct 2>/dev/null | sha)
[ "$got" = "$HOT_SHA" ] && res hot_readd PASS "/dev/$d after $(( $(now_ms) - t )) ms, 2 MiB $got" \
  || res hot_readd FAIL "/dev/$d: got $got want $HOT_SHA"
