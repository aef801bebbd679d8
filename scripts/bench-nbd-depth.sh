#!/bin/sh
# qemu-img bench, 4 KiB reads at depth 1 and 16, through the loopback pair's NBD export and on
# the local image file, interleaved in the same run; prints IOPS and the export/local ratio
# (median of ROUNDS rounds). qemu-img bench has no random mode: it reads 4 KiB steps in order.
# Usage: scripts/bench-nbd-depth.sh   (BIN, COUNT, ROUNDS, DMA may be set)
set -e
BIN=${BIN:-./target/release/xenvirtio-loopback}
COUNT=${COUNT:-20000}
ROUNDS=${ROUNDS:-3}
DMA=${DMA:-bounce}
DIR=$(mktemp -d /tmp/bench-nbd-depth.XXXXXX)
IMG=$DIR/disk.img
SOCK=$DIR/nbd.sock
OUT=$DIR/loopback.out
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$DIR"' EXIT
qemu-img create -q -f raw "$IMG" 256M
qemu-io -f raw -c 'write -P 0x5a 0 256M' "$IMG" >/dev/null
RUST_LOG=warn $BIN --image "$IMG" --nbd "$SOCK" --dma $DMA >"$OUT" 2>&1 &
pid=$!
until grep -q '^ready' "$OUT"; do sleep 0.1; done
URI="nbd+unix:///xvda?socket=$SOCK"

# Seconds of one run.
run() { # target depth
    qemu-img bench -f raw -c "$COUNT" -d "$2" -s 4k "$1" |
        sed -n 's/^Run completed in \(.*\) seconds./\1/p'
}
median() { sort -n | sed -n "$(((ROUNDS + 1) / 2))p"; }

for d in 1 16; do
    : >"$DIR/local" ; : >"$DIR/nbd"
    i=0
    while [ $i -lt "$ROUNDS" ]; do
        run "$IMG" $d >>"$DIR/local"
        run "$URI" $d >>"$DIR/nbd"
        i=$((i + 1))
    done
    l=$(median <"$DIR/local")
    n=$(median <"$DIR/nbd")
    awk -v d=$d -v l="$l" -v n="$n" -v c="$COUNT" 'BEGIN {
        printf "-d %-2s  local %8.0f IOPS  export %8.0f IOPS  export/local %.2f\n",
            d, c / l, c / n, l / n }'
done
