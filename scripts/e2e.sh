#!/usr/bin/env bash
# e2e.sh: xenvirtio end to end on real Xen under QEMU TCG: Debian 12 (Xen 4.17, Linux 6.1) and
# Debian 13 (Xen 4.20, Linux 6.12).
# See `scripts/e2e.sh --help` and docs/E2E.md. Written from the reference recipe in
# shared/xen-qemu (boots, pitfalls and package lists); nothing here needs that directory.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/e2e.sh [--release bookworm|trixie|all] [--arch x86_64|arm64|all] [--smoke]
                      [--keep] [--boot-loop N] [--help]

Boots real Xen under QEMU (software emulation, no KVM needed) and checks the project in it:
  x86_64: Dom0 (PV) + a PV DomU + a PVH DomU     arm64: Dom0 + a DomU
on each Debian release: bookworm (Debian 12: Xen 4.17, Linux 6.1) and trixie (Debian 13: Xen
4.20, Linux 6.12). For each release and arch it fetches Debian's packages (cached, with a
private apt configuration: the host's apt is not touched), builds every xenvirtio-* binary as a
static musl executable (once per arch), carries them into every domain, boots, and runs the
checks of the mode.

By default it runs the full matrix (issue 6): the backend daemon in Dom0, frontends in Dom0
and in every DomU, blk, console and rng with every DMA strategy each role allows, the role's
default strategy, and the lifecycle (NBD export, detach and attach, backend restart, xl destroy
in the middle of I/O). docs/E2E.md lists every check.

  --release R
             bookworm, trixie, or all (default: all; the releases boot one after the other)
  --arch A   x86_64, arm64 or all (default: all; the arches boot one after the other)
  --smoke    the smoke checks (issue 3) instead of the matrix
  --keep     keep the initramfs staging trees and archive this run's logs in WORK/runs/
  --mode M   run the test scripts of mode M (tests/M-dom0.sh, tests/M-domU.sh): for
             developing a new mode (scripts/demo.sh runs --mode demo; --mode net runs
             the virtio-net cells alone, with their TCP streams)
  --domus L  boot only these DomUs: a '+'-separated list of pv, pvh (x86_64) or arm (arm64)
  --boot-loop N
             a measurement instead of the checks: boot the DomUs (all of them together, or
             --domus) N times in one Xen boot and count how each boot ended (booted, triple
             fault, other): the emulator fault rate of docs/E2E.md
  --induce-fault before-checks|after-checks
             the harness's own test of its emulator-fault handling (x86_64, --smoke, needs
             domU-pvh): the PVH DomU boots a kernel that triple-faults on purpose, before its
             checks (on the first attempt only: the run must retry and pass) or after them (the
             run must fail, without a retry)
  --help     this text

Emulator faults: under QEMU's software CPU an x86 PVH DomU's kernel sometimes triple-faults while
it boots, before anything of the project's runs in it. When a DomU triple-faulted before it
reported any check, the boot is an infrastructure fault, not a test result: the arch boots again,
at most 3 attempts in all, with a line "RETRY <arch> boot: <why> (attempt N of 3)"; only the last
attempt's checks count. A fault after a DomU reported a check fails the run as any other failure.

Output: one line per check, "PASS|FAIL <release> <arch> <domain> <check>: <detail>" (release
"all" for the host's checks that hold for every release), then "e2e: N passed, M failed". Each
boot starts with a line naming the release, Xen's and the kernel's versions. Logs and results
stay in the work dir (paths are printed).
Exit status: 0 only if every check passed and every domain booted; 1 if a check failed;
2 on a usage, fetch or build error. docs/E2E.md describes the check lines, the command
channel and how to add checks.

Environment:
  XENVIRTIO_E2E_WORK      work dir: package cache, images, logs (default /tmp/xenvirtio-e2e)
  XENVIRTIO_E2E_TIMEOUT   seconds one arch's QEMU may run (default 600 for --smoke, 1500 for
                          the matrix, 3000 for --mode bench)
  CARGO_TARGET_DIR        honoured; CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER defaults to
                          aarch64-linux-gnu-gcc
  XENVIRTIO_E2E_X86_CPU   QEMU -cpu for x86_64 (default max,-smap,-smep,-xsave; see docs/E2E.md)
  XENVIRTIO_E2E_QEMU_X86  the qemu-system-x86_64 to run (default: the one on PATH)
  XENVIRTIO_E2E_X86_ACCEL QEMU -accel for x86_64 (default tcg; docs/E2E.md, "Emulator faults")
  XENVIRTIO_E2E_XEN_ARGS  appended to Xen's x86_64 command line (debugging)
  XENVIRTIO_E2E_DOM0_WORDS
                          appended to Dom0's kernel command line, for the mode's test script
                          (scripts/bench.sh passes xvbench=quick); no commas
