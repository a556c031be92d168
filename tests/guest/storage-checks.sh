#!/bin/sh
# Runs inside the guest (busybox sh). Parameters on the kernel command
# line: stick_bytes=N, stick_ro=0|1, mode=check|bench|demo|enum|idle,
# bench_mib=N, bench_rounds=N (mode=bench: MiB per dd, default 128;
# rounds, default 5),
# hc=xhci|ehci|uhci (|none for mode=idle), check_mib=N (the O_DIRECT
# check's size, default 64; full speed uses less).
# Output: "RESULT name PASS|FAIL detail", "METRIC name value",
# "HOSTCHECK offset len sha256" (the host verifies the image file).
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
BYTES=$(arg stick_bytes); RO=$(arg stick_ro); MODE=$(arg mode)
[ -n "$MODE" ] || MODE=check
now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
res() { echo "RESULT $1 $2 $3"; }
wait_sda() { # $1 = timeout s
  i=0; while [ ! -b /dev/sda ] && [ $i -lt $(($1*20)) ]; do usleep 50000; i=$((i+1)); done
  [ -b /dev/sda ]
}
sha() { sha256sum | cut -d' ' -f1; }

# The controller under test: hc=xhci (default), ehci or uhci.
HC=$(arg hc); [ -n "$HC" ] || HC=xhci
case $HC in
  ehci) HCMOD=ehci-pci; HCDRV=ehci-pci; HCIRQ=ehci_hcd ;;
  uhci) HCMOD=uhci-hcd; HCDRV=uhci_hcd; HCIRQ=uhci_hcd ;;
  none) HCMOD=usbcore; HCDRV=none; HCIRQ=none ;;
  *) HCMOD=xhci-pci; HCDRV=xhci_hcd; HCIRQ=xhci_hcd ;;
esac
if [ "$MODE" = idle ]; then
  # The stick stays attached and unused (hc=none: no USB at all) while
  # the host measures CPU.
  modprobe $HCMOD; modprobe usb-storage; modprobe sd_mod
  modprobe evdev 2>/dev/null; modprobe usbhid; modprobe hid-generic
  # (nostick=1: HID devices only, no stick to wait for)
  [ "$HC" = none ] || [ "$(arg nostick)" = 1 ] || wait_sda 60
  # A keyboard and a tablet, if there are, bound by usbhid and their evdev nodes held
  # open (as a console or X would): usbhid keeps an interrupt IN transfer
  # queued on it while the guest idles.
  sleep 2
  # (nostick=1: up to 30 s more for both, keyboard and tablet)
  i=0
  while [ "$(arg nostick)" = 1 ] && [ "$(cat /sys/class/input/event*/device/name 2>/dev/null | grep -c -E 'Keyboard|Tablet')" -lt 2 ] && [ $i -lt 60 ]; do
    usleep 500000; i=$((i + 1))
  done
  for d in /sys/class/input/event*; do
    grep -q -E "Keyboard|Tablet" "$d/device/name" 2>/dev/null || continue
    cat "/dev/input/${d##*/}" > /dev/null &
    echo "IDLE-HID bound and open: ${d##*/}"
  done
  sync; echo "IDLE-START"; sleep 30; echo "IDLE-END"
  exit 0
fi
t0=$(now_ms)
modprobe $HCMOD; modprobe uas; modprobe usb-storage; modprobe sd_mod; modprobe crc32c 2>/dev/null; modprobe ext4
if wait_sda 60; then
  echo "METRIC sda_ms $(( $(now_ms) - t0 ))"
  res sda PASS "/dev/sda present"
else
  res sda FAIL "no /dev/sda after 60 s"; dmesg | tail -30; exit 0
fi
# Which transport the kernel chose: stick_proto=uas expects the uas driver.
if [ "$(arg stick_proto)" = uas ]; then
  ls /sys/bus/usb/drivers/uas/ 2>/dev/null | grep -q ':' && res uas_bound PASS "uas driver bound" || res uas_bound FAIL "uas not bound"
