#!/bin/sh
# /init of dom0's initramfs (busybox): mount the dom0 disk (/dev/vda, ext4;
# the outer QEMU opens it with snapshot=on, so writes are thrown away at the
# end) and hand over to /sbin/xtb-init on it.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# virtio_pci is a module in 6.1 (bookworm), built in in 6.12
modprobe virtio_pci
modprobe virtio_blk
modprobe ext4
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do usleep 100000; i=$((i + 1)); done
if ! mount -t ext4 /dev/vda /newroot; then
  echo "XTB-DOM0-FAIL cannot mount /dev/vda"
  poweroff -f
fi
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /sbin/xtb-init
