#!/bin/sh
# start.sh DIR [xenstored args]: start Debian's real C xenstored (4.17) on this host, with no
# hypervisor, serving DIR/socket; prints its pid (also in DIR/pid). Clients: XENSTORED_PATH=DIR/socket.
# Adapted from the shared recipe (shared/xenstored-host/start.sh) for use from a fresh clone: the
# shim is built from this folder. The Rust tests do the same in tests/src/xenstored.rs.
# Needs: scripts/install-deps.sh (xenstore-utils xen-utils-4.17 libxen-dev, gcc).
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
XSD=${XENVIRTIO_XENSTORED:-/usr/lib/xen-4.17/bin/xenstored}
[ -x "$XSD" ] || { echo "xenstored not found at $XSD: run scripts/install-deps.sh" >&2; exit 1; }
SO=${XSD_SHIM_SO:-${TMPDIR:-/tmp}/xenvirtio-xsdshim/libxsdshim.so}
if [ ! -f "$SO" ] || [ "$HERE/xsdshim.c" -nt "$SO" ]; then
  mkdir -p "$(dirname "$SO")"
  gcc -shared -fPIC -O2 -o "$SO.$$" "$HERE/xsdshim.c" -ldl && mv "$SO.$$" "$SO"
fi
D=$1; shift
mkdir -p "$D"
XSD_SHIM_DIR="$D" XENSTORED_RUNDIR="$D" LD_PRELOAD="$SO" \
  setsid "$XSD" -N "$@" >"$D/out.log" 2>&1 </dev/null &
echo $! > "$D/pid"
for i in $(seq 200); do [ -S "$D/socket" ] && break; sleep 0.01; done
[ -S "$D/socket" ] || { echo "xenstored did not start: see $D/out.log" >&2; exit 1; }
cat "$D/pid"
