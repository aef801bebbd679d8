#!/usr/bin/env bash
# build-initrd.sh ARCH DEBS OUT PACKAGE: build the Dom0 and DomU initramfs for ARCH (x86_64|arm64).
#   DEBS    the fetch-debs.sh directory of that release and arch (DEBS/stage, DEBS/KVER, DEBS/XEN)
#   OUT     where the images go: OUT/dom0.cpio, OUT/domU.cpio.gz (+ x86_64: OUT/xen)
#   PACKAGE the project's .deb for ARCH (scripts/build-deb.sh), installed into every domain
#   TOOLS   optional: a fetch-tools.sh directory (TOOLS/stage): its fio goes into Dom0 and the
#           DomU, with its libraries (scripts/bench.sh)
# Staging trees are left in OUT/initrd-dom0 and OUT/initrd-domU (e2e.sh removes them unless --keep).
# Adapted from the reference recipe shared/xen-qemu/{x86,arm}/build-initrd.sh.
set -euo pipefail
ARCH=${1:?usage: build-initrd.sh x86_64|arm64 DEBS OUT PACKAGE}
DEBS=${2:?} OUT=${3:?} PACKAGE=${4:?} TOOLS=${5:-}
HERE=$(cd "$(dirname "$0")" && pwd)
S=$DEBS/stage
KVER=$(cat "$DEBS/KVER")
XEN=$(cat "$DEBS/XEN")
RELEASE=$(cat "$DEBS/RELEASE")
M=lib/modules/$KVER
# Raised from the driver's default of 1024 grants per domain: the virtio DMA arenas need more.
# The default grant table of Xen 4.17 and 4.20 (64 frames, v1) holds 32768 entries per domain.
GNTALLOC_LIMIT=32768

# The unpacked packages: the release's, then the tools'.
STAGES=("$S")
[ -z "$TOOLS" ] || STAGES+=("$TOOLS/stage")
# staged REL: the path of REL (e.g. bin/busybox) in the unpacked packages. Debian 13's packages
# are merged-/usr (usr/bin, usr/lib/modules); Debian 12's kernel and busybox are not.
staged() {
  local st
  for st in "${STAGES[@]}"; do
    if [ -e "$st/$1" ]; then echo "$st/$1"; return 0; fi
    if [ -e "$st/usr/$1" ]; then echo "$st/usr/$1"; return 0; fi
  done
  echo "build-initrd: $1 is in none of the $RELEASE packages" >&2
  return 1
}
MODS=$(staged "$M")
# add_module ROOT REL: the kernel module REL (e.g. drivers/block/nbd) into ROOT's module tree at
# its own path, uncompressed: Debian 13 ships its modules xz-compressed, and decompressing them
# once here spares the guest's kmod the work at every boot under TCG.
add_module() {
  local dst=$1/$M/kernel/$2.ko
  mkdir -p "$(dirname "$dst")"
  if [ -f "$MODS/kernel/$2.ko" ]; then
    cp "$MODS/kernel/$2.ko" "$dst"
  elif [ -f "$MODS/kernel/$2.ko.xz" ]; then
    xz -dc "$MODS/kernel/$2.ko.xz" >"$dst"
  else
    echo "build-initrd: no module $2 in $MODS" >&2
    return 1
  fi
}
# add_kmod ROOT: Debian's kmod (modprobe, insmod, rmmod, lsmod, modinfo, depmod) into ROOT with
# its libraries, and ROOT's module tree indexed as the kernel package's postinst would
# (modules.dep, modules.alias: what modprobe and the kernel's own request_module, e.g. for
# crc32c at an ext4 mount, resolve names and dependencies with). The index is written by the
# host's depmod on ROOT's tree (`depmod -b`), since the guest's kmod cannot run here for arm64.
add_kmod() {
  local t
  add_elf "$1" bin/kmod
  mkdir -p "$1/sbin"
  for t in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf /bin/kmod "$1/sbin/$t"; done
  cp "$MODS"/modules.{order,builtin,builtin.modinfo} "$1/$M/" 2>/dev/null || true
  sed -i 's/\.ko\.xz$/.ko/' "$1/$M/modules.order"
  depmod -b "$1" "$KVER"
}
case $ARCH in
  x86_64) TRIPLET=x86_64-linux-gnu LDSO=lib64/ld-linux-x86-64.so.2 ;;
  arm64) TRIPLET=aarch64-linux-gnu LDSO=lib/ld-linux-aarch64.so.1 ;;
  *) echo "build-initrd: unknown arch $ARCH" >&2; exit 2 ;;