Host tools: scripts/install-deps.sh installs them.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
XQ=$ROOT/scripts/xen-qemu
WORK=${XENVIRTIO_E2E_WORK:-/tmp/xenvirtio-e2e}
TIMEOUT=${XENVIRTIO_E2E_TIMEOUT:-}
ARCH_OPT=all
RELEASE_OPT=all
SMOKE=0
KEEP=0
MODE_OPT=
DOMUS_OPT=
LOOPS=
INDUCE=
MAX_ATTEMPTS=3

die() {
  echo "e2e: error: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case $1 in
    --arch) [ $# -ge 2 ] || die "--arch needs a value"; ARCH_OPT=$2; shift 2 ;;
    --arch=*) ARCH_OPT=${1#--arch=}; shift ;;
    --release) [ $# -ge 2 ] || die "--release needs a value"; RELEASE_OPT=$2; shift 2 ;;
    --release=*) RELEASE_OPT=${1#--release=}; shift ;;
    --smoke) SMOKE=1; shift ;;
    --keep) KEEP=1; shift ;;
    --mode) [ $# -ge 2 ] || die "--mode needs a value"; MODE_OPT=$2; shift 2 ;;
    --domus) [ $# -ge 2 ] || die "--domus needs a value"; DOMUS_OPT=$2; shift 2 ;;
    --boot-loop) [ $# -ge 2 ] || die "--boot-loop needs a number"; LOOPS=$2; shift 2 ;;
    --induce-fault) [ $# -ge 2 ] || die "--induce-fault needs a value"; INDUCE=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
case $ARCH_OPT in
  all) ARCHES=(x86_64 arm64) ;;
  x86_64 | arm64) ARCHES=("$ARCH_OPT") ;;
  amd64) ARCHES=(x86_64) ;;
  aarch64) ARCHES=(arm64) ;;
  *) die "--arch must be x86_64, arm64 or all (got '$ARCH_OPT')" ;;
esac
# shellcheck source=xen-qemu/releases.sh
. "$XQ/releases.sh"
rels=$(release_words "$RELEASE_OPT") ||
  die "--release must be ${XV_RELEASES// /, } or all (got '$RELEASE_OPT')"
read -r -a RELEASES <<<"$rels"
REL=all
MODE=matrix
[ $SMOKE = 0 ] || MODE=smoke
if [ -n "$MODE_OPT" ]; then
  [ -f "$XQ/tests/$MODE_OPT-dom0.sh" ] || die "no test script scripts/xen-qemu/tests/$MODE_OPT-dom0.sh"
  MODE=$MODE_OPT
fi
if [ -n "$LOOPS" ]; then
  [[ $LOOPS =~ ^[1-9][0-9]*$ ]] || die "--boot-loop needs a number of rounds (got '$LOOPS')"
  MODE=bootloop
fi
case $INDUCE in
  '') ;;
  before-checks | after-checks)
    [ "$MODE" = smoke ] || die "--induce-fault needs --smoke"
    [ "${ARCHES[*]}" = x86_64 ] || die "--induce-fault needs --arch x86_64"
    [[ "+${DOMUS_OPT:-pv+pvh}+" == *+pvh+* ]] || die "--induce-fault needs the PVH DomU (--domus)"
    ;;
  *) die "--induce-fault must be before-checks or after-checks (got '$INDUCE')" ;;
