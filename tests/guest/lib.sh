# Shared by run-matrix.sh, the bench*.sh scripts and scripts/demo.sh: run xen-usb-dm
# with one stick and attach QEMU to it. Source it; needs bash.

# start_dm BINARY DIR READONLY LOG: serves DIR/stick.img over DIR/dm.sock
# (config in DIR/xen-dm.toml), output in LOG; sets DM_PID. With UAS=true
# the stick also offers USB Attached SCSI; HC=ehci or HC=uhci serves an
# EHCI or a UHCI instead of the xHCI; SPEED sets the stick's speed (default: the controller's
# fastest); KBD=true adds an emulated keyboard, TABLET=true a tablet,
# NOSTICK=true leaves the stick out; CONTROL=PATH a control socket;
# CAPTURE=FILE captures the stick's transfers there (usbmon pcap).
start_dm() {
  local dm=$1 dir=$2 ro=$3 log=$4
  rm -f "$dir/dm.sock"
  local spd=""
  [ -z "${SPEED:-}" ] || spd="speed = \"$SPEED\""
  cat > "$dir/xen-dm.toml" <<CFG
[controller]
model = "${HC:-xhci}"
[transport]
kind = "vfio-user"
socket = "$dir/dm.sock"
CFG
  if [ "${NOSTICK:-false}" != true ]; then
    cat >> "$dir/xen-dm.toml" <<CFG
[[device]]
kind = "storage"
image = "stick.img"
readonly = $ro
uas = ${UAS:-false}
$spd
CFG
  fi
  if [ -n "${CAPTURE:-}" ] && [ "${NOSTICK:-false}" != true ]; then
    printf 'capture = "%s"\ncapture_snaplen = 128\ncapture_max_mib = 0\n' "$CAPTURE" >> "$dir/xen-dm.toml"
  fi
  if [ "${KBD:-false}" = true ]; then
    printf '[[device]]\nkind = "keyboard"\n' >> "$dir/xen-dm.toml"
  fi
  if [ "${TABLET:-false}" = true ]; then
    printf '[[device]]\nkind = "tablet"\n' >> "$dir/xen-dm.toml"
  fi
  if [ -n "${CONTROL:-}" ]; then
    rm -f "$CONTROL"
    printf '[control]\nsocket = "%s"\n' "$CONTROL" >> "$dir/xen-dm.toml"
  fi
  "$dm" --config "$dir/xen-dm.toml" > "$log" 2>&1 &
  DM_PID=$!
  # Ready: the vfio-user socket and then (bound after it) the control
  # socket, if there is one.
  for _ in $(seq 100); do
    [ -S "$dir/dm.sock" ] && { [ -z "${CONTROL:-}" ] || [ -S "$CONTROL" ]; } && return 0
    sleep 0.05
  done
  echo "xen-usb-dm did not start:" >&2; cat "$log" >&2; return 1
}

# stop_dm: SIGTERM (the server finishes the session and removes its socket).
stop_dm() { kill "$DM_PID" 2>/dev/null || true; wait "$DM_PID" 2>/dev/null || true; }

# vfio_dev DIR: the QEMU -device argument for the server in DIR.
vfio_dev() { echo "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$1/dm.sock\"}}"; }

# Idle CPU (the benchmarks). ticks PID: its utime + stime, clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# idle_cpu LOG PIDFILE: waits for the guest's IDLE-START in LOG, then
# prints the % of a core the process in PIDFILE used over 20 s.
idle_cpu() {
  local log=$1 pidf=$2 t0 t1 c0 c1 pid
  for _ in $(seq 1800); do grep -q IDLE-START "$log" 2>/dev/null && break; sleep 0.5; done
  sleep 2
  pid=$(cat "$pidf")
  c0=$(ticks "$pid"); t0=$(date +%s.%N); sleep 20; c1=$(ticks "$pid"); t1=$(date +%s.%N)
  awk -v c=$((c1 - c0)) -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" 'BEGIN {printf "%.2f", 100 * c / hz / (t1 - t0)}'
}
# qemu_idle KERNEL LOG APPEND QEMU-ARGS...: boots the guest in QEMU alone
# (mode=idle in APPEND) and prints QEMU's idle CPU (idle_cpu).
qemu_idle() {
  local k=$1 log=$2 append=$3 name="bench-idle-$$-$RANDOM" b pidf
  shift 3
  pidf=$(mktemp)
  EXTRA_MODULES=drivers/input APPEND="$append" "$HERE/boot.sh" "$k" "$log" -name "$name" "$@" &
  b=$!
  for _ in $(seq 300); do pgrep -n -f "qemu-system.* -name $name" > "$pidf" && break; sleep 0.2; done
  idle_cpu "$log" "$pidf"; wait $b || true
  rm -f "$pidf"
}
