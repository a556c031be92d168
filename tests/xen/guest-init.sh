#!/bin/sh
# /init of the HVM guest's initramfs (busybox sh): find the xHCI function,
# drive a USB stick through it, and report on the console.
#
# The console is hvc0 (Xen PV console, logged by dom0's xenconsoled); the
# emulated UART through qemu-xen moves only ~0.4 KB/s here. The report is a
# handful of short lines anyway:
#   GUEST-START <uptime ms>
#   PCI <bdf>=<class> ...          what the guest sees on bus 0
#   RESULT <name> PASS|FAIL <detail>
#   HOSTCHECK <offset> <length> <sha256>   dom0 re-reads the image there
#   IRQ before-io|after-io <xhci_hcd's /proc/interrupts line>
#   KLOG <kernel line>             the kernel's USB, SCSI and sd lines
#   GUEST-DONE
#   GUEST-SETUP-FAILED <what>      /proc, /sys or /dev could not be mounted
#   XL-WAIT-DETACH / XL-WAIT-ATTACH / XL-WAITING <s>   (xl mode) what the
#                                  guest waits for dom0 to do, and that it
#                                  is still waiting (every 10 s)
#   HID-READY / HOTPLUG-ADD / HOTPLUG-DEL / HID-WAITING <s>   (hid=1) the
#                                  same for the control socket's steps
# Kernel command line: stick_bytes=N (expected size of the stick),
# irq_model=ERE (what xhci_hcd's /proc/interrupts line must match; _ = blank),
# io_mib=N (MiB written and read back, at 4 MiB; default 1).
# hid=1 (beside): our tablet is there too; once the stick is up the guest
# checks that usbhid binds it and that the position and click dom0 injects
# through xen-usb-dm's control socket arrive in its evdev node, then that
# a stick dom0 hot-adds (device_add, read-only: hot_bytes of data with
# sha256 hot_sum) appears and reads back right, and goes on device_del.
# xtb_mode=xl: the stick is a host device that libxl attached (usbctrl,
# usbdev); the guest reads ostick_len bytes at ostick_off and compares with
# ostick_sum, prints XL-WAIT-DETACH and waits for the disk to go (dom0 runs
# xl usbdev-detach), prints XL-WAIT-ATTACH and waits for it to come back
# (xl usbdev-attach), and reads it again.
# Each mount is checked and tried again: under the nested emulation a
# guest's process now and then dies of SIGSEGV (a CI run lost its sysfs
# mount that way: "Segmentation fault", then no PCI functions at all).
# A guest that still lacks one says GUEST-SETUP-FAILED; dom0 retries it.
mnt() {
  for try in 1 2 3; do
    mount -t "$1" "$1" "$2" 2>/dev/null; [ -e "$2/$3" ] && return 0
  done
  echo "GUEST-SETUP-FAILED mount $1 $2"; sleep 3; poweroff -f
}
mnt proc /proc uptime
mnt sysfs /sys bus
mnt devtmpfs /dev null
mount -t tmpfs tmp /tmp
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
res() { echo "RESULT $1 $2 $3"; }
# hc=ehci: the controller under test is our EHCI (class 0c0320, ehci_pci,
# its vectors named ehci_hcd); hc=uhci: our UHCI (class 0c0300, uhci_hcd,
# an INTx line named uhci_hcd:usbN, registers in I/O space: PIO ioreqs);
# otherwise the xHCI.
case $(arg hc) in
  ehci) HCN=ehci HCCLASS=0x0c0320 HCMOD=ehci_pci HCIRQ='ehci[-_]hcd' ;;
  uhci) HCN=uhci HCCLASS=0x0c0300 HCMOD=uhci_hcd HCIRQ='uhci[-_]hcd' ;;
  *) HCN=xhci HCCLASS=0x0c0330 HCMOD=xhci_pci HCIRQ='xhci[-_]hcd' ;;
esac
irq_count() {
  awk -v re="$HCIRQ" '$0 ~ re {n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n, $i; exit}' /proc/interrupts
}
echo "GUEST-START $(ms)"

