#!/usr/bin/env bash
# fetch.sh [XEN_SERIES]     (4.20, the default, or 4.17)
# Builds and caches the real-Xen test bed for one Xen series (see
# README.md), outside the clone in ${XEN_USB_CACHE:-~/.cache/xen-usb-dm},
# keyed by package version and by the hash of the scripts baked into each
# artefact. Only Debian packages are downloaded. Idempotent; well under a
# second when everything is cached.
#
#   series  dom0 suite  kernel (dom0 and guest)   libxl's QEMU
#   4.20    trixie      trixie's 6.12             qemu-system-xen 10.0
#   4.17    bookworm    bookworm's 6.1            qemu-system-xen 7.2
#
#   Xen hypervisor ELF     xen-hypervisor-SERIES-amd64, from the dom0 root
#                          file system so tools and hypervisor match
#   dom0 + guest kernel    the suite's Debian kernel, the one
#                          tests/guest/fetch.sh caches (kernel-VER)
#   dom0 initrd            busybox: virtio_blk + ext4, switch_root to /dev/vda
#   dom0 image             debootstrap'ed suite (+ its -updates and -security
#                          for bookworm) with xen-utils, xenstore-utils,
#                          qemu-system-xen, busybox as ext4 made with
#                          mkfs.ext4 -d, /sbin/xtb-init = dom0-init.sh
#   guest initrd           busybox + xhci_pci, usb-storage, sd_mod, usbhid,
#                          hid-generic, evdev and their dependencies,
#                          /init = guest-init.sh
#
# Prints shell assignments for the caller to eval (OUTER_QEMU XEN_SERIES
# XEN_ELF XEN_VERSION KERNEL_VERSION DOM0_KERNEL DOM0_INITRD DOM0_IMG
# GUEST_KERNEL GUEST_INITRD QEMU_XEN XEN_USB_CACHE); progress and
# "fetch: ok ..." go to stderr.
# Host packages (QEMU 7.2, debootstrap, ...) come from scripts/setup.sh.
set -euo pipefail
shopt -s inherit_errexit
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${XEN_USB_CACHE:-$HOME/.cache/xen-usb-dm}
mkdir -p "$CACHE"
XEN_SERIES=${1:-4.20}
log() { echo "xen fetch ($XEN_SERIES): $*" >&2; }
now() { date +%s; }
t_start=$(now)

# Host tools: the outer emulator must be Debian 12's QEMU 7.2 (with QEMU 11
# the HVM guest stalls: shared/reference/xen-testbed.md).
missing=()
for c in qemu-system-x86_64 debootstrap mkfs.ext4 cpio depmod modprobe xz zstd gunzip; do
  command -v "$c" >/dev/null || missing+=("$c")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "missing host tools: ${missing[*]} (run scripts/setup.sh)"; exit 1
fi
OUTER_QEMU=$(command -v qemu-system-x86_64)

# Kernel and busybox: the guest bed's fetch (it takes the cache lock itself,
# and its fast path makes this cheap).
eval "$("$HERE/../guest/fetch.sh" 2>/dev/null)" \
  || { log "tests/guest/fetch.sh failed; run it for details"; exit 1; }
case $XEN_SERIES in
  4.20) SUITE=trixie
        KERNEL_VERSION=${KERNELS##* } ;;     # the trixie kernel (second entry)
  4.17) SUITE=bookworm
        KERNEL_VERSION=${KERNELS%% *} ;;     # the bookworm kernel (first entry)
  *) log "unknown Xen series $XEN_SERIES (4.20 or 4.17)"; exit 2 ;;
esac
KDIR=$XEN_USB_CACHE/kernel-$KERNEL_VERSION

# One fetch at a time per cache (the guest bed uses the same lock).
exec 9>"$CACHE/.lock"
flock 9

. "$HERE/../guest/trixie-apt.sh"      # APTDIR, stamp, tapt

# Everything baked into the artefacts: a change to any of these scripts
# rebuilds what it is part of (and only that).
key() { cat "$@" | sha256sum | cut -c1-12; }
FETCH_KEY=$(key "${BASH_SOURCE[0]}" "$HERE/mkinitrd.sh" "$HERE/dom0-initrd-init.sh" \
  "$HERE/dom0-init.sh" "$HERE/guest-init.sh" <(echo "$XEN_SERIES $KERNEL_VERSION $BUSYBOX"))
RESOLVED=$CACHE/xen-resolved-$XEN_SERIES.env
if [ "${XEN_USB_REFRESH:-0}" != 1 ] && [ -f "$RESOLVED" ] && [ "$RESOLVED" -nt "$stamp" ] \
   && grep -qx "FETCH_KEY=$FETCH_KEY" "$RESOLVED" \
   && ( . "$RESOLVED"; for f in "$XEN_ELF" "$DOM0_KERNEL" "$DOM0_INITRD" "$DOM0_IMG" \
          "$GUEST_KERNEL" "$GUEST_INITRD"; do [ -f "$f" ] || exit 1; done ); then
  grep -v '^FETCH_KEY=' "$RESOLVED"
  ( . "$RESOLVED"; log "ok (cached) xen=$XEN_VERSION kernel=$KERNEL_VERSION dom0=$DOM0_IMG" )
  exit 0
