#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ and runs each for N seconds; fails on any crash,
# invariant violation, leak, timeout or out-of-memory, printing the reproducer's path.
#
#   scripts/fuzz.sh [--seconds N] [--sanitizer address|none] [--jobs J] [TARGET...]
#
# Needs: the stable Rust toolchain, a C++ compiler (libFuzzer is built from source by
# libfuzzer-sys) and cargo-fuzz (`cargo install cargo-fuzz --locked`; installed here if
# missing). cargo-fuzz passes `-Z` flags (sanitizers, coverage options), which the stable
# compiler accepts only with RUSTC_BOOTSTRAP=1: that is set for the fuzz build alone.
#
# Corpora grow in fuzz/corpus/<target> (seeded from the unit tests' cases by
# fuzz/examples/write_seeds.rs), reproducers land in fuzz/artifacts/<target>; both are
# git-ignored. To reproduce a crash: `RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz TARGET
# fuzz/artifacts/TARGET/crash-...`, or add the file under fuzz/regressions/TARGET/ and run
# `cargo test --manifest-path fuzz/Cargo.toml --release` (stable, no libFuzzer).
set -euo pipefail

seconds=30
sanitizer=address
jobs=1
targets=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --sanitizer) sanitizer="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$root/fuzz"
cd "$root"

all_targets=()
for f in "$fuzz"/fuzz_targets/*.rs; do
    all_targets+=("$(basename "$f" .rs)")
done
if [[ ${#targets[@]} -eq 0 ]]; then
    targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
    if [[ ! -f "$fuzz/fuzz_targets/$t.rs" ]]; then
        echo "no fuzz target $t (have: ${all_targets[*]})" >&2
        exit 2
    fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The seed writer and the replay test are ordinary stable builds: keep them out of the
# libFuzzer build's directory so neither rebuilds the other.
seed_target="$fuzz/target/seeds"
echo "== writing seed corpora"
CARGO_TARGET_DIR="$seed_target" cargo run --quiet \
    --manifest-path "$fuzz/Cargo.toml" --example write_seeds -- "$fuzz/corpus" "${targets[@]}"

echo "== building ${targets[*]} (sanitizer: $sanitizer)"
build_start=$(date +%s)
for t in "${targets[@]}"; do
    RUSTC_BOOTSTRAP=1 cargo fuzz build --fuzz-dir "$fuzz" --sanitizer "$sanitizer" \
        --debug-assertions "$t"
done
echo "   built in $(( $(date +%s) - build_start )) s"

failed=()
run_start=$(date +%s)
for t in "${targets[@]}"; do
    echo "== fuzzing $t for $seconds s"
    artifacts="$fuzz/artifacts/$t"
    mkdir -p "$artifacts" "$fuzz/corpus/$t"
    log="$fuzz/artifacts/$t.log"
    reproducers() { ls -t "$artifacts" | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || true; }
    before=$(reproducers | wc -l)
    parallel=()
    if [[ $jobs -gt 1 ]]; then
        parallel=(-jobs="$jobs" -workers="$jobs")
    fi
    # -timeout: one input may take at most 20 s (a hang is a finding);
    # -rss_limit_mb / -malloc_limit_mb: a peer must not make us allocate without bound.
    if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir "$fuzz" --sanitizer "$sanitizer" \
        --debug-assertions "$t" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
        "${parallel[@]}" -print_final_stats=1 >"$log" 2>&1; then
        failed+=("$t")
        echo "!! $t FAILED; the end of $log:"
        tail -n 40 "$log"
    fi
    after=$(reproducers | wc -l)
    if [[ $after -gt $before ]]; then
        for f in $(reproducers | head -n $(( after - before ))); do
            echo "!! reproducer: $artifacts/$f"
        done
        [[ " ${failed[*]} " == *" $t "* ]] || failed+=("$t")
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)' "$log" || true
done
echo "== fuzzed ${#targets[@]} targets in $(( $(date +%s) - run_start )) s"

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all fuzz targets ran clean"
