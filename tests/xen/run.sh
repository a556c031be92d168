#!/usr/bin/env bash
# run.sh DM_BINARY|none
# The real-Xen runs: for each Xen series in XTB_XEN (default "4.20 4.17"),
# that Xen + its Debian dom0 inside QEMU 7.2 (TCG) — 4.20 with a trixie
# dom0 and 6.12 guest kernel, 4.17 with a bookworm dom0 and 6.1 guest kernel
# (see fetch.sh); in one dom0 boot, one HVM guest per mode, one after the
# other, gets DM_BINARY as its secondary device model (xHCI at $XTB_PCI with
# a 16 MiB stick) and drives the stick (see guest-init.sh, dom0-run.sh).
# Modes:
#   beside  dom0 creates the guest paused, starts DM_BINARY next to it,
#           unpauses it; with our tablet too and a control socket, through
#           which dom0 injects a position and a click (the guest checks its
#           evdev node) and hot-adds and removes a read-only stick
#           (hot.img; the guest finds and reads it, then sees it go);
#   wrap    the guest's device_model_override runs DM_BINARY --wrap QEMU,
#           so libxl starts and stops it with the guest;
#   intx    as beside, the guest booted with pci=nomsi (xhci_hcd on INTx).
#   ehci    as beside, with our EHCI instead of the xHCI (the guest's
#           ehci_hcd + usb-storage).
#   uhci    as beside, with our UHCI (uhci_hcd + usb-storage on a
#           full-speed stick; registers in I/O space: PIO ioreqs; INTx).
#   restrict  as wrap, with dm_restrict=1 in the guest's xl.cfg (libxl
#           pre-opens the QMP socket, passes -xen-domid-restrict and QEMU's
#           user/chroot, limits RLIMIT_FSIZE to 256 KiB); the guest writes
#           and verifies 4 MiB.
#   xl      (4.17's defaults) as wrap, but xen-usb-dm's configuration
#           has no controller and no device: the guest's xl.cfg asks for
#           them (usbctrl, usbdev = the outer QEMU's USB stick, which dom0
#           sees as a host device); dom0 then detaches and re-attaches it
#           with xl usbdev-detach/-attach while the guest watches.
#   xlref   (not in the defaults) the xl mode with libxl's own QEMU (no
#           override, no xen-usb-dm): the reference for what stock
#           qemu-xen does with the same xl.cfg and xl commands.
#   restrictref  (not in the defaults; a diagnostic) restrict's guest with
#           libxl's own QEMU: whether libxl's dm_restrict works at all
#           (the guest finds no xHCI there).
# Default modes: 4.20 "beside wrap ehci uhci", 4.17 "beside wrap intx restrict xl ehci"
# (XTB_MODES sets them for every series).
# With an xl mode the outer QEMU has a USB controller (qemu-xhci) with a
# 4 MiB stick of random data (usb-storage, serial XTBSTICK, 46f4:0001):
# dom0's host USB device (XTB_OUTER_USB: auto, xhci, xhci-intx, ehci, none).
# `none` runs no device model (beside only): the guest then reports that it
# found no xHCI, which checks the plumbing alone.
#
# A guest that stops making progress is destroyed in dom0 and that mode run
# again in the same dom0 boot (dom0-run.sh, up to XTB_GUEST_ATTEMPTS guests
# per mode). A boot of the nested set-up can also freeze as a whole (the
# outer QEMU stops using CPU, dom0's heartbeat stops); such a boot is killed
# and retried, up to XTB_ATTEMPTS boots in all; a retry runs only the modes
# that did not finish.
# Prints every RESULT (named SERIES/MODE/check), the timings, one summary
# line per mode and "xen: N passed, M failed"; exits non-zero on any failure.
# Env: XTB_XEN ("4.20 4.17"), XTB_MODES, XTB_ATTEMPTS (5), XTB_GUEST_ATTEMPTS
# (2), XTB_TIMEOUT (per series, s, 1320 for 4.20; 1500 for 4.17), XTB_GUEST_TIMEOUT (guest power-on to
# power-off in dom0, s, 420), XTB_PCI (00:1e.0), XTB_WORK (work directory,
# default a fresh one under /tmp; one subdirectory per series), KEEP=1 (keep
# it also on success), XTB_STICK_ON_SHARE (the modes whose stick is served
# from the 9p share, default "beside"; 1: all, 0: none; the others' from
# dom0's tmpfs), XTB_GUEST_CMDLINE (guest
# console options), XTB_DM_LOG (xen-usb-dm's XEN_USB_DM_LOG, info),
# XTB_DOM0_CMDLINE (more options for dom0's kernel),
# XTB_STALL_TEST=1 (dom0 pauses the first guest after 20 s: checks the
# in-dom0 retry), XTB_OUTER_QEMU (instead of the host's QEMU 7.2; a stand-in
# to test these scripts).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DM=${1:?usage: run.sh DM_BINARY|none}
SERIES=${XTB_XEN:-4.20 4.17}
# (Five: a frozen boot is found within about a minute of freezing, and
# the series' budget, not the count, bounds the time; a fresh-clone CI run
# saw two 4.20 boots in a row freeze.)
ATTEMPTS=${XTB_ATTEMPTS:-5}
GUEST_ATTEMPTS=${XTB_GUEST_ATTEMPTS:-2}
GUEST_TIMEOUT=${XTB_GUEST_TIMEOUT:-420}
PCI=${XTB_PCI:-00:1e.0}
STICK_BYTES=$((16 << 20))
# The outer QEMU's USB stick: OSTICK_BYTES of random data; the xl modes'
# guests read OSTICK_LEN bytes at OSTICK_OFF through the passed-through
# device and compare with the host's sha256.
OSTICK_BYTES=$((4 << 20)) OSTICK_OFF=$((1 << 20)) OSTICK_LEN=$((256 << 10))
# Freeze: the outer QEMU used less than FREEZE_CPU s of CPU in the last
# FREEZE_WINDOW s while neither its console nor the share moved; hung:
# neither moved for HANG_WINDOW s, whatever the CPU. While dom0 waits for a
# guest it touches run/heartbeat every ~5 s, so both mean that dom0 or its
# wait stopped (a stuck guest is dom0-run.sh's business).
FREEZE_WINDOW=60 FREEZE_CPU=3 HANG_WINDOW=150
log() { echo "xen $XEN: $*" >&2; }

