#!/usr/bin/env bash
# test-readme.sh: runs README.md's "Try it without Xen" block as a new user would, so that the
# README's own steps cannot break unnoticed (issue 16, item 7). The block's first part (up to the
# line that says "in another terminal") runs in the background, the rest once it is ready; its
# /tmp paths are moved into a private directory, nothing else is changed. Prints one PASS or
# FAIL line; exits non-zero on failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
T=$(mktemp -d /tmp/xv-readme.XXXXXX)
LB_PID=
cleanup() {
  [ -z "$LB_PID" ] || kill "$LB_PID" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT
fail() {
  echo "FAIL readme-try-out: $*"
  exit 1
}

# The first ```sh block after the "## Try it without Xen" heading.
block=$(awk '/^## Try it without Xen/ { s = 1 } s && /^```sh/ { b = 1; next } b && /^```/ { exit } b' README.md)
[ -n "$block" ] || fail "no sh block under '## Try it without Xen' in README.md"
block=${block//\/tmp\//$T/}
first=$(sed '/in another terminal/,$d' <<<"$block")
second=$(sed -n '/in another terminal/,$p' <<<"$block" | sed 1d)
[ -n "$second" ] || fail "the block has no 'in another terminal' part"
echo "== README try-out, first terminal:"
sed 's/^/   /' <<<"$first"
# Every line but the last (the server) runs to completion; the server runs in the background.
setup=$(sed '$d' <<<"$first")
server=$(tail -n 1 <<<"$first" | sed 's/ *#.*$//')
bash -euo pipefail -c "$setup" >"$T/setup.log" 2>&1 || fail "the setup lines failed: $(tail -n 5 "$T/setup.log")"
bash -c "exec $server" >"$T/server.out" 2>"$T/server.err" &
LB_PID=$!
for _ in $(seq 1 200); do
  grep -q '^ready' "$T/server.out" 2>/dev/null && break
  kill -0 "$LB_PID" 2>/dev/null || fail "the server exited: $(tail -n 5 "$T/server.err")"
  sleep 0.1
done
grep -q '^ready' "$T/server.out" || fail "the server never said ready: $(cat "$T/server.out")"
echo "== README try-out, second terminal:"
sed 's/^/   /' <<<"$second"
out=$(bash -euo pipefail -c "$second" 2>&1) || fail "the second terminal's commands failed: $out"
if grep -q -E 'failed|error|mismatch' <<<"$out"; then
  fail "the client reported a problem: $out"
fi
grep -q 'wrote 65536/65536 bytes at offset 1048576' <<<"$out" || fail "qemu-io did not write: $out"
grep -q 'read 65536/65536 bytes at offset 1048576' <<<"$out" || fail "qemu-io did not read back: $out"
kill -INT "$LB_PID"
rc=0
wait "$LB_PID" || rc=$?
LB_PID=
[ "$rc" = 0 ] || fail "the server exited $rc after Ctrl-C: $(tail -n 5 "$T/server.err")"
echo "PASS readme-try-out: README's block ran as written (build, image, loopback, nbdinfo, qemu-io write and read-back, Ctrl-C)"
