#!/bin/sh
# shellcheck shell=dash
# bench-dom0.sh: Dom0 side of `scripts/bench.sh` (`e2e.sh --mode bench`, issue 14). In one boot,
# one DomU (the PVH DomU on x86_64, the DomU on arm64) gets two disks backed alike by a RAM
# disk of Dom0 (brd, one per path, the same size):
#   blkback   /dev/ram0 through `xl block-attach` (Linux's blkfront -> blkback), /dev/xvdb;
#   xenvirtio /dev/ram1 through `xenvirtio-backend attach`, given to the DomU's kernel by
#             `xenvirtio-frontend serve` (VDUSE where the release's kernel has it, else NBD),
#             once for each DMA strategy the role allows.
# Debian's fio runs the same 8 workloads with O_DIRECT on each (sequential 128 KiB and random
# 4 KiB, read and write, at QD1 and QD32, libaio), and in Dom0 on the RAM disk itself (the
# local bound), interleaved round by round. Per request it counts what it can: our daemon's map
# calls and notifications (its stats), blkback's notifications (the two ends' /proc/interrupts).
# Besides check lines (the setup steps, and every fio run that failed) it prints the report as
# "@@BENCH <text>" lines, which bench.sh prints: the table, then one "target ..." line per target.
# Kernel cmdline: xvbench=quick for one round of 1 s runs (default: 3 rounds of 4 s).
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh
# shellcheck source=matrix-lib.sh
. /xv/tests/matrix-lib.sh
# shellcheck source=knbd-lib.sh
. /xv/tests/knbd-lib.sh

NBD=/run/xv/nbd.sock
BN=$XV_RUN/bench
mkdir -p "$BN" "$MX_IMAGES"
: >"$MX_BACKEND_LOG"
case $(xv_cmdline xvbench) in
  quick) BN_ROUNDS=1 BN_SECONDS=1 ;;
  *) BN_ROUNDS=3 BN_SECONDS=4 ;;
esac
BN_DISK_MB=128 # each RAM disk
BN_SPAN_MB=64  # the region fio works in
BN_WORKLOADS="read-128k-qd1 read-128k-qd32 write-128k-qd1 write-128k-qd32 randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32"
BN_XVDB=51728 # xvdb: 202 << 8 | 16, the vbd's devid in xenstore and sysfs
d=domU-$(echo "$XV_DOMUS" | cut -d' ' -f1)
bench() {
  echo "@@BENCH $*"
}

