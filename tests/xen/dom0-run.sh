#!/bin/bash
# Runs in dom0 (started by /sbin/xtb-init), from the 9p share that
# tests/xen/run.sh prepared:
#   /mnt/share/xen-usb-dm           the device model (absent when DM=none)
#   /mnt/share/{vmlinuz,guest-initrd.gz}
#   /mnt/share/run/params.env       DM PCI GUEST_TIMEOUT DM_READY_WAIT DM_EXIT_WAIT
#                                   STICK_ON_SHARE
#   /mnt/share/run/guest.cfg        xl configuration of the HVM guest
#   /mnt/share/run/stick.img        the USB stick's image
# Creates the guest paused, starts xen-usb-dm for its domid, unpauses it,
# waits for it to power off, checks what the guest wrote against the image,
# and leaves RESULT/TIMING lines in run/results.txt, the guest's serial log
# in run/guest-serial.log and xen-usb-dm's log in run/dm.log; run/done last.
set -euo pipefail
R=/mnt/share/run
. "$R/params.env"
# The guest's kernel console is hvc0 (PV console through xenconsoled, fast);
# its emulated UART (ttyS0 through qemu-xen, ~0.4 KB/s) is logged too.
CONSOLE=/var/log/xen/console/guest-xtb-guest.log
SERIAL=/var/log/xen/xtb-guest-serial.log
up() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(up)" 'BEGIN {printf "%.1f", b - a}'; }
result() { echo "RESULT $*" | tee -a "$R/results.txt"; }
timing() { echo "TIMING $1 $2" | tee -a "$R/results.txt"; }
finish() {
  cp "$CONSOLE" "$R/guest-console.log" 2>/dev/null || true
  cp "$SERIAL" "$R/guest-serial.log" 2>/dev/null || true
  xl dmesg > "$R/xen-dmesg.log" 2>&1 || true
  touch "$R/done"
}
trap finish EXIT
dm_alive() { [ -n "$dm_pid" ] && kill -0 "$dm_pid" 2>/dev/null; }
dm_pid=""

if ! xl create -p "$R/guest.cfg" > "$R/xl-create.log" 2>&1; then
  result xl_create FAIL "$(tail -1 "$R/xl-create.log")"
  exit 0
fi
domid=$(xl domid xtb-guest)
result xl_create PASS "domid $domid"

# The stick's image stays on the 9p share (default): 9p's zero-copy path
# cannot pin privcmd-mapped guest pages, so this also exercises
# xen-usb-dm's fallback to a bounce buffer. STICK_ON_SHARE=0 serves it from
# dom0's tmpfs instead (copied back to the share at the end).
if [ "$STICK_ON_SHARE" = 1 ]; then STICK=$R/stick.img
else STICK=/tmp/stick.img; cp "$R/stick.img" "$STICK"; fi

if [ "$DM" != none ]; then
  # Deprivileged as a real deployment would run it: once set up, its Xen
  # descriptors are restricted to the guest, it runs as nobody, chrooted
  # in an empty directory.
  mkdir -p /run/xen-usb-dm-empty
  cat > "$R/xen-dm.toml" <<CFG
[controller]
model = "xhci"
[transport]
kind = "xen"
domid = $domid
pci = "$PCI"
restrict = true
uid = 65534
gid = 65534
chroot = "/run/xen-usb-dm-empty"
[[device]]
kind = "storage"
image = "$STICK"
speed = "high"
CFG
  XEN_USB_DM_LOG=info NO_COLOR=1 "$DM" --config "$R/xen-dm.toml" 2> "$R/dm.log" &
  dm_pid=$!
  t=$(up)
  while dm_alive && ! grep -qi ready "$R/dm.log" \
        && awk -v s="$(since "$t")" -v w="$DM_READY_WAIT" 'BEGIN {exit !(s < w)}'; do
    sleep 0.2
  done
  if ! dm_alive; then
    wait "$dm_pid" && rc=0 || rc=$?
    result dm_start FAIL "exited with $rc: $(tail -1 "$R/dm.log")"
    xl destroy "$domid" || true
    exit 0
  fi
  if grep -qi ready "$R/dm.log"; then
    result dm_start PASS "ready after $(since "$t") s"
  else
    result dm_start PASS "no 'ready' line after $DM_READY_WAIT s, going on"
  fi
fi

t_unpause=$(up)
xl unpause "$domid"
started=""
# (xenstore, not `xl list`: xl aborts on a dying domain)
while xenstore-exists "/local/domain/$domid"; do
  if [ -z "$started" ] && grep -q '^GUEST-START' "$CONSOLE" 2>/dev/null; then
    started=1
    timing guest_start_s "$(since "$t_unpause")"
  fi
  if awk -v s="$(since "$t_unpause")" -v w="$GUEST_TIMEOUT" 'BEGIN {exit !(s > w)}'; then
    result guest_poweroff FAIL "still running after $GUEST_TIMEOUT s, destroyed"
    xl destroy "$domid" || true
    break
  fi
  sleep 0.5
done
timing guest_run_s "$(since "$t_unpause")"
grep -q '^GUEST-DONE' "$CONSOLE" 2>/dev/null && result guest_done PASS "" \
  || result guest_done FAIL "no GUEST-DONE on the guest's console"

if [ -n "$dm_pid" ]; then
  t=$(up)
  while dm_alive && awk -v s="$(since "$t")" -v w="$DM_EXIT_WAIT" 'BEGIN {exit !(s < w)}'; do
    sleep 0.2
  done
  if dm_alive; then
    xl list > "$R/xl-list-dm-stuck.log" 2>&1 || true   # a dying domain still listed?
    kill "$dm_pid"; sleep 1; kill -9 "$dm_pid" 2>/dev/null || true
    result dm_exit FAIL "still running $DM_EXIT_WAIT s after the domain died, killed"
  else
    wait "$dm_pid" && rc=0 || rc=$?
    timing dm_exit_s "$(since "$t")"
    [ "$rc" = 0 ] && result dm_exit PASS "exited by itself" || result dm_exit FAIL "exited with $rc"
  fi
  line=$(grep -o 'deprivileged.*' "$R/dm.log" | head -1)
  [ -n "$line" ] && result dm_deprivileged PASS "$line" \
    || result dm_deprivileged FAIL "no 'deprivileged' line in its log"
fi

[ "$STICK" = "$R/stick.img" ] || cp "$STICK" "$R/stick.img"
# dom0's view of the image: does it hold what the guest says it wrote?
if read -r _ off len sum < <(tr -d '\r' < "$CONSOLE" | grep '^HOSTCHECK'); then
  got=$(dd if="$STICK" bs=64k skip=$((off / 65536)) count=$((len / 65536)) 2>/dev/null \
        | sha256sum | cut -d' ' -f1)
  [ "$got" = "$sum" ] && result dom0_image PASS "$got" || result dom0_image FAIL "image $got guest $sum"
fi
