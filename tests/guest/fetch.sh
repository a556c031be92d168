#!/usr/bin/env bash
# Fetches what the guest test bed needs, cached outside the clone and keyed
# by version: QEMU >= 10.1 (vfio-user client) from Debian trixie-backports
# with its whole library closure, Debian kernels (bookworm 6.1 and trixie),
# busybox. Only Debian packages are downloaded. Idempotent.
#
# Prints shell assignments for the caller to eval:
#   QEMU=... QEMU_VERSION=... KERNELS="6.1.0-NN-amd64 6.12.NN+deb13-amd64"
#   XEN_USB_CACHE=... BUSYBOX=...
# (kernel VER lives in $XEN_USB_CACHE/kernel-VER). Progress and the final
# "fetch: ok ..." line go to stderr.
set -euo pipefail
shopt -s inherit_errexit
CACHE=${XEN_USB_CACHE:-$HOME/.cache/xen-usb-dm}
mkdir -p "$CACHE"
log() { echo "fetch: $*" >&2; }
# One fetch at a time per cache (parallel boots each call this script).
exec 9>"$CACHE/.lock"
flock 9

# Host tools (Debian 12 packages).
need=()
command -v patchelf >/dev/null || need+=(patchelf)
command -v cpio >/dev/null || need+=(cpio)
command -v mke2fs >/dev/null || need+=(e2fsprogs)
command -v depmod >/dev/null || need+=(kmod)
command -v xz >/dev/null || need+=(xz-utils)
command -v zstd >/dev/null || need+=(zstd)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# A private APT configuration for trixie (+ backports): APTDIR, stamp, tapt.
. "$(dirname "${BASH_SOURCE[0]}")/trixie-apt.sh"

# Fast path: what the last run resolved, while neither the trixie lists nor
# the host's lists changed since and everything it names is still here.
# XEN_USB_REFRESH=1 resolves again.
RESOLVED=$CACHE/resolved.env
FETCH_KEY=$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)
if [ "${XEN_USB_REFRESH:-0}" != 1 ] && [ -f "$RESOLVED" ] && [ "$RESOLVED" -nt "$stamp" ] \
   && grep -qx "FETCH_KEY=$FETCH_KEY" "$RESOLVED" \
   && [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -newer "$RESOLVED" 2>/dev/null)" ] \
   && ( . "$RESOLVED"; [ -x "$QEMU" ] && [ -x "$BUSYBOX" ] \
        && for k in $KERNELS; do [ -f "$XEN_USB_CACHE/kernel-$k/boot/vmlinuz-$k" ] || exit 1; done ); then
  cat "$RESOLVED"
  ( . "$RESOLVED"; log "ok (cached) qemu=$QEMU ($QEMU_VERSION) kernels=$KERNELS in $XEN_USB_CACHE busybox=$BUSYBOX" )
  exit 0
fi