# bn_fio_cmd DEV WORKLOAD SECONDS: the fio command line of WORKLOAD on DEV, O_DIRECT, libaio,
# in the first BN_SPAN_MB MiB, for SECONDS, one terse (v3) line.
bn_fio_cmd() {
  local _rw _bs _qd
  _rw=${2%%-*} _bs=${2#*-}
  _bs=${_bs%-*} _qd=${2##*-qd}
  echo "fio --name=$2 --filename=$1 --direct=1 --ioengine=libaio --rw=$_rw --bs=$_bs --iodepth=$_qd --size=${BN_SPAN_MB}m --runtime=$3 --time_based --minimal"
}

# bn_fio_mibs TERSE WORKLOAD: MiB/s of fio's terse line (field 7: read KiB/s, 48: write KiB/s;
# field 5: fio's error), empty when fio failed.
bn_fio_mibs() {
  printf '%s\n' "$1" | grep '^3;' | tail -n 1 | awk -F';' -v w="$2" 'NF > 48 && $5 == 0 {
    k = (w ~ /^(rand)?write/) ? $48 : $7; if (k > 0) printf "%.2f", k / 1024 }'
}

# bn_run DOMAIN PATH DEV WORKLOAD ROUND: one fio run; its MiB/s appended to $BN/PATH.WORKLOAD.
# A failed run is a FAIL check line (bench-fio-PATH-WORKLOAD-rROUND).
bn_run() {
  local _out _m
  _out=$(mx_in "$1" $((BN_SECONDS + 90)) "$(bn_fio_cmd "$3" "$4" "$BN_SECONDS") 2>&1")
  _m=$(bn_fio_mibs "$_out" "$4")
  if [ -n "$_m" ]; then
    echo "$_m" >>"$BN/$2.$4"
  else
    mx_check "$1" "bench-fio-$2-$4-r$5" FAIL "fio on $3 in $1: $(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
}

# bn_irqs DOMAIN PATTERN: the interrupts counted so far on DOMAIN's IRQ lines whose name
# matches PATTERN (every CPU's column), from /proc/interrupts.
bn_irqs() {
  mx_in "$1" 20 "awk '/$2/ { for (i = 2; i <= NF; i++) if (\$i ~ /^[0-9]+\$/) s += \$i } END { print s + 0 }' /proc/interrupts"
}

# bn_domain_ms: "<Dom0's CPU ms> <the DomU's CPU ms>" so far, as Xen accounts them (`xl list`,
# the Time(s) column: every vCPU of the domain, to 0.1 s).
bn_domain_ms() {
  xl list | awk -v id="$DOMID" '$2 == 0 { a = $6 } $2 == id { b = $6 } END { printf "%d %d", a * 1000, b * 1000 }'
}

# bn_blkback_pids: the pids of blkback's kernel threads in Dom0 (one per ring, named
# blkback.<domid>.<vdev>-<ring>).
bn_blkback_pids() {
  grep -l '^Name:[[:space:]]*blkback\.' /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3
}

# bn_counts PATH: PATH's counts so far, ten fields: "<requests> <map calls> <notifications to
# the backend> <to the frontend> <Dom0 CPU ms> <DomU CPU ms> <server CPU ticks> <server
# context switches> <client CPU ticks> <client context switches>". The server is our daemon
# for xv-* (its stats give the first four) and blkback's kernel threads for blkback (sysfs and
# both ends' IRQ lines); the client is the DomU's `xenvirtio-frontend serve` for xv-*. What is
# not counted is "-": blkback's grant maps (nowhere), and blkfront, which has no process of its
# own (it runs in fio's context and in interrupts: the DomU's CPU counts it).
bn_counts() {
  local _j _s
  case $1 in
    blkback)
      _s=/sys/bus/xen-backend/devices/vbd-$DOMID-$BN_XVDB/statistics
      # shellcheck disable=SC2046 # a list of pids
      echo "$(($(cat "$_s/rd_req" 2>/dev/null || echo 0) + $(cat "$_s/wr_req" 2>/dev/null || echo 0))) - $(bn_irqs dom0 blkif-backend) $(bn_irqs "$d" 'blkif$') $(bn_domain_ms) $(xv_task_usage $(bn_blkback_pids)) - -"
      ;;
    *)
      _j=$(mx_device_json "$DOMID" 0)
      # shellcheck disable=SC2016 # expanded in the DomU
      echo "$(mx_json_num requests "$_j") $(mx_json_num map_calls "$_j") $(mx_json_num notifications_received "$_j") $(mx_json_num notifications_sent "$_j") $(bn_domain_ms) $(xv_task_usage "$MX_BACKEND_PID") $(mx_in "$d" 20 'xv_task_usage $(cat /run/xv/serve.pid)')"
      ;;
  esac
}

# bn_workloads DOMAIN PATH DEV ROUND: the 8 workloads on DEV; the counts of each run (after
# minus before, field by field; "-" stays "-") appended to $BN/PATH.counts.WORKLOAD.
bn_workloads() {
  local _w _b _a
  for _w in $BN_WORKLOADS; do
    [ "$2" = local ] || _b=$(bn_counts "$2")
    bn_run "$1" "$2" "$3" "$_w" "$4"
    [ "$2" = local ] && continue
    _a=$(bn_counts "$2")
    echo "$_b $_a" | awk '{ n = NF / 2; o = ""
      for (i = 1; i <= n; i++) o = o (i > 1 ? " " : "") (($i == "-" || $(i + n) == "-") ? "-" : $(i + n) - $i)
      print o }' >>"$BN/$2.counts.$_w"
  done
}

# bn_serve STRATEGY ROUND: serve blk 0 in the DomU with the kernel device and --dma STRATEGY
# (kn_serve_cell: check bench-kdisk-serve-STRATEGY-rROUND), then warm it up: 2 s of random
# 4 KiB writes over the span, which fill the persistent-grant and direct-map caches before
# anything is counted. Sets KN_DEV.
bn_serve() {
  KN_DMA=$1 KN_SUFFIX=-$1-r$2
  kn_serve_cell "$d" || return 1
  mx_in "$d" 120 "$(bn_fio_cmd "$KN_DEV" randwrite-4k-qd32 2)" >/dev/null
}

