#!/usr/bin/env bash
# fetch-tools.sh RELEASE DEBARCH DEST PACKAGE...: download Debian's PACKAGEs of RELEASE for
# DEBARCH with every library package they depend on, directly or not, and unpack them into
# DEST/stage: the guest tools (fio for scripts/bench.sh) that build-initrd.sh carries into the
# images with add_elf. Only packages named lib* (and zlib1g) are taken from the dependency
# closure: a program's libraries, not the interpreters, daemons and scripts its package also
# depends on. The private apt configuration is fetch-debs.sh's (releases.sh apt_private); the
# host's apt is not touched.
#
# DEST is a cache: when DEST/fetched.ok names the same release and packages, nothing is done.
set -euo pipefail
usage="usage: fetch-tools.sh bookworm|trixie amd64|arm64 DEST PACKAGE..."
RELEASE=${1:?$usage}
DEBARCH=${2:?$usage}
DEST=${3:?$usage}
shift 3
[ $# -gt 0 ] || { echo "$usage" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=releases.sh
. "$HERE/releases.sh"
release_known "$RELEASE" || { echo "fetch-tools: unknown release '$RELEASE' (known: $XV_RELEASES)" >&2; exit 2; }
stamp="release=$RELEASE arch=$DEBARCH tools=$*"
if [ -f "$DEST/fetched.ok" ] && [ "$(head -n1 "$DEST/fetched.ok")" = "$stamp" ]; then
  echo "fetch-tools: $* for $RELEASE $DEBARCH cached in $DEST"
  exit 0
fi
apt_private "$(dirname "$DEST")/apt-$RELEASE" "$RELEASE" "$DEBARCH" || exit 2
apt-get "${APT_OPTS[@]}" update -qq
# The closure: apt-cache prints each package once at the start of a line; virtual packages
# come as <name>.
mapfile -t pkgs < <(apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests \
  --no-conflicts --no-breaks --no-replaces --no-enhances "$@" |
  grep -E '^(lib|zlib1g)[^ <]*$' | sort -u)
mkdir -p "$(dirname "$DEST")"
tmp=$(mktemp -d "$DEST.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/debs" "$tmp/stage"
chmod 755 "$tmp"
chmod 777 "$tmp/debs" # apt-get download drops privileges to _apt
echo "fetch-tools: downloading $* and ${#pkgs[@]} library packages for $RELEASE $DEBARCH"
(cd "$tmp/debs" && apt-get "${APT_OPTS[@]}" download -qq "$@" "${pkgs[@]}")
for d in "$tmp"/debs/*.deb; do dpkg -x "$d" "$tmp/stage"; done
for p in "$@"; do
  v=$(dpkg-deb -f "$(ls "$tmp/debs/${p}_"*.deb)" Version)
  echo "$p $v" >>"$tmp/VERSIONS"
done
{ echo "$stamp"; cat "$tmp/VERSIONS"; date -u +%FT%TZ; } >"$tmp/fetched.ok"
rm -rf "$DEST"
mv "$tmp" "$DEST"
trap - EXIT
echo "fetch-tools: $(paste -sd' ' "$DEST/VERSIONS") and $(find "$DEST/debs" -name '*.deb' | wc -l) packages in all for $RELEASE $DEBARCH in $DEST"
