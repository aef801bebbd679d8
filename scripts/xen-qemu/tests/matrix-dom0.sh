#!/bin/sh
# shellcheck shell=dash
# matrix-dom0.sh: Dom0 side of the full matrix (issue 6; `scripts/e2e.sh` without --smoke).
# The backend daemon runs here; frontends run here and in every DomU. For each role, every DMA
# strategy the role allows is forced with --dma: blk (verify, then the image checked from
# here), console (a line each way through the backend's pty) and rng (bytes that look random);
# without --dma each role must pick the policy table's strategy. Then the lifecycle: NBD export,
# detach and attach again under a running export, a backend restart under a running export, and
# `xl destroy` of a DomU in the middle of I/O. docs/E2E.md lists every check.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh
# shellcheck source=matrix-lib.sh
. /xv/tests/matrix-lib.sh
# shellcheck source=knbd-lib.sh
. /xv/tests/knbd-lib.sh
# shellcheck source=net-lib.sh
. /xv/tests/net-lib.sh

BOOT_TIMEOUT=${XV_BOOT_TIMEOUT:-300}
AGENT_TIMEOUT=${XV_AGENT_TIMEOUT:-120}
NBD=/run/xv/nbd.sock

# The effective grant_usage: 0 only for the DomU the daemon trusts with direct.
mx_expected_grant_usage() {
  case "$1" in
    domU-pvh | domU-arm) echo 0 ;;
    *) echo 1 ;;
  esac
}

mkdir -p "$MX_IMAGES"
: >"$MX_BACKEND_LOG"

# ---- the backend daemon, then the DomUs ----
mx_backend_start_cell
mx_domus_up

# ---- devices: blk, console and rng for Dom0 itself and each DomU ----
for d in dom0 $ready; do
  mx_attach_all "$d"
done
for d in dom0 $ready; do
  mx_grant_usage_cell "$d" "$(mx_expected_grant_usage "$d")"
done

# ---- the matrix: every strategy each role allows, then the role's default ----
for d in dom0 $ready; do
  cell=0
  for s in $(mx_strategies "$d"); do
    mx_strategy_cells "$d" "$s" "$cell"
    cell=$((cell + 1))
  done
  case $d in
    dom0) mx_refusal_cell "$d" "Dom0 must bounce" ;;
    domU-pv) mx_refusal_cell "$d" "pseudo-physical" ;;
  esac
  mx_auto_cells "$d" "$(mx_default_dma "$d")" "$cell"
done

# ---- figures: the bench per strategy in the DomU whose role allows all three ----
case $XV_ARCH in x86_64) bench=domU-pvh ;; *) bench=domU-arm ;; esac
case " $ready " in *" $bench "*) mx_bench_cells "$bench" grant bounce direct ;; esac

# ---- net: a NIC for each DomU on Dom0's bridge, every strategy its role allows ----
# Attach, serve, the strategy, ping both ways, the daemon's counters, detach. The TCP streams run
# in `e2e.sh --mode net` only until they pass on real Xen (docs/E2E.md, "virtio-net").
NET_STREAM=0
if net_bridge_cell; then
  for d in $ready; do
    net_cells "$d"
  done
fi

# ---- lifecycle ----
# One DomU exports NBD and then loses its device to detach and gets it back; another (or Dom0
# on arm64, which has a single DomU) keeps an export through a backend restart; a DomU is
# destroyed in the middle of I/O while the other export stays connected.
case $XV_ARCH in
  x86_64) lc_reattach=domU-pv lc_restart=domU-pvh lc_destroy=domU-pv lc_survivor=domU-pvh ;;
  *) lc_reattach=domU-arm lc_restart=domU-arm lc_destroy=domU-arm lc_survivor=dom0 ;;
esac
case " $ready " in *" $lc_reattach "*) ;; *) lc_reattach= ;; esac
case " $ready " in *" $lc_restart "*) ;; *) lc_restart= ;; esac
case " $ready " in *" $lc_destroy "*) ;; *) lc_destroy= ;; esac

# mx_serve_cell DOMAIN NAME: start `serve` for blk 0 in DOMAIN (check NAME).
mx_serve_cell() {
  local _out _rc
  _out=$(mx_in "$1" 150 "mx_probe_serve 0 $NBD")
  _rc=$?
  if [ $_rc = 0 ]; then
    mx_check "$1" "$2" PASS "xenvirtio-frontend serve --devid 0: $(echo "$_out" | tail -n 1 | xv_oneline)"
  else
    mx_check "$1" "$2" FAIL "rc=$_rc: $(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
  return $_rc
}

