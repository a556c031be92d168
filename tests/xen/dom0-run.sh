#!/bin/bash
# Runs in dom0 (started by /sbin/xtb-init), from the 9p share that
# tests/xen/run.sh prepared:
#   /mnt/share/xen-usb-dm           the device model (absent when DM=none)
#   /mnt/share/{vmlinuz,guest-initrd.gz}
#   /mnt/share/run/params.env       DM PCI GUEST_TIMEOUT DM_READY_WAIT DM_EXIT_WAIT
#                                   STICK_ON_SHARE QEMU_XEN GUEST_ATTEMPTS
#                                   DM_LOG MODES
#   /mnt/share/run/MODE/guest.cfg   xl configuration of that mode's HVM guest
#                                   (named xtb-MODE)
#   /mnt/share/run/MODE/stick.img   the USB stick's image
#   /mnt/share/hot.img              beside's hot-added stick (read-only)
# Runs one guest per mode in MODES, one after the other:
#   beside  creates the guest paused (`xl create -p`), starts xen-usb-dm for
#           its domid next to it (with our tablet and a control socket),
#           unpauses it; while the guest runs, injects a pointer event and
#           hot-adds and removes /mnt/share/hot.img through the socket
#           (`xen-usb-dm ctl`) when the guest asks (hid_step);
#   intx    the same (its guest.cfg boots the guest with pci=nomsi);
#   wrap    the guest's cfg names run/wrap/dm-wrap as device_model_override;
#           that script runs `xen-usb-dm --wrap QEMU_XEN -- "$@"`, so libxl
#           itself starts (and stops) xen-usb-dm with the guest (plain
#           `xl create`); its log is libxl's device-model log.
#   restrict  as wrap, the guest's cfg has dm_restrict=1 and xen-usb-dm's
#           configuration no uid/chroot of its own (it takes on QEMU's);
#           checks what libxl passed (dm-args.txt) and the service
#           process's uid, root and RLIMIT_FSIZE.
#   xl      as wrap, xen-usb-dm's configuration has no controller and no
#           device; the guest's cfg gets usbdev = the outer QEMU's stick
#           (dom0's host USB device 46f4:0001 XTBSTICK); while the guest
#           runs, dom0 checks `xl usb-list`, runs `xl usbdev-detach` when
#           the guest says XL-WAIT-DETACH and `xl usbdev-attach` when it
#           says XL-WAIT-ATTACH.
#   xlref   the xl mode with libxl's own QEMU (no override, no xen-usb-dm).
# Each waits for the guest to power off, checks what the guest wrote
# against the image, and leaves RESULT/TIMING lines in run/MODE/results.txt,
# the guest's logs in run/MODE/guest-{console,serial}.log and xen-usb-dm's
# log in run/MODE/dm.log; run/MODE/done when that mode is finished, and
# run/done last.
# A guest that stops making progress (no CPU time, console or device-model
# log for STALL_WINDOW s) is destroyed, and so is one whose kernel panicked
# before its /init, and one with a failed check (the last guest's results
# stand); that mode then runs again with a fresh guest and stick
# (the attempt kept as run/MODE.tryN, a line in run/MODE/guest-retries.txt),
# GUEST_ATTEMPTS guests in all; when the last one stalls too, the mode is
# left without run/MODE/done and run.sh tries it in a new boot. While it waits for a guest it rewrites
# run/heartbeat every ~5 s, so run.sh can tell a stuck guest (dom0 alive)
# from a frozen boot, and a stuck wait (the share stands still) too.
set -euo pipefail
shopt -s extglob
TOP=/mnt/share/run
. "$TOP/params.env"
# Time without forking: dom0's processes have been seen to segfault now
# and then in this nested set-up (awk, xenstore-exists, a bash subshell;
# 2026-12-02, both versions), so the decisions below use bash builtins
# only, and a helper that crashes must not read as "timed out" or "gone".
# tick: NOW = dom0's uptime in centiseconds. since T: seconds from T, for
# display. older T S: whether S seconds passed since T.
tick() { local u; read -r u _ < /proc/uptime; NOW=$(( ${u%.*} * 100 + 10#${u#*.} )); }
up() { local u; read -r u _ < /proc/uptime; echo "$u"; }
since() { tick; local d=$((NOW - $1)); printf '%d.%d' $((d / 100)) $(((d % 100) / 10)); }
older() { tick; [ $((NOW - $1)) -ge $(($2 * 100)) ]; }
STALL_WINDOW=45
# Every helper the waits below run is bounded by `timeout`: in one run
# (4.20, wrap) the wait for the guest stopped for good right after it
# began (a helper that never returned, perhaps `xl list`), which only the
# series' timeout would have ended.
# dom_exists DOMID: whether the domain is still there. From xenstore, not
# `xl list` (xl aborts on a dying domain); xenstore-exists (4.17's and
# 4.20's) has been seen to segfault as the domain went away, so a crash is
# asked again, and then xl.
dom_exists() {
  local rc i
  for i in 1 2 3; do
    rc=0; timeout -k 2 10 xenstore-exists "/local/domain/$1" 2>/dev/null || rc=$?
    [ "$rc" -gt 1 ] || return "$rc"
    echo "xenstore-exists /local/domain/$1: exit $rc (try $i)" >&2
    sleep 0.2
  done
  timeout -k 2 10 xl list 2>/dev/null | awk -v d="$1" '$2 == d {f = 1} END {exit !f}'
}
# guest_cpu DOMID: the guest's CPU seconds so far ("" if xl cannot say).
guest_cpu() { timeout -k 2 10 xl list "$1" 2>/dev/null | awk 'NR == 2 {print $6}'; }

# dm_restrict=1 needs a user for QEMU: with xen-qemuuser-range-base, libxl
# runs the domain's QEMU as uid BASE + domid and kills that uid's
# processes on destroy (xen-usb-dm's service process, which takes on
# QEMU's user, included). The image leaves it out; dom0's root is a
# throw-away overlay, so it is added at every boot.
if ! grep -q '^xen-qemuuser-range-base:' /etc/passwd; then
  echo 'xen-qemuuser-range-base:x:131072:131072::/nonexistent:/usr/sbin/nologin' >> /etc/passwd
  echo 'xen-qemuuser-range-base:x:131072:' >> /etc/group
fi
# DIAG (XTB_DIAG, any value): dom0's kernel log as it happens, on the
# share (a boot that hangs keeps it), and dom0 alive, independent of the
# wait loop's heartbeat (outside run/, so run.sh's hang detection does not
# see it), with its processes' states. Not by default: with these two
# writing to the share beside the wait loop, 4.20's default modes hung in
# 3 boots of 3 (the wait loop and these stopped; 2026-12-02).
dmesg_pid="" alive_pid=""
if [ -n "${DIAG:-}" ]; then
  dmesg -w > "$TOP/dom0-dmesg-live.log" 2>&1 &
  dmesg_pid=$!
  ( while sleep 5; do
      { echo "$(up) $(tail -1 "$TOP/dom0-run.log" 2>/dev/null)"
        timeout -k 2 10 ps -eo pid,ppid,stat,wchan:24,etime,args 2>&1 | grep -vE ' \[[^]]*\]$'
      } > /mnt/share/dom0-alive.tmp; mv /mnt/share/dom0-alive.tmp /mnt/share/dom0-alive
    done ) &
  alive_pid=$!
fi
# Host USB: the outer QEMU's xHCI with a USB stick (46f4:0001, serial
# XTBSTICK). No udev in dom0: load the controller's driver by hand; not
# usb-storage, so that no dom0 driver holds the stick that the xl modes
# pass through (usbcore gives /dev/bus/usb through devtmpfs).
# find_ostick: sets OSTICK_BUS/OSTICK_ADDR (empty if not there) and
# OSTICK_DESC; the address changes when the device is re-enumerated (QEMU's
# usb-host resets it when it lets it go).
find_ostick() {
  local u dev
  OSTICK_BUS="" OSTICK_ADDR="" OSTICK_DESC=""
  for u in /sys/bus/usb/devices/*; do
    [ "$(cat "$u/idVendor" 2>/dev/null)" = 46f4 ] || continue
    [ "$(cat "$u/serial" 2>/dev/null)" = XTBSTICK ] || continue
    OSTICK_BUS=$(cat "$u/busnum") OSTICK_ADDR=$(cat "$u/devnum")
    dev=/dev/bus/usb/$(printf %03d/%03d "$OSTICK_BUS" "$OSTICK_ADDR")
    OSTICK_DESC="$(cat "$u/idVendor"):$(cat "$u/idProduct") XTBSTICK at ${u##*/}, bus $OSTICK_BUS addr $OSTICK_ADDR, speed $(cat "$u/speed"), $dev $([ -c "$dev" ] && echo present || echo missing)"
    return 0
  done
  return 1
}
t=$(up)
case ${OUTER_USB:-none} in
  none) ;;
  xhci) modprobe xhci_pci ;;
  xhci-intx) modprobe xhci_hcd quirks=0x40 && modprobe xhci_pci ;;
  ehci) modprobe ehci_pci ;;
