#!/usr/bin/env bash
# fetch-debs.sh RELEASE DEBARCH DEST: download the Debian packages that the real-Xen images need
# for RELEASE (bookworm or trixie) and DEBARCH (amd64 or arm64) with `apt-get download` and unpack
# them with `dpkg -x` into DEST/stage. Nothing is installed on the host, and the host's apt
# configuration is not touched: apt runs with a private sources list, lists directory, cache and
# an empty dpkg status under DEST's parent (apt-RELEASE/), signed by Debian's archive keyring.
# The kernel is whatever linux-image-DEBARCH of RELEASE currently points at; its version goes to
# DEST/KVER, the Xen series to DEST/XEN and the hypervisor package's version to DEST/XEN_VERSION.
#
# DEST is a cache: when DEST/fetched.ok matches this package list, nothing is done. Otherwise the
# packages are fetched into a fresh directory that replaces DEST only once complete.
# Adapted from the reference recipe shared/xen-qemu/fetch-debs.sh.
set -euo pipefail
usage="usage: fetch-debs.sh bookworm|trixie amd64|arm64 DEST"
RELEASE=${1:?$usage}
DEBARCH=${2:?$usage}
DEST=${3:?$usage}
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=releases.sh
. "$HERE/releases.sh"
release_known "$RELEASE" || { echo "fetch-debs: unknown release '$RELEASE' (known: $XV_RELEASES)" >&2; exit 2; }
case $DEBARCH in amd64 | arm64) ;; *) echo "fetch-debs: unknown Debian architecture '$DEBARCH'" >&2; exit 2 ;; esac
LIST=$HERE/pkgs/$RELEASE-$DEBARCH.txt
[ -f "$LIST" ] || { echo "fetch-debs: no package list $LIST" >&2; exit 2; }
XEN=$(release_xen "$RELEASE")

stamp="release=$RELEASE pkgs=$(sha256sum <"$LIST" | cut -d' ' -f1)"
if [ -f "$DEST/fetched.ok" ] && [ "$(head -n1 "$DEST/fetched.ok")" = "$stamp" ]; then
  echo "fetch-debs: $RELEASE $DEBARCH packages cached in $DEST (Xen $(cat "$DEST/XEN_VERSION"), kernel $(cat "$DEST/KVER"))"
  exit 0
fi

# The private apt configuration of RELEASE, shared by its architectures.
APTDIR=$(dirname "$DEST")/apt-$RELEASE
apt_private "$APTDIR" "$RELEASE" "$DEBARCH" || exit 2
echo "fetch-debs: apt-get update for $RELEASE $DEBARCH (private lists in $APTDIR)"
apt-get "${APT_OPTS[@]}" update -qq
KPKG=$(apt-cache "${APT_OPTS[@]}" depends "linux-image-$DEBARCH" |
  sed -n 's/.*Depends: \(linux-image-[0-9][^:]*\).*/\1/p' | head -n1)
[ -n "$KPKG" ] || { echo "fetch-debs: cannot resolve linux-image-$DEBARCH in $RELEASE" >&2; exit 1; }

mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d "$DEST.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/debs" "$tmp/stage"
# apt-get download drops privileges to _apt: it needs a directory it can reach and write.
chmod 755 "$tmp"
chmod 777 "$tmp/debs"
mapfile -t pkgs < <(grep -v '^[[:space:]]*\(#\|$\)' "$LIST")
echo "fetch-debs: downloading ${#pkgs[@]} packages + $KPKG for $RELEASE $DEBARCH"
(cd "$tmp/debs" && apt-get "${APT_OPTS[@]}" download -qq "${pkgs[@]}" "$KPKG")
for d in "$tmp"/debs/*.deb; do dpkg -x "$d" "$tmp/stage"; done
hv=$(find "$tmp/debs" -name "xen-hypervisor-$XEN-${DEBARCH}_*.deb" | head -n1)
[ -n "$hv" ] || { echo "fetch-debs: no xen-hypervisor-$XEN-$DEBARCH package was fetched" >&2; exit 1; }
echo "${KPKG#linux-image-}" >"$tmp/KVER"
echo "$XEN" >"$tmp/XEN"
dpkg-deb -f "$hv" Version >"$tmp/XEN_VERSION"
echo "$RELEASE" >"$tmp/RELEASE"
{ echo "$stamp"; echo "kernel=${KPKG#linux-image-} xen=$(cat "$tmp/XEN_VERSION")"; date -u +%FT%TZ; } >"$tmp/fetched.ok"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "fetch-debs: fetched $(find "$DEST/debs" -name '*.deb' | wc -l) packages for $RELEASE $DEBARCH into $DEST: Xen $(cat "$DEST/XEN_VERSION"), kernel $(cat "$DEST/KVER")"