if [ "$DM" != none ]; then
  [ -x "$DM" ] || { echo "xen: $DM: not an executable" >&2; exit 2; }
fi

# run_series SERIES: one Xen series, all its modes (in a subshell: its
# variables and exits stay there). Ends with "xen SERIES: N passed, M failed".
run_series() {
XEN=$1
t_run=$(date +%s)
# 4.17 runs four guests, each slower to boot (firmware and kernel load
# take ~100 s there, ~40 s on 4.20): its budget leaves room for one more
# whole boot too. restrict runs on 4.17 only: 4.20's QEMU 10 dies under
# dm_restrict, with or without xen-usb-dm (README).
case $XEN in
  4.17) MODES=${XTB_MODES:-beside wrap intx restrict xl ehci} TIMEOUT=${XTB_TIMEOUT:-1500} ;;
  *)    MODES=${XTB_MODES:-beside wrap ehci uhci} TIMEOUT=${XTB_TIMEOUT:-1320} ;;
esac
# Without a device model only beside (the plumbing) and xlref (which runs
# no xen-usb-dm) make sense.
if [ "$DM" = none ]; then
  m=""; for mode in $MODES; do case $mode in beside|*ref) m="$m $mode" ;; esac; done
  MODES=${m# }; MODES=${MODES:-beside}
fi
eval "$("$HERE/fetch.sh" "$XEN")"
OUTER_QEMU=${XTB_OUTER_QEMU:-$OUTER_QEMU}

if [ -n "${XTB_WORK:-}" ]; then W=$XTB_WORK/$XEN; mkdir -p "$W"
else W=$(mktemp -d "/tmp/xen-usb-dm-xen-$XEN.XXXXXX"); fi
S=$W/share
mkdir -p "$S"
cp "$HERE/dom0-run.sh" "$S/"
cp "$GUEST_KERNEL" "$S/vmlinuz"
cp "$GUEST_INITRD" "$S/guest-initrd.gz"
if [ "$DM" != none ]; then cp "$DM" "$S/xen-usb-dm"; DM_IN_DOM0=/mnt/share/xen-usb-dm
else DM_IN_DOM0=none; fi
# XTB_DIAG=strace: the host's strace (and its libunwind) for dom0.
if [ "${XTB_DIAG:-}" = strace ]; then
  mkdir -p "$S/diag"; cp "$(command -v strace)" "$S/diag/"
  ldd "$(command -v strace)" | awk '/libunwind/ {print $3}' | xargs -r cp -t "$S/diag/"
fi
# The outer stick (outside the share: dom0 sees it only as a USB device).
OSTICK=$W/ostick.img
head -c "$OSTICK_BYTES" /dev/urandom > "$OSTICK"
OSTICK_SUM=$(dd if="$OSTICK" bs=64k skip=$((OSTICK_OFF / 65536)) count=$((OSTICK_LEN / 65536)) 2>/dev/null \
  | sha256sum | cut -d' ' -f1)
OSTICK_ALL=$(sha256sum < "$OSTICK" | cut -d' ' -f1)
# beside's hot-added stick (dom0 plugs it in through the control socket,
# read-only): HOT_BYTES of random data on the share; the guest reads all
# of it and compares with HOT_SUM.
HOT_BYTES=$((512 << 10))
head -c "$HOT_BYTES" /dev/urandom > "$S/hot.img"
HOT_SUM=$(sha256sum < "$S/hot.img" | cut -d' ' -f1)
# Its controller (XTB_OUTER_USB): xhci (qemu-xhci; dom0's xhci_hcd on
# MSI-X), xhci-intx (the same, dom0's xhci_hcd on INTx: quirks=0x40,
# XHCI_BROKEN_MSI), ehci (usb-ehci, a high-speed port; ehci_pci, INTx).
# auto: xhci when an xl mode runs, none otherwise (nothing else needs it).
OUTER_USB=${XTB_OUTER_USB:-auto}
if [ "$OUTER_USB" = auto ]; then
  OUTER_USB=none; for m in $MODES; do case $m in xl|xlref) OUTER_USB=xhci ;; esac; done
