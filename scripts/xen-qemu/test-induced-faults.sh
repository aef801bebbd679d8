#!/usr/bin/env bash
# test-induced-faults.sh: the emulator-fault handling of e2e.sh, tested with real faults: Xen
# under QEMU boots the x86 PVH DomU into fault/triple-fault.S, a kernel that triple-faults on
# purpose, with a real "d<N>v0 Triple fault" from Xen's HVM code.
#   1. before-checks: the DomU faults before its first check, on the first attempt only. The run
#      must say "RETRY x86_64 boot: emulator triple fault in domU-pvh before any check (attempt 2
#      of 3)", boot again, and pass.
#   2. after-checks: the DomU runs all of its smoke checks, and then its name faults. The run
#      must fail (no-crash names the triple fault) and that fault must not be retried.
# Each e2e run is --smoke with the PVH DomU only (about a minute each). Prints one
# "PASS|FAIL induced-<case>: ..." line per case, then "induced-faults: N passed, M failed".
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${XENVIRTIO_E2E_WORK:-/tmp/xenvirtio-e2e}
LOGS=$WORK/logs
# The handling is the harness's, the same for every release: tested on Debian 12, whose PVH
# DomU is where the emulator's faults were seen (docs/E2E.md, "Emulator faults").
REL=bookworm
mkdir -p "$WORK"
passed=0 failed=0
result() { # PASS|FAIL NAME DETAIL
  echo "$1 induced-$2: $3"
  if [ "$1" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

# 1. before the checks: retried, then green
out=$WORK/induced-before-checks.out
rc=0
"$ROOT/scripts/e2e.sh" --release "$REL" --arch x86_64 --smoke --domus pvh --induce-fault before-checks >"$out" 2>&1 || rc=$?
want="RETRY x86_64 boot: emulator triple fault in domU-pvh before any check (attempt 2 of 3)"
if [ "$rc" != 0 ]; then
  result FAIL before-checks "e2e.sh exited $rc (want 0): $(grep -m 3 '^FAIL ' "$out" | tr '\n' ' ') (output: $out)"
elif ! grep -qxF "$want" "$out"; then
  result FAIL before-checks "no line '$want' (output: $out)"
elif ! grep -a -q 'induced fault: domU-pvh boots /boot/triple-fault (before-checks)' "$LOGS/$REL-x86_64-smoke.serial.log.attempt-1" ||
  ! grep -a -q -E '\(XEN\) d[0-9]+v0 Triple fault' "$LOGS/$REL-x86_64-smoke.serial.log.attempt-1"; then
  result FAIL before-checks "attempt 1 did not boot the fault kernel into a triple fault ($LOGS/$REL-x86_64-smoke.serial.log.attempt-1)"
elif grep -a -q 'induced fault' "$LOGS/$REL-x86_64-smoke.serial.log"; then
  result FAIL before-checks "the fault was induced again on the last attempt"
else
  result PASS before-checks "Xen logged a real triple fault on attempt 1, the run retried and passed: $(grep -m 1 '^e2e: [0-9]* passed' "$out")"
fi

# 2. after the checks: a failure, never retried
out=$WORK/induced-after-checks.out
rc=0
"$ROOT/scripts/e2e.sh" --release "$REL" --arch x86_64 --smoke --domus pvh --induce-fault after-checks >"$out" 2>&1 || rc=$?
# The fault must be in the last attempt's log: had it been retried, it would be in an .attempt-N.
fails=$(grep '^FAIL ' "$out" || true)
if [ "$rc" != 1 ]; then
  result FAIL after-checks "e2e.sh exited $rc (want 1: a failure) (output: $out)"
elif ! grep -a -q 'induced fault: domU-pvh boots /boot/triple-fault (after-checks)' "$LOGS/$REL-x86_64-smoke.serial.log"; then
  result FAIL after-checks "the last attempt did not boot the fault kernel after the checks ($LOGS/$REL-x86_64-smoke.serial.log)"
elif grep -a -l 'induced fault: domU-pvh boots /boot/triple-fault (after-checks)' "$LOGS"/$REL-x86_64-smoke.serial.log.attempt-* >/dev/null 2>&1; then
  result FAIL after-checks "the fault after the checks was retried: $(grep '^RETRY ' "$out" | tr '\n' ' ')"
elif ! grep -q "^FAIL $REL *x86_64 host *no-crash: .*Triple fault" <<<"$fails" || [ "$(grep -c . <<<"$fails")" != 1 ]; then
  result FAIL after-checks "want exactly one failure, no-crash naming the triple fault; got: $(tr '\n' ' ' <<<"$fails")"
else
  result PASS after-checks "a triple fault after domU-pvh's checks failed the run without a retry: $(cut -c1-160 <<<"$fails")"
fi
echo "induced-faults: $passed passed, $failed failed"
[ "$failed" = 0 ]
