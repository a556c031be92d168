#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test the
# project. Idempotent; safe to run again.
set -euo pipefail
need_apt=()
command -v cc >/dev/null || need_apt+=(gcc)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# Xen's public headers: devmodel/tests/xen_abi.rs checks our ABI against them.
[ -f /usr/include/xen/sys/privcmd.h ] || need_apt+=(libxen-dev)
# Guest test beds (tests/guest, tests/xen): initramfs and image tools, and
# for the real-Xen bed Debian 12's own QEMU 7.2 as the outer emulator plus
# debootstrap for the dom0 root file system.
command -v cpio >/dev/null || need_apt+=(cpio)
command -v mke2fs >/dev/null || need_apt+=(e2fsprogs)
command -v depmod >/dev/null || need_apt+=(kmod)
command -v xz >/dev/null || need_apt+=(xz-utils)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v patchelf >/dev/null || need_apt+=(patchelf)
# The firmware matrix assembles its stick's MBR (tests/firmware/images.sh).
command -v as >/dev/null || need_apt+=(binutils)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
# The guest matrix reads the stick's USB capture back with Wireshark's
# dissectors (tests/guest/capture-check.py).
command -v tshark >/dev/null || need_apt+=(tshark)
# The Debian package and its test (scripts/package.sh, tests/package):
# cargo-deb's dependency detection, and the unit check.
command -v dpkg-shlibdeps >/dev/null || need_apt+=(dpkg-dev)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found: install Rust (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi
cargo fetch --locked -q 2>/dev/null || cargo fetch -q
# cargo-deb builds the Debian package (scripts/package.sh).
command -v cargo-deb >/dev/null || cargo install -q --locked cargo-deb
echo "setup: ok"
