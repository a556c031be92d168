#!/usr/bin/env bash
# The Debian package as an admin installs it: builds it (scripts/package.sh:
# cargo-deb, man pages and completions from the binary), installs it into a
# fresh Debian 12 chroot (debootstrap minbase with systemd, cached as a
# tarball keyed by suite), and runs what the package ships from there: --version, check on
# a configuration (good: exit 0; bad: exit 2 naming the key), list (with
# the host's sysfs bound in), the man pages, the completions; the systemd
# template unit passes `systemd-analyze verify` against the chroot.
# Prints "package: N passed, M failed"; exits non-zero on any failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/xen-usb-dm
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
passed=0 failed=0
res() { # NAME PASS|FAIL DETAIL
  echo "  RESULT package/$1 $2 ${3:-}"
  if [ "$2" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

deb=$(bash "$ROOT/scripts/package.sh" | tail -1)
[ -f "$deb" ] && res build PASS "$(basename "$deb") $(du -k "$deb" | cut -f1) KiB" || { res build FAIL "no .deb"; exit 1; }
dpkg-deb -c "$deb" > /tmp/pkg-contents.$$
for f in ./usr/sbin/xen-usb-dm ./lib/systemd/system/xen-usb-dm@.service ./etc/xen-usb-dm/README \
         ./usr/share/doc/xen-usb-dm/examples/xen-dm.toml ./usr/share/doc/xen-usb-dm/examples/xen-usb-dm-wrapper \
         ./usr/share/man/man8/xen-usb-dm.8.gz ./usr/share/man/man8/xen-usb-dm-list.8.gz \
         ./usr/share/bash-completion/completions/xen-usb-dm ./usr/share/zsh/vendor-completions/_xen-usb-dm \
         ./usr/share/fish/vendor_completions.d/xen-usb-dm.fish; do
  grep -q " $f\$" /tmp/pkg-contents.$$ || missing="${missing:-} $f"
done
rm -f /tmp/pkg-contents.$$
[ -z "${missing:-}" ] && res contents PASS "binary, unit, /etc, examples, man pages, completions" || res contents FAIL "missing:$missing"

# A fresh Debian 12 root (minbase, plus systemd: the unit is verified
# against the root it is installed in), cached.
tarball=$CACHE/chroot-$SUITE-minbase-systemd.tar
if [ ! -f "$tarball" ]; then
  mkdir -p "$CACHE"
  tmp=$(mktemp -d)
  debootstrap --variant=minbase --include=systemd "$SUITE" "$tmp/root" "$MIRROR" > "$CACHE/debootstrap-$SUITE.log" 2>&1 \
    || { tail -5 "$CACHE/debootstrap-$SUITE.log" >&2; exit 1; }
  tar -C "$tmp/root" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
  rm -rf "$tmp"
fi
C=$(mktemp -d)
cleanup() { umount "$C/sys" 2>/dev/null || true; umount "$C/proc" 2>/dev/null || true; rm -rf "$C"; }
trap cleanup EXIT
tar -C "$C" -xf "$tarball"
cp "$deb" "$C/tmp/pkg.deb"
if chroot "$C" dpkg -i /tmp/pkg.deb > "$C/tmp/dpkg.log" 2>&1; then res install PASS "dpkg -i into a fresh $SUITE minbase"
else res install FAIL "$(tail -2 "$C/tmp/dpkg.log" | tr '\n' ' ')"; fi
mount -t proc proc "$C/proc"
mount --bind -o ro /sys "$C/sys" 2>/dev/null || mount -t sysfs sysfs "$C/sys"

v=$(chroot "$C" /usr/sbin/xen-usb-dm --version 2>&1) && [[ $v == "xen-usb-dm "* ]] && res version PASS "$v" || res version FAIL "$v"

# check: a good configuration, then one with two problems.
mkdir -p "$C/etc/xen-usb-dm" "$C/var/lib/xen-usb-dm"
truncate -s 16M "$C/var/lib/xen-usb-dm/g1.img"
cat > "$C/etc/xen-usb-dm/g1.toml" <<CFG
[controller]
model = "ehci"
[transport]
kind = "vfio-user"
socket = "/run/xen-usb-dm/g1.sock"
[[device]]
kind = "storage"
image = "/var/lib/xen-usb-dm/g1.img"
CFG
mkdir -p "$C/run/xen-usb-dm"
out=$(chroot "$C" xen-usb-dm check --config /etc/xen-usb-dm/g1.toml 2>&1) && rc=0 || rc=$?
[ $rc = 0 ] && [ "$out" = "/etc/xen-usb-dm/g1.toml: ok" ] && res check_ok PASS "$out" || res check_ok FAIL "exit $rc: $out"
cat >> "$C/etc/xen-usb-dm/g1.toml" <<CFG
uas = true
speed = "full"
[[device]]
kind = "host"
vendor = 0xdead
product = 0xbeef
CFG
out=$(chroot "$C" xen-usb-dm check --config /etc/xen-usb-dm/g1.toml 2>&1) && rc=0 || rc=$?
if [ $rc = 2 ] && [ "$(echo "$out" | wc -l)" = 2 ] && echo "$out" | grep -q "device\[0\].uas" && echo "$out" | grep -q "device\[1\]: host dead:beef"; then
  res check_problems PASS "exit 2, one line per key: $(echo "$out" | cut -d: -f2 | tr '\n' ',')"
else res check_problems FAIL "exit $rc: $out"; fi

out=$(chroot "$C" xen-usb-dm list 2>&1) && rc=0 || rc=$?
[ $rc = 0 ] && res list PASS "$(echo "$out" | head -1)" || res list FAIL "exit $rc: $out"
out=$(chroot "$C" xen-usb-dm list --json 2>&1) && python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert isinstance(d["devices"], list) and isinstance(d["rules"], list)' "$out" \
  && res list_json PASS "$(python3 -c 'import json,sys; print(len(json.loads(sys.argv[1])["devices"]), "devices")' "$out")" || res list_json FAIL "$out"

# Man pages (groff source in the package) and the bash completion.
man=$(zcat "$C/usr/share/man/man8/xen-usb-dm-check.8.gz")
[[ $man == *".TH xen-usb-dm-check 8"* ]] && [[ $man == *"xen\\-usb\\-dm check \\-\\-config"* ]] && res man PASS "xen-usb-dm-check(8) with its examples" || res man FAIL "$(echo "$man" | head -3)"
comp=$(chroot "$C" bash -c 'source /usr/share/bash-completion/completions/xen-usb-dm
  f=$(complete -p xen-usb-dm | sed "s/.* -F \([^ ]*\) .*/\1/")
  COMP_WORDS=(xen-usb-dm ""); COMP_CWORD=1; COMP_LINE="xen-usb-dm "; COMP_POINT=${#COMP_LINE}
  $f xen-usb-dm "" xen-usb-dm; echo "${COMPREPLY[*]}"' 2>&1)
[[ " $comp " == *" list "* && " $comp " == *" check "* && " $comp " == *" ctl "* ]] && res completion PASS "bash: $comp" || res completion FAIL "bash: $comp"

# The unit, verified against the installed tree (ExecStart, man page).
if command -v systemd-analyze > /dev/null; then
  out=$(systemd-analyze verify --man=no --root="$C" "$C/lib/systemd/system/xen-usb-dm@.service" 2>&1) && rc=0 || rc=$?
  [ $rc = 0 ] && [ -z "$out" ] && res unit_verify PASS "systemd-analyze verify: clean" || res unit_verify FAIL "exit $rc: $out"
else
  res unit_verify FAIL "no systemd-analyze on this machine"
fi
echo "package: $passed passed, $failed failed"
[ $failed = 0 ]
