#!/usr/bin/env bash
# mkinitrd.sh KERNEL_DIR VERSION OUT.cpio.gz INIT MODULE...
# A small busybox initramfs: INIT as /init, and only the named modules with
# their dependencies (resolved with `modprobe -d KERNEL_DIR --show-depends`,
# decompressed for busybox's modprobe, indexed with `depmod -b`). Small on
# purpose: under nested emulation every byte the guest firmware loads costs.
# Env: BUSYBOX = a static busybox (default /bin/busybox).
set -euo pipefail
KDIR=$1 VER=$2 OUT=$3 INIT=$4
shift 4
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=$W/root
mkdir -p "$R"/{bin,sbin,dev,proc,sys,tmp,mnt,newroot,etc}
BB=${BUSYBOX:-/bin/busybox}
if ldd "$BB" >/dev/null 2>&1; then  # ldd fails on a static binary
  echo "mkinitrd: $BB is not statically linked" >&2; exit 1
fi
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
# The kernel asks /sbin/modprobe for modules (crc32c for ext4).
ln -sf /bin/busybox "$R/sbin/modprobe"

D=$R/lib/modules/$VER
mkdir -p "$D"
for m in "$@"; do
  # "insmod /KDIR/lib/modules/VER/kernel/....ko.xz" per module, or "builtin m".
  deps=$(modprobe -d "$KDIR" -S "$VER" --show-depends "$m") \
    || { echo "mkinitrd: no module $m in $KDIR" >&2; exit 1; }
  for p in $(awk '$1 == "insmod" {print $2}' <<< "$deps"); do
    rel=${p#*/lib/modules/"$VER"/}
    mkdir -p "$D/$(dirname "$rel")"
    cp "$p" "$D/$rel"
  done
done
find "$D" -name '*.ko.xz' -exec xz -d {} +
find "$D" -name '*.ko.zst' -exec zstd -q -d --rm {} + 2>/dev/null || true
cp "$KDIR/lib/modules/$VER"/modules.builtin* "$KDIR/lib/modules/$VER/modules.order" "$D/" 2>/dev/null || true
depmod -b "$R" "$VER"
install -m 755 "$INIT" "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT"
