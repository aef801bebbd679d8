#!/usr/bin/env bash
# demo.sh: xenvirtio on real Xen, for a newcomer. Boots Debian's Xen under QEMU, runs the
# backend daemon in Dom0 and the frontend in a DomU, copies a few MiB through virtio-blk, checks
# them from both sides, and prints what happened. See `scripts/demo.sh --help`.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/demo.sh [--release bookworm|trixie] [--arch x86_64|arm64] [--help]

Shows xenvirtio working on real Xen, on this machine, with nothing but QEMU (no KVM, no Xen
host needed):
  1. installs the Debian packages and Rust targets it needs (scripts/install-deps.sh; asks
     for sudo when not root);
  2. builds the project as static binaries and boots Debian's Xen with a Debian Dom0 and
     one DomU under QEMU (x86_64: a PVH DomU; arm64: an Arm DomU): Debian 13's Xen 4.20 and
     Linux 6.12 (--release trixie), or Debian 12's Xen 4.17 and Linux 6.1 (bookworm);
  3. starts the backend daemon (xenvirtio-backend serve) in Dom0 and gives the DomU a
     virtio-blk disk backed by an image file in Dom0 (xenvirtio-backend attach);
  4. in the DomU, copies a few MiB (the project's own binaries) onto that disk with
     xenvirtio-frontend and reads them back; Dom0 then finds the same bytes in the image;
     then gives the disk to the DomU's own kernel (Debian 13: /dev/vda from its own
     virtio_blk, through VDUSE; Debian 12: /dev/nbd0), makes a filesystem on it, mounts it,
     copies the same bytes in and reads them back after a remount;
  5. prints a report: the DMA strategy the frontend chose and why, bytes moved, throughput,
     the map and notify counts per request, and PASS or FAIL.

  --release R  trixie (Debian 13, the default) or bookworm (Debian 12)
  --arch A   x86_64 (default) or arm64
  --help     this text

The first run downloads about 500 MB of Debian packages (cached afterwards) and builds the
project (a few minutes). The boot and the copy take one to three minutes. Everything the
machines print goes to a log file whose path is shown; the terminal gets the summary.
Exit status: 0 on PASS, 1 on FAIL, 2 when the demo could not run at all.

Environment: XENVIRTIO_DEMO_WORK (default /tmp/xenvirtio-demo) holds the package cache, the
images and the logs; CARGO_TARGET_DIR is honoured.
EOF
}

ARCH=x86_64
RELEASE=trixie
while [ $# -gt 0 ]; do
  case $1 in
    --release) [ $# -ge 2 ] || { usage >&2; exit 2; }; RELEASE=$2; shift 2 ;;
    --release=*) RELEASE=${1#--release=}; shift ;;
    --arch) [ $# -ge 2 ] || { usage >&2; exit 2; }; ARCH=$2; shift 2 ;;
    --arch=*) ARCH=${1#--arch=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "demo: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
case $ARCH in
  x86_64 | amd64) ARCH=x86_64 DOMU=pvh ;;
  arm64 | aarch64) ARCH=arm64 DOMU=arm ;;
  *) echo "demo: --arch must be x86_64 or arm64 (got '$ARCH')" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=xen-qemu/releases.sh
. "$ROOT/scripts/xen-qemu/releases.sh"
release_known "$RELEASE" || { echo "demo: --release must be one of: $XV_RELEASES (got '$RELEASE')" >&2; exit 2; }
XEN=$(release_xen "$RELEASE")
WORK=${XENVIRTIO_DEMO_WORK:-/tmp/xenvirtio-demo}
mkdir -p "$WORK"
LOG=$WORK/demo-$RELEASE-$ARCH.log
SERIAL=$WORK/logs/$RELEASE-$ARCH-demo.serial.log
: >"$LOG"
START=$(date +%s)

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
say() { printf '%s\n' "$*"; }
elapsed() { printf '%3ds' $(($(date +%s) - START)); }

bold "xenvirtio demo: virtio-blk from a Xen DomU to a backend in Dom0, on real Xen ($ARCH, Debian $(release_debian "$RELEASE") $RELEASE: Xen $XEN, Linux $(release_kernel "$RELEASE"))"
say "  (the machines' own output goes to $LOG and $SERIAL)"
say ""

