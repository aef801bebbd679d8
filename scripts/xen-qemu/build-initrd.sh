#!/usr/bin/env bash
# build-initrd.sh ARCH DEBS OUT PACKAGE: build the Dom0 and DomU initramfs for ARCH (x86_64|arm64).
#   DEBS    the fetch-debs.sh directory of that arch (DEBS/stage, DEBS/KVER)
#   OUT     where the images go: OUT/dom0.cpio, OUT/domU.cpio.gz (+ x86_64: OUT/xen)
#   PACKAGE the project's .deb for ARCH (scripts/build-deb.sh), installed into every domain
# Staging trees are left in OUT/initrd-dom0 and OUT/initrd-domU (e2e.sh removes them unless --keep).
# Adapted from the reference recipe shared/xen-qemu/{x86,arm}/build-initrd.sh.
set -euo pipefail
ARCH=${1:?usage: build-initrd.sh x86_64|arm64 DEBS OUT PACKAGE}
DEBS=${2:?} OUT=${3:?} PACKAGE=${4:?}
HERE=$(cd "$(dirname "$0")" && pwd)
S=$DEBS/stage
KVER=$(cat "$DEBS/KVER")
M=lib/modules/$KVER
# Raised from the driver's default of 1024 grants per domain: the virtio DMA arenas need more.
# Xen 4.17's default grant table (64 frames, v1) holds 32768 entries per domain.
GNTALLOC_LIMIT=32768
case $ARCH in
  x86_64) TRIPLET=x86_64-linux-gnu LDSO=lib64/ld-linux-x86-64.so.2 ;;
  arm64) TRIPLET=aarch64-linux-gnu LDSO=lib/ld-linux-aarch64.so.1 ;;
  *) echo "build-initrd: unknown arch $ARCH" >&2; exit 2 ;;
esac
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
mkdir -p "$U"/{bin,proc,sys,dev,run,tmp,lib/modules}
cp "$S/bin/busybox" "$U/bin/busybox"
install -m 755 "$HERE/guest/domU-init" "$U/init"
# no dependencies between them: plain insmod; /dev/xen/xenbus is built into the kernel
for m in xen-evtchn xen-gntalloc xen-gntdev; do
  cp "$S/$M/kernel/drivers/xen/$m.ko" "$U/lib/modules/"
done
# The kernel's NBD driver and ext4 (for ext2 filesystems on it), loaded by the kernel
# block-device cells (tests/knbd-lib.sh): nbd has no dependencies, ext4 needs jbd2, mbcache,
# crc16, and crc32c from the crypto API at mount.
for m in drivers/block/nbd fs/ext4/ext4 fs/jbd2/jbd2 fs/mbcache lib/crc16 crypto/crc32c_generic; do
  cp "$S/$M/kernel/$m.ko" "$U/lib/modules/"
done
add_xv "$U"
add_project_bins "$U"
(cd "$U" && find . | cpio -o -H newc --quiet) | gzip -1 >"$OUT/domU.cpio.gz"

# ---------- Dom0: the toolstack, all Xen modules, the DomU kernel and initramfs ----------
mkdir -p "$R"/{bin,sbin,proc,sys,dev,tmp,run,root,etc,boot,usr/bin,usr/sbin,usr/lib/xen-4.17/bin}
mkdir -p "$R"/var/{run/xen,run/xenstored,lib/xen,lib/xenstored,log/xen/console,lock}
cp "$S/bin/busybox" "$R/bin/busybox"
install -m 755 "$HERE/guest/dom0-init" "$R/init"
add_xv "$R"
add_project_bins "$R"
mkdir -p "$R/$(dirname "$LDSO")" "$R/lib/$TRIPLET" "$R/usr/lib/$TRIPLET"
cp -a "$S/$LDSO" "$R/$LDSO"
# all of it: xl dlopens, and libgcc_s.so.1 must be there for pthread_cancel
cp -a "$S/lib/$TRIPLET"/*.so* "$R/lib/$TRIPLET/"
cp -a "$S/usr/lib/$TRIPLET"/*.so* "$R/usr/lib/$TRIPLET/"
for b in xl xenstored xenconsoled xen-init-dom0 xenstore-control; do
  cp "$S/usr/lib/xen-4.17/bin/$b" "$R/usr/lib/xen-4.17/bin/"
  ln -sf "/usr/lib/xen-4.17/bin/$b" "$R/usr/sbin/$b"
done
cp "$S/usr/bin/xenstore" "$R/usr/bin/"
for t in read write list rm watch exists ls chmod; do ln -sf xenstore "$R/usr/bin/xenstore-$t"; done
cp -a "$S/etc/xen" "$R/etc/"
mkdir -p "$R/$M/kernel/drivers"
cp -a "$S/$M/kernel/drivers/xen" "$R/$M/kernel/drivers/"
cp "$S/$M"/modules.{order,builtin,builtin.modinfo} "$R/$M/" 2>/dev/null || true
depmod -b "$R" "$KVER"
cp "$OUT/domU.cpio.gz" "$R/boot/domU.cpio.gz"
case $ARCH in
  x86_64)
    # QEMU's multiboot loader wants the (32-bit ELF) hypervisor uncompressed
    [ -s "$OUT/xen" ] || gunzip -c "$S/boot/xen-4.17-amd64.gz" >"$OUT/xen"
    # DomU kernel: the uncompressed ELF vmlinux (xz decompression in xl costs ~5 s under TCG)
    if [ ! -s "$OUT/vmlinux-$KVER" ]; then
      python3 - "$S/boot/vmlinuz-$KVER" "$OUT/vmlinux-$KVER" <<'EOF'
import subprocess, sys
d = open(sys.argv[1], 'rb').read()
o = d.find(b'\xfd7zXZ\x00')
if o < 0:
    sys.exit('no xz stream in ' + sys.argv[1])
out = subprocess.run(['xz', '-dc'], input=d[o:], capture_output=True).stdout
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