esac 2>&1 || echo "dom0 usb: loading the driver for the outer $OUTER_USB failed"
[ "${OUTER_USB:-none}" = none ] || for _ in $(seq 100); do find_ostick && break; sleep 0.2; done
if [ "${OUTER_USB:-none}" = none ]; then :
elif [ -n "$OSTICK_BUS" ]; then echo "dom0 usb: $OSTICK_DESC; found $(up) s (modprobe at $t s)"
else echo "dom0 usb: no 46f4 device in /sys/bus/usb/devices ($(ls /sys/bus/usb/devices 2>&1 | tr '\n' ' '))"; fi

# run_mode MODE: one guest; runs in a subshell (its `exit` ends the mode).
run_mode() {
  local mode=$1
  R=$TOP/$mode NAME=xtb-$mode
  # The guest's kernel console is hvc0 (PV console through xenconsoled,
  # fast); its emulated UART (ttyS0 through qemu-xen, ~0.4 KB/s) is logged
  # too. libxl logs the device model's stdout/stderr to QEMU_LOG.
  CONSOLE=/var/log/xen/console/guest-$NAME.log
  SERIAL=/var/log/xen/$NAME-serial.log
  QEMU_LOG=/var/log/xen/qemu-dm-$NAME.log
  result() { echo "RESULT $*" | tee -a "$R/results.txt"; }
  timing() { echo "TIMING $1 $2" | tee -a "$R/results.txt"; }
  finish() {
    cp "$CONSOLE" "$R/guest-console.log" 2>/dev/null || true
    cp "$SERIAL" "$R/guest-serial.log" 2>/dev/null || true
    cp "$QEMU_LOG" "$R/qemu-dm.log" 2>/dev/null || true
    cp "/var/log/xen/qemu-probe-$NAME.log" "$R/qemu-probe.log" 2>/dev/null || true
    xl dmesg > "$R/xen-dmesg.log" 2>&1 || true
    # (the copies of libxl's logs must not be read again by the next guest
    # of this mode, nor its console)
    rm -f "$CONSOLE" "$SERIAL" "$QEMU_LOG" "/var/log/xen/qemu-probe-$NAME.log"
    touch "$R/done"
  }
  trap finish EXIT
  dm_alive() { [ -n "$dm_pid" ] && kill -0 "$dm_pid" 2>/dev/null; }
  dm_pid=""
  # xen-usb-dm processes (the wrapper's service process in wrap mode);
  # zombies are not running anything and are left out.
  # (pgrep: 1 is "none"; anything else is an error, reported as a process)
  dm_procs() {
    local rc i
    for i in 1 2 3; do
      # ([x]: the pattern must not match timeout's own command line)
      rc=0; timeout -k 2 10 pgrep -f -r R,S,D,T,t,I '[x]en-usb-dm' || rc=$?
      [ "$rc" -gt 1 ] || return 0
    done
    echo "pgrep-failed-$rc"
  }
  echo "=== mode $mode ($NAME), dom0 uptime $(up) s"

  # The stick's image on the 9p share (STICK_ON_SHARE: 1 for every mode,
  # 0 for none, else the modes named; default beside): 9p's zero-copy path
  # cannot pin privcmd-mapped guest pages, so this exercises xen-usb-dm's
  # fallback to a bounce buffer. The other modes serve it from dom0's
  # tmpfs (copied back to the share at the end): heavy 9p traffic beside
  # the wait loop's own writes to the share is when the loop was seen to
  # stop for good (README).
  case " $STICK_ON_SHARE " in
    " 1 "|*" $mode "*) STICK=$R/stick.img ;;
    *) STICK=/tmp/stick-$mode.img; cp "$R/stick.img" "$STICK" ;;
  esac

  # write_toml [DOMID]: xen-usb-dm's configuration. Deprivileged as a real
  # deployment would run it: once set up, its Xen descriptors are
  # restricted to the guest, it runs as nobody, chrooted in an empty
  # directory. The domain is DOMID (beside) or libxl's -xen-domid (wrap).
  # restrict: no restrict/uid/gid/chroot of its own: under dm_restrict it
  # takes on QEMU's (-xen-domid-restrict, -run-with user=,chroot=).
  # xl: no controller, no device, no PCI slot: libxl's usbctrl/usbdev
  # (QMP device_add) make them (XL_DEPRIV=0: not deprivileged either, for
  # a device model that must open /dev/bus/usb after set-up).
  # beside: also our tablet and the control socket CTL (hid_step); its
  # chroot is CHROOT, which holds the image it hot-adds.
  write_toml() {
    mkdir -p "$CHROOT"
    { if [ "$mode" != xl ]; then
        echo '[controller]'
        case $mode in ehci|uhci) echo "model = \"$mode\"" ;; *) echo 'model = "xhci"' ;; esac
      fi
      echo '[transport]'
      echo 'kind = "xen"'
      [ -z "${1:-}" ] || echo "domid = $1"
      [ "$mode" = xl ] || echo "pci = \"$PCI\""
      if [ "$mode" != restrict ] && { [ "$mode" != xl ] || [ "${XL_DEPRIV:-1}" = 1 ]; }; then
        echo 'restrict = true'
        echo 'uid = 65534'
        echo 'gid = 65534'
        echo "chroot = \"$CHROOT\""
      elif [ "$mode" = xl ]; then
        # Xen descriptors restricted to the guest; no uid/chroot, so host
        # devices can still be opened for xl usbdev-attach at run time.
        echo 'restrict = true'
      fi
      if [ "$mode" != xl ]; then
        echo '[[device]]'
        echo 'kind = "storage"'
        echo "image = \"$STICK\""
        [ "$mode" = uhci ] && echo 'speed = "full"' || echo 'speed = "high"'
      fi
      if [ -n "$CTL" ]; then
        [ "$mode" = wrap ] || { echo '[[device]]'; echo 'kind = "tablet"'; }
        echo '[control]'
        echo "socket = \"$CTL\""
      fi
    } > "$R/xen-dm.toml"
  }

  # beside: xen-usb-dm's control socket, driven with its own client
  # (`xen-usb-dm ctl CTL ...`, each call's output in run/MODE/ctl.log), one
  # step per line the guest prints (guest-init.sh's hid_checks): on
  # HID-READY an absolute position (x 16384, y 8192) with the left button
  # down, then the button up (input-send-event: ctl_input); on HOTPLUG-ADD
  # a read-only stick (device_add: ctl_device_add); on HOTPLUG-DEL its
  # removal (device_del: ctl_device_del). The device model runs as uid
  # 65534 chrooted in CHROOT by then, so device_add's image is a path in
  # CHROOT (/hot.img), readable by that uid.
  CHROOT=/run/xen-usb-dm-empty CTL="" hid_state="" wctl_state=""
  if [ "$mode" = beside ] && [ "$DM" != none ]; then
    CHROOT=/run/xen-usb-dm-beside CTL=/run/xen-usb-dm-ctl/beside.ctl hid_state=ready
  fi
  # wrap: the control socket of the wrapper (libxl's monitor interposed,
  # the service running the configured controller): once the guest runs,
  # dom0 lists the devices (the configured stick, device[0]), plugs a
  # keyboard in and takes it out again (wctl_step).
  if [ "$mode" = wrap ] && [ "$DM" != none ]; then
    CTL=/run/xen-usb-dm-ctl/wrap.ctl wctl_state=query
  fi
  wctl_step() {
    case $wctl_state in
      query)
        if dm_ctl query-usb && case $OUT in *"device[0]: storage"*) true ;; *) false ;; esac; then
          result ctl_wrap_query PASS "$OUT"
        else
          result ctl_wrap_query FAIL "$OUT"
        fi
        wctl_state=add ;;
      add)
        dm_ctl device_add id=kb kind=keyboard && case $OUT in "kb: plugged in at port"*) true ;; *) false ;; esac \
          && result ctl_wrap_device_add PASS "$OUT" || result ctl_wrap_device_add FAIL "$OUT"
        wctl_state=del ;;
      del)
        dm_ctl device_del kb && [ "$OUT" = ok ] && result ctl_wrap_device_del PASS "$OUT" \
          || result ctl_wrap_device_del FAIL "$OUT"
        wctl_state=done ;;
    esac
  }
  # dm_ctl ARGS...: one ctl call (bounded); its output in OUT, its status returned.
  dm_ctl() {
    local rc=0
    OUT=$(timeout -k 2 30 "$DM" ctl "$CTL" "$@" 2>&1) || rc=$?
    OUT=${OUT//$'\n'/ }
    echo "$(up) ctl $*: exit $rc: $OUT" >> "$R/ctl.log"
    [ "$rc" = 0 ] || OUT="exit $rc${OUT:+: $OUT}"
    return "$rc"
  }
  # seen: SEEN = the guest's step lines so far, read with bash builtins
  # (no helper forked at each poll; see the note on dom0's processes at
  # the top).
  seen() {
    local l
    SEEN=""
    [ -r "$CONSOLE" ] || return 0
    while IFS= read -r l; do
      case $l in HID-READY*|HOTPLUG-ADD*|HOTPLUG-DEL*) SEEN="$SEEN ${l%% *}" ;; esac
    done < "$CONSOLE"
  }
  hid_step() {
    seen
    case $hid_state in
      ready)
        # (a guest without its tablet goes on to the hot-plug steps)
        case $SEEN in *HID-READY*) ;; *HOTPLUG-ADD*) hid_state=add; return 0 ;; *) return 0 ;; esac
        if dm_ctl execute input-send-event '{"events":[{"type":"abs","data":{"axis":"x","value":16384}},{"type":"abs","data":{"axis":"y","value":8192}},{"type":"btn","data":{"down":true,"button":"left"}}]}' \
           && dm_ctl execute input-send-event '{"events":[{"type":"btn","data":{"down":false,"button":"left"}}]}'; then
          result ctl_input PASS "x 16384 y 8192, left button down and up"
        else
          result ctl_input FAIL "$OUT"
        fi
        hid_state=add ;;
      add)
        case $SEEN in *HOTPLUG-ADD*) ;; *) return 0 ;; esac
        dm_ctl device_add id=hot kind=storage image=/hot.img readonly=true \
          && result ctl_device_add PASS "$OUT" || result ctl_device_add FAIL "$OUT"
        hid_state=del ;;
      del)
        case $SEEN in *HOTPLUG-DEL*) ;; *) return 0 ;; esac
        dm_ctl device_del hot && result ctl_device_del PASS "$OUT" || result ctl_device_del FAIL "$OUT"
        hid_state=done ;;
    esac
  }

  # xl modes: `xl usb-list` into run/MODE/usb-list-NAME.txt; checks that
  # controller 0 is there (devicemodel, version 3, 4 ports) and port 1
  # holds the stick (want=attached) or nothing (want=empty).
  # same DIGITS N: whether xl's zero-padded DIGITS are N (in decimal or hex)
  same() { local d=${1##+(0)}; d=${d:-0}; [ "$d" = "$2" ] || [ "$d" = "$(printf %x "$2")" ]; }
  usb_list() {
    local name=$1 want=$2 f=$R/usb-list-$1.txt line bus dev
    # xl itself was seen to die of SIGSEGV here under the nested TCG (exit
    # 139; other dom0 tools do too, see README): a killed xl is asked
    # again, up to three times; any other exit status counts.
    local try rc
    for try in 1 2 3; do
      rc=0; timeout -k 2 30 xl usb-list "$domid" > "$f" 2>&1 || rc=$?
      [ "$rc" -gt 128 ] && [ "$rc" != 137 ] || break
      echo "dom0: xl usb-list killed by signal $((rc - 128)) (try $try)"
    done
    [ "$rc" = 0 ] || echo "(exit $rc)" >> "$f"
    # (every helper bounded: a dom0 process was seen to hang right here,
    # twice, with the guest's USB device passed through by QEMU)
    if ! timeout -k 2 10 awk '$1 == "0" && $2 == "devicemodel" {f = 1} END {exit !f}' "$f"; then
      result "usb_list_$name" FAIL "no devicemodel controller 0: $(timeout -k 2 10 tr '\n' '|' < "$f")"; return
    fi
    line=$(timeout -k 2 10 grep -m1 -E '^ *Port 1:' "$f")
    bus=${line#*Bus } dev=${line#*Device }
    [ "$bus" != "$line" ] || bus=""; [ "$dev" != "$line" ] || dev=""
    bus=${bus%% *} dev=${dev%% *}
    if [ "$want" = empty ]; then
      [ -z "$bus" ] && result "usb_list_$name" PASS "port 1 empty" \
        || result "usb_list_$name" FAIL "port 1: ${line# *}"
    elif [ -n "$bus" ] && same "$bus" "$OSTICK_BUS" && same "$dev" "$OSTICK_ADDR"; then
      result "usb_list_$name" PASS "${line# *}"
    else
      result "usb_list_$name" FAIL "port 1: '${line# *}', want bus $OSTICK_BUS addr $OSTICK_ADDR"
    fi
  }
  # xl_step: the xl modes' part of the wait for the guest (each poll).
  xl_state=""
  xl_step() {
    local rc
    case $xl_state in
      wait-detach)
        timeout -k 2 10 grep -q '^XL-WAIT-DETACH' "$CONSOLE" 2>/dev/null || return 0
        timeout -k 2 10 cp "$CONSOLE" "$R/guest-console.log" 2>/dev/null || true
        usb_list attached attached
        rc=0; timeout -k 2 60 xl usbdev-detach "$domid" 0 1 > "$R/xl-usbdev-detach.log" 2>&1 || rc=$?
        [ "$rc" = 0 ] && result xl_usbdev_detach PASS "xl usbdev-detach $domid 0 1" \
          || result xl_usbdev_detach FAIL "exit $rc: $(tail -1 "$R/xl-usbdev-detach.log")"
        usb_list detached empty
        xl_state=wait-attach ;;
      wait-attach)
        timeout -k 2 10 grep -q '^XL-WAIT-ATTACH' "$CONSOLE" 2>/dev/null || return 0
        timeout -k 2 10 cp "$CONSOLE" "$R/guest-console.log" 2>/dev/null || true
        # (where the stick is now: it may have been re-enumerated)
        local was="$OSTICK_BUS/$OSTICK_ADDR"
        find_ostick || true
        result ostick_after_detach INFO "${OSTICK_DESC:-gone from dom0} (was bus/addr $was)"
        # (one option per argument: xl usbdev-attach does not split on
        # commas, unlike xl.cfg's usbdev list)
        rc=0; timeout -k 2 60 xl usbdev-attach "$domid" "hostbus=$OSTICK_BUS" "hostaddr=$OSTICK_ADDR" \
          > "$R/xl-usbdev-attach.log" 2>&1 || rc=$?
        [ "$rc" = 0 ] && result xl_usbdev_attach PASS "xl usbdev-attach $domid hostbus=$OSTICK_BUS hostaddr=$OSTICK_ADDR" \
          || result xl_usbdev_attach FAIL "exit $rc: $(tail -1 "$R/xl-usbdev-attach.log")"
        usb_list reattached attached
        xl_state=done ;;
    esac
  }

  # wrapped: libxl starts xen-usb-dm (device_model_override); stock: libxl
  # starts its own QEMU (xlref).
  wrapped="" stock=""
  # (restrictref: restrict with libxl's own QEMU, the reference for
  # libxl's dm_restrict on its own; its guest finds no xHCI)
  case $mode in wrap|restrict|xl) wrapped=1 ;; *ref) stock=1 ;; esac
  case $mode in xl|xlref)
    # (looked up again: a retried guest finds it where the last one left it)
    for _ in $(seq 25); do find_ostick && break; sleep 0.2; done
    if [ -z "$OSTICK_BUS" ]; then result ostick FAIL "dom0 sees no 46f4 USB device"; exit 0; fi
    result ostick PASS "bus $OSTICK_BUS addr $OSTICK_ADDR"
    echo "usbdev = [ \"hostbus=$OSTICK_BUS,hostaddr=$OSTICK_ADDR,controller=0,port=1\" ]" >> "$R/guest.cfg"
    xl_state=wait-detach ;;
  esac

  if [ -n "$wrapped$stock" ]; then
    [ -n "$stock" ] || [ "$DM" != none ] || { result wrap FAIL "$mode mode needs a device model"; exit 0; }
    rm -f "$QEMU_LOG"
    if [ -n "$wrapped" ]; then
      # (a socket left by an earlier run is replaced by the device model)
      [ -z "$CTL" ] || mkdir -p "${CTL%/*}"
      write_toml
      # The script libxl runs instead of QEMU (named in guest.cfg), as in
      # the README. Its name must not contain "xen-usb-dm" (dm_procs). It
      # notes its arguments and limits (libxl's probe too) in dm-args.txt.
      # DIAG=strace (XTB_DIAG, with the host's strace in the share's diag/):
      # the device model runs under strace -f, which notes its processes'
      # exits, signals and set-id calls in run/MODE/strace.txt.
      pre=""
      if [ "${DIAG:-}" = strace ] && [ -x /mnt/share/diag/strace ]; then
        pre="env LD_LIBRARY_PATH=/mnt/share/diag /mnt/share/diag/strace -E LD_LIBRARY_PATH -f -qq -tt -y -e trace=exit_group,chroot,setuid,setgid,setresuid,setgroups,unlink,unlinkat,kill,tgkill,shutdown,openat,ftruncate,fallocate,pwrite64,pwritev,memfd_create -e signal=all -o $R/strace.txt"
      fi
      cat > "$R/dm-wrap" <<WRAP