say "[$(elapsed)] installing what is needed (scripts/install-deps.sh)"
if ! "$ROOT/scripts/install-deps.sh" >>"$LOG" 2>&1; then
  tail -n 15 "$LOG" | sed 's/^/    | /'
  bold "FAIL: installing the dependencies failed (log: $LOG)"
  exit 2
fi

# Follow a run: e2e.sh's own phases from its log, then the demo's steps from the serial log. A
# boot that e2e.sh repeats after an emulator fault starts a new serial log: read it from its top.
follow() {
  local lines line
  lines=$(grep -c '' "$LOG" 2>/dev/null) || true
  if [ "${lines:-0}" -gt "$seen_log" ]; then
    tail -n +"$((seen_log + 1))" "$LOG" | head -n "$((lines - seen_log))" |
      grep -E '^e2e: (cargo build|booting)|^fetch-debs: downloading|^RETRY ' |
      sed -e 's/^e2e: booting .*attempt 1 of.*/booting Xen '"$XEN"' + Dom0 + one DomU under QEMU (software-emulated CPU: about a minute)/' \
        -e 's/^e2e: booting .*\(attempt [0-9]* of [0-9]*\).*/booting again (\1)/' \
        -e 's/^RETRY [^ ]* boot: \(.*\) (attempt.*/\1: a fault of the emulated CPU, not of xenvirtio (docs\/E2E.md, "Emulator faults")/' \
        -e 's/^e2e: //' -e 's/^fetch-debs: //' |
      while IFS= read -r line; do say "[$(elapsed)]   $line"; done || true
    seen_log=$lines
  fi
  [ -f "$SERIAL" ] || return 0
  lines=$(grep -a -c '' "$SERIAL" 2>/dev/null) || true
  [ "${lines:-0}" -ge "$seen_serial" ] || seen_serial=0
  if [ "${lines:-0}" -gt "$seen_serial" ]; then
    tail -n +"$((seen_serial + 1))" "$SERIAL" | head -n "$((lines - seen_serial))" | tr -d '\r' |
      grep -a -o '@@DEMO step .*' | sed 's/^@@DEMO step //' |
      while IFS= read -r line; do say "[$(elapsed)]   $line"; done || true
    seen_serial=$lines
  fi
}

# The demo's boot (e2e.sh --mode demo), followed on the terminal; sets rc. Under QEMU's software
# CPU an x86 PVH DomU's kernel sometimes triple-faults while it boots, before anything of
# xenvirtio runs in it: e2e.sh then boots again by itself, at most three attempts in all, and
# only the last attempt counts (docs/E2E.md, "Emulator faults").
say "[$(elapsed)] building the binaries and the images, then booting Xen under QEMU (scripts/e2e.sh --mode demo)"
rm -f "$SERIAL"
seen_log=$(grep -c '' "$LOG" 2>/dev/null) || true
seen_serial=0
XENVIRTIO_E2E_WORK=$WORK "$ROOT/scripts/e2e.sh" --release "$RELEASE" --arch "$ARCH" --mode demo --domus "$DOMU" >>"$LOG" 2>&1 &
E2E=$!
while kill -0 "$E2E" 2>/dev/null; do
  follow
  sleep 1
done
rc=0
wait "$E2E" || rc=$?
follow

if [ ! -s "$SERIAL" ]; then
  tail -n 20 "$LOG" | sed 's/^/    | /'
  bold "FAIL: the demo did not get as far as booting Xen (log: $LOG)"
  exit 2
fi

# The report, from the "@@DEMO key value" lines of Dom0's script.
status=0
python3 - "$SERIAL" "$LOG" "$rc" <<'EOF' || status=$?
import json, re, sys
serial, log, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
demo = {}
for line in open(serial, errors="replace"):
    m = re.search(r"@@DEMO (\S+) (.*)", line.rstrip("\r\n"))
    if m and m.group(1) != "step":
        demo[m.group(1)] = m.group(2)
