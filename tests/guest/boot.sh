#!/usr/bin/env bash
# boot.sh KERNEL_VERSION LOG [extra QEMU arguments...]
# Boots a stock Debian kernel under TCG with a busybox initramfs that runs
# $GUEST_SCRIPT (default storage-checks.sh), serial console into LOG.
# Env: APPEND (extra kernel command line), TIMEOUT (s, default 900),
#      EXTRA_MODULES (more module subtrees for the initramfs),
#      GUEST_MEM (MiB, default 512).
# Exit status: 0 if the guest printed GUEST-DONE and no "RESULT ... FAIL".
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
VER=$1 LOG=$2; shift 2
eval "$("$HERE/fetch.sh" 2>/dev/null)"
SCRIPT=${GUEST_SCRIPT:-$HERE/storage-checks.sh}
KDIR=$XEN_USB_CACHE/kernel-$VER
key=$( (cat "$SCRIPT" "$HERE/mkinitrd.sh"; echo "${BUSYBOX:-}${EXTRA_MODULES:-}") | sha256sum | cut -c1-12)
INITRD=$XEN_USB_CACHE/initrd-$VER-$key.cpio.gz
if [ ! -f "$INITRD" ]; then
  BUSYBOX=${BUSYBOX:-} "$HERE/mkinitrd.sh" "$KDIR" "$VER" "$INITRD.tmp" "$SCRIPT"
  mv "$INITRD.tmp" "$INITRD"
fi
MEM=${GUEST_MEM:-512}
# The ELF vmlinux (PVH entry, ~8 s faster under TCG) unless KERNEL_IMAGE=bzimage.
KIMG=$KDIR/boot/vmlinux-$VER
if [ "${KERNEL_IMAGE:-}" = bzimage ] || [ ! -f "$KIMG" ]; then KIMG=$KDIR/boot/vmlinuz-$VER; fi
set +e
timeout --kill-after=10 "${TIMEOUT:-900}" "$QEMU" -accel tcg -m "${MEM}M" \
  -object memory-backend-memfd,id=mem,size=${MEM}M,share=on \
  -machine q35,memory-backend=mem -nic none -display none -vga none \
  -serial stdio -no-reboot \
  -kernel "$KIMG" -initrd "$INITRD" \
  -append "console=ttyS0 quiet panic=-1 usb-storage.delay_use=0 ${APPEND:-}" \
  "$@" < /dev/null > "$LOG" 2>&1
rc=$?
set -e
tr -d '\r' < "$LOG" > "$LOG.tmp" && mv "$LOG.tmp" "$LOG"
if [ $rc -ne 0 ]; then echo "boot: QEMU exited with $rc" >&2; fi
grep -q '^GUEST-DONE' "$LOG" || { echo "boot: guest did not finish (see $LOG)" >&2; exit 1; }
if grep -q '^RESULT .* FAIL' "$LOG"; then grep '^RESULT .* FAIL' "$LOG" >&2; exit 1; fi
exit 0