esac
# add_elf ROOT REL: the dynamically linked program REL of the packages (e.g. sbin/e2fsck, or
# usr/bin/fio of the tools) into ROOT/REL, with the dynamic loader and every library it needs,
# found by their DT_NEEDED names (readelf reads either arch) in the packages' library
# directories and in the RUNPATH of the object that needs them (librados looks in
# /usr/lib/<triplet>/ceph). A library goes where the loader will look for it: ROOT/lib/<triplet>,
# or its RUNPATH directory. A library that none of the packages has stops the build: a program
# that cannot start in the guest is not carried.
add_elf() {
  local root=$1 rel=$2 lib dir found f st rp
  local -a todo next dirs
  local -A seen=()
  mkdir -p "$root/$(dirname "$rel")" "$root/$(dirname "$LDSO")" "$root/lib/$TRIPLET"
  cp -L "$(staged "$rel")" "$root/$rel"
  [ -e "$root/$LDSO" ] || cp -L "$(staged "$LDSO")" "$root/$LDSO"
  todo=("$root/$rel")
  while [ ${#todo[@]} -gt 0 ]; do
    next=()
    for f in "${todo[@]}"; do
      rp=$(readelf -d "$f" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p' | tr ':' ' ')
      dirs=("lib/$TRIPLET" "usr/lib/$TRIPLET")
      for dir in $rp; do dirs+=("${dir#/}"); done
      for lib in $(readelf -d "$f" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        [ -z "${seen[$lib]:-}" ] || continue
        seen[$lib]=1
        found=
        for dir in "${dirs[@]}"; do
          [ ! -e "$root/$dir/$lib" ] || { found=$dir; break; }
        done
        # already in ROOT (Dom0 has the release's libraries): what it needs may not be
        if [ -n "$found" ]; then
          next+=("$root/$found/$lib")
          continue
        fi
        for dir in "${dirs[@]}"; do
          for st in "${STAGES[@]}"; do
            [ -e "$st/$dir/$lib" ] && found=$dir && break 2
          done
        done
        [ -n "$found" ] || { echo "build-initrd: $rel needs $lib, which none of the $RELEASE packages has" >&2; return 1; }
        # the multiarch directories all become ROOT/lib/<triplet>, a RUNPATH stays itself
        case $found in "lib/$TRIPLET" | "usr/lib/$TRIPLET") dir=lib/$TRIPLET ;; *) dir=$found ;; esac
        mkdir -p "$root/$dir"
        cp -L "$st/$found/$lib" "$root/$dir/$lib"
        next+=("$root/$dir/$lib")
      done
    done
    todo=("${next[@]}")
  done
}
mkdir -p "$OUT"
R=$OUT/initrd-dom0
U=$OUT/initrd-domU
rm -rf "$R" "$U"

# add_xv ROOT: the guest half of the harness (lib, test scripts).
add_xv() {
  mkdir -p "$1/xv/lib" "$1/xv/tests"
  cp "$HERE/guest/xv-lib.sh" "$1/xv/lib/"
  cp "$HERE"/tests/*.sh "$1/xv/tests/"
  echo "$GNTALLOC_LIMIT" >"$1/xv/gntalloc-limit"
  # What the checks expect of this boot (tests/common.sh), and what the boot report prints.
  printf 'XV_RELEASE=%s\nXV_XEN=%s\nXV_XEN_VERSION=%s\nXV_KVER=%s\n' \
    "$RELEASE" "$XEN" "$(cat "$DEBS/XEN_VERSION")" "$KVER" >"$1/xv/release"
}

# add_project_bins ROOT: the project's package installed into ROOT (its binaries in /usr/bin,
# its systemd units, its docs), as dpkg would unpack it; the package's name is kept in
# /xv/package for the checks.
add_project_bins() {
  dpkg-deb -x "$PACKAGE" "$1"
  mkdir -p "$1/xv"
  dpkg-deb -f "$PACKAGE" Package Version Architecture | tr '\n' ' ' | sed 's/ $/\n/' >"$1/xv/package"
}

# ---------- DomU: busybox, the Xen device modules, the project binaries ----------
# No xenstore tools: the project's binaries speak xenstore over /dev/xen/xenbus themselves
# (the command channel's agent is `xenvirtio-selftest agent`).
mkdir -p "$U"/{bin,proc,sys,dev,run,tmp}
cp "$(staged bin/busybox)" "$U/bin/busybox"
install -m 755 "$HERE/guest/domU-init" "$U/init"
# The Xen device modules; /dev/xen/xenbus is built into the kernel.
for m in xen-evtchn xen-gntalloc xen-gntdev; do
  add_module "$U" "drivers/xen/$m"
done
# The kernel's NBD driver and ext4 with what it needs (jbd2, mbcache, crc16, and crc32c, which
# the crypto API asks modprobe for at every mount), loaded by the kernel block-device cells
# (tests/knbd-lib.sh) and the package's init script.
for m in drivers/block/nbd fs/ext4/ext4 fs/jbd2/jbd2 fs/mbcache lib/crc16 crypto/crc32c_generic; do
  add_module "$U" "$m"
done
# VDUSE and the virtio drivers on top of it, where the release's kernel builds them (Debian 13's
# 6.12; Debian 12's 6.1 does not): vduse needs vhost_iotlb and vdpa, virtio_vdpa needs vdpa.
for m in drivers/vhost/vhost_iotlb drivers/vdpa/vdpa drivers/vdpa/vdpa_user/vduse \
  drivers/virtio/virtio_vdpa drivers/block/virtio_blk; do
  if [ -e "$MODS/kernel/$m.ko" ] || [ -e "$MODS/kernel/$m.ko.xz" ]; then
    add_module "$U" "$m"
  fi
done
# Linux's own PV block frontend, for the disk `xl block-attach` gives (scripts/bench.sh puts it
# beside ours).
add_module "$U" drivers/block/xen-blkfront
# The net device's interface in the guest is a TAP (tests/net-lib.sh); netfront, for the vif
# beside it.
for m in drivers/net/tun drivers/net/xen-netfront; do
  add_module "$U" "$m"
done
# The guest tools of scripts/bench.sh: Debian's fio, with its libraries.
[ -z "$TOOLS" ] || add_elf "$U" usr/bin/fio
# Debian's e2fsprogs: the cells make ext4 with mkfs.ext4 and check it with e2fsck -fn, as an
# operator would (busybox has only an ext2 mke2fs and no fsck).
add_elf "$U" sbin/mke2fs
add_elf "$U" sbin/e2fsck
ln -s mke2fs "$U/sbin/mkfs.ext4"
ln -s e2fsck "$U/sbin/fsck.ext4"
add_kmod "$U"
mkdir -p "$U/etc"
cp "$(staged etc/mke2fs.conf)" "$U/etc/mke2fs.conf"
# The guest's fstab, as an operator writes it for a disk the frontend brings up at boot: by the
# filesystem's label, which survives the device's name (domU-init mounts it when xvdisk=1).
echo 'LABEL=xvdata /mnt/data ext4 defaults 0 2' >"$U/etc/fstab"
# The init script serves the disk only: the matrix's own cells drive the console and rng
# devices, and once (bookworm arm64, 2026-12-07) a serve of all three hung the guest kernel's
# xenbus thread (docs/E2E.md, "Pitfalls").
mkdir -p "$U/etc/default"
echo 'XENVIRTIO_SERVE_ARGS="--devid 0"' >"$U/etc/default/xenvirtio-frontend"
add_xv "$U"
add_project_bins "$U"
(cd "$U" && find . | cpio -o -H newc --quiet) | gzip -1 >"$OUT/domU.cpio.gz"

# ---------- Dom0: the toolstack, all Xen modules, the DomU kernel and initramfs ----------
XENBIN=usr/lib/xen-$XEN/bin
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,root,etc,boot,usr/bin,usr/sbin,"$XENBIN"}
mkdir -p "$R"/var/{run/xen,run/xenstored,lib/xen,lib/xenstored,log/xen/console,lock}
cp "$(staged bin/busybox)" "$R/bin/busybox"
install -m 755 "$HERE/guest/dom0-init" "$R/init"
add_xv "$R"
add_project_bins "$R"
mkdir -p "$R/$(dirname "$LDSO")" "$R/lib/$TRIPLET" "$R/usr/lib/$TRIPLET"
cp -L "$(staged "$LDSO")" "$R/$LDSO"
# all of it: xl dlopens, and libgcc_s.so.1 must be there for pthread_cancel
[ ! -d "$S/lib/$TRIPLET" ] || cp -a "$S/lib/$TRIPLET"/*.so* "$R/lib/$TRIPLET/"
cp -a "$S/usr/lib/$TRIPLET"/*.so* "$R/usr/lib/$TRIPLET/"
for b in xl xenstored xenconsoled xen-init-dom0 xenstore-control; do
  cp "$S/$XENBIN/$b" "$R/$XENBIN/"
  ln -sf "/$XENBIN/$b" "$R/usr/sbin/$b"
done
cp "$S/usr/bin/xenstore" "$R/usr/bin/"
for t in read write list rm watch exists ls chmod; do ln -sf xenstore "$R/usr/bin/xenstore-$t"; done
cp -a "$S/etc/xen" "$R/etc/"
mkdir -p "$R/$M/kernel/drivers"
cp -a "$MODS/kernel/drivers/xen" "$R/$M/kernel/drivers/"
# blkback and the RAM disk it and the daemon serve in scripts/bench.sh
mkdir -p "$R/$M/kernel/drivers/block"
cp -a "$MODS/kernel/drivers/block/xen-blkback" "$MODS"/kernel/drivers/block/brd.ko* "$R/$M/kernel/drivers/block/"
# The net devices' side in Dom0: a TAP per device on a bridge (with stp and llc, which the bridge
# needs), and netback for the vif beside them.
for m in drivers/net/tun net/bridge/bridge net/802/stp net/llc/llc drivers/net/xen-netback/xen-netback; do
  add_module "$R" "$m"
done
# the tools of scripts/bench.sh: fio, and bash and flock (util-linux's: busybox has none) for
# Xen's hotplug script /etc/xen/scripts/block, which `xl block-attach` runs
if [ -n "$TOOLS" ]; then
  add_elf "$R" usr/bin/fio
  add_elf "$R" bin/bash
  add_elf "$R" usr/bin/flock
fi
find "$R/$M/kernel" -name '*.ko.xz' -exec xz -d {} +
add_kmod "$R"
cp "$OUT/domU.cpio.gz" "$R/boot/domU.cpio.gz"
case $ARCH in
  x86_64)
    # QEMU's multiboot loader wants the (32-bit ELF) hypervisor uncompressed
    gunzip -c "$S/boot/xen-$XEN-amd64.gz" >"$OUT/xen"
    # DomU kernel: the uncompressed ELF vmlinux (xz decompression in xl costs ~5 s under TCG).
    # Debian 12's bzImage holds an xz stream, Debian 13's a zstd one.
    if [ ! -s "$OUT/vmlinux-$KVER" ]; then
      python3 - "$S/boot/vmlinuz-$KVER" "$OUT/vmlinux-$KVER" <<'EOF'
import subprocess, sys
d = open(sys.argv[1], 'rb').read()
for magic, tool in ((b'\xfd7zXZ\x00', ['xz', '-dc']), (b'\x28\xb5\x2f\xfd', ['zstd', '-dcq'])):
    o = d.find(magic)
    if o >= 0:
        break
else:
    sys.exit('no xz or zstd stream in ' + sys.argv[1])
# The stream is followed by the bzImage's trailer: the tool may complain of trailing garbage.
out = subprocess.run(tool, input=d[o:], capture_output=True).stdout
if out[:4] != b'\x7fELF':
    sys.exit('decompressed kernel is not an ELF')
open(sys.argv[2], 'wb').write(out)
EOF
    fi
    cp "$OUT/vmlinux-$KVER" "$R/boot/vmlinux"
    # The PVH kernel that triple-faults on purpose (e2e.sh --induce-fault; fault/triple-fault.S)
    as --32 -o "$OUT/triple-fault.o" "$HERE/fault/triple-fault.S"
    ld -m elf_i386 -T "$HERE/fault/triple-fault.ld" -o "$R/boot/triple-fault" "$OUT/triple-fault.o"
    cp "$HERE"/guest/domU-pv.cfg "$HERE"/guest/domU-pvh.cfg "$R/etc/xen/"
    ;;
  arm64)
    cp "$S/boot/vmlinuz-$KVER" "$R/boot/Image"
    cp "$HERE"/guest/domU-arm.cfg "$R/etc/xen/"
    ;;
esac
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
(cd "$R" && find . | cpio -o -H newc --quiet) >"$OUT/dom0.cpio"
echo "build-initrd: $ARCH dom0.cpio $(du -h "$OUT/dom0.cpio" | cut -f1), domU.cpio.gz $(du -h "$OUT/domU.cpio.gz" | cut -f1)"