# e2e.sh prints the check lines of its last attempt only: a boot lost to the emulator is a RETRY line
lines = open(log, errors="replace").readlines()
checks = [l.strip() for l in lines if re.match(r"^(PASS|FAIL) ", l)]
retries = [l.strip() for l in lines if l.startswith("RETRY ")]
failed = [c for c in checks if c.startswith("FAIL")]

def num(pattern, text, cast=float):
    m = re.search(pattern, text or "")
    return cast(m.group(1)) if m else None

print()
print("==== what happened " + "=" * 60)
print(f"  frontend      {demo.get('domain', '?')}: xenvirtio-frontend copy")
print(f"  DMA strategy  {demo.get('dma', '?')}" + (" (persistent grants)" if "persistent" in demo.get("copied", "") else ""))
print(f"    why         {demo.get('dma-reason', '?')}  (the frontend's dma-reason key)")
b = int(demo.get("bytes", "0") or 0)
print(f"  data          {b} bytes ({b / 2**20:.1f} MiB: the xenvirtio binaries) written at offset 1 MiB,")
print(f"                read back and compared in the DomU; Dom0 found the same bytes in the image file")
print(f"                (sha256 {demo.get('sha256', '?')[:16]}...)")
w = num(r"write: [0-9.]+s \(([0-9.]+) MiB/s\)", demo.get("throughput"))
r = num(r"read back: [0-9.]+s \(([0-9.]+) MiB/s\)", demo.get("throughput"))
print(f"  throughput    write {w} MiB/s, read {r} MiB/s  (QEMU emulates every CPU instruction: expect")
print(f"                orders of magnitude more on hardware; see docs/PERFORMANCE.md)")
try:
    be = json.loads(demo["backend"]) if demo.get("backend") else {}
except ValueError:
    be = {}
req = be.get("requests", 0)
if req:
    per = lambda k: be.get(k, 0) / req
    print(f"  backend       {req} requests (xenvirtio-backend stats): per request {per('map_calls'):.2f} map calls")
    print(f"                ({per('pages_mapped'):.2f} pages mapped), {per('notifications_sent'):.2f} notifications sent,"
          f" {per('notifications_received'):.2f} received;")
    how = {
        "grant": "persistent grants: each page of the frontend's arena is mapped once and kept;"
        if "persistent" in demo.get("copied", "") else "each request's pages are mapped and unmapped again;",
        "bounce": "the bounce pool is mapped once, at connect;",
        "direct": "guest memory is foreign-mapped in 2 MiB chunks that stay cached;",
    }.get(demo.get("dma", ""), "")
    print(f"                ({how}")
    print(f"                {be.get('resident_pages', 0)} pages stay mapped after the frontend closed)")
fe = demo.get("frontend", "")
fr = num(r"(\d+) requests", fe, int)
if fr:
    sent = num(r"(\d+) notifications sent", fe, int) or 0
    received = num(r"(\d+) received", fe, int) or 0
    copied = num(r"(\d+) bytes copied", fe, int) or 0
    print(f"  frontend      {fr} requests: per request {sent / fr:.2f} notifications sent, {received / fr:.2f} received;")
    print(f"                {copied} bytes copied between the caller's buffers and DMA memory")
kernel = demo.get("kernel", "")
if kernel:
    print(f"  guest kernel  {kernel[kernel.find('/dev/'):] if '/dev/' in kernel else kernel}")
    ok_sha = demo.get("kernel-sha256") == demo.get("sha256")
    print(f"                mounted: {demo.get('kernel-mount') or 'no'}; the payload read back through the"
          f" guest's filesystem: {'the same sha256' if ok_sha else 'MISMATCH'}")
print(f"  checks        {len(checks) - len(failed)} passed, {len(failed)} failed")
if retries:
    print(f"  boots         {len(retries) + 1}: {len(retries)} lost to the emulated CPU before any check ran (docs/E2E.md)")
for c in failed:
    print(f"    {c[:200]}")
ok = rc == 0 and not failed and b > 0
print()
print("RESULT: " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
EOF
say "  logs: $LOG (build and checks), $SERIAL (Xen, Dom0 and the DomU's console)"
say "  took $(($(date +%s) - START)) s"
exit $status
