#!/usr/bin/env bash
# test.sh: the whole test suite, as the README gives it and as CI runs it.
#   unit tests and host integration tests (Debian's real xenstored, no hypervisor)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
echo "== cargo test --workspace"
cargo test --workspace --all-targets
