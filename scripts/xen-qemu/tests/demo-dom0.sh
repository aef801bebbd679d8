#!/bin/sh
# shellcheck shell=dash
# demo-dom0.sh: Dom0 side of `scripts/demo.sh` (`e2e.sh --mode demo`). The backend daemon runs
# here, the frontend in one DomU (the PVH DomU on x86_64, the DomU on arm64). The DomU copies a
# file of a few MiB onto its virtio-blk disk through xenvirtio-frontend and reads it back; Dom0
# then finds the same bytes in the backend's image file. Besides check lines it prints
# "@@DEMO <key> <value>" lines, which demo.sh turns into its report, and "@@DEMO step <text>"
# lines for its progress.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh
# shellcheck source=matrix-lib.sh
. /xv/tests/matrix-lib.sh
# shellcheck source=knbd-lib.sh
. /xv/tests/knbd-lib.sh

demo() {
  echo "@@DEMO $*"
}
step() {
  demo step "$*"
}

d=domU-$(echo "$XV_DOMUS" | cut -d' ' -f1)
mkdir -p "$MX_IMAGES"
: >"$MX_BACKEND_LOG"
step "Dom0 is up (Xen $(xl info 2>/dev/null | sed -n 's/^xen_version *: *//p'), Linux $(uname -r))"

MX_ALLOW_DIRECT="--allow-direct $d"
if mx_backend_start; then
  xv_check backend-start PASS "xenvirtio-backend serve $MX_ALLOW_DIRECT (pid $MX_BACKEND_PID)"
  step "backend daemon started in Dom0: xenvirtio-backend serve $MX_ALLOW_DIRECT"
else
  xv_check backend-start FAIL "$(tail -n 5 "$MX_BACKEND_LOG" | xv_oneline)"
fi

xv_forward_start
if out=$(xv_domu_create "$d"); then
  step "creating $d (xl create), waiting for it to boot"
  if xv_domu_wait_boot "$d" 300 && xv_agent_wait "$d" 120; then
    xv_check_for "$d" channel-ready PASS "agent ready in domid $(xv_domid "$d")"
    step "$d is up: domid $(xv_domid "$d"), guest type $(mx_in "$d" 20 'cat /sys/hypervisor/guest_type')"
  else
    xv_check_for "$d" channel-ready FAIL "no agent in $d"
  fi
else
  xv_check_for "$d" boot FAIL "$out"
fi

img=$(mx_image "$d")
truncate -s 64M "$img"
out=$($MX_BE attach --domain "$d" --type blk --image "$img" 2>&1)
rc=$?
if [ $rc = 0 ]; then
  xv_check attach PASS "$(echo "$out" | xv_oneline)"
  step "attached a virtio-blk disk to $d: xenvirtio-backend attach --domain $d --type blk --image $img"
else
  xv_check attach FAIL "rc=$rc $(echo "$out" | xv_oneline)"
fi
devid=$(echo "$out" | sed -n 's/^devid: //p')

# The payload: the project's own binaries, a few MiB the DomU and Dom0 both have.
payload=/run/xv/payload
offset=$((1024 * 1024))
step "in $d: xenvirtio-frontend copy (the project's binaries, concatenated) onto the disk, then read back"
out=$(mx_in "$d" 600 "cat /usr/bin/xenvirtio-frontend /usr/bin/xenvirtio-backend > $payload; $MX_FE copy $payload --devid ${devid:-0} --offset $offset")
rc=$?
echo "$out" | sed 's/^/[frontend] /'
bytes=$(mx_line '^copied ' "$out" | sed -n 's/^copied \([0-9]*\) bytes.*/\1/p')
if [ $rc = 0 ] && mx_line '^OK: ' "$out" >/dev/null; then
  xv_check_for "$d" copy PASS "$(mx_line '^copied ' "$out"); $(mx_line '^write:' "$out")"
else
  xv_check_for "$d" copy FAIL "rc=$rc: $(echo "$out" | tail -n 3 | xv_oneline)"
fi

# Dom0 reads the image file directly: the same bytes at the same offset.
cat /usr/bin/xenvirtio-frontend /usr/bin/xenvirtio-backend >"$payload"
want=$(sha256sum <"$payload" | cut -d' ' -f1)
size=$(wc -c <"$payload")
got=$(dd if="$img" bs=1M skip=1 2>/dev/null | head -c "$size" | sha256sum | cut -d' ' -f1)
if [ "$want" = "$got" ] && [ "$size" = "${bytes:-x}" ]; then
  xv_check image PASS "the image holds the file's $size bytes at offset $offset (sha256 $want)"
  step "Dom0 read the backend's image file: the same $size bytes at offset $offset (sha256 ${want%????????????????????????????????????????????????})"
