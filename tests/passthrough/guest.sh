#!/bin/sh
# Runs inside the passthrough test VM (busybox sh). The host's root file
# system arrives read-only over 9p; the test binary runs from it as built,
# chrooted, against this kernel's usbfs. Kernel command line: pt_bin=PATH
# (the vmtest, vmtest_ehci or vmtest_uhci example, or devmodel's
# evdev_vmtest or events_vmtest), pt_mode=check|bench|ehci|uhci|evdev|events, pt_arg=N,
# pt_log=FILTER (tracing filter, e.g. passthrough=debug). In ehci mode the
# devices hang off QEMU's EHCI (a high-speed stick) and UHCI (a full-speed
# stick and a keyboard) instead of its xHCI.
arg() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
BIN=$(arg pt_bin); MODE=$(arg pt_mode); ARG=$(arg pt_arg)
PT_LOG=$(arg pt_log); export PT_LOG
# NDEV USB devices and the block devices DISKS must be there first.
DISKS="/dev/sda /dev/sdb"
case $MODE in
  ehci|uhci) HCDS="ehci-pci uhci-hcd"; NDEV=3 ;;
  evdev) HCDS="uinput evdev"; NDEV=0 ;;
  events) HCDS="xhci-pci"; NDEV=1; DISKS=/dev/sda ;;
  *) HCDS="xhci-pci uas"; NDEV=4 ;;
esac
for m in $HCDS usb-storage sd_mod virtio_pci 9pnet_virtio 9p; do modprobe $m; done
mkdir -p /host
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host; then
  echo "RESULT mount_9p FAIL"; exit 0
fi
# Writable scratch space goes on /run, not /tmp: the binary under test may
# itself live under the host's /tmp (a fresh clone there), which a tmpfs
# would hide.
mount -t devtmpfs dev /host/dev && mount -t proc proc /host/proc \
  && mount -t sysfs sys /host/sys && mount -t tmpfs run /host/run \
  || { echo "RESULT chroot_mounts FAIL"; exit 0; }
export TMPDIR=/run
# QEMU's devices enumerate (xHCI: the stick, keyboard, audio device and
# UAS disk; EHCI/UHCI: two sticks and a keyboard; events: one stick) and
# the block devices' drivers bind before the checks start.
i=0
while [ $NDEV != 0 ] && [ $i -lt 300 ]; do
  n=$(ls /sys/bus/usb/devices | grep -c '^[0-9]*-[0-9.]*$')
  disks=1; for b in $DISKS; do [ -b $b ] || disks=0; done
  [ "$n" -ge $NDEV ] && [ $disks = 1 ] && break
  usleep 100000; i=$((i+1))
done
echo "METRIC usb_devices $n"
chroot /host "$BIN" "$MODE" $ARG