esac
# The matrix runs a few hundred frontend commands under TCG: give it room on a loaded machine.
[ -n "$TIMEOUT" ] || case $MODE in
  smoke) TIMEOUT=600 ;;
  bootloop) TIMEOUT=$((180 + LOOPS * 60)) ;;
  bench) TIMEOUT=3000 ;;
  *) TIMEOUT=1500 ;;
esac
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "XENVIRTIO_E2E_TIMEOUT must be a number of seconds"

# ---- per-arch facts ----
debarch() { case $1 in x86_64) echo amd64 ;; arm64) echo arm64 ;; esac; }
triple() { case $1 in x86_64) echo x86_64-unknown-linux-musl ;; arm64) echo aarch64-unknown-linux-musl ;; esac; }
file_arch() { case $1 in x86_64) echo x86-64 ;; arm64) echo "ARM aarch64" ;; esac; }
# The DomUs to boot (Dom0 cmdline xvdomus=, '+'-separated: no commas on a multiboot cmdline) and
# every domain that must report "boot".
# The bench (scripts/bench.sh) measures the DomU whose role allows every strategy.
all_domus() {
  case $MODE:$1 in
    bench:x86_64) echo pvh ;;
    *:x86_64) echo pv+pvh ;;
    *:arm64) echo arm ;;
  esac
}
domus_word() { echo "${DOMUS_OPT:-$(all_domus "$1")}"; }
# (A boot loop forwards no DomU console: only Dom0 reports, the boots are counted in @@BOOTLOOP lines.)
domains() {
  if [ "$MODE" = bootloop ]; then echo dom0; return; fi
  echo "dom0 $(domus_word "$1" | tr '+' '\n' | sed 's/^/domU-/' | paste -sd' ')"
}

if [ -n "$DOMUS_OPT" ]; then
  for a in "${ARCHES[@]}"; do
    for t in ${DOMUS_OPT//+/ }; do
      [[ "+$(all_domus "$a")+" == *"+$t+"* ]] || die "--domus: $a has no DomU '$t' (it has $(all_domus "$a"))"
    done
  done
fi

# ---- preflight ----
missing=()
need=(cpio depmod gzip xz perl python3 readelf file apt-get dpkg cargo timeout flock)
for a in "${ARCHES[@]}"; do
  case $a in
    x86_64) need+=("${XENVIRTIO_E2E_QEMU_X86:-qemu-system-x86_64}" as ld) ;;
    arm64) need+=(qemu-system-aarch64 fdtput "${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER:-aarch64-linux-gnu-gcc}") ;;
  esac
done
for c in "${need[@]}"; do
  command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
