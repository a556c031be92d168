#!/usr/bin/env bash
# mkinitrd.sh KERNEL_DIR VERSION OUT GUEST_SCRIPT
# A busybox initramfs with the kernel's USB/SCSI/ext4 modules (decompressed,
# depmod'ed), e2fsprogs from the host, and /init running GUEST_SCRIPT then
# powering off. Env: BUSYBOX = a static busybox (default /bin/busybox;
# fetch.sh caches bookworm's busybox-static and prints its path);
# EXTRA_MODULES = more module subtrees (e.g. "fs/9p net/9p drivers/virtio").
set -euo pipefail
KDIR=$1 VER=$2 OUT=$3 SCRIPT=$4
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=$W/root
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,mnt,etc,lib64,usr/lib/x86_64-linux-gnu}
BB=${BUSYBOX:-/bin/busybox}
if ldd "$BB" >/dev/null 2>&1; then  # ldd fails on a static binary
  echo "mkinitrd: $BB is not statically linked" >&2; exit 1
fi
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
# e2fsprogs (busybox has no ext4 mkfs/fsck) with their libraries.
for b in /sbin/mke2fs /sbin/e2fsck; do
  cp "$b" "$R/sbin/"
  for l in $(ldd "$b" | awk '/=> \// {print $3} /ld-linux/ {print $1}'); do
    mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"
  done
done
ln -sf mke2fs "$R/sbin/mkfs.ext4"; ln -sf e2fsck "$R/sbin/fsck.ext4"
# The kernel asks /sbin/modprobe for modules (crc32c for ext4).
ln -sf /bin/busybox "$R/sbin/modprobe"
# Modules: the subtrees USB storage and ext4 need, decompressed so that
# busybox modprobe can load them.
M=$KDIR/lib/modules/$VER
D=$R/lib/modules/$VER
mkdir -p "$D/kernel"
for sub in block drivers/usb drivers/hid drivers/scsi fs/ext4 fs/jbd2 fs/mbcache.ko fs/mbcache.ko.xz lib crypto arch/x86/crypto ${EXTRA_MODULES:-}; do
  [ -e "$M/kernel/$sub" ] || continue
  mkdir -p "$D/kernel/$(dirname "$sub")"
  cp -r "$M/kernel/$sub" "$D/kernel/$(dirname "$sub")/"
done
find "$D" -name '*.ko.xz' -exec xz -d {} +
find "$D" -name '*.ko.zst' -exec zstd -q -d --rm {} + 2>/dev/null || true
cp "$M"/modules.builtin* "$M"/modules.order "$D/" 2>/dev/null || true
depmod -b "$R" "$VER"
cp "$SCRIPT" "$R/guest.sh"
chmod +x "$R/guest.sh"
cat > "$R/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
echo "GUEST-START $(uname -r)"
echo "METRIC userspace_ms $(awk '{printf "%d", $1*1000}' /proc/uptime)"
sh /guest.sh 2>&1
echo "GUEST-DONE"
sync
poweroff -f
INIT
chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT"