# NBD, then detach and attach again under the running export.
if [ -n "$lc_reattach" ] && mx_serve_cell "$lc_reattach" serve; then
  d=$lc_reattach
  mx_nbd_cell "$d" nbd "$NBD" 6
  out=$($MX_BE detach --domain "$(mx_domid "$d")" --devid 0 2>&1)
  rc=$?
  if xenstore-read "$(mx_bdir "$d" 0)/state" >/dev/null 2>&1; then gone="still there"; else gone=gone; fi
  if [ $rc = 0 ] && [ "$gone" = gone ] && [ -z "$(mx_device_json "$(mx_domid "$d")" 0)" ]; then
    xv_check_for "$d" detach PASS "with the export connected: $(echo "$out" | xv_oneline); backend directory gone, the daemon forgot the device"
  else
    xv_check_for "$d" detach FAIL "rc=$rc: $(echo "$out" | xv_oneline); backend directory $gone; daemon: $(mx_device_json "$(mx_domid "$d")" 0)"
  fi
  out=$($MX_BE attach --quiet --domain "$(mx_domid "$d")" --type blk --devid 0 --image "$(mx_image "$d")" 2>&1)
  rc=$?
  if [ $rc = 0 ]; then
    xv_check_for "$d" reattach PASS "devid $out attached again with the same image"
  else
    xv_check_for "$d" reattach FAIL "rc=$rc: $(echo "$out" | xv_oneline)"
  fi
  # The export's supervisor connects the new device; verify --nbd waits for it.
  mx_nbd_cell "$d" nbd-after-reattach "$NBD" 7
fi

# mx_restart_cell DOMAIN SIGNAL NAME CELL: while a verify --nbd of 8 MiB runs through DOMAIN's
# export (cells CELL and CELL+1), stop the daemon with SIGNAL (TERM: a restart, 8.3 then 8.5;
# KILL: a crash, the new daemon finds the device Connected, 8.5) and start a new one. The daemon
# is frozen (SIGSTOP) before the verify starts, so the verify's first requests are in flight in
# the ring, unanswered, when the signal comes: its I/O spans the restart whatever the speeds.
# (Pausing the verify through the command channel once its requests reached the daemon came
# about a second late, and on arm64 even a Dom0 poll of the daemon's counters did: the 8 MiB
# were done before the restart, and the `-connected` check failed, as it should.) The export
# reconnects by itself and the verify passes; the new daemon must have served it. Checks
# backend-NAME, NAME-verify, image-NAME-verify and NAME-connected.
mx_restart_cell() {
  local _d _sig _name _seed _len _off _domid _req _stopped _out _n _st _done
  _d=$1 _sig=$2 _name=$3
  _seed=$(($(mx_domid "$_d") + 9000 + $4))
  _len=$((2 * MX_CELL_BYTES))
  _off=$(($4 * MX_CELL_BYTES))
  _domid=$(mx_domid "$_d")
  _n=$(mx_in "$_d" 20 "grep -c 'connected again' /run/xv/serve.log")
  _req=$(mx_json_num requests "$(mx_device_json "$_domid" 0)")
  kill -STOP "$MX_BACKEND_PID" 2>/dev/null
  mx_in "$_d" 10 "($MX_FE verify --nbd $NBD --seed $_seed --offset $_off --length $_len >/run/xv/$_name-verify.out 2>&1; echo rc=\$? >>/run/xv/$_name-verify.out) </dev/null >/dev/null 2>&1 &" >/dev/null
  sleep 2 # the verify connects to the export and submits its first requests
  if [ "$_sig" = KILL ]; then
    kill -KILL "$MX_BACKEND_PID" 2>/dev/null
    wait "$MX_BACKEND_PID" 2>/dev/null
    _stopped="exit status $? (SIGKILL)"
  else
    mx_backend_stop # SIGTERM, then SIGCONT
    _stopped=$MX_BACKEND_STOPPED
  fi
  # With no daemon, the verify cannot have finished: it must still be waiting.
  _done=$(mx_in "$_d" 20 "grep -c '^rc=' /run/xv/$_name-verify.out")
  if ! mx_backend_start; then
    xv_check "backend-$_name" FAIL "old daemon: $_stopped; the new one did not start: $(tail -n 5 "$MX_BACKEND_LOG" | xv_oneline)"
  elif [ "$_done" != 0 ]; then
    xv_check "backend-$_name" FAIL "the verify in $_d was not waiting for the daemon at the restart: $(mx_in "$_d" 20 "cat /run/xv/$_name-verify.out" | tail -n 2 | xv_oneline)"
  else
    xv_check "backend-$_name" PASS "SIG$_sig to the frozen daemon while $_d's verify waited for it (${_req:-0} requests served before): the old daemon's $_stopped; the new daemon (pid $MX_BACKEND_PID) answers"
  fi
  _out=$(mx_in "$_d" 240 "end=\$((\$(xv_uptime) + 200)); while ! grep -q '^rc=' /run/xv/$_name-verify.out; do [ \$(xv_uptime) -lt \$end ] || break; sleep 0.5; done; cat /run/xv/$_name-verify.out; grep -c 'connected again' /run/xv/serve.log")
  _n=$(($(echo "$_out" | tail -n 1) - ${_n:-0}))
  if mx_line '^rc=0$' "$_out" >/dev/null && mx_line '^OK: ' "$_out" >/dev/null && [ "$_n" -ge 1 ]; then
    xv_check_for "$_d" "$_name-verify" PASS "a verify --nbd of 8 MiB spanning the SIG$_sig passed; the export reconnected $_n time(s); $(mx_line 'checked' "$_out" | sed 's/: expected.*//')"
  else
    xv_check_for "$_d" "$_name-verify" FAIL "reconnects=$_n: $(echo "$_out" | tail -n 4 | xv_oneline)"
  fi
  mx_image_cell "$_d" "image-$_name-verify" "$_seed" "$_off" "$_len"
  _st=$(mx_device_json "$_domid" 0)
  case "$_st" in
    *'"state":"Connected"'*'"requests":0,'* | *'"requests":0,'*'"state":"Connected"'*)
      xv_check_for "$_d" "$_name-connected" FAIL "the new daemon served none of the verify: ${_st:-none}" ;;
    *'"state":"Connected"'*)
      xv_check_for "$_d" "$_name-connected" PASS "the new daemon serves $_d's blk and did part of the verify: $(echo "$_st" | grep -o '"strategy":"[a-z]*","requests":[0-9]*')" ;;
    *) xv_check_for "$_d" "$_name-connected" FAIL "the new daemon's record of $_d blk 0: ${_st:-none}" ;;
  esac
}

