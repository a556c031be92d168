# Shared by run-matrix.sh, bench.sh and scripts/demo.sh: run xen-usb-dm
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
  for _ in $(seq 100); do [ -S "$dir/dm.sock" ] && return 0; sleep 0.05; done
  echo "xen-usb-dm did not start:" >&2; cat "$log" >&2; return 1
}

# stop_dm: SIGTERM (the server finishes the session and removes its socket).
stop_dm() { kill "$DM_PID" 2>/dev/null || true; wait "$DM_PID" 2>/dev/null || true; }

# vfio_dev DIR: the QEMU -device argument for the server in DIR.
vfio_dev() { echo "{\"driver\":\"vfio-user-pci\",\"socket\":{\"type\":\"unix\",\"path\":\"$1/dm.sock\"}}"; }
