# shellcheck shell=dash
# knbd-lib.sh: the guest kernel's own block device (issue 12, item 1), sourced by matrix-dom0.sh
# after matrix-lib.sh. `xenvirtio-frontend serve --kernel-nbd 0` in a DomU gives blk 0 to the
# DomU's kernel as /dev/nbd0 through the NBD netlink interface; the cells then use it as an
# operator would: raw I/O checked from both ends, an ext4 filesystem made (Debian's e2fsprogs),
# mounted, written, checked with e2fsck and read back, the same filesystem written while Dom0's
# daemon restarts and while it is killed, and a clean disconnect.
# Every cell emits its own check line; nothing is skipped.

# kn_probe_load: load nbd.ko (4 devices, no partitions) and ext4 in this domain with Debian's
# modprobe, which brings ext4's dependencies and its soft dependency crc32c (which ext4 asks the
# crypto API for at every mount).
kn_probe_load() {
  [ -d /sys/module/nbd ] || modprobe nbd nbds_max=4 max_part=0 || return 1
  modprobe ext4 || return 1
  [ -b /dev/nbd0 ] || return 1
  set -- /sys/block/nbd*
  echo "nbd.ko loaded: $# devices"
}

# kn_probe_wait_kernel: wait (60 s) until the running serve says it connected the kernel device
# (it does so after the export's socket appears); print that line.
kn_probe_wait_kernel() {
  local _end
  _end=$(($(xv_uptime) + 60))
  while ! grep -q 'kernel block device' /run/xv/serve.log; do
    if [ "$(xv_uptime)" -ge "$_end" ] || ! xv_alive "$(cat /run/xv/serve.pid)"; then
      echo "no kernel block device: $(tail -n 6 /run/xv/serve.log | cut -c1-300 | xv_oneline)"
      return 1
    fi
    sleep 0.3
  done
  grep -m 1 'kernel block device' /run/xv/serve.log
}

# kn_md5 FILE [SKIP_MIB COUNT_MIB]: the md5 of FILE, or of COUNT MiB of it from SKIP MiB.
kn_md5() {
  if [ -n "$2" ]; then
    dd if="$1" bs=1M skip="$2" count="$3" 2>/dev/null | md5sum | cut -d' ' -f1
  else
    md5sum <"$1" | cut -d' ' -f1
  fi
}

# kn_use nbd|vduse: which kernel path the cells below test. nbd: `serve --kernel-nbd 0`, the
# kernel's NBD driver on /dev/nbd0, checks knbd-*; vduse: `serve --kernel-vduse`, the kernel's
# own virtio_blk through VDUSE (Debian 13), on the /dev/vdX that serve names, checks kvduse-*.
kn_use() {
  KN_PATH=$1
  case $1 in
    nbd) KN_NAME=knbd KN_DEV=/dev/nbd0 KN_LOAD=kn_probe_load KN_SERVE="--kernel-nbd 0" ;;
    vduse) KN_NAME=kvduse KN_DEV= KN_LOAD=kn_probe_load_vduse KN_SERVE=--kernel-vduse ;;
  esac
}
kn_use nbd
KN_DMA='' KN_SUFFIX='' KN_WANT=''

# kn_probe_load_vduse: ext4 as for NBD, then VDUSE and the virtio drivers above it.
kn_probe_load_vduse() {
  modprobe -a ext4 vduse virtio_vdpa virtio_blk || return 1
  echo "vduse.ko loaded: $(ls /dev/vduse | xv_oneline)"
}

