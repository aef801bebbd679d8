#!/usr/bin/env bash
# fetch-debs.sh DEBARCH DEST: download the Debian packages that the real-Xen images need for
# DEBARCH (amd64 or arm64) with `apt-get download` and unpack them with `dpkg -x` into DEST/stage.
# Nothing is installed on the host. The kernel is whatever linux-image-DEBARCH currently points at;
# its version goes to DEST/KVER.
#
# DEST is a cache: when DEST/fetched.ok matches this package list, nothing is done. Otherwise the
# packages are fetched into a fresh directory that replaces DEST only once complete.
# Adapted from the reference recipe shared/xen-qemu/fetch-debs.sh.
set -euo pipefail
DEBARCH=${1:?usage: fetch-debs.sh amd64|arm64 DEST}
DEST=${2:?usage: fetch-debs.sh amd64|arm64 DEST}
HERE=$(cd "$(dirname "$0")" && pwd)
LIST=$HERE/pkgs-$DEBARCH.txt
[ -f "$LIST" ] || { echo "fetch-debs: no package list $LIST" >&2; exit 2; }

stamp="pkgs=$(sha256sum <"$LIST" | cut -d' ' -f1)"
if [ -f "$DEST/fetched.ok" ] && [ "$(head -n1 "$DEST/fetched.ok")" = "$stamp" ]; then
  echo "fetch-debs: $DEBARCH packages cached in $DEST (kernel $(cat "$DEST/KVER"))"
  exit 0
fi

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
if [ "$DEBARCH" != "$(dpkg --print-architecture)" ] &&
  ! dpkg --print-foreign-architectures | grep -qx "$DEBARCH"; then
  echo "fetch-debs: dpkg --add-architecture $DEBARCH"
  $SUDO dpkg --add-architecture "$DEBARCH"
  $SUDO apt-get update -qq
fi
# A fresh machine may never have fetched the index of the Xen packages.
if ! apt-cache policy "xen-hypervisor-4.17-$DEBARCH:$DEBARCH" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
  $SUDO apt-get update -qq
fi
KPKG=$(apt-cache depends "linux-image-$DEBARCH:$DEBARCH" |
  sed -n 's/.*Depends: \(linux-image-[0-9][^:]*\).*/\1/p' | head -n1)
[ -n "$KPKG" ] || { echo "fetch-debs: cannot resolve linux-image-$DEBARCH" >&2; exit 1; }

mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d "$DEST.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/debs" "$tmp/stage"
# apt-get download drops privileges to _apt: it needs a directory it can reach and write.
chmod 755 "$tmp"
chmod 777 "$tmp/debs"
mapfile -t pkgs < <(grep -v '^[[:space:]]*\(#\|$\)' "$LIST" | sed "s/\$/:$DEBARCH/")
echo "fetch-debs: downloading ${#pkgs[@]} packages + $KPKG for $DEBARCH"
(cd "$tmp/debs" && apt-get download -qq "${pkgs[@]}" "$KPKG:$DEBARCH")
for d in "$tmp"/debs/*.deb; do dpkg -x "$d" "$tmp/stage"; done
echo "${KPKG#linux-image-}" >"$tmp/KVER"
{ echo "$stamp"; echo "kernel=${KPKG#linux-image-}"; date -u +%FT%TZ; } >"$tmp/fetched.ok"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "fetch-debs: fetched $(find "$DEST/debs" -name '*.deb' | wc -l) packages for $DEBARCH into $DEST, kernel $(cat "$DEST/KVER")"
