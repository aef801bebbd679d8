#!/usr/bin/env bash
# boot-fault.sh LOG ARCH: was this boot of ARCH lost to an emulator fault before any check?
# Reads one serial log of boot.sh. Prints the reason and exits 0 when some DomU triple-faulted
# (Xen's "(XEN) d<N>v<M> Triple fault") before its console delivered any check line of its own:
# such a domain ran nothing of the project's (domU-init reports "boot" before it starts a
# project program), so the fault is the emulation's, not a test result, and e2e.sh boots the
# arch again. Exits 1 otherwise: no triple fault; or a fault in a domain that had already
# reported a check (it may be ours: a failure); or a fault whose domid no "@@MARK dom0 created
# NAME domid=N" line names (it cannot be told apart: a failure too).
# docs/E2E.md, "Emulator faults".
set -euo pipefail
LOG=${1:?usage: boot-fault.sh LOG ARCH}
ARCH=${2:?usage: boot-fault.sh LOG ARCH}
[ -f "$LOG" ] || exit 1
# name_of DOMID: the domain that Dom0 created with DOMID (names are reused, domids are not).
name_of() {
  tr -d '\r' <"$LOG" | grep -a -o -E "@@MARK dom0 created [^ ]+ domid=$1\$" | tail -n 1 |
    sed -E 's/^@@MARK dom0 created ([^ ]+) domid=.*/\1/'
}
faults=$(grep -a -o -E '\(XEN\) ([^ ]+ )*d[0-9]+v[0-9]+ Triple fault' "$LOG" |
  sed -E 's/.*[ )]d([0-9]+)v[0-9]+ Triple fault$/\1/' | sort -un) || true
[ -n "$faults" ] || exit 1
first=
for domid in $faults; do
  name=$(name_of "$domid") || true
  [ -n "$name" ] || exit 1
  grep -a -q -F "[$name] @@CHECK $ARCH $name " "$LOG" && exit 1
  first=${first:-$name}
done
echo "emulator triple fault in $first before any check"
