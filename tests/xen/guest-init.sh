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
# Kernel command line: stick_bytes=N (expected size of the stick),
# irq_model=ERE (what xhci_hcd's /proc/interrupts line must match; _ = blank).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
res() { echo "RESULT $1 $2 $3"; }
irq_count() {
  awk '/xhci[-_]hcd/ {n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i; print n, $i; exit}' /proc/interrupts
}
echo "GUEST-START $(ms)"

checks() {
  # PCI functions on bus 0 with their class; xHCI is class 0c0330.
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
  i=0; while [ ! -b /dev/sda ] && [ $i -lt 900 ]; do usleep 100000; i=$((i + 1)); done
  if [ -b /dev/sda ]; then res sda PASS "$(( $(ms) - t0 ))ms"
  else res sda FAIL "no /dev/sda after 90 s"; return; fi
  # "count chip" of xhci_hcd's first vector (PCI-MSIX/PCI-MSI/IO-APIC, or
  # xen-pirq under XENFEAT_hvm_pirqs), and whether it rises over the I/O.
  # (MSI/MSI-X vectors are named xhci_hcd, a legacy INTx line
  # xhci-hcd:usb1, after the hc_driver's description.)
  irqs=$(irq_count)
  [ "${irqs%% *}" -gt 0 ] 2>/dev/null && res irq PASS "$irqs" || { res irq FAIL "no xhci_hcd interrupts"; sed 's/  */ /g; s/^/IRQ all/' /proc/interrupts; }
  grep -E 'xhci[-_]hcd' /proc/interrupts | sed 's/  */ /g; s/^/IRQ before-io/'
  # The interrupt model the series and mode must give (irq_model=, an ERE
  # on xhci_hcd's /proc/interrupts line with blanks squeezed, _ for blank).
  want=$(arg irq_model | tr _ ' ')
  if [ -n "$want" ]; then
    line=$(grep -E 'xhci[-_]hcd' /proc/interrupts | sed 's/  */ /g' | head -1)
    echo "$line" | grep -qE "$want" && res irq_model PASS "$want" || res irq_model FAIL "want /$want/"
  fi

  want=$(arg stick_bytes)
  size=$(blockdev --getsize64 /dev/sda)
  [ "$size" = "$want" ] && res size PASS "$size" || res size FAIL "$size, want $want"

  # 1 MiB of random data at 4 MiB, O_DIRECT both ways, page cache dropped.
  # The idle pauses around each transfer let the host side attribute the
  # device model's request counts to enumeration, write and read.
  off=4194304 len=1048576
  dd if=/dev/urandom of=/tmp/rand bs=64k count=16 2>/dev/null
  sum=$(sha256sum < /tmp/rand | cut -d' ' -f1)
  echo 3 > /proc/sys/vm/drop_caches
  sleep 5
  t0=$(ms)
  if dd if=/tmp/rand of=/dev/sda bs=64k seek=64 oflag=direct conv=notrunc 2>/dev/null; then
    res write PASS "$(( $(ms) - t0 ))ms"
  else
    res write FAIL "dd to /dev/sda failed"
  fi
  echo 3 > /proc/sys/vm/drop_caches
  sleep 5
  t0=$(ms)
  got=$(dd if=/dev/sda bs=64k skip=64 count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] && res readback PASS "$(( $(ms) - t0 ))ms" || res readback FAIL "sha256 differs"
  echo "HOSTCHECK $off $len $sum"
  grep -E 'xhci[-_]hcd' /proc/interrupts | sed 's/  */ /g; s/^/IRQ after-io/'
  irqs2=$(irq_count)
  [ "${irqs2%% *}" -gt "${irqs%% *}" ] 2>/dev/null && res irq_rising PASS "${irqs%% *} -> $irqs2" \
    || res irq_rising FAIL "${irqs%% *} -> $irqs2"
  sleep 5
}
checks
# The kernel's own view (its console shows warnings only: every console
# write is a hypercall, and under nested emulation those add up).
dmesg | grep -iE 'xhci|usb|scsi|sd 0|sda' | head -40 | sed 's/^/KLOG /'
echo "GUEST-DONE $(ms)"
# The last lines cross the slow serial path after they are written.
sleep 3
poweroff -f