#!/bin/sh
{ echo "args: \$*"; grep -E '^Max (file size|locked memory)' /proc/self/limits; } >> $R/dm-args.txt 2>&1
export XEN_USB_DM_LOG=$DM_LOG NO_COLOR=1
exec $pre $DM --config $R/xen-dm.toml --wrap $QEMU_XEN -- "\$@"
WRAP
      chmod +x "$R/dm-wrap"
    fi
    # libxl runs the probe, then the real start (our server is set up
    # before QEMU is exec'd, so before libxl unpauses the guest).
    tick; t_unpause=$NOW
    # (-vvv: libxl's debug lines, the device model's arguments among them)
    if ! xl -vvv create "$R/guest.cfg" > "$R/xl-create.log" 2>&1; then
      result xl_create FAIL "$(grep -E 'error' "$R/xl-create.log" | grep -v 'probe already exited' | head -1)"
      cp "$QEMU_LOG" "$R/dm.log" 2>/dev/null || true
      # (libxl leaves a domain whose device model failed, dying or not)
      xl list > "$R/xl-list-after-fail.log" 2>&1 || true
      xl destroy "$NAME" > /dev/null 2>&1 || true
      exit 0
    fi
    domid=$(xl domid "$NAME")
    result xl_create PASS "domid $domid, created and unpaused after $(since "$t_unpause") s"
    if [ -n "$wrapped" ]; then
      # The device-model log holds our lines and QEMU's.
      if grep -q 'xen-usb-dm: ready' "$QEMU_LOG"; then
        result dm_start PASS "$(grep -o 'ready:.*' "$QEMU_LOG" | head -1)"
      else
        result dm_start FAIL "no 'ready' line in $QEMU_LOG"
      fi
      svc=$(dm_procs)
      [ -n "$svc" ] && result dm_service PASS "pid ${svc//$'\n'/ }" \
        || result dm_service FAIL "no xen-usb-dm process while the guest runs"
    fi
    if [ "$mode" = restrict ]; then
      # What libxl asked of its device model under dm_restrict, as the
      # wrapper script saw it (the real start: the line with -xen-domid).
      a=$(grep -- '-xen-domid ' "$R/dm-args.txt" | tail -1)
      lim=$(grep -A2 -- '-xen-domid ' "$R/dm-args.txt" | grep 'file size' | tail -1)
      miss=""
      case $a in *-xen-domid-restrict*) ;; *) miss="$miss -xen-domid-restrict" ;; esac
      case $a in *"id=libxl-cmd,fd="*) ;; *) miss="$miss libxl-cmd,fd=" ;; esac
      case $a in *"-run-with user="*|*"-runas "*) ;; *) miss="$miss user" ;; esac
      case $a in *"chroot="*|*"-chroot "*) ;; *) miss="$miss chroot" ;; esac
      case $lim in *" 262144 "*) ;; *) miss="$miss RLIMIT_FSIZE=262144" ;; esac
      [ -z "$miss" ] && result dm_restrict_args PASS "$(echo "$a" | grep -oE -- '-xen-domid-restrict|id=libxl-cmd,fd=[0-9]+|-run-with [^ ]+|-runas [^ ]+|-chroot [^ ]+' | tr '\n' ' ')file size $(echo "$lim" | awk '{print $4}')" \
        || result dm_restrict_args FAIL "missing:$miss (dm-args.txt)"
      # The service process: QEMU's user and chroot, no file size limit.
      p=${svc%%$'\n'*}
      if [ -n "$p" ] && [ -d "/proc/$p" ]; then
        uid=$(awk '/^Uid:/ {print $2 "/" $3}' "/proc/$p/status")
        root=$(readlink "/proc/$p/root")
        fsize=$(awk '/^Max file size/ {print $4}' "/proc/$p/limits")
        { cat "/proc/$p/status"; cat "/proc/$p/limits"; ls -l "/proc/$p/fd"; } > "$R/service-proc.txt" 2>&1
        case $uid/$root/$fsize in 1310[0-9][0-9]/*/var/run/xen/qemu-root-*/unlimited|1310[0-9][0-9]/*/run/xen/qemu-root-*/unlimited)
          result dm_service_confined PASS "uid $uid, root $root, file size $fsize" ;;
        *) result dm_service_confined FAIL "uid $uid, root $root, file size $fsize" ;;
        esac
      else
        result dm_service_confined FAIL "no service process to look at"
      fi
    fi
  else
    if ! xl create -p "$R/guest.cfg" > "$R/xl-create.log" 2>&1; then
      result xl_create FAIL "$(tail -1 "$R/xl-create.log")"
      exit 0
    fi
    domid=$(xl domid "$NAME")
    result xl_create PASS "domid $domid"
    if [ "$DM" != none ]; then
      if [ -n "$CTL" ]; then
        # (a socket left by an earlier device model, which cannot remove
        # it from inside its chroot, is replaced by the next one)
        mkdir -p "$CHROOT" "${CTL%/*}"
        install -m 644 /mnt/share/hot.img "$CHROOT/hot.img"
      fi
      write_toml "$domid"
      XEN_USB_DM_LOG=$DM_LOG NO_COLOR=1 "$DM" --config "$R/xen-dm.toml" 2> "$R/dm.log" &
      dm_pid=$!
      tick; t=$NOW
      while dm_alive && ! grep -qi ready "$R/dm.log" && ! older "$t" "$DM_READY_WAIT"; do
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
    tick; t_unpause=$NOW
    xl unpause "$domid"
  fi

  started=""
  # Progress: the guest's CPU time, its console, our log (sampled every 5 s).
  dmlog=$R/dm.log; [ -z "$wrapped$stock" ] || dmlog=$QEMU_LOG
  tick; prog_t=$NOW prog_cpu=0 prog_act="" polls=0
  while dom_exists "$domid"; do
    if [ -z "$started" ] && timeout -k 2 10 grep -q '^GUEST-START' "$CONSOLE" 2>/dev/null; then
      started=1
      timing guest_start_s "$(since "$t_unpause")"
    fi
    if older "$t_unpause" "$GUEST_TIMEOUT"; then
      result guest_poweroff FAIL "still running after $GUEST_TIMEOUT s, destroyed"
      xl destroy "$domid" || true
      break
    fi
    polls=$((polls + 1))
    [ -z "$xl_state" ] || xl_step
    [ -z "$hid_state" ] || [ -z "$started" ] || hid_step
    [ -z "$wctl_state" ] || [ -z "$started" ] || wctl_step
    # Test hook (XTB_STALL_TEST=1): the first guest is paused 20 s after
    # unpause, which must look like a stalled guest.
    if [ "${STALL_TEST:-0}" = 1 ] && [ ! -f /tmp/stall-test-done ] && older "$t_unpause" 20; then
      touch /tmp/stall-test-done; xl pause "$domid"; echo "stall test: paused $NAME"
    fi
    if [ $((polls % 10)) = 0 ]; then
      # The heartbeat comes from this loop only: if the loop itself gets
      # stuck (it did, twice, in 4.20's wrap mode; the cause is not found
      # yet), run.sh sees the share stand still and retries the boot.
      echo "$NOW" > "$TOP/heartbeat"
      # (xl modes: the guest's console so far, kept should the boot hang)
      [ -z "$xl_state" ] || timeout -k 2 10 cp "$CONSOLE" "$R/guest-console.log" 2>/dev/null || true
      # (a crashed helper gives "", which counts as progress)
      cpu=$(guest_cpu "$domid"); cpu=${cpu%%.*}
      act=$(timeout -k 2 10 stat -c '%s %Y' "$CONSOLE" "$dmlog" 2>/dev/null | cksum)
      case $cpu in ""|*[!0-9]*) cpu="" ;; esac
      if [ -z "$cpu" ] || [ -z "$act" ] || [ "$act" != "$prog_act" ] || [ "$cpu" -gt "$prog_cpu" ]; then
        tick; prog_t=$NOW prog_cpu=${cpu:-$prog_cpu} prog_act=$act
      elif older "$prog_t" "$STALL_WINDOW"; then
        echo "stalled: guest CPU ${cpu} s, no console or device-model log for $STALL_WINDOW s, $(since "$t_unpause") s after unpause" > "$R/attempt-status"
        xl destroy "$domid" || true
        break
      fi
    fi
    sleep 0.5
  done
  timing guest_run_s "$(since "$t_unpause")"
  grep -q '^GUEST-DONE' "$CONSOLE" 2>/dev/null && result guest_done PASS "" \
    || result guest_done FAIL "no GUEST-DONE on the guest's console"

  if [ -n "$dm_pid" ]; then
    tick; t=$NOW
    while dm_alive && ! older "$t" "$DM_EXIT_WAIT"; do sleep 0.2; done
    if dm_alive; then
      xl list > "$R/xl-list-dm-stuck.log" 2>&1 || true   # a dying domain still listed?
      kill "$dm_pid"; sleep 1; kill -9 "$dm_pid" 2>/dev/null || true
      result dm_exit FAIL "still running $DM_EXIT_WAIT s after the domain died, killed"
    else
      wait "$dm_pid" && rc=0 || rc=$?
      timing dm_exit_s "$(since "$t")"
      [ "$rc" = 0 ] && result dm_exit PASS "exited by itself" || result dm_exit FAIL "exited with $rc"
    fi
  elif [ -n "$stock" ]; then
    cp "$QEMU_LOG" "$R/dm.log" 2>/dev/null || true
  elif [ -n "$wrapped" ]; then
    # libxl stops QEMU; the service process must notice the death itself.
    tick; t=$NOW
    while [ -n "$(dm_procs)" ] && ! older "$t" "$DM_EXIT_WAIT"; do sleep 0.2; done
    left=$(dm_procs)
    if [ -n "$left" ]; then
      ps -ef > "$R/ps-dm-stuck.log" 2>&1 || true
      xl list > "$R/xl-list-dm-stuck.log" 2>&1 || true
      # shellcheck disable=SC2086
      kill $left 2>/dev/null || true; sleep 1
      # shellcheck disable=SC2086
      kill -9 $left 2>/dev/null || true
      result dm_exit FAIL "pid ${left//$'\n'/ } still running $DM_EXIT_WAIT s after the domain died, killed"
    else
      timing dm_exit_s "$(since "$t")"
      result dm_exit PASS "no xen-usb-dm process left"
    fi
    # Its log is libxl's device-model log (read now that QEMU is gone).
    cp "$QEMU_LOG" "$R/dm.log" 2>/dev/null || true
  fi
  if [ "$DM" != none ] && [ -z "$stock" ] && { [ "$mode" != xl ] || [ "${XL_DEPRIV:-1}" = 1 ]; }; then
    line=$(grep -o 'deprivileged.*' "$R/dm.log" | head -1 || true)
    [ -n "$line" ] && result dm_deprivileged PASS "$line" \
      || result dm_deprivileged FAIL "no 'deprivileged' line in its log"
  fi
  case $mode in xl)
    # The device model's xHCI (libxl's device_add nec-usb-xhci) where the
    # guest found it.
    at=$(grep -o 'usbctrl xenusb-0: xHCI at [0-9a-f:.]*' "$R/dm.log" | head -1 | awk '{print $NF}')
    g=$(tr -d '\r' < "$CONSOLE" | sed -n 's/^RESULT xhci PASS \([0-9a-f:.]*\).*/\1/p' | head -1)
    if [ -n "$at" ] && [ "$at" = "$g" ]; then result dm_usbctrl PASS "xHCI at $at"
    else result dm_usbctrl FAIL "device model: '${at:-no usbctrl line}', guest: '${g:-no xHCI}'"; fi
  esac
  if [ -n "$hid_state" ]; then
    [ "$hid_state" = done ] && result ctl_sequence PASS "input, device_add, device_del" \
      || result ctl_sequence FAIL "stopped at $hid_state"
  fi
  if [ -n "$wctl_state" ]; then
    [ "$wctl_state" = done ] && result ctl_wrap_sequence PASS "query-usb, device_add, device_del" \
      || result ctl_wrap_sequence FAIL "stopped at $wctl_state"
  fi
  case $mode in xl|xlref)
    [ "$xl_state" = done ] && result xl_sequence PASS "detached and re-attached" \
      || result xl_sequence FAIL "stopped at $xl_state"
  esac

  [ "$STICK" = "$R/stick.img" ] || cp "$STICK" "$R/stick.img"
  # dom0's view of the image: does it hold what the guest says it wrote?
  if read -r _ off len sum < <(tr -d '\r' < "$CONSOLE" | grep '^HOSTCHECK'); then
    got=$(dd if="$STICK" bs=64k skip=$((off / 65536)) count=$((len / 65536)) 2>/dev/null \
          | sha256sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] && result dom0_image PASS "$got" || result dom0_image FAIL "image $got guest $sum"
  fi
}

