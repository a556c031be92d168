#!/usr/bin/env bash
# Runs every check and test of the project: format, lints, docs, unit and
# integration tests (the in-process guest drivers), the guest matrix and
# the passthrough VM tests and the real-Xen test.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI shows the end of the output: a failed run ends with what failed
# (every failed check, wherever it scrolled by), the whole output kept.
LOG=$(mktemp "${TMPDIR:-/tmp}/xen-usb-dm-test.XXXXXX")
exec > >(tee "$LOG") 2>&1
what_failed() {
  local rc=$?
  [ "$rc" = 0 ] && return
  sleep 1
  echo "== what failed (exit $rc; the whole output: $LOG)"
  grep -aE 'RESULT .* FAIL|: FAIL|FAILED|^error|panicked at|INFO (first run|retried)' "$LOG" | tail -60 || true
}
trap what_failed EXIT
bash scripts/setup.sh
# The Xen ABI test against libxen-dev's headers must run here, never be
# skipped (devmodel/build.rs: a plain `cargo test` only warns).
export XEN_USB_DM_REQUIRE_XEN_HEADERS=1
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps -q
echo "== cargo test"
cargo test --workspace
echo "== fuzz smoke"
bash scripts/fuzz-smoke.sh
echo "== guest matrix (stock Debian kernels drive our xHCI over vfio-user)"
tests/guest/run-matrix.sh
echo "== firmware matrix (SeaBIOS, OVMF, GRUB, U-Boot boot from our xHCI, EHCI and UHCI)"; tests/firmware/run.sh
echo "== Debian package (cargo-deb) installed into a fresh Debian 12 chroot"
tests/package/run.sh
echo "== passthrough (QEMU's USB devices, real to a VM's usbfs, through our xHCI)"
eval "$(tests/guest/fetch.sh 2>/dev/null)"
for k in $KERNELS; do PT_KERNEL=$k tests/passthrough/run.sh check; done
echo "== real Xen (Xen 4.20 with a trixie dom0 and Xen 4.17 with a bookworm dom0, in QEMU 7.2; HVM guests drive our xHCI as a secondary ioreq server)"
cargo build --release -q -p devmodel
tests/xen/run.sh target/release/xen-usb-dm
