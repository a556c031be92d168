#!/bin/sh
# Runs inside the guest (busybox sh). Parameters on the kernel command
# line: stick_bytes=N, stick_ro=0|1, mode=check|bench|demo.
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

t0=$(now_ms)
modprobe xhci-pci; modprobe uas; modprobe usb-storage; modprobe sd_mod; modprobe crc32c 2>/dev/null; modprobe ext4
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
PCI=$(ls /sys/bus/pci/drivers/xhci_hcd/ | grep '^0000:' | head -1)
[ -n "$PCI" ] && res xhci_bound PASS "$PCI" || res xhci_bound FAIL "xhci_hcd not bound"
# The controller interrupts through MSI-X/MSI, not a silent INTx fallback
# (6.1 labels MSI-X vectors "PCI-MSI", 6.12 "PCI-MSIX"; INTx is "IO-APIC").
if grep xhci_hcd /proc/interrupts | grep -q 'PCI-MSI'; then res msix PASS "$(grep xhci_hcd /proc/interrupts | awk '{print $1}' | tr -d '\n')"
else res msix FAIL "$(grep xhci_hcd /proc/interrupts | tr -s ' ' | head -1)"; fi
SIZE=$(blockdev --getsize64 /dev/sda)
[ "$SIZE" = "$BYTES" ] && res size PASS "$SIZE" || res size FAIL "got $SIZE want $BYTES"

[ "$MODE" = enum ] && exit 0

if [ "$MODE" = bench ]; then
  for i in 1 2 3 4 5; do
    t=$(now_ms); dd if=/dev/zero of=/dev/sda bs=1M count=128 oflag=direct 2>/dev/null; w=$(( $(now_ms) - t ))
    t=$(now_ms); dd if=/dev/sda of=/dev/null bs=1M count=128 iflag=direct 2>/dev/null; r=$(( $(now_ms) - t ))
    echo "METRIC write_ms $w"; echo "METRIC read_ms $r"
    # /proc/uptime ticks in 10 ms: about 2 % error at 0.5 s.
    echo "METRIC write_mibps $(awk -v ms=$w 'BEGIN {printf "%.1f", (ms > 0) ? 128000 / ms : 0}')"
    echo "METRIC read_mibps $(awk -v ms=$r 'BEGIN {printf "%.1f", (ms > 0) ? 128000 / ms : 0}')"
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

# 64 MiB of random data at 128 MiB, written as four 16 MiB slices with
# block sizes 4K, 8K, 64K, 1M (O_DIRECT), read back and compared.
BASE=$((128 << 20)); SLICE=$((16 << 20))
ts=$(now_ms)
dd if=/dev/urandom of=/tmp/rand bs=1M count=64 2>/dev/null
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
echo "HOSTCHECK $BASE $((64 << 20)) $ALL"
echo "METRIC odirect_step_ms $(( $(now_ms) - ts ))"; ts=$(now_ms)

# ext4 in the first 64 MiB: mkfs, copy a tree, fsck, remount, compare.
mkfs.ext4 -q -F /dev/sda 65536 >/dev/null 2>&1 && res mkfs PASS "" || res mkfs FAIL "mkfs.ext4"
mount -t ext4 /dev/sda /mnt || res mount FAIL "mount -t ext4"
grep -q ' /mnt ' /proc/mounts && {
  mkdir /mnt/tree && cp -a /lib/modules /mnt/tree/
  (cd /lib/modules && find . -type f | sort | xargs sha256sum) > /tmp/tree.sum
  umount /mnt
}
if e2fsck -fn /dev/sda >/tmp/fsck.log 2>&1; then res fsck PASS "clean"; else res fsck FAIL "$(tail -3 /tmp/fsck.log | tr '\n' ' ')"; fi
mount -t ext4 /dev/sda /mnt || res remount FAIL "mount -t ext4"
grep -q ' /mnt ' /proc/mounts && {
  if (cd /mnt/tree/modules && find . -type f | sort | xargs sha256sum) | cmp -s - /tmp/tree.sum; then
    res ext4_tree PASS "$(wc -l < /tmp/tree.sum) files"
  else
    res ext4_tree FAIL "tree differs"
  fi
  umount /mnt
}

echo "METRIC ext4_step_ms $(( $(now_ms) - ts ))"; ts=$(now_ms)

# Unbind and rebind the controller driver (controller reset), read again.
if [ -n "$PCI" ]; then
  echo "$PCI" > /sys/bus/pci/drivers/xhci_hcd/unbind
  i=0; while [ -b /dev/sda ] && [ $i -lt 100 ]; do usleep 50000; i=$((i+1)); done
  echo "$PCI" > /sys/bus/pci/drivers/xhci_hcd/bind
  if wait_sda 60; then
    got=$(dd if=/dev/sda bs=1M count=64 skip=$((BASE >> 20)) iflag=direct 2>/dev/null | sha)
    [ "$got" = "$ALL" ] && res rebind PASS "$got" || res rebind FAIL "data after rebind differs"
  else
    res rebind FAIL "no /dev/sda after rebind"
  fi
  echo "METRIC rebind_step_ms $(( $(now_ms) - ts ))"
fi
if [ "$MODE" = demo ]; then
  echo "--- guest kernel log (USB) ---"
  dmesg | grep -E 'xhci_hcd 0|usb [0-9]-[0-9]|usb-storage [0-9]|scsi [0-9]|sd [0-9]' | head -30
fi