fi
case $OUTER_USB in
  xhci|xhci-intx) outer_usb=(-device qemu-xhci,id=ousb) ;;
  ehci) outer_usb=(-device usb-ehci,id=ousb) ;;
  none) outer_usb=() ;;
  *) echo "xen: XTB_OUTER_USB=$OUTER_USB: auto, xhci, xhci-intx, ehci or none" >&2; exit 2 ;;
esac
if [ "$OUTER_USB" != none ]; then
  outer_usb+=(-drive "if=none,id=ostick,file=$OSTICK,format=raw"
              -device "usb-storage,bus=ousb.0,drive=ostick,serial=XTBSTICK")
fi

# prepare_run: run/ for the next boot. Modes that finished in an earlier
# boot keep their directory; the others start afresh, so nothing of a
# frozen attempt leaks into the next. Sets `pending`.
prepare_run() {
  local mode
  mkdir -p "$S/run"
  rm -f "$S/run/done" "$S/run/params.env"
  # (dom0's log of an earlier boot is kept as dom0-run-N.log)
  if [ -f "$S/run/dom0-run.log" ]; then mv "$S/run/dom0-run.log" "$S/run/dom0-run-$((n - 1)).log"; fi
  pending=""
  for mode in $MODES; do
    [ -f "$S/run/$mode/done" ] && continue
    pending="$pending $mode"
    # (what an unfinished mode left is kept as run/MODE.bootN)
    if [ -d "$S/run/$mode" ]; then rm -rf "${S:?}/run/$mode.boot$((n - 1))"; mv "$S/run/$mode" "$S/run/$mode.boot$((n - 1))"; fi
    mkdir "$S/run/$mode"
    truncate -s "$STICK_BYTES" "$S/run/$mode/stick.img"
    guest_cfg "$mode" > "$S/run/$mode/guest.cfg"
  done
  pending=${pending# }
  cat > "$S/run/params.env" <<EOF
DM=$DM_IN_DOM0
PCI=$PCI
GUEST_TIMEOUT=$GUEST_TIMEOUT
DM_READY_WAIT=20
DM_EXIT_WAIT=10
STICK_ON_SHARE="${XTB_STICK_ON_SHARE:-beside}"
QEMU_XEN=$QEMU_XEN
GUEST_ATTEMPTS=$GUEST_ATTEMPTS
DM_LOG=${XTB_DM_LOG:-info}
STALL_TEST=${XTB_STALL_TEST:-0}
DIAG=${XTB_DIAG:-}
OUTER_USB=$OUTER_USB
OSTICK_BYTES=$OSTICK_BYTES
OSTICK_OFF=$OSTICK_OFF
OSTICK_LEN=$OSTICK_LEN
OSTICK_SUM=$OSTICK_SUM
XL_DEPRIV=${XTB_XL_DEPRIV:-0}
MODES="$pending"
EOF
}

irq_model() { # irq_model MODE: " irq_model=ERE" for the guest (guest-init.sh)
  # 4.17's libxl gives the guest XENFEAT_hvm_pirqs: MSI-X and INTx both
  # arrive as pirqs (event channels); 4.20's does not.
  case $XEN/$1 in
    4.17/intx|4.17/uhci) echo " irq_model=xen-pirq.*ioapic" ;;
    4.17/*)    echo " irq_model=xen-pirq.*msi" ;;
    */intx|*/uhci) echo " irq_model=IO-APIC" ;;
    *)         echo " irq_model=PCI-MSI" ;;
  esac
}

