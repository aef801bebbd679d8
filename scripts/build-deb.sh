#!/usr/bin/env bash
# build-deb.sh ARCH BINDIR OUTDIR: the Debian package of xenvirtio for ARCH (x86_64|arm64), from
# the static binaries in BINDIR (scripts/e2e.sh builds them: cargo build --profile release-static
# --target <arch>-unknown-linux-musl). Prints the package's path. The real-Xen images install
# this package (scripts/xen-qemu/build-initrd.sh), so the package itself is what is tested.
#
# Contents: /usr/bin/xenvirtio-{backend,frontend,loopback,selftest}, the systemd units of
# packaging/systemd in /lib/systemd/system, the guest's plain init script in /etc/init.d (a
# conffile), and README.md and docs/OPERATING.md in /usr/share/doc/xenvirtio. The binaries are static: the package depends on nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ARCH=${1:?usage: build-deb.sh x86_64|arm64 BINDIR OUTDIR}
BINDIR=${2:?} OUT=${3:?}
case $ARCH in
  x86_64) DEBARCH=amd64 ;;
  arm64 | aarch64) DEBARCH=arm64 ;;
  *) echo "build-deb: unknown arch $ARCH" >&2; exit 2 ;;
esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || { echo "build-deb: no version in Cargo.toml" >&2; exit 1; }
STAGE=$(mktemp -d)
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT
install -d "$STAGE/DEBIAN" "$STAGE/usr/bin" "$STAGE/lib/systemd/system" "$STAGE/usr/share/doc/xenvirtio"
for b in xenvirtio-backend xenvirtio-frontend xenvirtio-loopback xenvirtio-selftest; do
  [ -x "$BINDIR/$b" ] || { echo "build-deb: $BINDIR/$b is missing" >&2; exit 1; }
  install -m 0755 "$BINDIR/$b" "$STAGE/usr/bin/$b"
done
install -m 0644 "$ROOT"/packaging/systemd/*.service "$STAGE/lib/systemd/system/"
install -d "$STAGE/etc/init.d"
install -m 0755 "$ROOT/packaging/sysvinit/xenvirtio-frontend" "$STAGE/etc/init.d/"
install -m 0644 "$ROOT/README.md" "$ROOT/docs/OPERATING.md" "$STAGE/usr/share/doc/xenvirtio/"
cat >"$STAGE/usr/share/doc/xenvirtio/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: xenvirtio
Source: $(sed -n 's/^repository = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1)

Files: *
License: MIT or Apache-2.0
COPY
echo /etc/init.d/xenvirtio-frontend >"$STAGE/DEBIAN/conffiles"
size=$(du -ks "$STAGE/usr" "$STAGE/lib" "$STAGE/etc" | awk '{ s += $1 } END { print s }')
cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: xenvirtio
Version: $VERSION
Architecture: $DEBARCH
Maintainer: xenvirtio developers <xenvirtio@users.noreply.github.com>
Installed-Size: $size
Section: admin
Priority: optional
Homepage: $(sed -n 's/^repository = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1)
Description: virtio devices for Xen guests, over xenbus, in user space
 A backend daemon for Dom0 (xenvirtio-backend) serves virtio-blk, virtio-console and
 virtio-rng to Xen guests over grants and event channels, with no IOREQ server and no
 grant-DMA virtio in the guest kernel; a frontend for the guest (xenvirtio-frontend) drives
 them and gives the guest's kernel its disk: its own virtio-blk disk /dev/vdX through VDUSE
 where the kernel has it, else /dev/nbdN. xenvirtio-loopback tries both without Xen;
 xenvirtio-selftest checks a Xen host. Systemd units for both ends, and a plain init script
 for guests without systemd.
CONTROL
deb=$OUT/xenvirtio_${VERSION}_${DEBARCH}.deb
mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$deb" >/dev/null
echo "$deb"