fi
PCI=$(ls /sys/bus/pci/drivers/$HCDRV/ | grep '^0000:' | head -1)
[ -n "$PCI" ] && res ${HC}_bound PASS "$PCI" || res ${HC}_bound FAIL "$HCDRV not bound"
# The controller interrupts through MSI-X/MSI, not a silent INTx fallback
# (6.1 labels MSI-X vectors "PCI-MSI", 6.12 "PCI-MSIX"; INTx is "IO-APIC").
# UHCI (PIIX3) has no MSI: its INTx line must work.
if [ "$HC" = uhci ]; then
  if grep $HCIRQ /proc/interrupts | grep -q 'IO-APIC'; then res intx PASS "$(grep $HCIRQ /proc/interrupts | tr -s ' ' | head -1)"
  else res intx FAIL "$(grep $HCIRQ /proc/interrupts | tr -s ' ' | head -1)"; fi
elif grep $HCIRQ /proc/interrupts | grep -q 'PCI-MSI'; then res msix PASS "$(grep $HCIRQ /proc/interrupts | awk '{print $1}' | tr -d '\n')"
else res msix FAIL "$(grep $HCIRQ /proc/interrupts | tr -s ' ' | head -1)"; fi
SIZE=$(blockdev --getsize64 /dev/sda)
[ "$SIZE" = "$BYTES" ] && res size PASS "$SIZE" || res size FAIL "got $SIZE want $BYTES"

[ "$MODE" = enum ] && exit 0

if [ "$MODE" = bench ]; then
  BM=$(arg bench_mib); [ -n "$BM" ] || BM=128
  N=$(arg bench_rounds); [ -n "$N" ] || N=5
  echo "METRIC bench_mib $BM"
  for i in $(seq $N); do
    t=$(now_ms); dd if=/dev/zero of=/dev/sda bs=1M count=$BM oflag=direct 2>/dev/null; w=$(( $(now_ms) - t ))
    t=$(now_ms); dd if=/dev/sda of=/dev/null bs=1M count=$BM iflag=direct 2>/dev/null; r=$(( $(now_ms) - t ))
    echo "METRIC write_ms $w"; echo "METRIC read_ms $r"
    # /proc/uptime ticks in 10 ms: about 2 % error at 0.5 s.
    echo "METRIC write_mibps $(awk -v ms=$w -v m=$BM 'BEGIN {printf "%.1f", (ms > 0) ? m * 1000 / ms : 0}')"
    echo "METRIC read_mibps $(awk -v ms=$r -v m=$BM 'BEGIN {printf "%.1f", (ms > 0) ? m * 1000 / ms : 0}')"
  done
  exit 0
fi

if [ "$RO" = 1 ]; then
  before=$(dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha)
  if dd if=/dev/urandom of=/dev/sda bs=4k count=16 oflag=direct 2>/dev/null; then
    res ro_refuses FAIL "write succeeded"
  else
    res ro_refuses PASS "write failed"
  fi
  after=$(dd if=/dev/sda bs=1M count=4 iflag=direct 2>/dev/null | sha)
  [ "$before" = "$after" ] && res ro_unchanged PASS "$after" || res ro_unchanged FAIL "data changed"
  exit 0
fi

# 64 MiB (check_mib) of random data at 128 MiB, written as four slices
# with block sizes 4K, 8K, 64K, 1M (O_DIRECT), read back and compared.
MIB=$(arg check_mib); [ -n "$MIB" ] || MIB=64
BASE=$((128 << 20)); SLICE=$((MIB << 18))
ts=$(now_ms)
dd if=/dev/urandom of=/tmp/rand bs=1M count=$MIB 2>/dev/null
ok=1; n=0
for bs in 4096 8192 65536 1048576; do
  off=$((BASE + n * SLICE)); src=$((n * SLICE))
  cnt=$((SLICE / bs))
  dd if=/tmp/rand of=/dev/sda bs=$bs count=$cnt skip=$((src / bs)) seek=$((off / bs)) oflag=direct conv=notrunc 2>/dev/null || ok=0
  want=$(dd if=/tmp/rand bs=$bs count=$cnt skip=$((src / bs)) 2>/dev/null | sha)
  got=$(dd if=/dev/sda bs=$bs count=$cnt skip=$((off / bs)) iflag=direct 2>/dev/null | sha)
  if [ "$want" = "$got" ]; then res "odirect_bs$bs" PASS "$got"; else res "odirect_bs$bs" FAIL "want $want got $got"; ok=0; fi
  n=$((n + 1))