guest_args() { # guest_args MODE: what guest-init.sh reads from the command line
  case $1 in
    xl|xlref)
      # The passed-through outer stick; its interrupt model is not checked.
      echo "xtb_mode=xl stick_bytes=$OSTICK_BYTES ostick_off=$OSTICK_OFF ostick_len=$OSTICK_LEN ostick_sum=$OSTICK_SUM" ;;
    *)
      echo "stick_bytes=$STICK_BYTES$([ "$1" != intx ] || echo " pci=nomsi")$(irq_model "$1")$(case $1 in restrict*) echo " io_mib=4" ;; ehci|uhci) echo " hc=$1" ;; beside) echo " hid=1 hot_bytes=$HOT_BYTES hot_sum=$HOT_SUM" ;; esac)" ;;
  esac
}

guest_cfg() { # guest_cfg MODE: the xl configuration of that mode's guest
  cat <<EOF
name = "xtb-$1"
type = "hvm"
memory = 256
vcpus = 1
kernel = "/mnt/share/vmlinuz"
ramdisk = "/mnt/share/guest-initrd.gz"
cmdline = "${XTB_GUEST_CMDLINE:-console=hvc0 loglevel=4 mitigations=off rodata=off} panic=-1 usb-storage.delay_use=0 $(guest_args "$1")"
serial = "file:/var/log/xen/xtb-$1-serial.log"
vga = "none"
vnc = 0
disk = [ ]
vif = [ ]
# Without it the guest's RDTSCP is emulated, which needs NRIPS that TCG
# lacks: the guest reboots.
tsc_mode = "native"
on_reboot = "destroy"
on_crash = "destroy"
EOF
  # libxl runs this script (written by dom0-run.sh) instead of its QEMU.
  case $1 in wrap|restrict|xl)
    echo 'device_model_version = "qemu-xen"'
    echo "device_model_override = \"/mnt/share/run/$1/dm-wrap\""
  esac
  # libxl's device-model confinement (needs the xen-qemuuser-range-base
  # user in dom0: dom0-run.sh adds it).
  case $1 in restrict|restrictref) echo 'dm_restrict = 1' ;; esac
  # An xHCI with 4 ports from libxl (QMP device_add after the device model
  # is up); dom0-run.sh appends the usbdev line with the outer stick's
  # bus and address as dom0 sees them.
  case $1 in xl|xlref)
    echo 'usbctrl = [ "type=devicemodel,version=3,ports=4" ]'
  esac
}

cpu_s() { # user + system CPU seconds of process $1
  awk '{printf "%d", ($14 + $15) / '"$(getconf CLK_TCK)"'}' "/proc/$1/stat" 2>/dev/null || echo 0
}
activity() { # sizes and times of the console log and the share's files
  stat -c '%n %s %Y' "$1" "$S"/run/* "$S"/run/*/* 2>/dev/null | cksum
}
stop_qemu() { # TERM, then KILL if it has not gone within 10 s
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 10); do kill -0 "$1" 2>/dev/null || return 0; sleep 1; done
  kill -9 "$1" 2>/dev/null || true
}