# kn_serve_cell DOMAIN: stop DOMAIN's export, load the path's modules and serve blk 0 again
# with the kernel device (with --dma $KN_DMA when it is set: the connection must then use that
# strategy; with KN_WANT set, serve's kernel line must match that pattern). Checks
# <path>-serve$KN_SUFFIX. Returns non-zero when there is no kernel device to test.
kn_serve_cell() {
  local _d _out _rc _line _dma
  _d=$1
  mx_stop_serve "$_d"
  _out=$(mx_in "$_d" 240 "$KN_LOAD && mx_probe_serve 0 $NBD $KN_SERVE ${KN_DMA:+--dma $KN_DMA} && kn_probe_wait_kernel")
  _rc=$?
  _line=$(mx_line 'kernel block device' "$_out")
  _dma=$(echo "$_out" | grep -o -m 1 ' dma [a-z]*' | sed 's/ dma //')
  [ "$KN_PATH" != vduse ] || KN_DEV=$(kn_kernel_dev "$_line")
  if [ $_rc = 0 ] && [ -n "$KN_DEV" ] && mx_line "$KN_DEV" "$_out" >/dev/null &&
    { [ -z "$KN_DMA" ] || [ "$_dma" = "$KN_DMA" ]; } &&
    { [ -z "$KN_WANT" ] || echo "$_line" | grep -q "$KN_WANT"; }; then
    mx_check "$_d" "$KN_NAME-serve$KN_SUFFIX" PASS "$(mx_line '\.ko loaded' "$_out"); $(echo "$_line" | xv_oneline); dma $_dma"
    return 0
  fi
  mx_check "$_d" "$KN_NAME-serve$KN_SUFFIX" FAIL "rc=$_rc${KN_DMA:+, dma '$_dma' (want $KN_DMA)}${KN_WANT:+, want '$KN_WANT' in the kernel line}: $(echo "$_out" | tail -n 4 | xv_oneline)"
  return 1
}

# kn_strategy_cells DOMAIN STRATEGY...: the filesystem cells once more for each STRATEGY the
# role allows besides its default (which the cells above used), forced with --dma: checks
# <path>-serve-<s>, <path>-fs-<s> and <path>-disconnect-<s>.
kn_strategy_cells() {
  local _d _s
  _d=$1
  shift
  for _s in "$@"; do
    KN_DMA=$_s KN_SUFFIX=-$_s
    if kn_serve_cell "$_d"; then
      kn_fs_cell "$_d"
      kn_disconnect_cell "$_d"
    fi
  done
  KN_DMA='' KN_SUFFIX=''
}