# A backend restart while an export is connected and a verify runs through it.
if [ -n "$lc_restart" ]; then
  d=$lc_restart
  started=0
  if [ "$d" = "$lc_reattach" ]; then
    started=1 # its export is running
  elif mx_serve_cell "$d" serve; then
    started=1
  fi
  if [ $started = 1 ]; then
    mx_restart_cell "$d" TERM restart 8
    mx_restart_cell "$d" KILL crash 10
  fi
fi

# The guest kernel's own block device, in the DomU whose export survived the restarts: /dev/nbd0
# through the NBD netlink interface, a filesystem on it, a daemon restart under it.
case $XV_ARCH in x86_64) lc_kernel=domU-pvh ;; *) lc_kernel=domU-arm ;; esac
case " $ready " in *" $lc_kernel "*) kn_cells "$lc_kernel" ;; esac
# The same cells with the kernel's own virtio-blk driver on the device, through VDUSE, where
# the release's kernel has it (Debian 13).
if [ "$(xv_expect_vduse)" = available ]; then
  kn_use vduse
  case " $ready " in *" $lc_kernel "*) kn_cells "$lc_kernel" ;; esac
  kn_use nbd
fi

# mx_wait_entries DOMID WANT TIMEOUT: wait until the devids under the daemon's backend
# directory of DOMID are WANT (a space-separated list; empty: none); prints the last seen.
mx_wait_entries() {
  local _end _seen
  _end=$(($(xv_uptime) + $3))
  while :; do
    _seen=$(xenstore-list "/local/domain/0/backend/virtio/$1" 2>/dev/null | sort -n | tr '\n' ' ' | sed 's/ $//')
    [ "$_seen" = "$2" ] && break
    [ "$(xv_uptime)" -lt "$_end" ] || break
    sleep 0.3
  done
  echo "$_seen"
}