for mode in $MODES; do
  cp "$TOP/$mode/guest.cfg" "/tmp/guest-$mode.cfg"
  size=$(stat -c %s "$TOP/$mode/stick.img")
  for a in $(seq "$GUEST_ATTEMPTS"); do
    rc=0; ( run_mode "$mode" ) || rc=$?
    [ "$rc" = 0 ] || echo "mode $mode: exited with $rc"
    c=$TOP/$mode/guest-console.log
    # The mode's shell itself died of a signal (seen: bash aborting with
    # "execute_command: bad command type", 4.20, in the wait for the
    # guest: memory corruption of dom0's processes, see README): its guest
    # and device model may still run. They are stopped, and the mode gets
    # another guest like a stalled one.
    if [ "$rc" -gt 128 ] && [ ! -f "$TOP/$mode/attempt-status" ]; then
      timeout -k 2 30 xl destroy "xtb-$mode" 2>/dev/null || true
      timeout -k 2 10 pkill -9 -f '[x]en-usb-dm' 2>/dev/null || true
      cp "/var/log/xen/console/guest-xtb-$mode.log" "$c" 2>/dev/null || true
      echo "the dom0 script of the mode died (exit $rc)" > "$TOP/$mode/attempt-status"
    fi
    # A kernel panic before /init (seen: a double fault in kmalloc during
    # ACPI init, an oops in text_poke_early) is the nested set-up's, not
    # ours: that guest counts as stalled too.
    if [ ! -f "$TOP/$mode/attempt-status" ] && grep -q 'Kernel panic' "$c" 2>/dev/null \
       && ! grep -q '^GUEST-START' "$c"; then
      echo "panic before init" > "$TOP/$mode/attempt-status"
    fi
    # So is a guest whose /init could not mount its file systems, and one
    # with a failed check: the nested TCG corrupts processes now and then
    # (a guest's busybox was seen to die of SIGSEGV on its sysfs mount, so
    # it saw no PCI functions; dom0's helpers to segfault, bash to abort),
    # and a lost check must not read as ours. Guest memory corruption by
    # the device model would look the same, so this gets another guest,
    # never another boot: the last guest's results stand (a fault of ours
    # fails both), and run.sh prints the earlier guest's failed checks.
    if [ ! -f "$TOP/$mode/attempt-status" ] && [ "$a" -lt "$GUEST_ATTEMPTS" ]; then
      f=$( { grep -ah ' FAIL ' "$TOP/$mode/results.txt" 2>/dev/null | awk '{print $2}'
             tr -d '\r' < "$c" 2>/dev/null | sed -n 's/^RESULT \([^ ]*\) FAIL.*/\1/p'; } | sort -u | tr '\n' ' ')
      if grep -q '^GUEST-SETUP-FAILED' "$c" 2>/dev/null; then
        grep -m1 '^GUEST-SETUP-FAILED' "$c" | tr -d '\r' > "$TOP/$mode/attempt-status"
      elif [ -n "$f" ] && grep -q 'Segmentation fault' "$c" 2>/dev/null; then
        echo "a guest process died of SIGSEGV and a check failed: ${f% }" > "$TOP/$mode/attempt-status"
      elif [ -n "$f" ]; then
        echo "checks failed: ${f% }" > "$TOP/$mode/attempt-status"
      fi
    fi
    [ -f "$TOP/$mode/attempt-status" ] || break
    why=$(cat "$TOP/$mode/attempt-status")
    echo "mode $mode: guest $a: $why"
    # The last one too: the mode stays unfinished, for run.sh to try it in
    # a new boot.
    [ "$a" -lt "$GUEST_ATTEMPTS" ] || { rm -f "$TOP/$mode/done"; break; }
    # Start that mode over with a fresh guest and stick; keep the attempt.
    rm -rf "$TOP/$mode.try$a"; mv "$TOP/$mode" "$TOP/$mode.try$a"
    mkdir "$TOP/$mode"
    cp "/tmp/guest-$mode.cfg" "$TOP/$mode/guest.cfg"
    truncate -s "$size" "$TOP/$mode/stick.img"
    for b in $(seq "$a"); do
      echo "guest $b: $(cat "$TOP/$mode.try$b/attempt-status")"
    done > "$TOP/$mode/guest-retries.txt"
  done
done
[ -z "$dmesg_pid" ] || kill "$dmesg_pid" "$alive_pid" 2>/dev/null || true
# dom0's kernel log: the segfaults of dom0 processes show up there.
dmesg > "$TOP/dom0-dmesg.log" 2>&1 || true
grep -E 'segfault|trap' "$TOP/dom0-dmesg.log" | head -5 || true
touch "$TOP/done"
