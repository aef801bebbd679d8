#!/usr/bin/env bash
# test-boot-fault.sh: host-side tests of boot-fault.sh, the rule that tells an emulator fault
# before any check (e2e.sh boots again) from a fault that must fail the run, on serial logs
# written here in the form boot.sh records. Prints "test-boot-fault: N ok, M failed"; exits
# non-zero on any failure. e2e.sh runs it beside test-lib.sh (check host harness-lib).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
oks=0 fails=0
# case NAME EXPECTED-RC EXPECTED-OUTPUT: boot-fault.sh on $T/log
case_() {
  local out rc=0
  out=$("$HERE/boot-fault.sh" "$T/log" x86_64) || rc=$?
  if [ "$rc" = "$2" ] && [ "$out" = "$3" ]; then
    oks=$((oks + 1))
  else
    fails=$((fails + 1))
    echo "test-boot-fault: FAIL $1: rc=$rc output [$out], expected rc=$2 [$3]"
  fi
}
created() { printf '[  11.24] @@MARK dom0 created %s domid=%s\r\n' "$1" "$2"; }
fault() { printf '[  13.82] (XEN) d%sv0 Triple fault - invoking HVM shutdown action 1\r\n' "$1"; }
own_check() { printf '[  20.00] [%s] @@CHECK x86_64 %s %s PASS fine\r\n' "$1" "$1" "$2"; }
dom0_check() { printf '[  20.00] @@CHECK x86_64 %s %s FAIL on its behalf\r\n' "$1" "$2"; }

{ created domU-pv 1; created domU-pvh 2; own_check domU-pv boot; } >"$T/log"
case_ no-fault 1 ""

{ created domU-pv 1; created domU-pvh 2; own_check domU-pv boot; fault 2; dom0_check domU-pvh boot; } >"$T/log"
case_ before-checks 0 "emulator triple fault in domU-pvh before any check"

{ created domU-pvh 2; own_check domU-pvh boot; own_check domU-pvh run-xenvirtio-frontend; fault 2; } >"$T/log"
case_ after-checks 1 ""

# the after-checks test of --induce-fault: the domain's name is booted again and faults
{ created domU-pvh 2; own_check domU-pvh boot; created domU-pvh 5; fault 5; } >"$T/log"
case_ after-checks-same-name 1 ""

{ created domU-pvh 2; fault 7; } >"$T/log"
case_ unknown-domid 1 ""

{ created domU-pv 1; created domU-pvh 2; fault 2; own_check domU-pv boot; fault 1; own_check domU-pv channel; } >"$T/log"
case_ one-of-two-reported 1 ""

# domid 1 is not domid 12, in the fault lines and in the marks
{ created domU-pvh 1; created domU-pv 12; own_check domU-pv boot; fault 1; } >"$T/log"
case_ domid-prefix 0 "emulator triple fault in domU-pvh before any check"
{ created domU-pvh 1; created domU-pv 12; own_check domU-pv boot; fault 12; } >"$T/log"
case_ domid-prefix-reported 1 ""

# Xen and Dom0 share the serial line: a fault line may follow other text on the same line
{ created domU-pvh 3; printf '[  13.82] half a line of Dom0(XEN) d3v0 Triple fault - invoking HVM shutdown action 1\r\n'; } >"$T/log"
case_ interleaved 0 "emulator triple fault in domU-pvh before any check"

: >"$T/log"
case_ empty-log 1 ""
rm -f "$T/log"
case_ no-log 1 ""

echo "test-boot-fault: $oks ok, $fails failed"
[ "$fails" = 0 ]
