#!/bin/sh
# shellcheck shell=dash
# net-dom0.sh: Dom0 side of `scripts/e2e.sh --mode net`: the virtio-net cells alone (issue 15),
# the same ones the full matrix runs (tests/net-lib.sh), for working on the net device without
# the rest of the matrix. The backend daemon runs here; each DomU gets a NIC on Dom0's bridge.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh
# shellcheck source=matrix-lib.sh
. /xv/tests/matrix-lib.sh
# shellcheck source=net-lib.sh
. /xv/tests/net-lib.sh

BOOT_TIMEOUT=${XV_BOOT_TIMEOUT:-300}
AGENT_TIMEOUT=${XV_AGENT_TIMEOUT:-120}

: >"$MX_BACKEND_LOG"
mx_backend_start_cell
mx_domus_up

if net_bridge_cell; then
  for d in $ready; do
    net_cells "$d"
  done
fi

for n in $ready; do
  xv_domu_run "$n" 30 "grep -c '^@@CHECK ' $XV_CHECKS" >"$XV_RUN/$n.emitted" 2>&1
done
for n in $created; do
  xv_domu_destroy "$n"
done
if mx_backend_stop; then
  xv_check backend-stop PASS "the daemon exited ($MX_BACKEND_STOPPED)"
else
  xv_check backend-stop FAIL "the daemon did not exit within 20s of SIGTERM"
fi
xv_forward_stop
# shellcheck disable=SC2086 # a list of names
xv_check_delivered $created
exit 0
