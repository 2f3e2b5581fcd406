#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a while, one after the other, on one core each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s, every target)
#
# Installs what it needs from a fresh clone: a nightly toolchain (rustup) and cargo-fuzz.
# Each target starts from its committed corpus in fuzz/corpus/<target>/ and adds what it finds
# there; a crash, a timeout or an out-of-memory input stops the run and is saved under
# fuzz/artifacts/<target>/ (turn it into a regression test in tests/properties/regressions.rs, then fix).
# The last libFuzzer stats line of each target (executions, corpus) is printed at the end.
#
# Environment: FUZZ_JOBS (parallel jobs per target, default 1), FUZZ_SANITIZER (address, the
# default, catches huge allocations at once; `none` builds and runs faster),
# FUZZ_RSS_LIMIT_MB (default 1024), FUZZ_TIMEOUT (seconds per input, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-address}
rss_limit=${FUZZ_RSS_LIMIT_MB:-1024}
timeout=${FUZZ_TIMEOUT:-2}

command -v rustup >/dev/null || { echo "fuzz: rustup is needed (https://rustup.rs)" >&2; exit 1; }
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain (cargo-fuzz needs -Z flags)"
    rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi

echo "== building ${#targets[@]} targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"

# libFuzzer runs -jobs in child processes that log to files: with one job, run in-process.
parallel=()
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
for target in "${targets[@]}"; do
    echo "== $target: ${seconds}s"
    mkdir -p "fuzz/corpus/$target"
    set +e
    cargo +nightly fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$target" \
        "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" "${parallel[@]}" \
        -rss_limit_mb="$rss_limit" -malloc_limit_mb="$rss_limit" -timeout="$timeout" \
        -print_final_stats=1 >"$logs/$target.log" 2>&1
    status=$?
    set -e
    grep -E '^(Done|SUMMARY|stat::number_of_executed_units)' "$logs/$target.log" || true
    if [ "$status" -ne 0 ]; then
        echo "fuzz: $target failed (exit $status); input saved under fuzz/artifacts/$target/" >&2
        tail -n 40 "$logs/$target.log" >&2
        exit "$status"
    fi
done

echo "== summary (executions and time per target)"
for target in "${targets[@]}"; do
    runs=$(grep -h 'stat::number_of_executed_units' "$logs/$target.log" | awk '{s += $2} END {print s + 0}')
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    printf '%-16s %12s executions in %ss; corpus %s files\n' "$target" "$runs" "$seconds" "$corpus"
done