# The disk across a reboot of that DomU: the package's init script brings it up at boot and
# the fstab mounts it by label (knbd-lib.sh, kn_reboot_cell).
case " $ready " in *" $lc_kernel "*) kn_reboot_cell "$lc_kernel" ;; esac

# mx_follow_cells DOMAIN OLD_DOMID: DOMAIN was just destroyed. destroy-no-entry: the daemon
# removes its backend entries by itself. recreate-devices: `xl create -p` of the same config (a
# new domid, paused: nothing of it runs) gets devices 0-2 back, blk over the same image, with no
# command; recreate-destroy: destroyed again, it leaves no entry either.
mx_follow_cells() {
  local _d _old _t0 _seen _new _why _params
  _d=$1 _old=$2
  _t0=$(xv_uptime)
  _seen=$(mx_wait_entries "$_old" "" 30)
  if [ -z "$_seen" ]; then
    xv_check_for "$_d" destroy-no-entry PASS "xl destroy: the daemon removed the backend entries of domid $_old by itself in $(($(xv_uptime) - _t0))s"
  else
    xv_check_for "$_d" destroy-no-entry FAIL "30 s after xl destroy, domid $_old still has backend entries: devids $_seen"
  fi
  if ! _why=$(xl create -p "$XV_RUN/$_d.cfg" 2>&1); then
    xv_check_for "$_d" recreate-devices FAIL "xl create -p $_d again failed: $(echo "$_why" | grep -i -m 2 'error\|fail' | xv_oneline)"
    return
  fi
  _new=$(xv_domid "$_d")
  _t0=$(xv_uptime)
  _seen=$(mx_wait_entries "$_new" "0 1 2" 30)
  _params=$(xenstore-read "/local/domain/0/backend/virtio/$_new/0/params" 2>/dev/null)
  _why=
  [ "$_new" != "$_old" ] || _why="the new domain has the old domid $_old;"
  [ "$_seen" = "0 1 2" ] || _why="$_why 30 s after xl create, domid $_new has devids '$_seen', not 0 1 2;"
  [ "$_params" = "$(mx_image "$_d")" ] || _why="$_why its blk device's image is '$_params', not $(mx_image "$_d");"
  if [ -z "$_why" ]; then
    xv_check_for "$_d" recreate-devices PASS "xl create of $_d again (domid $_old -> $_new, paused): devices 0-2 back by name in $(($(xv_uptime) - _t0))s with no command, blk over $_params"
  else
    xv_check_for "$_d" recreate-devices FAIL "$_why"
  fi
  xl destroy "$_d" >/dev/null 2>&1
  _seen=$(mx_wait_entries "$_new" "" 30)
  if [ -z "$_seen" ] && [ "$(xv_domu_state "$_d")" = gone ]; then
    xv_check_for "$_d" recreate-destroy PASS "destroyed again: no entry of domid $_new is left"
  else
    xv_check_for "$_d" recreate-destroy FAIL "after xl destroy: domid $_new has devids '$_seen'; xl state $(xv_domu_state "$_d")"
  fi
}