[ ${#missing[@]} = 0 ] || die "missing host tools: ${missing[*]} (run scripts/install-deps.sh)"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER:-aarch64-linux-gnu-gcc}

mkdir -p "$WORK/logs"
exec 9>"$WORK/.lock"
flock -n 9 || die "another e2e run is using $WORK (set XENVIRTIO_E2E_WORK to run in parallel)"
RESULTS=$WORK/results.txt
: >"$RESULTS"
RUN_START=$(date +%s)
declare -A PHASE_S=()

phase_start() { PHASE_T0=$(date +%s); }
phase_end() { PHASE_S[$1]=$(($(date +%s) - PHASE_T0)); }

# ---- check lines ----
PASSED=0
FAILED=0
# report LINE: print one "@@CHECK <arch> <domain> <name> PASS|FAIL [detail]" line for people, and
# record it in RESULTS as "<release> LINE" (REL: the release being booted, or "all").
report() {
  local line=$1 arch dom name st detail
  read -r _ arch dom name st detail <<<"$line"
  echo "$REL $line" >>"$RESULTS"
  if [ "$st" = PASS ]; then
    PASSED=$((PASSED + 1))
  else
    FAILED=$((FAILED + 1))
    st=FAIL
  fi
  printf '%s %-8s %-6s %-8s %-18s %s\n' "$st" "$REL" "$arch" "$dom" "$name:" "$detail"
}
# host_check ARCH NAME PASS|FAIL DETAIL: a check made by this script (domain "host").
host_check() {
  report "@@CHECK $1 host $2 $3 $4"
}
# host_check_for ARCH DOMAIN NAME PASS|FAIL DETAIL: a check this script makes on a domain's behalf.
host_check_for() {
  report "@@CHECK $1 $2 $3 $4 $5"
}
# show_tail FILE [N]: the last N lines of FILE, indented, for a FAIL that needs context.
show_tail() {
  echo "       --- last ${2:-25} lines of $1"
  { tail -n "${2:-25}" "$1" 2>&1 || true; } | tr -d '\r' | cut -c1-200 | sed 's/^/       | /'
}

# ---- 1. Debian packages (cached) ----
phase_start
# debs REL ARCH: the package cache of one release and arch.
debs() { echo "$WORK/debs-$1-$(debarch "$2")"; }
# The guest tools of the bench (fio; bash and flock for Xen's block hotplug script), with their
# libraries, into a cache of their own.
tools() { echo "$WORK/tools-$1-$(debarch "$2")"; }
for r in "${RELEASES[@]}"; do
  for a in "${ARCHES[@]}"; do
    "$XQ/fetch-debs.sh" "$r" "$(debarch "$a")" "$(debs "$r" "$a")" ||
      die "fetching the $r $(debarch "$a") packages failed"
    [ "$MODE" != bench ] || "$XQ/fetch-tools.sh" "$r" "$(debarch "$a")" "$(tools "$r" "$a")" fio bash util-linux ||
      die "fetching the $r $(debarch "$a") guest tools failed"
  done
done
phase_end fetch

# ---- the harness's own shell library, under the guests' busybox when it runs here ----
bb=
for f in "$(debs "${RELEASES[0]}" x86_64)"/stage/{,usr/}bin/busybox; do
  [ -x "$f" ] && "$f" true 2>/dev/null && bb=$f && break
done
if out=$("$XQ/test-lib.sh" "$bb" 2>&1); then
  host_check host harness-lib PASS "$(tail -n 1 <<<"$out") (scripts/xen-qemu/test-lib.sh${bb:+ under busybox sh})"
else
  host_check host harness-lib FAIL "$(grep -m 3 FAIL <<<"$out" | tr '\n' ' ')"
fi
if out=$("$XQ/test-boot-fault.sh" 2>&1); then
  host_check host harness-boot-fault PASS "$(tail -n 1 <<<"$out") (scripts/xen-qemu/test-boot-fault.sh: which faults are retried)"
else
  host_check host harness-boot-fault FAIL "$(grep -m 3 FAIL <<<"$out" | tr '\n' ' ')"
fi

# ---- 2. the project's binaries, static musl ----
# build_bins ARCH: build every binary of the workspace for ARCH and copy the xenvirtio-* ones to
# WORK/ARCH/bin. The list comes from cargo's own artifact messages, so new binaries are picked
# up and stale files in the target dir are not.
build_bins() {
  local a=$1 t json blog exe bins=() f desc bad=
  t=$(triple "$a")
  json=$WORK/logs/cargo-$a.json
  blog=$WORK/logs/cargo-$a.log
  echo "e2e: cargo build --profile release-static --target $t --bins --workspace"
  if ! (cd "$ROOT" && cargo build --profile release-static --target "$t" --bins --workspace \
    --message-format=json-render-diagnostics >"$json" 2>"$blog"); then
    tail -n 30 "$blog" >&2
    die "cargo build for $t failed (full log: $blog)"
  fi
  mapfile -t bins < <(python3 -c '
import json, os, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") == "compiler-artifact" and exe and os.path.basename(exe).startswith("xenvirtio-"):
        print(exe)' "$json")
  [ ${#bins[@]} -gt 0 ] || die "cargo built no xenvirtio-* binary for $t"
  rm -rf "${WORK:?}/$a/bin"
  mkdir -p "$WORK/$a/bin"
  desc=
  for exe in "${bins[@]}"; do
    cp "$exe" "$WORK/$a/bin/"
    f=$(file -b "$exe")
    if [[ $f == *"$(file_arch "$a")"* ]] && [[ $f == *"statically linked"* || $f == *"static-pie linked"* ]]; then
      desc="$desc $(basename "$exe")"
    else
      bad="$bad $(basename "$exe") ($f)"
    fi
  done
  if [ -z "$bad" ]; then
    host_check "$a" static-binaries PASS "static $(file_arch "$a"):$desc"
  else
    host_check "$a" static-binaries FAIL "not static or not $(file_arch "$a"):$bad"
  fi
  # The images install the package, so the package itself is what the checks test.
  rm -f "$WORK/$a"/xenvirtio_*.deb
  if deb=$("$ROOT/scripts/build-deb.sh" "$a" "$WORK/$a/bin" "$WORK/$a" 2>&1); then
    host_check "$a" package PASS "$(basename "$deb"): $(dpkg-deb -c "$deb" | grep -c -v '/$') files (scripts/build-deb.sh)"
  else
    host_check "$a" package FAIL "scripts/build-deb.sh: $(tail -n 2 <<<"$deb" | tr '\n' ' ')"
    die "the $a package could not be built"
  fi
}
phase_start
for a in "${ARCHES[@]}"; do build_bins "$a"; done
phase_end build

# ---- 3. initramfs ----
# images REL ARCH: the images of one release and arch (dom0.cpio, ...).
images() { echo "$WORK/$1/$2"; }
phase_start
for r in "${RELEASES[@]}"; do
  for a in "${ARCHES[@]}"; do
    ilog=$WORK/logs/initrd-$r-$a.log
    targs=()
    [ "$MODE" != bench ] || targs=("$(tools "$r" "$a")")
    "$XQ/build-initrd.sh" "$a" "$(debs "$r" "$a")" "$(images "$r" "$a")" "$(ls "$WORK/$a"/xenvirtio_*.deb)" \
      "${targs[@]}" >"$ilog" 2>&1 ||
      { tail -n 20 "$ilog" >&2; die "building the $r $a initramfs failed (log: $ilog)"; }
    echo "$r: $(tail -n 1 "$ilog")"
    [ $KEEP = 1 ] || rm -rf "$(images "$r" "$a")/initrd-dom0" "$(images "$r" "$a")/initrd-domU"
  done
done
phase_end initrd

# ---- 4. boot and collect, one arch after the other ----
# Patterns that mean a kernel or Xen went down (in Dom0, or in a DomU through the forwarder).
# "Segmentation fault" is busybox sh reporting a process killed by SIGSEGV: the harness's own
# tools must never crash (this is how the XSAVE problem of boot.sh showed up).
# A triple fault of an HVM/PVH guest is Xen's "d<N>v<M> Triple fault" line.
CRASH_RE='Kernel panic|Oops:|BUG: |general protection fault|Segmentation fault|\(XEN\) Panic on CPU|\(XEN\) FATAL|\(XEN\) Xen BUG|domain_crash|Triple fault'

# collect ARCH LOG QEMU_RC: turn one arch's serial log into check lines.
collect() {
  local a=$1 log=$2 qrc=$3 raw n_guest=0 bad summary s_checks s_failed dups crash d
  raw=$WORK/logs/$REL-$a$LOG_SUFFIX.checks
  [ -f "$log" ] || echo "(boot.sh wrote no log)" >"$log"
  # A check line starts at "@@CHECK"; what precedes it (timestamps, "[domU-pv] ") is dropped.
  grep -a -o '@@CHECK .*' "$log" | tr -d '\r' >"$raw.all" || true
  grep -E "^@@CHECK $a [^ ]+ [^ ]+ (PASS|FAIL)( |$)" "$raw.all" >"$raw" || true
  bad=$(grep -vcE "^@@CHECK $a [^ ]+ [^ ]+ (PASS|FAIL)( |$)" "$raw.all" || true)
  n_guest=$(grep -c . "$raw" || true)
  # Shown grouped by domain, in the order of domains(), each in the order it was emitted.
  for d in $(domains "$a"); do
    grep "^@@CHECK $a $d " "$raw" || true
  done >"$raw.sorted"
  grep -v -E "^@@CHECK $a ($(domains "$a" | tr ' ' '|')) " "$raw" >>"$raw.sorted" || true
  while IFS= read -r line; do report "$line"; done <"$raw.sorted"
  rm -f "$raw.all" "$raw.sorted"

  case $qrc in
    0) host_check "$a" qemu PASS "Xen powered off cleanly after $(($(date +%s) - BOOT_T0))s$ATTEMPT_NOTE" ;;
    124) host_check "$a" qemu FAIL "timed out after ${TIMEOUT}s (XENVIRTIO_E2E_TIMEOUT); log: $log"
      show_tail "$log" ;;
    *) host_check "$a" qemu FAIL "QEMU exited $qrc; log: $log"
      show_tail "$log" ;;
  esac

  crash=$(grep -a -m 3 -E "$CRASH_RE" "$log" | tr -d '\r' | cut -c1-160 | tr '\n' '|' || true)
  if [ -z "$crash" ]; then
    host_check "$a" no-crash PASS "no panic, oops, segfault or Xen crash in the serial log"
  else
    host_check "$a" no-crash FAIL "$crash log: $log"
    grep -a -m 1 -B 5 -A 20 -E "$CRASH_RE" "$log" | tr -d '\r' | cut -c1-200 | sed 's/^/       | /'
  fi

  # Every domain must have reported "boot". One that never did is a FAIL, never a skip.
  for d in $(domains "$a"); do
    if ! grep -q "^@@CHECK $a $d boot " "$raw"; then
      host_check_for "$a" "$d" boot FAIL "no boot report from $d on the serial log; log: $log"
      # the tail was shown already when QEMU failed
      [ "$d" != dom0 ] || [ "$qrc" != 0 ] || show_tail "$log"
    fi
  done

  # Dom0 counted every line it emitted or forwarded; the host must have parsed as many.
  summary=$(grep -a -o "@@SUMMARY $a checks=[0-9]* failed=[0-9]*" "$log" | tail -n1 || true)
  if [ -z "$summary" ]; then
    host_check "$a" summary FAIL "Dom0 never printed @@SUMMARY: its test script did not finish; log: $log"
  else
    s_checks=${summary#*checks=}
    s_checks=${s_checks%% *}
    s_failed=${summary#*failed=}
    if [ "$s_checks" = "$n_guest" ] && [ "$bad" = 0 ]; then
      host_check "$a" summary PASS "Dom0 counted $s_checks check lines ($s_failed failed), all parsed here"
    else
      host_check "$a" summary FAIL "Dom0 counted $s_checks check lines, the serial log gave $n_guest well-formed and $bad garbled ones; log: $log"
    fi
  fi

  dups=$(cut -d' ' -f2-4 "$raw" | sort | uniq -d | tr '\n' ' ')
  if [ -n "$dups" ]; then
    host_check "$a" unique-checks FAIL "check names reported twice: $dups"
  fi

  # A test script that ran the backend daemon prints its log on failure: show it here.
  if grep -q "^@@CHECK $a [^ ]* [^ ]* FAIL" "$raw" && grep -a -q '\[backend.log\] ' "$log"; then
    echo "       --- the backend daemon's log (last lines; all of it is in $log)"
    grep -a -o '\[backend.log\] .*' "$log" | tail -n 60 | tr -d '\r' | cut -c1-200 | sed 's/^\[backend.log\] /       | /'
  fi
}

# boot_attempt ARCH LOG ATTEMPT: one boot of ARCH; sets qrc.
boot_attempt() {
  local a=$1 log=$2 n=$3 words
  # Dom0 stops its test script a minute before QEMU is killed, so that it still reports.
  words="xvmode=$MODE xvdomus=$(domus_word "$a") xvtimeout=$((TIMEOUT > 120 ? TIMEOUT - 60 : TIMEOUT * 3 / 4))"
  words="$words xvattempt=$n/$MAX_ATTEMPTS${LOOPS:+ xvloops=$LOOPS}${XENVIRTIO_E2E_DOM0_WORDS:+ $XENVIRTIO_E2E_DOM0_WORDS}"
  # An induced fault before the checks happens on the first attempt only: the retry must pass.
  case $INDUCE in
    before-checks) [ "$n" != 1 ] || words="$words xvinduce=before-checks" ;;
    after-checks) words="$words xvinduce=after-checks" ;;
  esac
  local d
  d=$(debs "$REL" "$a")
  echo "e2e: booting $REL $a (Debian $(release_debian "$REL"): Xen $(cat "$d/XEN_VERSION"), Linux $(cat "$d/KVER"); Dom0 + $(domains "$a" | cut -d' ' -f2- | sed 's/ / + /g')), timeout ${TIMEOUT}s, attempt $n of $MAX_ATTEMPTS; serial log: $log"
  BOOT_T0=$(date +%s)
  qrc=0
  "$XQ/boot.sh" "$a" "$d" "$(images "$REL" "$a")" "$log" "$TIMEOUT" "$words" || qrc=$?
}

RETRIES=()
BOOTS=()
# The logs of a mode other than the matrix carry its name, so that a bench or a smoke run in the
# same work directory does not overwrite the serial log of a failed matrix boot.
LOG_SUFFIX=
[ "$MODE" = matrix ] || LOG_SUFFIX=-$MODE
for REL in "${RELEASES[@]}"; do for a in "${ARCHES[@]}"; do
  BOOTS+=("$REL-$a$LOG_SUFFIX")
  log=$WORK/logs/$REL-$a$LOG_SUFFIX.serial.log
  rm -f "$log".attempt-*
  ARCH_T0=$(date +%s)
  n=1
  while :; do
    boot_attempt "$a" "$log" "$n"
    # A boot lost to the emulator before any check is booted again; a boot loop measures those.
    if [ "$MODE" = bootloop ] || [ "$n" -ge "$MAX_ATTEMPTS" ] || ! why=$("$XQ/boot-fault.sh" "$log" "$a"); then
      break
    fi
    mv "$log" "$log.attempt-$n"
    n=$((n + 1))
    echo "RETRY $a boot: $why (attempt $n of $MAX_ATTEMPTS)"
    RETRIES+=("$REL $a attempt $((n - 1)): $why (log: $log.attempt-$((n - 1)))")
  done
  PHASE_S[boot-$REL-$a$LOG_SUFFIX]=$(($(date +%s) - ARCH_T0))
  ATTEMPT_NOTE=
  [ "$n" = 1 ] || ATTEMPT_NOTE=" (attempt $n of $MAX_ATTEMPTS: the earlier ones were lost to emulator faults)"
  collect "$a" "$log" "$qrc"
  if [ "$MODE" = bootloop ]; then
    grep -a -o '@@BOOTLOOP .*' "$log" | tr -d '\r' >"$WORK/logs/$REL-$a$LOG_SUFFIX.bootloop"
    echo "e2e: boot loop $REL $a: every boot in $WORK/logs/$REL-$a$LOG_SUFFIX.bootloop"
  fi
done; done
REL=all

# ---- 5. summary ----
if [ $KEEP = 1 ]; then
  keepdir=$WORK/runs/$(date +%Y%m%d-%H%M%S)
  mkdir -p "$keepdir"
  cp "$WORK"/logs/* "$RESULTS" "$keepdir/"
  echo "e2e: logs archived in $keepdir; staging trees kept in $WORK/<arch>/initrd-{dom0,domU}"
fi
times=
for k in fetch build initrd "${BOOTS[@]/#/boot-}"; do times="$times $k=${PHASE_S[$k]:-?}s"; done
echo "e2e: timings:$times total=$(($(date +%s) - RUN_START))s"
echo "e2e: boot retries: ${#RETRIES[@]}"
for r in "${RETRIES[@]}"; do echo "e2e:   $r"; done
echo "e2e: serial logs: $(for b in "${BOOTS[@]}"; do printf '%s ' "$WORK/logs/$b.serial.log"; done)results: $RESULTS"
# per release: the checks of its boots (host checks for every release are under "all")
for r in all "${RELEASES[@]}"; do
  awk -v r="$r" '$1 == r { if ($6 == "PASS") p++; else f++ }
    END { printf "e2e:   %-8s %d passed, %d failed\n", r, p, f }' "$RESULTS"
done
echo "e2e: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
