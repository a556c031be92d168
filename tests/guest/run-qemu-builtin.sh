#!/usr/bin/env bash
# run-qemu-builtin.sh [KERNEL_VERSION...]
# Validates the guest test bed without our server: the same storage checks
# (storage-checks.sh) against QEMU's own qemu-xhci + usb-storage on a fresh
# sparse raw image, for each kernel (default: all that fetch.sh resolves),
# then verifies on the host that the image file holds what the guest wrote
# (every HOSTCHECK line). Also a read-only stick (readonly=on drive) and a
# bench boot whose METRIC lines are the baseline for our device.
# Env: BENCH=0 skips the bench boots; KEEP=1 keeps the work directory;
#      STICK_MIB (default 256); TIMEOUT per boot (default 300 s).
# Exit status: 0 only if every boot and every host check passed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
t_fetch=$(date +%s%N)
eval "$("$HERE/fetch.sh")"
echo "builtin: fetch took $(( ($(date +%s%N) - t_fetch) / 1000000 )) ms"
echo "builtin: QEMU $QEMU_VERSION ($("$QEMU" --version | head -1))"
STICK=$(( ${STICK_MIB:-256} << 20 ))
export TIMEOUT=${TIMEOUT:-300}
W=$(mktemp -d "${TMPDIR:-/tmp}/xen-usb-builtin.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "builtin: work directory $W"; else trap 'rm -rf "$W"' EXIT; fi
fail=0
if [ $# -gt 0 ]; then KS="$*"; else KS=$KERNELS; fi

# boot_stick NAME IMG APPEND DRIVE_OPTS: one boot with QEMU's xHCI + stick.
boot_stick() {
  local name=$1 img=$2 append=$3 dopts=$4 t rc=0
  t=$(date +%s%N)
  APPEND="stick_bytes=$STICK $append" "$HERE/boot.sh" "$K" "$W/$name.log" \
    -device qemu-xhci,id=xhci \
    -drive "if=none,id=stick,file=$img,format=raw$dopts" \
    -device usb-storage,bus=xhci.0,drive=stick || rc=$?
  local ms=$(( ($(date +%s%N) - t) / 1000000 ))
  grep -E '^(RESULT|METRIC)' "$W/$name.log" | sed "s/^/  [$K $name] /" || true
  if [ $rc = 0 ]; then
    echo "builtin: $K $name: PASS (${ms} ms wall)"
  else
    echo "builtin: $K $name: FAIL (${ms} ms wall), last guest lines:"
    tail -40 "$W/$name.log" | sed 's/^/    | /'
    fail=1
  fi
  return 0
}

# hostcheck LOG IMG: each "HOSTCHECK offset len sha256" must match the image.
hostcheck() {
  python3 - "$1" "$2" <<'PY'
import hashlib, sys
log, img = sys.argv[1], sys.argv[2]
lines = [l.split() for l in open(log, errors="replace") if l.startswith("HOSTCHECK ")]
if not lines:
    print("RESULT host_image FAIL no HOSTCHECK line in guest log"); sys.exit(1)
bad = 0
with open(img, "rb") as f:
    for _, off, length, want in lines:
        f.seek(int(off)); h = hashlib.sha256(); left = int(length)
        while left:
            b = f.read(min(left, 1 << 20))
            if not b: break
            h.update(b); left -= len(b)
        got = h.hexdigest()
        ok = got == want and left == 0
        bad += not ok
        print(f"RESULT host_image {'PASS' if ok else 'FAIL'} off={off} len={length} {got}"
              + ("" if ok else f" guest={want}"))
sys.exit(1 if bad else 0)
PY
}

for K in $KS; do
  [ -f "$XEN_USB_CACHE/kernel-$K/boot/vmlinuz-$K" ] || { echo "builtin: unknown kernel $K (have: $KERNELS)"; fail=1; continue; }
  # Read-write checks on a fresh sparse image, then the host-side check.
  rm -f "$W/stick.img"; truncate -s "$STICK" "$W/stick.img"
  boot_stick rw "$W/stick.img" "" ""
  if hostcheck "$W/rw.log" "$W/stick.img" > "$W/hostcheck.out"; then :; else fail=1; fi
  sed "s/^/  [$K rw] /" "$W/hostcheck.out"

  # Read-only stick with known contents: writes must fail, nothing changes.
  dd if=/dev/urandom of="$W/stick.img" bs=1M count=4 conv=notrunc status=none
  before=$(sha256sum < "$W/stick.img")
  boot_stick ro "$W/stick.img" "stick_ro=1" ",readonly=on"
  if [ "$(sha256sum < "$W/stick.img")" = "$before" ]; then echo "  [$K ro] RESULT host_unchanged PASS"
  else echo "  [$K ro] RESULT host_unchanged FAIL"; fail=1; fi

  # Throughput baseline (128 MiB O_DIRECT bs=1M write and read, twice).
  if [ "${BENCH:-1}" != 0 ]; then
    rm -f "$W/stick.img"; truncate -s "$STICK" "$W/stick.img"
    boot_stick bench "$W/stick.img" "mode=bench" ""
  fi
done
if [ $fail = 0 ]; then echo "builtin: all passed"; else echo "builtin: FAILED"; fi
exit $fail
