#!/bin/sh
# shellcheck shell=dash
# bootloop-dom0.sh: Dom0 side of `scripts/e2e.sh --boot-loop N` (issue 10): a measurement, not a
# test. Boots the DomUs of $XV_DOMUS together, N times in a row (kernel cmdline `xvloops=`), and
# records how each boot ended: "booted" (the DomU's init reported boot), "triple-fault" (Xen
# logged a triple fault for its domid first), or "other" (it crashed, vanished or timed out).
# One "@@BOOTLOOP <i> <domain> <outcome> <seconds> [detail]" line per boot, then the check
# boot-loop with the counts. The check fails only when the loop itself could not run (a create
# failed, or no boot came back at all): the faults are what is being measured.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh

loops=$(xv_cmdline xvloops)
case $loops in '' | *[!0-9]*) loops=40 ;; esac
BOOT_TIMEOUT=120

# outcome NAME DOMID OFFSET: wait for NAME's own boot line past byte OFFSET of its console log.
outcome() {
  local _log _end _s _tf
  _log=$XV_CONSOLE_DIR/guest-$1.log
  _end=$(($(xv_uptime) + BOOT_TIMEOUT))
  while :; do
    if tail -c +"$(($3 + 1))" "$_log" 2>/dev/null | grep -a -q "@@CHECK $XV_ARCH $1 boot "; then
      echo booted
      return
    fi
    _tf=$(xl dmesg 2>/dev/null | grep -a "d$2v[0-9]* Triple fault" | tail -n 1)
    if [ -n "$_tf" ]; then
      echo "triple-fault $(echo "$_tf" | xv_oneline)"
      return
    fi
    _s=$(xv_domu_state "$1")
    case $_s in
      *c* | gone) echo "other xl state=$_s; console: $(tail -c +"$(($3 + 1))" "$_log" 2>/dev/null | tail -n 2 | xv_oneline)"; return ;;
    esac
    [ "$(xv_uptime)" -lt "$_end" ] || { echo "other no boot report within ${BOOT_TIMEOUT}s"; return; }
    sleep 0.5
  done
}

echo "@@MARK dom0 boot loop: $loops rounds of $XV_DOMUS, Xen $(xl info 2>/dev/null | sed -n 's/^xen_version *: *//p'), $(xl info 2>/dev/null | sed -n 's/^xen_commandline *: *//p' | xv_oneline)"
booted=0 faults=0 other=0 failed_create=0
i=1
while [ "$i" -le "$loops" ]; do
  for t in $XV_DOMUS; do
    n=domU-$t
    off=$(wc -c <"$XV_CONSOLE_DIR/guest-$n.log" 2>/dev/null || echo 0)
    echo "$off" >"$XV_RUN/$n.off"
    t0=$(cut -d' ' -f1 /proc/uptime)
    echo "$t0" >"$XV_RUN/$n.t0"
    if ! out=$(xv_domu_create "$n"); then
      failed_create=$((failed_create + 1))
      echo "@@BOOTLOOP $i $n create-failed 0 $out"
      echo gone >"$XV_RUN/$n.domid"
      continue
    fi
    # xv_domu_create recorded the domid in $XV_RUN/$n.domid before the domain ran
  done
  for t in $XV_DOMUS; do
    n=domU-$t
    d=$(cat "$XV_RUN/$n.domid")
    [ "$d" != gone ] || continue
    o=$(outcome "$n" "$d" "$(cat "$XV_RUN/$n.off")")
    secs=$(awk -v a="$(cat "$XV_RUN/$n.t0")" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN { printf "%.1f", b - a }')
    echo "@@BOOTLOOP $i $n domid=$d $secs $o"
    case $o in
      booted) booted=$((booted + 1)) ;;
      triple-fault*) faults=$((faults + 1)) ;;
      *) other=$((other + 1)) ;;
    esac
  done
  for t in $XV_DOMUS; do
    xv_domu_destroy "domU-$t"
  done
  i=$((i + 1))
done
total=$((booted + faults + other + failed_create))
detail="$total boots of $(echo "$XV_DOMUS" | tr ' ' '+') in $loops rounds: $booted booted, $faults triple faults, $other other, $failed_create create failures"
if [ "$failed_create" = 0 ] && [ "$booted" -gt 0 ]; then
  xv_check boot-loop PASS "$detail"
else
  xv_check boot-loop FAIL "$detail"
fi
exit 0