done
ALL=$(sha < /tmp/rand)
echo "HOSTCHECK $BASE $((MIB << 20)) $ALL"
echo "METRIC odirect_step_ms $(( $(now_ms) - ts ))"; ts=$(now_ms)

# ext4 in the first 64 MiB: mkfs, copy a tree, fsck, remount, compare.
mkfs.ext4 -q -F /dev/sda 65536 >/dev/null 2>&1 && res mkfs PASS "" || res mkfs FAIL "mkfs.ext4"
mount -t ext4 /dev/sda /mnt || res mount FAIL "mount -t ext4"
# The tree: the USB drivers (a fixed set whatever else the initramfs
# carries: the file system is 64 MiB).
SRC=/lib/modules/$(uname -r)/kernel/drivers/usb
grep -q ' /mnt ' /proc/mounts && {
  mkdir /mnt/tree && cp -a "$SRC" /mnt/tree/usb || res ext4_copy FAIL "cp -a $SRC: $(df -k /mnt | tail -1)"
  (cd "$SRC" && find . -type f | sort | xargs sha256sum) > /tmp/tree.sum
  umount /mnt
}
if e2fsck -fn /dev/sda >/tmp/fsck.log 2>&1; then res fsck PASS "clean"; else res fsck FAIL "$(tail -3 /tmp/fsck.log | tr '\n' ' ')"; fi
mount -t ext4 /dev/sda /mnt || res remount FAIL "mount -t ext4"
grep -q ' /mnt ' /proc/mounts && {
  if (cd /mnt/tree/usb && find . -type f | sort | xargs sha256sum) | cmp -s - /tmp/tree.sum; then
    res ext4_tree PASS "$(wc -l < /tmp/tree.sum) files"
  else
    res ext4_tree FAIL "tree differs"
  fi
  umount /mnt
}

echo "METRIC ext4_step_ms $(( $(now_ms) - ts ))"; ts=$(now_ms)

# What the block layer moved (512-byte sectors read and written), for the
# host's USB capture check: once before the disk goes away, once at the end.
diskstat() { awk '{print "DISKSTAT", $3, $7}' /sys/block/sda/stat 2>/dev/null || true; }

# Unbind and rebind the controller driver (controller reset), read again.
if [ -n "$PCI" ]; then
  diskstat
  echo "$PCI" > /sys/bus/pci/drivers/$HCDRV/unbind
  i=0; while [ -b /dev/sda ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
  echo "$PCI" > /sys/bus/pci/drivers/$HCDRV/bind
  if wait_sda 60; then
    got=$(dd if=/dev/sda bs=1M count=$MIB skip=$((BASE >> 20)) iflag=direct 2>/dev/null | sha)
    [ "$got" = "$ALL" ] && res rebind PASS "$got" || res rebind FAIL "data after rebind differs"
  else
    res rebind FAIL "no /dev/sda after rebind"
  fi
  echo "METRIC rebind_step_ms $(( $(now_ms) - ts ))"
fi
diskstat
if [ "$MODE" = demo ]; then
  echo "--- guest kernel log (USB) ---"
  dmesg | grep -E 'xhci_hcd 0|ehci-pci 0|uhci_hcd 0|usb [0-9]-[0-9]|usb-storage [0-9]|scsi [0-9]|sd [0-9]' | head -30
fi