# ---- setup: the RAM disks, blkback, the daemon, the DomU, both disks ----
xv_check_cmd bench-fio fio --version
if modprobe brd rd_nr=2 rd_size=$((BN_DISK_MB * 1024)) && modprobe xen-blkback &&
  dd if=/dev/zero of=/dev/ram0 bs=1M count=$BN_DISK_MB 2>/dev/null &&
  dd if=/dev/zero of=/dev/ram1 bs=1M count=$BN_DISK_MB 2>/dev/null; then
  xv_check bench-ramdisks PASS "brd: /dev/ram0 and /dev/ram1, $(blockdev --getsize64 /dev/ram0) bytes each, every page written once; xen-blkback loaded"
else
  xv_check bench-ramdisks FAIL "modprobe brd / xen-blkback or the first write failed: $(dmesg | tail -n 2 | xv_oneline)"
fi
MX_ALLOW_DIRECT="--allow-direct $d"
if mx_backend_start; then
  xv_check backend-start PASS "xenvirtio-backend serve $MX_ALLOW_DIRECT (pid $MX_BACKEND_PID)"
else
  xv_check backend-start FAIL "$(tail -n 5 "$MX_BACKEND_LOG" | xv_oneline)"
fi
xv_forward_start
ready=
if out=$(xv_domu_create "$d"); then
  if xv_domu_wait_boot "$d" 300 && xv_agent_wait "$d" 120; then
    xv_check_for "$d" channel-ready PASS "agent ready in domid $(xv_domid "$d")"
    ready=$d
  else
    xv_check_for "$d" channel-ready FAIL "no agent in $d"
  fi
else
  xv_check_for "$d" boot FAIL "$out"
fi
DOMID=$(mx_domid "$d")

# blkfront <- blkback: the operator's `xl block-attach`, Xen's own hotplug script included.
bk_dev=
if [ -n "$ready" ]; then
  out=$(mx_in "$d" 30 "modprobe xen-blkfront" 2>&1)
  out="$out $(xl block-attach "$d" phy:/dev/ram0,xvdb,w 2>&1)"
  # shellcheck disable=SC2016 # expanded in the DomU
  size=$(mx_in "$d" 90 'i=0; while [ ! -b /dev/xvdb ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done; blockdev --getsize64 /dev/xvdb')
  persist="backend $(xenstore-read "/local/domain/0/backend/vbd/$DOMID/$BN_XVDB/feature-persistent" 2>&1), frontend $(xenstore-read "/local/domain/$DOMID/device/vbd/$BN_XVDB/feature-persistent" 2>&1)"
  if [ "$size" = $((BN_DISK_MB * 1024 * 1024)) ]; then
    bk_dev=/dev/xvdb
    xv_check_for "$d" bench-blkfront PASS "xl block-attach $d phy:/dev/ram0,xvdb,w: /dev/xvdb of $size bytes in $d; feature-persistent: $persist; rings $(xenstore-read "/local/domain/$DOMID/device/vbd/$BN_XVDB/multi-queue-num-queues" 2>/dev/null || echo 1)"
  else
    xv_check_for "$d" bench-blkfront FAIL "xl block-attach: '$(echo "$out" | xv_oneline)'; /dev/xvdb in $d: '$(echo "$size" | xv_oneline)'; xen-hotplug.log: $(tail -n 5 /var/log/xen/xen-hotplug.log 2>&1 | xv_oneline)"
  fi
fi

# xenvirtio: the same kind of disk, the DomU's kernel path of this release.
xv_ok=
if [ -n "$ready" ]; then
  out=$($MX_BE attach --quiet --domain "$DOMID" --type blk --devid 0 --image /dev/ram1 2>&1)
  if [ "$out" = 0 ]; then
    xv_ok=1
    xv_check_for "$d" bench-attach PASS "xenvirtio-backend attach --domain $DOMID --type blk --devid 0 --image /dev/ram1"
  else
    xv_check_for "$d" bench-attach FAIL "$(echo "$out" | xv_oneline)"
  fi