# kn_raw_cell DOMAIN: the device's size, then 4 MiB of random data written through $KN_DEV at
# 40 MiB and read back after dropping the DomU's caches; Dom0 reads the same bytes from the
# backend's image. Checks <path>-size, <path>-raw and image-<path>-raw.
kn_raw_cell() {
  local _d _out _want _size _sum _img
  _d=$1
  _want=$((MX_IMAGE_MB * 1024 * 1024))
  _size=$(mx_in "$_d" 20 "blockdev --getsize64 $KN_DEV")
  if [ "$_size" = "$_want" ]; then
    mx_check "$_d" "$KN_NAME-size" PASS "$KN_DEV is $_size bytes, the image's size; logical block $(mx_in "$_d" 20 "cat /sys/block/${KN_DEV#/dev/}/queue/logical_block_size") bytes"
  else
    mx_check "$_d" "$KN_NAME-size" FAIL "blockdev --getsize64 $KN_DEV: '$(echo "$_size" | xv_oneline)', want $_want"
  fi
  if [ "$KN_PATH" = vduse ]; then
    # The virtio serial (GET_ID) is the vdev name: what udev's by-id name is made of.
    _sum=$(mx_in "$_d" 20 "cat /sys/block/${KN_DEV#/dev/}/serial")
    if [ "$_sum" = xvda ]; then
      mx_check "$_d" kvduse-serial PASS "/sys/block/${KN_DEV#/dev/}/serial: $_sum (the device's GET_ID: udev names it /dev/disk/by-id/virtio-$_sum)"
    else
      mx_check "$_d" kvduse-serial FAIL "/sys/block/${KN_DEV#/dev/}/serial: '$(echo "$_sum" | xv_oneline)', want xvda"
    fi
  fi
  _out=$(mx_in "$_d" 120 "dd if=/dev/urandom of=/tmp/knbd.raw bs=1M count=4 2>/dev/null &&
    dd if=/tmp/knbd.raw of=$KN_DEV bs=1M seek=40 conv=fsync 2>&1 | tail -n 1 &&
    echo 3 >/proc/sys/vm/drop_caches && blockdev --flushbufs $KN_DEV &&
    echo want=\$(kn_md5 /tmp/knbd.raw) got=\$(kn_md5 $KN_DEV 40 4)")
  _sum=$(kn_sum "$_out" want)
  if kn_sums_match "$_out"; then
    mx_check "$_d" "$KN_NAME-raw" PASS "4 MiB written to $KN_DEV with dd and read back from the device after drop_caches: md5 $_sum"
  else
    mx_check "$_d" "$KN_NAME-raw" FAIL "$(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
  _img=$(kn_md5 "$(mx_image "$_d")" 40 4)
  if [ -n "$_sum" ] && [ "$_img" = "$_sum" ]; then
    mx_check "$_d" "image-$KN_NAME-raw" PASS "Dom0 reads the same 4 MiB at 40 MiB of $(mx_image "$_d"): md5 $_img"
  else
    mx_check "$_d" "image-$KN_NAME-raw" FAIL "Dom0's image at 40 MiB: md5 $_img; the DomU wrote '${_sum:-nothing}'"
  fi
}

# kn_fs_cell DOMAIN: what an operator does with a new disk. Debian's mkfs.ext4 on $KN_DEV, mount,
# a tree of files of known checksums written (3 directories of 5 files from 1 KiB to 485 KiB, and
# an 8 MiB file), sync, umount, Debian's e2fsck -fn (exit 0: clean), drop_caches, mount again
# and every checksum verified. Checks <path>-fs.
kn_fs_cell() {
  local _d _out _n
  _d=$1
  _out=$(mx_in "$_d" 300 "mkdir -p /mnt/knbd && mkfs.ext4 -F -q -L xvfs $KN_DEV && mount -t ext4 $KN_DEV /mnt/knbd &&
    for dir in a b c; do mkdir -p /mnt/knbd/\$dir; for i in 1 2 3 4 5; do dd if=/dev/urandom of=/mnt/knbd/\$dir/f\$i bs=1k count=\$((i * 97)) 2>/dev/null; done; done &&
    dd if=/dev/urandom of=/mnt/knbd/big bs=1M count=8 2>/dev/null &&
    (cd /mnt/knbd && find . -type f | sort | xargs md5sum) >/tmp/knbd.manifest && sync && umount /mnt/knbd &&
    kn_fsck $KN_DEV && echo 3 >/proc/sys/vm/drop_caches && mount -t ext4 $KN_DEV /mnt/knbd &&
    kn_manifest_check && df -k /mnt/knbd | tail -n 1 && umount /mnt/knbd; echo rc=\$?; dmesg | grep -E 'EXT4|nbd' | tail -n 2")
  _n=$(mx_line '^files=' "$_out" | sed -n 's/^files=\([0-9]*\) ok=\([0-9]*\)$/\1 \2/p')
  if [ "$_n" = "16 16" ] && mx_line '^fsck=0$' "$_out" >/dev/null && mx_line '^rc=0$' "$_out" >/dev/null; then
    mx_check "$_d" "$KN_NAME-fs$KN_SUFFIX" PASS "mkfs.ext4, mount, 16 files in a tree written, sync, umount, e2fsck -fn clean ($(mx_line "^xvfs: " "$_out" | xv_oneline)), drop_caches, mount: all 16 checksums match; df: $(mx_line '/mnt/knbd' "$_out" | xv_oneline)"
  else
    mx_check "$_d" "$KN_NAME-fs$KN_SUFFIX" FAIL "$(echo "$_out" | tail -n 6 | xv_oneline)"
  fi
}

# kn_fsck DEV: (in a DomU) Debian's e2fsck -fn on DEV, which must not be mounted; prints
# fsck=<exit status> and e2fsck's summary line.
kn_fsck() {
  e2fsck -fn "$1" >/tmp/knbd.fsck 2>&1
  echo "fsck=$?"
  tail -n 1 /tmp/knbd.fsck
}

# kn_manifest_check: (in a DomU) files=<lines of kn_fs_cell's manifest> ok=<files of it whose
# checksum matches under /mnt/knbd>.
kn_manifest_check() {
  echo "files=$(wc -l </tmp/knbd.manifest) ok=$(cd /mnt/knbd && md5sum -c /tmp/knbd.manifest 2>&1 | grep -c ': OK$')"
}

# kn_kernel_dev TEXT: the kernel device (/dev/vdX or /dev/nbdN) that serve's "kernel block
# device" line in TEXT names.
kn_kernel_dev() {
  echo "$1" | grep -m 1 'kernel block device' | grep -o -E '/dev/(vd[a-z]+|nbd[0-9]+)' | head -n 1
}

# kn_sum TEXT KEY: the value of KEY= in the want=... got=... line of TEXT.
kn_sum() {
  mx_line '^want=' "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"
}

# kn_sums_match TEXT: the want= and got= checksums of TEXT are there and equal.
kn_sums_match() {
  local _w _g
  _w=$(kn_sum "$1" want)
  _g=$(kn_sum "$1" got)
  [ -n "$_w" ] && [ "$_w" = "$_g" ]
}

# kn_restart_cell DOMAIN [TERM|KILL]: a 16 MiB file is copied onto the mounted filesystem (with
# fsync) while Dom0's daemon is stopped (SIGTERM, or SIGKILL: a crash) and started again; the
# copy must finish without an error, e2fsck -fn must find the filesystem clean after umount,
# the file and kn_fs_cell's tree must read back after a remount, and the DomU's kernel must log
# no I/O error for the device: a backend restart is a pause for the filesystem. The copy is
# removed afterwards (the image is 48 MiB). Checks <path>-restart (TERM)
# or <path>-crash (KILL).
kn_restart_cell() {
  local _d _out _stopped _started _sig _name _copy
  _d=$1 _sig=${2:-TERM}
  case $_sig in KILL) _name=$KN_NAME-crash ;; *) _name=$KN_NAME-restart ;; esac
  _copy=/run/xv/$_name-copy.out
  mx_in "$_d" 60 "mount -t ext4 $KN_DEV /mnt/knbd && dd if=/dev/urandom of=/tmp/knbd.big bs=1M count=16 2>/dev/null && dmesg -c >/dev/null" >/dev/null
  # The daemon is frozen first, so that the copy's first writes wait for it.
  kill -STOP "$MX_BACKEND_PID" 2>/dev/null
  mx_in "$_d" 10 "(dd if=/tmp/knbd.big of=/mnt/knbd/$_name bs=1M conv=fsync >$_copy 2>&1; echo rc=\$? >>$_copy) </dev/null >/dev/null 2>&1 &" >/dev/null
  sleep 3
  if [ "$_sig" = KILL ]; then
    kill -KILL "$MX_BACKEND_PID" 2>/dev/null
    wait "$MX_BACKEND_PID" 2>/dev/null
    _stopped="exit status $? (SIGKILL)"
  else
    mx_backend_stop # SIGTERM, then SIGCONT
    _stopped=$MX_BACKEND_STOPPED
  fi
  if mx_backend_start; then _started="the new daemon is pid $MX_BACKEND_PID"; else _started="the new daemon did not start"; fi
  _out=$(mx_in "$_d" 240 "end=\$((\$(xv_uptime) + 200)); while ! grep -q '^rc=' $_copy; do [ \$(xv_uptime) -lt \$end ] || break; sleep 0.5; done;
    cat $_copy; umount /mnt/knbd && kn_fsck $KN_DEV && echo 3 >/proc/sys/vm/drop_caches && mount -t ext4 $KN_DEV /mnt/knbd &&
    echo want=\$(kn_md5 /tmp/knbd.big) got=\$(kn_md5 /mnt/knbd/$_name) && kn_manifest_check; rm -f /mnt/knbd/$_name; umount /mnt/knbd;
    echo errors=\$(dmesg | grep -c -i -E '${KN_DEV#/dev/}.*(error|timed out)|I/O error')")
  if mx_line '^rc=0$' "$_out" >/dev/null && mx_line '^fsck=0$' "$_out" >/dev/null && kn_sums_match "$_out" &&
    mx_line '^files=16 ok=16$' "$_out" >/dev/null && mx_line '^errors=0$' "$_out" >/dev/null; then
    mx_check "$_d" "$_name" PASS "a 16 MiB copy onto the mounted ext4 spanned SIG$_sig to the daemon and a new one (old daemon: $_stopped; $_started): it finished, e2fsck -fn clean after umount, the file and the tree read back after a remount (md5 $(kn_sum "$_out" want); $(mx_line '^files=' "$_out")), no I/O error in the kernel log"
  else
    mx_check "$_d" "$_name" FAIL "old daemon: $_stopped; $_started: $(echo "$_out" | tail -n 5 | xv_oneline)"
  fi
}

# kn_disconnect_cell DOMAIN: SIGTERM to the export; it takes the device from the kernel (NBD:
# disconnected, size 0; VDUSE: off the vDPA bus, the disk gone) and exits 0 within 60 s. Checks
# <path>-disconnect.
kn_disconnect_cell() {
  local _d _out _gone _k
  _d=$1
  _k=${KN_DEV#/dev/}
  case $KN_PATH in
    nbd) _gone='^size=0$' ;;
    *) _gone='^size=gone$' ;;
  esac
  _out=$(mx_in "$_d" 120 "p=\$(cat /run/xv/serve.pid); kill \$p; end=\$((\$(xv_uptime) + 60)); while xv_alive \$p && [ \$(xv_uptime) -lt \$end ]; do sleep 0.3; done;
    if xv_alive \$p; then echo 'still running after 60 s'; kill -KILL \$p; fi;
    echo size=\$(cat /sys/block/$_k/size 2>/dev/null || echo gone); tail -n 4 /run/xv/serve.log | cut -c1-300; dmesg | grep -i -E 'nbd|vduse|virtio_blk|$_k' | tail -n 3")
  if mx_line "$_gone" "$_out" >/dev/null && ! mx_line 'still running|cannot disconnect|cannot remove|closing:' "$_out" >/dev/null; then
    mx_check "$_d" "$KN_NAME-disconnect$KN_SUFFIX" PASS "SIGTERM to serve: $KN_DEV given back ($(mx_line '^size=' "$_out")): $(echo "$_out" | grep -v '^size=' | xv_oneline)"
  else
    mx_check "$_d" "$KN_NAME-disconnect$KN_SUFFIX" FAIL "$(echo "$_out" | xv_oneline)"
  fi
}

# kn_detach_cell DOMAIN: the device is detached from Dom0 while the guest has its filesystem
# mounted and a writer running (1 MiB files with fsync, one after another). A new serve with the
# kernel device, `serve --detach-grace 5`: once the device has been gone from xenstore for 5 s,
# serve takes it from the kernel and exits, the writer gets an I/O error instead of waiting,
# umount returns, and the guest's kernel logs no oops, BUG or hung task. Then Dom0 attaches the
# device again for the cells after this one. Checks <path>-detach and <path>-reattach.
kn_detach_cell() {
  local _d _domid _out _rc _dev _k _be _gone _att
  _d=$1
  _domid=$(mx_domid "$_d")
  _out=$(mx_in "$_d" 240 "mx_probe_serve 0 $NBD $KN_SERVE --detach-grace 5 && kn_probe_wait_kernel")
  _rc=$?
  _dev=$(kn_kernel_dev "$_out")
  if [ $_rc != 0 ] || [ -z "$_dev" ]; then
    mx_check "$_d" "$KN_NAME-detach" FAIL "no kernel device to detach: rc=$_rc: $(echo "$_out" | tail -n 3 | xv_oneline)"
  else
    _k=${_dev#/dev/}
    case $KN_PATH in nbd) _gone='^size=0$' ;; *) _gone='^size=gone$' ;; esac
    mx_in "$_d" 60 "mount -t ext4 $_dev /mnt/knbd && rm -f /run/xv/detach.out && dmesg -c >/dev/null &&
      (i=0; while dd if=/dev/urandom of=/mnt/knbd/detach.\$i bs=64k count=16 conv=fsync 2>/run/xv/detach.err; do rm -f /mnt/knbd/detach.\$((i - 1)); i=\$((i + 1)); done;
       echo writer=failed files=\$i: \$(tail -n 1 /run/xv/detach.err) >/run/xv/detach.out) </dev/null >/dev/null 2>&1 &" >/dev/null
    sleep 2
    _be=$($MX_BE detach --domain "$_domid" --devid 0 2>&1)
    _rc=$?
    # shellcheck disable=SC2016 # expanded in the DomU
    _out=$(mx_in "$_d" 150 "end=\$((\$(xv_uptime) + 90)); while ! grep -q '^writer=' /run/xv/detach.out 2>/dev/null || xv_alive \$(cat /run/xv/serve.pid); do
        [ \$(xv_uptime) -lt \$end ] || { echo 'after 90 s:' \$(cat /run/xv/detach.out 2>/dev/null || echo 'the writer is still writing'); break; }; sleep 0.5; done;
      cat /run/xv/detach.out; xv_alive \$(cat /run/xv/serve.pid) && echo serve=running || echo serve=exited;
      timeout 60 umount /mnt/knbd; echo umount=\$?;
      echo size=\$(cat /sys/block/$_k/size 2>/dev/null || echo gone);
      echo oops=\$(dmesg | grep -c -E 'Oops|BUG|hung_task|blocked for more than|Call Trace');
      grep -E 'detached|disconnected|removed|no device left' /run/xv/serve.log | cut -c1-200 | tail -n 4")
    if [ $_rc = 0 ] && mx_line '^writer=failed files=[1-9]' "$_out" >/dev/null && mx_line '^serve=exited$' "$_out" >/dev/null &&
      mx_line '^umount=' "$_out" | grep -qv '^umount=\(124\|143\)$' && mx_line "$_gone" "$_out" >/dev/null &&
      mx_line '^oops=0$' "$_out" >/dev/null && mx_line 'was detached' "$_out" >/dev/null; then
      mx_check "$_d" "$KN_NAME-detach" PASS "detached from Dom0 under a mounted ext4 with a writer running ($(echo "$_be" | xv_oneline)): the writer stopped with an error ($(mx_line '^writer=' "$_out")), serve gave $_dev up and exited, $(mx_line '^umount=' "$_out"), $(mx_line '^size=' "$_out"), no oops: $(echo "$_out" | grep -E 'detached|disconnected|removed' | xv_oneline)"
    else
      mx_check "$_d" "$KN_NAME-detach" FAIL "detach rc=$_rc ($(echo "$_be" | xv_oneline)): $(echo "$_out" | xv_oneline)"
    fi
  fi
  if xenstore-read "$(mx_bdir "$_d" 0)/state" >/dev/null 2>&1; then _gone=; else _gone=1; fi
  _att="it was still attached"
  [ -z "$_gone" ] || _att=$($MX_BE attach --quiet --domain "$_domid" --type blk --devid 0 --image "$(mx_image "$_d")" 2>&1)
  _rc=$?
  if [ $_rc = 0 ]; then
    mx_check "$_d" "$KN_NAME-reattach" PASS "devid 0 attached again with the same image ($(echo "$_att" | xv_oneline))"
  else
    mx_check "$_d" "$KN_NAME-reattach" FAIL "rc=$_rc: $(echo "$_att" | xv_oneline)"
  fi
}

# kn_tree_digest: (in a DomU) one md5 over the names and contents of every file under
# /mnt/data.
kn_tree_digest() {
  (cd /mnt/data && find . -type f | sort | xargs md5sum | md5sum | cut -d' ' -f1)
}

# kn_reboot_cell DOMAIN: the disk as an operator's guest has it across a reboot. In DOMAIN, the
# package's init script (/etc/init.d/xenvirtio-frontend: the modules with modprobe, then `serve
# --kernel`, VDUSE where the kernel has it, else NBD) brings the disk up; mkfs.ext4 -L xvdata, a
# tree of files written, its digest kept, umount, the script stopped. Then DOMAIN is destroyed and created again (what a
# reboot is to Xen: a new domid, the devices back from the daemon's book), with xvdisk=1: at
# boot, before anything of the harness runs in it, the init script brings the disk up again and
# the image's fstab mounts it by its label on /mnt/data. The files must be there with the same
# digest. The domain then serves its plain export again for the cells after this one. Checks
# disk-reboot-prep, disk-reboot (and boot-reboot, script-matrix-reboot from the new domain).
kn_reboot_cell() {
  local _d _out _rc _digest _old _new _cfg _seen
  _d=$1
  mx_stop_serve "$_d"
  _out=$(mx_in "$_d" 300 "modprobe ext4 || exit 1; /etc/init.d/xenvirtio-frontend start || exit 1;
    dev=\$(kn_kernel_dev \"\$(cat /var/log/xenvirtio-frontend.log)\"); echo dev=\$dev;
    mkfs.ext4 -F -q -L xvdata \$dev && mkdir -p /mnt/data && mount LABEL=xvdata /mnt/data &&
    for dir in x y; do mkdir -p /mnt/data/\$dir; for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/data/\$dir/f\$i bs=1k count=\$((i * 131)) 2>/dev/null; done; done &&
    echo digest=\$(kn_tree_digest) && umount /mnt/data && /etc/init.d/xenvirtio-frontend stop")
  _rc=$?
  _digest=$(mx_line '^digest=' "$_out" | sed 's/^digest=//')
  if [ $_rc = 0 ] && [ ${#_digest} = 32 ]; then
    mx_check "$_d" disk-reboot-prep PASS "the init script brought up $(mx_line '^dev=' "$_out" | sed 's/^dev=//') ($(mx_line 'kernel path' "$_out" | xv_oneline)); mkfs.ext4 -L xvdata, 8 files written (digest $_digest), umount, the script stopped"
  else
    mx_check "$_d" disk-reboot-prep FAIL "rc=$_rc: $(echo "$_out" | tail -n 5 | xv_oneline)"
    mx_in "$_d" 120 "umount /mnt/data 2>/dev/null; /etc/init.d/xenvirtio-frontend stop" >/dev/null
    mx_serve_cell "$_d" serve-after-reboot
    return
  fi
  # The domain's own check lines so far: its count starts again in the new domain.
  mx_count_emitted "$_d" >"$XV_RUN/$_d.emitted-before"
  _old=$(mx_domid "$_d")
  xl destroy "$_d" >/dev/null 2>&1
  _seen=$(mx_wait_entries "$_old" "" 30)
  _cfg=$XV_RUN/$_d-reboot.cfg
  sed "s/@XVMODE@/$XV_MODE xvboot=reboot xvdisk=1/g" "/etc/xen/$_d.cfg" >"$_cfg"
  # Paused until the daemon has given the new domid its devices back, so that the init script
  # finds them at once (as a guest whose devices are in its xl config would).
  if ! _out=$(xv_create_held "$_d" "$_cfg" 2>&1); then
    mx_check "$_d" disk-reboot FAIL "xl create $_d again failed: $(echo "$_out" | grep -i -m 2 'error\|fail' | xv_oneline)"
    return
  fi
  _new=$(cat "$XV_RUN/$_d.domid")
  _seen=$(mx_wait_entries "$_new" "0 1 2" 30)
  xl unpause "$_d"
  if ! xv_domu_wait_boot "$_d" 300 boot-reboot || ! xv_agent_wait "$_d" 120; then
    mx_check "$_d" disk-reboot FAIL "$_d (domid $_old -> $_new, devices '$_seen') did not boot again with its agent"
    return
  fi
  _out=$(mx_in "$_d" 60 "cat /run/xv/disk-boot.log; echo digest=\$(kn_tree_digest)")
  if mx_line '^init-script=0$' "$_out" >/dev/null && mx_line '^mount-a=0$' "$_out" >/dev/null &&
    mx_line ' /mnt/data ext4 ' "$_out" >/dev/null && mx_line "^digest=$_digest\$" "$_out" >/dev/null; then
    mx_check "$_d" disk-reboot PASS "destroyed and created again (domid $_old -> $_new, devices $_seen back from the daemon's book): at boot the init script brought the disk up ($(mx_line 'kernel block device' "$_out" | xv_oneline)), the fstab mounted LABEL=xvdata ($(mx_line ' /mnt/data ' "$_out" | cut -d' ' -f1-3)), and the 8 files read back (digest $_digest)"
  else
    mx_check "$_d" disk-reboot FAIL "domid $_old -> $_new, devices '$_seen', digest before $_digest: $(echo "$_out" | tail -n 8 | xv_oneline)"
  fi
  mx_in "$_d" 120 "umount /mnt/data 2>/dev/null; /etc/init.d/xenvirtio-frontend stop" >/dev/null
  mx_serve_cell "$_d" serve-after-reboot
}

# kn_bench_ref DOMAIN: the user-space frontend's own figures in this boot, for kn_dd_cell to
# compare with: `xenvirtio-frontend bench --depth 1` sequential writes and reads of 4 KiB and
# 128 KiB for 3 s each, taken once, while no serve holds the device. Sets KN_REF_<write|read>_<4|128>
# (MiB/s; 0 when the bench failed).
kn_bench_ref() {
  local _d _p _bs _out _v
  _d=$1
  [ -z "$KN_REF_write_4" ] || return 0
  mx_stop_serve "$_d"
  for _p in write read; do
    for _bs in 4 128; do
      _out=$(mx_in "$_d" 60 "$MX_FE bench --devid 0 --pattern $_p --bs $((_bs * 1024)) --depth 1 --seconds 3")
      _v=$(mx_line ' requests: ' "$_out" | sed -n 's/.* IOPS, \([0-9.]*\) MiB\/s.*/\1/p')
      eval "KN_REF_${_p}_$_bs=${_v:-0}"
    done
  done
}

# kn_dd_cell DOMAIN: what an operator's first measurement gives: dd with O_DIRECT (one request
# at a time) on the kernel device, 4 MiB in 4 KiB blocks and 16 MiB in 128 KiB blocks, written
# then read, each as MiB/s and as a ratio of kn_bench_ref's figure for the same size and
# direction. A figure, not a timed assertion: it fails only when a dd fails. Checks <path>-dd.
kn_dd_cell() {
  local _d _out _line _k _mib _rate _ref _detail= _bad=
  _d=$1
  _out=$(mx_in "$_d" 300 "t() { s=\$(cut -d' ' -f1 /proc/uptime); \"\$@\" 2>/dev/null || { echo failed; return; }; echo \$s \$(cut -d' ' -f1 /proc/uptime); };
    echo write_4 \$(t dd if=/dev/zero of=$KN_DEV bs=4k count=1024 seek=2048 oflag=direct);
    echo write_128 \$(t dd if=/dev/zero of=$KN_DEV bs=128k count=128 seek=64 oflag=direct);
    echo read_4 \$(t dd if=$KN_DEV of=/dev/null bs=4k count=1024 skip=2048 iflag=direct);
    echo read_128 \$(t dd if=$KN_DEV of=/dev/null bs=128k count=128 skip=64 iflag=direct)")
  for _k in write_4 write_128 read_4 read_128; do
    _line=$(mx_line "^$_k " "$_out")
    case $_k in *_4) _mib=4 ;; *) _mib=16 ;; esac
    _rate=$(echo "$_line" | awk -v m="$_mib" 'NF == 3 && $3 > $2 { printf "%.2f", m / ($3 - $2) }')
    if [ -z "$_rate" ]; then
      _bad="$_bad $_k: '$(echo "$_line" | xv_oneline)'"
      continue
    fi
    eval "_ref=\${KN_REF_$_k:-0}"
    _detail="$_detail; ${_k%_*} ${_k#*_} KiB $_rate MiB/s ($(awk -v a="$_rate" -v b="$_ref" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "?" }') of bench's $_ref)"
  done
  if [ -z "$_bad" ]; then
    mx_check "$_d" "$KN_NAME-dd" PASS "dd on $KN_DEV with O_DIRECT, one request at a time, against bench --depth 1 of the same size in this boot${_detail}"
  else
    mx_check "$_d" "$KN_NAME-dd" FAIL "dd on $KN_DEV:$_bad"
  fi
}

# kn_ioctl_cells DOMAIN: the NBD path once more through the kernel's old ioctl interface
# (`--nbd-interface ioctl`: NBD_SET_SOCK, NBD_DO_IT), the fallback for kernels without the
# netlink family: serve must say it used ioctl, the filesystem cell passes on it, and a SIGTERM
# gives the device back. Checks knbd-serve-ioctl, knbd-fs-ioctl, knbd-disconnect-ioctl.
kn_ioctl_cells() {
  local _serve
  _serve=$KN_SERVE
  KN_SERVE="$KN_SERVE --nbd-interface ioctl" KN_SUFFIX=-ioctl KN_WANT='(NBD ioctl, '
  if kn_serve_cell "$1"; then
    kn_fs_cell "$1"
    kn_disconnect_cell "$1"
  fi
  KN_SERVE=$_serve KN_SUFFIX='' KN_WANT=''
}

# kn_other_strategies DOMAIN: the strategies DOMAIN's role allows besides its default
# (matrix-dom0.sh's policy table).
kn_other_strategies() {
  local _s
  for _s in $(mx_strategies "$1"); do
    [ "$_s" = "$(mx_default_dma "$1")" ] || echo "$_s"
  done
}

# kn_cells DOMAIN: every kernel block-device cell in DOMAIN, then DOMAIN's plain export again.
kn_cells() {
  kn_bench_ref "$1"
  if kn_serve_cell "$1"; then
    kn_raw_cell "$1"
    kn_dd_cell "$1"
    kn_fs_cell "$1"
    kn_restart_cell "$1" TERM
    kn_restart_cell "$1" KILL
    kn_disconnect_cell "$1"
    # shellcheck disable=SC2046 # a list of strategies
    kn_strategy_cells "$1" $(kn_other_strategies "$1")
    [ "$KN_PATH" != nbd ] || kn_ioctl_cells "$1"
    kn_detach_cell "$1"
  fi
  mx_serve_cell "$1" "serve-after-$KN_NAME"
}