# xl destroy in the middle of I/O: every mapping and binding of that domain goes, the other
# export keeps working.
if [ -n "$lc_destroy" ]; then
  d=$lc_destroy
  domid=$(mx_domid "$d")
  # The victim's export (if any) stops first, so that what the daemon holds is exactly the
  # other devices' share: the baseline.
  mx_stop_serve "$d"
  mx_wait_backend_state "$d" 0 2 30
  # The survivor keeps an export connected throughout.
  if [ "$lc_survivor" = dom0 ]; then
    mx_serve_cell dom0 serve
  fi
  sleep 1
  # shellcheck disable=SC2046 # three numbers
  set -- $(mx_process_counts)
  base_maps=$1 base_ports=$2 base_proc=$3
  # The victim's check lines so far, for the accounting at the end (it cannot answer later).
  mx_save_emitted "$d"
  mx_serve_cell "$d" serve-before-destroy
  mx_in "$d" 10 "$MX_FE verify --nbd $NBD --length $((24 * 1024 * 1024)) --offset 0 --seed 1 </dev/null >/run/xv/destroy-io.out 2>&1 &" >/dev/null
  running=0
  end=$(($(xv_uptime) + 60))
  while :; do
    req=$(mx_json_num requests "$(mx_device_json "$domid" 0)")
    if [ "${req:-0}" -gt 4 ]; then
      running=1
      break
    fi
    [ "$(xv_uptime)" -lt "$end" ] || break
    sleep 0.3
  done
  # shellcheck disable=SC2046 # three numbers
  set -- $(mx_process_counts)
  mid_maps=$1 mid_ports=$2 mid_proc=$3
  xl destroy "$d" >/dev/null 2>&1
  t0=$(xv_uptime)
  end=$((t0 + 30))
  while mx_stats_json | tr '{' '\n' | grep -q "^\"domid\":$domid,"; do
    [ "$(xv_uptime)" -lt "$end" ] || break
    sleep 0.3
  done
  gone_after=$(($(xv_uptime) - t0))
  left=$(mx_stats_json | tr '{' '\n' | grep -c "^\"domid\":$domid,")
  # shellcheck disable=SC2046 # three numbers
  set -- $(mx_process_counts)
  after_maps=$1 after_ports=$2 after_proc=$3
  why=
  [ "$running" = 1 ] || why="the victim's I/O never reached the backend (requests: ${req:-none});"
  [ "${mid_maps:-0}" -gt "${base_maps:-0}" ] || why="$why its connection added no mapping ($base_maps -> $mid_maps), so this proves nothing;"
  [ "$left" = 0 ] || why="$why $left device record(s) of domid $domid remain;"
  [ "$(xv_domu_state "$d")" = gone ] || why="$why xl still lists $d;"
  [ "$after_maps" = "$base_maps" ] || why="$why mappings: $base_maps held by the other devices, $after_maps after;"
  [ "$after_proc" = "$base_proc" ] || why="$why /proc/$MX_BACKEND_PID/maps: $base_proc lines before, $after_proc after;"
  [ "$after_ports" = "$base_ports" ] || why="$why event-channel ports: $base_ports before, $after_ports after;"
  if [ -z "$why" ]; then
    xv_check_for "$d" destroy-released PASS "xl destroy during a verify --nbd (${req} requests served): the daemon dropped the domain in ${gone_after}s; Xen mappings $base_maps (other devices) -> $mid_maps (with $d) -> $after_maps, /proc/$MX_BACKEND_PID/maps $base_proc -> $mid_proc -> $after_proc, ports $base_ports -> $mid_ports -> $after_ports"
  else
    xv_check_for "$d" destroy-released FAIL "$why"
  fi
  # Devices follow the domain (issue 16 item 2). With no command: the daemon removes the dead
  # domid's backend entries, and the same domain created again (a new domid, as a reboot
  # gives) gets its three devices back from the device book that attach wrote.
  mx_follow_cells "$d" "$domid"
  # The survivor's export still works.
  [ -z "$lc_survivor" ] || mx_nbd_cell "$lc_survivor" nbd-after-destroy "$NBD" 6
fi

# ---- the end: stop the daemon, account for every DomU check line ----
for n in $ready; do
  [ "$n" = "$lc_destroy" ] && continue
  mx_save_emitted "$n"
done
if [ "$lc_survivor" = dom0 ] && [ -f "$MX_RUN/serve.pid" ]; then
  kill "$(cat "$MX_RUN/serve.pid")" 2>/dev/null
  sleep 2
fi
for n in $created; do
  [ "$n" = "$lc_destroy" ] && continue
  xv_domu_destroy "$n"
done
sleep 1
mx_backend_stop
stopped=$MX_BACKEND_STOPPED
case $stopped in
  "exit status 0") xv_check backend-stop PASS "SIGTERM: the daemon $stopped" ;;
  *) xv_check backend-stop FAIL "SIGTERM: the daemon's $stopped" ;;
esac
bad=$(grep -E ' (ERROR|WARN) |panicked' "$MX_BACKEND_LOG" | grep -v -E 'the backend did not confirm|frontend domain died' | head -n 3 | cut -c1-200)
if [ -z "$bad" ]; then
  xv_check backend-log PASS "no ERROR, WARN or panic in $(grep -c . "$MX_BACKEND_LOG") lines of $MX_BACKEND_LOG"
else
  xv_check backend-log FAIL "$bad"
fi
xv_forward_stop
# shellcheck disable=SC2086 # a list of names
xv_check_delivered $ready
# On any failure, the daemon's log goes to the serial log (e2e.sh prints it).
if grep -q '^@@CHECK [^ ]* [^ ]* [^ ]* FAIL' "$XV_CHECKS"; then
  tail -n 150 "$MX_BACKEND_LOG" | cut -c1-400 | sed 's/^/[backend.log] /'
fi
exit 0