# hid=1: the tablet and the hot-added stick, each step started by dom0
# when the guest says so on its console (dom0-run.sh's hid_step); every
# wait is bounded and says HID-WAITING every 10 s.
# tablet: the evdev node of our tablet ("hcd-emul USB Tablet"), if any.
tablet() {
  for e in /sys/class/input/event*; do
    grep -qs 'hcd-emul.*Tablet' "$e/device/name" && { echo "/dev/input/${e##*/}"; return; }
  done
}
# evs FILE TYPE: "code:value " of the events of TYPE in FILE (struct
# input_event on x86-64: 16 bytes of time, u16 type, u16 code, s32 value).
evs() { od -An -v -tu2 -w24 "$1" | awk -v t="$2" '$9 == t {printf "%s:%s ", $10, $11 + 65536 * $12}'; }
# hot_disk: a disk other than the configured stick (sda), once its node is there.
hot_disk() {
  for b in /sys/block/sd*; do
    [ "${b##*/}" != sda ] && [ -b "/dev/${b##*/}" ] && { echo "${b##*/}"; return; }
  done
}
# hid_wait COND SECONDS: polls COND every 0.1 s.
hid_wait() {
  i=0
  while ! eval "$1" && [ $i -lt $(($2 * 10)) ]; do
    usleep 100000; i=$((i + 1))
    [ $((i % 100)) != 0 ] || echo "HID-WAITING $((i / 10))"
  done
  eval "$1"
}
hid_checks() {
  t0=$(ms)
  if hid_wait '[ -n "$(tablet)" ]' 20; then
    tab=$(tablet) e=/sys/class/input/event${tab##*event}
    # the input device's HID device (hid-generic) on its USB interface (usbhid)
    h=$(readlink -f "$e/device/device")
    hd=$(readlink "$h/driver"); ud=$(readlink "$h/../driver")
    hd=${hd##*/} ud=${ud##*/}
    [ "$ud/$hd" = usbhid/hid-generic ] && res tablet_bind PASS "$tab '$(cat "$e/device/name")' $ud + $hd $(( $(ms) - t0 ))ms" \
      || res tablet_bind FAIL "$tab: drivers '$ud' + '$hd'"
    # What dom0 injects once it reads HID-READY: x 16384, y 8192 with the
    # left button down, then the button up (a command of its own). The
    # tablet's axes are QMP's 0..32767, so evdev reports those values.
    cat "$tab" > /tmp/tab & p=$!
    usleep 200000
    echo "HID-READY $(ms)"
    t0=$(ms)
    hid_wait '[ "$(evs /tmp/tab 1 | wc -w)" -ge 2 ]' 20
    usleep 200000
    kill $p 2>/dev/null
    got=$(evs /tmp/tab 3)
    [ "$got" = "0:16384 1:8192 " ] && res tablet_abs PASS "${got% } $(( $(ms) - t0 ))ms" \
      || res tablet_abs FAIL "got '$got' want '0:16384 1:8192 '"
    got=$(evs /tmp/tab 1)
    [ "$got" = "272:1 272:0 " ] && res tablet_button PASS "${got% }" \
      || res tablet_button FAIL "got '$got' want '272:1 272:0 '"
  else
    res tablet_bind FAIL "no hcd-emul tablet in /sys/class/input after 20 s (usbhid: $(ls /sys/bus/usb/drivers/usbhid 2>&1 | tr '\n' ' '))"
  fi
  echo "HOTPLUG-ADD $(ms)"
  t0=$(ms)
  if hid_wait '[ -n "$(hot_disk)" ]' 30; then
    d=$(hot_disk) want=$(arg hot_bytes)
    t1=$(ms)
    size=$(blockdev --getsize64 "/dev/$d")
    got=$(dd if="/dev/$d" bs=64k count=$((want / 65536)) iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$size" = "$want" ] && [ "$got" = "$(arg hot_sum)" ] \
      && res hot_add_read PASS "/dev/$d after $((t1 - t0))ms, $size bytes read in $(( $(ms) - t1 ))ms, sha256 $got" \
      || res hot_add_read FAIL "/dev/$d: $size bytes (want $want), sha256 $got (want $(arg hot_sum))"
    echo "HOTPLUG-DEL $(ms)"
    t0=$(ms)
    hid_wait "[ ! -e /sys/block/$d ]" 30 && res hot_del PASS "$d gone $(( $(ms) - t0 ))ms" \
      || res hot_del FAIL "/sys/block/$d still there 30 s after HOTPLUG-DEL"
  else
    res hot_add_read FAIL "no new disk 30 s after HOTPLUG-ADD"
    dmesg | tail -10 | sed 's/^/KLOG /'
  fi
}

checks() {
  # PCI functions on bus 0 with their class; xHCI is class 0c0330.
  pci="" xhci=""
  for d in /sys/bus/pci/devices/*; do
    c=$(cat "$d/class"); b=${d##*/0000:}
    pci="$pci $b=${c#0x}"
    [ "$c" = $HCCLASS ] && xhci=$b
  done
  echo "PCI$pci"
  if [ -z "$xhci" ]; then res $HCN FAIL "no $HCN function"; return; fi
  res $HCN PASS "$xhci"

  t0=$(ms)
  # (the HID drivers first: the tablet binds as it enumerates)
  [ "$(arg hid)" != 1 ] || { modprobe evdev; modprobe usbhid; modprobe hid-generic; }
  modprobe $HCMOD; modprobe usb-storage; modprobe sd_mod
  if [ -e "/sys/bus/pci/devices/0000:$xhci/driver" ]; then res ${HCN}_bound PASS ""
  else res ${HCN}_bound FAIL "$HCMOD did not bind"; return; fi
  i=0; while [ ! -b /dev/sda ] && [ $i -lt 900 ]; do usleep 100000; i=$((i + 1)); done
  if [ -b /dev/sda ]; then res sda PASS "$(( $(ms) - t0 ))ms"
  else res sda FAIL "no /dev/sda after 90 s"; return; fi
  # (before the stick's I/O: their bursts of requests stay apart from it)
  [ "$(arg hid)" != 1 ] || hid_checks
  # "count chip" of xhci_hcd's first vector (PCI-MSIX/PCI-MSI/IO-APIC, or
  # xen-pirq under XENFEAT_hvm_pirqs), and whether it rises over the I/O.
  # (MSI/MSI-X vectors are named xhci_hcd, a legacy INTx line
  # xhci-hcd:usb1, after the hc_driver's description.)
  irqs=$(irq_count)
  [ "${irqs%% *}" -gt 0 ] 2>/dev/null && res irq PASS "$irqs" || { res irq FAIL "no xhci_hcd interrupts"; sed 's/  */ /g; s/^/IRQ all/' /proc/interrupts; }
  grep -E "$HCIRQ" /proc/interrupts | sed 's/  */ /g; s/^/IRQ before-io/'
  # The interrupt model the series and mode must give (irq_model=, an ERE
  # on xhci_hcd's /proc/interrupts line with blanks squeezed, _ for blank).
  want=$(arg irq_model | tr _ ' ')
  if [ -n "$want" ]; then
    line=$(grep -E "$HCIRQ" /proc/interrupts | sed 's/  */ /g' | head -1)
    echo "$line" | grep -qE "$want" && res irq_model PASS "$want" || res irq_model FAIL "want /$want/"
  fi

  want=$(arg stick_bytes)
  size=$(blockdev --getsize64 /dev/sda)
  [ "$size" = "$want" ] && res size PASS "$size" || res size FAIL "$size, want $want"

  # io_mib MiB (1 unless told) of random data at 4 MiB, O_DIRECT both
  # ways, page cache dropped. The idle pauses around each transfer let the
  # host side attribute the device model's request counts to enumeration,
  # write and read.
  mib=$(arg io_mib); mib=${mib:-1}
  off=4194304 len=$((mib * 1048576)) n=$((mib * 16))
  dd if=/dev/urandom of=/tmp/rand bs=64k count=$n 2>/dev/null
  sum=$(sha256sum < /tmp/rand | cut -d' ' -f1)
  echo 3 > /proc/sys/vm/drop_caches
  sleep 5
  t0=$(ms)
  if dd if=/tmp/rand of=/dev/sda bs=64k seek=64 oflag=direct conv=notrunc 2>/dev/null; then
    res write PASS "$len bytes $(( $(ms) - t0 ))ms"
  else
    res write FAIL "dd to /dev/sda failed"
  fi
  echo 3 > /proc/sys/vm/drop_caches
  sleep 5
  t0=$(ms)
  got=$(dd if=/dev/sda bs=64k skip=64 count=$n iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] && res readback PASS "$len bytes $(( $(ms) - t0 ))ms" || res readback FAIL "sha256 differs"
  echo "HOSTCHECK $off $len $sum"
  grep -E "$HCIRQ" /proc/interrupts | sed 's/  */ /g; s/^/IRQ after-io/'
  irqs2=$(irq_count)
  [ "${irqs2%% *}" -gt "${irqs%% *}" ] 2>/dev/null && res irq_rising PASS "${irqs%% *} -> $irqs2" \
    || res irq_rising FAIL "${irqs%% *} -> $irqs2"
  sleep 5
}
# disk: the first SCSI disk, if any.
disk() { for d in /dev/sd[a-z]; do [ -b "$d" ] && { echo "$d"; return; }; done; }
# wait_disk gone|there SECONDS: polls every 0.1 s, says XL-WAITING every 10 s
# (dom0 counts a silent guest as stalled after 45 s).
wait_disk() {
  i=0
  while [ $i -lt $(($2 * 10)) ]; do
    d=$(disk)
    if [ "$1" = gone ]; then [ -z "$d" ] && return 0; else [ -n "$d" ] && return 0; fi
    usleep 100000; i=$((i + 1))
    [ $((i % 100)) != 0 ] || echo "XL-WAITING $((i / 10))"
  done
  return 1
}
# usbdev: "vendor:product serial speed busnum-devpath" of the stick (46f4).
usbdev() {
  for u in /sys/bus/usb/devices/*; do
    [ "$(cat "$u/idVendor" 2>/dev/null)" = 46f4 ] || continue
    echo "$(cat "$u/idVendor"):$(cat "$u/idProduct") $(cat "$u/serial" 2>/dev/null) $(cat "$u/speed")M ${u##*/}"
    return
  done
}
# xl_read NAME: the stick's region, O_DIRECT, against ostick_sum.
xl_read() {
  off=$(arg ostick_off) len=$(arg ostick_len) want=$(arg ostick_sum)
  t0=$(ms)
  got=$(dd if="$(disk)" bs=64k skip=$((off / 65536)) count=$((len / 65536)) iflag=direct 2>/dev/null \
        | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] && res "$1" PASS "$len bytes at $off $(( $(ms) - t0 ))ms" \
    || res "$1" FAIL "sha256 $got, want $want"
}

xl_checks() {
  pci="" xhci=""
  for d in /sys/bus/pci/devices/*; do
    c=$(cat "$d/class"); b=${d##*/0000:}
    pci="$pci $b=${c#0x}"
    [ "$c" = 0x0c0330 ] && xhci=$b
  done
  echo "PCI$pci"
  if [ -z "$xhci" ]; then res xhci FAIL "no xHCI function"; return; fi
  res xhci PASS "$xhci"
  t0=$(ms)
  modprobe xhci_pci; modprobe usb-storage; modprobe sd_mod
  if [ -e "/sys/bus/pci/devices/0000:$xhci/driver" ]; then res xhci_bound PASS ""
  else res xhci_bound FAIL "xhci_hcd did not bind"; return; fi
  if wait_disk there 90; then res xl_disk PASS "$(disk) $(( $(ms) - t0 ))ms"
  else res xl_disk FAIL "no disk after 90 s; usb: $(usbdev)"; return; fi
  u=$(usbdev)
  case $u in "46f4:0001 XTBSTICK "*) res xl_usbdev PASS "$u" ;; *) res xl_usbdev FAIL "${u:-no 46f4 device}" ;; esac
  want=$(arg stick_bytes)
  size=$(blockdev --getsize64 "$(disk)")
  [ "$size" = "$want" ] && res size PASS "$size" || res size FAIL "$size, want $want"
  xl_read xl_read
  # dom0 detaches the device now (xl usbdev-detach), then attaches it again.
  echo "XL-WAIT-DETACH $(ms)"
  t0=$(ms)
  if wait_disk gone 120; then res xl_gone PASS "$(( $(ms) - t0 ))ms; usb: $(usbdev)"
  else res xl_gone FAIL "$(disk) still there after 120 s"; return; fi
  echo "XL-WAIT-ATTACH $(ms)"
  t0=$(ms)
  if wait_disk there 120; then res xl_back PASS "$(disk) $(( $(ms) - t0 ))ms; usb: $(usbdev)"
  else res xl_back FAIL "no disk 120 s after the detach; usb: $(usbdev)"; return; fi
  xl_read xl_reread
}

if [ "$(arg xtb_mode)" = xl ]; then xl_checks; else checks; fi
# The kernel's own view (its console shows warnings only: every console
# write is a hypercall, and under nested emulation those add up).
dmesg | grep -iE 'xhci|usb|scsi|sd 0|sda' | head -40 | sed 's/^/KLOG /'
echo "GUEST-DONE $(ms)"
# The last lines cross the slow serial path after they are written.
sleep 3
poweroff -f
