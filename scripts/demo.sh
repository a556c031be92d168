#!/usr/bin/env bash
# The demo: sets up what is missing, builds xen-usb-dm, and boots an
# unmodified Debian Linux guest (QEMU, software emulation) whose stock
# xhci_hcd and usb-storage drivers use our xHCI controller and USB stick
# over vfio-user. The guest finds the controller, gets /dev/sda, writes and
# reads back data with checksums, builds an ext4 file system on it, and
# shows its kernel log; the host then checks the image file.
# (No Xen needed: this is the embedded default when Xen is not present.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== building xen-usb-dm"
cargo build --release -q -p devmodel
echo "== fetching QEMU and a stock Debian kernel (cached)"
eval "$(tests/guest/fetch.sh)"
K=${KERNELS%% *}
W=$(mktemp -d); trap 'kill ${DM_PID:-} 2>/dev/null || true; rm -rf "$W"' EXIT
truncate -s 256M "$W/stick.img"
. tests/guest/lib.sh
echo "== starting: xen-usb-dm --config $W/xen-dm.toml"
start_dm target/release/xen-usb-dm "$W" false "$W/dm.log"
echo "== booting Debian kernel $K under QEMU $QEMU_VERSION (TCG, about a minute)"
rc=0
APPEND="stick_bytes=$((256 << 20)) mode=demo" tests/guest/boot.sh "$K" "$W/guest.log" \
  -device "$(vfio_dev "$W")" || rc=$?
stop_dm
echo "== guest kernel log (USB)"
sed -n '/--- guest kernel log/,/GUEST-DONE/p' "$W/guest.log" | grep -v -e '^---' -e GUEST-DONE | head -30
echo "== guest checks"
grep -E '^(RESULT|METRIC)' "$W/guest.log" || true
read -r _ off len sum < <(grep '^HOSTCHECK' "$W/guest.log" || echo "HOSTCHECK 0 0 none")
got=$(dd if="$W/stick.img" bs=1M skip=$((off >> 20)) count=$((len >> 20)) 2>/dev/null | sha256sum | cut -d' ' -f1)
echo "== host: image file holds the guest's 64 MiB: $([ "$got" = "$sum" ] && echo "yes ($got)" || echo "NO")"
echo "== device model log"
grep -E 'storage|served|connected|stats' "$W/dm.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-160
[ $rc = 0 ] && [ "$got" = "$sum" ] && echo "demo: OK" || { echo "demo: FAILED"; exit 1; }
