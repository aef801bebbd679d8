#!/usr/bin/env bash
# install-deps.sh: install what xenvirtio's build, tests and real-Xen runs need on a Debian 12 host.
# Idempotent and quiet when everything is already there. Needs root for apt (or sudo).
set -euo pipefail

APT_PKGS=(
  # real Xen under QEMU (scripts/e2e.sh, scripts/demo.sh)
  qemu-system-x86 qemu-system-arm device-tree-compiler cpio kmod xz-utils perl python3
  file binutils shellcheck
  # static aarch64 binaries for the arm64 images
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  # Debian's real C xenstored and its tools, for the host integration tests
  xenstore-utils xen-utils-4.17 libxen-dev
  # real NBD clients for the export tests
  qemu-utils libnbd-bin
  # scripts/bench.sh's no-Xen figures: the loopback pair's NBD export against the image file
  fio
  # building the xenstored shim for the host integration tests; g++ for libFuzzer, which the
  # fuzz crate's replay test links (scripts/test.sh)
  gcc libc6-dev g++
)

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
missing_pkgs() {
  local p
  for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}
# Two passes: installing a newer QEMU can remove an older qemu-utils that conflicts with it (seen
# on a machine that came with one), so what is missing is looked at again after the install.
updated=0
for pass in 1 2; do
  mapfile -t missing < <(missing_pkgs)
  [ ${#missing[@]} -gt 0 ] || break
  echo "install-deps: apt-get install ${missing[*]} (pass $pass)"
  [ $updated = 1 ] || $SUDO apt-get update -qq
  updated=1
  # --no-install-recommends keeps QEMU's GUI stack out; qemu-utils is listed with qemu-system so
  # that apt picks one consistent QEMU version.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
done
mapfile -t missing < <(missing_pkgs)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: still not installed after apt-get install: ${missing[*]}" >&2
  exit 1
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found; install Rust with rustup first (https://rustup.rs)" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  have_c=$(rustup component list --installed 2>/dev/null)
  for c in rustfmt clippy; do
    grep -q "^$c" <<<"$have_c" || rustup component add "$c"
  done
  have_t=$(rustup target list --installed 2>/dev/null)
  for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -qx "$t" <<<"$have_t" || rustup target add "$t"
  done
fi
