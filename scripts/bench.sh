#!/usr/bin/env bash
# bench.sh: xenvirtio's kernel disk side by side with Linux's blkfront/blkback on real Xen
# under QEMU, the same fio on the same kind of disk in the same boot (issue 14). See --help.
set -euo pipefail

usage() {
  cat <<'EOT'
Usage: scripts/bench.sh [--release bookworm|trixie|all] [--arch x86_64|arm64|all] [--quick]
                        [--help]

Boots real Xen under QEMU (scripts/e2e.sh --mode bench: the same packages, binaries and images
as the tests, plus Debian's fio) and, in one boot per release and arch, gives one DomU (x86_64:
the PVH DomU; arm64: the DomU) two disks, each backed by a RAM disk of Dom0 (brd, 128 MiB each):
  blkback    `xl block-attach DomU phy:/dev/ram0,xvdb,w`: Linux's blkfront and blkback;
  xv-<s>     `xenvirtio-backend attach --image /dev/ram1`, which `xenvirtio-frontend serve`
             gives to the DomU's kernel (VDUSE where the release's kernel has it, else NBD),
             once for each DMA strategy <s> the role allows.
Debian's fio runs 8 workloads with O_DIRECT (libaio) on each: sequential 128 KiB and random
4 KiB, read and write, at QD1 and QD32, and the same in Dom0 on the RAM disk itself (the local
bound, column "local"); the paths are interleaved round by round. It prints a table (median, min
and max MiB/s of the rounds), the counts per request (our daemon's map calls and notifications,
blkback's notifications), where the time goes (CPU microseconds per request of Dom0 and the
DomU as Xen accounts them, and of the processes that serve the disk, with their context
switches), then one line per target:
  target <name>: <measured> (goal <goal>) met|missed
A missed target is a result, not an error. No figure is asserted anywhere.
Last, without Xen, on this host (scripts/bench-loopback.sh): the loopback pair's NBD export
against the image file itself under the same fio, 128 KiB sequential reads at QD16 and 4 KiB
random reads at QD32, each with the CPU per request of fio and of the export, and its target
line.

  --release R   bookworm, trixie or all (default: all)
  --arch A      x86_64, arm64 or all (default: all)
  --quick       one round of 1 s runs (default: 3 rounds of 4 s), for CI: the script runs,
                every target line is printed, the figures mean little
  --help        this text

Exit status: 0 when every setup check of the boots passed and every boot printed all 17 of
its target lines, and the loopback its 2 (the figures and met/missed do not count), 1 otherwise, 2 on a usage, fetch
or build error. The environment of scripts/e2e.sh applies
(XENVIRTIO_E2E_WORK: work dir, default /tmp/xenvirtio-e2e). docs/PERFORMANCE.md has the figures
of a full run and what they mean.
EOT
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RELEASE=all
ARCH=all
QUICK=0
die() {
  echo "bench: error: $*" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case $1 in
    --release) [ $# -ge 2 ] || die "--release needs a value"; RELEASE=$2; shift 2 ;;
    --release=*) RELEASE=${1#--release=}; shift ;;
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#--arch=}; shift ;;
    --quick) QUICK=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
WORK=${XENVIRTIO_E2E_WORK:-/tmp/xenvirtio-e2e}
export XENVIRTIO_E2E_WORK=$WORK
words='' rounds=3 seconds=4
[ $QUICK = 0 ] || words=xvbench=quick rounds=1 seconds=1
start=$(date +%s)
rc=0
XENVIRTIO_E2E_DOM0_WORDS=$words "$ROOT/scripts/e2e.sh" --mode bench --release "$RELEASE" --arch "$ARCH" || rc=$?
[ $rc != 2 ] || exit 2

# The report of each boot: the @@BENCH lines of its serial log (e2e.sh names them).
# shellcheck source=xen-qemu/releases.sh
. "$ROOT/scripts/xen-qemu/releases.sh"
rels=$(release_words "$RELEASE")
case $ARCH in all) arches="x86_64 arm64" ;; amd64) arches=x86_64 ;; aarch64) arches=arm64 ;; *) arches=$ARCH ;; esac
echo
echo "bench: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?'), $(date -u +%FT%TZ), $([ $QUICK = 1 ] && echo "--quick" || echo "full") run"
missing=
for r in $rels; do
  for a in $arches; do
    log=$WORK/logs/$r-$a-bench.serial.log
    lines=$(grep -a -o '@@BENCH .*' "$log" 2>/dev/null | tr -d '\r' | sed 's/^@@BENCH //' || true)
    echo
    if [ -z "$lines" ]; then
      echo "bench: $r $a: no report in $log (the boot's checks above say why)"
      missing="$missing $r-$a"
      continue
    fi
    echo "$lines"
    # Every target of the boot must have its line: 8 workloads against blkback, then 3 per
    # strategy the role allows (all three in both DomUs measured here).
    n=$(grep -c '^target .*: .* (goal .*) \(met\|missed\)$' <<<"$lines" || true)
    if [ "$n" != 17 ]; then
      echo "bench: $r $a: $n target lines, want 17"
      missing="$missing $r-$a"
    fi
  done
done
# The no-Xen figures: the loopback pair on this host (its static binary, as e2e.sh built it).
echo
host=$(uname -m)
triple=$host-unknown-linux-musl
lbin=${CARGO_TARGET_DIR:-$ROOT/target}/$triple/release-static/xenvirtio-loopback
if ! (cd "$ROOT" && cargo build -q --profile release-static --target "$triple" --bin xenvirtio-loopback); then
  echo "bench: cannot build xenvirtio-loopback for $triple"
  missing="$missing loopback"
elif ! lb=$("$ROOT/scripts/bench-loopback.sh" "$lbin" "$rounds" "$seconds"); then
  echo "$lb"
  echo "bench: the loopback figures failed"
  missing="$missing loopback"
else
  echo "$lb"
  n=$(grep -c '^target loopback-.*: .* (goal .*) \(met\|missed\)$' <<<"$lb" || true)
  [ "$n" = 2 ] || { echo "bench: $n loopback target lines, want 2"; missing="$missing loopback"; }
fi
echo
echo "bench: done in $(($(date +%s) - start)) s${missing:+; no full report from:$missing}"
[ -z "$missing" ] || rc=1
exit $rc