fi

# --- dom0 root file system (debootstrap) --------------------------------------
# The candidate version keys the cache: trixie's from the private lists,
# bookworm's from the host's (Debian 12, with bookworm-security).
if [ "$SUITE" = trixie ]; then
  XEN_VERSION=$(tapt apt-cache policy "xen-utils-$XEN_SERIES" | awk '/Candidate:/ {print $2}')
else
  XEN_VERSION=$(apt-cache policy "xen-utils-$XEN_SERIES" 2>/dev/null | awk '/Candidate:/ {print $2}')
  case "$XEN_VERSION" in ""|"(none)")
    log "apt-get update (host)"; apt-get update -q >/dev/null
    XEN_VERSION=$(apt-cache policy "xen-utils-$XEN_SERIES" | awk '/Candidate:/ {print $2}') ;;
  esac
fi
case "$XEN_VERSION" in ""|"(none)") log "xen-utils-$XEN_SERIES not found in $SUITE"; exit 1;; esac
XD=$CACHE/xen-${XEN_VERSION//[:~+]/_}
ROOTFS=$XD/rootfs
mkdir -p "$XD"
PKGS=xen-hypervisor-$XEN_SERIES-amd64,xen-utils-$XEN_SERIES,xen-utils-common,xenstore-utils
PKGS+=,qemu-system-xen,kmod,busybox-static,procps,iproute2,util-linux
if [ ! -f "$ROOTFS/.complete" ]; then
  t=$(now)
  log "debootstrap $SUITE with Xen $XEN_VERSION (a few minutes)"
  rm -rf "$ROOTFS.tmp"
  # debootstrap mounts proc/sys inside the target; undo that on failure.
  trap 'for m in $(awk -v p="$ROOTFS.tmp/" "index(\$2, p) == 1 {print \$2}" /proc/mounts | sort -r); do umount -l "$m"; done' EXIT
  debootstrap --variant=minbase --components=main --include="$PKGS" \
      "$SUITE" "$ROOTFS.tmp" http://deb.debian.org/debian > "$XD/debootstrap.log" 2>&1 \
    || { log "debootstrap failed, see $XD/debootstrap.log"; tail -5 "$XD/debootstrap.log" >&2; exit 1; }
  if [ "$SUITE" = bookworm ]; then
    # Bookworm's Xen fixes come through bookworm-security: upgrade so the
    # hypervisor and the tools are the current point release, as users run.
    cat > "$ROOTFS.tmp/etc/apt/sources.list" <<SRC
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
    { chroot "$ROOTFS.tmp" apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive chroot "$ROOTFS.tmp" apt-get -y -q \
           -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold upgrade
    } >> "$XD/debootstrap.log" 2>&1 \
      || { log "upgrade from bookworm-security failed, see $XD/debootstrap.log"; tail -5 "$XD/debootstrap.log" >&2; exit 1; }
  fi
  for m in $(awk -v p="$ROOTFS.tmp/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done
  trap - EXIT
  chroot "$ROOTFS.tmp" apt-get clean
  rm -rf "$ROOTFS.tmp"/var/lib/apt/lists/* "$ROOTFS.tmp"/usr/share/{doc,man,locale}/*
  chroot "$ROOTFS.tmp" dpkg-query -W -f '${Version}\n' "xen-utils-$XEN_SERIES" > "$ROOTFS.tmp/.xen-version"
  touch "$ROOTFS.tmp/.complete"
  rm -rf "$ROOTFS"; mv "$ROOTFS.tmp" "$ROOTFS"
  log "debootstrap done in $(( $(now) - t )) s"
  # Older versions of this series (trees and images, about 1 GiB each) go.
  for d in "$CACHE"/xen-"$XEN_SERIES".*/; do [ "${d%/}" = "$XD" ] || rm -rf "$d"; done
fi
XEN_VERSION=$(cat "$ROOTFS/.xen-version")

# --- Xen: the multiboot ELF that QEMU's -kernel loads -------------------------
XEN_ELF=$XD/xen-$XEN_SERIES.elf
if [ ! -f "$XEN_ELF" ]; then
  gz=$(ls "$ROOTFS"/boot/xen-"$XEN_SERIES"-amd64.gz 2>/dev/null | head -1)
  [ -n "$gz" ] || { log "no /boot/xen-$XEN_SERIES-amd64.gz in the dom0 root"; exit 1; }
  gunzip -c "$gz" > "$XEN_ELF.tmp" && mv "$XEN_ELF.tmp" "$XEN_ELF"
fi

# libxl's QEMU in this root: Debian's qemu-system-xen puts it in
# /usr/libexec (xen-utils' libxl looks there); what the wrapper execs.
QEMU_XEN=""
for q in /usr/libexec/xen-qemu-system-i386 /usr/lib/xen-"$XEN_SERIES"/bin/qemu-system-i386; do
  if [ -e "$ROOTFS$q" ]; then QEMU_XEN=$q; break; fi
done
[ -n "$QEMU_XEN" ] || { log "no qemu-system-i386 for libxl in the dom0 root"; exit 1; }

# --- initrds ------------------------------------------------------------------
DOM0_KERNEL=$KDIR/boot/vmlinuz-$KERNEL_VERSION
GUEST_KERNEL=$DOM0_KERNEL
k=$(key "$HERE/mkinitrd.sh" "$HERE/dom0-initrd-init.sh" <(echo "$BUSYBOX"))
DOM0_INITRD=$XD/dom0-initrd-$KERNEL_VERSION-$k.cpio.gz
if [ ! -f "$DOM0_INITRD" ]; then
  log "dom0 initrd"
  BUSYBOX=$BUSYBOX "$HERE/mkinitrd.sh" "$KDIR" "$KERNEL_VERSION" "$DOM0_INITRD.tmp" \
      "$HERE/dom0-initrd-init.sh" virtio_pci virtio_blk ext4 crc32c_generic
  rm -f "$XD"/dom0-initrd-*.cpio.gz; mv "$DOM0_INITRD.tmp" "$DOM0_INITRD"
fi
k=$(key "$HERE/mkinitrd.sh" "$HERE/guest-init.sh" <(echo "$BUSYBOX"))
GUEST_INITRD=$XD/guest-initrd-$KERNEL_VERSION-$k.cpio.gz
if [ ! -f "$GUEST_INITRD" ]; then
  log "guest initrd"
  BUSYBOX=$BUSYBOX "$HERE/mkinitrd.sh" "$KDIR" "$KERNEL_VERSION" "$GUEST_INITRD.tmp" \
      "$HERE/guest-init.sh" xhci_pci xhci_hcd ehci_pci ehci_hcd uhci_hcd usb-storage sd_mod scsi_mod usb_common usbcore \
      usbhid hid-generic evdev
  rm -f "$XD"/guest-initrd-*.cpio.gz; mv "$GUEST_INITRD.tmp" "$GUEST_INITRD"
fi

# --- dom0 disk image ------------------------------------------------------------
# The kernel's modules and our init go into the root directory, which then
# becomes an ext4 image without loop devices. Runs open it with snapshot=on.
k=$(key "${BASH_SOURCE[0]}" "$HERE/dom0-init.sh" <(echo "$KERNEL_VERSION"))
DOM0_IMG=$XD/dom0-$KERNEL_VERSION-$k.img
if [ ! -f "$DOM0_IMG" ]; then
  t=$(now)
  log "dom0 image"
  rm -rf "$ROOTFS"/usr/lib/modules/*
  mkdir -p "$ROOTFS/usr/lib/modules"
  cp -a "$KDIR/lib/modules/$KERNEL_VERSION" "$ROOTFS/usr/lib/modules/"
  install -m 755 "$HERE/dom0-init.sh" "$ROOTFS/usr/sbin/xtb-init"
  mkdir -p "$ROOTFS/mnt/share"
  echo xtb-dom0 > "$ROOTFS/etc/hostname"
  rm -f "$DOM0_IMG.tmp"
  mkfs.ext4 -q -F -L xtb-dom0 -E lazy_itable_init=0 -d "$ROOTFS" "$DOM0_IMG.tmp" 3G >/dev/null
  rm -f "$XD"/dom0-*.img; mv "$DOM0_IMG.tmp" "$DOM0_IMG"
  log "dom0 image done in $(( $(now) - t )) s ($(du -m "$DOM0_IMG" | cut -f1) MiB used)"
fi

{
  echo "OUTER_QEMU=$OUTER_QEMU"
  echo "XEN_SERIES=$XEN_SERIES"
  echo "XEN_ELF=$XEN_ELF"
  echo "XEN_VERSION=$XEN_VERSION"
  echo "KERNEL_VERSION=$KERNEL_VERSION"
  echo "DOM0_KERNEL=$DOM0_KERNEL"
  echo "DOM0_INITRD=$DOM0_INITRD"
  echo "DOM0_IMG=$DOM0_IMG"
  echo "GUEST_KERNEL=$GUEST_KERNEL"
  echo "GUEST_INITRD=$GUEST_INITRD"
  echo "QEMU_XEN=$QEMU_XEN"
  echo "XEN_USB_CACHE=$CACHE"
  echo "FETCH_KEY=$FETCH_KEY"
} > "$RESOLVED.tmp"
mv "$RESOLVED.tmp" "$RESOLVED"
grep -v '^FETCH_KEY=' "$RESOLVED"
log "ok xen=$XEN_VERSION kernel=$KERNEL_VERSION dom0=$DOM0_IMG ($(( $(now) - t_start )) s)"
