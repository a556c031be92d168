#!/bin/bash
# /sbin/xtb-init in the dom0 image (PID 1 after the initramfs' switch_root):
# the Xen tool stack without systemd, then the per-run script from the 9p
# share (/mnt/share/dom0-run.sh), then power off. Whatever happens, it ends
# in a power-off so the outer QEMU stops. Console markers (hvc0 -> Xen's
# com1 -> the outer serial log), read by tests/xen/run.sh:
#   XTB-DOM0-UP <uptime s>     tool stack up, share mounted
#   XTB-DOM0-FAIL <why>        set-up failed
#   XTB-DOM0-END               run script finished
set -euo pipefail
# Xen's tools (xenstored, xen-init-dom0, xenconsoled) live in
# /usr/lib/xen-SERIES/bin: 4.20 in the trixie image, 4.17 in bookworm's.
XENBIN=$(echo /usr/lib/xen-4.*/bin)
export PATH=$XENBIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin
trap 'echo "XTB-DOM0-FAIL line $LINENO"; sync; busybox poweroff -f' ERR
mount -t proc proc /proc
mount -t sysfs sys /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
ln -sfn /proc/self/fd /dev/fd
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
hostname xtb-dom0

modprobe -a xenfs xen-evtchn xen-privcmd xen-gntdev xen-gntalloc 9p 9pnet_virtio
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /mnt/share
XENSTORED_ROOTDIR=/run/xenstored xenstored --pid-file /run/xenstored.pid
for _ in $(seq 100); do xenstore-read -s / >/dev/null 2>&1 && break; sleep 0.2; done
xen-init-dom0 >/dev/null
# Guests' PV consoles (hvc0) are logged to /var/log/xen/console/guest-NAME.log.
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share
echo "XTB-DOM0-UP $(cut -d' ' -f1 /proc/uptime)"

trap - ERR
bash /mnt/share/dom0-run.sh > /mnt/share/run/dom0-run.log 2>&1 || echo "XTB-DOM0-FAIL dom0-run.sh exited with $?"
echo "XTB-DOM0-END"
sync
busybox poweroff -f
