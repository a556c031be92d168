#!/usr/bin/env bash
# The guest matrix: for each kernel (Debian 12's 6.1 and trixie's 6.12),
# boot a stock kernel whose xhci_hcd + usb-storage drive our controller
# over vfio-user, run the storage checks, then verify on the host that the
# image file holds exactly what the guest wrote; the same with the stick
# also offering UAS (the guest's uas driver over our xHCI's bulk streams);
# then a read-only stick.
# Guest boots run one at a time.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
eval "$("$HERE/fetch.sh")"
(cd "$ROOT" && cargo build --release -q -p devmodel)
DM=$ROOT/target/release/xen-usb-dm
STICK=$((256 << 20))
fail=0
passed=0 failed=0
count() { # $1 = log with RESULT lines (guest or host side)
  passed=$((passed + $(grep -c 'RESULT .* PASS' "$1" || true)))
  failed=$((failed + $(grep -c 'RESULT .* FAIL' "$1" || true)))
}

. "$HERE/lib.sh"

# rw_run K W LABEL APPEND...: a read-write stick (fresh image), the storage
# checks, then the host-side image check. UAS=true in the environment makes
# the stick offer UAS too (the guest's uas driver must take it).
rw_run() {
  local K=$1 W=$2 label=$3 st; shift 3
  rm -f "$W/stick.img"; truncate -s $STICK "$W/stick.img"
  start_dm "$DM" "$W" false "$W/dm.log"
  local t=$(date +%s)
  if APPEND="stick_bytes=$STICK $*" "$HERE/boot.sh" "$K" "$W/guest.log" -device "$(vfio_dev "$W")"; then
    st=PASS
  else
    st=FAIL; fail=1
  fi
  stop_dm
  grep -E '^(RESULT|METRIC)' "$W/guest.log" | sed "s/^/  [$K $label] /" || true
  # Host-side check: the image holds the guest's data (nothing lost).
  read -r _ off len sum < <(grep '^HOSTCHECK' "$W/guest.log" || echo "HOSTCHECK 0 0 none")
  got=$(dd if="$W/stick.img" bs=1M skip=$((off >> 20)) count=$((len >> 20)) 2>/dev/null | sha256sum | cut -d' ' -f1)
  if [ "$sum" != none ] && [ "$got" = "$sum" ]; then echo "  [$K $label] RESULT host_image PASS $got"; passed=$((passed + 1))
  else echo "  [$K $label] RESULT host_image FAIL image $got guest $sum"; fail=1; failed=$((failed + 1)); fi
  count "$W/guest.log"
  echo "matrix: $K $label: $st ($(( $(date +%s) - t )) s)"
  [ $st = PASS ] || { tail -40 "$W/guest.log"; tail -20 "$W/dm.log"; }
}

for K in $KERNELS; do
  W=$(mktemp -d)
  rw_run "$K" "$W" read-write
  UAS=true rw_run "$K" "$W" uas stick_proto=uas

  # Read-only stick with known contents.
  dd if=/dev/urandom of="$W/stick.img" bs=1M count=4 conv=notrunc 2>/dev/null
  before=$(sha256sum < "$W/stick.img")
  start_dm "$DM" "$W" true "$W/dm.log"
  t=$(date +%s)
  if APPEND="stick_bytes=$STICK stick_ro=1" "$HERE/boot.sh" "$K" "$W/guest-ro.log" -device "$(vfio_dev "$W")"; then
    st=PASS
  else
    st=FAIL; fail=1
  fi
  stop_dm
  grep -E '^RESULT' "$W/guest-ro.log" | sed "s/^/  [$K ro] /" || true
  if [ "$(sha256sum < "$W/stick.img")" = "$before" ]; then echo "  [$K ro] RESULT host_unchanged PASS"; passed=$((passed + 1))
  else echo "  [$K ro] RESULT host_unchanged FAIL"; fail=1; failed=$((failed + 1)); fi
  count "$W/guest-ro.log"
  echo "matrix: $K read-only: $st ($(( $(date +%s) - t )) s)"
  [ $st = PASS ] || { tail -40 "$W/guest-ro.log"; tail -20 "$W/dm.log"; }
  rm -rf "$W"
done
[ $fail = 0 ] && echo "matrix: all passed" || echo "matrix: FAILED"
echo "matrix: $passed passed, $failed failed"
exit $fail