fi
case $(xv_expect_vduse) in
  available) kn_use vduse ;;
  *) kn_use nbd ;;
esac
KN_NAME=bench-kdisk
STRATS=$(mx_strategies "$d")
bench "$XV_RELEASE $XV_ARCH $d: Xen $XV_XEN_VERSION, Linux $XV_KVER; our disk through the kernel's $KN_PATH; $BN_ROUNDS round(s) of ${BN_SECONDS}s runs, O_DIRECT, libaio, in the first $BN_SPAN_MB MiB of $BN_DISK_MB MiB RAM disks"

# ---- the rounds: every path in each round, the same workloads in the same order ----
r=1
while [ "$r" -le "$BN_ROUNDS" ]; do
  bn_workloads dom0 local /dev/ram0 "$r"
  [ -z "$bk_dev" ] || bn_workloads "$d" blkback "$bk_dev" "$r"
  if [ -n "$xv_ok" ]; then
    for s in $STRATS; do
      if bn_serve "$s" "$r"; then
        bn_workloads "$d" "xv-$s" "$KN_DEV" "$r"
        mx_stop_serve "$d"
      fi
    done
  fi
  r=$((r + 1))
done

# ---- the report ----
# bn_median PATH WORKLOAD: "median min max" of PATH's MiB/s figures for WORKLOAD (empty: none).
bn_median() {
  [ -s "$BN/$1.$2" ] || return 0
  sort -n "$BN/$1.$2" | awk '{ v[NR] = $1 } END { printf "%.1f %.1f %.1f", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
# bn_per_request PATH WORKLOADS...: "maps to-backend to-frontend" per request over the runs of
# WORKLOADS ("-" where not counted).
bn_per_request() {
  local _p _w
  _p=$1
  shift
  for _w in "$@"; do cat "$BN/$_p.counts.$_w" 2>/dev/null; done | awk '
    { r += $1; if ($2 == "-") nm = 1; else m += $2; b += $3; f += $4 }
    END { if (r == 0) { print "- - -"; exit }
          printf "%s %.2f %.2f\n", nm ? "-" : sprintf("%.2f", m / r), b / r, f / r }'
}
paths="local${bk_dev:+ blkback}"
for s in $STRATS; do paths="$paths xv-$s"; done
hdr=$(printf '%-17s' workload)
for p in $paths; do hdr="$hdr$(printf ' %22s' "$p")"; done
bench ""
bench "MiB/s, median (min-max) of the rounds; xv-<strategy>: xenvirtio, each DMA strategy the role allows"
bench "$hdr $(printf '%8s' best/bk)"
for w in $BN_WORKLOADS; do
  row=$(printf '%-17s' "$w") best='' bk=''
  for p in $paths; do
    # shellcheck disable=SC2046 # three numbers, or none
    set -- $(bn_median "$p" "$w")
    row="$row$(printf ' %22s' "${1:-failed}${2:+ ($2-$3)}")"
    case $p in
      blkback) bk=$1 ;;
      xv-*) [ -z "$1" ] || best=$(echo "$1 ${best:-0}" | awk '{ print ($1 > $2) ? $1 : $2 }') ;;
    esac
  done
  ratio=$(echo "${best:-0} ${bk:-0}" | awk '{ if ($2 > 0 && $1 > 0) printf "%.2f", $1 / $2; else print "-" }')
  bench "$row $(printf '%8s' "$ratio")"
  eval "RATIO_$(echo "$w" | tr '-' '_')=$ratio"
done
bench ""
bench "per request (all workloads; QD32 only in brackets): map calls, notifications to the backend, to the frontend"
qd32=$(echo "$BN_WORKLOADS" | tr ' ' '\n' | grep qd32 | xargs)
for p in $paths; do
  [ "$p" = local ] && continue
  # shellcheck disable=SC2086,SC2046 # lists of workloads; six numbers
  set -- $(bn_per_request "$p" $BN_WORKLOADS) $(bn_per_request "$p" $qd32)
  bench "$(printf '%-10s maps %5s  to-backend %5s (%5s)  to-frontend %5s (%5s)' "$p" "$1" "$2" "$5" "$3" "$6")"
  eval "PR_$(echo "$p" | tr '-' '_')=\"$4 $5 $6\""
