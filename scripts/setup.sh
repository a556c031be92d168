#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test the
# project. Idempotent; safe to run again.
set -euo pipefail
need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# Xen's public headers: devmodel/tests/xen_abi.rs checks our ABI against them.
[ -f /usr/include/xen/sys/privcmd.h ] || need_apt+=(libxen-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fetch --locked -q 2>/dev/null || cargo fetch -q
echo "setup: ok"
