# shellcheck shell=bash
# Sourced by tests/guest/fetch.sh and tests/xen/fetch.sh (needs CACHE and a
# log function): a private APT configuration for trixie + trixie-backports
# that leaves the host's /etc/apt untouched. Defines APTDIR, stamp (touched
# when the lists were last updated, at most once a day) and tapt (runs a
# command under that configuration).
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