# boot N: one outer QEMU; sets status = done|frozen|timeout|exited and
# t_dom0 (s from QEMU start to dom0 ready, or "-").
boot() {
  local n=$1 serial=$W/serial-$1.log qpid t0 now limit
  local -a cpu=() act=()
  prepare_run
  : > "$serial"
  t0=$(date +%s)
  limit=$(( t_run + TIMEOUT - t0 ))
  "$OUTER_QEMU" -no-reboot -accel tcg -M pc -cpu EPYC,-smap,-monitor -smp 1 -m 4096 \
    -display none -vga none -nic none -monitor none -serial "file:$serial" \
    -kernel "$XEN_ELF" \
    -append "console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=1 noreboot" \
    -initrd "$DOM0_KERNEL console=hvc0 quiet loglevel=3${XTB_DOM0_CMDLINE:+ $XTB_DOM0_CMDLINE},$DOM0_INITRD" \
    -drive "file=$DOM0_IMG,if=virtio,format=raw,cache=unsafe,snapshot=on" \
    -virtfs "local,path=$S,mount_tag=share,security_model=none,id=share" \
    "${outer_usb[@]}" \
    < /dev/null > "$W/qemu-$n.log" 2>&1 &
  qpid=$!
  status=exited t_dom0=-
  local i=0 done_at=""
  while kill -0 "$qpid" 2>/dev/null; do
    sleep 1; i=$((i + 1)); now=$(date +%s)
    if [ "$t_dom0" = - ] && grep -q '^XTB-DOM0-UP' "$serial"; then t_dom0=$((now - t0)); fi
    if [ -f "$S/run/done" ]; then
      # dom0 powers off next; give it a little time, then stop QEMU.
      [ -n "$done_at" ] || done_at=$now
      status="done"
      [ $((now - done_at)) -lt 30 ] || { stop_qemu "$qpid"; break; }
      continue
    fi
    if [ $((now - t0)) -ge "$limit" ]; then status=timeout; stop_qemu "$qpid"; break; fi
    if [ $((i % 5)) = 0 ]; then
      cpu+=("$(cpu_s "$qpid")"); act+=("$(activity "$serial")")
      local k=${#cpu[@]} back=$((FREEZE_WINDOW / 5)) hback=$((HANG_WINDOW / 5))
      if [ "$k" -gt "$back" ] \
         && [ $(( cpu[k - 1] - cpu[k - 1 - back] )) -lt $FREEZE_CPU ] \
         && [ "${act[k - 1]}" = "${act[k - 1 - back]}" ]; then
        status=frozen; stop_qemu "$qpid"; break
      fi
      # Busy but without a sign of life (dom0's heartbeat included).
      if [ "$k" -gt "$hback" ] && [ "${act[k - 1]}" = "${act[k - 1 - hback]}" ]; then
        status=hung; stop_qemu "$qpid"; break
      fi
    fi
  done
  wait "$qpid" 2>/dev/null || true
  [ -f "$S/run/done" ] && status="done"
  t_boot=$(( $(date +%s) - t0 ))
  tr -d '\r' < "$serial" > "$serial.tmp" && mv "$serial.tmp" "$serial"
}

reasons=""
declare -A boot_of=() dom0_of=()
unfinished() { # the modes without their run/MODE/done
  local mode
  for mode in $MODES; do [ -f "$S/run/$mode/done" ] || echo -n "$mode "; done
}
for n in $(seq "$ATTEMPTS"); do
  boot "$n"
  for mode in $pending; do
    # The nested set-up occasionally crashes the guest kernel in early boot
    # (seen once: a double fault in kmalloc during ACPI init, before init
    # and before xhci_hcd could load). That mode is retried like a frozen
    # boot, and reported; a crash after init started is a test failure.
    gc=$S/run/$mode/guest-console.log
    if [ -f "$S/run/$mode/done" ] && grep -q 'Kernel panic' "$gc" 2>/dev/null \
       && ! grep -q '^GUEST-START' "$gc"; then
      status="guest-panic-before-init($mode)"
      cp "$gc" "$W/guest-panic-$n-$mode.log"
      rm -f "$S/run/$mode/done"
    fi
    # A mode dom0 marked finished without its own results (seen once, a
    # fresh-clone run, 4.20's uhci: the guest's checks and the image were
    # there, dom0's results.txt had none of its lines, and the mode
    # passed on the guest's word alone): dom0's checks (the device model
    # started, deprivileged, exited; dom0's view of the image) are lost,
    # so the mode runs again in the next boot instead.
    if [ -f "$S/run/$mode/done" ] && ! grep -aq '^RESULT guest_done' "$S/run/$mode/results.txt" 2>/dev/null; then
      status="dom0-results-lost($mode)"
      cp "$S/run/$mode/results.txt" "$W/results-lost-$n-$mode.txt" 2>/dev/null || true
      rm -f "$S/run/$mode/done"
    fi
    if [ ! -f "$S/run/$mode/done" ] && [ -f "$S/run/$mode/attempt-status" ]; then
      status="guest-stalled($mode)"   # every guest dom0 tried (dom0-run.sh)
    fi
    if [ -f "$S/run/$mode/done" ]; then boot_of[$mode]=$n dom0_of[$mode]=$t_dom0; fi
  done
  log "attempt $n ($pending): $status after $t_boot s (dom0 up after $t_dom0 s)"
  cat "$S"/run/*/guest-retries.txt 2>/dev/null | sed "s/^/xen $XEN: boot $n: /" >&2 || true
  left=$(unfinished)
  if [ -z "$left" ]; then break; fi
  reasons="$reasons $status"
  grep -E 'XTB-DOM0-FAIL|Panic|panic' "$W/serial-$n.log" | head -5 >&2 || true
  if [ $(( $(date +%s) - t_run )) -ge "$TIMEOUT" ]; then break; fi
done
retries=$((n - 1))

# --- results ----------------------------------------------------------------
out=$W/results.txt
: > "$out"
summaries=()
for mode in $MODES; do
  R=$S/run/$mode
  mo=$W/results-$mode.txt
  : > "$mo"
  if [ -f "$R/done" ]; then
    echo "RESULT dom0_boot PASS ${dom0_of[$mode]}s (boot ${boot_of[$mode]})" >> "$mo"
    # (-a, NULs dropped: seen once on 4.17, a retried guest's results.txt
    # on the share held NUL bytes, and grep answered "binary file matches"
    # instead of its lines)
    tr -d '\0' < "$R/results.txt" | grep -a '^RESULT' >> "$mo" || true
    tr -d '\r' < "$R/guest-console.log" 2>/dev/null | grep -E '^(RESULT|PCI|HOSTCHECK|IRQ)' \
      | sed 's/^PCI/INFO guest PCI/; s/^HOSTCHECK/INFO guest HOSTCHECK/; s/^IRQ/INFO guest IRQ/' >> "$mo" || true
    # An earlier guest of this mode that dom0 retried: its failed checks
    # stay in sight (they do not count; the last guest's results do).
    for t in "$R".try*; do
      [ -d "$t" ] || continue
      { tr -d '\0' 2>/dev/null < "$t/results.txt" | grep -a '^RESULT .* FAIL'
        tr -d '\r' < "$t/guest-console.log" 2>/dev/null | grep '^RESULT .* FAIL'; } \
        | sed "s/^RESULT /INFO retried guest ${t##*.try}: /" >> "$mo" || true
    done
    # The host's view of the image too (after dom0 and QEMU are gone).
    if read -r _ off len sum < <(tr -d '\r' < "$R/guest-console.log" | grep '^HOSTCHECK'); then
      got=$(dd if="$R/stick.img" bs=64k skip=$((off / 65536)) count=$((len / 65536)) 2>/dev/null \
            | sha256sum | cut -d' ' -f1)
      [ "$got" = "$sum" ] && echo "RESULT host_image PASS $got" >> "$mo" \
        || echo "RESULT host_image FAIL image $got guest $sum" >> "$mo"
    fi
    # The xl modes only read the outer stick: it must be as it was made.
    case $mode in xl|xlref)
      got=$(sha256sum < "$OSTICK" | cut -d' ' -f1)
      [ "$got" = "$OSTICK_ALL" ] && echo "RESULT host_ostick PASS unchanged" >> "$mo" \
        || echo "RESULT host_ostick FAIL the outer stick changed" >> "$mo"
    esac
  else
    echo "RESULT testbed FAIL not finished; last attempt $status after $n attempts" >> "$mo"
  fi
  sed "s|^RESULT |RESULT $XEN/$mode/|" "$mo" | tee -a "$out" | sed 's/^/  /'
  guest_start=$(awk '$1 == "TIMING" && $2 == "guest_start_s" {print $3}' "$R/results.txt" 2>/dev/null)
  guest_run=$(awk '$1 == "TIMING" && $2 == "guest_run_s" {print $3}' "$R/results.txt" 2>/dev/null)
  # Where the device model's requests went: it logs its running count at
  # most once a second while busy; the guest idles 5 s around the 1 MiB
  # write and the 1 MiB read, so the last three bursts are those and the
  # guest's shutdown (xhci_hcd halting the controller), and everything
  # before is firmware, boot and USB enumeration.
  if [ -f "$R/dm.log" ]; then
    sed 's/\x1b\[[0-9;]*m//g' "$R/dm.log" | awk -v mode="$XEN $mode" '
      / xen: stats: / {
        split($1, t, "T"); split(t[2], h, ":"); s = h[1] * 3600 + h[2] * 60 + h[3]
        for (i = 1; i <= NF; i++) if ($i == "stats:") n = $(i + 1)
        if (seen && s - last >= 3) { b[++k] = prev - base; base = prev }
        seen = 1; last = s; prev = n
      }
      END {
        if (!seen) exit
        b[++k] = prev - base
        if (k < 4) { printf "xen %s: ioreqs: %d in all (%d bursts)\n", mode, prev, k; exit }
        e = prev - b[k] - b[k - 1] - b[k - 2]
        printf "xen %s: ioreqs: %d in all: firmware + boot + USB enumeration %d, write %d, read %d, shutdown %d\n", mode, prev, e, b[k - 2], b[k - 1], b[k]
      }'
  fi
  mp=$(grep -c '^RESULT .* PASS' "$mo" || true)
  mf=$(grep -c '^RESULT .* FAIL' "$mo" || true)
  gr=$(cat "$R"/guest-retries.txt 2>/dev/null | wc -l)
  summaries+=("xen $XEN: mode $mode: $mp passed, $mf failed; guest console ${guest_start:--} s and power-off ${guest_run:--} s after unpause (boot ${boot_of[$mode]:--}, guest retries $gr)")
done
echo "xen $XEN: timings: dom0 up ${t_dom0} s after QEMU start (last boot); last boot ${t_boot} s;" \
     "whole run $(( $(date +%s) - t_run )) s; boot retries $retries${reasons:+ (${reasons# })}"
printf '%s\n' "${summaries[@]}"
passed=$(grep -c '^RESULT .* PASS' "$out" || true)
failed=$(grep -c '^RESULT .* FAIL' "$out" || true)
if [ "$failed" != 0 ] || [ "$passed" = 0 ]; then
  echo "xen $XEN: logs in $W (serial-N.log: Xen + dom0 console; share/run/dom0-run.log;" \
       "share/run/MODE: dm.log, guest-console.log, ...; MODE.tryN: a guest retried in dom0)"
  for mode in $MODES; do
    if [ -f "$S/run/$mode/dm.log" ]; then tail -5 "$S/run/$mode/dm.log" | sed "s/^/  $mode dm: /"; fi
  done
elif [ "${KEEP:-0}" != 1 ] && [ -z "${XTB_WORK:-}" ]; then
  rm -rf "$W"
fi
echo "xen $XEN: $passed passed, $failed failed"
}

total_p=0 total_f=0
for xen in $SERIES; do
  t=$(date +%s)
  ( run_series "$xen" ) 2>&1 | tee "/tmp/xen-usb-dm-xen-$xen-$$.out" || true
  sum=$(sed -n "s/^xen $xen: \([0-9]*\) passed, \([0-9]*\) failed\$/\1 \2/p" "/tmp/xen-usb-dm-xen-$xen-$$.out" | tail -1)
  rm -f "/tmp/xen-usb-dm-xen-$xen-$$.out"
  [ -n "$sum" ] || { echo "xen $xen: run ended without a summary"; sum="0 1"; }
  total_p=$((total_p + ${sum% *})) total_f=$((total_f + ${sum#* }))
  echo "xen $xen: series took $(( $(date +%s) - t )) s"
done
echo "xen: $total_p passed, $total_f failed"
[ "$total_f" = 0 ] && [ "$total_p" != 0 ]