# --- QEMU ---------------------------------------------------------------
qver=$(tapt apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
bpo=$(tapt apt-cache madison qemu-system-x86 | awk -F'|' '/backports/ {gsub(/ /,"",$2); print $2; exit}')
[ -n "$bpo" ] && qver=$bpo
if ! dpkg --compare-versions "$qver" ge 1:10.1; then
  log "QEMU $qver has no vfio-user client (need >= 10.1 from trixie-backports)"; exit 1
fi
# Without Recommends: 90 packages, not 441 (GTK, SDL, speech...).
QDIR=$CACHE/qemu-${qver//[:~+]/_}-min
if [ ! -x "$QDIR/usr/bin/qemu-system-x86_64" ]; then
  log "downloading QEMU $qver and its closure"
  rm -rf "$QDIR.tmp"; mkdir -p "$QDIR.tmp"
  rm -f "$APTDIR"/cache/archives/*.deb
  tapt apt-get install -q -y --download-only --no-install-recommends \
      -t trixie-backports qemu-system-x86 qemu-system-data >/dev/null
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

# Host (bookworm) package lists: refreshed once if a look-up finds nothing
# or a download fails (fresh machine, or lists older than the archive).
host_updated=0
host_update() { [ $host_updated = 1 ] && return 0; log "apt-get update (bookworm)"; apt-get update -q >/dev/null; host_updated=1; }
host_resolve() { # $1 package -> the name of its linux-image-* dependency
  apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

# --- busybox (static, bookworm) for the initramfs ---------------------------
bbver=$(apt-cache policy busybox-static 2>/dev/null | awk '/Candidate:/ {print $2}')
if [ -z "$bbver" ] || [ "$bbver" = "(none)" ]; then
  host_update
  bbver=$(apt-cache policy busybox-static | awk '/Candidate:/ {print $2}')
fi
BBDIR=$CACHE/busybox-${bbver//[:~+]/_}
if [ ! -x "$BBDIR/bin/busybox" ]; then
  log "downloading busybox-static $bbver"
  rm -rf "$BBDIR.tmp"; mkdir -p "$BBDIR.tmp/x"
  ( cd "$BBDIR.tmp"
    apt-get download -q "busybox-static=$bbver" >/dev/null 2>&1 \
      || { host_update; apt-get download -q "busybox-static=$bbver" >/dev/null; }
    dpkg-deb -x ./*.deb x )
  bb=$(find "$BBDIR.tmp/x" -name busybox -type f -perm -u+x | head -1)
  [ -n "$bb" ] || { log "busybox-static: no busybox binary in the package"; exit 1; }
  mkdir -p "$BBDIR.tmp/bin"; cp "$bb" "$BBDIR.tmp/bin/busybox"; rm -rf "$BBDIR.tmp/x" "$BBDIR.tmp"/*.deb
  rm -rf "$BBDIR"; mv "$BBDIR.tmp" "$BBDIR"
fi

# --- Kernels --------------------------------------------------------------
kernel() { # $1 = apt wrapper (host|trixie)
  local pkg ver dir
  if [ "$1" = host ]; then
    pkg=$(host_resolve linux-image-amd64)
    [ -n "$pkg" ] || { host_update; pkg=$(host_resolve linux-image-amd64); }
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
      if [ "$1" = host ]; then apt-get download -q "$pkg" >/dev/null 2>&1 || { host_update; apt-get download -q "$pkg" >/dev/null; }
      else tapt apt-get download -q "$pkg" >/dev/null; fi
      for d in *.deb; do dpkg-deb -x "$d" "$dir.tmp"; done )
    rm -rf "$tmp"
    # merged-/usr kernels (trixie) keep modules under usr/lib
    [ -d "$dir.tmp/lib/modules" ] || ln -s usr/lib "$dir.tmp/lib"
    depmod -b "$dir.tmp" "$ver"
    rm -rf "$dir"; mv "$dir.tmp" "$dir"
  fi
  # The uncompressed ELF vmlinux boots directly (PVH entry, CONFIG_PVH=y):
  # skips the ~6 s the bzImage spends decompressing itself under TCG.
  if [ ! -f "$dir/boot/vmlinux-$ver" ]; then
    if python3 - "$dir/boot/vmlinuz-$ver" "$dir/boot/vmlinux-$ver.tmp" <<'PY'
import gzip, io, lzma, struct, subprocess, sys
b = open(sys.argv[1], "rb").read()
pm = ((b[0x1f1] or 4) + 1) * 512               # protected-mode code start
off, ln = struct.unpack_from("<II", b, 0x248)   # payload_offset, payload_length
p = b[pm + off:pm + off + ln]
if p[:6] == b"\xfd7zXZ\x00":
    out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(p)
elif p[:4] == b"\x28\xb5\x2f\xfd":                # zstd; last 4 bytes = size
    out = subprocess.run(["zstd", "-dcq"], input=p[:-4], capture_output=True, check=True).stdout
elif p[:2] == b"\x1f\x8b":
    out = gzip.GzipFile(fileobj=io.BytesIO(p)).read()
else:
    sys.exit("unknown kernel compression %s" % p[:6].hex())
if out[:4] != b"\x7fELF":
    sys.exit("payload is not an ELF")
open(sys.argv[2], "wb").write(out)
PY
    then mv "$dir/boot/vmlinux-$ver.tmp" "$dir/boot/vmlinux-$ver"
    else rm -f "$dir/boot/vmlinux-$ver.tmp"; log "$ver: no vmlinux extracted; boots will use the bzImage"
    fi
  fi
  echo "$ver"
}
K1=$(kernel host)
K2=$(kernel trixie)

{
  echo "QEMU=$QDIR/usr/bin/qemu-system-x86_64"
  echo "QEMU_VERSION=$qver"
  echo "KERNELS=\"$K1 $K2\""
  echo "XEN_USB_CACHE=$CACHE"
  echo "BUSYBOX=$BBDIR/bin/busybox"
  echo "FETCH_KEY=$FETCH_KEY"
} > "$RESOLVED.tmp"
mv "$RESOLVED.tmp" "$RESOLVED"
cat "$RESOLVED"
log "ok qemu=$QDIR/usr/bin/qemu-system-x86_64 ($qver) kernels=$CACHE/kernel-$K1,$CACHE/kernel-$K2 busybox=$BBDIR/bin/busybox ($bbver)"
