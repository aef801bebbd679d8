#!/bin/sh
# shellcheck shell=dash
# smoke-dom0.sh: Dom0 side of `scripts/e2e.sh --smoke` (issue 3), run by dom0-init once the
# toolstack is up. Checks Dom0 itself, boots the DomUs of $XV_DOMUS, and checks each of them from
# here through the command channel. Every DomU that does not boot is a FAIL, never a skip.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh

BOOT_TIMEOUT=${XV_BOOT_TIMEOUT:-300}
AGENT_TIMEOUT=${XV_AGENT_TIMEOUT:-120}

# ---- DomUs: create them all first, so that they boot while Dom0 checks itself ----
xv_forward_start
created=
for t in $XV_DOMUS; do
  n=domU-$t
  if out=$(xv_domu_create "$n"); then
    created="$created $n"
  else
    xv_check_for "$n" boot FAIL "$out"
  fi
done

# ---- Dom0 itself ----
xv_check_domain_basics
# The Xen devices and xenstore of Dom0, with itself as the peer (xenvirtio-selftest dom0):
# grants out and in with data both ways, grant copy, unmap notification, a read-only grant
# whose store faults, event-channel ping-pong and masking, xenstore over the socket.
xv_check_lines selftest- xenvirtio-selftest dom0
out=$(xl info 2>&1)
rc=$?
ver=$(echo "$out" | sed -n 's/^xen_version *: *//p')
case "$rc:$ver" in
  0:"$XV_XEN".*) xv_check xl-info PASS "xen_version=$ver $(echo "$out" | grep -E '^(nr_cpus|total_memory|free_memory) ' | xv_oneline)" ;;
  *) xv_check xl-info FAIL "rc=$rc xen_version='$ver' $(echo "$out" | tail -n 3 | xv_oneline)" ;;
esac
if grep -q control_d /proc/xen/capabilities 2>/dev/null; then
  xv_check role-control-d PASS "/proc/xen/capabilities: $(xv_oneline </proc/xen/capabilities)"
else
  xv_check role-control-d FAIL "/proc/xen/capabilities: $(xv_oneline </proc/xen/capabilities 2>&1)"
fi

# ---- then check each DomU ----
for n in $created; do
  xv_domu_wait_boot "$n" "$BOOT_TIMEOUT" || continue
  if ! xv_agent_wait "$n" "$AGENT_TIMEOUT"; then
    xv_check_for "$n" channel-ready FAIL "agent did not publish ready=1 within ${AGENT_TIMEOUT}s"
    continue
  fi
  xv_check_for "$n" channel-ready PASS "agent ready in domid $(xv_domid "$n")"

  # The command channel, both ways: output and exit status come back.
  out=$(xv_domu_run "$n" 30 'uname -m')
  rc=$?
  want=$(xv_expect_uname_m "$n")
  if [ "$rc" = 0 ] && [ "$out" = "$want" ]; then
    xv_check_for "$n" channel-uname PASS "uname -m in $n: $out, rc=0"
  else
    xv_check_for "$n" channel-uname FAIL "rc=$rc out='$(echo "$out" | xv_oneline)' expected '$want' rc=0"
  fi
  # shellcheck disable=SC2016 # the DomU shell must see the backslash and the dollar verbatim
  out=$(xv_domu_run "$n" 30 'echo "to stdout \\ \$x"; echo to-stderr >&2; exit 3')
  rc=$?
  # shellcheck disable=SC2016
  want=$(printf '%s\n%s' 'to stdout \ $x' to-stderr)
  if [ "$rc" = 3 ] && [ "$out" = "$want" ]; then
    xv_check_for "$n" channel-status PASS "rc=3, stdout and stderr returned verbatim"
  else
    xv_check_for "$n" channel-status FAIL "rc=$rc (want 3) out='$(echo "$out" | xv_oneline)'"
  fi

  # Output larger than one xenstore node comes back whole: the agent splits it into chunks that
  # fit a guest's node quota, and only the tail of 24 KiB is kept.
  # shellcheck disable=SC2016 # the DomU shell expands it
  out=$(xv_domu_run "$n" 60 'i=0; while [ $i -lt 3000 ]; do echo "line-$i"; i=$((i + 1)); done')
  rc=$?
  size=$(($(printf '%s' "$out" | wc -c) + 1)) # $(...) dropped the last newline
  last=$(printf '%s\n' "$out" | tail -n 1)
  first=$(printf '%s\n' "$out" | head -n 1)
  if [ "$rc" = 0 ] && [ "$size" = 24576 ] && [ "$last" = line-2999 ]; then
    xv_check_for "$n" channel-big-output PASS "the last 24576 bytes of 28890 came back (from '$first' to '$last')"
  else
    xv_check_for "$n" channel-big-output FAIL "rc=$rc size=$size last='$last' (want rc=0, 24576 bytes, line-2999)"
  fi

  # Across domains: the DomU's cross-domu (started by smoke-domU.sh) granted a page, offered a
  # port and pinned a page; Dom0 maps, replies, notifies, foreign-maps. Dom0's results are
  # reported under the DomU's name (dom0-cross-*); the DomU reports its own (cross-*).
  d=$(xv_domid "$n")
  (
    XV_DOM=$n
    xv_check_lines dom0-cross- xenvirtio-selftest cross-dom0 --domid "$d" --foreign "$(xv_expect_foreign_map "$n")"
  )
  # Why this project exists, measured: can a device model get an IOREQ server for this DomU?
  want=$(xv_expect_ioreq "$n")
  if [ -n "$want" ]; then
    (
      XV_DOM=$n
      xv_check_lines dom0- xenvirtio-selftest ioreq --domid "$d" --expect "$want"
    )
  fi
  # Wait for the DomU side to finish, so that its check lines are out before they are counted.
  out=$(xv_domu_run "$n" 120 'while [ ! -e /run/xv/cross.rc ]; do sleep 0.2; done; cat /run/xv/cross.rc')
  rc=$?
  if [ "$rc" = 0 ] && [ "$out" = 0 ]; then
    xv_check_for "$n" cross-finished PASS "cross-domu in $n exited 0"
  else
    xv_check_for "$n" cross-finished FAIL "cross-domu in $n: channel rc=$rc, exit status '$(echo "$out" | xv_oneline)'"
  fi

  # How many check lines the DomU emitted, to compare with what its console delivered.
  xv_domu_run "$n" 30 "grep -c '^@@CHECK ' $XV_CHECKS" >"$XV_RUN/$n.emitted" 2>&1
done

# ---- tear down, then account for every DomU check line ----
for n in $created; do
  xv_domu_destroy "$n"
done
sleep 1
for n in $created; do
  st=$(xv_domu_state "$n")
  if [ "$st" = gone ]; then
    xv_check_for "$n" destroy PASS "xl destroy: domain gone"
  else
    xv_check_for "$n" destroy FAIL "still listed after xl destroy, state $st"
  fi
done
# shellcheck disable=SC2086 # a list of names
xv_induce_fault_after_checks $created
xv_forward_stop
# shellcheck disable=SC2086 # a list of names
xv_check_delivered $created
exit 0