done
[ -z "$bk_dev" ] || bench "blkback: maps are not counted: neither Linux nor Xen exposes a count of blkback's grant maps (feature-persistent: $persist); its requests are sysfs rd_req + wr_req, its notifications the blkif IRQ lines of Dom0 and the DomU"

# Where the time goes: CPU per request in each domain as Xen accounts it, and in the processes
# that serve the disk. fio's own start in the DomU (through the command channel) is inside
# every run's window, alike for every path.
# bn_cpu_per_request PATH WORKLOAD: "dom0-us domU-us server-us server-csw client-us client-csw"
# per request over PATH's runs of WORKLOAD ("-" where not counted).
bn_cpu_per_request() {
  awk '{ r += $1; d0 += $5; du += $6
      if ($7 == "-") ns = 1; else { st += $7; sc += $8 }
      if ($9 == "-") nc = 1; else { ct += $9; cc += $10 } }
    END { if (r == 0) { print "- - - - - -"; exit }
      printf "%.0f %.0f %s %s\n", d0 * 1000 / r, du * 1000 / r,
        ns ? "- -" : sprintf("%.0f %.2f", st * 10000 / r, sc / r),
        nc ? "- -" : sprintf("%.0f %.2f", ct * 10000 / r, cc / r) }' "$BN/$1.counts.$2" 2>/dev/null || echo "- - - - - -"
}
bench ""
bench "CPU per request, microseconds, over the rounds: Dom0 and the DomU as Xen accounts them (xl list); the server (our daemon, or blkback's kernel threads) and the client (our DomU frontend; blkfront has no process of its own) from /proc, with their context switches per request"
bench "$(printf '%-10s %-17s %8s %8s %9s %7s %9s %7s' path workload dom0-us domU-us server-us csw client-us csw)"
for p in $paths; do
  [ "$p" = local ] && continue
  for w in $BN_WORKLOADS; do
    # shellcheck disable=SC2046 # six fields
    set -- $(bn_cpu_per_request "$p" "$w")
    bench "$(printf '%-10s %-17s %8s %8s %9s %7s %9s %7s' "$p" "$w" "$@")"
  done
done

# ---- the targets ----
# bn_target NAME MEASURED GOAL le|ge: one target line ("-": not measured, missed).
bn_target() {
  local _v
  _v=$(echo "$2 $3" | awk -v op="$4" '$1 == "-" { print "missed"; exit }
    { print ((op == "ge" && $1 >= $2) || (op == "le" && $1 <= $2)) ? "met" : "missed" }')
  bench "target $NAMEP-$1: $2 (goal $3) $_v"
}
NAMEP=$XV_RELEASE-$XV_ARCH-${d#domU-}
bench ""
for w in $BN_WORKLOADS; do
  eval "v=\$RATIO_$(echo "$w" | tr '-' '_')"
  bn_target "$w-vs-blkback" "${v:--}" 1.00 ge
done
for s in $STRATS; do
  eval "set -- \$PR_xv_$s"
  bn_target "maps-per-request-$s" "${1:--}" 0.00 le
  bn_target "qd32-notify-to-backend-$s" "${2:--}" 0.25 le
  bn_target "qd32-notify-to-frontend-$s" "${3:--}" 0.25 le
done

# ---- the end ----
[ -z "$bk_dev" ] || xl block-detach "$d" xvdb >/dev/null 2>&1
[ -z "$ready" ] || mx_save_emitted "$d"
xv_domu_destroy "$d"
sleep 1
mx_backend_stop
case $MX_BACKEND_STOPPED in
  "exit status 0") xv_check backend-stop PASS "SIGTERM: the daemon $MX_BACKEND_STOPPED" ;;
  *) xv_check backend-stop FAIL "SIGTERM: the daemon's $MX_BACKEND_STOPPED" ;;
esac
xv_forward_stop
# shellcheck disable=SC2086 # one name or none
xv_check_delivered $ready
if grep -q '^@@CHECK [^ ]* [^ ]* [^ ]* FAIL' "$XV_CHECKS"; then
  tail -n 100 "$MX_BACKEND_LOG" | cut -c1-400 | sed 's/^/[backend.log] /'
fi
exit 0