else
  xv_check image FAIL "sha256 of the file $want, of the image's range $got; $size bytes here, ${bytes:-?} copied"
fi

# The guest's own kernel gets the disk: Debian 13's virtio_blk through VDUSE, Debian 12's
# nbd.ko; a filesystem made on it, mounted, the payload copied in, read back after a remount.
# `serve --kernel` picks the path itself; the demo loads what the release's kernel has.
if [ "$(xv_expect_vduse)" = available ]; then
  kload=kn_probe_load_vduse kwhat="its own virtio_blk driver, through VDUSE"
else
  kload=kn_probe_load kwhat="its NBD driver (Debian 12's kernel has no VDUSE)"
fi
step "in $d: xenvirtio-frontend serve --kernel: the guest's kernel gets the disk from $kwhat"
kout=$(mx_in "$d" 300 "$kload >/dev/null && mx_probe_serve 0 /run/xv/nbd.sock --kernel >/dev/null && kn_probe_wait_kernel && grep -m 1 '^kernel path' /run/xv/serve.log")
kline=$(mx_line 'kernel block device' "$kout")
kdev=$(echo "$kline" | grep -o -E '/dev/(vd[a-z]+|nbd[0-9]+)' | head -n 1)
kfs=
if [ -n "$kdev" ]; then
  step "in $d: mke2fs $kdev, mount, the payload copied in, unmount, mount again, read back"
  kfs=$(mx_in "$d" 300 "mkdir -p /mnt/xv && mke2fs -F $kdev >/dev/null 2>&1 && mount -t ext2 $kdev /mnt/xv &&
    cp $payload /mnt/xv/payload && sync && umount /mnt/xv && echo 3 >/proc/sys/vm/drop_caches &&
    mount -t ext2 $kdev /mnt/xv && echo sha=\$(sha256sum </mnt/xv/payload | cut -d' ' -f1) &&
    mount | grep ' /mnt/xv ' && umount /mnt/xv")
  # shellcheck disable=SC2016 # expanded in the DomU
  mx_in "$d" 120 'p=$(cat /run/xv/serve.pid); kill $p; while xv_alive $p; do sleep 0.3; done' >/dev/null
fi
ksha=$(mx_line '^sha=' "$kfs" | sed 's/^sha=//')
if [ -n "$kdev" ] && [ "$ksha" = "$want" ]; then
  xv_check_for "$d" kernel-mount PASS "$(mx_line '^kernel path' "$kout"); $kline; mke2fs, mount, the $size-byte payload copied in and read back after a remount (sha256 $want): $(mx_line ' /mnt/xv ' "$kfs" | xv_oneline)"
  step "the guest's kernel mounted $kdev and read the payload back: the same sha256"
else
  xv_check_for "$d" kernel-mount FAIL "device '${kdev:-none}': $(echo "$kout $kfs" | tail -n 4 | xv_oneline)"
fi
demo kernel "$kline, from $kwhat"
demo kernel-mount "$(mx_line ' /mnt/xv ' "$kfs")"
demo kernel-sha256 "${ksha:-none}"

# The report's numbers: the frontend's own line, the keys, the daemon's counters.
fdir=$(mx_fdir "$d" "${devid:-0}")
demo dma "$(xenstore-read "$fdir/dma" 2>&1)"
demo dma-reason "$(xenstore-read "$fdir/dma-reason" 2>&1)"
demo domain "$d (domid $(xv_domid "$d"), $(mx_in "$d" 20 'cat /sys/hypervisor/guest_type'), $XV_ARCH)"
demo bytes "${bytes:-0}"
demo copied "$(mx_line '^copied ' "$out")"
demo throughput "$(mx_line '^write:' "$out")"
demo frontend "$(mx_line '^frontend counts:' "$out")"
demo backend "$(mx_device_json "$(xv_domid "$d")" "${devid:-0}")"
demo sha256 "$want"

step "stopping: destroying $d, stopping the backend daemon"
xv_domu_destroy "$d"
mx_backend_stop
stopped=$MX_BACKEND_STOPPED
case $stopped in
  "exit status 0") xv_check backend-stop PASS "the daemon $stopped" ;;
  *) xv_check backend-stop FAIL "the daemon's $stopped" ;;
esac
xv_forward_stop
if grep -q '^@@CHECK [^ ]* [^ ]* [^ ]* FAIL' "$XV_CHECKS"; then
  tail -n 100 "$MX_BACKEND_LOG" | cut -c1-400 | sed 's/^/[backend.log] /'
fi
exit 0
