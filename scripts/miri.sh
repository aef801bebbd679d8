#!/usr/bin/env bash
# miri.sh: the tests of code that touches memory a peer domain writes concurrently, run under
# Miri, which reports a data race or any other undefined behaviour as an error. These tests
# run natively in `cargo test` too; only Miri sees the undefined behaviour of a plain memcpy of
# shared memory (issue 13, finding 4). Installs its pinned nightly toolchain (about 20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
# Pinned: Miri's checks change between nightlies, and a new false positive must not fail CI.
NIGHTLY=nightly-2026-10-29
if ! command -v rustup >/dev/null 2>&1; then
  echo "miri.sh: rustup is needed to install $NIGHTLY with Miri (https://rustup.rs)" >&2
  exit 1
fi
if ! rustup run "$NIGHTLY" cargo miri --version >/dev/null 2>&1; then
  rustup toolchain install "$NIGHTLY" --profile minimal --component miri,rust-src
fi
# File I/O and ioctls are outside Miri's isolation: only the tests of pure memory code.
cargo "+$NIGHTLY" miri test -p xenvirtio-xen --lib -- \
  mem::tests::hostile_peer mem::tests::copies_are mem::tests::copy_from_moves \
  mem::tests::bounds_and mem::tests::atomics_are
