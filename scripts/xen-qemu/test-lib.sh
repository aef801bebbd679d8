#!/usr/bin/env bash
# test-lib.sh [BUSYBOX]: host-side tests of the parts of guest/xv-lib.sh that need no Xen: the
# check-line format, xv_oneline, xv_check_eq, xv_check_lines and the console forwarder's
# exactly-once delivery. They run under BUSYBOX's sh (the guests' shell; e2e.sh passes the one
# of the fetched packages), or under dash/sh when none is given. Prints "test-lib: N ok" or the
# failures, and exits non-zero on any failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
BB=${1:-}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
if [ -n "$BB" ]; then
  mkdir -p "$T/bin"
  for a in sh cat tr sed cut tail head wc grep sort sleep touch rm mkdir; do ln -s "$BB" "$T/bin/$a"; done
  SH=("$T/bin/sh")
  export PATH="$T/bin:$PATH"
else
  SH=(sh)
fi

cat >"$T/t.sh" <<'EOF'
. "$XV_LIB"
XV_ARCH=x86_64 XV_DOM=dom0
mkdir -p "$XV_RUN"
fails=0 oks=0
ok() { oks=$((oks + 1)); }
no() { fails=$((fails + 1)); echo "test-lib: FAIL $*"; }
expect() { # NAME EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then ok; else no "$1: expected [$2] got [$3]"; fi
}

# check lines
expect check-pass "@@CHECK x86_64 dom0 a-b PASS one two" "$(xv_check a-b PASS one two)"
expect check-nodetail "@@CHECK x86_64 dom0 c PASS" "$(xv_check c PASS)"
expect check-badname "@@CHECK x86_64 dom0 bad-check-name FAIL bad check name 'has space': x" "$(xv_check 'has space' PASS x)"
expect check-badstatus "@@CHECK x86_64 dom0 d FAIL bad status 'maybe': x" "$(xv_check d maybe x)"
expect check-for "@@CHECK x86_64 domU-pv e FAIL y" "$(xv_check_for domU-pv e FAIL y)"
expect checks-recorded 5 "$(grep -c '^@@CHECK ' "$XV_CHECKS")"
expect oneline "a b c @ @CHECK x" "$(printf 'a\r\nb\n\tc\n@@CHECK x\n' | xv_oneline)"
expect oneline-cap 300 "$(head -c 1000 /dev/zero | tr '\0' x | xv_oneline | tr -d '\n' | wc -c)"
expect eq-pass "@@CHECK x86_64 dom0 f PASS 1 (ctx)" "$(xv_check_eq f 1 1 '(ctx)')"
expect eq-fail "@@CHECK x86_64 dom0 g FAIL got '2' expected '1'" "$(xv_check_eq g 1 2)"
expect eq-empty "@@CHECK x86_64 dom0 h FAIL no expected value (got '')" "$(xv_check_eq h '' '')"

# xv_check_lines
out=$(xv_check_lines st- sh -c 'echo PASS one fine; echo noise; echo FAIL two broke down; exit 1')
expect lines "@@CHECK x86_64 dom0 st-one PASS fine
noise
@@CHECK x86_64 dom0 st-two FAIL broke down" "$out"
out=$(xv_check_lines st- sh -c 'echo PASS one; exit 3')
expect lines-rc "@@CHECK x86_64 dom0 st-one PASS
@@CHECK x86_64 dom0 st-exit FAIL sh exited 3 without reporting a failure: PASS one" "$out"
out=$(xv_check_lines st- sh -c 'echo hello')
expect lines-none "hello
@@CHECK x86_64 dom0 st-exit FAIL sh exited 0 and reported no result: hello" "$out"

# forwarder: every complete line exactly once, a partial line only once it is complete
XV_CONSOLE_DIR=$XV_RUN/console
mkdir -p "$XV_CONSOLE_DIR"
log=$XV_CONSOLE_DIR/guest-domU-x.log
printf 'boot 1\r\n@@CHECK x86_64 domU-x boot PASS\r\npart' >"$log"
echo domU-x >>"$XV_RUN/fwd.names"
xv_forward_start >"$XV_RUN/fwd.out"
sleep 1.5
printf 'ial\r\n' >>"$log"
i=0
while [ $i -lt 20 ]; do echo "line $i" >>"$log"; i=$((i + 1)); done
xv_forward_stop >>"$XV_RUN/fwd.out"
xv_forward_all >>"$XV_RUN/fwd.out"
expect fwd-lines 23 "$(grep -c '^\[domU-x\] ' "$XV_RUN/fwd.out")"
expect fwd-partial 1 "$(grep -c '^\[domU-x\] partial$' "$XV_RUN/fwd.out")"
expect fwd-unique 23 "$(sort -u "$XV_RUN/fwd.out" | grep -c .)"
expect fwd-checks 1 "$(xv_forwarded_checks domU-x)"
echo "test-lib: $oks ok, $fails failed"
[ "$fails" = 0 ]
EOF
XV_LIB=$HERE/guest/xv-lib.sh XV_RUN=$T/run "${SH[@]}" "$T/t.sh"
