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

# mibs WHERE RW BS QD: MiB/s of one fio run (reads), WHERE = export (one job, QD requests in
# flight on the NBD connection) or file (QD jobs, each a plain preadv loop over its own 256/QD
# MiB of the image: QD reads in flight).
mibs() {
  local eng
  case $1 in
    export) eng=(--ioengine=nbd "--uri=$URI" --iodepth="$4" --size=256m) ;;
    file) eng=(--ioengine=pvsync "--filename=$IMG" --numjobs="$4" --group_reporting
      --size=$((256 / $4))m --offset_increment=$((256 / $4))m) ;;
  esac
  fio --name=lb "${eng[@]}" --rw="$2" --bs="$3" --runtime="$SECONDS_" --time_based --minimal 2>/dev/null |
    awk -F';' 'NF > 7 && $5 == 0 { printf "%.1f\n", $7 / 1024 }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR) printf "%.1f", v[int((NR + 1) / 2)] }'; }
echo "no Xen: xenvirtio-loopback --dma $DMA's NBD export (fio ioengine nbd) against the image file itself (fio ioengine pvsync: preadv, one job per request in flight; page cache), $ROUNDS round(s) of ${SECONDS_}s"
for spec in "read 128k 16 0.90" "randread 4k 32 0.70"; do
  # shellcheck disable=SC2086 # the spec is words
  set -- $spec
  : >"$DIR/export" && : >"$DIR/file"
  for _ in $(seq "$ROUNDS"); do
    mibs file "$1" "$2" "$3" >>"$DIR/file"
    mibs export "$1" "$2" "$3" >>"$DIR/export"
  done
  f=$(median <"$DIR/file") e=$(median <"$DIR/export")
  ratio=$(awk -v e="${e:-0}" -v f="${f:-0}" 'BEGIN { if (e > 0 && f > 0) printf "%.2f", e / f; else print "-" }')
  met=$(awk -v r="$ratio" -v g="$4" 'BEGIN { print (r != "-" && r >= g) ? "met" : "missed" }')
  echo "  $1 $2 QD$3: export ${e:-failed} MiB/s, file ${f:-failed} MiB/s"
  echo "target loopback-$1-$2-qd$3-vs-pread: $ratio (goal $4) $met"
done
