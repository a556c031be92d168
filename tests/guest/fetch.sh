#!/usr/bin/env bash
# Fetches what the guest test bed needs, cached outside the clone and keyed
# by version: QEMU >= 10.1 (vfio-user client) from Debian trixie-backports
# with its whole library closure, Debian kernels (bookworm 6.1 and trixie),
# busybox. Only Debian packages are downloaded. Idempotent.
#
# Prints shell assignments for the caller to eval:
#   QEMU=... KERNELS="6.1.0-NN-amd64 6.12.NN-amd64" KDIR_<ver>=... BUSYBOX=...
set -euo pipefail
shopt -s inherit_errexit
CACHE=${XEN_USB_CACHE:-$HOME/.cache/xen-usb-dm}
mkdir -p "$CACHE"
log() { echo "fetch: $*" >&2; }

# Host tools (Debian 12 packages).
need=()
command -v patchelf >/dev/null || need+=(patchelf)
command -v cpio >/dev/null || need+=(cpio)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v depmod >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# A private APT configuration for trixie + trixie-backports that leaves the
# host's /etc/apt untouched.
APTDIR=$CACHE/apt-trixie
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/etc"
cat > "$APTDIR/etc/sources.list" <<SRC
deb http://deb.debian.org/debian trixie main
deb http://deb.debian.org/debian trixie-backports main
SRC
: > "$APTDIR/status"
cat > "$APTDIR/apt.conf" <<CONF
Dir::Etc::SourceList "$APTDIR/etc/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::State::Lists "$APTDIR/lists";
Dir::State::status "$APTDIR/status";
Dir::Cache "$APTDIR/cache";
Dir::Cache::archives "$APTDIR/cache/archives";
APT::Get::AllowUnauthenticated "false";
Acquire::Languages "none";
APT::Sandbox::User "root";
CONF
tapt() { APT_CONFIG=$APTDIR/apt.conf "$@"; }
stamp=$APTDIR/lists/.updated
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
  log "updating trixie package lists"
  tapt apt-get update -q >/dev/null
  touch "$stamp"
fi

# --- QEMU ---------------------------------------------------------------
qver=$(tapt apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
bpo=$(tapt apt-cache madison qemu-system-x86 | awk -F'|' '/backports/ {gsub(/ /,"",$2); print $2; exit}')
[ -n "$bpo" ] && qver=$bpo
QDIR=$CACHE/qemu-${qver//[:~+]/_}
if [ ! -x "$QDIR/usr/bin/qemu-system-x86_64" ]; then
  log "downloading QEMU $qver and its closure"
  rm -rf "$QDIR.tmp"; mkdir -p "$QDIR.tmp"
  tapt apt-get install -q -y --download-only -t trixie-backports \
      qemu-system-x86 qemu-system-data >/dev/null
  for d in "$APTDIR"/cache/archives/*.deb; do dpkg-deb -x "$d" "$QDIR.tmp"; done
  ln -sfn ../.. "$QDIR.tmp/usr/bin/qemu-bundle"
  L=$QDIR/usr/lib/x86_64-linux-gnu
  patchelf --set-interpreter "$L/ld-linux-x86-64.so.2" \
      --force-rpath --set-rpath "$L:$QDIR/lib/x86_64-linux-gnu" \
      "$QDIR.tmp/usr/bin/qemu-system-x86_64"
  rm -rf "$QDIR"; mv "$QDIR.tmp" "$QDIR"
  rm -f "$APTDIR"/cache/archives/*.deb
fi
"$QDIR/usr/bin/qemu-system-x86_64" --version | head -1 >&2

# --- Kernels --------------------------------------------------------------
kernel() { # $1 = apt wrapper (host|trixie)
  local pkg ver dir
  if [ "$1" = host ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  else
    pkg=$(tapt apt-cache depends -t trixie linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64 ($1)"; exit 1; }
  pkg=${pkg%-unsigned}
  ver=${pkg#linux-image-}
  dir=$CACHE/kernel-$ver
  if [ ! -f "$dir/boot/vmlinuz-$ver" ]; then
    log "downloading $pkg"
    rm -rf "$dir.tmp"; mkdir -p "$dir.tmp"
    local tmp; tmp=$(mktemp -d)
    ( cd "$tmp"
      if [ "$1" = host ]; then apt-get download -q "$pkg" >/dev/null 2>&1 || { apt-get update -q >/dev/null; apt-get download -q "$pkg" >/dev/null; }
      else tapt apt-get download -q "$pkg" >/dev/null; fi
      for d in *.deb; do dpkg-deb -x "$d" "$dir.tmp"; done )
    rm -rf "$tmp"
    # merged-/usr kernels (trixie) keep modules under usr/lib
    [ -d "$dir.tmp/lib/modules" ] || ln -s usr/lib "$dir.tmp/lib"
    depmod -b "$dir.tmp" "$ver"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"
  fi
  echo "$ver"
}
K1=$(kernel host)
K2=$(kernel trixie)

echo "QEMU=$QDIR/usr/bin/qemu-system-x86_64"
echo "QEMU_VERSION=$qver"
echo "KERNELS=\"$K1 $K2\""
echo "XEN_USB_CACHE=$CACHE"
log "ok"
