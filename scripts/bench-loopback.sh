#!/usr/bin/env bash
# bench-loopback.sh: the no-Xen figures of scripts/bench.sh. The loopback pair
# (xenvirtio-loopback: backend and frontend in one process, no Xen) exports an image over NBD;
# Debian's fio reads it through the export (ioengine nbd, libnbd: one connection, QD requests
# in flight) and reads the image file itself with plain preadv (ioengine pvsync, QD jobs: the
# local bound), interleaved round by round in the same run, and prints the medians and one
# target line each:
#   target loopback-read-128k-qd16-vs-pread: <ratio> (goal 0.90) met|missed
#   target loopback-randread-4k-qd32-vs-pread: <ratio> (goal 0.70) met|missed
# Usage: scripts/bench-loopback.sh BIN ROUNDS SECONDS   (BIN: the xenvirtio-loopback to run)
set -euo pipefail
# xv_task_usage: the guest harness's own CPU and context-switch count of a process (functions
# and variables only: sourcing it here runs nothing)
# shellcheck source=xen-qemu/guest/xv-lib.sh
. "$(dirname "$0")/xen-qemu/guest/xv-lib.sh"
BIN=${1:?usage: bench-loopback.sh BIN ROUNDS SECONDS}
ROUNDS=${2:?} SECONDS_=${3:?}
DMA=${DMA:-bounce}
DIR=$(mktemp -d /tmp/xenvirtio-bench-loopback.XXXXXX)
pid=
cleanup() {
  [ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
  rm -rf "$DIR"
}
trap cleanup EXIT
IMG=$DIR/disk.img
# every byte written, so that reads find data rather than holes
dd if=/dev/urandom of="$IMG" bs=1M count=256 status=none
RUST_LOG=warn "$BIN" --image "$IMG" --nbd "$DIR/nbd.sock" --dma "$DMA" >"$DIR/loopback.out" 2>&1 &
pid=$!
for _ in $(seq 300); do
  grep -q '^ready' "$DIR/loopback.out" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
grep -q '^ready' "$DIR/loopback.out" || { echo "bench-loopback: the loopback pair did not start: $(tail -n 3 "$DIR/loopback.out")" >&2; exit 1; }
URI="nbd+unix:///xvda?socket=$DIR/nbd.sock"

# run WHERE RW BS QD: one fio run (reads), WHERE = export (one job, QD requests in flight on the
# NBD connection) or file (QD jobs, each a plain preadv loop over its own 256/QD MiB of the
# image: QD reads in flight). Appends to $DIR/WHERE one line: "<MiB/s> <requests> <fio's CPU
# ms> <the loopback process's CPU ticks> <its context switches>" (fio's CPU: its processes'
# user + system time, from bash's `time`; the loopback's from /proc over the same window).
run() {
  local eng out b a
  case $1 in
    export) eng=(--ioengine=nbd "--uri=$URI" --iodepth="$4" --size=256m) ;;
    file) eng=(--ioengine=pvsync "--filename=$IMG" --numjobs="$4" --group_reporting
      --size=$((256 / $4))m --offset_increment=$((256 / $4))m) ;;
  esac
  b=$(xv_task_usage "$pid")
  out=$( { time fio --name=lb "${eng[@]}" --rw="$2" --bs="$3" --runtime="$SECONDS_" --time_based --minimal 2>/dev/null; } 2>"$DIR/time")
  a=$(xv_task_usage "$pid")
  # terse v3: field 5 the error, 6 KiB read, 7 KiB/s
  printf '%s\n' "$out" | awk -F';' -v bs="${3%k}" -v t="$(cat "$DIR/time")" -v b="$b" -v a="$a" '
    NF > 7 && $5 == 0 { split(t, c, " "); split(b, x, " "); split(a, y, " ")
      printf "%.1f %d %.0f %d %d\n", $7 / 1024, $6 / bs, (c[1] + c[2]) * 1000, y[1] - x[1], y[2] - x[2] }' >>"$DIR/$1"
}
# median N: the median of column N of stdin.
median() { sort -n -k"$1" | awk -v n="$1" '{ v[NR] = $n } END { if (NR) printf "%.1f", v[int((NR + 1) / 2)] }'; }
# per_request: "<fio us> <loopback us> <loopback switches>" per request over every line of stdin.
per_request() {
  awk '{ r += $2; f += $3; l += $4; c += $5 }
    END { if (r) printf "%.1f %.1f %.2f", f * 1000 / r, l * 10000 / r, c / r; else print "- - -" }'
}
TIMEFORMAT='%3U %3S'
echo "no Xen: xenvirtio-loopback --dma $DMA's NBD export (fio ioengine nbd) against the image file itself (fio ioengine pvsync: preadv, one job per request in flight; page cache), $ROUNDS round(s) of ${SECONDS_}s"
for spec in "read 128k 16 0.90" "randread 4k 32 0.70"; do
  # shellcheck disable=SC2086 # the spec is words
  set -- $spec
  : >"$DIR/export" && : >"$DIR/file"
  for _ in $(seq "$ROUNDS"); do
    run file "$1" "$2" "$3"
    run export "$1" "$2" "$3"
  done
  f=$(median 1 <"$DIR/file") e=$(median 1 <"$DIR/export")
  ratio=$(awk -v e="${e:-0}" -v f="${f:-0}" 'BEGIN { if (e > 0 && f > 0) printf "%.2f", e / f; else print "-" }')
  met=$(awk -v r="$ratio" -v g="$4" 'BEGIN { print (r != "-" && r >= g) ? "met" : "missed" }')
  # shellcheck disable=SC2046 # three fields each
  set -- "$@" $(per_request <"$DIR/export") $(per_request <"$DIR/file")
  echo "  $1 $2 QD$3: export ${e:-failed} MiB/s, file ${f:-failed} MiB/s; CPU per request: export fio $5 us + loopback $6 us ($7 context switches), file fio $8 us"
  echo "target loopback-$1-$2-qd$3-vs-pread: $ratio (goal $4) $met"
done
